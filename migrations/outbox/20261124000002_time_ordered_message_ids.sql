-- Message ids written without one (plain SQL producers) default to a time-ordered UUIDv7
-- (RFC 9562) instead of a random UUIDv4. Marking a row published adds an entry to the
-- message_id index; with random ids that entry lands on a random leaf, and once the retained
-- history makes the index bigger than shared_buffers, every mark reads and dirties a leaf of its
-- own (a full-page image in the WAL after each checkpoint). Time-ordered ids keep new entries on
-- the few rightmost leaves, as ids from the Rust producer (Uuid::now_v7) always did.
--
-- Postgres 15 has no uuidv7(): this one takes a random v4 UUID, writes the Unix time in
-- milliseconds over its first 48 bits (big-endian), and turns the version nibble from 4 into 7
-- (the variant bits of v4 and v7 are the same).
create function postbox.uuid_v7() returns uuid
    language sql volatile parallel safe as
$$
select encode(
           set_bit(
               set_bit(
                   overlay(uuid_send(gen_random_uuid())
                           placing substring(int8send(floor(extract(epoch from clock_timestamp())
                                                            * 1000)::bigint) from 3)
                           from 1 for 6),
                   52, 1),
               53, 1),
           'hex')::uuid
$$;

comment on function postbox.uuid_v7() is
    'A time-ordered UUIDv7 (RFC 9562): the default message_id of postbox.outbox.';

alter table postbox.outbox alter column message_id set default postbox.uuid_v7();
