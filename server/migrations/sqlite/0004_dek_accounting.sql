-- DEKs per version, summed over every broker sharing the table: wrapped
-- under it, rewrapped into it, rewrapped out of it. Outstanding DEKs
-- (wrapped + rewrapped in - rewrapped out) prove whether data still
-- depends on a version before it is retired; wrap counts also bound
-- AES-GCM invocations per version.
ALTER TABLE key_versions ADD COLUMN wrap_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN rewrap_in_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN rewrap_out_count INTEGER NOT NULL DEFAULT 0;
ALTER TABLE key_versions ADD COLUMN last_wrap_at INTEGER NOT NULL DEFAULT 0;
