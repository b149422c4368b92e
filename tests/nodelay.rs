//! TCP_NODELAY on Postgres connections: sqlx 0.9.0 left Nagle's algorithm on, and a statement
//! sent in several writes then waited ~40 ms for the server's delayed ACK. postbox requires a
//! sqlx that sets it (0.9.1), so an application's ordinary pool is fast with postbox.

mod common;

use common::TestDb;
/// Whether the process's TCP socket with local port `port` has TCP_NODELAY set.
fn nodelay_on_local_port(port: u16) -> Option<bool> {
    use nix::sys::socket::{getsockname, getsockopt, sockopt, SockaddrStorage};
    use std::os::fd::{BorrowedFd, RawFd};
    for entry in std::fs::read_dir("/proc/self/fd").ok()?.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        else {
            continue;
        };
        let Ok(address) = getsockname::<SockaddrStorage>(fd) else {
            continue;
        };
        if address.as_sockaddr_in().map(|a| a.port()) == Some(port) {
            // SAFETY: borrowed for one getsockopt call while the pool keeps the socket open.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            return getsockopt(&fd, sockopt::TcpNoDelay).ok();
        }
    }
    None
}

#[tokio::test]
async fn postgres_connections_send_without_nagle_delay() {
    let db = TestDb::migrated().await;
    let client_port = |port: i32| u16::try_from(port).expect("a TCP port");
    // An application's ordinary pool (the test's own) and the relay's.
    let relay_pool = postbox::testing::store::connect(&db.settings(), 1)
        .await
        .expect("relay pool");
    for pool in [&db.pool, &relay_pool] {
        let port: i32 = sqlx::query_scalar("select inet_client_port()")
            .fetch_one(pool)
            .await
            .expect("client port");
        assert_eq!(nodelay_on_local_port(client_port(port)), Some(true));
    }
}
