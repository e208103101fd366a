//! Sandboxes: one row per sandbox the control plane started, kept after it is killed.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use hearth_types::{BuildId, SandboxId, TemplateId};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::{from_millis, from_millis_opt, to_millis, to_u32, Store, StoreError};
use crate::network::NetworkSettings;

/// Lifecycle state of a sandbox row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SandboxState {
    Running,
    Paused,
    /// Stopped by a kill, a timeout, a shutdown or reconciliation; hidden from the API.
    Killed,
}

impl SandboxState {
    /// The state as stored, and for running and paused as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Killed => "killed",
        }
    }
}

impl fmt::Display for SandboxState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SandboxState {
    type Err = StoreError;

    fn from_str(value: &str) -> Result<Self, StoreError> {
        match value {
            "running" => Ok(Self::Running),
            "paused" => Ok(Self::Paused),
            "killed" => Ok(Self::Killed),
            other => Err(StoreError::Corrupt {
                column: "state",
                value: other.to_owned(),
            }),
        }
    }
}

/// A sandbox to insert after the runtime started it.
#[derive(Clone, Debug)]
pub struct NewSandboxRecord {
    pub sandbox_id: SandboxId,
    pub template_id: TemplateId,
    pub build_id: BuildId,
    pub alias: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub env_var_names: Vec<String>,
    pub envd_access_token: Option<String>,
    pub envd_version: String,
    pub allow_internet_access: Option<bool>,
    /// Network settings as accepted from the SDK.
    pub network: NetworkSettings,
    /// Token the proxy requires on the sandbox's ports, when public traffic is off.
    pub traffic_access_token: Option<String>,
    pub auto_pause: bool,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mb: u32,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
}

/// A sandbox as stored.
#[derive(Clone, Debug)]
pub struct SandboxRecord {
    pub sandbox_id: SandboxId,
    pub template_id: TemplateId,
    pub build_id: BuildId,
    pub alias: Option<String>,
    pub metadata: BTreeMap<String, String>,
    pub env_var_names: Vec<String>,
    pub envd_access_token: Option<String>,
    pub envd_version: String,
    pub allow_internet_access: Option<bool>,
    /// Network settings as accepted from the SDK (or as last replaced).
    pub network: NetworkSettings,
    /// Token the proxy requires on the sandbox's ports, when public traffic is off.
    pub traffic_access_token: Option<String>,
    pub auto_pause: bool,
    /// Whether traffic through the proxy resumes the sandbox while it is paused.
    pub auto_resume: bool,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mb: u32,
    pub state: SandboxState,
    pub started_at: DateTime<Utc>,
    pub end_at: DateTime<Utc>,
    pub killed_at: Option<DateTime<Utc>>,
}

/// Filter for [`Store::list_sandboxes`]. Every set field must match.
#[derive(Clone, Debug, Default)]
pub struct SandboxListFilter {
    /// States to include; empty means running and paused.
    pub states: Vec<SandboxState>,
    /// Metadata pairs that must all be present with equal values.
    pub metadata: BTreeMap<String, String>,
    /// Only sandboxes started at or after this time.
    pub started_after: Option<DateTime<Utc>>,
    /// Only sandboxes of this template.
    pub template_id: Option<TemplateId>,
}

const SANDBOX_COLUMNS: &str = "SELECT sandbox_id, template_id, build_id, alias, metadata, env_var_names, \
     envd_access_token, envd_version, allow_internet_access, auto_pause, auto_resume, vcpus, memory_mib, \
     disk_mb, state, started_at, end_at, killed_at, network, traffic_access_token FROM sandboxes";

