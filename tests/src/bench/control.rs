//! The control plane: a real `lb run` (three backends in namespaces, one
//! service from its config file) takes backend changes through its admin
//! API, one at a time as an operator's script would send them; the figures
//! are the time until the last change is in the maps, each change's latency
//! as the client sees it, and the daemon's memory before and after.
//!
//! The daemon answers a change only once it has written the maps, so the
//! last change's answer is when it is in the map; the benchmark then reads
//! the daemon's pinned maps itself and checks that every added backend has
//! an active entry and slots in the service's active Maglev table.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    fs,
    io::{ErrorKind, Read as _, Write as _},
    net::Ipv4Addr,
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData};
use lb::api::types::{BackendInfo, BackendState};
use lb_common::{maps, Backend, ServiceKey, ServiceValue, BACKEND_ACTIVE, IPPROTO_TCP};

use super::{
    open_pinned,
    report::{percentile, Column, Row, Section},
    scale::thousands,
    PinDir,
};
use crate::{render_config, Daemon, ServiceConfig, TempDir, Topology, READY_MARKER};

/// The longest the benchmark waits for the answer to a change (it then
/// stops sending changes).
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// The longest it waits for the answer to a read (it then counts it as
/// unanswered).
const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// First port of the added backends (on the topology's backend addresses).
const FIRST_PORT: u16 = 10_000;

/// An answer of the admin API.
struct Answer {
    status: u16,
    body: String,
}

/// One HTTP/1.1 request over the admin socket (a fresh connection per
/// request, as the CLI makes); `None` if no answer came within `timeout`.
fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> Option<Answer> {
    let mut s = UnixStream::connect(socket)
        .unwrap_or_else(|e| panic!("connecting to {}: {e}", socket.display()));
    s.set_read_timeout(Some(timeout)).expect("read timeout");
    s.set_write_timeout(Some(timeout)).expect("write timeout");
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes())
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let mut raw = Vec::new();
    match s.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return None;
        }
        Err(e) => panic!("{method} {path}: reading the answer: {e}"),
    }
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("{method} {path}: not an HTTP answer: {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{method} {path}: no status in {head:?}"));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_owned()
    };
    Some(Answer { status, body })
}

/// The body of a chunked HTTP/1.1 message.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    // Bounded: each turn consumes at least one line.
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// `RssAnon` (the process's own heap and stacks) and `VmRSS` (with its
/// binary and the memory-mapped Maglev array, which is the kernel's map
/// memory, not more of it) of process `pid`, in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("RssAnon:"), field("VmRSS:"))
}

/// What the pinned maps say about the added backends.
struct InMaps {
    /// Added backends with an active entry in `LB_BACKENDS`.
    active: usize,
    /// Added backends with at least one slot in the service's active table.
    in_table: usize,
}

/// Reads the daemon's pinned maps: which of `added` have an active backend
/// entry and slots in the active Maglev table of `vip:port`/TCP.
fn read_pinned(dir: &Path, vip: Ipv4Addr, port: u16, added: &[(Ipv4Addr, u16)]) -> InMaps {
    let open = |name: &str| open_pinned(dir, name);
    let backends: Array<MapData, Backend> =
        Array::try_from(open(maps::BACKENDS)).expect("LB_BACKENDS is an array");
    let services: HashMap<MapData, ServiceKey, ServiceValue> =
        HashMap::try_from(open(maps::SERVICES)).expect("LB_SERVICES is a hash");
    let maglev: Array<MapData, u32> =
        Array::try_from(open(maps::MAGLEV)).expect("LB_MAGLEV is an array");
    let mut ids: StdHashMap<(u32, u16), (u32, u32)> = StdHashMap::new();
    for id in 0..backends.len() {
        if let Ok(b) = backends.get(&id, 0) {
            if b.addr != 0 {
                ids.insert((b.addr, b.port), (id, b.state));
            }
        }
    }
    let svc = services
        .get(&ServiceKey::new(vip.octets(), port, IPPROTO_TCP), 0)
        .expect("the service is in LB_SERVICES");
    let slots: HashSet<u32> = (svc.table_base..svc.table_base + svc.table_size)
        .filter_map(|i| maglev.get(&i, 0).ok())
        .collect();
    let mut found = InMaps {
        active: 0,
        in_table: 0,
    };
    for (addr, p) in added {
        let key = (
            u32::from_ne_bytes(addr.octets()),
            u16::from_ne_bytes(p.to_be_bytes()),
        );
        if let Some(&(id, state)) = ids.get(&key) {
            if state == BACKEND_ACTIVE {
                found.active += 1;
            }
            if slots.contains(&id) {
                found.in_table += 1;
            }
        }
    }
    found
}

