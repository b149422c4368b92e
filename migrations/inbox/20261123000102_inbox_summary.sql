-- Operator view over postbox.inbox: what each consumer did. See README "Operating postbox".

create view postbox.inbox_summary as
select consumer,
       count(*) filter (where outcome = 'applied')                  as applied,
       count(*) filter (where outcome = 'stale')                    as stale,
       count(*) filter (where outcome = 'dead_lettered')            as dead_lettered,
       count(*) filter (where outcome = 'discarded')                as discarded,
       count(*) filter (where outcome is null and attempts > 0)     as failing,
       coalesce(sum(duplicates), 0)::bigint                         as duplicates,
       max(processed_at)                                            as last_processed_at
from postbox.inbox
group by consumer;

comment on view postbox.inbox_summary is
    'Per consumer: messages applied, skipped as stale, dead-lettered, discarded, failing now, and duplicates absorbed.';
