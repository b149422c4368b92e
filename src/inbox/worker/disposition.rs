//! What becomes of a message whose run failed: the consumer's retry rules in one pure function,
//! kept apart from the I/O that carries them out (`worker.rs`).

use std::time::Duration;

use crate::error::DatabaseError;

use crate::inbox::{ConsumerError, FailureKind, HandlerError};
use crate::retry::RetryPolicy;

/// Why a run did not decide the message.
pub(crate) enum Failed {
    /// An inbox statement failed for a reason that is not the message's: Postgres unreachable,
    /// or the inbox itself broken (a missing table, a permission), which an operator can fix.
    Database(ConsumerError),
    /// The handler (or its commit) failed.
    Handler(HandlerError),
    /// Postgres refuses the message's own values in the inbox: no run can ever record it.
    Refused(String),
}

impl Failed {
    /// An inbox statement's error, sorted: the message's fault when Postgres refuses its
    /// values (a key Postgres cannot store or index would fail every run alike), waited out
    /// otherwise.
    pub(crate) fn inbox(error: impl Into<ConsumerError>) -> Self {
        let error = error.into();
        if error.refuses_message() {
            Failed::Refused(format!("the inbox cannot record this message: {error}"))
        } else {
            Failed::Database(error)
        }
    }
}

/// What the worker does after a failed run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// Postgres is away: wait, then run again; no attempt is counted (an outage must not
    /// dead-letter messages).
    WaitForOutage,
    /// Dead-letter now: the handler said no retry will help, or Postgres refuses the message.
    DeadLetter,
    /// The message cannot be understood: dead-letter or discard it, as the malformed policy says.
    Malformed,
    /// A transient failure: record it as one more failed attempt, then ask [`after_recorded`].
    Record,
}

/// The disposition of a failed run.
pub(crate) fn on_failure(failed: &Failed) -> Disposition {
    match failed {
        Failed::Database(_) => Disposition::WaitForOutage,
        Failed::Refused(_) => Disposition::DeadLetter,
        // The handler's own queries lost Postgres: not the message's fault.
        Failed::Handler(failure) if lost_connection(failure) => Disposition::WaitForOutage,
        Failed::Handler(failure) => match failure.kind() {
            FailureKind::Transient => Disposition::Record,
            FailureKind::Permanent => Disposition::DeadLetter,
            FailureKind::Malformed => Disposition::Malformed,
        },
    }
}

/// After a transient failure was recorded as the message's `failures`-th failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterRecorded {
    /// Run it again after this pause.
    RetryAfter(Duration),
    /// Attempts are used up: dead-letter it.
    DeadLetter,
}

/// Retry after the policy's backoff, or dead-letter once attempts run out.
pub(crate) fn after_recorded(failures: u32, policy: &RetryPolicy) -> AfterRecorded {
    if policy.exhausted(failures) {
        AfterRecorded::DeadLetter
    } else {
        AfterRecorded::RetryAfter(policy.delay(failures))
    }
}

/// A handler's panic as a transient failure, with its message when it has one.
pub(crate) fn panicked(panic: Box<dyn std::any::Any + Send>) -> HandlerError {
    let message = panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string());
    HandlerError::transient(format!("the handler panicked: {message}"))
}

