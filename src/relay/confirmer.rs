//! Stage 3: await a batch's publisher confirms and decide each row's fate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Confirmation;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::batch::{Decided, PublishFailure, Published, Sent};
use super::Health;
use crate::retry::RetryPolicy;
use crate::store::outbox::Completion;

/// Turns confirms into completions: acked → published; nacked, returned or not confirmed in
/// time → retry or dead per the policy; refused before sending → dead; lost with the
/// connection, or withheld while the broker blocked publishing → released untouched.
pub(crate) struct Confirmer {
    pub confirm_timeout: Duration,
    pub policy: RetryPolicy,
    pub health: Arc<Health>,
}

/// What became of one row's publish.
enum Heard {
    Ack,
    Nack,
    NotRequested,
    /// The connection went away before the confirm.
    Lost(lapin::Error),
    TimedOut,
    /// Not published: the connection or shutdown (released untouched).
    Released,
    /// The broker refused the publish (a failed attempt).
    Failed(PublishFailure),
    /// Never sendable as it is (dead at once).
    Refused(super::encode::Unsendable),
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

    /// Notes a returned message in `returns`, by its message id, with the broker's reason.
    fn note_returned(
        returns: &mut HashMap<uuid::Uuid, String>,
        returned: Option<lapin::message::BasicReturnMessage>,
    ) {
        let Some(returned) = returned else {
            return;
        };
        let reason = format!("{} {}", returned.reply_code, returned.reply_text);
        let id = returned
            .delivery
            .properties
            .message_id()
            .as_ref()
            .and_then(|id| uuid::Uuid::parse_str(id.as_str()).ok());
        match id {
            Some(id) => {
                returns.insert(id, reason);
            }
            None => {
                tracing::warn!(%reason, "relay: the broker returned a message without a postbox message id")
            }
        }
    }

