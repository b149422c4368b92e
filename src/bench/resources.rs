//! Where the CPU and memory go during a case: this process (the relay, plus the bench's light
//! load generation), Postgres and RabbitMQ, read from `/proc` (Linux; elsewhere nothing is
//! reported).

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

/// CPU shares (100 % = one core) and the largest resident set seen during a case.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    pub bench_cpu: f64,
    pub bench_rss_mib: f64,
    pub postgres_cpu: f64,
    pub broker_cpu: f64,
}

impl Usage {
    /// "relay 65 % CPU, 30 MiB; Postgres 50 %; RabbitMQ 70 %"
    pub fn describe(&self) -> String {
        format!(
            "bench process (relay) {:.0} % CPU, max RSS {:.0} MiB; Postgres {:.0} %; RabbitMQ {:.0} %",
            self.bench_cpu, self.bench_rss_mib, self.postgres_cpu, self.broker_cpu
        )
    }
}

/// Samples until `stop` is cancelled, then returns the averages over the whole span.
pub(crate) async fn sample(stop: CancellationToken) -> Usage {
    let start = Instant::now();
    let first = Ticks::read();
    let mut rss: f64 = 0.0;
    loop {
        rss = rss.max(own_rss_mib());
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    let last = Ticks::read();
    let seconds = start.elapsed().as_secs_f64().max(1e-3);
    // Linux reports CPU time in clock ticks of 1/100 s (USER_HZ) on every common platform.
    let share = |before: u64, after: u64| (after.saturating_sub(before)) as f64 / seconds;
    Usage {
        bench_cpu: share(first.own, last.own),
        bench_rss_mib: rss,
        postgres_cpu: share(first.postgres, last.postgres),
        broker_cpu: share(first.broker, last.broker),
    }
}

/// CPU ticks (user + system) so far.
struct Ticks {
    own: u64,
    postgres: u64,
    broker: u64,
}

impl Ticks {
    fn read() -> Self {
        let mut ticks = Ticks {
            own: cpu_ticks("self").map_or(0, |(_, t)| t),
            postgres: 0,
            broker: 0,
        };
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return ticks;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(pid) = name
                .to_str()
                .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
            else {
                continue;
            };
            match cpu_ticks(pid) {
                Some((comm, t)) if comm == "postgres" => ticks.postgres += t,
                Some((comm, t)) if comm.starts_with("beam") => ticks.broker += t,
                _ => {}
            }
        }
        ticks
    }
}

/// `(command name, utime + stime)` of a process from `/proc/<pid>/stat`. Processes that ended
/// between two samples drop out, which only under-counts short-lived helpers.
fn cpu_ticks(pid: &str) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    // after the name: state is field 3; utime and stime are fields 14 and 15
    let fields: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn own_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
