-- Hearth control-plane schema, version 2: paused sandboxes and named snapshots.

-- Why a sandbox ended when something other than a request ended it (a failed pause,
-- a restart of the server), shown in the 404 for its ID.
ALTER TABLE sandboxes ADD COLUMN end_reason TEXT;
ALTER TABLE sandboxes ADD COLUMN paused_at BIGINT;
-- 1 when traffic through the proxy resumes the sandbox while it is paused.
ALTER TABLE sandboxes ADD COLUMN auto_resume INTEGER NOT NULL DEFAULT 0;

-- A snapshot is a template whose one build was checkpointed from a sandbox.
CREATE TABLE snapshots (
    snapshot_id        TEXT PRIMARY KEY REFERENCES templates (template_id) ON DELETE CASCADE,
    source_sandbox_id  TEXT NOT NULL,
    name               TEXT,
    created_at         BIGINT NOT NULL
);

CREATE INDEX snapshots_source ON snapshots (source_sandbox_id, created_at);
