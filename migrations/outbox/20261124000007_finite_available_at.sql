-- A row scheduled at 'infinity' would never go out, and one at '-infinity' breaks the relay's
-- arithmetic on due times: refuse both, with a readable constraint name. NOT VALID: rows
-- already in the table are not scanned (a large outbox is not locked for a full pass); new
-- and updated rows are checked.
alter table postbox.outbox
    add constraint outbox_available_at_finite check (isfinite(available_at)) not valid;
