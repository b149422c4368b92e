//! Test support against the real Postgres and RabbitMQ: a fresh database per test, uniquely
//! named queues that vanish with the test's connection, a relay runner, waiting with deadlines,
//! and a TCP proxy that counts the statements a client sends.

#![allow(dead_code)] // each test binary uses its own subset

pub mod checker;
pub mod http;
mod postgres;
pub mod proxy;
mod rabbitmq;
mod relay;
mod subscriber;

use std::future::Future;
use std::time::{Duration, Instant};

// Every test binary uses its own subset of these.
#[allow(unused_imports)]
pub use postgres::*;
#[allow(unused_imports)]
pub use rabbitmq::*;
#[allow(unused_imports)]
pub use relay::*;
#[allow(unused_imports)]
pub use subscriber::*;

/// `host:port` of a URL (to put a proxy in front of it).
pub fn host_port(url: &str) -> String {
    let url = url::Url::parse(url).expect("URL parses");
    format!(
        "{}:{}",
        url.host_str().expect("URL has a host"),
        url.port().unwrap_or(match url.scheme() {
            "amqp" => 5672,
            "amqps" => 5671,
            _ => 5432,
        })
    )
}

/// Waits until `check` returns `Some`, polling every 20 ms; panics with `what` after `deadline`.
pub async fn wait_until<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
