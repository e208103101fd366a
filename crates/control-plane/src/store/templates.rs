//! Templates, their builds and aliases.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use hearth_types::{BuildId, TemplateId};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::{from_millis, from_millis_opt, to_millis, to_u32, Store, StoreError};

/// Status of a template build, with the values the E2B API uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuildStatus {
    /// Accepted, not started.
    Waiting,
    /// Being built.
    Building,
    /// Built and snapshotted; sandboxes can start from it.
    Ready,
    /// The build failed.
    Error,
}

impl BuildStatus {
    /// The status as stored and as sent on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Building => "building",
            Self::Ready => "ready",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for BuildStatus {
    type Err = StoreError;

    fn from_str(value: &str) -> Result<Self, StoreError> {
        match value {
            "waiting" => Ok(Self::Waiting),
            "building" => Ok(Self::Building),
            "ready" => Ok(Self::Ready),
            "error" => Ok(Self::Error),
            other => Err(StoreError::Corrupt {
                column: "status",
                value: other.to_owned(),
            }),
        }
    }
}

/// A finished template build, as the template builder reports it.
#[derive(Clone, Debug)]
pub struct TemplateBuildRecord {
    /// Template the build belongs to; created if it does not exist yet.
    pub template_id: TemplateId,
    /// The build. The SDK parses build IDs as UUIDs, so use [`crate::new_build_id`].
    pub build_id: BuildId,
    /// Virtual CPUs the snapshot was taken with.
    pub vcpus: u32,
    /// Guest memory in MiB the snapshot was taken with.
    pub memory_mib: u32,
    /// Size of the root filesystem image in MB.
    pub disk_mb: u32,
    /// Version of envd inside the image.
    pub envd_version: String,
    /// Aliases that will name this template, such as `base`. An alias held by another
    /// template moves to this one.
    pub aliases: Vec<String>,
}

/// A template as stored, with its latest ready build.
#[derive(Clone, Debug)]
pub struct TemplateRecord {
    pub template_id: TemplateId,
    /// Build that sandboxes start from.
    pub build_id: BuildId,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mb: u32,
    pub envd_version: String,
    pub status: BuildStatus,
    pub public: bool,
    pub aliases: Vec<String>,
    pub spawn_count: i64,
    pub build_count: i64,
    pub last_spawned_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One build of a template.
#[derive(Clone, Debug)]
pub struct BuildRecord {
    pub build_id: BuildId,
    pub status: BuildStatus,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mb: u32,
    pub envd_version: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Tag a build gets when its request names no tag, and that a reference without a tag means.
pub const DEFAULT_TAG: &str = "default";

const TEMPLATE_COLUMNS: &str = "SELECT t.template_id, t.build_id, t.vcpus, t.memory_mib, t.disk_mb, \
     t.envd_version, t.status, t.public, t.spawn_count, t.last_spawned_at, t.created_at, t.updated_at, \
     (SELECT COUNT(*) FROM template_builds b WHERE b.template_id = t.template_id) AS build_count \
     FROM templates t";

impl Store {
    /// Records a finished build as ready, makes it the template's current build (creating
    /// the template if needed) and points `record.aliases` at the template.
    pub async fn register_template_build(
        &self,
        record: &TemplateBuildRecord,
    ) -> Result<(), StoreError> {
        let now = to_millis(Utc::now());
        let mut tx = self.pool.begin().await?;

        sqlx::query(
            "INSERT INTO templates (template_id, build_id, vcpus, memory_mib, disk_mb, envd_version, \
             status, public, spawn_count, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, 'ready', 0, 0, $7, $7) \
             ON CONFLICT (template_id) DO UPDATE SET build_id = excluded.build_id, \
             vcpus = excluded.vcpus, memory_mib = excluded.memory_mib, disk_mb = excluded.disk_mb, \
             envd_version = excluded.envd_version, status = 'ready', updated_at = excluded.updated_at",
        )
        .bind(record.template_id.as_str())
        .bind(record.build_id.as_str())
        .bind(i64::from(record.vcpus))
        .bind(i64::from(record.memory_mib))
        .bind(i64::from(record.disk_mb))
        .bind(&record.envd_version)
        .bind(now)
        .execute(&mut *tx)
        .await?;

        sqlx::query(
            "INSERT INTO template_builds (build_id, template_id, status, vcpus, memory_mib, disk_mb, \
             envd_version, created_at, updated_at, finished_at) \
             VALUES ($1, $2, 'ready', $3, $4, $5, $6, $7, $7, $7) \
             ON CONFLICT (build_id) DO UPDATE SET status = 'ready', vcpus = excluded.vcpus, \
             memory_mib = excluded.memory_mib, disk_mb = excluded.disk_mb, \
             envd_version = excluded.envd_version, updated_at = excluded.updated_at, \
             finished_at = excluded.finished_at",
        )
        .bind(record.build_id.as_str())
        .bind(record.template_id.as_str())
        .bind(i64::from(record.vcpus))
        .bind(i64::from(record.memory_mib))
        .bind(i64::from(record.disk_mb))
        .bind(&record.envd_version)
        .bind(now)
        .execute(&mut *tx)
        .await?;

        for alias in &record.aliases {
            sqlx::query(
                "INSERT INTO template_aliases (alias, template_id) VALUES ($1, $2) \
                 ON CONFLICT (alias) DO UPDATE SET template_id = excluded.template_id",
            )
            .bind(alias)
            .bind(record.template_id.as_str())
            .execute(&mut *tx)
            .await?;
        }

        tx.commit().await?;
        tracing::info!(
            template_id = %record.template_id,
            build_id = %record.build_id,
            aliases = ?record.aliases,
            "template build registered as ready"
        );
        Ok(())
    }

