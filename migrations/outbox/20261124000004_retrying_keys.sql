-- Keyed rows that failed and have not gone out yet. A claim skips the later rows of a key whose
-- row waits for its retry, so that key's backlog cannot fill every batch and hide the other
-- keys' rows behind it. Only failing rows are in it: publishing touches it never, so it costs
-- the happy path nothing.
create index outbox_retrying_keys_idx on postbox.outbox (partition_key, id)
    where published_at is null and dead_at is null and attempts > 0 and partition_key is not null;
