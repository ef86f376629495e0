//! Accepting connections within the process's file-descriptor budget.
//!
//! Every accepted connection costs a file descriptor. A server that accepts until `accept(2)`
//! fails with `EMFILE` has nothing left for its store, its logs or its health probe, and tonic's
//! accept loop retries a failing `accept` at once, so it spins. Here each listener accepts only
//! while it holds a connection slot: the slots are a share of `RLIMIT_NOFILE`, and past them new
//! connections wait in the kernel's backlog. The HTTP listener (health probes, metrics) has a few
//! slots of its own on top, so `/healthz` answers when idle gRPC clients hold every other slot.
//! An `accept` that fails anyway backs off (5 ms doubling to 1 s) instead of retrying at once.
//!
//! Past the budget: one address holds at most `connections_per_address` connections (more are
//! closed at once), a connection that sends no first request within its deadline is closed, and
//! with `[server.tls]` the handshake runs on its own task under that same deadline, so that a
//! client that stalls mid-handshake delays nobody else's accept.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

use crate::tls::{PeerCert, Tls};

/// Descriptors kept out of the connection budget: the store, logs, outgoing calls.
const KEPT_BACK: usize = 64;
/// Slots only the HTTP listener may use when every shared one is taken.
pub const HTTP_RESERVE: usize = 8;

/// The soft `RLIMIT_NOFILE`, raised to the hard limit first (as Go's runtime does: the soft limit
/// of 1,024 that many systems start processes with is a historical default, not a decision).
pub fn raise_nofile_limit() -> usize {
    // SAFETY: getrlimit/setrlimit write to and read from the struct passed, nothing else.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max.min(1 << 20),
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = raised.rlim_cur;
            }
        }
        lim.rlim_cur as usize
    }
}

/// Connection slots shared by the server's listeners, from a descriptor limit.
#[derive(Clone, Debug)]
pub struct Budget {
    shared: Arc<Semaphore>,
    http_reserve: Arc<Semaphore>,
    pub capacity: usize,
    /// Connections held per remote address (an address leaves the map with its last one).
    by_address: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    per_address: usize,
}

/// The address a connection counts against: an IPv4 address (an IPv4-mapped IPv6 one as the
/// IPv4 it is), or an IPv6 address's /64 (one host commonly holds a whole /64).
fn address_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// The default of [`Budget::per_address`]: far above what one client or proxy opens.
pub const CONNECTIONS_PER_ADDRESS: usize = 1024;

impl Budget {
    /// Three quarters of what the limit leaves after [`KEPT_BACK`], at least 16.
    pub fn from_limit(nofile: usize) -> Self {
        let capacity = (nofile.saturating_sub(KEPT_BACK) * 3 / 4).max(16);
        Self {
            shared: Arc::new(Semaphore::new(capacity)),
            http_reserve: Arc::new(Semaphore::new(HTTP_RESERVE)),
            capacity,
            by_address: Arc::default(),
            per_address: CONNECTIONS_PER_ADDRESS,
        }
    }

    /// At most `n` connections from one address at once, across both listeners.
    pub fn per_address(mut self, n: usize) -> Self {
        self.per_address = n.max(1);
        self
    }

    /// A place for one more connection from `ip`, unless it holds its share already.
    fn admit(&self, ip: IpAddr) -> Option<AddressSlot> {
        let ip = address_key(ip);
        let mut map = self.by_address.lock().expect("not poisoned");
        let n = map.entry(ip).or_insert(0);
        if *n >= self.per_address {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            map: self.by_address.clone(),
            ip,
        })
    }

    /// Connections held now, shared and reserved slots together.
    pub fn in_use(&self) -> usize {
        self.capacity - self.shared.available_permits() + HTTP_RESERVE
            - self.http_reserve.available_permits()
    }
}

/// One listener under a [`Budget`].
pub struct Acceptor {
    listener: TcpListener,
    budget: Budget,
    /// May use the HTTP reserve.
    http: bool,
    name: &'static str,
    backoff: Duration,
    /// How long a new connection may take to send its first request's headers (HTTP) or the
    /// HTTP/2 preface (gRPC) before it is closed.
    first_request: Duration,
}

