//! A relay for tests: in this process (`RunningRelay`, with `Stage` and `Harness` setups) or as a
//! `postbox run` child process (`RelayProcess`).

use std::process::Command;
use std::time::Duration;

use postbox::Settings;
use uuid::Uuid;

use super::*;

/// A relay running in this process.
pub struct RunningRelay {
    handle: postbox::relay::RelayHandle,
    pub stats: std::sync::Arc<postbox::relay::Stats>,
    pub health: std::sync::Arc<postbox::relay::Health>,
}

impl RunningRelay {
    /// Starts a relay with `settings` (the schema must exist).
    pub async fn start(settings: Settings) -> Self {
        // The relay's warnings show up in a failing test's output.
        postbox::telemetry::init();
        let relay = settings
            .connect_relay()
            .await
            .expect("relay connects to Postgres");
        let health = relay.health();
        let handle = relay.spawn();
        let stats = handle.stats();
        Self {
            handle,
            stats,
            health,
        }
    }

    /// Graceful stop; waits until every stage has ended.
    pub async fn stop(self) {
        tokio::time::timeout(Duration::from_secs(30), self.handle.stop())
            .await
            .expect("relay stops within 30s")
            .expect("relay task did not panic");
    }
}

/// The usual setup for a test that starts its own relays: a migrated database and a queue of
/// its own with a consumer.
pub struct Stage {
    pub db: TestDb,
    /// Owns the test's exclusive queue.
    pub rabbit: Rabbit,
    pub queue: String,
    pub inbox: Inbox,
}

impl Stage {
    pub async fn start() -> Self {
        let db = TestDb::migrated().await;
        let rabbit = Rabbit::connect().await;
        let queue = rabbit.queue().await;
        let inbox = rabbit.consume(&queue).await;
        Self {
            db,
            rabbit,
            queue,
            inbox,
        }
    }
}

/// The usual test setup: a migrated database, a queue with a consumer, and a relay.
pub struct Harness {
    pub db: TestDb,
    /// Keeps the test's exclusive queue alive.
    pub _rabbit: Rabbit,
    pub queue: String,
    pub inbox: Inbox,
    pub relay: RunningRelay,
}

impl Harness {
    pub async fn start() -> Self {
        let db = TestDb::migrated().await;
        let rabbit = Rabbit::connect().await;
        let queue = rabbit.queue().await;
        let inbox = rabbit.consume(&queue).await;
        let relay = RunningRelay::start(db.settings()).await;
        Self {
            db,
            _rabbit: rabbit,
            queue,
            inbox,
            relay,
        }
    }
}

/// The `postbox` binary built for these tests, with a clean environment for its settings.
pub fn postbox_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_postbox"));
    for (key, _) in std::env::vars() {
        if key.starts_with("POSTBOX_") || key == "DATABASE_URL" || key == "AMQP_URL" {
            command.env_remove(key);
        }
    }
    command.env("RUST_LOG", "postbox=info");
    command
}

/// `postbox run` as a child process, its stderr in a log file under the cargo target's tmp
/// directory (named in panics); killed when dropped.
pub struct RelayProcess {
    child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl RelayProcess {
    /// Starts `postbox run` against `database_url` and the test broker, with `env` on top
    /// (`POSTBOX_RELAY__BATCH_SIZE` and the like).
    pub fn spawn(database_url: &str, env: &[(&str, &str)]) -> Self {
        let log = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("relay-{}.log", Uuid::new_v4().simple()));
        let file = std::fs::File::create(&log).expect("create relay log");
        let mut command = postbox_command();
        command
            .arg("run")
            .env("DATABASE_URL", database_url)
            .env("AMQP_URL", amqp_url())
            .stdout(std::process::Stdio::null())
            .stderr(file);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn postbox run");
        Self { child, log }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).expect("signal the relay");
    }

    /// SIGKILL: no chance to finish or release anything.
    pub fn kill(mut self) {
        self.signal(nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGSTOP: the process hangs with its connections open.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    /// SIGCONT after `pause`.
    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGTERM, then waits up to `deadline` for the exit; returns the exit code.
    pub async fn stop(mut self, deadline: Duration) -> Option<i32> {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let log = self.log.clone();
        let status = wait_until(
            &format!("the relay to exit (log: {log:?})"),
            deadline,
            || {
                let status = self.child.try_wait().expect("try_wait");
                async move { status }
            },
        )
        .await;
        status.code()
    }

    /// The relay's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for RelayProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
