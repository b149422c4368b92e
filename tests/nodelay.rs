//! TCP_NODELAY on postbox's Postgres connections. A test binary of its own: the hook sets the
//! option on every socket of the process connected to the server, so another test's relay
//! running beside it in the same process would change what this one observes.

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
async fn relay_connections_send_without_nagle_delay() {
    let db = TestDb::migrated().await;
    let client_port = |port: i32| u16::try_from(port).expect("a TCP port");
    // The test's own pool shows the sqlx default this works around: if this starts failing,
    // sqlx sets TCP_NODELAY again and store/nodelay.rs can go.
    let port: i32 = sqlx::query_scalar("select inet_client_port()")
        .fetch_one(&db.pool)
        .await
        .expect("client port");
    assert_eq!(nodelay_on_local_port(client_port(port)), Some(false));

    let pool = postbox::store::connect(&db.settings(), 1)
        .await
        .expect("relay pool");
    let port: i32 = sqlx::query_scalar("select inet_client_port()")
        .fetch_one(&pool)
        .await
        .expect("client port");
    assert_eq!(nodelay_on_local_port(client_port(port)), Some(true));
}