/// The default of [`Acceptor::first_request_within`].
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

impl Acceptor {
    pub fn new(listener: TcpListener, budget: Budget, name: &'static str, http: bool) -> Self {
        Self {
            listener,
            budget,
            http,
            name,
            backoff: Duration::ZERO,
            first_request: FIRST_REQUEST_TIMEOUT,
        }
    }

    /// Close a connection that has not sent its first request's headers (HTTP/1) or the HTTP/2
    /// preface within `limit` of being accepted: one that connects and then sends nothing, or
    /// its headers a byte at a time, holds a slot of the connection budget for nothing. (It reads
    /// the plaintext: under TLS it belongs above the TLS layer.)
    pub fn first_request_within(mut self, limit: Duration) -> Self {
        self.first_request = limit;
        self
    }

    async fn slot(&self) -> OwnedSemaphorePermit {
        let shared = self.budget.shared.clone();
        if let Ok(p) = shared.clone().try_acquire_owned() {
            return p;
        }
        if !self.http {
            return shared.acquire_owned().await.expect("never closed");
        }
        let reserve = self.budget.http_reserve.clone();
        tokio::select! {
            p = shared.acquire_owned() => p.expect("never closed"),
            p = reserve.acquire_owned() => p.expect("never closed"),
        }
    }

    /// The next connection, holding its slot until it is dropped.
    pub async fn next(&mut self) -> (Conn, SocketAddr) {
        loop {
            let slot = self.slot().await;
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    self.backoff = Duration::ZERO;
                    let Some(address) = self.budget.admit(addr.ip()) else {
                        metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "listener" => self.name)
                            .increment(1);
                        tracing::debug!(listener = self.name, %addr, limit = self.budget.per_address,
                            "closing a connection: its address holds [server.limits] connections_per_address");
                        continue;
                    };
                    // Small frames must not wait for Nagle's algorithm and the peer's delayed ACK.
                    let _ = stream.set_nodelay(true);
                    let conn = Conn {
                        stream,
                        remote: addr,
                        _slot: slot,
                        _address: address,
                        _gauge: Gauge::new(self.name),
                        deadline: tokio::time::Instant::now() + self.first_request,
                    };
                    return (conn, addr);
                }
                // The peer gave up while queued: nothing wrong here.
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    drop(slot);
                    self.backoff =
                        (self.backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                    metrics::counter!(crate::metrics::ACCEPT_ERRORS, "listener" => self.name)
                        .increment(1);
                    if self.backoff >= Duration::from_secs(1)
                        || self.backoff <= Duration::from_millis(5)
                    {
                        tracing::warn!(listener = self.name, error = %e, retry_in = ?self.backoff, connections = self.budget.in_use(),
                            "cannot accept connections (out of file descriptors? raise `ulimit -n`)");
                    }
                    tokio::time::sleep(self.backoff).await;
                }
            }
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Accept on a task of its own until the returned [`Incoming`] is dropped, with a TLS
    /// handshake per connection (on its own task, within the connection's first-request
    /// deadline) when `tls` is given.
    pub fn incoming(mut self, tls: Option<Arc<Tls>>) -> Incoming {
        let local = self.listener.local_addr();
        let (tx, rx) = mpsc::channel(64);
        let name = self.name;
        tokio::spawn(async move {
            loop {
                let (conn, _) = tokio::select! {
                    c = self.next() => c,
                    _ = tx.closed() => return,
                };
                match &tls {
                    None => {
                        if tx.send(Io::plain(conn)).await.is_err() {
                            return;
                        }
                    }
                    Some(tls) => {
                        let acceptor = tls.acceptor();
                        let tx = tx.clone();
                        tokio::spawn(async move {
                            let deadline = conn.deadline;
                            let remote = conn.remote;
                            match tokio::time::timeout_at(deadline, acceptor.accept(conn)).await {
                                Ok(Ok(stream)) => {
                                    let _ = tx.send(Io::tls(stream, deadline)).await;
                                }
                                failed => {
                                    metrics::counter!(crate::metrics::TLS_HANDSHAKE_FAILURES, "listener" => name)
                                        .increment(1);
                                    let why = match failed {
                                        Ok(Err(e)) => e.to_string(),
                                        _ => "did not finish in time".into(),
                                    };
                                    tracing::debug!(listener = name, %remote, error = %why, "TLS handshake failed");
                                }
                            }
                        });
                    }
                }
            }
        });
        Incoming { rx, local }
    }
}

