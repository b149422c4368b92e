//! Logging setup: `RUST_LOG` decides what is shown (default: info for postbox, warn elsewhere).

use tracing_subscriber::EnvFilter;

/// Installs the global tracing subscriber, writing to stderr. Safe to call more than once.
pub fn init() {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("warn,postbox=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
