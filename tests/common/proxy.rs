//! A TCP proxy between a client and a real service, for fault injection without touching the
//! shared server: `cut()` drops every open connection (as a crash would), `stall()` holds every
//! byte in both directions until `resume()` or `cut()` (a network partition). In front of Postgres it also counts the statements the client sends:
//! simple-protocol `Query` ('Q') and extended-protocol `Execute` ('E') messages, what actually
//! crosses the wire, so a test can assert how many statements the relay sends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A running proxy; it lives as long as the test's runtime.
pub struct Proxy {
    pub port: u16,
    statements: Arc<AtomicU64>,
    /// Cancelled by `cut()`; connections accepted afterwards get a fresh token.
    generation: Arc<Mutex<CancellationToken>>,
    /// `true` while stalled; forwarding waits for it to turn `false`.
    stalled: tokio::sync::watch::Sender<bool>,
    /// Set by `shut()`: new connections are closed at once, as by a dead host.
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

/// The Postgres flavour: same proxy, statements counted.
pub type PgProxy = Proxy;

impl Proxy {
    /// Listens on a free loopback port and forwards every connection to Postgres at
    /// `upstream` (host:port), counting statements.
    pub async fn start(upstream: String) -> Self {
        Self::listen(upstream, true).await
    }

    /// A plain TCP proxy to `upstream` (RabbitMQ, say).
    pub async fn tcp(upstream: &str) -> Self {
        Self::listen(upstream.to_string(), false).await
    }

    async fn listen(upstream: String, count_statements: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        let statements = Arc::new(AtomicU64::new(0));
        let generation = Arc::new(Mutex::new(CancellationToken::new()));
        let counter = statements.clone();
        let current = generation.clone();
        let (stalled, _) = tokio::sync::watch::channel(false);
        let gate = stalled.clone();
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refuse = refusing.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if refuse.load(Ordering::SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = upstream.clone();
                let counter = count_statements.then(|| counter.clone());
                let cut = current.lock().expect("proxy lock").clone();
                let gate = gate.subscribe();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        tokio::select! {
                            _ = cut.cancelled() => {}
                            _ = pipe(client, server, counter, gate) => {}
                        }
                    }
                });
            }
        });
        Self {
            port,
            statements,
            generation,
            stalled,
            refusing,
        }
    }

    /// Cuts every connection and refuses new ones from now on: the service behind is gone.
    pub fn shut(&self) {
        self.refusing.store(true, Ordering::SeqCst);
        self.cut();
    }

    /// Accepts new connections again after `shut()`: the service is back.
    pub fn reopen(&self) {
        self.refusing.store(false, Ordering::SeqCst);
    }

    /// Holds every byte in flight, both ways, on open and new connections, until `resume()`
    /// or `cut()`: the peers see a silent network, not a closed one.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// Lets held bytes through again.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }

    /// Drops every connection open now; new connections are accepted as before.
    pub fn cut(&self) {
        let mut current = self.generation.lock().expect("proxy lock");
        current.cancel();
        *current = CancellationToken::new();
        self.stalled.send_replace(false);
    }

    /// Statements sent through the proxy so far.
    pub fn statements(&self) -> u64 {
        self.statements.load(Ordering::SeqCst)
    }

    /// `database_url` rewritten to go through the proxy (TLS off, so messages can be read).
    pub fn url_for(&self, database_url: &str) -> String {
        let mut url = url::Url::parse(database_url).expect("database URL parses");
        url.set_port(Some(self.port)).expect("URL takes a port");
        url.query_pairs_mut().append_pair("sslmode", "disable");
        url.to_string()
    }

    /// `url` (an amqp:// URL, say) rewritten to go through the proxy.
    pub fn redirect(&self, url: &str) -> String {
        let mut url = url::Url::parse(url).expect("URL parses");
        url.set_port(Some(self.port)).expect("URL takes a port");
        url.to_string()
    }
}

async fn pipe(
    client: TcpStream,
    server: TcpStream,
    counter: Option<Arc<AtomicU64>>,
    gate: tokio::sync::watch::Receiver<bool>,
) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let mut parser = Parser::default();
    let upstream = forward(client_read, server_write, gate.clone(), |bytes| {
        if let Some(counter) = &counter {
            counter.fetch_add(parser.feed(bytes), Ordering::SeqCst);
        }
    });
    let downstream = forward(server_read, client_write, gate, |_| {});
    tokio::join!(upstream, downstream);
}

/// Copies `from` to `to`, holding each chunk while the gate says stalled.
async fn forward(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut gate: tokio::sync::watch::Receiver<bool>,
    mut inspect: impl FnMut(&[u8]),
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if gate.wait_for(|stalled| !stalled).await.is_err() {
            break;
        }
        inspect(&buf[..n]);
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Splits the client's byte stream into protocol messages. The startup phase has untyped
/// messages (length first); after the StartupMessage every message is a type byte + length.
#[derive(Default)]
struct Parser {
    started: bool,
    pending: Vec<u8>,
}

const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;

impl Parser {
    /// Feeds bytes; returns how many statements they completed.
    fn feed(&mut self, bytes: &[u8]) -> u64 {
        self.pending.extend_from_slice(bytes);
        let mut count = 0;
        loop {
            let header = if self.started { 5 } else { 8 };
            if self.pending.len() < header {
                break;
            }
            let offset = usize::from(self.started);
            let len_bytes: [u8; 4] = self.pending[offset..offset + 4]
                .try_into()
                .expect("slice of 4");
            let total = offset + u32::from_be_bytes(len_bytes) as usize;
            if self.pending.len() < total {
                break;
            }
            if self.started {
                if matches!(self.pending[0], b'Q' | b'E') {
                    count += 1;
                }
            } else {
                let code = u32::from_be_bytes(self.pending[4..8].try_into().expect("slice of 4"));
                self.started = code != SSL_REQUEST && code != GSSENC_REQUEST;
            }
            self.pending.drain(..total);
        }
        count
    }
}
