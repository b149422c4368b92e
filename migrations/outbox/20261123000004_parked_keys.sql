-- Parked keys: a dead row holds back the later rows of its partition key (when the relay's
-- relay.dead_rows_park_keys is on) until an operator releases it or retries it.
-- Part of the public contract: see README "Operating postbox".

-- When an operator let the key move on past this dead row (it stays dead, unpublished).
alter table postbox.outbox add column released_at timestamptz null;

alter table postbox.outbox add constraint outbox_released_only_when_dead
    check (released_at is null or dead_at is not null);

-- Answers "does this key have a dead row that parks it?" for every claim of a keyed row.
create index outbox_parking_idx on postbox.outbox (partition_key, id)
    where dead_at is not null and released_at is null and partition_key is not null;

create view postbox.parked_keys as
with parking as (
    select distinct on (partition_key)
           partition_key, id, last_error, dead_at
    from postbox.outbox
    where dead_at is not null and released_at is null and partition_key is not null
    order by partition_key, id
)
select p.partition_key,
       p.id         as dead_id,
       p.last_error as reason,
       p.dead_at,
       (select count(*) from postbox.outbox o
        where o.partition_key = p.partition_key
          and o.published_at is null and o.dead_at is null and o.id > p.id) as rows_waiting
from parking p;

comment on view postbox.parked_keys is
    'Partition keys held back by a dead row (with relay.dead_rows_park_keys on): the dead row, why it died, and how many rows wait. Release with postbox dead release, or retry the row.';
