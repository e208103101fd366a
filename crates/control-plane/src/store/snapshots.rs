//! Named snapshots: templates whose one build was checkpointed from a sandbox.

use chrono::{DateTime, Utc};
use hearth_types::{SandboxId, TemplateId};
use sqlx::Row;

use super::{from_millis, to_millis, Store, StoreError};

/// A snapshot as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRecord {
    /// The snapshot's template ID, which `POST /sandboxes` accepts as `templateID`.
    pub snapshot_id: TemplateId,
    /// Sandbox it was taken from.
    pub source_sandbox_id: String,
    /// Name the request gave, also an alias of the template.
    pub name: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Records a snapshot whose template build is already registered.
    pub async fn insert_snapshot(
        &self,
        snapshot_id: &TemplateId,
        source: &SandboxId,
        name: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        // A name belongs to the newest snapshot that took it, as its template alias does.
        if let Some(name) = name {
            sqlx::query("UPDATE snapshots SET name = NULL WHERE name = $1")
                .bind(name)
                .execute(&self.pool)
                .await?;
        }
        sqlx::query(
            "INSERT INTO snapshots (snapshot_id, source_sandbox_id, name, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(snapshot_id.as_str())
        .bind(source.as_str())
        .bind(name)
        .bind(to_millis(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Returns the envd access token of the sandbox that `template_id` was snapshotted
    /// from, or `None` when the template is no snapshot or its source was not secured.
    pub async fn snapshot_source_token(&self, template_id: &TemplateId) -> Result<Option<String>, StoreError> {
        let row = sqlx::query(
            "SELECT b.envd_access_token FROM snapshots s JOIN sandboxes b ON b.sandbox_id = s.source_sandbox_id \
             WHERE s.snapshot_id = $1",
        )
        .bind(template_id.as_str())
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(row) => row.try_get("envd_access_token")?,
            None => None,
        })
    }

    /// Returns whether `snapshot_id` is a snapshot (not a built template).
    pub async fn is_snapshot(&self, snapshot_id: &TemplateId) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM snapshots WHERE snapshot_id = $1")
            .bind(snapshot_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.is_some())
    }

    /// Live sandboxes started from `template_id`, and snapshots taken from sandboxes that
    /// started from it: everything whose disk chain or memory reads the template's files.
    pub async fn template_dependents(&self, template_id: &TemplateId) -> Result<(i64, i64), StoreError> {
        let sandboxes: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM sandboxes WHERE template_id = $1 AND state <> 'killed'",
        )
        .bind(template_id.as_str())
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        let snapshots: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM snapshots s JOIN sandboxes b ON b.sandbox_id = s.source_sandbox_id \
             WHERE b.template_id = $1",
        )
        .bind(template_id.as_str())
        .fetch_one(&self.pool)
        .await?
        .try_get("n")?;
        Ok((sandboxes, snapshots))
    }

    /// Deletes a template with its builds, aliases and snapshot row.
    pub async fn delete_template(&self, template_id: &TemplateId) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM snapshots WHERE snapshot_id = $1",
            "DELETE FROM template_aliases WHERE template_id = $1",
            "DELETE FROM template_builds WHERE template_id = $1",
        ] {
            sqlx::query(sql).bind(template_id.as_str()).execute(&mut *tx).await?;
        }
        let deleted = sqlx::query("DELETE FROM templates WHERE template_id = $1")
            .bind(template_id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected();
        tx.commit().await?;
        Ok(deleted > 0)
    }

    /// Snapshots, oldest first, optionally only those of one sandbox or with one name or ID.
    pub async fn list_snapshots(
        &self,
        source: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<SnapshotRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT snapshot_id, source_sandbox_id, name, created_at FROM snapshots \
             WHERE ($1 IS NULL OR source_sandbox_id = $1) AND ($2 IS NULL OR name = $2 OR snapshot_id = $2) \
             ORDER BY created_at, snapshot_id",
        )
        .bind(source)
        .bind(name)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("snapshot_id")?;
                Ok(SnapshotRecord {
                    snapshot_id: TemplateId::parse(&id)
                        .map_err(|_| StoreError::Corrupt { column: "snapshot_id", value: id.clone() })?,
                    source_sandbox_id: row.try_get("source_sandbox_id")?,
                    name: row.try_get("name")?,
                    created_at: from_millis("created_at", row.try_get("created_at")?)?,
                })
            })
            .collect()
    }
}
