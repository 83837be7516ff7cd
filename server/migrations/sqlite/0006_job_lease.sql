-- A migration job is run by one broker at a time: the one holding its
-- lease (renewed before every key). A job whose owner died is taken over
-- once the lease runs out.
ALTER TABLE migration_jobs ADD COLUMN owner TEXT NOT NULL DEFAULT '';
ALTER TABLE migration_jobs ADD COLUMN lease_until_ms INTEGER NOT NULL DEFAULT 0;
