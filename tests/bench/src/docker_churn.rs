//! Docker: how fast a container that dies leaves the maps and the traffic,
//! and how fast one that starts joins them.
//!
//! A real `lb run` follows the real engine (`[docker] enabled = true`); its
//! one service `web` (VIP:80) is declared without backends, so every backend
//! is a container labelled `lb.service=web`, `lb.port=8080` (busybox `httpd`
//! answering its own name). Two such containers live for the whole section;
//! each round starts one more (`docker run`), measures its start, SIGKILLs
//! its main process from the host, measures its death, and removes it.
//!
//! Clocks: an event's time is the engine's own (`timeNano` of
//! `docker events`, `CLOCK_REALTIME`), compared with this host's
//! `SystemTime` when the change is seen.
//!
//! "In the map": a thread reads the daemon's pinned `LB_SERVICES` entry of
//! the service every 100 µs; when it points at the other Maglev copy (the
//! daemon's flip, the last write of an addition and the first of a removal),
//! that copy and `LB_BACKENDS` are read whole (`BPF_MAP_LOOKUP_BATCH`). A
//! container is in the map when its address has an active entry whose id
//! has slots in the active copy.
//!
//! Requests go from the client namespace to the VIP, one connection each,
//! from a chosen source port. After `docker run`, from when this benchmark
//! sees the `start` event, requests from fresh source ports (no flow yet)
//! until one is answered by the new container's name. After the SIGKILL,
//! requests cycle over source ports whose flows were on the victim (each
//! with a 3 ms connect timeout: a SYN to the dead container is dropped, or
//! refused while its namespace is torn down) until another container
//! answers. A request's time is when it was sent.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    io::{self, BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    os::fd::{AsFd as _, AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
        Arc, Mutex,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{maps, Backend, ServiceKey, ServiceValue, BACKEND_ACTIVE, IPPROTO_TCP, NO_BACKEND};
use lb_harness::{
    clients::HTTP_REQUEST,
    docker_engine::{docker_binary, Container, Engine, RunOpts, DOCKER_SOCKET, HTTP_PORT},
    Daemon, TempDir, Topology, READY_MARKER,
};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{
    open_pinned, raw_bpf,
    report::{percentile, Column, Row, Section, Target},
    PinDir,
};

/// Every container the section makes is named `{NAME_PREFIX}…`.
pub const NAME_PREFIX: &str = "lbbd-";
/// The topology's prefix (namespace `lbbd-c`, veth `lbbdc0`).
pub const TOPOLOGY_PREFIX: &str = "lbbd";
/// The service's name and its port on the VIP.
const SERVICE: &str = "web";
const VIP_PORT: u16 = 80;
/// Containers that serve the service for the whole section.
const BASE_CONTAINERS: usize = 2;
/// Source ports whose flows are on the victim, cycled after the kill.
const VICTIM_PORTS: usize = 4;
/// How often the map thread reads the service entry.
const POLL: Duration = Duration::from_micros(100);
/// The least time between the starts of two requests of a probe: a
/// refused connection returns in microseconds, and a probe spinning on them
/// would take one of the machine's cores from the engine and the daemon.
const REQUEST_INTERVAL: Duration = Duration::from_micros(500);
/// Connect timeout of a request after the kill.
const KILL_CONNECT_TIMEOUT: Duration = Duration::from_millis(3);
/// Connect timeout of a request after a start (every container is alive).
const START_CONNECT_TIMEOUT: Duration = Duration::from_millis(20);
/// How long a connected request may take to answer.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(300);
/// The longest any one wait of a round lasts (for an event, a flip, an
/// answer).
const PHASE_WAIT: Duration = Duration::from_secs(10);
/// Requests after a start sent back to back; then one every
/// [`START_PACE`] until [`PHASE_WAIT`] (each takes a fresh source port).
const START_BURST: usize = 300;
const START_PACE: Duration = Duration::from_millis(20);
/// Most requests after a kill.
const KILL_MAX_REQUESTS: usize = 50_000;
/// Source ports handed out, once each.
const FIRST_PORT: u32 = 10_000;
const LAST_PORT: u32 = 65_000;
/// `bpf()` command number of `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Nanoseconds since the Unix epoch (`CLOCK_REALTIME`, as the engine
/// stamps its events).
fn now_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// Milliseconds from `from` to `to` (both from [`now_ns`] or event times).
fn ms(from: i128, to: i128) -> f64 {
    (to - from) as f64 / 1e6
}

// ---------------------------------------------------------------------------
// The engine's events.

/// One container event as `docker events` printed it.
#[derive(Clone, Debug)]
struct Event {
    action: String,
    id: String,
    name: String,
    /// The engine's time of the event, ns since the epoch.
    at_ns: i128,
}

impl Event {
    fn parse(line: &str) -> Option<Event> {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        let s = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        let action = s(&v["Action"]).or_else(|| s(&v["status"]))?;
        let id = s(&v["id"]).or_else(|| s(&v["Actor"]["ID"]))?;
        let name = s(&v["Actor"]["Attributes"]["name"]).unwrap_or_default();
        let at_ns = v["timeNano"].as_i64()? as i128;
        Some(Event {
            action,
            id,
            name,
            at_ns,
        })
    }
}

/// `docker events --filter type=container` as a child process, its lines
/// read on a thread; killed when dropped.
struct EventStream {
    child: Child,
    events: Arc<Mutex<Vec<Event>>>,
    reader: Option<JoinHandle<()>>,
}

