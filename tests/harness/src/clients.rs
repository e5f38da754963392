//! Clients: HTTP GETs and UDP round trips, one at a time or in bounded
//! batches, run inside a namespace (or in the calling thread's namespace for
//! the `_here` variants).

use std::{
    collections::BTreeMap,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// The limit of every client socket operation (connect, read, write).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Overall limit of one HTTP exchange (a slow trickle cannot go on forever).
const HTTP_DEADLINE: Duration = Duration::from_secs(5);
/// Largest HTTP response read.
const MAX_RESPONSE: usize = 1 << 20;
/// How many error messages a tally keeps.
const KEPT_ERRORS: usize = 10;

/// The request every HTTP client sends.
pub const HTTP_REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

/// `GET /` to `addr` from inside `ns`; the body of a `200` answer, or an
/// error string (connect/read failure, timeout, malformed or non-200 answer).
pub fn http_get(ns: &Netns, addr: SocketAddrV4) -> Result<String, String> {
    ns.run(|| http_get_here(addr))
}

/// [`http_get`] from the calling thread's own namespace.
pub fn http_get_here(addr: SocketAddrV4) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&addr.into(), CLIENT_TIMEOUT)
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let deadline = Instant::now() + HTTP_DEADLINE;
    stream
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| stream.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    stream
        .write_all(HTTP_REQUEST)
        .map_err(|e| format!("send to {addr}: {e}"))?;
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if Instant::now() >= deadline {
            return Err(format!(
                "{addr}: no EOF within {HTTP_DEADLINE:?} ({} bytes read)",
                response.len()
            ));
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if response.len() + n > MAX_RESPONSE => {
                return Err(format!("{addr}: response larger than {MAX_RESPONSE} bytes"))
            }
            Ok(n) => response.extend_from_slice(&buf[..n]),
            Err(e) => {
                return Err(format!(
                    "read from {addr}: {e} ({} bytes read)",
                    response.len()
                ))
            }
        }
    }
    let text = String::from_utf8_lossy(&response);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("{addr}: no complete response head in {text:?}"));
    };
    let status = head.lines().next().unwrap_or("");
    if !(status.starts_with("HTTP/1.") && status.split_whitespace().nth(1) == Some("200")) {
        return Err(format!("{addr}: answered {status:?}"));
    }
    Ok(body.to_owned())
}

/// One UDP reply: its text, who sent it, and the local socket it came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpReply {
    /// The reply's payload (lossily decoded).
    pub body: String,
    /// The reply's source address (`recv_from`).
    pub from: SocketAddr,
    /// The client socket's address (its source port).
    pub local: SocketAddr,
}

/// Sends `payload` from a new UDP socket inside `ns` to `addr` and returns
/// the reply's text, or an error string (no reply within
/// [`CLIENT_TIMEOUT`], socket error).
pub fn udp_roundtrip(ns: &Netns, addr: SocketAddrV4, payload: &str) -> Result<String, String> {
    ns.run(|| udp_roundtrip_here(addr, payload)).map(|r| r.body)
}

/// [`udp_roundtrip`] from the calling thread's own namespace, returning the
/// reply's source and the local address too.
pub fn udp_roundtrip_here(addr: SocketAddrV4, payload: &str) -> Result<UdpReply, String> {
    let socket = new_udp_socket()?;
    udp_exchange(&socket, addr, payload)
}

fn new_udp_socket() -> Result<UdpSocket, String> {
    let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| format!("bind a UDP socket: {e}"))?;
    socket
        .set_read_timeout(Some(CLIENT_TIMEOUT))
        .and_then(|()| socket.set_write_timeout(Some(CLIENT_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    Ok(socket)
}

/// One exchange on an unconnected socket: a reply from any source is taken,
/// so a wrongly translated source shows up instead of being filtered out.
fn udp_exchange(socket: &UdpSocket, addr: SocketAddrV4, payload: &str) -> Result<UdpReply, String> {
    let local = socket
        .local_addr()
        .map_err(|e| format!("local address: {e}"))?;
    socket
        .send_to(payload.as_bytes(), addr)
        .map_err(|e| format!("send to {addr} from {local}: {e}"))?;
    let mut buf = vec![0u8; 65536];
    let (n, from) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("no reply from {addr} to {local}: {e}"))?;
    Ok(UdpReply {
        body: String::from_utf8_lossy(&buf[..n]).into_owned(),
        from,
        local,
    })
}

/// The outcome of a batch of HTTP requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HttpTally {
    /// Requests asked for.
    pub requested: usize,
    /// Successful answers, by body (a backend's name).
    pub counts: BTreeMap<String, usize>,
    /// Requests that failed or were not made before the deadline.
    pub failures: usize,
    /// The first few error messages.
    pub errors: Vec<String>,
}

