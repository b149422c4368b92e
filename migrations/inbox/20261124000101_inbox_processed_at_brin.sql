-- Every message a consumer takes writes one inbox row, and every b-tree on the table gets an
-- entry for it: the b-tree on processed_at (used only by retention) was one of the two. A BRIN
-- index serves retention's "decided before the cutoff" for a few bytes per 128 pages, and rows
-- are written in processed_at order, which is the table's physical order.
drop index if exists postbox.inbox_processed_at_idx;

create index inbox_processed_at_brin on postbox.inbox using brin (processed_at);
-- No autosummarize: with autovacuum off its requests are dropped with a log line each; new
-- ranges are summarized by (auto)vacuum, and until then a scan simply reads them.
