//! TCP_NODELAY on Postgres connections.
//!
//! sqlx 0.9.0 stopped disabling Nagle's algorithm on its TCP sockets (sqlx issue #4335, fixed
//! upstream by PR #4336 but not yet released). With Nagle on, a statement whose messages leave
//! the client in more than one write waits for the server's delayed ACK: ~40 ms per statement,
//! measured here as the inbox batch claim running 3× slower over TCP than over a Unix socket.
//! Until a fixed sqlx ships, every connection postbox opens gets TCP_NODELAY here, after connect.
//! Remove this module when upgrading to a sqlx that sets it itself.

use sqlx::PgConnection;

/// Sets TCP_NODELAY on `conn`'s socket (no-op for Unix sockets and on non-Linux systems).
/// Use it as a pool's `after_connect` hook for pools you build yourself:
///
/// ```no_run
/// # async fn example() -> Result<(), sqlx::Error> {
/// let pool = sqlx::postgres::PgPoolOptions::new()
///     .after_connect(|conn, _| Box::pin(postbox::store::tcp_nodelay(conn)))
///     .connect("postgres://postgres@127.0.0.1/app")
///     .await?;
/// # Ok(()) }
/// ```
pub async fn tcp_nodelay(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    // The server sees our end of the connection as its client port: that identifies our
    // socket among the process's file descriptors.
    let port: Option<i32> = sqlx::query_scalar("select inet_client_port()")
        .fetch_one(conn)
        .await?;
    if let Some(port) = port.and_then(|p| u16::try_from(p).ok()) {
        set_on_local_port(port);
    }
    Ok(())
}

#[cfg(target_os = "linux")]
fn set_on_local_port(port: u16) {
    use std::os::fd::{BorrowedFd, RawFd};

    use nix::sys::socket::{getsockname, setsockopt, sockopt, SockaddrStorage};

    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in entries.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<RawFd>().ok())
        else {
            continue;
        };
        let Ok(address) = getsockname::<SockaddrStorage>(fd) else {
            continue;
        };
        let local_port = address
            .as_sockaddr_in()
            .map(|a| a.port())
            .or_else(|| address.as_sockaddr_in6().map(|a| a.port()));
        if local_port == Some(port) {
            // SAFETY: the descriptor is only borrowed for one setsockopt call. Should it have
            // been closed since it was listed, the call fails with EBADF and is ignored; a
            // descriptor reused meanwhile with this very local port is this connection again.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Err(error) = setsockopt(&fd, sockopt::TcpNoDelay, &true) {
                tracing::debug!(%error, "could not set TCP_NODELAY on a Postgres socket");
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn set_on_local_port(_port: u16) {}