/// Connections ready to serve (handshaken, under TLS), from [`Acceptor::incoming`].
pub struct Incoming {
    rx: mpsc::Receiver<Io>,
    local: io::Result<SocketAddr>,
}

impl Incoming {
    /// The connections as the stream tonic serves.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Io, io::Error>> + Send {
        futures::stream::unfold(self, |mut i| async move {
            let io = i.rx.recv().await?;
            Some((Ok(io), i))
        })
    }
}

impl axum::serve::Listener for Incoming {
    type Io = Io;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Io, SocketAddr) {
        match self.rx.recv().await {
            Some(io) => {
                let remote = io.info.remote;
                (io, remote)
            }
            // The accept task ended (the runtime is going down): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
        }
    }
}

/// What a request's handler may know of its connection: the remote address and, under mutual
/// TLS, the client's verified certificate. (tonic puts it in every request's extensions; axum
/// as `ConnectInfo<ConnInfo>`.)
#[derive(Clone, Debug)]
pub struct ConnInfo {
    pub remote: SocketAddr,
    pub peer: Option<Arc<PeerCert>>,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Incoming>>
    for ConnInfo
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Incoming>) -> Self {
        stream.io().info.clone()
    }
}

/// One remote address's share of the connections, given back on drop.
struct AddressSlot {
    map: Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.map.lock().expect("not poisoned");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// Counts a listener's open connections in `cascade_connections`.
struct Gauge(metrics::Gauge);

impl Gauge {
    fn new(listener: &'static str) -> Self {
        let g = metrics::gauge!(crate::metrics::CONNECTIONS, "listener" => listener);
        g.increment(1.0);
        Self(g)
    }
}

impl Drop for Gauge {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// An accepted connection, holding its slots.
pub struct Conn {
    stream: TcpStream,
    remote: SocketAddr,
    _slot: OwnedSemaphorePermit,
    _address: AddressSlot,
    _gauge: Gauge,
    /// When its first request (and, under TLS, its handshake) must be in.
    deadline: tokio::time::Instant,
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

enum Inner {
    Plain(Conn),
    Tls(Box<tokio_rustls::server::TlsStream<Conn>>),
}

/// A connection as the servers read it: plaintext or TLS, closed if its first request's headers
/// (the plaintext, above TLS) are not in by its deadline.
pub struct Io {
    inner: Inner,
    info: ConnInfo,
    /// Until its first request is in: the deadline, and what has arrived of it.
    first: Option<First>,
}

impl Io {
    fn plain(conn: Conn) -> Self {
        let first = First::until(conn.deadline);
        Self {
            info: ConnInfo {
                remote: conn.remote,
                peer: None,
            },
            inner: Inner::Plain(conn),
            first: Some(first),
        }
    }

