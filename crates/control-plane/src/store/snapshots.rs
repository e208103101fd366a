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
