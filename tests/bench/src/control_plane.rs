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
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, HashMap, MapData};
use lb::api::types::{BackendInfo, BackendState};
use lb_common::{maps, Backend, ServiceKey, ServiceValue, BACKEND_ACTIVE, IPPROTO_TCP};
use lb_harness::{render_config, Daemon, ServiceConfig, TempDir, Topology, READY_MARKER};

use crate::{
    open_pinned,
    report::{percentile, Column, Row, Section, Target},
    scale::thousands,
    PinDir,
};

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
    lb_harness::require_root();
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

    let found = read_pinned(
        &pins.datapath_dir(),
        topo.vip(),
        &[(80, wanted[..applied].to_vec())],
    );
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
/// API calls; 10,000 backends over 1,000 services by batch calls; 200 API
/// changes with 1,000,000 flows in the table, without and with a `/metrics`
/// scraper (`quick`: 500 changes within 20 s and 3 s idle; 1,000 backends
/// over 100 services; 100 changes with 100,000 flows).
pub fn run(quick: bool) -> Section {
    let (changes, budget, probe, services, flows, calls) = if quick {
        (500, 20, 3, 100, 100_000, 100)
    } else {
        (1_000, 120, 12, 1_000, 1_000_000, 200)
    };
    let mut s = run_with(
        changes,
        Duration::from_secs(budget),
        Duration::from_secs(probe),
    );
    // One after the other, as a script would; then 16 at a time, as a
    // deploy tool would (the daemon commits what arrives together once).
    add_batch(&mut s, &measure_batch(services, 10, 1));
    add_batch(&mut s, &measure_batch(services, 10, 16));
    add_scrape(&mut s, &measure_scrape(flows, calls));
    s
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
        "`lb run` over three backend namespaces, one service from its config file (the \
         default Maglev table of {} slots), default map sizes; \
         `POST /v1/services/web/backends` sent one after the other over the admin socket (a new connection each, as the CLI does), {n} backends on 198.18.103-105.2, \
         ports {FIRST_PORT} and up: they need not answer, but the daemon resolves each like \
         a real one (route, neighbour, veth peer). It answers a change once the maps hold \
         it, so an answer is when that change is in the map. Afterwards the pinned maps were \
         read: {} of the {applied} applied backends have an active entry and {} have slots \
         in the service's active Maglev table{}. RssAnon is the daemon process's own memory \
         (heap and stacks); VmRSS adds its binary and the Maglev array it maps to write \
         tables, which is the kernel's map memory (see how cost grows), not more of it.",
        thousands(lb_common::defaults::TABLE_SIZE.into()),
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
        targets: vec![Target {
            bar: format!("{n} single backend additions through the API, one call each, in the map within 1 s"),
            actual: match o.milestones.last() {
                Some(&(_, Some(s))) if o.applied == o.changes => format!(
                    "{s:.2} s; pinned maps: {} active, {} in the table",
                    thousands(o.active_in_map as u64),
                    thousands(o.in_table as u64)
                ),
                _ => format!("only {applied} of {n} applied before {stopped}"),
            },
            met: o.applied == o.changes
                && o.active_in_map == o.applied
                && o.in_table == o.applied
                && o.milestones.last().and_then(|m| m.1).is_some_and(|s| s < 1.0),
        }],
        chart: Some("ms".into()),
        notes,
    }
}

// ---------------------------------------------------------------------------
// Many services, their backends set by batch calls.

/// Slots of each batch service's Maglev table (prime, small: 1,000 of them
/// must fit the Maglev map twice over).
const BATCH_TABLE_SIZE: u32 = 251;
/// First port of the batch services on the VIP.
const BATCH_FIRST_VIP_PORT: u16 = 20_000;

/// The daemon, its topology, pins and files, for one measurement (dropped
/// daemon first, topology last).
struct Rig {
    daemon: Option<Daemon>,
    socket: std::path::PathBuf,
    _dir: TempDir,
    pins: PinDir,
    topo: Topology,
}

