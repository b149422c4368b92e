//! The publisher's broker connection as the other stages see it: whether there is one, and
//! whether the broker blocks publishing on it (a memory or disk alarm).

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::watch;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct State {
    connected: bool,
    blocked: bool,
}

impl State {
    fn usable(self) -> bool {
        self.connected && !self.blocked
    }
}

/// Written by the publisher (and its connection watcher); read by the claimer, which claims
/// only while publishing can succeed, by the confirmer, which does not blame rows for confirms
/// a blocked broker withheld, and by readiness and metrics.
#[derive(Debug, Default)]
pub(crate) struct BrokerState {
    state: watch::Sender<State>,
    /// Bumped whenever publishing is blocked or unblocked: a confirm wait that saw it change
    /// overlapped a block.
    block_changes: AtomicU64,
}

impl BrokerState {
    /// A new connection starts unblocked; a lost one is neither.
    pub fn set_connected(&self, connected: bool) {
        self.state.send_if_modified(|state| {
            let new = State {
                connected,
                blocked: connected && state.blocked,
            };
            std::mem::replace(state, new) != new
        });
    }

    pub fn set_blocked(&self, blocked: bool) {
        self.block_changes.fetch_add(1, Ordering::SeqCst);
        self.state.send_if_modified(|state| {
            let new = State {
                connected: state.connected,
                blocked,
            };
            std::mem::replace(state, new) != new
        });
    }

    pub fn connected(&self) -> bool {
        self.state.borrow().connected
    }

    pub fn blocked(&self) -> bool {
        self.state.borrow().blocked
    }

    /// Connected and not blocked: a publish now can be confirmed.
    pub fn usable(&self) -> bool {
        self.state.borrow().usable()
    }

    /// Returns once publishing can succeed.
    pub async fn until_usable(&self) {
        let mut state = self.state.subscribe();
        // Err only if the sender is gone, and `self` holds it.
        let _ = state.wait_for(|state| state.usable()).await;
    }

    /// Changes so far between blocked and unblocked; compare two readings (with `blocked()`)
    /// to learn whether a block overlapped the time between them.
    pub fn block_changes(&self) -> u64 {
        self.block_changes.load(Ordering::SeqCst)
    }

    /// Whether the broker blocked publishing at any time since it had `block_changes` changes.
    pub fn blocked_since(&self, block_changes: u64) -> bool {
        self.blocked() || self.block_changes() != block_changes
    }
}
