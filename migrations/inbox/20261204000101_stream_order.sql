-- In-order application per stream. A message from a postbox relay carries its number in its
-- stream (header x-postbox-seq; a stream is one partition key's messages to one exchange and
-- routing key, from one outbox). A consumer applies a stream's messages in number order: one
-- that arrives before its predecessor is stored here as waiting (and acked), and applied right
-- after the predecessor. See docs/adr/0001-stream-sequences.md.

-- waiting: stored until its predecessor is applied; skipped: a skip message, standing for a
-- row the relay released, whose number the stream moved on past.
alter table postbox.inbox drop constraint inbox_outcome_known;
alter table postbox.inbox add constraint inbox_outcome_known
    check (outcome in ('applied', 'stale', 'dead_lettered', 'discarded', 'waiting', 'skipped'));

-- A waiting message is received, not decided: retention keeps its row.
alter table postbox.inbox drop constraint inbox_processed_when_decided;
alter table postbox.inbox add constraint inbox_processed_when_decided
    check ((outcome is null or outcome = 'waiting') = (processed_at is null));

comment on column postbox.inbox.version is
    'The version the message carried for its key: its stream number (x-postbox-seq) when ordered by sequence.';

-- Per consumer and stream, the last number applied (null: the stream's first message has not
-- been applied yet). Locked by every transaction that applies one of the stream's messages, so
-- consumer instances apply a stream one message at a time, whichever instance got which.
create table postbox.inbox_streams (
    consumer      text        not null,
    source        text        not null,
    partition_key text        not null,
    exchange      text        not null,
    routing_key   text        not null,
    last_seq      bigint      null,
    updated_at    timestamptz not null default now(),
    primary key (consumer, source, partition_key, exchange, routing_key)
);

comment on table postbox.inbox_streams is
    'Per consumer and stream (source, partition key, exchange, routing key): the last sequence number applied.';

-- Messages that arrived before their predecessor: everything needed to run the handler later.
create table postbox.inbox_waiting (
    consumer      text        not null,
    source        text        not null,
    partition_key text        not null,
    exchange      text        not null,
    routing_key   text        not null,
    seq           bigint      not null,
    message_id    uuid        not null,
    queue         text        not null,
    -- the AMQP properties (headers included), as JSON
    properties    text        not null,
    payload       bytea       not null,
    received_at   timestamptz not null default now(),
    primary key (consumer, source, partition_key, exchange, routing_key, seq)
);

comment on table postbox.inbox_waiting is
    'Messages received ahead of their stream''s next number, held (and acked) until their predecessor is applied.';

-- Streams held up at a consumer: what number they wait for, since when, and how much waits.
create view postbox.inbox_waiting_streams as
select w.consumer, w.source, w.partition_key, w.exchange, w.routing_key,
       s.last_seq,
       coalesce(s.last_seq, 0) + 1                             as missing_seq,
       count(*)                                                as waiting,
       min(w.seq)                                              as first_waiting_seq,
       min(w.received_at)                                      as waiting_since,
       extract(epoch from now() - min(w.received_at))::float8  as waiting_seconds
from postbox.inbox_waiting w
left join postbox.inbox_streams s
       using (consumer, source, partition_key, exchange, routing_key)
group by w.consumer, w.source, w.partition_key, w.exchange, w.routing_key, s.last_seq;

comment on view postbox.inbox_waiting_streams is
    'Streams whose consumer holds messages back: the number it waits for, how many wait, and since when.';

create or replace view postbox.inbox_summary as
select consumer,
       count(*) filter (where outcome = 'applied')                  as applied,
       count(*) filter (where outcome = 'stale')                    as stale,
       count(*) filter (where outcome = 'dead_lettered')            as dead_lettered,
       count(*) filter (where outcome = 'discarded')                as discarded,
       count(*) filter (where outcome is null and attempts > 0)     as failing,
       coalesce(sum(duplicates), 0)::bigint                         as duplicates,
       max(processed_at)                                            as last_processed_at,
       count(*) filter (where outcome = 'waiting')                  as waiting,
       count(*) filter (where outcome = 'skipped')                  as skipped
from postbox.inbox
group by consumer;