/// What one run measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Changes asked for.
    pub changes: usize,
    /// Changes applied before the time budget ran out (all of them unless
    /// the daemon was too slow).
    pub applied: usize,
    /// The time budget.
    pub budget: Duration,
    /// From the first request to the last answer.
    pub total: Duration,
    /// Seconds from the first request until the `n`th change was answered
    /// (so in the map), for `n` = 100, 200, 500, 1,000 up to `changes`;
    /// `None` when the budget ran out first.
    pub milestones: Vec<(usize, Option<f64>)>,
    /// Each applied change's latency as the client saw it, in ms.
    pub latencies_ms: Vec<f64>,
    /// Applied backends with an active entry in the pinned `LB_BACKENDS`.
    pub active_in_map: usize,
    /// Applied backends with slots in the service's active Maglev table.
    pub in_table: usize,
    /// Backends the API lists for the service, and how many are active
    /// (asked only when every change was applied: a slow daemon may take
    /// as long to answer a list as a change).
    pub api_listed: Option<(usize, usize)>,
    /// Whether a change went unanswered for `CHANGE_TIMEOUT` (60 s), after
    /// which no more were sent.
    pub unanswered: bool,
    /// Idle API calls unanswered within 30 s (counted as 30 s in
    /// `idle_api_ms`).
    pub idle_unanswered: usize,
    /// Latencies in ms of `GET /v1/services` sent every 200 ms for a
    /// while after the changes, with the daemon otherwise idle.
    pub idle_api_ms: Vec<f64>,
    /// Daemon `RssAnon` once ready, in KiB.
    pub rss_ready_kib: u64,
    /// Daemon `RssAnon` after the changes, in KiB.
    pub rss_after_kib: u64,
    /// Daemon `VmRSS` after the changes, in KiB.
    pub vm_rss_after_kib: u64,
}

