-- Usage counts move out of the version rows into a narrow table of their
-- own. A flush updates one row per key used since the last one; in the
-- wide version rows (sealed KEK, backend, state) every such row sat on its
-- own page, so a flush after traffic over many keys rewrote a page per key.
-- Here about sixty rows share a page. Every version has exactly one row,
-- created with it and removed with it.
CREATE TABLE key_usage (
    key_name         TEXT    NOT NULL,
    version          INTEGER NOT NULL,
    unwrap_count     INTEGER NOT NULL DEFAULT 0,
    last_unwrap_at   INTEGER NOT NULL DEFAULT 0,
    wrap_count       INTEGER NOT NULL DEFAULT 0,
    rewrap_in_count  INTEGER NOT NULL DEFAULT 0,
    rewrap_out_count INTEGER NOT NULL DEFAULT 0,
    last_wrap_at     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_name, version),
    FOREIGN KEY (key_name, version) REFERENCES key_versions (key_name, version) ON DELETE CASCADE
) WITHOUT ROWID;

INSERT INTO key_usage (key_name, version, unwrap_count, last_unwrap_at, wrap_count, rewrap_in_count,
                       rewrap_out_count, last_wrap_at)
SELECT key_name, version, unwrap_count, last_unwrap_at, wrap_count, rewrap_in_count, rewrap_out_count, last_wrap_at
FROM key_versions;

ALTER TABLE key_versions DROP COLUMN unwrap_count;
ALTER TABLE key_versions DROP COLUMN last_unwrap_at;
ALTER TABLE key_versions DROP COLUMN wrap_count;
ALTER TABLE key_versions DROP COLUMN rewrap_in_count;
ALTER TABLE key_versions DROP COLUMN rewrap_out_count;
ALTER TABLE key_versions DROP COLUMN last_wrap_at;
