//! Real kernel servers for backends: an HTTP responder and a UDP echo.
//!
//! Each binds its socket inside a namespace (through [`Netns::run`]) and then
//! serves on ordinary threads; the socket stays in its namespace. Both stop
//! when dropped: their loops wake at least every [`POLL_INTERVAL`] to check.

use std::{
    io::{ErrorKind, Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// How often a server's loop checks whether it was asked to stop.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Largest request head the HTTP server reads.
const MAX_HEAD: usize = 16 * 1024;
/// Per-operation and overall time limit of one HTTP connection.
const CONN_TIMEOUT: Duration = Duration::from_secs(2);

/// A minimal HTTP/1.1 server: answers every request with `200 OK` and its
/// name as the body (or, for a health check path given to
/// [`HttpServer::with_check`], that path's status), then closes the
/// connection. Stops when dropped.
#[derive(Debug)]
pub struct HttpServer {
    port: u16,
    name: String,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    acceptor: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Listens on `0.0.0.0:port` inside `ns` and answers with body `name`.
    /// Panics if the port cannot be bound.
    pub fn start(ns: &Netns, port: u16, name: &str) -> HttpServer {
        let listener = ns.run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
        let listener = listener.unwrap_or_else(|e| {
            panic!(
                "HTTP server {name}: binding 0.0.0.0:{port} in {}: {e}",
                ns.name()
            )
        });
        HttpServer::serve(listener, name)
    }

    /// Like [`HttpServer::start`], but a `GET` of `check_path` is answered
    /// with `status` (e.g. 503: a backend whose health check fails while it
    /// still serves everything else).
    pub fn with_check(
        ns: &Netns,
        port: u16,
        name: &str,
        check_path: &str,
        status: u16,
    ) -> HttpServer {
        let listener = ns.run(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
        let listener = listener.unwrap_or_else(|e| {
            panic!(
                "HTTP server {name}: binding 0.0.0.0:{port} in {}: {e}",
                ns.name()
            )
        });
        HttpServer::serve_checked(listener, name, Some((check_path.to_owned(), status)))
    }

    /// Serves on an already bound `listener` (in whatever namespace it was
    /// created), answering with body `name`.
    pub fn serve(listener: TcpListener, name: &str) -> HttpServer {
        HttpServer::serve_checked(listener, name, None)
    }

    fn serve_checked(
        listener: TcpListener,
        name: &str,
        check: Option<(String, u16)>,
    ) -> HttpServer {
        let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        listener
            .set_nonblocking(true)
            .expect("non-blocking listener");
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let acceptor = {
            let (stop, served, name) = (stop.clone(), served.clone(), name.to_owned());
            thread::Builder::new()
                .name(format!("http-{name}"))
                .spawn(move || accept_loop(listener, &name, check.as_ref(), &stop, &served))
                .expect("spawning the HTTP acceptor")
        };
        HttpServer {
            port,
            name: name.to_owned(),
            stop,
            served,
            acceptor: Some(acceptor),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its name (the body of every answer).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many requests it answered so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// Waits up to `timeout` for `fd` to become readable.
pub(crate) fn wait_readable(fd: i32, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

fn accept_loop(
    listener: TcpListener,
    name: &str,
    check: Option<&(String, u16)>,
    stop: &AtomicBool,
    served: &Arc<AtomicUsize>,
) {
    while !stop.load(Ordering::Relaxed) {
        if !wait_readable(listener.as_raw_fd(), POLL_INTERVAL) {
            continue;
        }
        match listener.accept() {
            Ok((stream, _peer)) => {
                let (owned, served) = (name.to_owned(), served.clone());
                let check = check.cloned();
                let spawned = thread::Builder::new()
                    .name(format!("http-{name}-conn"))
                    .spawn(move || {
                        if answer(stream, &owned, check.as_ref()).is_ok() {
                            served.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                if let Err(e) = spawned {
                    eprintln!("HTTP server {name}: cannot spawn a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => {
                eprintln!("HTTP server {name}: accept: {e}");
                thread::sleep(POLL_INTERVAL);
            }
        }
    }
}

/// Reads one request head (bounded in size and time) and answers it: the
/// check path with its status, anything else `200 OK` with `name`.
fn answer(mut stream: TcpStream, name: &str, check: Option<&(String, u16)>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(CONN_TIMEOUT))?;
    stream.set_write_timeout(Some(CONN_TIMEOUT))?;
    let deadline = Instant::now() + CONN_TIMEOUT;
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 2048];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_HEAD || Instant::now() >= deadline {
            return Err(ErrorKind::InvalidData.into());
        }
        match stream.read(&mut buf)? {
            0 => return Err(ErrorKind::UnexpectedEof.into()),
            n => head.extend_from_slice(&buf[..n]),
        }
    }
    let target = String::from_utf8_lossy(&head)
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    let status = match check {
        Some((path, status)) if *path == target => *status,
        _ => 200,
    };
    let reason = if status == 200 { "OK" } else { "Check" };
    let response = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
        name.len()
    );
    stream.write_all(response.as_bytes())?;
    stream.flush()
}

/// A UDP echo: answers each datagram with `{name}:{payload}`, from the port
/// it received it on. Stops when dropped.
#[derive(Debug)]
pub struct UdpEcho {
    port: u16,
    name: String,
    stop: Arc<AtomicBool>,
    served: Arc<AtomicUsize>,
    worker: Option<JoinHandle<()>>,
}

impl UdpEcho {
    /// Binds `0.0.0.0:port` inside `ns` and answers with prefix `name`.
    /// Panics if the port cannot be bound.
    pub fn start(ns: &Netns, port: u16, name: &str) -> UdpEcho {
        let socket = ns.run(|| UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)));
        let socket = socket.unwrap_or_else(|e| {
            panic!(
                "UDP echo {name}: binding 0.0.0.0:{port} in {}: {e}",
                ns.name()
            )
        });
        UdpEcho::serve(socket, name)
    }

    /// Serves on an already bound `socket` (in whatever namespace it was
    /// created), answering with prefix `name`.
    pub fn serve(socket: UdpSocket, name: &str) -> UdpEcho {
        let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
        socket
            .set_read_timeout(Some(POLL_INTERVAL))
            .expect("UDP read timeout");
        socket
            .set_write_timeout(Some(CONN_TIMEOUT))
            .expect("UDP write timeout");
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let worker = {
            let (stop, served, name) = (stop.clone(), served.clone(), name.to_owned());
            thread::Builder::new()
                .name(format!("udp-{name}"))
                .spawn(move || echo_loop(socket, &name, &stop, &served))
                .expect("spawning the UDP echo")
        };
        UdpEcho {
            port,
            name: name.to_owned(),
            stop,
            served,
            worker: Some(worker),
        }
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its name (the prefix of every answer).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many datagrams it answered so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for UdpEcho {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
    }
}

fn echo_loop(socket: UdpSocket, name: &str, stop: &AtomicBool, served: &AtomicUsize) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let mut reply = Vec::with_capacity(name.len() + 1 + n);
                reply.extend_from_slice(name.as_bytes());
                reply.push(b':');
                reply.extend_from_slice(&buf[..n]);
                match socket.send_to(&reply, peer) {
                    Ok(_) => {
                        served.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => eprintln!("UDP echo {name}: reply to {peer}: {e}"),
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => {
                eprintln!("UDP echo {name}: recv: {e}");
                thread::sleep(POLL_INTERVAL);
            }
        }
    }
}