impl Store {
    /// Inserts a running sandbox.
    pub async fn insert_sandbox(&self, record: &NewSandboxRecord) -> Result<(), StoreError> {
        let metadata = serde_json::to_string(&record.metadata).expect("a string map serializes");
        let env_var_names =
            serde_json::to_string(&record.env_var_names).expect("a string list serializes");
        let network = serde_json::to_string(&record.network).expect("network settings serialize");

        sqlx::query(
            "INSERT INTO sandboxes (sandbox_id, template_id, build_id, alias, metadata, env_var_names, \
             envd_access_token, envd_version, allow_internet_access, auto_pause, vcpus, memory_mib, \
             disk_mb, state, started_at, end_at, network, traffic_access_token) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, 'running', $14, $15, $16, $17)",
        )
        .bind(record.sandbox_id.as_str())
        .bind(record.template_id.as_str())
        .bind(record.build_id.as_str())
        .bind(record.alias.as_deref())
        .bind(metadata)
        .bind(env_var_names)
        .bind(record.envd_access_token.as_deref())
        .bind(&record.envd_version)
        .bind(record.allow_internet_access.map(i64::from))
        .bind(i64::from(record.auto_pause))
        .bind(i64::from(record.vcpus))
        .bind(i64::from(record.memory_mib))
        .bind(i64::from(record.disk_mb))
        .bind(to_millis(record.started_at))
        .bind(to_millis(record.end_at))
        .bind(network)
        .bind(record.traffic_access_token.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Returns a sandbox that is running or paused; killed sandboxes are `None`.
    pub async fn get_live_sandbox(
        &self,
        sandbox_id: &SandboxId,
    ) -> Result<Option<SandboxRecord>, StoreError> {
        let sql = format!("{SANDBOX_COLUMNS} WHERE sandbox_id = $1 AND state <> 'killed'");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(sandbox_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(sandbox_from_row).transpose()
    }

    /// Lists sandboxes matching `filter`, ordered by start time and then ID, ascending.
    ///
    /// NOTE: the metadata filter runs in Rust over every live row, which suits one host's
    /// sandboxes; a PostgreSQL backend should filter with JSON operators instead.
    pub async fn list_sandboxes(
        &self,
        filter: &SandboxListFilter,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let sql = format!(
            "{SANDBOX_COLUMNS} WHERE state <> 'killed' AND started_at >= $1 \
             ORDER BY started_at, sandbox_id"
        );
        let started_after = filter.started_after.map(to_millis).unwrap_or(i64::MIN);
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(started_after)
            .fetch_all(&self.pool)
            .await?;

        let states: &[SandboxState] = if filter.states.is_empty() {
            &[SandboxState::Running, SandboxState::Paused]
        } else {
            &filter.states
        };

        let mut sandboxes = Vec::new();
        for row in &rows {
            let sandbox = sandbox_from_row(row)?;
            let state_matches = states.contains(&sandbox.state);
            let template_matches = filter
                .template_id
                .as_ref()
                .is_none_or(|id| *id == sandbox.template_id);
            let metadata_matches = filter
                .metadata
                .iter()
                .all(|(key, value)| sandbox.metadata.get(key) == Some(value));
            if state_matches && template_matches && metadata_matches {
                sandboxes.push(sandbox);
            }
        }
        Ok(sandboxes)
    }

    /// Lists running sandboxes whose end time is at or before `now`.
    pub async fn list_expired_sandboxes(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<SandboxRecord>, StoreError> {
        let sql = format!(
            "{SANDBOX_COLUMNS} WHERE state = 'running' AND end_at <= $1 ORDER BY end_at, sandbox_id"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(to_millis(now))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(sandbox_from_row).collect()
    }

    /// Lists the IDs of every running sandbox.
    pub async fn list_running_sandbox_ids(&self) -> Result<Vec<SandboxId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT sandbox_id FROM sandboxes WHERE state = 'running' ORDER BY sandbox_id",
        )
        .fetch_all(&self.pool)
        .await?;
        ids.into_iter()
            .map(|id| {
                SandboxId::parse(&id).map_err(|_| StoreError::Corrupt {
                    column: "sandbox_id",
                    value: id,
                })
            })
            .collect()
    }

    /// Sets the end time of a running sandbox. Returns false when no running sandbox has `sandbox_id`.
    pub async fn set_sandbox_end(
        &self,
        sandbox_id: &SandboxId,
        end_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE sandboxes SET end_at = $2 WHERE sandbox_id = $1 AND state = 'running'",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(end_at))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Moves the end time of a running sandbox to `end_at` unless it is already later.
    /// Returns false when no running sandbox has `sandbox_id`.
    pub async fn extend_sandbox_end(
        &self,
        sandbox_id: &SandboxId,
        end_at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE sandboxes SET end_at = CASE WHEN end_at < $2 THEN $2 ELSE end_at END \
             WHERE sandbox_id = $1 AND state = 'running'",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(end_at))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Marks a running sandbox paused. Returns false when it was not running.
    pub async fn mark_sandbox_paused(&self, sandbox_id: &SandboxId, at: DateTime<Utc>) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE sandboxes SET state = 'paused', paused_at = $2 WHERE sandbox_id = $1 AND state = 'running'",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(at))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Marks a paused sandbox running again until `end_at`. Returns false when it was not paused.
    pub async fn mark_sandbox_resumed(&self, sandbox_id: &SandboxId, end_at: DateTime<Utc>) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE sandboxes SET state = 'running', paused_at = NULL, end_at = $2 \
             WHERE sandbox_id = $1 AND state = 'paused'",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(end_at))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Sets whether a sandbox pauses instead of ending at its timeout.
    pub async fn set_sandbox_auto_pause(&self, sandbox_id: &SandboxId, auto_pause: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET auto_pause = $2 WHERE sandbox_id = $1")
            .bind(sandbox_id.as_str())
            .bind(i64::from(auto_pause))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets whether traffic through the proxy resumes the sandbox while it is paused.
    pub async fn set_sandbox_auto_resume(&self, sandbox_id: &SandboxId, auto_resume: bool) -> Result<(), StoreError> {
        sqlx::query("UPDATE sandboxes SET auto_resume = $2 WHERE sandbox_id = $1")
            .bind(sandbox_id.as_str())
            .bind(i64::from(auto_resume))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Replaces a live sandbox's network settings; returns false when no live sandbox has the ID.
    pub async fn set_sandbox_network(
        &self,
        sandbox_id: &SandboxId,
        allow_internet_access: Option<bool>,
        network: &NetworkSettings,
    ) -> Result<bool, StoreError> {
        let network = serde_json::to_string(network).expect("network settings serialize");
        let result = sqlx::query(
            "UPDATE sandboxes SET allow_internet_access = $2, network = $3 \
             WHERE sandbox_id = $1 AND state IN ('running', 'paused')",
        )
        .bind(sandbox_id.as_str())
        .bind(allow_internet_access.map(i64::from))
        .bind(network)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// IDs of the sandboxes recorded as paused.
    pub async fn list_paused_sandbox_ids(&self) -> Result<Vec<SandboxId>, StoreError> {
        let rows = sqlx::query("SELECT sandbox_id FROM sandboxes WHERE state = 'paused' ORDER BY sandbox_id")
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|row| {
                let id: String = row.try_get("sandbox_id")?;
                SandboxId::parse(&id).map_err(|_| StoreError::Corrupt { column: "sandbox_id", value: id })
            })
            .collect()
    }

    /// Marks a live sandbox killed and records why. Returns false when it was already
    /// killed or never existed.
    pub async fn mark_sandbox_ended(
        &self,
        sandbox_id: &SandboxId,
        at: DateTime<Utc>,
        reason: &str,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE sandboxes SET state = 'killed', killed_at = $2, end_reason = $3 \
             WHERE sandbox_id = $1 AND state <> 'killed'",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(at))
        .bind(reason)
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }

    /// Returns why a killed sandbox ended, when something other than a request ended it.
    pub async fn sandbox_end_reason(&self, sandbox_id: &SandboxId) -> Result<Option<String>, StoreError> {
        let row = sqlx::query("SELECT end_reason FROM sandboxes WHERE sandbox_id = $1 AND state = 'killed'")
            .bind(sandbox_id.as_str())
            .fetch_optional(&self.pool)
            .await?;
        Ok(match row {
            Some(row) => row.try_get("end_reason")?,
            None => None,
        })
    }

    /// Marks a live sandbox killed. Returns false when it was already killed or never existed.
    pub async fn mark_sandbox_killed(
        &self,
        sandbox_id: &SandboxId,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let result = sqlx::query(
            "UPDATE sandboxes SET state = 'killed', killed_at = $2 \
             WHERE sandbox_id = $1 AND state <> 'killed'",
        )
        .bind(sandbox_id.as_str())
        .bind(to_millis(at))
        .execute(&self.pool)
        .await?;
        Ok(result.rows_affected() > 0)
    }
}

fn sandbox_from_row(row: &SqliteRow) -> Result<SandboxRecord, StoreError> {
    let sandbox_id: String = row.try_get("sandbox_id")?;
    let template_id: String = row.try_get("template_id")?;
    let build_id: String = row.try_get("build_id")?;
    let metadata: String = row.try_get("metadata")?;
    let env_var_names: String = row.try_get("env_var_names")?;

    Ok(SandboxRecord {
        sandbox_id: SandboxId::parse(&sandbox_id).map_err(|_| StoreError::Corrupt {
            column: "sandbox_id",
            value: sandbox_id.clone(),
        })?,
        template_id: TemplateId::parse(&template_id).map_err(|_| StoreError::Corrupt {
            column: "template_id",
            value: template_id.clone(),
        })?,
        build_id: BuildId::parse(&build_id).map_err(|_| StoreError::Corrupt {
            column: "build_id",
            value: build_id.clone(),
        })?,
        alias: row.try_get("alias")?,
        metadata: serde_json::from_str(&metadata).map_err(|_| StoreError::Corrupt {
            column: "metadata",
            value: metadata.clone(),
        })?,
        env_var_names: serde_json::from_str(&env_var_names).map_err(|_| StoreError::Corrupt {
            column: "env_var_names",
            value: env_var_names.clone(),
        })?,
        envd_access_token: row.try_get("envd_access_token")?,
        envd_version: row.try_get("envd_version")?,
        allow_internet_access: row
            .try_get::<Option<i64>, _>("allow_internet_access")?
            .map(|v| v != 0),
        auto_pause: row.try_get::<i64, _>("auto_pause")? != 0,
        auto_resume: row.try_get::<i64, _>("auto_resume")? != 0,
        vcpus: to_u32("vcpus", row.try_get("vcpus")?)?,
        memory_mib: to_u32("memory_mib", row.try_get("memory_mib")?)?,
        disk_mb: to_u32("disk_mb", row.try_get("disk_mb")?)?,
        state: row.try_get::<String, _>("state")?.parse()?,
        started_at: from_millis("started_at", row.try_get("started_at")?)?,
        end_at: from_millis("end_at", row.try_get("end_at")?)?,
        killed_at: from_millis_opt("killed_at", row.try_get("killed_at")?)?,
        network: match row.try_get::<Option<String>, _>("network")? {
            None => NetworkSettings::default(),
            Some(text) => serde_json::from_str(&text).map_err(|_| StoreError::Corrupt {
                column: "network",
                value: text.clone(),
            })?,
        },
        traffic_access_token: row.try_get("traffic_access_token")?,
    })
}
