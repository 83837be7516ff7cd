-- Usage counts are flushed in batches that each broker retries under the
-- same id until one commits: a batch applied once is never applied again,
-- so a flush whose answer was lost (the database went down at commit)
-- neither loses nor doubles counts. Ids older than a day are pruned.
CREATE TABLE usage_batches (
    batch_id   TEXT   PRIMARY KEY,
    applied_at BIGINT NOT NULL
);
CREATE INDEX usage_batches_by_time ON usage_batches (applied_at);
