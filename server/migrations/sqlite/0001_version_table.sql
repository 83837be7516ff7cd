-- The version table: keys and their versions.
CREATE TABLE keys (
    name                   TEXT    PRIMARY KEY NOT NULL,
    backend                TEXT    NOT NULL,
    current_version        INTEGER NOT NULL CHECK (current_version >= 1),
    min_decryption_version INTEGER NOT NULL CHECK (min_decryption_version >= 1),
    deletion_allowed       INTEGER NOT NULL DEFAULT 0,
    labels                 TEXT    NOT NULL DEFAULT '{}',
    rotation_period_secs   INTEGER NOT NULL DEFAULT 0,
    max_wraps_per_version  INTEGER NOT NULL DEFAULT 0,
    created_at             INTEGER NOT NULL,
    updated_at             INTEGER NOT NULL,
    -- Optimistic concurrency: every update checks and bumps it.
    revision               INTEGER NOT NULL DEFAULT 1
);

CREATE TABLE key_versions (
    key_name    TEXT    NOT NULL REFERENCES keys (name) ON DELETE CASCADE,
    version     INTEGER NOT NULL CHECK (version >= 1),
    state       TEXT    NOT NULL CHECK (state IN ('active', 'decrypt_only', 'disabled', 'destroyed')),
    backend     TEXT    NOT NULL,
    -- Backend reference: local = KEK sealed under the root key; empty once destroyed.
    backend_ref BLOB    NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    -- Two writers can never both create version N of a key.
    PRIMARY KEY (key_name, version)
);
