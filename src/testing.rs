//! Internals for postbox's own integration tests and benchmark. Not part of the public API:
//! anything here may change in any release.

/// SQL of the outbox, the inbox and operations.
pub mod store {
    /// The relay's pool for `settings`, with `max_connections` connections.
    pub async fn connect(
        settings: &crate::Settings,
        max_connections: u32,
    ) -> Result<sqlx::PgPool, crate::error::DatabaseError> {
        crate::store::connect(settings.database(), max_connections).await
    }

    /// `postbox.outbox`: claim, number, complete.
    pub mod outbox {
        pub use crate::store::outbox::*;
    }

    /// Operator queries: backlog, dead rows, retention.
    pub mod operations {
        pub use crate::store::operations::*;
    }

    /// The consumer's stream positions and held messages.
    pub mod inbox_streams {
        pub use crate::store::inbox_streams::*;
    }
}

/// Encoding rows as AMQP messages.
pub mod amqp {
    pub use crate::amqp::*;

    /// A row's AMQP properties and headers.
    pub mod message {
        pub use crate::amqp::Outgoing;
        pub use crate::relay::encode::*;
    }
}