impl Rig {
    /// A daemon over a three-backend topology, its `web` service (VIP:80,
    /// the three backends on 8080) with `table_size`; `datapath` is added to
    /// the `[datapath]` section and `args` to `lb run`'s.
    fn start(tag: &str, datapath: &str, table_size: Option<u32>, args: &[&str]) -> Self {
        let topo = Topology::new("lbbc", 3);
        let pins = PinDir::new(tag);
        let dir = TempDir::new(&format!("bench-{tag}"));
        let web = ServiceConfig::new(
            "web",
            &format!("{}:80", topo.vip()),
            "tcp",
            &topo.backend_endpoints(8080),
        );
        let mut config = render_config(&[&topo.client_host_if()], &[web]).replacen(
            "[datapath]\n",
            &format!(
                "[datapath]\npin_path = \"{}\"\n{datapath}",
                pins.path().display()
            ),
            1,
        );
        if let Some(t) = table_size {
            config = config.replacen(
                "protocol = \"tcp\"\n",
                &format!("protocol = \"tcp\"\ntable_size = {t}\n"),
                1,
            );
        }
        let config_path = dir.write("lb.toml", &config);
        let socket = dir.path().join("lb.sock");
        let config_arg = config_path.to_str().expect("UTF-8 path");
        let socket_arg = socket.to_str().expect("UTF-8 path");
        let mut all = vec!["run", "--config", config_arg, "--socket", socket_arg];
        all.extend_from_slice(args);
        let daemon = Daemon::start(&all, READY_MARKER, Duration::from_secs(60));
        Self {
            daemon: Some(daemon),
            socket,
            _dir: dir,
            pins,
            topo,
        }
    }

    fn pid(&self) -> u32 {
        self.daemon
            .as_ref()
            .and_then(Daemon::pid)
            .expect("the daemon runs")
    }

    /// Stops the daemon (the rest goes when dropped); `true` if it exited
    /// successfully.
    fn stop_daemon(&mut self) -> bool {
        self.daemon
            .take()
            .is_some_and(|mut d| d.is_running() && d.stop().success())
    }
}

/// Reads the pinned maps once: for each of `services` (VIP port, backends
/// wanted), how many of its backends have an active entry and how many have
/// slots in its active Maglev table.
fn read_pinned(dir: &Path, vip: Ipv4Addr, services: &[(u16, Vec<(Ipv4Addr, u16)>)]) -> InMaps {
    let open = |name: &str| open_pinned(dir, name);
    let backends: Array<MapData, Backend> =
        Array::try_from(open(maps::BACKENDS)).expect("LB_BACKENDS is an array");
    let svcs: HashMap<MapData, ServiceKey, ServiceValue> =
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
    let mut found = InMaps {
        active: 0,
        in_table: 0,
    };
    for (port, wanted) in services {
        let Ok(svc) = svcs.get(&ServiceKey::new(vip.octets(), *port, IPPROTO_TCP), 0) else {
            continue;
        };
        let slots: HashSet<u32> = (svc.table_base..svc.table_base + svc.table_size)
            .filter_map(|i| maglev.get(&i, 0).ok())
            .collect();
        for (addr, p) in wanted {
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
    }
    found
}

/// What [`in_parallel`] saw.
struct Sent {
    /// Each call's latency, in ms, of those answered well.
    latencies_ms: Vec<f64>,
    /// The first failure; no call is sent after it.
    failed: Option<String>,
}

/// Makes calls `0..n` with `call`, at most `in_flight` at a time, each from
/// one of `in_flight` threads taking the next index; stops at the first
/// failure.
fn in_parallel(
    n: usize,
    in_flight: usize,
    call: impl Fn(usize) -> Result<(), String> + Sync,
) -> Sent {
    let next = AtomicUsize::new(0);
    let out = Mutex::new(Sent {
        latencies_ms: Vec::with_capacity(n),
        failed: None,
    });
    std::thread::scope(|scope| {
        for _ in 0..in_flight.max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || out.lock().expect("not poisoned").failed.is_some() {
                    return;
                }
                let t = Instant::now();
                let r = call(i);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let mut o = out.lock().expect("not poisoned");
                match r {
                    Ok(()) => o.latencies_ms.push(ms),
                    Err(e) => {
                        o.failed.get_or_insert(e);
                    }
                }
            });
        }
    });
    out.into_inner().expect("not poisoned")
}