/// Starts a daemon over a three-backend topology and applies up to
/// `changes` backend additions through its admin API, one at a time,
/// sending no new one once `budget` has passed.
pub fn measure(changes: usize, budget: Duration, probe: Duration) -> Outcome {
    crate::require_root();
    assert!(
        changes <= 3 * usize::from(u16::MAX - FIRST_PORT),
        "too many changes"
    );
    // Dropped in reverse order: daemon, temporary files, pins, topology.
    let topo = Topology::new("lbbc", 3);
    let pins = PinDir::new("control");
    let dir = TempDir::new("bench-control");
    let web = ServiceConfig::new(
        "web",
        &format!("{}:80", topo.vip()),
        "tcp",
        &topo.backend_endpoints(8080),
    );
    let config = render_config(&[&topo.client_host_if()], &[web]).replacen(
        "[datapath]\n",
        &format!("[datapath]\npin_path = \"{}\"\n", pins.path().display()),
        1,
    );
    let config_path = dir.write("lb.toml", &config);
    let socket = dir.path().join("lb.sock");
    let config_arg = config_path.to_str().expect("UTF-8 path");
    let socket_arg = socket.to_str().expect("UTF-8 path");
    let daemon = Daemon::start(
        &["run", "--config", config_arg, "--socket", socket_arg],
        READY_MARKER,
        Duration::from_secs(60),
    );
    let pid = daemon.pid().expect("running");
    let (rss_ready_kib, _) = rss_kib(pid);

    let wanted: Vec<(Ipv4Addr, u16)> = (0..changes)
        .map(|i| (topo.backend_addr(i % 3), FIRST_PORT + (i / 3) as u16))
        .collect();
    let mut milestones: Vec<(usize, Option<f64>)> = [100, 200, 500, 1_000]
        .into_iter()
        .filter(|&m| m < changes)
        .chain([changes])
        .map(|m| (m, None))
        .collect();
    let mut latencies_ms = Vec::with_capacity(changes);
    let mut unanswered = false;
    let start = Instant::now();
    for (i, (addr, port)) in wanted.iter().enumerate() {
        if start.elapsed() > budget {
            eprintln!(
                "control: time budget of {} s spent after {i} of {changes} changes",
                budget.as_secs()
            );
            break;
        }
        let body = format!("{{\"address\":\"{addr}:{port}\"}}");
        let t = Instant::now();
        let path = "/v1/services/web/backends";
        let Some(a) = call(&socket, "POST", path, Some(&body), CHANGE_TIMEOUT) else {
            eprintln!(
                "control: change {i} unanswered after {} s: no more changes sent",
                CHANGE_TIMEOUT.as_secs()
            );
            unanswered = true;
            break;
        };
        latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(
            a.status, 201,
            "adding backend {addr}:{port} (change {i}): {}",
            a.body
        );
        let done = i + 1;
        for m in milestones.iter_mut().filter(|m| m.0 == done) {
            m.1 = Some(start.elapsed().as_secs_f64());
        }
        if done % 100 == 0 {
            eprintln!(
                "control: {done} of {changes} changes applied, {:.1} s",
                start.elapsed().as_secs_f64()
            );
        }
    }
    let total = start.elapsed();
    let applied = latencies_ms.len();

    let found = read_pinned(&pins.datapath_dir(), topo.vip(), 80, &wanted[..applied]);
    let api_listed = (applied == changes)
        .then(|| {
            call(
                &socket,
                "GET",
                "/v1/services/web/backends",
                None,
                READ_TIMEOUT,
            )
        })
        .flatten()
        .map(|a| {
            assert_eq!(a.status, 200, "listing backends: {}", a.body);
            let listed: Vec<BackendInfo> = serde_json::from_str(&a.body)
                .unwrap_or_else(|e| panic!("backend list does not parse ({e}): {}", a.body));
            let active = listed
                .iter()
                .filter(|b| b.state == BackendState::Active)
                .count();
            (listed.len(), active)
        });
    // How long an idle daemon with this many backends takes to answer.
    let mut idle_api_ms = Vec::new();
    let mut idle_unanswered = 0;
    let probe_start = Instant::now();
    while probe_start.elapsed() < probe {
        let t = Instant::now();
        match call(&socket, "GET", "/v1/services", None, READ_TIMEOUT) {
            Some(a) => assert_eq!(a.status, 200, "listing services: {}", a.body),
            None => idle_unanswered += 1,
        }
        idle_api_ms.push(t.elapsed().as_secs_f64() * 1e3);
        std::thread::sleep(Duration::from_millis(200));
    }
    let (rss_after_kib, vm_rss_after_kib) = rss_kib(pid);
    drop(daemon);
    drop(dir);
    drop(pins);
    drop(topo);
    Outcome {
        changes,
        applied,
        budget,
        total,
        milestones,
        latencies_ms,
        active_in_map: found.active,
        in_table: found.in_table,
        api_listed,
        unanswered,
        idle_api_ms,
        idle_unanswered,
        rss_ready_kib,
        rss_after_kib,
        vm_rss_after_kib,
    }
}

