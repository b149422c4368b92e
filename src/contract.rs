//! The wire contract: the names that the SQL schema, the relay and consumers (postbox's and
//! anyone else's) share. Changing any of them breaks deployed producers or consumers, so each
//! is defined here once and nowhere else in the code.

use uuid::Uuid;

/// Header carrying the row's outbox position (replay address, per-key order check).
pub const HEADER_OUTBOX_ID: &str = "x-postbox-outbox-id";
/// Header carrying the row's partition key, when it has one.
pub const HEADER_PARTITION_KEY: &str = "x-postbox-partition-key";
/// Header carrying when the row was written (RFC 3339, microseconds).
pub const HEADER_CREATED_AT: &str = "x-postbox-created-at";
/// Header naming the outbox the message came from (`postbox.outbox_source`): outbox ids order
/// only the messages of one source.
pub const HEADER_SOURCE: &str = "x-postbox-source";
/// Header carrying the row's number in its stream (partition key, exchange, routing key):
/// consumers apply a stream's messages in this order, each once, none skipped.
pub const HEADER_SEQ: &str = "x-postbox-seq";
/// Header of a skip message: it stands in a stream for the released dead row whose message id
/// it holds, carrying that row's number, so consumers move on past it.
pub const HEADER_SKIP: &str = "x-postbox-skip";

/// Header with the last error of a dead-lettered message.
pub const HEADER_ERROR: &str = "x-postbox-error";
/// Header with the name of the consumer that gave up on the message.
pub const HEADER_CONSUMER: &str = "x-postbox-consumer";
/// Header with the number of failed handler runs.
pub const HEADER_ATTEMPTS: &str = "x-postbox-attempts";
/// Header with the queue the message was consumed from.
pub const HEADER_QUEUE: &str = "x-postbox-queue";
/// Header with the exchange the message was originally published to.
pub const HEADER_ORIGINAL_EXCHANGE: &str = "x-postbox-original-exchange";
/// Header with the routing key the message was originally published with.
pub const HEADER_ORIGINAL_ROUTING_KEY: &str = "x-postbox-original-routing-key";

/// The channel the outbox trigger notifies while a relay sleeps.
pub const NOTIFY_CHANNEL: &str = "postbox_outbox";

/// The advisory lock namespace of the wake-up keys, as the outbox trigger writes it
/// (`hashtext('postbox.outbox wakeup')` on little-endian machines).
pub const WAKEUP_NAMESPACE: i32 = -1_084_948_806;

/// Wake-up keys: 0 to `WAKEUP_KEYS - 1`; a producer's session uses its backend pid modulo this.
pub const WAKEUP_KEYS: i32 = 256;

/// The namespace of postbox's deterministic ids: UUIDv5 of the URL namespace over
/// `https://postbox.dev/message-id`.
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0xe1410293_3a24_5a40_a19d_c374ce71053f);
