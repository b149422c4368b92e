-- Relays announce themselves here and heartbeat, so operators see which relays run, since
-- when, and how much they hold. Part of the public contract: see README "Operating postbox".

create table postbox.relays (
    id                    uuid        primary key,
    hostname              text        not null,
    pid                   integer     not null,
    version               text        not null,
    started_at            timestamptz not null default now(),
    heartbeat_at          timestamptz not null default now(),
    -- how often this relay heartbeats; it counts as gone after three missed beats (30 s at least)
    heartbeat_interval_ms bigint      not null,
    -- batches claimed and not yet marked, at the last heartbeat
    open_batches          integer     not null default 0,
    -- rows published by this relay since it started, at the last heartbeat
    published             bigint      not null default 0
);

comment on table postbox.relays is
    'Running relays: one row each, refreshed every heartbeat_interval_ms, removed on a clean stop.';

create view postbox.relays_alive as
select id, hostname, pid, version, started_at, heartbeat_at, open_batches, published,
       extract(epoch from now() - heartbeat_at)::float8 as heartbeat_age_seconds
from postbox.relays
-- three missed beats, and never less than 30 s: a busy database or a GC pause is not a death
where heartbeat_at > now() - greatest(3 * heartbeat_interval_ms, 30000) * interval '1 millisecond';

comment on view postbox.relays_alive is
    'Relays whose last heartbeat is recent (within three heartbeat intervals, at least 30 s).';
