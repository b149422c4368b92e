//! A consumer's settings, with the defaults a subscriber usually wants.

use std::time::Duration;

use lapin::types::ShortString;

use crate::error::InvalidSetting;
use crate::Vacuum;

/// Where messages go that cannot be processed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetter {
    /// A durable queue named `<queue>.dead`, declared by the consumer.
    DefaultQueue,
    /// A durable queue of this name, declared by the consumer.
    Queue(String),
    /// An exchange the application declared, with the routing key to publish with. The
    /// consumer declares nothing; an unroutable dead letter is retried, never dropped.
    Exchange {
        /// The exchange's name.
        exchange: String,
        /// The routing key dead letters are published with.
        routing_key: String,
    },
}

/// What to do with a message postbox cannot hand to the handler: no message id, or a
/// payload the handler reports as [malformed](super::FailureKind::Malformed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MalformedPolicy {
    /// Publish it to the dead-letter destination, then ack (the default).
    DeadLetter,
    /// Ack it and record it as discarded: it is lost on purpose.
    Discard,
}

/// How a consumer orders the messages of a partition key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Versioning {
    /// By the stream number the relay gives each keyed row (`x-postbox-seq`; the default): a
    /// stream's messages (one key, one exchange and routing key, one outbox) are applied in
    /// number order, each once, none skipped. One that arrives before its predecessor is held
    /// in `postbox.inbox_waiting` and applied right after it. Messages without a number are
    /// applied as they come (duplicates still absorbed).
    Sequence,
    /// State semantics: the outbox position (`x-postbox-outbox-id`) is the key's version, and
    /// a message whose version is not newer than the one applied is skipped as stale.
    OutboxId,
    /// State semantics with an integer header the producer sets (an aggregate's version,
    /// say): a message not newer than the version applied is skipped as stale. Messages
    /// without it are not checked.
    Header(String),
    /// No stale check: every new message id is applied.
    Off,
}

/// How a [`Consumer`](super::Consumer) behaves. Start from `ConsumerOptions::default()` and
/// change what you need with the methods named after the fields:
///
/// ```
/// use std::time::Duration;
/// use postbox::inbox::ConsumerOptions;
///
/// let options = ConsumerOptions::default()
///     .concurrency(8)
///     .prefetch(64)
///     .max_attempts(10)
///     .dedup_window(Some(Duration::from_secs(14 * 24 * 3600)));
/// assert_eq!(options.concurrency, 8);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ConsumerOptions {
    /// Deliveries the broker sends ahead of acks (AMQP prefetch). At least `concurrency`.
    pub prefetch: u16,
    /// Messages processed at once. Messages of one partition key are always processed one at
    /// a time and in order, whatever this is.
    pub concurrency: usize,
    /// Messages applied per transaction through [`Handler::handle_batch`](super::Handler),
    /// with one inbox statement for the whole batch. 1 (the default) processes each message in
    /// its own transaction. A batch is whatever has arrived, up to this many: no waiting to
    /// fill it. A batch decides as its messages would one after another: duplicates and stale
    /// messages (see [`Versioning`]) are skipped, not passed to the handler.
    pub batch_size: usize,
    /// Handler runs before a transiently failing message is dead-lettered.
    pub max_attempts: u32,
    /// Delay before the first retry; it doubles (with jitter) up to `retry_max_delay`.
    pub retry_initial_delay: Duration,
    /// Longest delay between retries.
    pub retry_max_delay: Duration,
    /// Where unprocessable messages go.
    pub dead_letter: DeadLetter,
    /// What happens to malformed messages.
    pub on_malformed: MalformedPolicy,
    /// How a key's messages are ordered: by stream number (the default) or by a version.
    pub versioning: Versioning,
    /// How long the first message of a stream this consumer has never applied may wait for
    /// the stream's earlier numbers before the stream starts there (a consumer that joins a
    /// stream midway never receives them). A message held this long is visible in
    /// `postbox.inbox_waiting_streams`.
    pub stream_start_wait: Duration,
    /// How long decided inbox rows are kept to recognize duplicates; the consumer deletes older
    /// ones every `cleanup_interval`. `None` keeps them forever. Must exceed the longest time
    /// a message can come back (consumer and relay retries, replays): a duplicate arriving
    /// later is applied again, unless the version check finds it stale.
    pub dedup_window: Option<Duration>,
    /// How often the consumer deletes inbox rows older than `dedup_window`.
    pub cleanup_interval: Duration,
    /// Whether the consumer runs `VACUUM` on `postbox.inbox` after a cleanup round that
    /// deleted rows (`Auto`: only where autovacuum is off for the table).
    pub vacuum: Vacuum,
    /// On stop, how long handlers already running may take to finish before they are
    /// abandoned (rolled back; the broker redelivers their messages).
    pub shutdown_timeout: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            prefetch: 64,
            concurrency: 1,
            batch_size: 1,
            max_attempts: 5,
            retry_initial_delay: Duration::from_millis(200),
            retry_max_delay: Duration::from_secs(10),
            dead_letter: DeadLetter::DefaultQueue,
            on_malformed: MalformedPolicy::DeadLetter,
            versioning: Versioning::Sequence,
            stream_start_wait: Duration::from_secs(5),
            dedup_window: Some(Duration::from_secs(7 * 24 * 3600)),
            cleanup_interval: Duration::from_secs(300),
            vacuum: Vacuum::Auto,
            shutdown_timeout: Duration::from_secs(30),
        }
    }
}

