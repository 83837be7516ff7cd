-- Usage counts move out of the version rows into a narrow table of their
-- own. A flush updates one row per key used since the last one; an update
-- of a wide version row (sealed KEK, backend, state) wrote the whole row
-- again. Every version has exactly one row, created with it and removed
-- with it.
CREATE TABLE key_usage (
    key_name         TEXT   NOT NULL,
    version          BIGINT NOT NULL,
    unwrap_count     BIGINT NOT NULL DEFAULT 0,
    last_unwrap_at   BIGINT NOT NULL DEFAULT 0,
    wrap_count       BIGINT NOT NULL DEFAULT 0,
    rewrap_in_count  BIGINT NOT NULL DEFAULT 0,
    rewrap_out_count BIGINT NOT NULL DEFAULT 0,
    last_wrap_at     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (key_name, version),
    FOREIGN KEY (key_name, version) REFERENCES key_versions (key_name, version) ON DELETE CASCADE
);

INSERT INTO key_usage (key_name, version, unwrap_count, last_unwrap_at, wrap_count, rewrap_in_count,
                       rewrap_out_count, last_wrap_at)
SELECT key_name, version, unwrap_count, last_unwrap_at, wrap_count, rewrap_in_count, rewrap_out_count, last_wrap_at
FROM key_versions;

ALTER TABLE key_versions
    DROP COLUMN unwrap_count,
    DROP COLUMN last_unwrap_at,
    DROP COLUMN wrap_count,
    DROP COLUMN rewrap_in_count,
    DROP COLUMN rewrap_out_count,
    DROP COLUMN last_wrap_at;
