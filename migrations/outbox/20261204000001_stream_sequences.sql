-- Per-stream sequence numbers. A stream is one partition key's messages to one destination
-- (exchange and routing key): the scope a queue can check, since a queue receives either all
-- or none of a stream's messages. The relay numbers a stream's rows 1, 2, 3, … in the order it
-- sees them committed, when it first takes them, and commits the numbers before publishing: a
-- row keeps its number across retries, crashes between publish and mark, and relays, and no
-- two rows of a stream ever share one. Consumers apply a stream's messages in number order.
-- See docs/adr/0001-stream-sequences.md.
--
-- Locking: adding a nullable column without a default and creating a table take a brief
-- ACCESS EXCLUSIVE lock on postbox.outbox (no rewrite); the index builds below take a SHARE
-- lock, which holds producers' inserts back while they run (proportional to the pending rows
-- only, being partial). Stop the relays before migrating, start the new ones after.

-- The row's number in its stream; null for unkeyed rows and until the relay numbers it.
alter table postbox.outbox add column seq bigint null;

alter table postbox.outbox add constraint outbox_seq_positive check (seq is null or seq > 0);

-- One row per stream: the last number given out. Written by the relay only, under a
-- transaction-level advisory lock, so numbers are gap-free and never given twice.
create table postbox.outbox_streams (
    partition_key text        not null,
    exchange      text        not null,
    routing_key   text        not null,
    last_seq      bigint      not null,
    updated_at    timestamptz not null default now(),
    primary key (partition_key, exchange, routing_key),
    constraint outbox_streams_last_seq_positive check (last_seq > 0)
);

comment on table postbox.outbox_streams is
    'Per stream (partition key, exchange, routing key): the last sequence number the relay gave a row (header x-postbox-seq).';

-- Keyed rows the relay has not numbered yet, in id order: what a numbering pass reads. A row
-- leaves it when numbered, so the pass costs the same whatever the backlog already numbered.
create index outbox_unnumbered_idx on postbox.outbox (id) include (available_at)
    where partition_key is not null and seq is null and published_at is null and dead_at is null;

-- One numbering pass: the first `batch` due keyed rows without a number, in id order, numbered
-- per stream from the stream's last number on, in one round trip. One pass runs at a time
-- (a transaction-level advisory lock; a relay that finds it taken skips numbering, since the
-- pass under way does the work), and the numbering statement takes its snapshot after the
-- lock, so it sees every earlier pass's numbers. Rows that commit late with a lower id than
-- rows already numbered are found all the same (they stay in outbox_unnumbered_idx until
-- numbered) and get their stream's next number: the order the relay sees commits in. Called
-- outside a transaction, it commits on return: a number is durable before any row carrying it
-- is claimed and published. Returns the rows numbered, or null when another pass held the lock.
create function postbox.number_rows(batch integer) returns integer
    language plpgsql volatile as
$$
declare
    numbered integer;
begin
    if not pg_try_advisory_xact_lock(hashtext('postbox.outbox numbering')) then
        return null;
    end if;
    with todo as materialized (
        select id, partition_key, exchange, routing_key,
               row_number() over (partition by partition_key, exchange, routing_key
                                  order by id) as rank
        from (select id, partition_key, exchange, routing_key
              from postbox.outbox
              where partition_key is not null and seq is null
                and published_at is null and dead_at is null
                and available_at <= now()
              order by id
              limit batch) page
    ),
    counts as (
        select partition_key, exchange, routing_key, count(*) as n
        from todo
        group by partition_key, exchange, routing_key
    ),
    streams as (
        insert into postbox.outbox_streams as s (partition_key, exchange, routing_key, last_seq)
        select partition_key, exchange, routing_key, n from counts
        on conflict (partition_key, exchange, routing_key)
            do update set last_seq = s.last_seq + excluded.last_seq, updated_at = now()
        returning partition_key, exchange, routing_key, last_seq
    ),
    done as (
        update postbox.outbox o
        set seq = s.last_seq - c.n + t.rank
        from todo t
        join counts c using (partition_key, exchange, routing_key)
        join streams s using (partition_key, exchange, routing_key)
        where o.id = t.id
        returning 1
    )
    select count(*) into numbered from done;
    return numbered;
end;
$$;

comment on function postbox.number_rows(integer) is
    'One numbering pass of the relay: gives due keyed rows their stream numbers (x-postbox-seq).';

-- The claim no longer asks per candidate whether an earlier row of its key is in flight,
-- failing, or scheduled: order is carried by the number, so a key's rows go out as runs and a
-- failing row holds back its stream at the consumers, not at the relay.
drop index if exists postbox.outbox_pending_partition_key_idx;
drop index if exists postbox.outbox_not_due_keys_idx;

-- A released keyed row is replaced in its stream by a skip message with its number (header
-- x-postbox-skip), published like any row, so consumers move on past the number instead of
-- waiting for it forever. A trigger writes it, so a release by hand in SQL
-- (`update postbox.outbox set released_at = now() where ...`) sends it as `postbox dead
-- release` does. It fires only for updates that set released_at: publishing and marking never
-- pay for it. The skip's message id derives from the dead row's, so a row released twice
-- sends one skip; a skip that died itself is released without one, or skips would beget skips.
create function postbox.skip_released() returns trigger
    language plpgsql as
$$
begin
    insert into postbox.outbox
        (message_id, exchange, routing_key, partition_key, payload, content_type, headers, seq)
    values (md5('postbox skip ' || new.message_id::text)::uuid, new.exchange, new.routing_key,
            new.partition_key, '', 'application/x-postbox-skip',
            jsonb_build_object('x-postbox-skip', new.message_id::text), new.seq)
    on conflict (message_id) do nothing;
    return null;
end;
$$;

create trigger outbox_skip_released
    after update of released_at on postbox.outbox
    for each row
    when (old.released_at is null and new.released_at is not null
          and new.partition_key is not null and new.seq is not null
          and not new.headers ? 'x-postbox-skip')
    execute function postbox.skip_released();

create view postbox.outbox_skips as
select id, message_id, partition_key, exchange, routing_key, seq, published_at, created_at
from postbox.outbox
where headers ? 'x-postbox-skip';

comment on view postbox.outbox_skips is
    'Skip messages: a released dead row''s number sent on in its place, so consumers do not wait for it.';

-- The keyed backlog at the relay, per stream: rows pending (numbered or not), the oldest
-- pending row's age, the last number given, and the dead row (if any) whose number consumers
-- wait for until it is released or retried.
create view postbox.outbox_keyed_backlog as
with pending as (
    select partition_key, exchange, routing_key,
           count(*)                             as pending,
           count(*) filter (where seq is null)  as unnumbered,
           count(*) filter (where attempts > 0) as retrying,
           min(created_at)                      as oldest_created_at
    from postbox.outbox
    where published_at is null and dead_at is null and partition_key is not null
    group by partition_key, exchange, routing_key
)
select p.partition_key, p.exchange, p.routing_key, p.pending, p.unnumbered, p.retrying,
       coalesce(extract(epoch from now() - p.oldest_created_at), 0)::float8
           as oldest_pending_age_seconds,
       s.last_seq,
       (select min(x.seq) from postbox.parking_rows d
        join postbox.outbox x on x.id = d.id
        where d.partition_key = p.partition_key and x.exchange = p.exchange
          and x.routing_key = p.routing_key) as parked_at_seq
from pending p
left join postbox.outbox_streams s using (partition_key, exchange, routing_key);

comment on view postbox.outbox_keyed_backlog is
    'Keyed rows pending at the relay, per stream (partition key, exchange, routing key).';
