//! Template builds requested through the API: their life cycle, log lines and tags.
//!
//! A build row is created `waiting` when a client requests it, becomes `building` when the
//! client starts it, and ends `ready` or `error`. Only a `ready` build becomes the
//! template's current build (`templates.build_id`); a template whose first build has not
//! finished carries that build with the build's status.

use chrono::{DateTime, Utc};
use hearth_types::{BuildId, TemplateId};
use sqlx::sqlite::SqliteRow;
use sqlx::Row;

use super::templates::parse_build_id;
use super::{from_millis, from_millis_opt, to_millis, to_u32, BuildStatus, Store, StoreError};
use crate::builds::{BuildOutput, LogLevel};

/// A build to record as `waiting`.
#[derive(Clone, Debug)]
pub struct NewBuild {
    pub template_id: TemplateId,
    /// The build; use [`crate::new_build_id`], because the SDK parses build IDs as UUIDs.
    pub build_id: BuildId,
    /// Tags the build gets once it is ready.
    pub tags: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub min_free_disk_mb: Option<u64>,
    /// Dockerfile of the older build flow (`POST /templates`).
    pub dockerfile: Option<String>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
}

/// A build row with everything the build routes read.
#[derive(Clone, Debug)]
pub struct BuildRequestRecord {
    pub template_id: TemplateId,
    pub build_id: BuildId,
    pub status: BuildStatus,
    pub tags: Vec<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_mb: u32,
    pub envd_version: String,
    pub min_free_disk_mb: Option<u64>,
    pub dockerfile: Option<String>,
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
    /// Reason the build failed, when its status is `error`.
    pub reason: Option<String>,
    /// The failed step, when known.
    pub reason_step: Option<String>,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// Start-time values of a build: the commands, which the v2 start request may replace.
#[derive(Clone, Debug, Default)]
pub struct BuildStartRecord {
    pub start_cmd: Option<String>,
    pub ready_cmd: Option<String>,
}

/// One log line to store.
#[derive(Clone, Debug)]
pub struct BuildLogLine {
    /// Position of the line in the build's log, counted from 0.
    pub seq: u64,
    pub at: DateTime<Utc>,
    pub level: LogLevel,
    pub step: Option<String>,
    pub message: String,
}

/// A stored log line.
pub type StoredLogEntry = BuildLogLine;

/// A tag and the build it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TemplateTagRecord {
    pub tag: String,
    pub build_id: BuildId,
    pub assigned_at: DateTime<Utc>,
}

/// One assignment of a tag to a build, from the assignment history.
#[derive(Clone, Debug)]
pub struct TagAssignment {
    pub assignment_id: String,
    pub tag: String,
    pub build_id: BuildId,
    pub assigned_at: DateTime<Utc>,
    pub build_created_at: DateTime<Utc>,
    pub build_finished_at: Option<DateTime<Utc>>,
}

const BUILD_COLUMNS: &str = "SELECT template_id, build_id, status, tags, vcpus, memory_mib, disk_mb, \
     envd_version, min_free_disk_mb, dockerfile, start_cmd, ready_cmd, reason, reason_step, \
     created_at, finished_at FROM template_builds";

