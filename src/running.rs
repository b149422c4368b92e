//! A relay or a consumer running on a task of its own.

use std::future::Future;
use std::sync::Arc;

use tokio_util::sync::CancellationToken;

/// A relay ([`crate::relay::RelayHandle`]) or a consumer ([`crate::inbox::ConsumerHandle`])
/// running on its own task, with counters `S` that stay readable while it runs.
pub struct Running<S> {
    shutdown: CancellationToken,
    stats: Arc<S>,
    task: tokio::task::JoinHandle<()>,
}

impl<S> Running<S> {
    /// Spawns `run`, handing it the token that [`Running::stop`] cancels.
    pub(crate) fn spawn<F>(stats: Arc<S>, run: impl FnOnce(CancellationToken) -> F) -> Self
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(shutdown.clone()));
        Self {
            shutdown,
            stats,
            task,
        }
    }

    /// The counters.
    pub fn stats(&self) -> Arc<S> {
        self.stats.clone()
    }

    /// Graceful stop (as on SIGTERM): no new work starts, and work under way finishes within
    /// its shutdown timeout (`shutdown_timeout`) or is given back (rows released, deliveries
    /// left to the broker to redeliver). Returns once the task has ended; an error means it
    /// panicked.
    pub async fn stop(self) -> Result<(), tokio::task::JoinError> {
        self.shutdown.cancel();
        self.task.await
    }
}