impl EventStream {
    fn start() -> Self {
        let mut child = Command::new(docker_binary())
            .arg("-H")
            .arg(format!("unix://{DOCKER_SOCKET}"))
            .args([
                "events",
                "--format",
                "{{json .}}",
                "--filter",
                "type=container",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting `docker events`: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        let reader = thread::Builder::new()
            .name("docker-events".into())
            .spawn(move || {
                // Bounded by the pipe's EOF (the child is killed on drop).
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(e) = Event::parse(&line) {
                        sink.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                    }
                }
            })
            .expect("spawning the events reader");
        Self {
            child,
            events,
            reader: Some(reader),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The first event that `pred` accepts, if seen yet.
    fn find(&self, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|e| pred(e))
            .cloned()
    }

    /// Waits (up to `timeout`) for an event `pred` accepts.
    fn wait(&self, timeout: Duration, pred: impl Fn(&Event) -> bool) -> Option<Event> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self.find(&pred) {
                return Some(e);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_micros(500));
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

// ---------------------------------------------------------------------------
// The daemon's pinned maps.

/// `union bpf_attr` for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// A pinned `ARRAY` map read in batches.
struct PinnedArray {
    data: MapData,
    max_entries: u32,
}

impl PinnedArray {
    fn open<T>(dir: &Path, name: &str) -> Self {
        let data = MapData::from_pin(dir.join(name))
            .unwrap_or_else(|e| panic!("opening pinned map {name}: {e}"));
        let info = data
            .info()
            .unwrap_or_else(|e| panic!("pinned map {name}: {e}"));
        assert_eq!(
            info.value_size() as usize,
            std::mem::size_of::<T>(),
            "{name}: value size"
        );
        assert_eq!(info.key_size(), 4, "{name}: an array's key is a u32");
        Self {
            data,
            max_entries: info.max_entries(),
        }
    }

    /// Elements `start..start + count` (fewer at the end of the map) with
    /// their indices, in as few `BPF_MAP_LOOKUP_BATCH` calls as the kernel
    /// allows. `T` must be the map's value type (checked by size in
    /// [`PinnedArray::open`]).
    fn read<T: Copy + Default>(&self, start: u32, count: u32) -> io::Result<Vec<(u32, T)>> {
        let count = count.min(self.max_entries.saturating_sub(start)) as usize;
        let mut keys = vec![0u32; count];
        let mut values = vec![T::default(); count];
        // A batch starts after the key its token names (none: at index 0).
        let mut token: Option<u32> = start.checked_sub(1);
        let mut got = 0usize;
        while got < count {
            let in_batch = token.unwrap_or(0);
            let mut out_batch = 0u32;
            let mut attr = BatchAttr {
                in_batch: token.map_or(0, |_| std::ptr::addr_of!(in_batch) as u64),
                out_batch: std::ptr::addr_of_mut!(out_batch) as u64,
                keys: keys[got..].as_mut_ptr() as u64,
                values: values[got..].as_mut_ptr() as u64,
                count: (count - got) as u32,
                map_fd: self.data.fd().as_fd().as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: `attr` is the batch prefix of `union bpf_attr`; the
            // key and value buffers hold `attr.count` elements of the map's
            // key (u32) and value (`T`, size checked) sizes, and the batch
            // tokens are u32 slots, as arrays use.
            let r = unsafe { raw_bpf::bpf(BPF_MAP_LOOKUP_BATCH, &mut attr) };
            // The kernel says how many it copied, also when it fails.
            let n = (attr.count as usize).min(count - got);
            got += n;
            if let Err(e) = r {
                if e.raw_os_error() == Some(libc::ENOENT) {
                    break;
                }
                return Err(e);
            }
            if n == 0 {
                break;
            }
            token = Some(out_batch);
        }
        keys.truncate(got);
        values.truncate(got);
        if keys.first().is_some_and(|&k| k != start) {
            return Err(io::Error::other(format!(
                "a batch from index {start} began at {}",
                keys[0]
            )));
        }
        Ok(keys.into_iter().zip(values).collect())
    }
}

/// The pinned maps the benchmark reads.
struct PinnedMaps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: PinnedArray,
    maglev: PinnedArray,
}

impl PinnedMaps {
    fn open(dir: &Path) -> Self {
        let data = MapData::from_pin(dir.join(maps::SERVICES))
            .unwrap_or_else(|e| panic!("opening pinned map {}: {e}", maps::SERVICES));
        let services = HashMap::try_from(
            Map::from_map_data(data).unwrap_or_else(|e| panic!("{}: {e}", maps::SERVICES)),
        )
        .expect("LB_SERVICES is a hash");
        Self {
            services,
            backends: PinnedArray::open::<Backend>(dir, maps::BACKENDS),
            maglev: PinnedArray::open::<u32>(dir, maps::MAGLEV),
        }
    }

    /// The ids in the Maglev copy `v` points at, and the active backend
    /// entries by (address, port) as stored (network order).
    fn snapshot(&self, v: Option<ServiceValue>) -> (HashSet<u32>, StdHashMap<(u32, u16), u32>) {
        let table: HashSet<u32> = match v {
            Some(v) => self
                .maglev
                .read::<u32>(v.table_base, v.table_size)
                .unwrap_or_else(|e| panic!("reading {}: {e}", maps::MAGLEV))
                .into_iter()
                .map(|(_, id)| id)
                .filter(|&id| id != NO_BACKEND)
                .collect(),
            None => HashSet::new(),
        };
        let active = self
            .backends
            .read::<Backend>(0, self.backends.max_entries)
            .unwrap_or_else(|e| panic!("reading {}: {e}", maps::BACKENDS))
            .into_iter()
            .filter(|(_, b)| b.addr != 0 && b.state == BACKEND_ACTIVE)
            .map(|(id, b)| ((b.addr, b.port), id))
            .collect();
        (table, active)
    }
}

/// Panics unless batch reads of the pinned arrays agree with element-wise
/// reads (through aya) of the service's active table and the first
/// backends.
fn check_batch_reads(dir: &Path, maps_: &PinnedMaps, key: ServiceKey) {
    let open = |name: &str| open_pinned(dir, name);
    let backends: Array<MapData, Backend> =
        Array::try_from(open(maps::BACKENDS)).expect("LB_BACKENDS is an array");
    let maglev: Array<MapData, u32> =
        Array::try_from(open(maps::MAGLEV)).expect("LB_MAGLEV is an array");
    let v = maps_
        .services
        .get(&key, 0)
        .expect("the service is in LB_SERVICES");
    let table = maps_
        .maglev
        .read::<u32>(v.table_base, v.table_size)
        .expect("batch read of LB_MAGLEV");
    assert_eq!(table.len(), v.table_size as usize, "whole table read");
    for i in (0..v.table_size).step_by(997).chain([v.table_size - 1]) {
        let want = maglev.get(&(v.table_base + i), 0).expect("LB_MAGLEV slot");
        assert_eq!(table[i as usize], (v.table_base + i, want), "slot {i}");
    }
    let all = maps_
        .backends
        .read::<Backend>(0, maps_.backends.max_entries)
        .expect("batch read of LB_BACKENDS");
    assert_eq!(all.len(), backends.len() as usize, "every backend read");
    for id in 0..16.min(backends.len()) {
        let want = backends.get(&id, 0).expect("LB_BACKENDS entry");
        assert_eq!(all[id as usize], (id, want), "backend {id}");
    }
}

/// The key of `addr:port` in the snapshot of [`PinnedMaps::snapshot`].
fn stored(addr: Ipv4Addr, port: u16) -> (u32, u16) {
    (
        u32::from_ne_bytes(addr.octets()),
        u16::from_ne_bytes(port.to_be_bytes()),
    )
}

/// The service entry changed (a Maglev flip), as the map thread saw it.
#[derive(Clone, Debug)]
struct Flip {
    /// When the thread saw it.
    at_ns: i128,
    /// How long before that the thread last saw the old entry: the flip
    /// happened within this window.
    window_ns: i128,
    /// Ids with slots in the new active copy.
    table: HashSet<u32>,
    /// Active backend entries just after the flip.
    active: StdHashMap<(u32, u16), u32>,
}

impl Flip {
    /// Whether `addr:port` has an active entry with slots in the table.
    fn holds(&self, addr: Ipv4Addr, port: u16) -> bool {
        self.active
            .get(&stored(addr, port))
            .is_some_and(|id| self.table.contains(id))
    }
}

/// The map thread: reads the service entry every [`POLL`] and records
/// every change with a snapshot of the new table; stopped when dropped.
struct MapWatch {
    stop: Arc<AtomicBool>,
    flips: Arc<Mutex<Vec<Flip>>>,
    polls: Arc<AtomicU64>,
    handle: Option<JoinHandle<()>>,
}

impl MapWatch {
    fn start(maps: PinnedMaps, key: ServiceKey) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flips = Arc::new(Mutex::new(Vec::new()));
        let polls = Arc::new(AtomicU64::new(0));
        let (s, f, p) = (Arc::clone(&stop), Arc::clone(&flips), Arc::clone(&polls));
        let handle = thread::Builder::new()
            .name("lb-maps".into())
            .spawn(move || {
                let mut last: Option<Option<u32>> = None;
                let mut prev = now_ns();
                // Bounded by the stop flag, set when the watch is dropped.
                while !s.load(Ordering::Relaxed) {
                    let t = now_ns();
                    let v = maps.services.get(&key, 0).ok();
                    let base = v.map(|v| v.table_base);
                    if last != Some(base) {
                        let (table, active) = maps.snapshot(v);
                        f.lock().unwrap_or_else(|p| p.into_inner()).push(Flip {
                            at_ns: t,
                            window_ns: t - prev,
                            table,
                            active,
                        });
                        last = Some(base);
                    }
                    prev = t;
                    p.fetch_add(1, Ordering::Relaxed);
                    thread::sleep(POLL);
                }
            })
            .expect("spawning the map thread");
        Self {
            stop,
            flips,
            polls,
            handle: Some(handle),
        }
    }

    /// Flips seen so far.
    fn count(&self) -> usize {
        self.flips.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Panics (with the thread's panic) if the thread died.
    fn check(&mut self) {
        if self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            if let Some(h) = self.handle.take() {
                if let Err(panic) = h.join() {
                    std::panic::resume_unwind(panic);
                }
            }
            panic!("the map thread stopped");
        }
    }

    /// Waits (up to `timeout`) for the first flip from index `from` on that
    /// `pred` accepts.
    fn wait(
        &mut self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Flip) -> bool,
    ) -> Option<Flip> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check();
            let found = self.flips.lock().unwrap_or_else(|p| p.into_inner())[from..]
                .iter()
                .find(|f| pred(f))
                .cloned();
            if found.is_some() {
                return found;
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(1));
        }
    }
}

