//! Stage 3: await a batch's publisher confirms and decide each row's fate.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Confirmation;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::batch::{Decided, Published, Sent};
use super::Stats;
use crate::retry::RetryPolicy;
use crate::store::outbox::Completion;

/// Turns confirms into completions: acked → published; nacked, returned or not confirmed in
/// time → retry or dead per the policy; refused before sending → dead; lost with the
/// connection, or withheld while the broker blocked publishing → released untouched.
pub(crate) struct Confirmer {
    pub confirm_timeout: Duration,
    pub policy: RetryPolicy,
    pub stats: Arc<Stats>,
}

impl Confirmer {
    pub async fn run(
        self,
        mut input: mpsc::Receiver<Published>,
        out: mpsc::Sender<Decided>,
        hard_stop: CancellationToken,
    ) {
        loop {
            let published = tokio::select! {
                _ = hard_stop.cancelled() => break,
                published = input.recv() => match published {
                    Some(published) => published,
                    None => break,
                },
            };
            let decided = tokio::select! {
                // dropping the batch rolls back its transaction: every row goes back untouched
                _ = hard_stop.cancelled() => break,
                decided = self.decide(published) => decided,
            };
            if out.send(decided).await.is_err() {
                break;
            }
        }
    }

    /// Whether the broker blocked publishing at any time since it had `block_changes` changes.
    fn broker_blocked_since(&self, block_changes: u64) -> bool {
        self.stats.broker.blocked() || self.stats.broker.block_changes() != block_changes
    }

    async fn decide(&self, published: Published) -> Decided {
        let Published {
            batch,
            sent,
            published_at,
            block_changes,
            window,
        } = published;
        let mut withheld = 0;
        let deadline = tokio::time::Instant::now() + self.confirm_timeout;
        let mut completions = Vec::with_capacity(sent.len());
        for (row, sent) in batch.rows.iter().zip(sent) {
            let failure = match sent {
                Sent::Released => continue,
                Sent::Refused(error) => {
                    completions.push((row.id, Completion::Dead { error }));
                    continue;
                }
                Sent::Failed(error) => error,
                Sent::Confirm(confirm) => {
                    match tokio::time::timeout_at(deadline, confirm).await {
                        Ok(Ok(Confirmation::Ack(None))) => {
                            completions.push((row.id, Completion::Published));
                            continue;
                        }
                        Ok(Ok(Confirmation::Ack(Some(returned)))) => format!(
                            "returned by the broker as unroutable ({} {}): no queue is bound \
                             to exchange {:?} with routing key {:?}",
                            returned.reply_code, returned.reply_text, row.exchange, row.routing_key
                        ),
                        Ok(Ok(Confirmation::Nack(_))) => "nacked by the broker".to_string(),
                        Ok(Ok(Confirmation::NotRequested)) => {
                            "the channel was not in confirm mode".to_string()
                        }
                        // The connection went away: whether the broker has the message is
                        // unknown, so it is published again, with the same message id.
                        Ok(Err(error)) => {
                            tracing::warn!(id = row.id, %error, "relay: confirm lost with the connection; the row will be published again");
                            continue;
                        }
                        Err(_) if self.broker_blocked_since(block_changes) => {
                            // The broker withheld the confirm (a resource alarm): not the
                            // row's fault, so no attempt is counted; it goes back untouched.
                            withheld += 1;
                            continue;
                        }
                        Err(_) => format!(
                            "no publisher confirm within {}",
                            humantime::format_duration(self.confirm_timeout)
                        ),
                    }
                }
            };
            completions.push((row.id, self.policy.after_failure(row.attempts, failure)));
        }
        if withheld > 0 {
            tracing::warn!(
                rows = withheld,
                "relay: no confirms while the broker blocked publishing; the rows go back to pending without using an attempt"
            );
        }
        drop(window); // confirms are in: the next batch may go to the broker
        Decided {
            batch,
            completions,
            published_at,
            confirmed_at: Instant::now(),
        }
    }
}
