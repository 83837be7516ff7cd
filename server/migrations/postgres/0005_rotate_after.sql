-- When each key's current version is due for rotation by age (its creation
-- plus the key's rotation period; 0 for keys without one), kept with every
-- write of the key: the check for keys due reads an index of the keys due
-- instead of every key and its current version.
ALTER TABLE keys ADD COLUMN rotate_after BIGINT NOT NULL DEFAULT 0;
UPDATE keys SET rotate_after = rotation_period_secs + COALESCE(
    (SELECT v.created_at FROM key_versions v WHERE v.key_name = keys.name AND v.version = keys.current_version), 0)
WHERE rotation_period_secs > 0;
CREATE INDEX keys_by_rotate_after ON keys (rotate_after) WHERE rotate_after > 0;
-- The lowest per-key wrap bound, read once per check.
CREATE INDEX keys_by_max_wraps ON keys (max_wraps_per_version) WHERE max_wraps_per_version > 0;