impl Drop for MapWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

// ---------------------------------------------------------------------------
// Requests.

/// Source ports, each handed out once: a port never used before has no
/// flow in the daemon's table, so the Maglev table picks its backend.
struct Ports(AtomicU32);

impl Ports {
    fn new() -> Self {
        Self(AtomicU32::new(FIRST_PORT))
    }

    fn next(&self) -> Option<u16> {
        let p = self.0.fetch_add(1, Ordering::Relaxed);
        (p <= LAST_PORT).then_some(p as u16)
    }

    fn used(&self) -> u32 {
        self.0.load(Ordering::Relaxed).min(LAST_PORT + 1) - FIRST_PORT
    }
}

/// A `sockaddr_in` for `addr:port`.
fn sockaddr(addr: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// One `GET /` to `to` from source port `port`, in the calling thread's
/// namespace: the trimmed body of a `200` answer (a container's name), or
/// why not. The connection must be made within `connect_timeout`.
///
/// The server closes first, so the client leaves no `TIME_WAIT` and the
/// port can be used again at once.
fn request(port: u16, to: SocketAddrV4, connect_timeout: Duration) -> Result<String, String> {
    // SAFETY: a plain socket(2); the descriptor is owned at once below.
    let raw = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(format!("socket: {}", io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    let src = sockaddr(Ipv4Addr::UNSPECIFIED, port);
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: valid descriptor, option value and sockaddr of the given sizes.
    let bound = unsafe {
        libc::setsockopt(
            raw,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            std::ptr::addr_of!(one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
            && libc::bind(raw, std::ptr::addr_of!(src).cast(), len) == 0
    };
    if !bound {
        return Err(format!("bind :{port}: {}", io::Error::last_os_error()));
    }
    let dst = sockaddr(*to.ip(), to.port());
    // SAFETY: valid descriptor and sockaddr.
    if unsafe { libc::connect(raw, std::ptr::addr_of!(dst).cast(), len) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(format!("connect from :{port}: {e}"));
        }
        let mut pfd = libc::pollfd {
            fd: raw,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: connect_timeout.as_secs() as libc::time_t,
            tv_nsec: connect_timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask.
        let n = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if n == 0 {
            return Err(format!(
                "connect from :{port}: no answer in {connect_timeout:?}"
            ));
        }
        let mut err: libc::c_int = 0;
        let mut err_len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: valid descriptor and an int-sized option buffer.
        let r = unsafe {
            libc::getsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_ERROR,
                std::ptr::addr_of_mut!(err).cast(),
                &mut err_len,
            )
        };
        if n < 0 || r != 0 {
            return Err(format!(
                "connect from :{port}: {}",
                io::Error::last_os_error()
            ));
        }
        if err != 0 {
            return Err(format!(
                "connect from :{port}: {}",
                io::Error::from_raw_os_error(err)
            ));
        }
    }
    let mut stream = TcpStream::from(fd);
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(ANSWER_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(ANSWER_TIMEOUT)))
        .map_err(|e| format!("socket options: {e}"))?;
    stream
        .write_all(HTTP_REQUEST)
        .map_err(|e| format!("send from :{port}: {e}"))?;
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if Instant::now() >= deadline || answer.len() > 64 * 1024 {
            return Err(format!(
                "from :{port}: no whole answer in {ANSWER_TIMEOUT:?}"
            ));
        }
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("read from :{port}: {e}")),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return Err(format!("from :{port}: not an HTTP answer: {text:?}"));
    };
    if head.split_whitespace().nth(1) != Some("200") {
        return Err(format!("from :{port}: {:?}", head.lines().next()));
    }
    Ok(body.trim().to_owned())
}

/// What the requests after a start saw.
#[derive(Debug, Default)]
struct StartProbe {
    /// When the requests began (the start event seen, or `docker run`
    /// returned).
    began_ns: Option<i128>,
    /// When the first request the new container answered was sent.
    first_hit_ns: Option<i128>,
    /// Source ports whose flows are on the new container.
    victim_ports: Vec<u16>,
    requests: usize,
    failures: usize,
    last_error: Option<String>,
}

/// After a start: waits until `go()` (bounded by `deadline`), then sends
/// requests from fresh source ports until [`VICTIM_PORTS`] of them were
/// answered by `name`.
fn start_probe(
    name: &str,
    vip: SocketAddrV4,
    ports: &Ports,
    go: impl Fn() -> bool,
    deadline: Instant,
) -> StartProbe {
    let mut p = StartProbe::default();
    while !go() {
        if Instant::now() >= deadline {
            return p;
        }
        thread::sleep(Duration::from_micros(100));
    }
    p.began_ns = Some(now_ns());
    // Bounded by the deadline and by the supply of ports.
    while Instant::now() < deadline && p.victim_ports.len() < VICTIM_PORTS {
        if p.requests >= START_BURST && p.first_hit_ns.is_none() {
            thread::sleep(START_PACE);
        }
        let Some(port) = ports.next() else {
            p.last_error = Some("out of fresh source ports".into());
            break;
        };
        let sent = now_ns();
        let t = Instant::now();
        p.requests += 1;
        let answer = request(port, vip, START_CONNECT_TIMEOUT);
        thread::sleep(REQUEST_INTERVAL.saturating_sub(t.elapsed()));
        match answer {
            Ok(body) if body == name => {
                p.first_hit_ns.get_or_insert(sent);
                p.victim_ports.push(port);
            }
            Ok(_) => {}
            Err(e) => {
                p.failures += 1;
                p.last_error = Some(e);
            }
        }
    }
    p
}

/// What the requests after a kill saw.
#[derive(Debug, Default)]
struct KillProbe {
    /// When the SIGKILL was sent.
    killed_ns: i128,
    /// When the first request another container answered was sent.
    first_other_ns: Option<i128>,
    /// Requests that failed before that.
    failures: usize,
    /// Requests the victim still answered after the kill.
    victim_answers: usize,
    last_error: Option<String>,
}

/// SIGKILLs `pid` (the victim's main process), then cycles requests over
/// `ports` (whose flows are on the victim) until another container
/// answers, for at most [`PHASE_WAIT`].
fn kill_probe(pid: u32, victim: &str, vip: SocketAddrV4, ports: &[u16]) -> KillProbe {
    let raw = i32::try_from(pid).expect("a pid fits i32");
    let killed_ns = now_ns();
    kill(Pid::from_raw(raw), Signal::SIGKILL)
        .unwrap_or_else(|e| panic!("kill -9 {pid} (container {victim}): {e}"));
    let mut p = KillProbe {
        killed_ns,
        ..Default::default()
    };
    let deadline = Instant::now() + PHASE_WAIT;
    for &port in ports.iter().cycle().take(KILL_MAX_REQUESTS) {
        if Instant::now() >= deadline {
            break;
        }
        let sent = now_ns();
        let t = Instant::now();
        let answer = request(port, vip, KILL_CONNECT_TIMEOUT);
        match answer {
            Ok(body) if body == victim => p.victim_answers += 1,
            Ok(_) => {
                p.first_other_ns = Some(sent);
                break;
            }
            Err(e) => {
                p.failures += 1;
                p.last_error = Some(e);
            }
        }
        thread::sleep(REQUEST_INTERVAL.saturating_sub(t.elapsed()));
    }
    p
}

// ---------------------------------------------------------------------------
// The measurement.

/// The section's sizes.
#[derive(Clone, Debug)]
pub struct Params {
    /// Containers started and then killed, one per round.
    pub rounds: usize,
    /// Containers then started at once (none: no burst).
    pub burst: usize,
}

/// One round: a container started, then killed. Times in ms; `None` when
/// that moment was not seen within 10 s (see `problems`).
#[derive(Clone, Debug, Default)]
pub struct Round {
    /// The container's name.
    pub container: String,
    /// `start` event to the first flip whose table holds the container.
    pub start_to_map_ms: Option<f64>,
    /// `start` event to the first request the container answered.
    pub start_to_request_ms: Option<f64>,
    /// `start` event to `docker run` returning.
    pub start_to_run_return_ms: Option<f64>,
    /// `docker run` returning to the first request the container answered
    /// (negative when it answered before the command returned).
    pub run_return_to_request_ms: Option<f64>,
    /// Whether the requests began only after the container was in the map
    /// (then `start_to_request_ms` is later than it could have been).
    pub probe_began_late: bool,
    /// SIGKILL to the `die` event.
    pub kill_to_die_ms: Option<f64>,
    /// `die` event to the first flip whose table no longer holds it.
    pub die_to_map_ms: Option<f64>,
    /// SIGKILL to that flip.
    pub kill_to_map_ms: Option<f64>,
    /// SIGKILL to the first request another container answered, from a
    /// source port whose flow was on the victim.
    pub kill_to_request_ms: Option<f64>,
    /// Requests that failed between the kill and that one.
    pub failed_after_kill: usize,
    /// Requests the victim answered after the kill.
    pub victim_answers_after_kill: usize,
    /// How long before it saw the flip that put the container in the map
    /// the map thread had last read the old entry, ms: the flip happened
    /// within that window.
    pub start_flip_window_ms: Option<f64>,
    /// The same for the flip that took it out.
    pub die_flip_window_ms: Option<f64>,
    /// What went wrong, if anything.
    pub problems: Vec<String>,
}

/// What one run measured, and what it left behind.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Rounds asked for.
    pub asked: usize,
    /// The rounds run (all asked for unless source ports ran out).
    pub rounds: Vec<Round>,
    /// Every container name the run used.
    pub names: Vec<String>,
    /// The daemon's pid (stopped by the time `measure` returns).
    pub daemon_pid: u32,
    /// The daemon's forward path on the client-facing veth (`xdp`, `tc`),
    /// from its log.
    pub forward: String,
    /// Whether the daemon exited successfully on SIGTERM.
    pub daemon_clean_exit: bool,
    /// The pin path (removed by the time `measure` returns).
    pub pin_path: PathBuf,
    /// The pid of the `docker events` child (stopped by then).
    pub events_pid: u32,
    /// Map reads of the service entry, and how long the map thread ran.
    pub polls: u64,
    /// Seconds the map thread ran.
    pub poll_secs: f64,
    /// Source ports used.
    pub ports_used: u32,
    /// The burst, if one was asked for.
    pub burst: Option<Burst>,
}