/// What the batch run measured.
#[derive(Clone, Debug)]
pub struct BatchOutcome {
    /// Services created through the API (besides `web`).
    pub services: usize,
    /// Backends set per service.
    pub per_service: usize,
    /// API calls in flight at once (1: one after the other).
    pub in_flight: usize,
    /// Time to create the services, one `POST /v1/services` each.
    pub create: Duration,
    /// From the first `PUT …/backends` sent to the last answered.
    pub total: Duration,
    /// Each batch call's latency, in ms.
    pub latencies_ms: Vec<f64>,
    /// Batch calls that failed or went unanswered (the run stops at the
    /// first).
    pub failed: Option<String>,
    /// Backends with an active entry in the pinned `LB_BACKENDS`.
    pub active_in_map: usize,
    /// Backends with slots in their service's active Maglev table.
    pub in_table: usize,
    /// Daemon `RssAnon` once ready, KiB.
    pub rss_ready_kib: u64,
    /// Daemon `RssAnon` with every backend in, KiB.
    pub rss_after_kib: u64,
    /// Daemon `VmRSS` with every backend in, KiB.
    pub vm_rss_after_kib: u64,
    /// Whether the daemon exited successfully on SIGTERM.
    pub daemon_clean_exit: bool,
    /// The pin path (removed by the time `measure_batch` returns).
    pub pin_path: std::path::PathBuf,
}

/// Starts a daemon sized for `services` more services of `per_service`
/// backends each (table size 251), creates the services through the API
/// one call each, then sets each one's backends with one
/// `PUT /v1/services/{name}/backends`, and reads the pinned maps.
pub fn measure_batch(services: usize, per_service: usize, in_flight: usize) -> BatchOutcome {
    lb_harness::require_root();
    let total_backends = services * per_service;
    assert!(
        total_backends <= 3 * usize::from(u16::MAX - FIRST_PORT),
        "too many backends"
    );
    assert!(services <= usize::from(u16::MAX - BATCH_FIRST_VIP_PORT));
    let datapath = format!(
        "max_services = {}\nmax_backends = {}\nmax_table_size = {BATCH_TABLE_SIZE}\n",
        services + 1,
        total_backends + 10
    );
    let mut rig = Rig::start("control-batch", &datapath, Some(BATCH_TABLE_SIZE), &[]);
    let pid = rig.pid();
    let (rss_ready_kib, _) = rss_kib(pid);
    let vip = rig.topo.vip();
    let socket = rig.socket.clone();

    let t = Instant::now();
    let created = in_parallel(services, in_flight, |s| {
        let body = format!(
            "{{\"name\":\"s{s}\",\"vip\":\"{vip}:{}\",\"table_size\":{BATCH_TABLE_SIZE}}}",
            BATCH_FIRST_VIP_PORT + s as u16
        );
        match call(&socket, "POST", "/v1/services", Some(&body), CHANGE_TIMEOUT) {
            Some(a) if a.status == 201 => Ok(()),
            Some(a) => Err(format!("creating service s{s}: {} {}", a.status, a.body)),
            None => Err(format!("creating service s{s}: unanswered")),
        }
    });
    if let Err(e) = created.failed.map_or(Ok(()), Err) {
        panic!("{e}");
    }
    let create = t.elapsed();
    eprintln!(
        "control: {services} services created in {:.2} s",
        create.as_secs_f64()
    );

    let plan: Vec<(u16, Vec<(Ipv4Addr, u16)>)> = (0..services)
        .map(|s| {
            let backends = (0..per_service)
                .map(|j| {
                    let i = s * per_service + j;
                    (rig.topo.backend_addr(i % 3), FIRST_PORT + (i / 3) as u16)
                })
                .collect();
            (BATCH_FIRST_VIP_PORT + s as u16, backends)
        })
        .collect();
    let bodies: Vec<String> = plan
        .iter()
        .map(|(_, b)| {
            let items: Vec<String> = b
                .iter()
                .map(|(a, p)| format!("{{\"address\":\"{a}:{p}\",\"weight\":1}}"))
                .collect();
            format!("[{}]", items.join(","))
        })
        .collect();
    let start = Instant::now();
    let sent = in_parallel(services, in_flight, |s| {
        let path = format!("/v1/services/s{s}/backends");
        match call(&socket, "PUT", &path, Some(&bodies[s]), CHANGE_TIMEOUT) {
            Some(a) if a.status == 200 => Ok(()),
            Some(a) => Err(format!("PUT {path}: {} {}", a.status, a.body)),
            None => Err(format!(
                "PUT {path}: unanswered after {} s",
                CHANGE_TIMEOUT.as_secs()
            )),
        }
    });
    let (latencies_ms, failed) = (sent.latencies_ms, sent.failed);
    let total = start.elapsed();
    if let Some(f) = &failed {
        eprintln!("control: batch run stopped: {f}");
    }
    eprintln!(
        "control: {} backends over {} services set in {:.2} s",
        latencies_ms.len() * per_service,
        latencies_ms.len(),
        total.as_secs_f64()
    );
    let found = read_pinned(&rig.pins.datapath_dir(), vip, &plan);
    let (rss_after_kib, vm_rss_after_kib) = rss_kib(pid);
    let daemon_clean_exit = rig.stop_daemon();
    let pin_path = rig.pins.path().to_path_buf();
    drop(rig);
    BatchOutcome {
        services,
        per_service,
        in_flight,
        create,
        total,
        latencies_ms,
        failed,
        active_in_map: found.active,
        in_table: found.in_table,
        rss_ready_kib,
        rss_after_kib,
        vm_rss_after_kib,
        daemon_clean_exit,
        pin_path,
    }
}

