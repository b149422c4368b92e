//! The `postbox` binary: migrate, bad configuration, unreachable services, SIGTERM.

mod common;

use std::collections::HashSet;
use std::io::Read;
use std::process::{Child, Stdio};
use std::time::Duration;

use common::{amqp_url, postbox_command, wait_until, Stage, TestDb};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn sigterm(child: &Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("send SIGTERM");
}

/// Waits for the child to exit (deadline) and returns its exit code and stderr.
async fn finish(mut child: Child, deadline: Duration) -> (Option<i32>, String) {
    let status = wait_until("postbox to exit", deadline, || {
        let status = child.try_wait().expect("try_wait");
        async move { status }
    })
    .await;
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        pipe.read_to_string(&mut stderr).expect("read stderr");
    }
    (status.code(), stderr)
}

#[tokio::test]
async fn migrate_twice_is_harmless() {
    let db = TestDb::empty().await;
    for _ in 0..2 {
        // A misspelt POSTBOX_ variable is ignored, with a warning that names it.
        let output = postbox_command()
            .arg("migrate")
            .env("DATABASE_URL", &db.url)
            .env("POSTBOX_RELAY__BATCH_SISE", "5")
            .output()
            .expect("run postbox migrate");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(output.status.success(), "{stderr}");
        assert!(
            stderr.contains("not a postbox setting")
                && stderr.contains("POSTBOX_RELAY__BATCH_SISE"),
            "{stderr}"
        );
    }
    let applied: i64 = sqlx::query_scalar("select count(*) from postbox._migrations_outbox")
        .fetch_one(&db.pool)
        .await
        .expect("migrations table");
    let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/outbox"))
        .expect("migrations folder")
        .count();
    assert_eq!(applied as usize, files, "every outbox migration, once");
    assert_eq!(db.count("true").await, 0);
    let inbox: i64 = sqlx::query_scalar("select count(*) from postbox.inbox")
        .fetch_one(&db.pool)
        .await
        .expect("inbox table");
    assert_eq!(inbox, 0);
}

#[tokio::test]
async fn a_subscriber_database_gets_the_inbox_alone() {
    let db = TestDb::empty().await;
    let migrate = |part: &str| {
        let output = postbox_command()
            .args(["migrate", "--part", part])
            .env("DATABASE_URL", &db.url)
            .output()
            .expect("run postbox migrate");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    };
    let tables = || async {
        sqlx::query_scalar::<_, String>(
            "select table_name::text from information_schema.tables \
             where table_schema = 'postbox' and table_type = 'BASE TABLE' order by 1",
        )
        .fetch_all(&db.pool)
        .await
        .expect("list tables")
    };
    migrate("inbox");
    assert_eq!(
        tables().await,
        [
            "_migrations_inbox",
            "inbox",
            "inbox_streams",
            "inbox_versions",
            "inbox_waiting"
        ]
    );
    // The operator's commands work on a database with the inbox alone.
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["cleanup", "--inbox-older-than", "30d"],
    ] {
        let output = postbox_command()
            .args(args)
            .env("DATABASE_URL", &db.url)
            .output()
            .expect("run postbox");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        match args[0] {
            "status" if args.len() == 1 => {
                assert!(stdout.contains("none in this database"), "{stdout}")
            }
            "status" => assert!(stdout.contains("\"inbox\": []"), "{stdout}"),
            _ => assert!(
                stdout.contains("outbox: none in this database")
                    && stdout.contains("inbox: 0 decided row(s)"),
                "{stdout}"
            ),
        }
    }
    // The outbox added later does not disturb the inbox's history.
    migrate("outbox");
    migrate("inbox");
    assert_eq!(
        tables().await,
        [
            "_migrations_inbox",
            "_migrations_outbox",
            "inbox",
            "inbox_streams",
            "inbox_versions",
            "inbox_waiting",
            "outbox",
            "outbox_source",
            "outbox_streams",
            "relays"
        ]
    );
    let output = postbox_command()
        .args(["migrate", "--part", "everything"])
        .env("DATABASE_URL", &db.url)
        .output()
        .expect("run postbox migrate");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("outbox, inbox"));
}

