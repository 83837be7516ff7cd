-- Change propagation between brokers sharing the table: every write of a
-- key (create, update, replace) takes the next number of one counter,
-- under the counter row's lock, so numbers are in commit order; brokers
-- poll the counter and reload the keys written after what they saw.
CREATE TABLE key_change_seq (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
);
INSERT INTO key_change_seq (id, seq) VALUES (1, 0);
ALTER TABLE keys ADD COLUMN change_seq INTEGER NOT NULL DEFAULT 0;
CREATE INDEX keys_by_change_seq ON keys (change_seq);
