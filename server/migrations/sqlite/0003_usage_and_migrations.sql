-- Unwrap usage per version: the proof that a rewrap pass is complete.
ALTER TABLE key_versions ADD COLUMN unwrap_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN last_unwrap_at INTEGER NOT NULL DEFAULT 0;

-- Durable migration jobs: the plan and every key's outcome survive a crash.
CREATE TABLE migration_jobs (
    job_id              TEXT    PRIMARY KEY NOT NULL,
    pattern             TEXT    NOT NULL,
    from_backend        TEXT    NOT NULL,
    to_backend          TEXT    NOT NULL,
    conflict            TEXT    NOT NULL CHECK (conflict IN ('fail', 'force', 'merge')),
    dry_run             INTEGER NOT NULL,
    max_keys_per_second INTEGER NOT NULL DEFAULT 0,
    phase               TEXT    NOT NULL CHECK (phase IN ('planning', 'copying', 'done', 'failed')),
    error               TEXT    NOT NULL DEFAULT '',
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL
);

CREATE TABLE migration_items (
    job_id     TEXT    NOT NULL REFERENCES migration_jobs (job_id) ON DELETE CASCADE,
    key_name   TEXT    NOT NULL,
    status     TEXT    NOT NULL CHECK (status IN ('pending', 'in_progress', 'done', 'skipped', 'failed')),
    action     TEXT    NOT NULL DEFAULT '',
    error_code INTEGER NOT NULL DEFAULT 0,
    error      TEXT    NOT NULL DEFAULT '',
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (job_id, key_name)
);