/// Whether a transient failure is Postgres going away (connection refused, reset, pool
/// exhausted) rather than something about the message.
fn lost_connection(failure: &HandlerError) -> bool {
    if failure.kind() != FailureKind::Transient {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(failure.error());
    while let Some(error) = source {
        let sqlx_error = error
            .downcast_ref::<sqlx::Error>()
            .or_else(|| {
                error
                    .downcast_ref::<DatabaseError>()
                    .map(DatabaseError::driver)
            })
            .or_else(|| match error.downcast_ref::<ConsumerError>() {
                Some(ConsumerError::Database(database)) => Some(database.driver()),
                _ => None,
            });
        if let Some(sqlx_error) = sqlx_error {
            return matches!(
                sqlx_error,
                sqlx::Error::Io(_)
                    | sqlx::Error::Tls(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::WorkerCrashed
            );
        }
        source = error.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::error::Error as StdError;
    use std::fmt;

    use super::*;

    /// A server error with a given SQLSTATE, as Postgres would send it.
    #[derive(Debug)]
    struct ServerError(&'static str);

    impl fmt::Display for ServerError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "server error {}", self.0)
        }
    }

    impl StdError for ServerError {}

    impl sqlx::error::DatabaseError for ServerError {
        fn message(&self) -> &str {
            "server error"
        }
        fn code(&self) -> Option<Cow<'_, str>> {
            Some(Cow::Borrowed(self.0))
        }
        fn as_error(&self) -> &(dyn StdError + Send + Sync + 'static) {
            self
        }
        fn as_error_mut(&mut self) -> &mut (dyn StdError + Send + Sync + 'static) {
            self
        }
        fn into_error(self: Box<Self>) -> Box<dyn StdError + Send + Sync + 'static> {
            self
        }
        fn kind(&self) -> sqlx::error::ErrorKind {
            sqlx::error::ErrorKind::Other
        }
    }

    fn database(source: sqlx::Error) -> DatabaseError {
        DatabaseError::new("recording the outcome", source)
    }

    fn server(code: &'static str) -> DatabaseError {
        database(sqlx::Error::Database(Box::new(ServerError(code))))
    }

    fn refused_connection() -> sqlx::Error {
        sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused))
    }

    #[test]
    fn inbox_errors_about_the_values_refuse_the_message_and_the_rest_are_waited_out() {
        // unique_violation, string_data_right_truncation, program_limit_exceeded
        for code in ["23505", "22001", "54000"] {
            assert_eq!(
                on_failure(&Failed::inbox(server(code))),
                Disposition::DeadLetter
            );
        }
        // undefined_table (migrate, and it goes on), admin_shutdown, serialization_failure
        for code in ["42P01", "57P01", "40001"] {
            assert_eq!(
                on_failure(&Failed::inbox(server(code))),
                Disposition::WaitForOutage
            );
        }
        for lost in [refused_connection(), sqlx::Error::PoolTimedOut] {
            let failed = Failed::inbox(database(lost));
            assert_eq!(on_failure(&failed), Disposition::WaitForOutage);
        }
    }

    #[test]
    fn only_failures_that_pass_by_themselves_are_transient() {
        // serialization_failure, deadlock, admin_shutdown, too_many_connections, lock timeout
        for code in ["40001", "40P01", "57P01", "53300", "55P03", "08006"] {
            assert!(server(code).is_transient(), "{code}");
        }
        // undefined_table, insufficient_privilege, unique_violation, object_in_use
        for code in ["42P01", "42501", "23505", "55006"] {
            assert!(!server(code).is_transient(), "{code}");
        }
        assert!(database(refused_connection()).is_transient());
    }

    #[test]
    fn handler_failures_follow_their_kind() {
        let cases = [
            (HandlerError::transient("busy"), Disposition::Record),
            (
                HandlerError::permanent("no such account"),
                Disposition::DeadLetter,
            ),
            (HandlerError::malformed("not JSON"), Disposition::Malformed),
        ];
        for (failure, expected) in cases {
            assert_eq!(on_failure(&Failed::Handler(failure)), expected);
        }
    }

    #[test]
    fn a_handler_that_lost_postgres_waits_without_counting_an_attempt() {
        // Directly, and wrapped the way `?` on a postbox call or a context error wraps it.
        let direct = HandlerError::transient(refused_connection());
        let wrapped = HandlerError::transient(database(sqlx::Error::PoolClosed));
        for failure in [direct, wrapped] {
            assert_eq!(
                on_failure(&Failed::Handler(failure)),
                Disposition::WaitForOutage
            );
        }
        // A permanent failure stays permanent whatever it wraps.
        let permanent = HandlerError::permanent(refused_connection());
        assert_eq!(
            on_failure(&Failed::Handler(permanent)),
            Disposition::DeadLetter
        );
        // A server error reached Postgres: it is about the statement, so it is an attempt.
        let statement = HandlerError::transient(server("40P01"));
        assert_eq!(on_failure(&Failed::Handler(statement)), Disposition::Record);
    }

    #[test]
    fn recorded_failures_retry_with_growing_pauses_until_attempts_run_out() {
        let policy = RetryPolicy::new(4, Duration::from_millis(100), Duration::from_secs(10));
        let mut pauses = Vec::new();
        for failures in 1..4 {
            match after_recorded(failures, &policy) {
                AfterRecorded::RetryAfter(pause) => pauses.push(pause),
                AfterRecorded::DeadLetter => panic!("gave up after {failures} of 4"),
            }
        }
        assert!(
            pauses.windows(2).all(|pair| pair[0] <= pair[1] * 2),
            "{pauses:?}"
        );
        assert!(pauses.iter().all(|pause| *pause <= Duration::from_secs(10)));
        assert_eq!(after_recorded(4, &policy), AfterRecorded::DeadLetter);
        assert_eq!(after_recorded(5, &policy), AfterRecorded::DeadLetter);
    }

    #[test]
    fn a_panic_is_a_transient_failure_that_keeps_its_message() {
        let failure = panicked(Box::new("index out of bounds"));
        assert_eq!(failure.kind(), FailureKind::Transient);
        assert!(failure.to_string().contains("index out of bounds"));
        let failure = panicked(Box::new(String::from("owned message")));
        assert!(failure.to_string().contains("owned message"));
    }
}