/// Runs the section: 1,000 changes sent within 120 s, then 12 s of idle
/// API calls (`quick`: 500 within 20 s, then 3 s: with more backends the
/// daemon's periodic refresh alone can outlast a quick run).
pub fn run(quick: bool) -> Section {
    if quick {
        run_with(500, Duration::from_secs(20), Duration::from_secs(3))
    } else {
        run_with(1_000, Duration::from_secs(120), Duration::from_secs(12))
    }
}

/// Runs the section with up to `changes` changes sent within `budget`, then
/// idle API calls for `probe`.
pub fn run_with(changes: usize, budget: Duration, probe: Duration) -> Section {
    let o = measure(changes, budget, probe);
    assert_eq!(
        (o.active_in_map, o.in_table),
        (o.applied, o.applied),
        "every applied backend must be active in the map and in the table"
    );
    if let Some(listed) = o.api_listed {
        assert_eq!(
            listed,
            (o.applied + 3, o.applied + 3),
            "the API lists every backend as active"
        );
    }
    section(&o)
}

/// The section's table and notes from one run's figures.
pub fn section(o: &Outcome) -> Section {
    let n = thousands(o.changes as u64);
    let applied = thousands(o.applied as u64);
    let secs = o.total.as_secs_f64();
    let lat = &o.latencies_ms;
    let mib = |kib: u64| kib as f64 / 1024.0;
    let stopped = if o.unanswered {
        format!(
            "a change went unanswered for {} s",
            CHANGE_TIMEOUT.as_secs()
        )
    } else {
        format!("the {} s budget ran out", o.budget.as_secs())
    };
    let mut rows = Vec::new();
    for &(m, at) in &o.milestones {
        let what = if m == o.changes {
            format!(
                "{} backend additions, until the last is in the map",
                thousands(m as u64)
            )
        } else {
            format!("first {} backend additions in the map", thousands(m as u64))
        };
        rows.push(match at {
            Some(s) => Row::new(&what)
                .with("s", s)
                .with("per_s", m as f64 / s.max(f64::MIN_POSITIVE)),
            None => Row::new(&format!("{what}: not reached ({stopped})")),
        });
    }
    if o.applied < o.changes {
        rows.push(
            Row::new(&format!("applied (of {n}) before {stopped}"))
                .with("s", secs)
                .with("per_s", o.applied as f64 / secs.max(f64::MIN_POSITIVE))
                .with("count", o.applied as f64),
        );
    }
    rows.extend([
        Row::new("per change, median (client latency)").with("ms", percentile(lat, 50.0)),
        Row::new("per change, p99").with("ms", percentile(lat, 99.0)),
        Row::new("per change, slowest").with("ms", percentile(lat, 100.0)),
        Row::new(&format!(
            "idle API answer at {} backends, median (GET /v1/services)",
            thousands(o.applied as u64 + 3)
        ))
        .with("ms", percentile(&o.idle_api_ms, 50.0))
        .with("count", o.idle_api_ms.len() as f64),
        Row::new("idle API answer, mean").with(
            "ms",
            o.idle_api_ms.iter().sum::<f64>() / o.idle_api_ms.len().max(1) as f64,
        ),
        Row::new("idle API answer, slowest").with("ms", percentile(&o.idle_api_ms, 100.0)),
        Row::new(&format!(
            "applied backends active in the pinned map (of {applied})"
        ))
        .with("count", o.active_in_map as f64),
        Row::new(&format!(
            "applied backends in the active Maglev table (of {applied})"
        ))
        .with("count", o.in_table as f64),
        Row::new("daemon's own memory (RssAnon), ready (1 service, 3 backends)")
            .with("mib", mib(o.rss_ready_kib)),
        Row::new(&format!(
            "daemon's own memory (RssAnon), after {applied} additions"
        ))
        .with("mib", mib(o.rss_after_kib))
        .with("count", (o.applied + 3) as f64),
        Row::new("daemon VmRSS (with its binary and the mapped Maglev array)")
            .with("mib", mib(o.vm_rss_after_kib)),
    ]);
    let mut notes = vec![format!(
        "`lb run` over three backend namespaces, one service from its config file, default \
         map sizes; `POST /v1/services/web/backends` sent one after the other over the admin \
         socket (a new connection each, as the CLI does), {n} backends on 198.18.103-105.2, \
         ports {FIRST_PORT} and up: they need not answer, but the daemon resolves each like \
         a real one (route, neighbour, veth peer). It answers a change once the maps hold \
         it, so an answer is when that change is in the map. Afterwards the pinned maps were \
         read: {} of the {applied} applied backends have an active entry and {} have slots \
         in the service's active Maglev table{}. RssAnon is the daemon process's own memory \
         (heap and stacks); VmRSS adds its binary and the Maglev array it maps to write \
         tables, which is the kernel's map memory (see how cost grows), not more of it.",
        thousands(o.active_in_map as u64),
        thousands(o.in_table as u64),
        match o.api_listed {
            Some((all, active)) => format!(
                "; the API lists {} backends, {} active",
                thousands(all as u64),
                thousands(active as u64)
            ),
            None => String::new(),
        }
    )];
    let slow = lat.iter().filter(|&&l| l > 1_000.0).count();
    let idle_max = percentile(&o.idle_api_ms, 100.0);
    let mut facts = Vec::new();
    if slow > 0 {
        facts.push(format!(
            "{slow} of the changes took over a second (the slowest {:.1} s)",
            percentile(lat, 100.0) / 1e3
        ));
    }
    if o.applied < o.changes {
        facts.push(format!(
            "only {applied} of {n} were applied before {stopped}"
        ));
    }
    if idle_max > 1_000.0 {
        facts.push(format!(
            "with {} backends the slowest of {} idle `GET /v1/services` took {:.1} s{}",
            thousands(o.applied as u64 + 3),
            o.idle_api_ms.len(),
            idle_max / 1e3,
            if o.idle_unanswered > 0 {
                format!(
                    " ({} unanswered after {} s)",
                    o.idle_unanswered,
                    READ_TIMEOUT.as_secs()
                )
            } else {
                String::new()
            },
        ));
    }
    if !facts.is_empty() {
        let facts = facts.join("; ");
        let mut chars = facts.chars();
        let facts: String = chars
            .next()
            .map(|c| c.to_uppercase().chain(chars).collect())
            .unwrap_or_default();
        notes.push(format!(
            "{facts}. One task owns the maps and answers the API, and every 5 s it \
             re-resolves every backend (`refresh`: `ip` processes for the route, link and \
             neighbour of each), taking no request meanwhile; so a request that arrives \
             during a refresh waits for it, and a refresh takes longer the more backends \
             there are.{} A change itself resolves its one new backend the same way (median \
             {:.1} ms).",
            if idle_max > 5_000.0 || percentile(lat, 100.0) > 5_000.0 {
                " A wait longer than 5 s means refreshes ran back to back: once one takes \
                 longer than the interval, the missed tick fires at once, and a request only \
                 gets in when the task happens to pick it over the next refresh."
            } else {
                ""
            },
            percentile(lat, 50.0),
        ));
    }
    Section {
        key: "control".into(),
        title: "Control plane".into(),
        method: "A real `lb run`; backend additions through the admin API one at a time, no \
                 new one sent once the time budget is spent (or once one goes unanswered for \
                 60 s); latency as the client sees it \
                 (request sent to answer read); figures from one run."
            .into(),
        rounds: 1,
        columns: vec![
            Column::new("s", "time (s)", 2),
            Column::new("per_s", "changes/s", 1),
            Column::new("ms", "latency (ms)", 1),
            Column::new("mib", "RSS (MiB)", 1),
            Column::new("count", "count", 0),
        ],
        rows,
        targets: Vec::new(),
        chart: Some("ms".into()),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_bodies() {
        assert_eq!(dechunk("4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"), "Wikipedia");
        assert_eq!(dechunk("0\r\n\r\n"), "");
    }
}
