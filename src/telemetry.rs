//! Logging setup: `RUST_LOG` decides what is shown (default: info for postbox, warn elsewhere).

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber, writing to stderr. Safe to call more than once.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,postbox=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed or full stderr must not take the relay down: drop the line, keep relaying.
        .log_internal_errors(false)
        .try_init();
}
