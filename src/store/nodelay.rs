//! TCP_NODELAY on Postgres connections.
//!
//! sqlx 0.9.0 stopped disabling Nagle's algorithm on its TCP sockets (sqlx issue #4335, fixed
//! upstream by PR #4336 but not yet released). With Nagle on, a statement whose messages leave
//! the client in more than one write waits for the server's delayed ACK: ~40 ms per statement,
//! measured here as the inbox batch claim running 3× slower over TCP than over a Unix socket.
//! Until a fixed sqlx ships, every connection postbox opens gets TCP_NODELAY here, after connect.
//! Remove this module when upgrading to a sqlx that sets it itself (the test
//! `relay_connections_send_without_nagle_delay` notices).

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// Adds a hook to `pool` that sets TCP_NODELAY on each new connection to the server `connect`
/// points at (Linux; elsewhere, and over Unix sockets, it changes nothing). It sends no
/// statement: it finds the process's sockets connected to the server's port.
///
/// ```no_run
/// # async fn example() -> Result<(), sqlx::Error> {
/// use std::str::FromStr;
/// let connect = sqlx::postgres::PgConnectOptions::from_str("postgres://postgres@127.0.0.1/app")?;
/// let pool = postbox::store::without_nagle(sqlx::postgres::PgPoolOptions::new(), &connect)
///     .connect_with(connect)
///     .await?;
/// # Ok(()) }
/// ```
pub fn without_nagle(pool: PgPoolOptions, connect: &PgConnectOptions) -> PgPoolOptions {
    let port = connect.get_port();
    pool.after_connect(move |_, _| {
        Box::pin(async move {
            set_on_peer_port(port);
            Ok(())
        })
    })
}

#[cfg(target_os = "linux")]
fn set_on_peer_port(port: u16) {
    use std::os::fd::{BorrowedFd, RawFd};

    use nix::sys::socket::{getpeername, setsockopt, sockopt, SockaddrStorage};

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
        let Ok(address) = getpeername::<SockaddrStorage>(fd) else {
            continue;
        };
        let peer_port = address
            .as_sockaddr_in()
            .map(|a| a.port())
            .or_else(|| address.as_sockaddr_in6().map(|a| a.port()));
        // Every TCP connection to that port: the new one, and any other Postgres connection
        // of the process, which is just as well off without Nagle.
        if peer_port == Some(port) {
            // SAFETY: the descriptor is only borrowed for one setsockopt call. Should it have
            // been closed since it was listed, the call fails with EBADF and is ignored.
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            if let Err(error) = setsockopt(&fd, sockopt::TcpNoDelay, &true) {
                tracing::debug!(%error, "could not set TCP_NODELAY on a Postgres socket");
            }
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn set_on_peer_port(_port: u16) {}