#[test]
fn bad_configuration_names_the_setting_and_exits_2() {
    let cases = [
        ("POSTBOX_RELAY__BATCH_SIZE", "0", "relay.batch_size"),
        ("POSTBOX_RELAY__POLL_INTERVAL", "soon", "poll_interval"),
        (
            "POSTBOX_RELAY__CLEANUP_INTERVAL",
            "0s",
            "relay.cleanup_interval",
        ),
        ("AMQP_URL", "http://guest:hunter2@127.0.0.1", "amqp_url"),
        (
            "DATABASE_URL",
            "mysql://root:hunter2@127.0.0.1/app",
            "database_url",
        ),
        (
            "DATABASE_URL",
            "postgres://app:hunter2@127.0.0.1/app?sslmode=bogus",
            "database_url",
        ),
        (
            "AMQP_URL",
            "amqp://guest:hunter2@127.0.0.1/%2f?heartbeat=abc",
            "amqp_url",
        ),
        // Durations no deadline can hold, and beyond what Postgres enforces.
        (
            "POSTBOX_RELAY__POLL_INTERVAL",
            "500000000000y",
            "relay.poll_interval",
        ),
        (
            "POSTBOX_RELAY__TAKEOVER_TIMEOUT",
            "30d",
            "relay.takeover_timeout",
        ),
    ];
    for (var, value, setting) in cases {
        let output = postbox_command()
            .arg("run")
            .env(var, value)
            .output()
            .expect("run postbox");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{var}={value}: {stderr}");
        assert!(stderr.contains(setting), "{var}={value}: {stderr}");
        assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
    }
    // The POSTBOX_ name wins over the plain one.
    let output = postbox_command()
        .arg("run")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1/postgres")
        .env("POSTBOX_DATABASE_URL", "mysql://root:hunter2@127.0.0.1/app")
        .output()
        .expect("run postbox");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("mysql://root:***@"), "{stderr}");
    // A file: a misspelt setting is named; a syntax error is placed without quoting the line.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    for (contents, expected) in [
        (
            "[relay]\nbatch_sise = 5\n",
            "unknown field `batch_sise`, expected one of `batch_size`",
        ),
        (
            "database_url = postgres://app:hunter2@db/app\n",
            "line 1, column 16",
        ),
    ] {
        let file = dir.join(format!("postbox-{}.toml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&file, contents).expect("write config file");
        let output = postbox_command()
            .arg("--config")
            .arg(&file)
            .arg("migrate")
            .output()
            .expect("run postbox");
        let _ = std::fs::remove_file(&file);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
        assert!(!stderr.contains("hunter2"), "password leaked: {stderr}");
    }
    let output = postbox_command()
        .args(["--config", "/nonexistent/postbox.toml", "migrate"])
        .output()
        .expect("run postbox");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("/nonexistent/postbox.toml"));
}

#[tokio::test]
async fn unreachable_postgres_is_retried_and_named_without_the_password() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let child = postbox_command()
        .arg("run")
        .env(
            "DATABASE_URL",
            format!("postgres://app:hunter2@127.0.0.1:{port}/app"),
        )
        .env("AMQP_URL", amqp_url())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn postbox run");
    // Still running after several attempts: read stderr until two failures are logged. The
    // reader keeps draining until the process exits, so the pipe never closes under it.
    let mut child = child;
    let mut stderr = child.stderr.take().expect("stderr");
    let (chunks_tx, chunks) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stderr.read(&mut buf) {
            let _ = chunks_tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    let mut seen = String::new();
    wait_until(
        "two logged connection failures",
        Duration::from_secs(30),
        || {
            seen.extend(chunks.try_iter());
            let done = seen.matches("postgres: failed").count() >= 2;
            async move { done.then_some(()) }
        },
    )
    .await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "postbox exited instead of retrying: {seen}"
    );
    assert!(seen.matches("postgres: failed").count() >= 2, "{seen}");
    assert!(
        seen.contains(&format!("127.0.0.1:{port}")),
        "names the server: {seen}"
    );
    assert!(!seen.contains("hunter2"), "password leaked: {seen}");
    sigterm(&child);
    let (code, _) = finish(child, Duration::from_secs(30)).await;
    reader.join().expect("reader");
    assert_eq!(code, Some(0), "{seen}");
}

