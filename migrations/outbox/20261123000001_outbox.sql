-- postbox outbox: the table applications write events into, inside their own transactions.
-- This file is part of postbox's public contract: see README "The SQL contract".

create schema if not exists postbox;

create table postbox.outbox (
    -- the position: publish order within a partition key, and the address used by replay
    id              bigint generated always as identity primary key,
    -- becomes the AMQP message_id; stable across retries, replays and relays
    message_id      uuid        not null default gen_random_uuid(),
    -- '' is RabbitMQ's default exchange, which routes by queue name
    exchange        text        not null default '',
    routing_key     text        not null,
    -- the ordering key (an aggregate id, say): rows sharing it are published in id order
    partition_key   text        null,
    -- text payloads (JSON, XML, CSV) are stored exactly as written; a SQL string literal never
    -- goes through bytea escape parsing, so backslashes and quotes in JSON stay intact
    payload         text        null,
    -- binary payloads; exactly one of payload and payload_bytes is set
    payload_bytes   bytea       null,
    content_type    text        not null default 'application/json',
    -- AMQP headers, a JSON object of header name to value
    headers         jsonb       not null default '{}'::jsonb,
    created_at      timestamptz not null default now(),
    -- not before: scheduled delivery, and the retry backoff the relay sets after a failure
    available_at    timestamptz not null default now(),
    -- failed publish attempts so far
    attempts        integer     not null default 0,
    last_error      text        null,
    -- null while pending
    published_at    timestamptz null,
    -- set when the relay gave up on the row (too many failed attempts); null otherwise
    dead_at         timestamptz null,

    constraint outbox_message_id_unique unique (message_id),
    constraint outbox_routing_key_required_for_default_exchange
        check (exchange <> '' or routing_key <> ''),
    constraint outbox_exactly_one_payload check (num_nonnulls(payload, payload_bytes) = 1),
    constraint outbox_attempts_not_negative check (attempts >= 0),
    constraint outbox_headers_is_object check (jsonb_typeof(headers) = 'object'),
    constraint outbox_content_type_not_empty check (content_type <> ''),
    -- AMQP carries these as short strings of at most 255 bytes
    constraint outbox_exchange_max_255_bytes check (octet_length(exchange) <= 255),
    constraint outbox_routing_key_max_255_bytes check (octet_length(routing_key) <= 255),
    constraint outbox_content_type_max_255_bytes check (octet_length(content_type) <= 255),
    constraint outbox_published_or_dead_not_both check (published_at is null or dead_at is null)
);

comment on table postbox.outbox is
    'Transactional outbox: insert events here in the same transaction as the business rows; the postbox relay publishes them to RabbitMQ.';

-- Claiming walks pending rows in id order. A partial index holds only pending rows, so its size,
-- and the cost of a claim, do not grow with the published history kept in the table.
create index outbox_pending_idx on postbox.outbox (id) include (available_at, partition_key)
    where published_at is null and dead_at is null;

-- Answers "does this key have an earlier pending row?" so a key is never in flight twice.
create index outbox_pending_partition_key_idx on postbox.outbox (partition_key, id)
    where published_at is null and dead_at is null and partition_key is not null;

-- Retention deletes published rows oldest first.
create index outbox_published_at_idx on postbox.outbox (published_at)
    where published_at is not null;

-- One notification per transaction, whatever the number of rows or statements: Postgres folds
-- identical notifications raised in one transaction into one, and this trigger is per statement.
create function postbox.notify_outbox() returns trigger
    language plpgsql as
$$
begin
    perform pg_notify('postbox_outbox', '');
    return null;
end;
$$;

create trigger outbox_notify
    after insert on postbox.outbox
    for each statement
    execute function postbox.notify_outbox();

-- Hot table: frequent inserts and updates. Vacuum early so dead tuples from marking rows published
-- are reclaimed before they bloat the pending index.
alter table postbox.outbox set (
    autovacuum_vacuum_scale_factor = 0.01,
    autovacuum_analyze_scale_factor = 0.02,
    fillfactor = 90
);
