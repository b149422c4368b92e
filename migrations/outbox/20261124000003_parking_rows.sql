-- One definition of "a dead row that parks its key", used by the relay's claim, the backlog
-- probes and postbox.parked_keys alike. Its condition is outbox_parking_idx's, so queries on
-- the view use that index (a view is inlined into each query).
create view postbox.parking_rows as
select id, partition_key, last_error, dead_at
from postbox.outbox
where dead_at is not null and released_at is null and partition_key is not null;

comment on view postbox.parking_rows is
    'Dead rows that hold back their partition key''s later rows (relay.dead_rows_park_keys), until released or retried. A key''s first such row is its parked_keys entry.';

-- Same columns as before, now over postbox.parking_rows.
create or replace view postbox.parked_keys as
with parking as (
    select distinct on (partition_key)
           partition_key, id, last_error, dead_at
    from postbox.parking_rows
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
