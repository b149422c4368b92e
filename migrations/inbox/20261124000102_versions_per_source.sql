-- Versions are compared per source (the outbox a message came from, header x-postbox-source):
-- the outbox positions of two outboxes say nothing about each other. Rows from before have no
-- source (''), as do messages without the header.
alter table postbox.inbox_versions add column source text not null default '';

alter table postbox.inbox_versions drop constraint inbox_versions_pkey;

alter table postbox.inbox_versions add primary key (consumer, source, partition_key);

comment on table postbox.inbox_versions is
    'Per consumer, source and partition key, the newest version applied; older arrivals are stale.';