    /// Looks a template up by ID first, then by alias. A reference `name:tag` (the name
    /// being an ID or alias) returns the template with the build the tag names in place of
    /// its current build; the tag `default` names the current build unless it was assigned.
    pub async fn find_template(
        &self,
        reference: &str,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        let Some((name, tag)) = reference.rsplit_once(':') else {
            return self.find_template_by_name(reference).await;
        };
        let Some(mut template) = self.find_template_by_name(name).await? else {
            return Ok(None);
        };
        let build_id = match self.tagged_build(&template.template_id, tag).await? {
            Some(build_id) => build_id,
            None if tag == DEFAULT_TAG => return Ok(Some(template)),
            None => return Ok(None),
        };
        if build_id == template.build_id {
            return Ok(Some(template));
        }
        let Some(build) = self.get_build(&template.template_id, build_id.as_str()).await? else {
            return Ok(None);
        };
        template.build_id = build.build_id;
        template.vcpus = build.vcpus;
        template.memory_mib = build.memory_mib;
        template.disk_mb = build.disk_mb;
        template.envd_version = build.envd_version;
        template.status = build.status;
        Ok(Some(template))
    }

    /// Looks a template up by ID first, then by alias, with its current build.
    async fn find_template_by_name(
        &self,
        id_or_alias: &str,
    ) -> Result<Option<TemplateRecord>, StoreError> {
        let by_id = format!("{TEMPLATE_COLUMNS} WHERE t.template_id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(by_id))
            .bind(id_or_alias)
            .fetch_optional(&self.pool)
            .await?;
        let row = match row {
            Some(row) => Some(row),
            None => {
                let by_alias = format!(
                    "{TEMPLATE_COLUMNS} JOIN template_aliases a ON a.template_id = t.template_id \
                     WHERE a.alias = $1"
                );
                sqlx::query(sqlx::AssertSqlSafe(by_alias))
                    .bind(id_or_alias)
                    .fetch_optional(&self.pool)
                    .await?
            }
        };

        match row {
            Some(row) => Ok(Some(self.template_from_row(&row).await?)),
            None => Ok(None),
        }
    }

    /// Lists every template, oldest first.
    pub async fn list_templates(&self) -> Result<Vec<TemplateRecord>, StoreError> {
        let sql = format!("{TEMPLATE_COLUMNS} ORDER BY t.created_at, t.template_id");
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(&self.pool)
            .await?;
        let mut templates = Vec::with_capacity(rows.len());
        for row in &rows {
            templates.push(self.template_from_row(row).await?);
        }
        Ok(templates)
    }

    /// Lists the builds of a template, newest first.
    pub async fn list_template_builds(
        &self,
        template_id: &TemplateId,
    ) -> Result<Vec<BuildRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT build_id, status, vcpus, memory_mib, disk_mb, envd_version, created_at, \
             updated_at, finished_at FROM template_builds WHERE template_id = $1 \
             ORDER BY created_at DESC, build_id",
        )
        .bind(template_id.as_str())
        .fetch_all(&self.pool)
        .await?;