impl Store {
    /// Records a `waiting` build. With `new_template_alias`, also creates the template
    /// (carrying this build until a build is ready) and points the alias at it.
    pub async fn insert_build(
        &self,
        build: &NewBuild,
        new_template_alias: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = to_millis(Utc::now());
        let mut tx = self.pool.begin().await?;

        if let Some(alias) = new_template_alias {
            sqlx::query(
                "INSERT INTO templates (template_id, build_id, vcpus, memory_mib, disk_mb, envd_version, \
                 status, public, spawn_count, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, 0, '', 'waiting', 0, 0, $5, $5)",
            )
            .bind(build.template_id.as_str())
            .bind(build.build_id.as_str())
            .bind(i64::from(build.vcpus))
            .bind(i64::from(build.memory_mib))
            .bind(now)
            .execute(&mut *tx)
            .await?;
            sqlx::query("INSERT INTO template_aliases (alias, template_id) VALUES ($1, $2)")
                .bind(alias)
                .bind(build.template_id.as_str())
                .execute(&mut *tx)
                .await?;
        }

        let tags = serde_json::to_string(&build.tags).expect("a list of strings serializes");
        sqlx::query(
            "INSERT INTO template_builds (build_id, template_id, status, vcpus, memory_mib, disk_mb, \
             envd_version, created_at, updated_at, tags, dockerfile, start_cmd, ready_cmd, min_free_disk_mb) \
             VALUES ($1, $2, 'waiting', $3, $4, 0, '', $5, $5, $6, $7, $8, $9, $10)",
        )
        .bind(build.build_id.as_str())
        .bind(build.template_id.as_str())
        .bind(i64::from(build.vcpus))
        .bind(i64::from(build.memory_mib))
        .bind(now)
        .bind(tags)
        .bind(&build.dockerfile)
        .bind(&build.start_cmd)
        .bind(&build.ready_cmd)
        .bind(build.min_free_disk_mb.map(|mb| mb as i64))
        .execute(&mut *tx)
        .await?;

        tx.commit().await?;
        Ok(())
    }

    /// Returns a build of a template, or `None` when the template has no such build.
    pub async fn get_build(
        &self,
        template_id: &TemplateId,
        build_id: &str,
    ) -> Result<Option<BuildRequestRecord>, StoreError> {
        let sql = format!("{BUILD_COLUMNS} WHERE template_id = $1 AND build_id = $2");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(template_id.as_str())
            .bind(build_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(build_from_row).transpose()
    }

    /// Moves a `waiting` build to `building` and stores the commands it runs with.
    /// Returns false when the build is not `waiting` (already started or finished).
    pub async fn mark_build_started(
        &self,
        build_id: &BuildId,
        start: &BuildStartRecord,
    ) -> Result<bool, StoreError> {
        let now = to_millis(Utc::now());
        let updated = sqlx::query(
            "UPDATE template_builds SET status = 'building', started_at = $2, updated_at = $2, \
             start_cmd = $3, ready_cmd = $4 WHERE build_id = $1 AND status = 'waiting'",
        )
        .bind(build_id.as_str())
        .bind(now)
        .bind(&start.start_cmd)
        .bind(&start.ready_cmd)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if updated > 0 {
            // A template without a ready build reports the status of the build it carries.
            sqlx::query(
                "UPDATE templates SET status = 'building', updated_at = $2 WHERE status <> 'ready' \
                 AND template_id = (SELECT template_id FROM template_builds WHERE build_id = $1)",
            )
            .bind(build_id.as_str())
            .bind(now)
            .execute(&self.pool)
            .await?;
        }
        Ok(updated > 0)
    }

    /// Marks a build `ready`, makes it the template's current build and gives it the tags
    /// it was requested with.
    pub async fn finish_build_ready(
        &self,
        template_id: &TemplateId,
        build_id: &BuildId,
        output: &BuildOutput,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        let now_ms = to_millis(now);
        let disk_mb = i64::try_from(output.disk_mb).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await?;

        sqlx::query(
            "UPDATE template_builds SET status = 'ready', vcpus = $2, memory_mib = $3, disk_mb = $4, \
             envd_version = $5, updated_at = $6, finished_at = $6 WHERE build_id = $1",
        )
        .bind(build_id.as_str())
        .bind(i64::from(output.vcpus))
        .bind(i64::from(output.memory_mib))
        .bind(disk_mb)
        .bind(&output.envd_version)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE templates SET build_id = $2, vcpus = $3, memory_mib = $4, disk_mb = $5, \
             envd_version = $6, status = 'ready', updated_at = $7 WHERE template_id = $1",
        )
        .bind(template_id.as_str())
        .bind(build_id.as_str())
        .bind(i64::from(output.vcpus))
        .bind(i64::from(output.memory_mib))
        .bind(disk_mb)
        .bind(&output.envd_version)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;

        let tags: String = sqlx::query_scalar("SELECT tags FROM template_builds WHERE build_id = $1")
            .bind(build_id.as_str())
            .fetch_one(&mut *tx)
            .await?;
        let tags: Vec<String> = serde_json::from_str(&tags).map_err(|_| StoreError::Corrupt {
            column: "tags",
            value: tags.clone(),
        })?;
        for tag in &tags {
            assign_tag(&mut tx, template_id, build_id, tag, now).await?;
        }

        tx.commit().await?;
        Ok(())
    }