    fn tls(stream: tokio_rustls::server::TlsStream<Conn>, deadline: tokio::time::Instant) -> Self {
        let (conn, session) = stream.get_ref();
        let peer = session
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(|leaf| PeerCert::from_der(leaf.as_ref()))
            .map(Arc::new);
        Self {
            info: ConnInfo {
                remote: conn.remote,
                peer,
            },
            inner: Inner::Tls(Box::new(stream)),
            first: Some(First::until(deadline)),
        }
    }
}

struct First {
    deadline: Pin<Box<tokio::time::Sleep>>,
    seen: Seen,
}

/// What has arrived of a connection's first request: the bytes so far, and the last three (an
/// HTTP/1 request's headers end at the first blank line, `\r\n\r\n`).
#[derive(Default)]
struct Seen {
    bytes: usize,
    tail: [u8; 3],
}

impl Seen {
    /// Take in `data`; whether the first request's headers are in. The HTTP/2 client preface
    /// (`PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`) holds a blank line too, so one rule serves both.
    fn take(&mut self, data: &[u8]) -> bool {
        let mut window: Vec<u8> = Vec::with_capacity(3 + data.len());
        window.extend_from_slice(&self.tail[3 - self.bytes.min(3)..]);
        window.extend_from_slice(data);
        self.bytes += data.len();
        let n = window.len();
        self.tail[3 - n.min(3)..].copy_from_slice(&window[n - n.min(3)..]);
        window.windows(4).any(|w| w == b"\r\n\r\n")
    }
}

impl First {
    fn until(deadline: tokio::time::Instant) -> Self {
        Self {
            deadline: Box::pin(tokio::time::sleep_until(deadline)),
            seen: Seen::default(),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(first) = &mut this.first
            && first.deadline.as_mut().poll(cx).is_ready()
        {
            metrics::counter!(crate::metrics::SLOW_CONNECTIONS).increment(1);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the first request did not arrive in time",
            )));
        }
        let before = buf.filled().len();
        let read = match &mut this.inner {
            Inner::Plain(c) => Pin::new(c).poll_read(cx, buf),
            Inner::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        };
        if let (Poll::Ready(Ok(())), Some(first)) = (&read, &mut this.first)
            && first.seen.take(&buf.filled()[before..])
        {
            this.first = None;
        }
        read
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(c) => Pin::new(c).poll_write(cx, buf),
            Inner::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(c) => Pin::new(c).poll_flush(cx),
            Inner::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(c) => Pin::new(c).poll_shutdown(cx),
            Inner::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(c) => Pin::new(c).poll_write_vectored(cx, bufs),
            Inner::Tls(t) => Pin::new(t.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(c) => c.is_write_vectored(),
            Inner::Tls(t) => t.is_write_vectored(),
        }
    }
}

impl tonic::transport::server::Connected for Io {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_request_is_in_at_its_blank_line_however_it_is_cut() {
        let whole = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        for cut in 1..whole.len() {
            let mut seen = Seen::default();
            let mut done = false;
            for chunk in whole.chunks(cut) {
                done = seen.take(chunk);
            }
            assert!(done, "cut every {cut} bytes");
        }
        let mut seen = Seen::default();
        assert!(!seen.take(b"GET / HTTP/1.1\r\nHost: x\r\n"));
        assert!(seen.take(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
        assert!(!Seen::default().take(b"\r\n\r"));
    }

    #[test]
    fn ipv6_counts_by_its_64_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(address_key(a), address_key(b));
        assert_ne!(address_key(a), address_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.7".parse().unwrap();
        assert_eq!(address_key(mapped), "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_budget_leaves_room_and_has_a_floor() {
        assert_eq!(Budget::from_limit(256).capacity, 144);
        assert_eq!(Budget::from_limit(1024).capacity, 720);
        assert_eq!(Budget::from_limit(10).capacity, 16);
    }

    /// With every shared slot held, the gRPC listener leaves a new connection in the backlog and
    /// the HTTP listener still takes one on its reserve.
    #[tokio::test]
    async fn past_the_budget_connections_wait_and_http_has_a_reserve() {
        let budget = Budget::from_limit(0);
        let held: Vec<_> = (0..budget.capacity)
            .map(|_| budget.shared.clone().try_acquire_owned().unwrap())
            .collect();
        let grpc = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ga, ha) = (grpc.local_addr().unwrap(), http.local_addr().unwrap());
        let mut grpc = Acceptor::new(grpc, budget.clone(), "grpc", false);
        let mut http = Acceptor::new(http, budget.clone(), "http", true);
        let _c1 = TcpStream::connect(ga).await.unwrap();
        let _c2 = TcpStream::connect(ha).await.unwrap();
        let waited = tokio::time::timeout(Duration::from_millis(200), grpc.next()).await;
        assert!(waited.is_err(), "no slot: the connection waits");
        let (conn, _) = tokio::time::timeout(Duration::from_secs(5), http.next())
            .await
            .expect("the HTTP reserve takes it");
        assert_eq!(budget.in_use(), budget.capacity + 1);
        drop(conn);
        drop(held);
        tokio::time::timeout(Duration::from_secs(5), grpc.next())
            .await
            .expect("a freed slot lets it in");
    }
}
