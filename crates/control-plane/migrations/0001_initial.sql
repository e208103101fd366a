-- Hearth control-plane schema, version 1.
-- Kept to SQL that SQLite and PostgreSQL both accept: TEXT, BIGINT and INTEGER columns,
-- timestamps as BIGINT milliseconds since the Unix epoch, booleans as INTEGER 0/1 and
-- JSON documents as TEXT.

CREATE TABLE templates (
    template_id      TEXT PRIMARY KEY,
    -- Latest build whose status is 'ready'; sandboxes start from it.
    build_id         TEXT NOT NULL,
    vcpus            INTEGER NOT NULL,
    memory_mib       INTEGER NOT NULL,
    disk_mb          INTEGER NOT NULL,
    envd_version     TEXT NOT NULL,
    -- One of: waiting, building, ready, error (the SDK's TemplateBuildStatus values).
    status           TEXT NOT NULL,
    public           INTEGER NOT NULL DEFAULT 0,
    spawn_count      BIGINT NOT NULL DEFAULT 0,
    last_spawned_at  BIGINT,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

CREATE TABLE template_aliases (
    alias        TEXT PRIMARY KEY,
    template_id  TEXT NOT NULL REFERENCES templates (template_id) ON DELETE CASCADE
);

CREATE INDEX template_aliases_template ON template_aliases (template_id);

CREATE TABLE template_builds (
    build_id      TEXT PRIMARY KEY,
    template_id   TEXT NOT NULL REFERENCES templates (template_id) ON DELETE CASCADE,
    status        TEXT NOT NULL,
    vcpus         INTEGER NOT NULL,
    memory_mib    INTEGER NOT NULL,
    disk_mb       INTEGER NOT NULL,
    envd_version  TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    updated_at    BIGINT NOT NULL,
    finished_at   BIGINT
);

CREATE INDEX template_builds_template ON template_builds (template_id, created_at);

CREATE TABLE sandboxes (
    sandbox_id             TEXT PRIMARY KEY,
    template_id            TEXT NOT NULL,
    build_id               TEXT NOT NULL,
    -- Template alias the request named, if it named one.
    alias                  TEXT,
    -- JSON object of string values, as the client sent it.
    metadata               TEXT NOT NULL,
    -- JSON array of the environment variable names; the values are never stored.
    env_var_names          TEXT NOT NULL,
    -- Token envd requires; kept because connect must return it to the SDK.
    envd_access_token      TEXT,
    envd_version           TEXT NOT NULL,
    -- NULL when the request did not set allow_internet_access.
    allow_internet_access  INTEGER,
    auto_pause             INTEGER NOT NULL DEFAULT 0,
    vcpus                  INTEGER NOT NULL,
    memory_mib             INTEGER NOT NULL,
    disk_mb                INTEGER NOT NULL,
    -- One of: running, paused, killed.
    state                  TEXT NOT NULL,
    started_at             BIGINT NOT NULL,
    end_at                 BIGINT NOT NULL,
    killed_at              BIGINT
);

CREATE INDEX sandboxes_state_end ON sandboxes (state, end_at);
CREATE INDEX sandboxes_state_started ON sandboxes (state, started_at, sandbox_id);

CREATE TABLE api_keys (
    key_id        TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    -- Lowercase hex SHA-256 of the whole key, including its "e2b_" prefix.
    key_hash      TEXT NOT NULL UNIQUE,
    -- First characters of the key, so an operator can tell keys apart.
    key_prefix    TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    last_used_at  BIGINT
);
