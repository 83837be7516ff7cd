-- The version table for a fleet of brokers: keys, their versions, the
-- change counter that propagates writes, and durable migration jobs.

-- Every write of a key takes the next number under this row's lock, so
-- numbers are in commit order; brokers reload the keys written after the
-- number they saw (and are told at once through NOTIFY keybroker_changes).
CREATE TABLE key_change_seq (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq BIGINT  NOT NULL
);
INSERT INTO key_change_seq (id, seq) VALUES (1, 0);

CREATE TABLE keys (
    name                   TEXT    PRIMARY KEY,
    backend                TEXT    NOT NULL,
    current_version        BIGINT  NOT NULL CHECK (current_version >= 1),
    min_decryption_version BIGINT  NOT NULL CHECK (min_decryption_version >= 1),
    deletion_allowed       BOOLEAN NOT NULL DEFAULT FALSE,
    labels                 TEXT    NOT NULL DEFAULT '{}',
    rotation_period_secs   BIGINT  NOT NULL DEFAULT 0,
    max_wraps_per_version  BIGINT  NOT NULL DEFAULT 0,
    created_at             BIGINT  NOT NULL,
    updated_at             BIGINT  NOT NULL,
    -- Optimistic concurrency: every update checks and bumps it.
    revision               BIGINT  NOT NULL DEFAULT 1,
    mode                   TEXT    NOT NULL DEFAULT 'direct' CHECK (mode IN ('direct', 'hierarchy')),
    change_seq             BIGINT  NOT NULL DEFAULT 0
);
CREATE INDEX keys_by_change_seq ON keys (change_seq);

CREATE TABLE key_versions (
    key_name         TEXT   NOT NULL REFERENCES keys (name) ON DELETE CASCADE,
    version          BIGINT NOT NULL CHECK (version >= 1),
    state            TEXT   NOT NULL CHECK (state IN ('active', 'decrypt_only', 'disabled', 'destroyed')),
    backend          TEXT   NOT NULL,
    -- Backend reference: local = KEK sealed under the root key; empty once destroyed.
    backend_ref      BYTEA  NOT NULL,
    mode             TEXT   NOT NULL DEFAULT 'direct' CHECK (mode IN ('direct', 'hierarchy')),
    -- DEKs and uses per version, summed over every broker (flushed in batches).
    unwrap_count     BIGINT NOT NULL DEFAULT 0,
    last_unwrap_at   BIGINT NOT NULL DEFAULT 0,
    wrap_count       BIGINT NOT NULL DEFAULT 0,
    rewrap_in_count  BIGINT NOT NULL DEFAULT 0,
    rewrap_out_count BIGINT NOT NULL DEFAULT 0,
    last_wrap_at     BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL,
    -- Two writers can never both create version N of a key.
    PRIMARY KEY (key_name, version)
);

CREATE TABLE migration_jobs (
    job_id              TEXT    PRIMARY KEY,
    pattern             TEXT    NOT NULL,
    from_backend        TEXT    NOT NULL,
    to_backend          TEXT    NOT NULL,
    conflict            TEXT    NOT NULL CHECK (conflict IN ('fail', 'force', 'merge')),
    dry_run             BOOLEAN NOT NULL,
    max_keys_per_second BIGINT  NOT NULL DEFAULT 0,
    phase               TEXT    NOT NULL CHECK (phase IN ('planning', 'copying', 'done', 'failed')),
    error               TEXT    NOT NULL DEFAULT '',
    created_at          BIGINT  NOT NULL,
    updated_at          BIGINT  NOT NULL
);

CREATE TABLE migration_items (
    job_id     TEXT   NOT NULL REFERENCES migration_jobs (job_id) ON DELETE CASCADE,
    key_name   TEXT   NOT NULL,
    status     TEXT   NOT NULL CHECK (status IN ('pending', 'in_progress', 'done', 'skipped', 'failed')),
    action     TEXT   NOT NULL DEFAULT '',
    error_code BIGINT NOT NULL DEFAULT 0,
    error      TEXT   NOT NULL DEFAULT '',
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (job_id, key_name)
);
