//! Control-plane state: templates, sandboxes and API keys in SQLite.
//!
//! Queries are built at run time (no compile-time checked macros) and use only SQL that
//! PostgreSQL also accepts: `$N` placeholders, `TEXT`/`BIGINT`/`INTEGER` columns,
//! timestamps as milliseconds since the Unix epoch and JSON stored as text. A PostgreSQL
//! backend can therefore reuse the statements behind the same `Store` API.

mod api_keys;
mod builds;
mod sandboxes;
mod snapshots;
mod templates;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{SqlSafeStr, SqlitePool};

pub use api_keys::{ApiKeyRecord, CreatedApiKey};
pub use builds::{
    BuildLogLine, BuildRequestRecord, BuildStartRecord, NewBuild, StoredLogEntry, TagAssignment,
    TemplateTagRecord,
};
pub use sandboxes::{NewSandboxRecord, SandboxListFilter, SandboxRecord, SandboxState};
pub use snapshots::SnapshotRecord;
pub use templates::{BuildRecord, BuildStatus, TemplateBuildRecord, TemplateRecord, DEFAULT_TAG};

/// File name of the SQLite database inside the data directory.
pub const DATABASE_FILE: &str = "hearth.db";

/// Schema migrations, embedded so the binary needs no files beside it.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "initial",
        include_str!("../../migrations/0001_initial.sql"),
    ),
    (
        2,
        "pause and snapshots",
        include_str!("../../migrations/0002_pause_and_snapshots.sql"),
    ),
    (
        3,
        "template builds",
        include_str!("../../migrations/0003_template_builds.sql"),
    ),
    (
        4,
        "sandbox network",
        include_str!("../../migrations/0004_sandbox_network.sql"),
    ),
];

/// Errors of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("failed to create data directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Opening the database failed.
    #[error("failed to open database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: sqlx::Error,
    },
    /// Applying the schema migrations failed.
    #[error("failed to migrate database schema")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("database query failed")]
    Query(#[from] sqlx::Error),
    /// A stored value could not be decoded; the database was changed outside Hearth.
    #[error("invalid value {value:?} in column {column}")]
    Corrupt { column: &'static str, value: String },
}

/// Handle to the control-plane database. Cloning shares the connection pool.
#[derive(Clone, Debug)]
pub struct Store {
    pool: SqlitePool,
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir` and applies pending migrations.
    pub async fn open(data_dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(data_dir).map_err(|source| StoreError::CreateDir {
            path: data_dir.to_owned(),
            source,
        })?;
        let path = data_dir.join(DATABASE_FILE);

        let options = SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;

        let migrations = MIGRATIONS
            .iter()
            .map(|(version, description, sql)| {
                Migration::new(
                    *version,
                    Cow::Borrowed(*description),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect();
        Migrator::with_migrations(migrations).run(&pool).await?;

        tracing::debug!(path = %path.display(), "opened control-plane database");
        Ok(Self { pool })
    }

    /// Closes the connection pool, waiting for queries in flight.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Converts a timestamp to the stored form, milliseconds since the Unix epoch.
pub(crate) fn to_millis(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

/// Converts a stored timestamp back.
pub(crate) fn from_millis(column: &'static str, millis: i64) -> Result<DateTime<Utc>, StoreError> {
    Utc.timestamp_millis_opt(millis)
        .single()
        .ok_or(StoreError::Corrupt {
            column,
            value: millis.to_string(),
        })
}

/// Converts an optional stored timestamp back.
pub(crate) fn from_millis_opt(
    column: &'static str,
    millis: Option<i64>,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    millis.map(|m| from_millis(column, m)).transpose()
}

/// Converts a stored non-negative integer to `u32`.
pub(crate) fn to_u32(column: &'static str, value: i64) -> Result<u32, StoreError> {
    u32::try_from(value).map_err(|_| StoreError::Corrupt {
        column,
        value: value.to_string(),
    })
}