        rows.iter()
            .map(|row| {
                let build_id: String = row.try_get("build_id")?;
                Ok(BuildRecord {
                    build_id: parse_build_id(build_id)?,
                    status: row.try_get::<String, _>("status")?.parse()?,
                    vcpus: to_u32("vcpus", row.try_get("vcpus")?)?,
                    memory_mib: to_u32("memory_mib", row.try_get("memory_mib")?)?,
                    disk_mb: to_u32("disk_mb", row.try_get("disk_mb")?)?,
                    envd_version: row.try_get("envd_version")?,
                    created_at: from_millis("created_at", row.try_get("created_at")?)?,
                    updated_at: from_millis("updated_at", row.try_get("updated_at")?)?,
                    finished_at: from_millis_opt("finished_at", row.try_get("finished_at")?)?,
                })
            })
            .collect()
    }

    /// Counts a sandbox start from the template.
    pub(crate) async fn record_template_spawn(
        &self,
        template_id: &TemplateId,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE templates SET spawn_count = spawn_count + 1, last_spawned_at = $2 \
             WHERE template_id = $1",
        )
        .bind(template_id.as_str())
        .bind(to_millis(at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn template_from_row(&self, row: &SqliteRow) -> Result<TemplateRecord, StoreError> {
        let template_id: String = row.try_get("template_id")?;
        let template_id = TemplateId::parse(&template_id).map_err(|_| StoreError::Corrupt {
            column: "template_id",
            value: template_id,
        })?;

        let aliases: Vec<String> = sqlx::query_scalar(
            "SELECT alias FROM template_aliases WHERE template_id = $1 ORDER BY alias",
        )
        .bind(template_id.as_str())
        .fetch_all(&self.pool)
        .await?;

        Ok(TemplateRecord {
            build_id: parse_build_id(row.try_get("build_id")?)?,
            vcpus: to_u32("vcpus", row.try_get("vcpus")?)?,
            memory_mib: to_u32("memory_mib", row.try_get("memory_mib")?)?,
            disk_mb: to_u32("disk_mb", row.try_get("disk_mb")?)?,
            envd_version: row.try_get("envd_version")?,
            status: row.try_get::<String, _>("status")?.parse()?,
            public: row.try_get::<i64, _>("public")? != 0,
            aliases,
            spawn_count: row.try_get("spawn_count")?,
            build_count: row.try_get("build_count")?,
            last_spawned_at: from_millis_opt("last_spawned_at", row.try_get("last_spawned_at")?)?,
            created_at: from_millis("created_at", row.try_get("created_at")?)?,
            updated_at: from_millis("updated_at", row.try_get("updated_at")?)?,
            template_id,
        })
    }
}

pub(super) fn parse_build_id(value: String) -> Result<BuildId, StoreError> {
    BuildId::parse(&value).map_err(|_| StoreError::Corrupt {
        column: "build_id",
        value,
    })
}
