-- Operator views over postbox.outbox: what is pending, failing, dead and published, and how far
-- behind the relay is. Part of the public contract: see README "Operating postbox".

-- Dead rows are few and looked at often (postbox dead list, the status view).
create index outbox_dead_idx on postbox.outbox (id) where dead_at is not null;

-- One row. Pending counts read the partial pending index, whatever the history; `published`
-- counts the published_at index (an index-only scan, proportional to the history retained).
create view postbox.outbox_status as
with pending as (
    select count(*) filter (where available_at <= now())                as due,
           count(*) filter (where available_at > now() and attempts = 0) as scheduled,
           count(*) filter (where attempts > 0)                         as retrying,
           count(*)                                                     as total,
           min(available_at) filter (where available_at <= now())       as oldest_due_at
    from postbox.outbox
    where published_at is null and dead_at is null
)
select p.total                                                    as pending,
       p.due                                                      as pending_due,
       p.scheduled                                                as scheduled,
       p.retrying                                                 as retrying,
       (select count(*) from postbox.outbox where dead_at is not null)  as dead,
       (select count(*) from postbox.outbox where published_at is not null) as published,
       coalesce(extract(epoch from now() - p.oldest_due_at), 0)::float8 as oldest_pending_age_seconds,
       (select max(published_at) from postbox.outbox where published_at is not null)
                                                                  as last_published_at
from pending p;

comment on view postbox.outbox_status is
    'Outbox totals: pending (due, scheduled, retrying), dead, published, and the age of the oldest due pending row (the relay''s lag).';

-- Pending and dead rows per destination.
create view postbox.outbox_routes as
select exchange,
       routing_key,
       count(*) filter (where dead_at is null)                      as pending,
       count(*) filter (where dead_at is null and attempts > 0)     as retrying,
       count(*) filter (where dead_at is not null)                  as dead,
       coalesce(extract(epoch from now() - min(available_at)
           filter (where dead_at is null and available_at <= now())), 0)::float8
                                                                    as oldest_pending_age_seconds
from postbox.outbox
where published_at is null
group by exchange, routing_key;

comment on view postbox.outbox_routes is
    'Pending, retrying and dead rows per exchange and routing key.';

-- Rows that failed at least once and are not published: retrying or dead, newest first.
create view postbox.outbox_errors as
select id,
       message_id,
       exchange,
       routing_key,
       partition_key,
       attempts,
       last_error,
       case when dead_at is not null then 'dead' else 'retrying' end as state,
       case when dead_at is null then available_at end               as next_attempt_at,
       dead_at,
       created_at
from postbox.outbox
where published_at is null and last_error is not null
order by id desc;

comment on view postbox.outbox_errors is
    'Unpublished rows with an error: retrying (with the next attempt time) or dead.';

-- Keys held back: the key's earliest pending row is failing, so its later rows wait.
create view postbox.blocked_keys as
with first_pending as (
    select distinct on (partition_key)
           partition_key, id, attempts, last_error, available_at
    from postbox.outbox
    where published_at is null and dead_at is null and partition_key is not null
    order by partition_key, id
)
select f.partition_key,
       f.id           as blocking_id,
       f.attempts,
       f.last_error,
       f.available_at as next_attempt_at,
       (select count(*) from postbox.outbox o
        where o.partition_key = f.partition_key
          and o.published_at is null and o.dead_at is null and o.id > f.id) as rows_waiting
from first_pending f
where f.attempts > 0;

comment on view postbox.blocked_keys is
    'Partition keys whose earliest pending row is failing: that row is retried, the key''s later rows wait behind it.';