/// Waits (up to `timeout`) until `f` returns `Some`.
fn wait_some<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Runs the section's machinery: a daemon following the engine, two
/// long-lived containers, and `p.rounds` containers started and killed.
pub fn measure(p: &Params) -> Outcome {
    lb_harness::require_root();
    // Dropped in reverse order: the map thread, the event stream, the
    // daemon, the containers, the files, the pins, the topology and last
    // the engine (its lock).
    let engine = Engine::ensure();
    let topo = Topology::new(TOPOLOGY_PREFIX, 0);
    let pins = PinDir::new("docker");
    let dir = TempDir::new("bench-docker");
    let image = engine.image();
    let events = EventStream::start();
    let opts = || {
        RunOpts::default()
            .image(&image)
            .label("lb.service", SERVICE)
            .label("lb.port", &HTTP_PORT.to_string())
    };
    let base_names: Vec<String> = (0..BASE_CONTAINERS)
        .map(|i| format!("{NAME_PREFIX}base{i}"))
        .collect();
    let base: Vec<Container> = base_names.iter().map(|n| engine.run(n, opts())).collect();
    for c in &base {
        let id = c.id().to_owned();
        events
            .wait(PHASE_WAIT, |e| e.id == id && e.action == "start")
            .unwrap_or_else(|| {
                panic!(
                    "`docker events` did not report the start of {} within {PHASE_WAIT:?}",
                    c.name()
                )
            });
    }

    let vip = SocketAddrV4::new(topo.vip(), VIP_PORT);
    let config = format!(
        "[datapath]\nexternal = [\"{}\"]\npin_path = \"{}\"\n\n[docker]\nenabled = true\n\n\
         [[service]]\nname = \"{SERVICE}\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\n",
        topo.client_host_if(),
        pins.path().display()
    );
    let config_path = dir.write("lb.toml", &config);
    let socket = dir.path().join("lb.sock");
    let config_arg = config_path.to_str().expect("UTF-8 path");
    let socket_arg = socket.to_str().expect("UTF-8 path");
    let mut daemon = Daemon::start(
        &["run", "--config", config_arg, "--socket", socket_arg],
        READY_MARKER,
        Duration::from_secs(60),
    );
    let daemon_pid = daemon.pid().expect("running");
    // How the daemon chose to take the client's packets (its log line
    // `external interface attached … forward="tc"`).
    let forward = daemon
        .output()
        .lines()
        .filter(|l| l.contains("external interface attached"))
        .find_map(|l| {
            l.split("forward=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into());
    assert!(
        daemon.wait_for_output("docker watcher connected", Duration::from_secs(30)),
        "the daemon's Docker watcher did not connect within 30 s"
    );

    let ports = Ports::new();
    // Both long-lived containers answer through the VIP.
    let mut seen: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    topo.client.run(|| {
        // Bounded by the deadline and the supply of ports.
        while seen.len() < base.len() && Instant::now() < deadline {
            let Some(port) = ports.next() else { break };
            if let Ok(body) = request(port, vip, START_CONNECT_TIMEOUT) {
                seen.insert(body);
            } else {
                thread::sleep(Duration::from_millis(10));
            }
        }
    });
    assert!(
        base_names.iter().all(|n| seen.contains(n)),
        "through {vip}, only {seen:?} of {base_names:?} answered within 30 s"
    );

    let key = ServiceKey::new(topo.vip().octets(), VIP_PORT, IPPROTO_TCP);
    let poll_start = Instant::now();
    let pinned = pins.datapath_dir();
    let maps_ = PinnedMaps::open(&pinned);
    check_batch_reads(&pinned, &maps_, key);
    let mut watch = MapWatch::start(maps_, key);
    let mut rounds = Vec::with_capacity(p.rounds);
    let mut names = base_names.clone();
    for i in 0..p.rounds {
        if ports.used() + 2 * (START_BURST as u32) > LAST_PORT - FIRST_PORT {
            eprintln!("docker: out of fresh source ports after {i} rounds");
            break;
        }
        let name = format!("{NAME_PREFIX}v{i}");
        names.push(name.clone());
        let r = round(
            &engine,
            &events,
            &mut watch,
            &topo,
            &ports,
            vip,
            &name,
            opts(),
        );
        let f = |v: Option<f64>| v.map_or("—".to_owned(), |v| format!("{v:.2}"));
        eprintln!(
            "docker: round {i} ({name}): ms from start event to map {}, to request {}; \
             from SIGKILL to die event {}, to map {}, to request {}; die event to map {}; \
             flips seen {} and {} ms after the read before{}",
            f(r.start_to_map_ms),
            f(r.start_to_request_ms),
            f(r.kill_to_die_ms),
            f(r.kill_to_map_ms),
            f(r.kill_to_request_ms),
            f(r.die_to_map_ms),
            f(r.start_flip_window_ms),
            f(r.die_flip_window_ms),
            if r.problems.is_empty() {
                String::new()
            } else {
                format!("; problems: {}", r.problems.join("; "))
            }
        );
        rounds.push(r);
        if (i + 1) % 10 == 0 {
            eprintln!("docker: {} of {} rounds", i + 1, p.rounds);
        }
    }
    let polls = watch.polls.load(Ordering::Relaxed);
    let poll_secs = poll_start.elapsed().as_secs_f64();
    drop(watch);
    let burst =
        (p.burst > 0).then(|| burst(&engine, &events, &pinned, key, p.burst, &opts, &mut names));
    if let Some(b) = &burst {
        eprintln!("docker: burst: {b:?}");
    }
    let events_pid = events.pid();
    drop(events);
    let daemon_clean_exit = daemon.is_running() && daemon.stop().success();
    drop(base);
    drop(dir);
    let pin_path = pins.path().to_path_buf();
    drop(pins);
    drop(topo);
    drop(engine);
    Outcome {
        asked: p.rounds,
        rounds,
        names,
        daemon_pid,
        forward,
        daemon_clean_exit,
        pin_path,
        events_pid,
        polls,
        poll_secs,
        ports_used: ports.used(),
        burst,
    }
}

/// One round: starts container `name`, measures its start, kills its main
/// process, measures its death, removes it.
#[allow(clippy::too_many_arguments)]
fn round(
    engine: &Engine,
    events: &EventStream,
    watch: &mut MapWatch,
    topo: &Topology,
    ports: &Ports,
    vip: SocketAddrV4,
    name: &str,
    opts: RunOpts,
) -> Round {
    let mut r = Round {
        container: name.to_owned(),
        ..Default::default()
    };

    // Start.
    let flips_before = watch.count();
    let returned = AtomicBool::new(false);
    let (c, run_returned_ns, probe) = thread::scope(|s| {
        let probe = s.spawn(|| {
            topo.client.run(|| {
                let go = || {
                    returned.load(Ordering::Relaxed)
                        || events
                            .find(|e| e.name == name && e.action == "start")
                            .is_some()
                };
                start_probe(name, vip, ports, go, Instant::now() + PHASE_WAIT)
            })
        });
        // If `docker run` panics, the probe still ends by its deadline.
        let c = engine.run(name, opts);
        let t = now_ns();
        returned.store(true, Ordering::Relaxed);
        let probe = probe
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (c, t, probe)
    });
    let id = c.id().to_owned();
    let ip = c.ip();
    let start = events.wait(PHASE_WAIT, |e| e.id == id && e.action == "start");
    let in_map = watch.wait(flips_before, PHASE_WAIT, |f| f.holds(ip, HTTP_PORT));
    match &start {
        Some(e) => {
            r.start_to_run_return_ms = Some(ms(e.at_ns, run_returned_ns));
            r.start_to_map_ms = in_map.as_ref().map(|f| ms(e.at_ns, f.at_ns));
            r.start_to_request_ms = probe.first_hit_ns.map(|t| ms(e.at_ns, t));
        }
        None => r.problems.push("no `start` event seen".into()),
    }
    r.run_return_to_request_ms = probe.first_hit_ns.map(|t| ms(run_returned_ns, t));
    match &in_map {
        Some(f) => {
            r.start_flip_window_ms = Some(f.window_ns as f64 / 1e6);
            r.probe_began_late = probe.began_ns.is_some_and(|b| b > f.at_ns);
        }
        None => r.problems.push(format!(
            "{ip}:{HTTP_PORT} not in the map within {PHASE_WAIT:?}"
        )),
    }
    if probe.first_hit_ns.is_none() {
        r.problems.push(format!(
            "no request answered by it ({} sent, {} failed{})",
            probe.requests,
            probe.failures,
            probe
                .last_error
                .as_ref()
                .map(|e| format!(", last: {e}"))
                .unwrap_or_default()
        ));
    }
    if in_map.is_none() || probe.victim_ports.is_empty() {
        r.problems
            .push("not killed: it never joined the service".into());
        return r;
    }

    // Death.
    let pid = c.pid();
    let flips_before = watch.count();
    let kp = topo
        .client
        .run(|| kill_probe(pid, name, vip, &probe.victim_ports));
    r.failed_after_kill = kp.failures;
    r.victim_answers_after_kill = kp.victim_answers;
    r.kill_to_request_ms = kp.first_other_ns.map(|t| ms(kp.killed_ns, t));
    if kp.first_other_ns.is_none() {
        r.problems.push(format!(
            "no other container answered within {PHASE_WAIT:?} of the kill ({} failed{})",
            kp.failures,
            kp.last_error
                .as_ref()
                .map(|e| format!(", last: {e}"))
                .unwrap_or_default()
        ));
    }
    let die = events.wait(PHASE_WAIT, |e| e.id == id && e.action == "die");
    let out = watch.wait(flips_before, PHASE_WAIT, |f| !f.holds(ip, HTTP_PORT));
    r.kill_to_die_ms = die.as_ref().map(|e| ms(kp.killed_ns, e.at_ns));
    if let Some(f) = &out {
        r.die_flip_window_ms = Some(f.window_ns as f64 / 1e6);
        r.kill_to_map_ms = Some(ms(kp.killed_ns, f.at_ns));
        r.die_to_map_ms = die.as_ref().map(|e| ms(e.at_ns, f.at_ns));
    } else {
        r.problems.push(format!(
            "still in the map {PHASE_WAIT:?} after the `die` event"
        ));
    }
    if die.is_none() {
        r.problems.push("no `die` event seen".into());
    }
    // The container's address may be the next one's: it leaves the engine
    // before the next round starts.
    drop(c);
    let _ = wait_some(PHASE_WAIT, || {
        events.find(|e| e.id == id && e.action == "destroy")
    });
    r
}

// ---------------------------------------------------------------------------
// The report.

// ---------------------------------------------------------------------------
// A burst: many containers started at once.

/// `docker run`s in flight at once during a burst.
const BURST_WORKERS: usize = 16;
/// No new `docker run` of a burst is sent after this long.
const BURST_RUN_BUDGET: Duration = Duration::from_secs(180);
/// How long after the last start the burst waits for the maps.
const BURST_MAP_WAIT: Duration = Duration::from_secs(30);

/// What a burst measured.
#[derive(Clone, Debug, Default)]
pub struct Burst {
    /// Containers asked for.
    pub asked: usize,
    /// Containers whose `docker run` succeeded.
    pub started: usize,
    /// From the first `docker run` sent to the last returned, ms.
    pub runs_ms: f64,
    /// Last `start` event to the first map read holding every started
    /// container (active entry, slots in the active table), ms.
    pub last_start_to_all_in_map_ms: Option<f64>,
    /// Last `docker run` returning to that read, ms (negative when the
    /// maps held them all before the last command returned).
    pub last_return_to_all_in_map_ms: Option<f64>,
    /// Started containers in the map at the last read.
    pub in_map_at_end: usize,
    /// Burst containers left after their removal (should be 0).
    pub left_behind: usize,
    /// What went wrong, if anything.
    pub problems: Vec<String>,
}

/// Removes every container named in `names` (one `docker rm -f`), also
/// when the burst panics.
struct BurstCleanup(Vec<String>);

impl Drop for BurstCleanup {
    fn drop(&mut self) {
        for chunk in self.0.chunks(50) {
            let mut args = vec!["rm", "-f"];
            args.extend(chunk.iter().map(String::as_str));
            let _ = std::panic::catch_unwind(|| lb_harness::docker_engine::docker(&args));
        }
    }
}

/// Starts `n` containers of the service at once (`BURST_WORKERS` `docker
/// run`s in flight), and times until the pinned maps hold them all; removes
/// them.
fn burst(
    engine: &Engine,
    events: &EventStream,
    pinned: &Path,
    key: ServiceKey,
    n: usize,
    opts: &(dyn Fn() -> RunOpts + Sync),
    names: &mut Vec<String>,
) -> Burst {
    let mut b = Burst {
        asked: n,
        ..Default::default()
    };
    let burst_names: Vec<String> = (0..n).map(|i| format!("{NAME_PREFIX}burst{i}")).collect();
    names.extend(burst_names.iter().cloned());
    let cleanup = BurstCleanup(burst_names.clone());
    let stop = AtomicBool::new(false);
    // First time each (address, port) was seen active and in the table.
    let seen: Mutex<StdHashMap<(u32, u16), i128>> = Mutex::new(StdHashMap::new());
    let next = AtomicU32::new(0);
    let done: Mutex<Vec<(Container, i128)>> = Mutex::new(Vec::new());
    let failures: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let first_run_ns = now_ns();
    let begun = Instant::now();
    thread::scope(|s| {
        let watcher = s.spawn(|| {
            let maps_ = PinnedMaps::open(pinned);
            // Bounded by `stop`, set below on every path.
            while !stop.load(Ordering::Relaxed) {
                let v = maps_.services.get(&key, 0).ok();
                let (table, active) = maps_.snapshot(v);
                let t = now_ns();
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                for (k, id) in active {
                    if table.contains(&id) {
                        seen.entry(k).or_insert(t);
                    }
                }
                drop(seen);
                thread::sleep(Duration::from_millis(1));
            }
        });
        let workers: Vec<_> = (0..BURST_WORKERS)
            .map(|_| {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                    if i >= n || begun.elapsed() > BURST_RUN_BUDGET {
                        break;
                    }
                    let name = &burst_names[i];
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine.run(name, opts())
                    })) {
                        Ok(c) => done
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((c, now_ns())),
                        Err(p) => failures
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push(format!(
                                "docker run {name}: {}",
                                p.downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                    .unwrap_or_default()
                            )),
                    }
                })
            })
            .collect();
        for w in workers {
            let _ = w.join();
        }
        let done = done.lock().unwrap_or_else(|p| p.into_inner());
        b.started = done.len();
        let last_return_ns = done.iter().map(|(_, t)| *t).max().unwrap_or(first_run_ns);
        b.runs_ms = ms(first_run_ns, last_return_ns);
        eprintln!(
            "docker: burst: {} of {n} `docker run` returned in {:.0} ms",
            b.started, b.runs_ms
        );
        // Addresses, in one `docker inspect`.
        let mut want: Vec<(u32, u16)> = Vec::new();
        if !done.is_empty() {
            let mut args = vec![
                "inspect",
                "--format",
                "{{with index .NetworkSettings.Networks \"bridge\"}}{{.IPAddress}}{{end}}",
            ];
            args.extend(done.iter().map(|(c, _)| c.id()));
            let out = std::panic::catch_unwind(|| lb_harness::docker_engine::docker_ok(&args));
            match out {
                Ok(out) => {
                    want = out
                        .lines()
                        .filter_map(|l| l.trim().parse::<Ipv4Addr>().ok())
                        .map(|ip| stored(ip, HTTP_PORT))
                        .collect()
                }
                Err(_) => b.problems.push("docker inspect of the burst failed".into()),
            }
            if want.len() != done.len() {
                b.problems.push(format!(
                    "{} addresses for {} containers",
                    want.len(),
                    done.len()
                ));
            }
        }
        // The engine's `start` events of them all.
        let ids: HashSet<String> = done.iter().map(|(c, _)| c.id().to_owned()).collect();
        let last_start_ns = wait_some(PHASE_WAIT, || {
            let starts: Vec<i128> = ids
                .iter()
                .filter_map(|id| events.find(|e| &e.id == id && e.action == "start"))
                .map(|e| e.at_ns)
                .collect();
            (starts.len() == ids.len()).then(|| starts.into_iter().max().unwrap_or(0))
        });
        if last_start_ns.is_none() {
            b.problems.push("not every `start` event seen".into());
        }
        // Every started container in the map.
        let all_in_ns = wait_some(BURST_MAP_WAIT, || {
            let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            let times: Vec<i128> = want.iter().filter_map(|k| seen.get(k).copied()).collect();
            (!want.is_empty() && times.len() == want.len())
                .then(|| times.into_iter().max().unwrap_or(0))
        });
        stop.store(true, Ordering::Relaxed);
        let _ = watcher.join();
        // The last read (the watcher has stopped): who is in now.
        let maps_ = PinnedMaps::open(pinned);
        let (table, active) = maps_.snapshot(maps_.services.get(&key, 0).ok());
        b.in_map_at_end = want
            .iter()
            .filter(|k| active.get(k).is_some_and(|id| table.contains(id)))
            .count();
        match all_in_ns {
            Some(t) => {
                b.last_start_to_all_in_map_ms = last_start_ns.map(|s| ms(s, t));
                b.last_return_to_all_in_map_ms = Some(ms(last_return_ns, t));
            }
            None => b.problems.push(format!(
                "not all {} started containers in the map within {BURST_MAP_WAIT:?}",
                want.len()
            )),
        }
    });
    b.problems
        .extend(failures.into_inner().unwrap_or_else(|p| p.into_inner()));
    // One `docker rm -f` for them all, then the guards (whose own removal
    // then finds nothing).
    drop(cleanup);
    let containers = done.into_inner().unwrap_or_else(|p| p.into_inner());
    let chunk = containers.len().div_ceil(BURST_WORKERS).max(1);
    let mut containers = containers;
    thread::scope(|s| {
        while !containers.is_empty() {
            let part: Vec<_> = containers.drain(..chunk.min(containers.len())).collect();
            s.spawn(move || drop(part));
        }
    });
    b.left_behind = lb_harness::docker_engine::docker_ok(&["ps", "-a", "--format", "{{.Names}}"])
        .lines()
        .filter(|l| l.starts_with(&format!("{NAME_PREFIX}burst")))
        .count();
    b
}

