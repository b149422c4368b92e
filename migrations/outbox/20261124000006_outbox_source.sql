-- The outbox's identity, sent with every message as `x-postbox-source`. Outbox positions (ids)
-- only order the events of one outbox; a consumer fed by several outboxes (two services keying
-- events by the same order id, say) compares versions only between messages of the same
-- source, instead of skipping one service's events as "older" than the other's. One row,
-- written here; a restored copy of the database keeps it, as it keeps the ids.
create table postbox.outbox_source (
    id        uuid    not null default gen_random_uuid() primary key,
    only_row  boolean not null default true unique check (only_row)
);

insert into postbox.outbox_source default values;

comment on table postbox.outbox_source is
    'The identity of this outbox (one row): the x-postbox-source header of every message.';
