-- Widens outbox_retrying_keys_idx: a keyed row scheduled for later (written with a delay or a
-- future available_at) holds its key's later rows back just as a row waiting for its retry
-- does, and a claim must pass over both, or such a key's backlog fills every claim. Rows that
-- were due when written (available_at = created_at) and never failed stay out of it, so the
-- usual insert and publish never write to it.
drop index if exists postbox.outbox_retrying_keys_idx;

create index outbox_not_due_keys_idx on postbox.outbox (partition_key, id)
    where published_at is null and dead_at is null and partition_key is not null
      and (attempts > 0 or available_at > created_at);
