use std::process::ExitCode;

use clap::Parser;

// glibc's malloc spent about a third of the relay's CPU under load (perf during `bench`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    postbox::telemetry::init();
    postbox::cli::Cli::parse().execute().await
}