// ---------------------------------------------------------------------------
// API changes while /metrics is scraped, with the flow table full.

/// How often the scraper asks for `/metrics`.
const SCRAPE_EVERY: Duration = Duration::from_millis(100);
/// Scraping before the measured calls begin.
const SCRAPE_WARMUP: Duration = Duration::from_secs(2);

/// What the scrape run measured.
#[derive(Clone, Debug)]
pub struct ScrapeOutcome {
    /// Flows written into `LB_FLOWS`.
    pub flows: usize,
    /// Entries the table then held.
    pub flows_in_table: usize,
    /// Seconds spent writing them.
    pub fill_secs: f64,
    /// API change latencies (ms) with no scraper.
    pub idle_ms: Vec<f64>,
    /// API change latencies (ms) while `/metrics` is scraped.
    pub scraped_ms: Vec<f64>,
    /// `GET /metrics` latencies (ms).
    pub scrape_ms: Vec<f64>,
    /// Scrapes that failed.
    pub scrape_failed: usize,
    /// Bytes of the last `/metrics` answer.
    pub metrics_bytes: usize,
    /// Whether the daemon exited successfully on SIGTERM.
    pub daemon_clean_exit: bool,
    /// The pin path (removed by the time `measure_scrape` returns).
    pub pin_path: std::path::PathBuf,
}

/// A free TCP port on 127.0.0.1 (bound and released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

/// `GET /metrics` from `addr`: the body's length, or why not.
fn scrape(addr: std::net::SocketAddr) -> Result<usize, String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, READ_TIMEOUT)
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(READ_TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    if !text.starts_with("HTTP/1.1 200") {
        return Err(text.lines().next().unwrap_or_default().to_owned());
    }
    Ok(text.split_once("\r\n\r\n").map_or(0, |(_, b)| b.len()))
}

/// Writes `n` flows to the VIP's port 80 into the pinned `LB_FLOWS`,
/// spread over the CPUs this thread may use (an LRU with per-CPU lists
/// takes an entry from the inserting CPU's list), all on `backend_id`, last
/// seen now. Returns how many entries the table then holds.
fn fill_flows(dir: &Path, vip: Ipv4Addr, n: usize, backend_id: u32) -> usize {
    use lb_common::{Flow, FlowKey};
    let mut flows: HashMap<MapData, FlowKey, Flow> =
        HashMap::try_from(open_pinned(dir, maps::FLOWS)).expect("LB_FLOWS is a hash");
    let now = crate::scale::now_secs();
    let cpus = crate::scale::allowed_cpus();
    for (k, &cpu) in cpus.iter().enumerate() {
        crate::scale::on_cpu(cpu, || {
            for i in (k..n).step_by(cpus.len()) {
                // Clients 198.19.x.y, 50,000 source ports each.
                let src = u32::from(Ipv4Addr::new(198, 19, 0, 1)) + (i / 50_000) as u32;
                let key = FlowKey {
                    src_addr: u32::from_ne_bytes(Ipv4Addr::from(src).octets()),
                    dst_addr: u32::from_ne_bytes(vip.octets()),
                    src_port: u16::from_ne_bytes((10_000 + (i % 50_000) as u16).to_be_bytes()),
                    dst_port: u16::from_ne_bytes(80u16.to_be_bytes()),
                    proto: IPPROTO_TCP,
                    _pad1: 0,
                    _pad2: 0,
                };
                let value = Flow {
                    backend_id,
                    ifindex: 1,
                    last_seen: now,
                    ..Flow::default()
                };
                flows.insert(key, value, 0).expect("flow written");
            }
        });
    }
    flows.keys().filter(Result::is_ok).count()
}