impl HttpTally {
    /// Successful answers in all.
    pub fn successes(&self) -> usize {
        self.counts.values().sum()
    }

    /// How many answers had body `name`.
    pub fn count(&self, name: &str) -> usize {
        self.counts.get(name).copied().unwrap_or(0)
    }
}

/// Makes `n` HTTP requests to `addr`, one after another on one thread inside
/// `ns`, each on a new connection, and counts the answers by body. Stops
/// early at `deadline` (measured from the start); requests not made count
/// as failures.
pub fn http_tally(ns: &Netns, addr: SocketAddrV4, n: usize, deadline: Duration) -> HttpTally {
    ns.run(|| {
        let end = Instant::now() + deadline;
        let mut tally = HttpTally {
            requested: n,
            ..HttpTally::default()
        };
        for i in 0..n {
            if Instant::now() >= end {
                tally.failures += n - i;
                keep(
                    &mut tally.errors,
                    format!("deadline {deadline:?} passed before request {i}"),
                );
                break;
            }
            match http_get_here(addr) {
                Ok(body) => *tally.counts.entry(body).or_insert(0) += 1,
                Err(e) => {
                    tally.failures += 1;
                    keep(&mut tally.errors, format!("request {i}: {e}"));
                }
            }
        }
        tally
    })
}

/// The outcome of a batch of UDP round trips.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UdpTally {
    /// Round trips asked for.
    pub requested: usize,
    /// Every reply whose payload echoed the request, in order.
    pub replies: Vec<UdpReply>,
    /// Replies by the name before the first `:` (a backend's name).
    pub counts: BTreeMap<String, usize>,
    /// Round trips without a (matching) reply, or not made before the deadline.
    pub failures: usize,
    /// The first few error messages.
    pub errors: Vec<String>,
}

/// Makes `n` UDP round trips to `addr` from inside `ns`, one after another,
/// each from a new socket; all sockets stay open until the end, so every
/// round trip has a distinct source port. Request `i` carries `ping-{i}`; a
/// reply must be `{name}:ping-{i}`. Stops early at `deadline`.
pub fn udp_tally(ns: &Netns, addr: SocketAddrV4, n: usize, deadline: Duration) -> UdpTally {
    ns.run(|| {
        let end = Instant::now() + deadline;
        let mut tally = UdpTally {
            requested: n,
            ..UdpTally::default()
        };
        let mut sockets = Vec::with_capacity(n);
        for i in 0..n {
            if Instant::now() >= end {
                tally.failures += n - i;
                keep(
                    &mut tally.errors,
                    format!("deadline {deadline:?} passed before round trip {i}"),
                );
                break;
            }
            let payload = format!("ping-{i}");
            let outcome = new_udp_socket().and_then(|socket| {
                let reply = udp_exchange(&socket, addr, &payload);
                sockets.push(socket);
                reply
            });
            match outcome {
                Ok(reply) => match reply.body.split_once(':') {
                    Some((name, echoed)) if echoed == payload => {
                        *tally.counts.entry(name.to_owned()).or_insert(0) += 1;
                        tally.replies.push(reply);
                    }
                    _ => {
                        tally.failures += 1;
                        keep(
                            &mut tally.errors,
                            format!("round trip {i}: unexpected reply {reply:?}"),
                        );
                    }
                },
                Err(e) => {
                    tally.failures += 1;
                    keep(&mut tally.errors, format!("round trip {i}: {e}"));
                }
            }
        }
        tally
    })
}

fn keep(errors: &mut Vec<String>, error: String) {
    if errors.len() < KEPT_ERRORS {
        errors.push(error);
    }
}
