//! API keys, stored as SHA-256 hashes.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{from_millis, from_millis_opt, to_millis, Store, StoreError};
use crate::auth::{generate_api_key, hash_api_key};

/// Number of leading key characters kept in clear so an operator can tell keys apart.
const KEY_PREFIX_LEN: usize = 10;

/// A key just created. `key` is shown once and never stored.
#[derive(Clone, Debug)]
pub struct CreatedApiKey {
    pub key_id: String,
    pub name: String,
    pub key: String,
}

/// A stored key, without the key itself.
#[derive(Clone, Debug)]
pub struct ApiKeyRecord {
    pub key_id: String,
    pub name: String,
    /// First characters of the key, such as `e2b_1f3a9c`.
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Creates an API key of the form `e2b_` followed by 40 hex digits and stores its hash.
    pub async fn create_api_key(&self, name: &str) -> Result<CreatedApiKey, StoreError> {
        let key = generate_api_key();
        let key_id = uuid::Uuid::new_v4().to_string();

        sqlx::query(
            "INSERT INTO api_keys (key_id, name, key_hash, key_prefix, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&key_id)
        .bind(name)
        .bind(hash_api_key(&key))
        .bind(&key[..KEY_PREFIX_LEN])
        .bind(to_millis(Utc::now()))
        .execute(&self.pool)
        .await?;

        tracing::info!(key_id = %key_id, name, "API key created");
        Ok(CreatedApiKey {
            key_id,
            name: name.to_owned(),
            key,
        })
    }

    /// Lists the stored keys, oldest first.
    pub async fn list_api_keys(&self) -> Result<Vec<ApiKeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, name, key_prefix, created_at, last_used_at FROM api_keys \
             ORDER BY created_at, key_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(ApiKeyRecord {
                    key_id: row.try_get("key_id")?,
                    name: row.try_get("name")?,
                    key_prefix: row.try_get("key_prefix")?,
                    created_at: from_millis("created_at", row.try_get("created_at")?)?,
                    last_used_at: from_millis_opt("last_used_at", row.try_get("last_used_at")?)?,
                })
            })
            .collect()
    }

    /// Deletes a key. Returns false when no key has `key_id`.
    pub async fn delete_api_key(&self, key_id: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("DELETE FROM api_keys WHERE key_id = $1")
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Checks whether a key with this SHA-256 hash (lowercase hex) is stored, and records its use.
    pub(crate) async fn api_key_hash_exists(&self, key_hash: &str) -> Result<bool, StoreError> {
        let result = sqlx::query("UPDATE api_keys SET last_used_at = $2 WHERE key_hash = $1")
            .bind(key_hash)
            .bind(to_millis(Utc::now()))
            .execute(&self.pool)
            .await?;
        Ok(result.rows_affected() > 0)
    }
}
