-- postbox inbox: what a consumer has already processed, written in the same transaction as the
-- handler's own writes. This file is part of postbox's public contract: see README "The inbox".
-- It applies on its own (tracked in postbox._migrations_inbox), so a subscriber's database
-- needs only this part.

create schema if not exists postbox;

create table postbox.inbox (
    -- the subscriber's name: several consumers (services, projections) share one inbox table
    consumer          text        not null,
    -- the AMQP message_id, i.e. postbox.outbox.message_id at the producer
    message_id        uuid        not null,
    queue             text        not null,
    routing_key       text        not null default '',
    -- the ordering key and the version the message carried (outbox position by default)
    partition_key     text        null,
    version           bigint      null,
    first_received_at timestamptz not null default now(),
    last_received_at  timestamptz not null default now(),
    -- when the outcome was decided; null while failed attempts are being retried
    processed_at      timestamptz null,
    -- applied: the handler ran and committed; stale: skipped, a newer version of its key was
    -- applied first; dead_lettered: sent to the dead-letter queue; discarded: malformed and
    -- dropped by policy
    outcome           text        null,
    -- deliveries of this id that found it decided already: duplicates absorbed
    duplicates        integer     not null default 0,
    -- failed handler runs
    attempts          integer     not null default 0,
    last_error        text        null,

    primary key (consumer, message_id),
    constraint inbox_consumer_not_empty check (consumer <> ''),
    constraint inbox_outcome_known
        check (outcome in ('applied', 'stale', 'dead_lettered', 'discarded')),
    constraint inbox_processed_when_decided check ((outcome is null) = (processed_at is null)),
    constraint inbox_counts_not_negative check (duplicates >= 0 and attempts >= 0)
);

comment on table postbox.inbox is
    'Consumer inbox: one row per (consumer, message_id) processed, committed with the handler''s writes.';

-- Retention deletes decided rows oldest first.
create index inbox_processed_at_idx on postbox.inbox (processed_at)
    where processed_at is not null;

-- The newest version applied per key: an older version arriving later is skipped as stale.
-- Kept apart from postbox.inbox so inbox retention never forgets a key's version.
create table postbox.inbox_versions (
    consumer      text        not null,
    partition_key text        not null,
    version       bigint      not null,
    message_id    uuid        not null,
    updated_at    timestamptz not null default now(),
    primary key (consumer, partition_key)
);

comment on table postbox.inbox_versions is
    'Per consumer and partition key, the newest version applied; older arrivals are stale.';

alter table postbox.inbox set (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_analyze_scale_factor = 0.05
);