/// One API change every this long in the scrape run, so that the changes
/// span many scrapes.
const CHANGE_PACE: Duration = Duration::from_millis(20);

/// `calls` API changes to `web` (a backend added, then removed, and so
/// on), one at a time, one begun every [`CHANGE_PACE`] at most; their
/// latencies in ms.
fn changes(socket: &Path, topo: &Topology, calls: usize, first_port: u16) -> Vec<f64> {
    let mut out = Vec::with_capacity(calls);
    let begun = Instant::now();
    for i in 0..calls {
        if let Some(d) = (begun + CHANGE_PACE * i as u32).checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        let addr = topo.backend_addr(0);
        let port = first_port + (i / 2) as u16;
        let t = Instant::now();
        let a = if i % 2 == 0 {
            let body = format!("{{\"address\":\"{addr}:{port}\"}}");
            call(
                socket,
                "POST",
                "/v1/services/web/backends",
                Some(&body),
                CHANGE_TIMEOUT,
            )
        } else {
            let path = format!("/v1/services/web/backends/{addr}:{port}");
            call(socket, "DELETE", &path, None, CHANGE_TIMEOUT)
        };
        let a = a.unwrap_or_else(|| panic!("change {i} unanswered"));
        out.push(t.elapsed().as_secs_f64() * 1e3);
        assert!(
            a.status == 200 || a.status == 201,
            "change {i}: {} {}",
            a.status,
            a.body
        );
    }
    out
}

/// Starts a daemon with `--metrics`, fills its flow table with `flows`
/// flows, then times `calls` API changes with no scraper and again while a
/// thread scrapes `/metrics` every 100 ms.
pub fn measure_scrape(flows: usize, calls: usize) -> ScrapeOutcome {
    lb_harness::require_root();
    let port = free_port();
    let metrics = format!("127.0.0.1:{port}");
    let mut rig = Rig::start("control-scrape", "", None, &["--metrics", &metrics]);
    let addr: std::net::SocketAddr = metrics.parse().expect("an address");
    let dir = rig.pins.datapath_dir();
    // A backend id of `web`: an active entry of LB_BACKENDS.
    let backends: Array<MapData, Backend> =
        Array::try_from(open_pinned(&dir, maps::BACKENDS)).expect("LB_BACKENDS is an array");
    let backend_id = (0..backends.len())
        .find(|&id| {
            backends
                .get(&id, 0)
                .is_ok_and(|b| b.addr != 0 && b.state == BACKEND_ACTIVE)
        })
        .expect("an active backend");
    let t = Instant::now();
    let flows_in_table = fill_flows(&dir, rig.topo.vip(), flows, backend_id);
    let fill_secs = t.elapsed().as_secs_f64();
    eprintln!("control: {flows_in_table} flows in the table ({fill_secs:.1} s to write {flows})");
    let socket = rig.socket.clone();

    // A scrape first, so that the daemon's first walk is behind us.
    let first = scrape(addr);
    assert!(first.is_ok(), "GET /metrics: {first:?}");
    let idle_ms = changes(&socket, &rig.topo, calls, 30_000);

    let stop = std::sync::atomic::AtomicBool::new(false);
    let (scraped_ms, (scrape_ms, scrape_failed, metrics_bytes)) = std::thread::scope(|s| {
        let scraper = s.spawn(|| {
            let mut lat = Vec::new();
            let (mut failed, mut bytes) = (0, 0);
            let mut next = Instant::now();
            // Bounded by `stop`, set when the calls are done (or fail).
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                match scrape(addr) {
                    Ok(n) => bytes = n,
                    Err(e) => {
                        failed += 1;
                        eprintln!("control: GET /metrics: {e}");
                    }
                }
                lat.push(t.elapsed().as_secs_f64() * 1e3);
                next += SCRAPE_EVERY;
                if let Some(d) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(d);
                }
            }
            (lat, failed, bytes)
        });
        std::thread::sleep(SCRAPE_WARMUP);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            changes(&socket, &rig.topo, calls, 40_000)
        }));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let scraped = scraper
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p));
        (r.unwrap_or_else(|p| std::panic::resume_unwind(p)), scraped)
    });
    let daemon_clean_exit = rig.stop_daemon();
    let pin_path = rig.pins.path().to_path_buf();
    drop(rig);
    ScrapeOutcome {
        flows,
        flows_in_table,
        fill_secs,
        idle_ms,
        scraped_ms,
        scrape_ms,
        scrape_failed,
        metrics_bytes,
        daemon_clean_exit,
        pin_path,
    }
}

