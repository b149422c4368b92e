//! When postbox vacuums the tables it deletes from.

use serde::{Deserialize, Serialize};

/// When postbox runs `VACUUM` itself on a table it deletes from (the relay on the outbox, a
/// consumer on its inbox).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Vacuum {
    /// Only where autovacuum is off for the table (nothing else would reclaim dead rows).
    Auto,
    /// After every cleanup round.
    Always,
    /// Never: autovacuum (or the operator) takes care of it.
    Never,
}