    async fn decide(&self, published: Published) -> Decided {
        let Published {
            batch,
            sent,
            published_at,
            block_changes,
            mut window,
        } = published;
        let mut withheld = 0;
        // From the publish, not from now: batches are decided one after another, so waiting
        // out one's timeout must not push back the next one's (a broker that never confirms
        // would otherwise hold the k-th batch's rows for k timeouts, past takeover_timeout).
        let deadline = tokio::time::Instant::from_std(published_at) + self.confirm_timeout;
        // Every confirm first, then the decisions: lapin hands a basic.return to whichever
        // confirm a `multiple` ack resolves first (in hash order), not to the returned
        // message's own. So returns are matched to rows by message id. The batch has its
        // channel to itself (see `WindowSlot`), so its returns come on its own confirms.
        let mut returns = HashMap::new();
        let mut heard = Vec::with_capacity(sent.len());
        for sent in sent {
            heard.push(match sent {
                Sent::Confirm(confirm) => match tokio::time::timeout_at(deadline, confirm).await {
                    Ok(Ok(Confirmation::Ack(returned))) => {
                        Self::note_returned(&mut returns, returned);
                        Heard::Ack
                    }
                    Ok(Ok(Confirmation::Nack(returned))) => {
                        Self::note_returned(&mut returns, returned);
                        Heard::Nack
                    }
                    Ok(Ok(Confirmation::NotRequested)) => Heard::NotRequested,
                    Ok(Err(error)) => Heard::Lost(error),
                    Err(_) => Heard::TimedOut,
                },
                Sent::Released => Heard::Released,
                Sent::Failed(error) => Heard::Failed(error),
                Sent::Refused(error) => Heard::Refused(error),
            });
        }
        let unheard = heard
            .iter()
            .filter(|heard| matches!(heard, Heard::TimedOut | Heard::Lost(_)))
            .count();
        let mut blamed = false;
        let (mut lost, mut lost_rows) = (None, 0);
        let mut completions = Vec::with_capacity(heard.len());
        for (row, heard) in batch.rows.iter().zip(heard) {
            if let (Heard::Ack | Heard::Nack, Some(reason)) =
                (&heard, returns.remove(&row.message_id))
            {
                if row.is_skip() {
                    // No queue takes the stream: no consumer waits for the number.
                    completions.push((row.id, Completion::Published));
                    continue;
                }
                let failure = format!(
                    "returned by the broker as unroutable ({reason}): no queue is bound to \
                     exchange {:?} with routing key {:?}",
                    row.exchange, row.routing_key
                );
                completions.push((row.id, self.policy.after_failure(row.attempts, failure)));
                continue;
            }
            let failure = match heard {
                Heard::Released => continue,
                Heard::Refused(unsendable) => {
                    let error = unsendable.to_string();
                    completions.push((row.id, Completion::Dead { error }));
                    continue;
                }
                Heard::Failed(failure) => failure.to_string(),
                Heard::Ack => {
                    completions.push((row.id, Completion::Published));
                    continue;
                }
                Heard::Nack => "nacked by the broker".to_string(),
                Heard::NotRequested => "the channel was not in confirm mode".to_string(),
                // The channel or connection went away: whether the broker has the message is
                // unknown, so it is published again, with the same message id. Unless the
                // broker closed the channel refusing this row: it drops everything after the
                // publish it refused, so of the rows its reply names the first is the culprit.
                Heard::Lost(error) => match refusal(&error, row).filter(|_| !blamed) {
                    Some(refused) => {
                        blamed = true;
                        refused
                    }
                    None => {
                        lost.get_or_insert(error);
                        lost_rows += 1;
                        continue;
                    }
                },
                Heard::TimedOut if self.health.broker.blocked_since(block_changes) => {
                    // The broker withheld the confirm (a resource alarm): not the row's fault,
                    // so no attempt is counted; it goes back untouched.
                    withheld += 1;
                    continue;
                }
                Heard::TimedOut => format!(
                    "no publisher confirm within {}",
                    humantime::format_duration(self.confirm_timeout)
                ),
            };
            completions.push((row.id, self.policy.after_failure(row.attempts, failure)));
        }
        if let Some(error) = lost {
            tracing::warn!(rows = lost_rows, %error, "relay: confirms lost with the channel or connection; the rows will be published again");
        }
        if withheld > 0 {
            tracing::warn!(
                rows = withheld,
                "relay: no confirms while the broker blocked publishing; the rows go back to pending without using an attempt"
            );
        }
        // Nothing is owed on its channel any more: the next batch may use it.
        window.channel.reusable = unheard == 0;
        drop(window); // confirms are in: the next batch may go to the broker
        Decided {
            batch,
            completions,
            published_at,
            confirmed_at: Instant::now(),
        }
    }
}

/// Whether `error`, which closed the channel, is the broker refusing `row`'s publish (no write
/// permission on its exchange or topic, an internal exchange): the reason, counted as a failed
/// attempt. Such a row would otherwise come back again and again with no attempt counted, never
/// dying, each time taking down its batch's channel. The broker's reply is the only evidence:
/// it names the exchange as "exchange 'x' in vhost" (and the routing key as "topic 'k'" when
/// topic permissions refused it).
fn refusal(error: &lapin::Error, row: &crate::store::outbox::ClaimedRow) -> Option<String> {
    let lapin::ErrorKind::ProtocolError(amqp) = error.kind() else {
        return None;
    };
    if !matches!(amqp.kind(), lapin::protocol::AMQPErrorKind::Soft(_)) || row.exchange.is_empty() {
        return None;
    }
    let reply = amqp.get_message().as_str();
    let exchange = reply.contains(&format!("exchange '{}' in vhost", row.exchange));
    let topic =
        !reply.contains("topic '") || reply.contains(&format!("topic '{}'", row.routing_key));
    (exchange && topic)
        .then(|| format!("the broker refused the publish and closed the channel: {amqp}"))
}