    /// Marks a build `error` with its reason. The template keeps its current build; a
    /// template without a ready build takes the status `error`.
    pub async fn finish_build_error(
        &self,
        build_id: &BuildId,
        message: &str,
        step: Option<&str>,
    ) -> Result<(), StoreError> {
        let now = to_millis(Utc::now());
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "UPDATE template_builds SET status = 'error', reason = $2, reason_step = $3, \
             updated_at = $4, finished_at = $4 WHERE build_id = $1",
        )
        .bind(build_id.as_str())
        .bind(message)
        .bind(step)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE templates SET status = 'error', updated_at = $2 WHERE status <> 'ready' \
             AND template_id = (SELECT template_id FROM template_builds WHERE build_id = $1)",
        )
        .bind(build_id.as_str())
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks every `waiting` or `building` build `error` with `reason`, for start-up after
    /// a stop that interrupted them. Returns the builds it marked.
    pub async fn fail_unfinished_builds(&self, reason: &str) -> Result<Vec<BuildId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT build_id FROM template_builds WHERE status IN ('waiting', 'building') ORDER BY created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut failed = Vec::with_capacity(ids.len());
        for id in ids {
            let build_id = parse_build_id(id)?;
            self.finish_build_error(&build_id, reason, None).await?;
            failed.push(build_id);
        }
        Ok(failed)
    }

    /// Counts a template's builds that are `building`.
    pub async fn running_build_count(&self, template_id: &TemplateId) -> Result<i64, StoreError> {
        let count = sqlx::query_scalar(
            "SELECT COUNT(*) FROM template_builds WHERE template_id = $1 AND status = 'building'",
        )
        .bind(template_id.as_str())
        .fetch_one(&self.pool)
        .await?;
        Ok(count)
    }

    /// Sets whether a template is public.
    pub async fn set_template_public(
        &self,
        template_id: &TemplateId,
        public: bool,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE templates SET public = $2, updated_at = $3 WHERE template_id = $1")
            .bind(template_id.as_str())
            .bind(i64::from(public))
            .bind(to_millis(Utc::now()))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stores log lines of a build.
    pub async fn append_build_logs(
        &self,
        build_id: &BuildId,
        lines: &[BuildLogLine],
    ) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        for line in lines {
            sqlx::query(
                "INSERT INTO template_build_logs (build_id, seq, at, level, step, message) \
                 VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(build_id.as_str())
            .bind(line.seq as i64)
            .bind(to_millis(line.at))
            .bind(line.level.as_str())
            .bind(&line.step)
            .bind(&line.message)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Returns up to `limit` log lines at `min_level` or above, skipping the first
    /// `offset` of them, in log order.
    pub async fn build_logs_from_offset(
        &self,
        build_id: &BuildId,
        offset: u64,
        limit: u32,
        min_level: LogLevel,
    ) -> Result<Vec<StoredLogEntry>, StoreError> {
        let sql = format!(
            "SELECT seq, at, level, step, message FROM template_build_logs \
             WHERE build_id = $1 AND level IN ({}) ORDER BY seq LIMIT $2 OFFSET $3",
            levels_at_or_above(min_level)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(build_id.as_str())
            .bind(i64::from(limit))
            .bind(i64::try_from(offset).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(log_from_row).collect()
    }

    /// Returns up to `limit` log lines at `min_level` or above, written at or after
    /// `cursor` in log order (`forward`), or at or before it, newest first.
    pub async fn build_logs_by_time(
        &self,
        build_id: &BuildId,
        cursor: DateTime<Utc>,
        limit: u32,
        forward: bool,
        min_level: LogLevel,
    ) -> Result<Vec<StoredLogEntry>, StoreError> {
        let (comparison, order) = if forward { (">=", "ASC") } else { ("<=", "DESC") };
        let sql = format!(
            "SELECT seq, at, level, step, message FROM template_build_logs \
             WHERE build_id = $1 AND level IN ({}) AND at {comparison} $2 ORDER BY seq {order} LIMIT $3",
            levels_at_or_above(min_level)
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(build_id.as_str())
            .bind(to_millis(cursor))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(log_from_row).collect()
    }

    /// Returns the last `count` log lines of a build, in log order.
    pub async fn last_build_logs(
        &self,
        build_id: &BuildId,
        count: u32,
    ) -> Result<Vec<StoredLogEntry>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, level, step, message FROM template_build_logs WHERE build_id = $1 \
             ORDER BY seq DESC LIMIT $2",
        )
        .bind(build_id.as_str())
        .bind(i64::from(count))
        .fetch_all(&self.pool)
        .await?;
        let mut lines = rows.iter().map(log_from_row).collect::<Result<Vec<_>, _>>()?;
        lines.reverse();
        Ok(lines)
    }

    /// Points each of `tags` at a ready build of the template.
    pub async fn assign_tags(
        &self,
        template_id: &TemplateId,
        build_id: &BuildId,
        tags: &[String],
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        for tag in tags {
            assign_tag(&mut tx, template_id, build_id, tag, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Removes tags of a template with their assignment history. Returns the tags that
    /// did not exist; nothing is removed unless all exist.
    pub async fn delete_tags(
        &self,
        template_id: &TemplateId,
        tags: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let mut missing = Vec::new();
        for tag in tags {
            let deleted = sqlx::query("DELETE FROM template_tags WHERE template_id = $1 AND tag = $2")
                .bind(template_id.as_str())
                .bind(tag)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if deleted == 0 {
                missing.push(tag.clone());
            }
            sqlx::query("DELETE FROM template_tag_assignments WHERE template_id = $1 AND tag = $2")
                .bind(template_id.as_str())
                .bind(tag)
                .execute(&mut *tx)
                .await?;
        }
        if missing.is_empty() {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(missing)
    }

    /// Lists a template's tags by name.
    pub async fn list_tags(&self, template_id: &TemplateId) -> Result<Vec<TemplateTagRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT tag, build_id, assigned_at FROM template_tags WHERE template_id = $1 ORDER BY tag",
        )
        .bind(template_id.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(TemplateTagRecord {
                    tag: row.try_get("tag")?,
                    build_id: parse_build_id(row.try_get("build_id")?)?,
                    assigned_at: from_millis("assigned_at", row.try_get("assigned_at")?)?,
                })
            })
            .collect()
    }

    /// Returns the build a tag of the template names.
    pub async fn tagged_build(
        &self,
        template_id: &TemplateId,
        tag: &str,
    ) -> Result<Option<BuildId>, StoreError> {
        let id: Option<String> = sqlx::query_scalar(
            "SELECT build_id FROM template_tags WHERE template_id = $1 AND tag = $2",
        )
        .bind(template_id.as_str())
        .bind(tag)
        .fetch_optional(&self.pool)
        .await?;
        id.map(parse_build_id).transpose()
    }

    /// Lists the assignment history of one tag, newest first.
    pub async fn tag_assignments(
        &self,
        template_id: &TemplateId,
        tag: &str,
    ) -> Result<Vec<TagAssignment>, StoreError> {
        let rows = sqlx::query(
            "SELECT a.assignment_id, a.tag, a.build_id, a.assigned_at, b.created_at, b.finished_at \
             FROM template_tag_assignments a JOIN template_builds b ON b.build_id = a.build_id \
             WHERE a.template_id = $1 AND a.tag = $2 ORDER BY a.assigned_at DESC, a.assignment_id",
        )
        .bind(template_id.as_str())
        .bind(tag)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(TagAssignment {
                    assignment_id: row.try_get("assignment_id")?,
                    tag: row.try_get("tag")?,
                    build_id: parse_build_id(row.try_get("build_id")?)?,
                    assigned_at: from_millis("assigned_at", row.try_get("assigned_at")?)?,
                    build_created_at: from_millis("created_at", row.try_get("created_at")?)?,
                    build_finished_at: from_millis_opt("finished_at", row.try_get("finished_at")?)?,
                })
            })
            .collect()
    }
}

async fn assign_tag(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    template_id: &TemplateId,
    build_id: &BuildId,
    tag: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let assignment_id = uuid::Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO template_tags (template_id, tag, build_id, assignment_id, assigned_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (template_id, tag) DO UPDATE SET \
         build_id = excluded.build_id, assignment_id = excluded.assignment_id, assigned_at = excluded.assigned_at",
    )
    .bind(template_id.as_str())
    .bind(tag)
    .bind(build_id.as_str())
    .bind(&assignment_id)
    .bind(to_millis(at))
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO template_tag_assignments (assignment_id, template_id, tag, build_id, assigned_at) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(&assignment_id)
    .bind(template_id.as_str())
    .bind(tag)
    .bind(build_id.as_str())
    .bind(to_millis(at))
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Returns the SQL list of the level names at `min_level` or above.
fn levels_at_or_above(min_level: LogLevel) -> &'static str {
    match min_level {
        LogLevel::Debug => "'debug', 'info', 'warn', 'error'",
        LogLevel::Info => "'info', 'warn', 'error'",
        LogLevel::Warn => "'warn', 'error'",
        LogLevel::Error => "'error'",
    }
}

fn parse_level(value: String) -> Result<LogLevel, StoreError> {
    match value.as_str() {
        "debug" => Ok(LogLevel::Debug),
        "info" => Ok(LogLevel::Info),
        "warn" => Ok(LogLevel::Warn),
        "error" => Ok(LogLevel::Error),
        _ => Err(StoreError::Corrupt { column: "level", value }),
    }
}

fn log_from_row(row: &SqliteRow) -> Result<StoredLogEntry, StoreError> {
    let seq: i64 = row.try_get("seq")?;
    Ok(BuildLogLine {
        seq: u64::try_from(seq).map_err(|_| StoreError::Corrupt {
            column: "seq",
            value: seq.to_string(),
        })?,
        at: from_millis("at", row.try_get("at")?)?,
        level: parse_level(row.try_get("level")?)?,
        step: row.try_get("step")?,
        message: row.try_get("message")?,
    })
}

fn build_from_row(row: &SqliteRow) -> Result<BuildRequestRecord, StoreError> {
    let template_id: String = row.try_get("template_id")?;
    let template_id = TemplateId::parse(&template_id).map_err(|_| StoreError::Corrupt {
        column: "template_id",
        value: template_id,
    })?;
    let tags: String = row.try_get("tags")?;
    let tags = serde_json::from_str(&tags).map_err(|_| StoreError::Corrupt {
        column: "tags",
        value: tags.clone(),
    })?;
    let min_free_disk_mb: Option<i64> = row.try_get("min_free_disk_mb")?;
    Ok(BuildRequestRecord {
        template_id,
        build_id: parse_build_id(row.try_get("build_id")?)?,
        status: row.try_get::<String, _>("status")?.parse()?,
        tags,
        vcpus: to_u32("vcpus", row.try_get("vcpus")?)?,
        memory_mib: to_u32("memory_mib", row.try_get("memory_mib")?)?,
        disk_mb: to_u32("disk_mb", row.try_get("disk_mb")?)?,
        envd_version: row.try_get("envd_version")?,
        min_free_disk_mb: min_free_disk_mb.and_then(|mb| u64::try_from(mb).ok()),
        dockerfile: row.try_get("dockerfile")?,
        start_cmd: row.try_get("start_cmd")?,
        ready_cmd: row.try_get("ready_cmd")?,
        reason: row.try_get("reason")?,
        reason_step: row.try_get("reason_step")?,
        created_at: from_millis("created_at", row.try_get("created_at")?)?,
        finished_at: from_millis_opt("finished_at", row.try_get("finished_at")?)?,
    })
}
