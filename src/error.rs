//! The failures every area of postbox shares: a Postgres operation, a RabbitMQ operation, an
//! option with a value postbox cannot use. Each area has its own error enum built from these
//! (`EnqueueError`, `RelayError`, `inbox::ConsumerError`, `MigrateError`); every I/O error
//! carries what postbox was doing when it failed.

/// A Postgres operation failed: what postbox was doing, and the driver's error.
#[derive(Debug, thiserror::Error)]
#[error("postgres: {context}: {}", describe(source))]
pub struct DatabaseError {
    context: String,
    #[source]
    source: sqlx::Error,
}

impl DatabaseError {
    pub(crate) fn new(context: impl Into<String>, source: sqlx::Error) -> Self {
        Self {
            context: context.into(),
            source,
        }
    }

    /// What postbox was doing, e.g. "claiming a batch" or "connecting to 127.0.0.1:5432/app".
    pub fn context(&self) -> &str {
        &self.context
    }

    /// The server's SQLSTATE, when Postgres answered with an error.
    pub fn sqlstate(&self) -> Option<String> {
        Some(self.source.as_database_error()?.code()?.into_owned())
    }

    /// Whether the same operation may succeed later with nothing about it changed: Postgres
    /// unreachable, restarting or out of connections (SQLSTATE classes 08, 53, 57, 58), a
    /// serialization failure or deadlock (class 40), a lock not available (55P03), or a pool
    /// timing out. False for errors about the statement or its values (a missing table, a
    /// permission, a constraint): they fail again until someone changes something.
    pub fn is_transient(&self) -> bool {
        transient(&self.source)
    }

    /// Whether Postgres refused the values sent (SQLSTATE classes 22 data exception, 23
    /// integrity constraint violation, 54 program limit exceeded): sending the same values again
    /// fails alike, whatever an operator does to the database.
    pub(crate) fn refuses_values(&self) -> bool {
        sqlstate_in(&self.source, &["22", "23", "54"])
    }

    /// The driver's error.
    pub fn driver(&self) -> &sqlx::Error {
        &self.source
    }
}

/// See [`DatabaseError::is_transient`].
pub(crate) fn transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Database(_) => sqlstate_in(error, &["08", "40", "53", "57", "58", "55P03"]),
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => true,
        _ => false,
    }
}

/// Whether Postgres answered `error` with a SQLSTATE that starts with one of `prefixes` (a
/// class such as "23", or a whole code).
fn sqlstate_in(error: &sqlx::Error, prefixes: &[&str]) -> bool {
    let code = error
        .as_database_error()
        .and_then(|database| database.code())
        .unwrap_or_default();
    !code.is_empty() && prefixes.iter().any(|prefix| code.starts_with(prefix))
}

/// A RabbitMQ operation failed: what postbox was doing, and the client's error. The broker
/// failing is always worth trying again: connections drop, nodes restart, alarms clear.
#[derive(Debug, thiserror::Error)]
#[error("rabbitmq: {context}: {source}")]
pub struct BrokerError {
    context: String,
    #[source]
    source: lapin::Error,
}

impl BrokerError {
    pub(crate) fn new(context: impl Into<String>, source: lapin::Error) -> Self {
        Self {
            context: context.into(),
            source,
        }
    }

    /// What postbox was doing, e.g. "publishing" or "connecting to 127.0.0.1:5672/%2f".
    pub fn context(&self) -> &str {
        &self.context
    }
}

/// A setting or option has a value postbox cannot use: which one, the value, what is allowed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("invalid setting `{setting}` = {value:?}: {reason}")]
pub struct InvalidSetting {
    /// The setting's name as written in the configuration file (`relay.batch_size`).
    pub setting: &'static str,
    /// The offending value, with any password removed.
    pub value: String,
    /// What is allowed instead.
    pub reason: String,
}

impl InvalidSetting {
    pub(crate) fn new(
        setting: &'static str,
        value: impl ToString,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            setting,
            value: value.to_string(),
            reason: reason.into(),
        }
    }
}

/// A driver error as a user reads it: the server's message with its detail, hint and SQLSTATE
/// (not the line of Postgres's own source that raised it), and what to do when postbox's
/// schema is missing.
fn describe(error: &sqlx::Error) -> String {
    let Some(server) = error
        .as_database_error()
        .and_then(|e| e.try_downcast_ref::<sqlx::postgres::PgDatabaseError>())
    else {
        return error.to_string();
    };
    let mut text = format!("{} (SQLSTATE {})", server.message(), server.code());
    if let Some(detail) = server.detail() {
        text.push_str(&format!("; {detail}"));
    }
    if let Some(hint) = server.hint() {
        text.push_str(&format!("; hint: {hint}"));
    }
    // undefined_table, undefined_function or invalid_schema_name on one of postbox's objects.
    if matches!(server.code(), "42P01" | "42883" | "3F000") && server.message().contains("postbox")
    {
        text.push_str("; is the schema migrated? Run `postbox migrate`");
    }
    text
}

/// Attaches what postbox was doing to a driver's or client's error.
pub(crate) trait Context<T> {
    /// The error with its context: [`DatabaseError`] or [`BrokerError`].
    type Error;
    /// Wraps the error with a description of the operation that failed.
    fn context(self, context: impl Into<String>) -> Result<T, Self::Error>;
}

impl<T> Context<T> for Result<T, sqlx::Error> {
    type Error = DatabaseError;
    fn context(self, context: impl Into<String>) -> Result<T, DatabaseError> {
        self.map_err(|source| DatabaseError::new(context, source))
    }
}

impl<T> Context<T> for Result<T, lapin::Error> {
    type Error = BrokerError;
    fn context(self, context: impl Into<String>) -> Result<T, BrokerError> {
        self.map_err(|source| BrokerError::new(context, source))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_transient_and_bad_statements_are_not() {
        let io = DatabaseError::new(
            "claiming",
            sqlx::Error::Io(std::io::ErrorKind::ConnectionReset.into()),
        );
        assert!(io.is_transient());
        assert!(!io.refuses_values());
        assert!(DatabaseError::new("claiming", sqlx::Error::PoolTimedOut).is_transient());
        let decode = DatabaseError::new("reading", sqlx::Error::RowNotFound);
        assert!(!decode.is_transient());
    }
}
