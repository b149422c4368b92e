-- An outbox row costs the application's transaction no more than a minimal outbox row does.
-- See docs/adr/0003-cheaper-outbox-row.md for the measurements.
--
-- 1. No check constraints. Postgres 15 reads each check constraint's stored expression back
--    from its text form and plans it again for every insert or update statement, so the twelve
--    checks cost about a tenth of a single-event transaction's throughput. What they refused
--    the relay now refuses, row by row: such a row is marked dead at once with the rule it
--    breaks in last_error (see CLAIM in src/store/outbox.rs and the relay's encoder), which an
--    operator sees in outbox_status, outbox_errors and `postbox dead list` and can fix and
--    retry. The Rust producer API checks the same rules before it writes.
-- 2. A cheaper default message id: still a time-ordered UUIDv7, from fewer and cheaper
--    functions (Postgres compiles the default expression for every insert statement).
-- 3. The wake-up trigger decides in its WHEN clause and calls its function only to notify, so a
--    producer whose relay is awake runs no PL/pgSQL at all. The advisory lock namespace is
--    written as a number: -1084948806, which is hashtext('postbox.outbox wakeup') on
--    little-endian machines, now the same on every machine and cheaper to evaluate.
--
-- Locking: dropping constraints and replacing the trigger take an ACCESS EXCLUSIVE lock on
-- postbox.outbox for a moment (no table scan, no rewrite); the migration waits for transactions
-- already using the table and blocks new ones while it waits.

alter table postbox.outbox
    drop constraint if exists outbox_routing_key_required_for_default_exchange,
    drop constraint if exists outbox_exactly_one_payload,
    drop constraint if exists outbox_attempts_not_negative,
    drop constraint if exists outbox_headers_is_object,
    drop constraint if exists outbox_content_type_not_empty,
    drop constraint if exists outbox_exchange_max_255_bytes,
    drop constraint if exists outbox_routing_key_max_255_bytes,
    drop constraint if exists outbox_content_type_max_255_bytes,
    drop constraint if exists outbox_published_or_dead_not_both,
    drop constraint if exists outbox_available_at_finite,
    drop constraint if exists outbox_released_only_when_dead,
    drop constraint if exists outbox_seq_positive;

-- RFC 9562 layout, written as hex and read as a uuid: 48 bits of Unix time in milliseconds,
-- the version nibble 7, then 12 bits of the session's pid (concurrent sessions differ there,
-- even when the application gave them the same setseed()), the variant bits 10 and 62 bits from
-- random() (seeded per session by Postgres; 53 of them random).
create or replace function postbox.uuid_v7() returns uuid
    language sql volatile parallel safe as
$$
select (lpad(to_hex(floor(extract(epoch from clock_timestamp()) * 1000)::bigint), 12, '0')
        || to_hex(28672 + pg_backend_pid() % 4096)
        || to_hex(floor(random() * 4611686018427387904)::bigint | (-9223372036854775807 - 1)))::uuid
$$;

-- Called only when the WHEN clause below found a relay asleep.
create or replace function postbox.notify_outbox() returns trigger
    language plpgsql as
$$
begin
    perform pg_notify('postbox_outbox', '');
    return null;
end;
$$;

-- The wake-up protocol is unchanged (see 20261205000001_wake_on_request.sql): the statement
-- tries to take its session's wake-up key for the rest of its transaction, and notifies only
-- when that fails, that is while a relay sleeps holding the keys.
drop trigger outbox_notify on postbox.outbox;
create trigger outbox_notify
    after insert on postbox.outbox
    for each statement
    when (not pg_try_advisory_xact_lock(-1084948806, pg_backend_pid() % 256))
    execute function postbox.notify_outbox();