#[tokio::test]
async fn sigterm_mid_stream_loses_nothing() {
    let Stage {
        db,
        rabbit: _rabbit,
        queue,
        mut inbox,
    } = Stage::start().await;
    const ROWS: usize = 20_000;
    let messages: Vec<postbox::Message> = (0..ROWS)
        .map(|n| postbox::Message::text(&queue, n.to_string()))
        .collect();
    let enqueued = postbox::enqueue_many(&db.pool, &messages)
        .await
        .expect("backlog");
    let committed: HashSet<String> = enqueued.iter().map(|e| e.message_id.to_string()).collect();

    let spawn = || {
        postbox_command()
            .arg("run")
            .env("DATABASE_URL", &db.url)
            .env("AMQP_URL", amqp_url())
            .env("POSTBOX_RELAY__BATCH_SIZE", "200")
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn postbox run")
    };
    let first = spawn();
    wait_until(
        "the relay to be mid-stream",
        Duration::from_secs(60),
        || async { (db.count("published_at is not null").await > 0).then_some(()) },
    )
    .await;
    sigterm(&first);
    let (code, stderr) = finish(first, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{stderr}");
    let published_by_first = db.count("published_at is not null").await;
    println!("first relay published {published_by_first} of {ROWS} before SIGTERM");
    assert!(
        db.count("published_at is null").await > 0,
        "the relay finished everything before the signal; the test did not stop it mid-stream"
    );

    // Whatever the first relay marked has arrived; a second relay delivers the rest.
    let second = spawn();
    let received = inbox.until_all(&committed, Duration::from_secs(120)).await;
    let ids: HashSet<String> = received
        .iter()
        .filter_map(|r| r.message_id.clone())
        .collect();
    assert!(ids.is_subset(&committed), "only committed messages arrived");
    println!(
        "delivered {} distinct, {} duplicates",
        ids.len(),
        received.len() - ids.len()
    );
    wait_until("every row marked", Duration::from_secs(60), || async {
        (db.count("published_at is null").await == 0).then_some(())
    })
    .await;
    sigterm(&second);
    let (code, stderr) = finish(second, Duration::from_secs(60)).await;
    assert_eq!(code, Some(0), "{stderr}");
}

#[tokio::test]
async fn a_closed_or_full_stderr_does_not_crash_the_relay() {
    // A "database" that hangs up on every connection, counting the attempts.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = attempts.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    // /dev/full fails every write: each log line the relay tries to write is lost.
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("open /dev/full");
    let mut child = postbox_command()
        .arg("run")
        .env(
            "DATABASE_URL",
            format!("postgres://app@127.0.0.1:{port}/app"),
        )
        .env("AMQP_URL", amqp_url())
        .stderr(Stdio::from(full))
        .spawn()
        .expect("spawn postbox run");
    // Three attempts means it logged (into the void) at least two failures and carried on.
    wait_until("three connection attempts", Duration::from_secs(30), || {
        let n = attempts.load(std::sync::atomic::Ordering::SeqCst);
        async move { (n >= 3).then_some(()) }
    })
    .await;
    assert!(
        child.try_wait().expect("try_wait").is_none(),
        "postbox exited"
    );
    sigterm(&child);
    let (code, _) = finish(child, Duration::from_secs(30)).await;
    assert_eq!(code, Some(0));
}