/// Runs the section: 50 containers started and killed, then 100 started
/// at once (`quick`: 10, then 20).
pub fn run(quick: bool) -> Section {
    run_with(&Params {
        rounds: if quick { 10 } else { 50 },
        burst: if quick { 20 } else { 100 },
    })
}

/// Runs the section with `p`.
pub fn run_with(p: &Params) -> Section {
    section(&measure(p))
}

/// A figure of every round: the values present, and how many are missing.
fn figure(o: &Outcome, f: impl Fn(&Round) -> Option<f64>) -> (Vec<f64>, usize) {
    let v: Vec<f64> = o.rounds.iter().filter_map(&f).collect();
    let missing = o.rounds.len() - v.len();
    (v, missing)
}

/// The section's table, targets and notes from one run's figures.
pub fn section(o: &Outcome) -> Section {
    let n = o.rounds.len();
    let killed = o
        .rounds
        .iter()
        .filter(|r| r.kill_to_die_ms.is_some() || r.kill_to_request_ms.is_some())
        .count();
    let row = |name: &str, (v, missing): (Vec<f64>, usize)| {
        let mut row = Row::new(&format!(
            "{name}{}",
            if missing > 0 {
                format!(" ({missing} of {n} not seen)")
            } else {
                String::new()
            }
        ));
        if !v.is_empty() {
            row = row
                .with("p50", percentile(&v, 50.0))
                .with("p99", percentile(&v, 99.0))
                .with("max", percentile(&v, 100.0));
        }
        row = row.with("count", v.len() as f64);
        row.rounds = v;
        row
    };
    let die_map = figure(o, |r| r.die_to_map_ms);
    let kill_req = figure(o, |r| r.kill_to_request_ms);
    let start_map = figure(o, |r| r.start_to_map_ms);
    let start_req = figure(o, |r| r.start_to_request_ms);
    let rows = vec![
        row("`die` event → out of the map", die_map.clone()),
        row(
            "SIGKILL → first request answered by another container",
            kill_req.clone(),
        ),
        row("`start` event → in the map", start_map.clone()),
        row(
            "`start` event → first request answered by the new container",
            start_req.clone(),
        ),
        row(
            "SIGKILL → `die` event (the engine)",
            figure(o, |r| r.kill_to_die_ms),
        ),
        row("SIGKILL → out of the map", figure(o, |r| r.kill_to_map_ms)),
        row(
            "`start` event → `docker run` returned",
            figure(o, |r| r.start_to_run_return_ms),
        ),
        row(
            "`docker run` returned → first request answered by the new container",
            figure(o, |r| r.run_return_to_request_ms),
        ),
    ];
    let target = |bar: &str, what: &str, (v, missing): &(Vec<f64>, usize), limit: f64| {
        let p99 = percentile(v, 99.0);
        Target {
            bar: bar.into(),
            actual: if v.is_empty() {
                format!("not measured ({missing} of {n} rounds not seen)")
            } else {
                format!(
                    "p99 {p99:.2} ms (p50 {:.2}, max {:.2}) over {} {what}{}",
                    percentile(v, 50.0),
                    percentile(v, 100.0),
                    v.len(),
                    if *missing > 0 {
                        format!("; {missing} of {n} not seen within 10 s")
                    } else {
                        String::new()
                    }
                )
            },
            met: !v.is_empty() && *missing == 0 && p99 < limit,
        }
    };
    let targets = vec![
        target(
            "`die` event → out of the map, p99 under 10 ms",
            "kills",
            &die_map,
            10.0,
        ),
        target(
            "SIGKILL → first request no longer reaching the container, p99 under 50 ms",
            "kills",
            &kill_req,
            50.0,
        ),
        target(
            "`start` event → in the map, p99 under 10 ms",
            "starts",
            &start_map,
            10.0,
        ),
    ];

    let windows = |f: fn(&Round) -> Option<f64>| {
        let w: Vec<f64> = o.rounds.iter().filter_map(f).collect();
        format!(
            "median {:.2} ms, at most {:.2} ms, {} of {} over 1 ms",
            percentile(&w, 50.0),
            percentile(&w, 100.0),
            w.iter().filter(|&&x| x > 1.0).count(),
            w.len()
        )
    };
    let failed: Vec<f64> = o
        .rounds
        .iter()
        .filter(|r| r.kill_to_request_ms.is_some())
        .map(|r| r.failed_after_kill as f64)
        .collect();
    let late = o.rounds.iter().filter(|r| r.probe_began_late).count();
    let victim_answers: usize = o.rounds.iter().map(|r| r.victim_answers_after_kill).sum();
    let mut notes = vec![format!(
        "`lb run` with `[docker] enabled = true` and one service (VIP:80, TCP) declared \
         without backends, default map sizes (Maglev M = {}); {BASE_CONTAINERS} containers \
         labelled `lb.service=web`, `lb.port=8080` (busybox `httpd` answering its name) serve \
         it throughout, and each round `docker run`s one more, SIGKILLs its main process from \
         the host once it serves, and removes it: {n} rounds{}. Event times are the engine's \
         (`timeNano` of `docker events`), compared with this host's clock. The map: a thread \
         reads the pinned `LB_SERVICES` entry every {} µs ({} reads in {:.0} s, one per \
         {:.0} µs); on a flip it reads the new Maglev copy and `LB_BACKENDS` whole; a \
         container is in the map when its address has an active entry with slots in the \
         active copy (the \
         daemon writes an added backend before the flip and marks a removed one down after \
         it, so the flip is the moment; a figure ending at the map is when the flip was \
         seen, so it is late by up to the time since the read before). That window: for the \
         flips that put a container in, {}; for those that took one out, {} (after a kill \
         the thread sometimes did not run for milliseconds, while the engine and the kernel \
         tore the container down: a figure ending there may be that much late).",
        crate::scale::thousands(lb_common::defaults::TABLE_SIZE.into()),
        if o.asked > n {
            format!(" of the {} asked for (source ports ran out)", o.asked)
        } else {
            String::new()
        },
        POLL.as_micros(),
        o.polls,
        o.poll_secs,
        o.poll_secs * 1e6 / (o.polls.max(1) as f64),
        windows(|r| r.start_flip_window_ms),
        windows(|r| r.die_flip_window_ms),
    )];
    notes.push(format!(
        "Requests: `GET /` from the client namespace to the VIP (the daemon's forward path on \
         the client's veth: {}), one connection each from a chosen source port; a request's \
         time is when it was sent. \
         After `docker run`, from the moment this benchmark saw the `start` event (or the \
         command returned), requests from source ports never used before, so with no flow \
         yet, until {VICTIM_PORTS} were answered by the new container (with {BASE_CONTAINERS} \
         others it takes about one in {}): the first of them is the figure{}. After the \
         SIGKILL, requests cycle over those {VICTIM_PORTS} source ports, whose flows are on \
         the victim, each with a {} ms connect timeout (a SYN to the dead container is \
         dropped, or refused while its namespace goes), until another container answers \
         (a probe starts a request at most every {} µs, so as not to take a core from the \
         engine and the daemon); \
         {killed} containers killed{}; between the SIGKILL and that answer a median of {} \
         requests failed (at most {}). Percentiles by nearest rank: with fewer than 100 \
         rounds, p99 is the slowest round.",
        o.forward,
        BASE_CONTAINERS + 1,
        if late > 0 {
            format!(
                "; in {late} of {n} rounds the requests began only after the container was \
                 already in the map (the daemon saw the event before this benchmark did), so \
                 those figures are late by that much"
            )
        } else {
            String::new()
        },
        KILL_CONNECT_TIMEOUT.as_millis(),
        REQUEST_INTERVAL.as_micros(),
        if victim_answers > 0 {
            format!("; the victim still answered {victim_answers} request(s) after the SIGKILL")
        } else {
            String::new()
        },
        percentile(&failed, 50.0),
        percentile(&failed, 100.0),
    ));
    let problems: Vec<String> = o
        .rounds
        .iter()
        .filter(|r| !r.problems.is_empty())
        .map(|r| format!("{}: {}", r.container, r.problems.join("; ")))
        .collect();
    notes.push(
        "What the daemon does in between (from its code): on `start` it asks the engine \
         about the container, finds the host side of its veth through the container's \
         process (sysfs, no subprocess; the reverse path is already on the bridge), writes \
         the backend entry, rebuilds the service's Maglev table, writes the slots that \
         differ into the inactive copy through a memory mapping of the array, then flips; \
         on `die` it makes no engine call: it rebuilds the table, writes the inactive copy \
         the same way, and flips."
            .into(),
    );
    if !problems.is_empty() {
        notes.push(format!("Rounds with problems: {}.", problems.join(" | ")));
    }
    let mut rows = rows;
    let mut targets = targets;
    if let Some(b) = &o.burst {
        let one = |name: &str, v: Option<f64>| {
            let mut r = Row::new(name);
            if let Some(v) = v {
                r = r
                    .with("p50", v)
                    .with("p99", v)
                    .with("max", v)
                    .with("count", 1.0);
                r.rounds = vec![v];
            }
            r
        };
        let m = b.asked;
        rows.extend([
            one(
                &format!("{m} containers started at once: last `start` event → all in the map"),
                b.last_start_to_all_in_map_ms,
            ),
            one(
                &format!(
                    "{m} containers started at once: last `docker run` returned → all in the map"
                ),
                b.last_return_to_all_in_map_ms,
            ),
            one(
                &format!("{m} containers started at once: first `docker run` sent → last returned"),
                Some(b.runs_ms),
            ),
        ]);
        targets.push(Target {
            bar: format!(
                "{m} containers started at once: last `start` event → all in the map within 1 s"
            ),
            actual: match b.last_start_to_all_in_map_ms {
                Some(v) => format!(
                    "{v:.1} ms ({} of {m} started, {} in the map at the end{})",
                    b.started,
                    b.in_map_at_end,
                    if b.problems.is_empty() {
                        String::new()
                    } else {
                        format!("; {}", b.problems.join("; "))
                    }
                ),
                None => format!("not measured: {}", b.problems.join("; ")),
            },
            met: b.started == m
                && b.in_map_at_end == m
                && b.last_start_to_all_in_map_ms.is_some_and(|v| v < 1_000.0),
        });
        notes.push(format!(
            "Burst: after the rounds, {m} more containers of the service were started at once              ({BURST_WORKERS} `docker run -d` in flight at a time), while a thread read the              pinned maps every millisecond (the service's active table and `LB_BACKENDS`,              whole); the figure is from the last of their `start` events (the engine's clock)              to the first read that held all of them, each with an active entry and slots in              the active table. The first `docker run` to the last returning took {:.1} s.",
            b.runs_ms / 1e3
        ));
    }
    Section {
        key: "docker".into(),
        title: "Docker: containers dying and starting".into(),
        method: "A real `lb run` following the real Docker engine; per round one container \
                 started with `docker run` and then SIGKILLed from the host; times from the \
                 engine's events, the daemon's pinned maps read every 100 µs, and requests \
                 through the VIP; p50, p99 and max over the rounds."
            .into(),
        rounds: n,
        columns: vec![
            Column::new("p50", "p50 (ms)", 2),
            Column::new("p99", "p99 (ms)", 2),
            Column::new("max", "max (ms)", 2),
            Column::new("count", "rounds", 0),
        ],
        rows,
        targets,
        chart: Some("p99".into()),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_parse() {
        let line = concat!(
            r#"{"status":"die","id":"abc","from":"lb-test/busybox:1","Type":"container","#,
            r#""Action":"die","Actor":{"ID":"abc","Attributes":{"exitCode":"137","#,
            r#""name":"lbbd-v0"}},"scope":"local","time":1700000000,"#,
            r#""timeNano":1700000000123456789}"#
        );
        let e = Event::parse(line).expect("parses");
        assert_eq!(e.action, "die");
        assert_eq!(e.id, "abc");
        assert_eq!(e.name, "lbbd-v0");
        assert_eq!(e.at_ns, 1_700_000_000_123_456_789);
        assert!(Event::parse("not json").is_none());
    }

    #[test]
    fn flips_hold_by_active_entry_and_slot() {
        let addr = Ipv4Addr::new(198, 18, 0, 5);
        let f = Flip {
            at_ns: 0,
            window_ns: 0,
            table: [3].into_iter().collect(),
            active: [(stored(addr, 8080), 3)].into_iter().collect(),
        };
        assert!(f.holds(addr, 8080));
        assert!(!f.holds(addr, 8081));
        let g = Flip {
            table: [4].into_iter().collect(),
            ..f.clone()
        };
        assert!(!g.holds(addr, 8080));
    }
}