/// Adds the batch run's rows, targets and note to `s`.
pub fn add_batch(s: &mut Section, b: &BatchOutcome) {
    let n = b.services * b.per_service;
    let done = b.latencies_ms.len() * b.per_service;
    let secs = b.total.as_secs_f64();
    let mib = |kib: u64| kib as f64 / 1024.0;
    let how = match b.in_flight {
        1 => "one call at a time".to_owned(),
        k => format!("{k} calls in flight"),
    };
    let what = format!(
        "{} backends over {} services by batch calls ({} per `PUT …/backends`, {how}), until the last is in the map",
        thousands(n as u64),
        thousands(b.services as u64),
        b.per_service
    );
    s.rows.extend([
        Row::new(&format!(
            "{} services created, one `POST /v1/services` each, {how}",
            thousands(b.services as u64)
        ))
        .with("s", b.create.as_secs_f64())
        .with(
            "per_s",
            b.services as f64 / b.create.as_secs_f64().max(f64::MIN_POSITIVE),
        ),
        Row::new(&what)
            .with("s", secs)
            .with("per_s", done as f64 / secs.max(f64::MIN_POSITIVE))
            .with("count", done as f64),
        Row::new(&format!("per batch call, median ({how})"))
            .with("ms", percentile(&b.latencies_ms, 50.0)),
        Row::new(&format!("per batch call, p99 ({how})"))
            .with("ms", percentile(&b.latencies_ms, 99.0)),
        Row::new(&format!(
            "batch backends active in the pinned map (of {})",
            thousands(n as u64)
        ))
        .with("count", b.active_in_map as f64),
        Row::new(&format!(
            "batch backends in their service's active Maglev table (of {})",
            thousands(n as u64)
        ))
        .with("count", b.in_table as f64),
        Row::new(&format!(
            "daemon's own memory (RssAnon), ready (1 service, 3 backends, sized for {})",
            thousands(n as u64)
        ))
        .with("mib", mib(b.rss_ready_kib)),
        Row::new(&format!(
            "daemon's own memory (RssAnon), at {} backends in {} services",
            thousands(done as u64 + 3),
            thousands(b.latencies_ms.len() as u64 + 1)
        ))
        .with("mib", mib(b.rss_after_kib))
        .with("count", (done + 3) as f64),
        Row::new("daemon VmRSS then").with("mib", mib(b.vm_rss_after_kib)),
    ]);
    let all_in = b.failed.is_none() && b.active_in_map == n && b.in_table == n;
    s.targets.push(Target {
        bar: format!(
            "{} backends over {} services by batch calls ({how}) in the map within 1 s",
            thousands(n as u64),
            thousands(b.services as u64)
        ),
        actual: match &b.failed {
            Some(f) => format!("stopped after {done} backends in {secs:.2} s: {f}"),
            None => format!(
                "{secs:.2} s; pinned maps: {} active, {} in their tables",
                thousands(b.active_in_map as u64),
                thousands(b.in_table as u64)
            ),
        },
        met: all_in && secs < 1.0,
    });
    s.targets.push(Target {
        bar: format!(
            "daemon RssAnon under 30 MiB at {} backends ({how})",
            thousands(n as u64)
        ),
        actual: format!("{:.1} MiB", mib(b.rss_after_kib)),
        met: b.failed.is_none() && mib(b.rss_after_kib) < 30.0,
    });
    s.notes.push(format!(
        "Batch run: another `lb run` sized with `max_services = {}`, `max_backends = {}`, \
         `max_table_size = {BATCH_TABLE_SIZE}` (its `web` service too uses {BATCH_TABLE_SIZE} \
         slots); {} services created through the API (VIPs 198.18.101.1:{BATCH_FIRST_VIP_PORT} \
         and up, table size {BATCH_TABLE_SIZE}), then one `PUT /v1/services/{{name}}/backends` \
         per service ({how}), each naming {} backends (all distinct \
         address:port on the three backend namespaces); the time is from the first of those \
         calls sent to the last answered (the daemon answers once its maps hold the batch); \
         the pinned maps were then read for every backend.",
        b.services + 1,
        n + 10,
        thousands(b.services as u64),
        b.per_service
    ));
}

