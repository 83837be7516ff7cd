-- Key hierarchy mode: per key (for new versions) and per version.
ALTER TABLE keys ADD COLUMN mode TEXT NOT NULL DEFAULT 'direct' CHECK (mode IN ('direct', 'hierarchy'));
ALTER TABLE key_versions ADD COLUMN mode TEXT NOT NULL DEFAULT 'direct' CHECK (mode IN ('direct', 'hierarchy'));
