//! A long-lived TCP "stream" server for backends and its client: the server
//! greets every connection with its name and a newline, then echoes
//! everything it reads until the peer closes. Used to hold connections open
//! across daemon restarts and drains, and to see which backend holds each.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::{clients::CLIENT_TIMEOUT, netns::Netns, servers::wait_readable};

/// How often the server's threads check whether they were asked to stop.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The longest one served connection lives (a bound, far above any test).
const MAX_CONN_LIFETIME: Duration = Duration::from_secs(300);
/// The longest greeting line read.
const MAX_GREETING: usize = 64;

/// A TCP server that writes `{name}\n` to every new connection, then echoes
/// what it reads until the peer closes. Stops (closing every connection)
/// when dropped.
#[derive(Debug)]
pub struct StreamServer {
    port: u16,
    name: String,
    stop: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl StreamServer {
    /// Listens on `0.0.0.0:port` inside `ns`, greeting with `name`. Panics
    /// if the port cannot be bound.
    pub fn start(ns: &Netns, port: u16, name: &str) -> StreamServer {
        let listener = ns
            .run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)))
            .unwrap_or_else(|e| {
                panic!(
                    "stream server {name}: binding 0.0.0.0:{port} in {}: {e}",
                    ns.name()
                )
            });
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, accepted, name) = (stop.clone(), accepted.clone(), name.to_owned());
            thread::Builder::new()
                .name(format!("stream-{name}"))
                .spawn(move || accept_loop(listener, &name, &stop, &accepted))
                .expect("spawning the stream acceptor")
        };
        StreamServer {
            port,
            name: name.to_owned(),
            stop,
            accepted,
            acceptor: Some(acceptor),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its name (the greeting).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many connections it accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

fn accept_loop(listener: TcpListener, name: &str, stop: &Arc<AtomicBool>, accepted: &AtomicUsize) {
    let conns: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(listener.as_raw_fd(), POLL_INTERVAL) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _peer)) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                let (owned, stop) = (name.to_owned(), stop.clone());
                let spawned = thread::Builder::new()
                    .name(format!("stream-{name}-conn"))
                    .spawn(move || {
                        if let Err(e) = serve(stream, &owned, &stop) {
                            eprintln!("stream server {owned}: connection ended: {e}");
                        }
                    });
                match spawned {
                    Ok(h) => {
                        let mut all = conns.lock().unwrap_or_else(|p| p.into_inner());
                        all.retain(|h| !h.is_finished());
                        all.push(h);
                    }
                    Err(e) => eprintln!("stream server {name}: cannot spawn: {e}"),
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                eprintln!("stream server {name}: accept: {e}");
                thread::sleep(POLL_INTERVAL);
            }
        }
    }
    // Each connection thread sees `stop` within POLL_INTERVAL.
    for h in conns.into_inner().unwrap_or_else(|p| p.into_inner()) {
        let _ = h.join();
    }
}

fn serve(mut stream: TcpStream, name: &str, stop: &AtomicBool) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(POLL_INTERVAL))?;
    stream.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    stream.write_all(format!("{name}\n").as_bytes())?;
    let end = Instant::now() + MAX_CONN_LIFETIME;
    let mut buf = [0u8; 4096];
    while !stop.load(Ordering::Relaxed) && Instant::now() < end {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => stream.write_all(&buf[..n])?,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// A client connection to a [`StreamServer`] (possibly through a VIP),
/// with the name of the server that greeted it.
#[derive(Debug)]
pub struct StreamConn {
    stream: TcpStream,
    backend: String,
    addr: SocketAddrV4,
}

impl StreamConn {
    /// Connects to `addr` from inside `ns` and reads the greeting. Every
    /// socket operation is bounded by [`CLIENT_TIMEOUT`].
    pub fn connect(ns: &Netns, addr: SocketAddrV4) -> Result<StreamConn, String> {
        ns.run(|| StreamConn::connect_here(addr))
    }

    /// [`StreamConn::connect`] from the calling thread's namespace.
    pub fn connect_here(addr: SocketAddrV4) -> Result<StreamConn, String> {
        let mut stream = TcpStream::connect_timeout(&addr.into(), CLIENT_TIMEOUT)
            .map_err(|e| format!("connect {addr}: {e}"))?;
        stream
            .set_read_timeout(Some(CLIENT_TIMEOUT))
            .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
            .and_then(|()| stream.set_nodelay(true))
            .map_err(|e| format!("socket options: {e}"))?;
        let mut greeting = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            match stream.read(&mut byte) {
                Ok(0) => return Err(format!("{addr}: closed before its greeting ({greeting:?})")),
                Ok(_) if byte[0] == b'\n' => break,
                Ok(_) if greeting.len() >= MAX_GREETING => {
                    return Err(format!("{addr}: greeting too long ({greeting:?})"))
                }
                Ok(_) => greeting.push(byte[0]),
                Err(e) => return Err(format!("{addr}: reading the greeting: {e}")),
            }
        }
        Ok(StreamConn {
            stream,
            backend: String::from_utf8_lossy(&greeting).into_owned(),
            addr,
        })
    }

    /// The name of the server that greeted this connection.
    pub fn backend(&self) -> &str {
        &self.backend
    }

    /// The client's own address (its source port).
    pub fn local_addr(&self) -> Result<std::net::SocketAddr, String> {
        self.stream
            .local_addr()
            .map_err(|e| format!("local address: {e}"))
    }

    /// Sends `payload` and reads it back, checking it came back unchanged.
    pub fn echo(&mut self, payload: &[u8]) -> Result<(), String> {
        let addr = self.addr;
        self.stream
            .write_all(payload)
            .map_err(|e| format!("send to {addr}: {e}"))?;
        let mut back = vec![0u8; payload.len()];
        self.stream
            .read_exact(&mut back)
            .map_err(|e| format!("reading the echo from {addr}: {e}"))?;
        if back != payload {
            return Err(format!("{addr} echoed {back:?} for {payload:?}"));
        }
        Ok(())
    }
}