/// Adds the scrape run's rows, target and note to `s`.
pub fn add_scrape(s: &mut Section, o: &ScrapeOutcome) {
    let p = |v: &[f64], q: f64| percentile(v, q);
    let flows = thousands(o.flows as u64);
    let diff = p(&o.scraped_ms, 99.0) - p(&o.idle_ms, 99.0);
    s.rows.extend([
        Row::new(&format!(
            "API change with {flows} flows, no scraper, median"
        ))
        .with("ms", p(&o.idle_ms, 50.0))
        .with("count", o.idle_ms.len() as f64),
        Row::new(&format!("API change with {flows} flows, no scraper, p99"))
            .with("ms", p(&o.idle_ms, 99.0)),
        Row::new(&format!(
            "API change with {flows} flows, `/metrics` scraped every 100 ms, median"
        ))
        .with("ms", p(&o.scraped_ms, 50.0))
        .with("count", o.scraped_ms.len() as f64),
        Row::new(&format!(
            "API change with {flows} flows, `/metrics` scraped every 100 ms, p99"
        ))
        .with("ms", p(&o.scraped_ms, 99.0)),
        Row::new("API change p99, scraped minus idle").with("ms", diff),
        Row::new(&format!("`GET /metrics` with {flows} flows, median"))
            .with("ms", p(&o.scrape_ms, 50.0))
            .with("count", o.scrape_ms.len() as f64),
        Row::new(&format!("`GET /metrics` with {flows} flows, slowest"))
            .with("ms", p(&o.scrape_ms, 100.0)),
        Row::new("flows in the table (written by the benchmark)")
            .with("s", o.fill_secs)
            .with("count", o.flows_in_table as f64),
    ]);
    s.targets.push(Target {
        bar: format!(
            "API change p99 while `/metrics` is scraped every 100 ms ({flows} flows) within 2 ms of the idle p99"
        ),
        actual: format!(
            "{:.2} ms vs {:.2} ms idle ({diff:+.2} ms) over {} and {} changes{}",
            p(&o.scraped_ms, 99.0),
            p(&o.idle_ms, 99.0),
            o.scraped_ms.len(),
            o.idle_ms.len(),
            if o.scrape_failed > 0 {
                format!("; {} scrapes failed", o.scrape_failed)
            } else {
                String::new()
            }
        ),
        met: diff <= 2.0 && o.scrape_failed == 0 && o.flows_in_table >= o.flows,
    });
    s.notes.push(format!(
        "Scrape run: another `lb run` (default map sizes) with `--metrics`; the benchmark \
         wrote {flows} flows (clients 198.19.x.y, last seen now, on one of `web`'s backends) \
         into the pinned `LB_FLOWS` from every CPU it may use ({} entries then), then sent \
         {} API changes to `web` (a backend added, then removed, alternately), one at a \
         time and one every {} ms at most, first with nothing else asking, then while a thread sent `GET /metrics` \
         every 100 ms ({} scrapes, {} bytes each, begun {} s before the changes).",
        thousands(o.flows_in_table as u64),
        o.idle_ms.len(),
        CHANGE_PACE.as_millis(),
        o.scrape_ms.len(),
        thousands(o.metrics_bytes as u64),
        SCRAPE_WARMUP.as_secs()
    ));
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
