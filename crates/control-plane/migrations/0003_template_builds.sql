-- Hearth control-plane schema, version 3: template builds through the API, their logs and tags.

-- What a build was requested with, kept until the build starts.
-- JSON array of the tags the build gets when it becomes ready.
ALTER TABLE template_builds ADD COLUMN tags TEXT NOT NULL DEFAULT '[]';
-- Dockerfile of a build requested through POST /templates (the older flow).
ALTER TABLE template_builds ADD COLUMN dockerfile TEXT;
ALTER TABLE template_builds ADD COLUMN start_cmd TEXT;
ALTER TABLE template_builds ADD COLUMN ready_cmd TEXT;
-- minFreeDiskMb of the request, if set.
ALTER TABLE template_builds ADD COLUMN min_free_disk_mb BIGINT;
ALTER TABLE template_builds ADD COLUMN started_at BIGINT;
-- Why a build ended in 'error', and the step that failed ('base', a step number or 'finalize').
ALTER TABLE template_builds ADD COLUMN reason TEXT;
ALTER TABLE template_builds ADD COLUMN reason_step TEXT;

-- Log lines of a build, numbered from 0 in the order the builder wrote them.
CREATE TABLE template_build_logs (
    build_id  TEXT NOT NULL REFERENCES template_builds (build_id) ON DELETE CASCADE,
    seq       BIGINT NOT NULL,
    at        BIGINT NOT NULL,
    -- One of: debug, info, warn, error.
    level     TEXT NOT NULL,
    step      TEXT,
    message   TEXT NOT NULL,
    PRIMARY KEY (build_id, seq)
);

CREATE INDEX template_build_logs_at ON template_build_logs (build_id, at);

-- The build each tag of a template currently names.
CREATE TABLE template_tags (
    template_id    TEXT NOT NULL REFERENCES templates (template_id) ON DELETE CASCADE,
    tag            TEXT NOT NULL,
    build_id       TEXT NOT NULL REFERENCES template_builds (build_id) ON DELETE CASCADE,
    assignment_id  TEXT NOT NULL,
    assigned_at    BIGINT NOT NULL,
    PRIMARY KEY (template_id, tag)
);

-- Every assignment of a tag to a build, newest last, for the assignment history routes.
CREATE TABLE template_tag_assignments (
    assignment_id  TEXT PRIMARY KEY,
    template_id    TEXT NOT NULL REFERENCES templates (template_id) ON DELETE CASCADE,
    tag            TEXT NOT NULL,
    build_id       TEXT NOT NULL REFERENCES template_builds (build_id) ON DELETE CASCADE,
    assigned_at    BIGINT NOT NULL
);

CREATE INDEX template_tag_assignments_tag ON template_tag_assignments (template_id, tag, assigned_at);
