//! A RabbitMQ resource alarm blocks every publishing connection on the broker, so this test
//! has a binary of its own: `cargo test` runs test binaries one after another, so nothing else
//! publishes while the alarm is on. (A runner that mixes binaries, such as nextest, must run
//! this one alone.) It raises a memory alarm with `rabbitmqctl` on the test broker's node and
//! clears it afterwards, also when the test fails.

mod common;

use std::process::Command;
use std::time::Duration;

use common::checker::{assert_settled, Committed};
use common::http::http_get;
use common::{wait_until, RunningRelay, Stage};
use postbox::Message;
use tokio_util::sync::CancellationToken;

/// `rabbitmqctl` with `args`; its trimmed output.
fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl runs (this test needs the broker's node on this machine)");
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

/// A memory alarm on the broker: every publishing connection is blocked until it is dropped.
struct MemoryAlarm {
    /// The watermark before, as Erlang prints it (`0.4`, or `{absolute,…}`), to restore.
    watermark: String,
}

impl MemoryAlarm {
    fn raise() -> Self {
        let watermark = rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]);
        rabbitmqctl(&["set_vm_memory_high_watermark", "0.0001"]);
        Self { watermark }
    }
}

impl Drop for MemoryAlarm {
    fn drop(&mut self) {
        rabbitmqctl(&[
            "eval",
            &format!(
                "vm_memory_monitor:set_vm_memory_high_watermark({}).",
                self.watermark
            ),
        ]);
    }
}

/// Serves the relay's HTTP endpoints (as `postbox run --metrics-addr` does) for `relay`;
/// returns the port and the token that stops the server.
async fn serve_endpoints(db: &common::TestDb, relay: &RunningRelay) -> (u16, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a loopback port");
    let port = listener.local_addr().expect("local address").port();
    let probe = postbox::metrics::Probe {
        pool: db.pool.clone(),
        health: relay.health.clone(),
        max_lag: None,
        park_keys: true,
        handle: postbox::metrics::install().expect("the only recorder in this binary"),
    };
    let shutdown = CancellationToken::new();
    tokio::spawn(postbox::metrics::serve(listener, probe, shutdown.clone()));
    (port, shutdown)
}

/// While the broker blocks publishing, confirms do not come; that is the broker's doing, not
/// the rows': with `max_attempts = 1`, a timeout counted as an attempt would kill every row.
/// The relay must instead give the rows back untouched, claim nothing until the alarm clears,
/// and then deliver everything. Meanwhile its readiness check and its gauge say why.
#[tokio::test]
async fn a_broker_alarm_blocks_the_relay_without_costing_rows_an_attempt() {
    const ROWS: usize = 20;
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    let mut settings = db.settings();
    settings.relay.confirm_timeout = Duration::from_secs(1);
    settings.relay.max_attempts = 1;
    let relay = RunningRelay::start(settings.clone()).await;
    let health = relay.health.clone();
    let stats = relay.stats.clone();
    wait_until("the relay connected", Duration::from_secs(20), || async {
        health.broker_connected().then_some(())
    })
    .await;
    let (port, endpoints) = serve_endpoints(&db, &relay).await;
    wait_until("/readyz to answer 200", Duration::from_secs(20), || async {
        http_get(port, "/readyz").await.filter(|(s, _)| *s == 200)
    })
    .await;

    let alarm = MemoryAlarm::raise();
    let messages: Vec<Message> = (0..ROWS)
        .map(|n| Message::text(&queue, n.to_string()).partition_key(format!("key-{}", n % 5)))
        .collect();
    postbox::enqueue_many(&db.pool, &messages)
        .await
        .expect("commit");
    let committed = Committed::read(&db).await;
    wait_until(
        "the relay sees the broker block it",
        Duration::from_secs(20),
        || async { health.broker_blocked().then_some(()) },
    )
    .await;
    wait_until(
        "the unconfirmed rows given back",
        Duration::from_secs(20),
        || async { (stats.released() > 0).then_some(()) },
    )
    .await;
    wait_until(
        "no relay holds rows while the broker blocks",
        Duration::from_secs(20),
        || async { (db.locked_rows().await == 0).then_some(()) },
    )
    .await;
    assert_eq!(db.count("dead_at is not null").await, 0, "no row died");
    assert_eq!(db.count("attempts > 0").await, 0, "no attempt was counted");
    assert_eq!(stats.published(), 0);
    let (status, body) = http_get(port, "/readyz").await.expect("/readyz answers");
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).expect("readyz JSON");
    assert_eq!(
        ready["checks"]["broker"], "the broker blocks publishing (resource alarm)",
        "{body}"
    );
    let (_, metrics) = http_get(port, "/metrics").await.expect("/metrics answers");
    assert!(
        metrics
            .lines()
            .any(|line| line == "postbox_broker_blocked 1"),
        "{metrics}"
    );
    endpoints.cancel();
    // A shutdown during the alarm still ends (the blocked connection never answers a close).
    relay.stop().await;

    drop(alarm);
    let relay = RunningRelay::start(settings).await;
    let received = inbox
        .until_all(&committed.ids(), Duration::from_secs(60))
        .await;
    assert_eq!(assert_settled(&db, Duration::from_secs(60)).await, 0);
    assert_eq!(db.count("attempts > 0").await, 0, "no attempt was counted");
    assert!(!relay.health.broker_blocked());
    relay.stop().await;
    // The blocked publishes reach the queue once the alarm clears, besides their republished
    // copies: duplicates, at most one per row here.
    committed
        .check(&received)
        .assert_sound("a broker alarm while rows were in flight", ROWS);
}