impl ConsumerOptions {
    setters! {
        prefetch: u16,
        concurrency: usize,
        batch_size: usize,
        max_attempts: u32,
        retry_initial_delay: Duration,
        retry_max_delay: Duration,
        dead_letter: DeadLetter,
        on_malformed: MalformedPolicy,
        versioning: Versioning,
        stream_start_wait: Duration,
        dedup_window: Option<Duration>,
        cleanup_interval: Duration,
        vacuum: Vacuum,
        shutdown_timeout: Duration,
    }

    /// Checks the options for a consumer of `queue` named `name`, naming the setting at fault.
    pub(crate) fn validate(&self, queue: &str, name: &str) -> Result<(), InvalidSetting> {
        let invalid = |setting: &'static str, value: String, reason: &str| {
            InvalidSetting::new(setting, value, reason)
        };
        // Both are written to Postgres `text` with every message, which cannot hold NUL.
        if ShortString::try_new(queue).is_err() || queue.is_empty() || queue.contains('\0') {
            return Err(invalid(
                "consumer.queue",
                queue.escape_debug().to_string(),
                "expected a queue name of 1 to 255 bytes, without NUL characters",
            ));
        }
        if name.is_empty() || name.contains('\0') {
            return Err(invalid(
                "consumer.name",
                name.escape_debug().to_string(),
                "expected a non-empty consumer name without NUL characters (it keys the inbox \
                 rows)",
            ));
        }
        if self.concurrency == 0 {
            return Err(invalid(
                "consumer.concurrency",
                "0".into(),
                "expected at least 1",
            ));
        }
        if usize::from(self.prefetch) < self.concurrency {
            return Err(invalid(
                "consumer.prefetch",
                self.prefetch.to_string(),
                "expected at least `concurrency`, or workers would sit idle",
            ));
        }
        if self.batch_size == 0 || self.batch_size > usize::from(self.prefetch) {
            return Err(invalid(
                "consumer.batch_size",
                self.batch_size.to_string(),
                "expected 1 to `prefetch`",
            ));
        }
        if self.max_attempts == 0 {
            return Err(invalid(
                "consumer.max_attempts",
                "0".into(),
                "expected at least 1",
            ));
        }
        if self.retry_initial_delay > self.retry_max_delay {
            return Err(invalid(
                "consumer.retry_initial_delay",
                format!("{:?}", self.retry_initial_delay),
                "expected at most retry_max_delay",
            ));
        }
        if let Some(window) = self.dedup_window {
            let horizon = self.retry_policy().horizon();
            if window <= horizon {
                return Err(InvalidSetting::new(
                    "consumer.dedup_window",
                    format!("{window:?}"),
                    format!(
                        "expected more than the consumer's retry horizon ({horizon:?} with \
                         max_attempts {} and retry delays {:?} to {:?}): a message retried \
                         after its inbox row was deleted would be applied twice",
                        self.max_attempts, self.retry_initial_delay, self.retry_max_delay
                    ),
                ));
            }
        }
        if self.cleanup_interval.is_zero() {
            return Err(invalid(
                "consumer.cleanup_interval",
                "0s".into(),
                "expected a positive interval",
            ));
        }
        let (exchange, routing_key) = self.dead_letter_target(queue);
        for (setting, value) in [
            ("consumer.dead_letter.exchange", exchange),
            ("consumer.dead_letter.routing_key", routing_key),
        ] {
            if ShortString::try_new(value.as_str()).is_err() {
                return Err(invalid(setting, value, "expected at most 255 bytes"));
            }
        }
        if let Versioning::Header(header) = &self.versioning {
            if header.is_empty() {
                return Err(invalid(
                    "consumer.versioning",
                    header.clone(),
                    "expected a header name",
                ));
            }
        }
        Ok(())
    }

    /// The schedule of handler retries these options describe.
    pub(crate) fn retry_policy(&self) -> crate::retry::RetryPolicy {
        crate::retry::RetryPolicy::new(
            self.max_attempts,
            self.retry_initial_delay,
            self.retry_max_delay,
        )
    }

    /// Exchange and routing key dead letters of `queue` are published with.
    pub(crate) fn dead_letter_target(&self, queue: &str) -> (String, String) {
        match &self.dead_letter {
            DeadLetter::DefaultQueue => (String::new(), format!("{queue}.dead")),
            DeadLetter::Queue(name) => (String::new(), name.clone()),
            DeadLetter::Exchange {
                exchange,
                routing_key,
            } => (exchange.clone(), routing_key.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setting_at_fault(options: &ConsumerOptions, queue: &str, name: &str) -> &'static str {
        match options.validate(queue, name) {
            Err(InvalidSetting { setting, .. }) => setting,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn defaults_are_valid() {
        assert!(ConsumerOptions::default()
            .validate("orders", "billing")
            .is_ok());
    }

    #[test]
    fn invalid_options_name_the_setting() {
        let defaults = ConsumerOptions::default();
        assert_eq!(setting_at_fault(&defaults, "", "billing"), "consumer.queue");
        assert_eq!(setting_at_fault(&defaults, "orders", ""), "consumer.name");
        assert_eq!(
            setting_at_fault(&defaults, "orders", "bill\0ing"),
            "consumer.name"
        );
        assert_eq!(
            setting_at_fault(&defaults, "ord\0ers", "billing"),
            "consumer.queue"
        );
        let cases = [
            (
                ConsumerOptions {
                    concurrency: 8,
                    prefetch: 4,
                    ..ConsumerOptions::default()
                },
                "consumer.prefetch",
            ),
            (
                ConsumerOptions {
                    concurrency: 0,
                    ..ConsumerOptions::default()
                },
                "consumer.concurrency",
            ),
            (
                ConsumerOptions {
                    batch_size: 65,
                    ..ConsumerOptions::default()
                },
                "consumer.batch_size",
            ),
            (
                ConsumerOptions {
                    max_attempts: 0,
                    ..ConsumerOptions::default()
                },
                "consumer.max_attempts",
            ),
            (
                ConsumerOptions {
                    retry_initial_delay: Duration::from_secs(60),
                    ..ConsumerOptions::default()
                },
                "consumer.retry_initial_delay",
            ),
            (
                ConsumerOptions {
                    dead_letter: DeadLetter::Queue("q".repeat(256)),
                    ..ConsumerOptions::default()
                },
                "consumer.dead_letter.routing_key",
            ),
            (
                ConsumerOptions {
                    // 5 attempts, delays 200ms..10s: horizon 2·(0.2+0.4+0.8+1.6) = 6s
                    dedup_window: Some(Duration::from_secs(5)),
                    ..ConsumerOptions::default()
                },
                "consumer.dedup_window",
            ),
            (
                ConsumerOptions {
                    versioning: Versioning::Header(String::new()),
                    ..ConsumerOptions::default()
                },
                "consumer.versioning",
            ),
        ];
        for (options, setting) in cases {
            assert_eq!(setting_at_fault(&options, "orders", "billing"), setting);
        }
    }

    #[test]
    fn the_default_dead_letter_queue_is_named_after_the_queue() {
        assert_eq!(
            ConsumerOptions::default().dead_letter_target("orders"),
            (String::new(), "orders.dead".to_string())
        );
    }
}
