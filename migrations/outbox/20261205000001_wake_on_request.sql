-- Notify only when a relay asked to be woken. Postgres serializes the commits of notifying
-- transactions on one lock held through each commit's WAL flush, so a NOTIFY per commit
-- throttled the application's commits (about half the transactions per second of the same
-- commits without it, with 16 or 64 producers). A sleeping relay holds all 256 wake-up keys
-- (advisory lock namespace hashtext('postbox.outbox wakeup')) in share mode; each insert
-- statement tries to take its session's key (backend pid modulo 256) exclusively until its
-- transaction ends. The try fails only while a relay sleeps (or while another producer with the
-- same key is inside its transaction): then it notifies. A relay falling asleep takes the keys,
-- which waits for every producer that took its key (and did not notify) to finish, then
-- claims once more, so no commit is missed. Advisory locks are not versioned: this holds for
-- producers in any isolation level. The function is replaced in place (no lock on the table).
create or replace function postbox.notify_outbox() returns trigger
    language plpgsql as
$$
begin
    if not pg_try_advisory_xact_lock(hashtext('postbox.outbox wakeup'), pg_backend_pid() % 256)
    then
        perform pg_notify('postbox_outbox', '');
    end if;
    return null;
end;
$$;
