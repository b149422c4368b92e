use std::process::ExitCode;

use clap::Parser;

#[tokio::main]
async fn main() -> ExitCode {
    postbox::telemetry::init();
    postbox::cli::Cli::parse().execute().await
}
