//! End to end with real servers: nginx in three backend namespaces, `wrk`
//! in a client namespace, and four ways from the client to the servers.
//!
//! Contenders:
//! - **direct**: wrk to one backend's address, routed by the host (the
//!   limit: no balancing at all);
//! - **lb**: `lb run` (mode auto, so TC on the client-facing veth) with a
//!   service VIP:80 over the three backends;
//! - **iptables DNAT**: nat `PREROUTING` rules with the `statistic` match
//!   (nth: exact round robin over new connections), conntrack;
//! - **haproxy**: Debian's haproxy 2.6 in the host, `mode tcp`, `balance
//!   roundrobin` (the proxy of the haproxy + consul-template recipe).
//!
//! Each contender has a client namespace of its own, with its own source
//! address (its own subnet and veth to the host): connections of one
//! contender leave TIME_WAIT sockets in the backends, and with TCP
//! timestamps the next contender's SYNs on the same 4-tuple were refused
//! (retransmits and a lopsided split), so no two contenders share a source
//! address. lb's client is the topology's own; the others are made here.
//!
//! Each contender is set up just before its run and torn down right after
//! (lb started and stopped, iptables rules and, if it made it, the nat
//! table deleted, haproxy started and stopped): no other contender pays for
//! its TC programs or its conntrack. nginx runs for the whole section.
//! Conntrack entries of the benchmark's clients are deleted after every run.
//! Contenders alternate round by round (A B C D A B C D …) in each mode
//! (keep-alive, then `Connection: close`), and every figure is the median
//! over rounds.
//!
//! CPU: host busy time from `/proc/stat`; wrk's own CPU from its `rusage`;
//! nginx's (master and workers), haproxy's and lb's from `/proc/PID/stat`;
//! every other process's too (another test running on the same machine,
//! kernel threads other than `ksoftirqd` and threaded NAPI). "Balancer CPU"
//! is the host's busy time minus wrk, nginx and the other processes: what
//! the path between client and servers costs outside the client and server
//! processes, including haproxy's own process and lb's daemon (the issue
//! subtracts haproxy too; it is shown on its own as "proxy process").

pub mod cpu;
pub mod host;
pub mod procs;
pub mod wrk;

use std::{
    collections::HashSet,
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use lb_harness::{
    clients::http_get, config_files::render_config, lb_process::Daemon, netns::Netns, require_root,
    tempdir::TempDir, topology::Topology, ServiceConfig, READY_MARKER,
};

use self::{
    cpu::{other_ticks, own_ticks, ticks_ms, tree_ticks, Snapshot},
    host::{
        forget_conntrack, nft_table_exists, remove_stale_clients, remove_stale_rules, ExtraClient,
        PinPath, Rules, Sysctl,
    },
    procs::{Haproxy, Nginx},
};

use crate::report::{median, Column, Row, Section, Target};

/// wrk's connections (`-c`), with one thread (`-t1`).
pub const CONNECTIONS: u32 = 32;
/// The port nginx, the VIP and haproxy listen on.
pub const PORT: u16 = 80;
/// How many nginx backends.
pub const BACKENDS: usize = 3;
/// The topology prefix of `lb-bench`.
pub const PREFIX: &str = "lbbe";

/// One way from the client to the servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Contender {
    /// wrk to one backend, routed by the host.
    Direct,
    /// `lb run`.
    Lb,
    /// iptables DNAT with the statistic match, conntrack.
    Iptables,
    /// haproxy, mode tcp, balance roundrobin.
    Haproxy,
}

impl Contender {
    /// Every contender, in the order each round runs them.
    pub const ALL: [Contender; 4] = [
        Contender::Direct,
        Contender::Lb,
        Contender::Iptables,
        Contender::Haproxy,
    ];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Contender::Direct => "direct to one backend",
            Contender::Lb => "lb",
            Contender::Iptables => "iptables DNAT",
            Contender::Haproxy => "haproxy (mode tcp)",
        }
    }

    /// The subnet of its own client namespace (`None`: the topology's
    /// client, 198.18.100.0/24).
    fn extra_subnet(self) -> Option<[u8; 3]> {
        match self {
            Contender::Lb => None,
            Contender::Direct => Some([198, 18, 96]),
            Contender::Iptables => Some([198, 18, 97]),
            Contender::Haproxy => Some([198, 18, 98]),
        }
    }

    /// Index among the extra clients (1-based, for names).
    fn extra_index(self) -> usize {
        match self {
            Contender::Lb => 0,
            Contender::Direct => 1,
            Contender::Iptables => 2,
            Contender::Haproxy => 3,
        }
    }
}

/// How wrk uses its connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// HTTP/1.1 keep-alive: requests per second.
    KeepAlive,
    /// `Connection: close`: a new connection per request.
    Close,
}

impl Mode {
    /// Both, in the order the report shows them.
    pub const ALL: [Mode; 2] = [Mode::KeepAlive, Mode::Close];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Mode::KeepAlive => "keep-alive",
            Mode::Close => "Connection: close",
        }
    }
}

/// What one run of one contender measured.
#[derive(Clone, Debug)]
pub struct Sample {
    /// Who.
    pub contender: Contender,
    /// How.
    pub mode: Mode,
    /// Requests wrk completed.
    pub requests: u64,
    /// Requests per second (wrk).
    pub rps: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Socket errors plus non-2xx answers (wrk).
    pub errors: u64,
    /// Wall time of the run, ms.
    pub wall_ms: f64,
    /// Host busy CPU over the run (all cores), ms.
    pub host_ms: f64,
    /// wrk's CPU, ms.
    pub wrk_ms: f64,
    /// nginx's CPU (masters and workers), ms.
    pub nginx_ms: f64,
    /// The contender's own process (haproxy, or lb's daemon with the
    /// commands it ran), ms; `None` for direct and iptables.
    pub proxy_ms: Option<f64>,
    /// Every other process's CPU (kernel threads too, except `ksoftirqd`
    /// and threaded NAPI), ms.
    pub others_ms: f64,
    /// TCP retransmits in the client, the backends and the host.
    pub retrans: u64,
    /// Connections each backend accepted.
    pub backend_opens: Vec<u64>,
}

impl Sample {
    /// `ms` per 1,000 requests.
    pub fn per_1k(&self, ms: f64) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        ms * 1_000.0 / self.requests as f64
    }

    /// Host CPU outside the client, the servers and every other process
    /// (the contender's own process, haproxy or lb, included), ms.
    pub fn balancer_ms(&self) -> f64 {
        self.host_ms - self.wrk_ms - self.nginx_ms - self.others_ms
    }

    /// `ms` as a percentage of one core over the run.
    pub fn pct(&self, ms: f64) -> f64 {
        if self.wall_ms <= 0.0 {
            return 0.0;
        }
        100.0 * ms / self.wall_ms
    }
}

/// What a contender needs while it runs; dropping it tears it down.
enum Active {
    Nothing,
    Lb(Daemon),
    Nat { _rules: Rules },
    Haproxy(Haproxy),
}

impl Active {
    fn pid(&self) -> Option<i32> {
        match self {
            Active::Lb(d) => d.pid().map(|p| p as i32),
            Active::Haproxy(h) => Some(h.pid()),
            Active::Nothing | Active::Nat { .. } => None,
        }
    }
}

/// TCP counters of `/proc/net/snmp` text, by name.
fn tcp_counter(snmp: &str, name: &str) -> u64 {
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == name)
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// `/proc/net/snmp` of `ns` (of the calling thread's namespace for `None`).
fn snmp(ns: Option<&Netns>) -> String {
    let read = || std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap_or_default();
    match ns {
        Some(ns) => ns.run(read),
        None => read(),
    }
}

/// The whole setup: topology, nginx in every backend, one client namespace
/// per contender, forwarding on. Dropping it (also on panic) stops every
/// process and undoes every change; fields drop in this order.
pub struct Rig {
    nginx: Vec<Nginx>,
    _forward: Rules,
    ip_forward: Sysctl,
    clients: Vec<(Contender, ExtraClient)>,
    pin: PinPath,
    topo: Topology,
    dir: TempDir,
    lb_config: PathBuf,
    nat_before: Option<bool>,
}

impl Rig {
    /// Builds everything, with topology prefix `prefix` (see [`Topology`]).
    pub fn new(prefix: &str) -> Rig {
        require_root();
        let topo = Topology::new(prefix, BACKENDS);
        let names: Vec<(String, String)> = (1..=3)
            .map(|i| (format!("{prefix}-e{i}"), format!("{prefix}e{i}")))
            .collect();
        let subnets: Vec<[u8; 3]> = Contender::ALL
            .iter()
            .filter_map(|c| c.extra_subnet())
            .collect();
        remove_stale_clients(&names, &subnets);
        remove_stale_rules(&["nat", "filter"]);
        let nat_before = nft_table_exists("nat");
        let dir = TempDir::new("bench-e2e");
        let pin = PinPath::new(&format!("lb-bench-e2e-{prefix}"));
        let mut clients = Vec::new();
        for c in Contender::ALL {
            if let Some(subnet) = c.extra_subnet() {
                let (ns, link) = &names[c.extra_index() - 1];
                clients.push((c, ExtraClient::new(ns, link, subnet)));
            }
        }
        // lb turns GRO on in a backend's namespace (so XDP can deliver
        // there); turned on for every contender alike.
        for b in &topo.backends {
            b.exec_ok(&["ethtool", "-K", "eth0", "gro", "on"]);
        }
        let ip_forward = Sysctl::set("net/ipv4/ip_forward", "1");
        // Routed contenders pass whatever the FORWARD policy is.
        let mut forward = Rules::new();
        for (c, client) in &clients {
            if matches!(c, Contender::Direct | Contender::Iptables) {
                forward.add(
                    "filter",
                    &["-I", "FORWARD", "-i", client.link(), "-j", "ACCEPT"],
                );
                forward.add(
                    "filter",
                    &["-I", "FORWARD", "-o", client.link(), "-j", "ACCEPT"],
                );
            }
        }
        let mut nginx = Vec::new();
        for i in 0..BACKENDS {
            nginx.push(Nginx::start(
                &topo.backends[i],
                &dir.path().join(format!("nginx-b{i}")),
                topo.backend_addr(i),
                PORT,
            ));
        }
        let client_if = topo.client_host_if();
        let config = render_config(
            &[client_if.as_str()],
            &[ServiceConfig::new(
                "web",
                &format!("{}:{PORT}", topo.vip()),
                "tcp",
                &topo.backend_endpoints(PORT),
            )],
        )
        .replacen(
            "[datapath]\n",
            &format!("[datapath]\npin_path = \"{}\"\n", pin.as_str()),
            1,
        );
        let lb_config = dir.write("lb.toml", &config);
        Rig {
            nginx,
            _forward: forward,
            ip_forward,
            clients,
            pin,
            topo,
            dir,
            lb_config,
            nat_before,
        }
    }

    /// The topology.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The directory of every config, pid file and log (a process whose
    /// command line names it is one of the benchmark's).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// nginx's pids (masters and workers).
    pub fn nginx_pids(&self) -> Vec<i32> {
        self.nginx.iter().flat_map(Nginx::pids).collect()
    }

    /// The pin directory lb uses.
    pub fn pin_path(&self) -> &str {
        self.pin.as_str()
    }

    /// The ip_forward value the rig restores.
    pub fn saved_ip_forward(&self) -> &str {
        self.ip_forward.saved()
    }

    /// Whether the host had a nat table before the rig (`None`: unknown).
    pub fn nat_table_before(&self) -> Option<bool> {
        self.nat_before
    }

    /// The client namespace and source address of `c`.
    pub fn client_of(&self, c: Contender) -> (&Netns, Ipv4Addr) {
        match self.clients.iter().find(|(k, _)| *k == c) {
            Some((_, client)) => (&client.ns, client.addr()),
            None => (&self.topo.client, self.topo.client_addr()),
        }
    }

    /// Every client source address.
    pub fn client_addrs(&self) -> Vec<Ipv4Addr> {
        Contender::ALL
            .iter()
            .map(|c| self.client_of(*c).1)
            .collect()
    }

    /// Where `c`'s client sends its requests.
    pub fn target_of(&self, c: Contender) -> SocketAddrV4 {
        match c {
            Contender::Direct => SocketAddrV4::new(self.topo.backend_addr(0), PORT),
            _ => SocketAddrV4::new(self.topo.vip(), PORT),
        }
    }

    fn backends(&self) -> Vec<SocketAddrV4> {
        (0..BACKENDS)
            .map(|i| SocketAddrV4::new(self.topo.backend_addr(i), PORT))
            .collect()
    }

    /// Sets `c` up (what it needs while it runs).
    fn start(&self, c: Contender) -> Active {
        match c {
            Contender::Direct => Active::Nothing,
            Contender::Lb => {
                let cfg = self.lb_config.display().to_string();
                let state = self.dir.path().join("lb.state.json");
                let _ = std::fs::remove_file(&state);
                let _ = std::fs::remove_file(state.with_extension("journal"));
                let state = state.display().to_string();
                let sock = self.dir.path().join("lb.sock").display().to_string();
                Active::Lb(Daemon::start_with_env(
                    &[
                        "run", "--config", &cfg, "--state", &state, "--socket", &sock,
                    ],
                    &[("RUST_LOG", "warn,lb::daemon=info")],
                    READY_MARKER,
                    Duration::from_secs(30),
                ))
            }
            Contender::Iptables => {
                let mut rules = Rules::new();
                let (_, client) = self
                    .clients
                    .iter()
                    .find(|(k, _)| *k == c)
                    .expect("iptables has its own client");
                let vip = format!("{}/32", self.topo.vip());
                let port = PORT.to_string();
                let backends = self.backends();
                for (i, b) in backends.iter().enumerate() {
                    let to = b.to_string();
                    let mut spec = vec![
                        "-A",
                        "PREROUTING",
                        "-i",
                        client.link(),
                        "-d",
                        &vip,
                        "-p",
                        "tcp",
                        "--dport",
                        &port,
                    ];
                    // Rule i takes every (n - i)th of the connections the
                    // rules before it left: exact round robin.
                    let every = (backends.len() - i).to_string();
                    if i + 1 < backends.len() {
                        spec.extend(["-m", "statistic", "--mode", "nth", "--every"]);
                        spec.push(&every);
                        spec.extend(["--packet", "0"]);
                    }
                    spec.extend(["-j", "DNAT", "--to-destination", &to]);
                    rules.add("nat", &spec);
                }
                Active::Nat { _rules: rules }
            }
            Contender::Haproxy => Active::Haproxy(Haproxy::start(
                self.dir.path(),
                SocketAddrV4::new(self.topo.vip(), PORT),
                &self.backends(),
            )),
        }
    }

    /// One GET through `c`'s path (bounded retries): a figure can only come
    /// from a path that works.
    fn probe(&self, c: Contender) {
        let (ns, _) = self.client_of(c);
        let target = self.target_of(c);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match http_get(ns, target) {
                Ok(body) if body == "ok\n" => return,
                Ok(body) => panic!("{}: {target} answered {body:?}", c.name()),
                Err(e) if Instant::now() >= deadline => {
                    panic!("{}: no answer from {target} through it: {e}", c.name())
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// TCP counters: connections each backend accepted, and retransmits
    /// in `c`'s client, the backends and the host.
    fn net_counters(&self, c: Contender) -> (Vec<u64>, u64) {
        let mut opens = Vec::new();
        let mut retrans = 0;
        for b in &self.topo.backends {
            let s = snmp(Some(b));
            opens.push(tcp_counter(&s, "PassiveOpens"));
            retrans += tcp_counter(&s, "RetransSegs");
        }
        retrans += tcp_counter(&snmp(Some(self.client_of(c).0)), "RetransSegs");
        retrans += tcp_counter(&snmp(None), "RetransSegs");
        (opens, retrans)
    }

    /// Sets `c` up, runs wrk for `secs` seconds in `mode`, tears `c` down,
    /// deletes the clients' conntrack entries, and returns the figures.
    pub fn measure(&self, c: Contender, mode: Mode, secs: u32) -> Sample {
        let active = self.start(c);
        self.probe(c);
        let (ns, _) = self.client_of(c);
        let target = self.target_of(c);
        let url = format!("http://{target}/");
        let nginx_pids = self.nginx_pids();
        let proxy = active.pid();
        let (opens0, retrans0) = self.net_counters(c);
        let before = Snapshot::take();
        let run = wrk::run(ns.name(), &url, CONNECTIONS, mode == Mode::Close, secs);
        let after = Snapshot::take();
        let (opens1, retrans1) = self.net_counters(c);
        drop(active);
        for addr in self.client_addrs() {
            forget_conntrack(addr);
        }

        let mut excluded: HashSet<i32> = nginx_pids.iter().copied().collect();
        excluded.extend(proxy);
        let proxy_ms = proxy.map(|pid| {
            ticks_ms(match c {
                // lb's daemon runs ip/ethtool/nsenter: count what it reaped.
                Contender::Lb => tree_ticks(&before, &after, &[pid]),
                _ => own_ticks(&before, &after, &[pid]),
            })
        });
        let r = &run.report;
        assert!(
            r.requests > 0,
            "{} ({}): wrk completed no request:\n{}",
            c.name(),
            mode.name(),
            run.output
        );
        Sample {
            contender: c,
            mode,
            requests: r.requests,
            rps: r.rps,
            p50_ms: r.p50_ms,
            p99_ms: r.p99_ms,
            errors: r.socket_errors + r.non_2xx,
            wall_ms: run.wall.as_secs_f64() * 1_000.0,
            host_ms: ticks_ms(after.host_busy.saturating_sub(before.host_busy)),
            wrk_ms: run.cpu.as_secs_f64() * 1_000.0,
            nginx_ms: ticks_ms(own_ticks(&before, &after, &nginx_pids)),
            proxy_ms,
            others_ms: ticks_ms(other_ticks(&before, &after, &excluded)),
            retrans: retrans1.saturating_sub(retrans0),
            backend_opens: opens1
                .iter()
                .zip(&opens0)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect(),
        }
    }
}

/// What to run: rounds, seconds a run, contenders and modes.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Topology prefix.
    pub prefix: String,
    /// Rounds (each runs every contender in every mode once).
    pub rounds: usize,
    /// Seconds of each wrk run.
    pub secs: u32,
    /// Contenders, in the order each round runs them.
    pub contenders: Vec<Contender>,
    /// Modes, in order.
    pub modes: Vec<Mode>,
}

impl Plan {
    /// `--quick`: one round of 3 s runs (about 40 s).
    pub fn quick() -> Plan {
        Plan {
            prefix: PREFIX.into(),
            rounds: 1,
            secs: 3,
            contenders: Contender::ALL.to_vec(),
            modes: Mode::ALL.to_vec(),
        }
    }

    /// The full run: five rounds of 8 s runs (about 6 minutes).
    pub fn full() -> Plan {
        Plan {
            rounds: 5,
            secs: 8,
            ..Plan::quick()
        }
    }
}

/// Runs `plan` on a fresh [`Rig`]: round by round, each mode, contenders
/// alternating. Also returns whether the host had a nat table before.
pub fn collect(plan: &Plan) -> (Vec<Sample>, Option<bool>) {
    let t = Instant::now();
    let rig = Rig::new(&plan.prefix);
    eprintln!(
        "e2e: set up in {:.1} s (with any wait for another run's topology)",
        t.elapsed().as_secs_f64()
    );
    let mut samples = Vec::new();
    for round in 0..plan.rounds {
        for &mode in &plan.modes {
            for &c in &plan.contenders {
                let t = Instant::now();
                let s = rig.measure(c, mode, plan.secs);
                eprintln!(
                    "e2e: round {}/{} {} {}: {:.0} req/s, host {:.1} ms/1k, wrk CPU {:.0}%, \
                     {} errors ({:.1} s)",
                    round + 1,
                    plan.rounds,
                    mode.name(),
                    c.name(),
                    s.rps,
                    s.per_1k(s.host_ms),
                    s.pct(s.wrk_ms),
                    s.errors,
                    t.elapsed().as_secs_f64()
                );
                samples.push(s);
            }
        }
    }
    (samples, rig.nat_table_before())
}

/// Runs the section: `quick` takes one round of 3 s runs, else five of 8 s.
pub fn run(quick: bool) -> Section {
    let plan = if quick { Plan::quick() } else { Plan::full() };
    let (samples, nat_before) = collect(&plan);
    section(&plan, &samples, nat_before)
}

/// Median over `samples` of `f`.
fn med(samples: &[&Sample], f: impl Fn(&Sample) -> f64) -> f64 {
    median(&samples.iter().map(|s| f(s)).collect::<Vec<_>>())
}

/// The report section of `samples` (made by `plan`); `nat_before` is
/// whether the host had a nat table before the rig ([`Rig::nat_table_before`]).
pub fn section(plan: &Plan, samples: &[Sample], nat_before: Option<bool>) -> Section {
    let of = |c: Contender, m: Mode| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.contender == c && s.mode == m)
            .collect()
    };
    let rps = |c: Contender, m: Mode| {
        let v = of(c, m);
        (!v.is_empty()).then(|| med(&v, |s| s.rps))
    };
    let balancer = |c: Contender, m: Mode| {
        let v = of(c, m);
        (!v.is_empty()).then(|| med(&v, |s| s.per_1k(s.balancer_ms())))
    };
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let (mut splits, mut busy_client, mut spread) = (Vec::new(), Vec::new(), Vec::new());
    for &m in &plan.modes {
        let direct = rps(Contender::Direct, m);
        for &c in &plan.contenders {
            let v = of(c, m);
            if v.is_empty() {
                continue;
            }
            let r = med(&v, |s| s.rps);
            let mut row = Row::new(&format!("{} ({})", c.name(), m.name()))
                .with("rps", r)
                .with("p50_ms", med(&v, |s| s.p50_ms))
                .with("p99_ms", med(&v, |s| s.p99_ms))
                .with("host_ms_per_1k", med(&v, |s| s.per_1k(s.host_ms)))
                .with("balancer_ms_per_1k", med(&v, |s| s.per_1k(s.balancer_ms())))
                .with("wrk_cpu_pct", med(&v, |s| s.pct(s.wrk_ms)))
                .with("others_cpu_pct", med(&v, |s| s.pct(s.others_ms)))
                .with("errors", v.iter().map(|s| s.errors as f64).sum())
                .with("retrans", v.iter().map(|s| s.retrans as f64).sum());
            if let Some(d) = direct.filter(|d| *d > 0.0) {
                row = row.with("vs_direct", r / d);
            }
            if v.iter().all(|s| s.proxy_ms.is_some()) {
                row = row.with(
                    "proxy_ms_per_1k",
                    med(&v, |s| s.per_1k(s.proxy_ms.unwrap_or(0.0))),
                );
            }
            row.rounds = v.iter().map(|s| s.rps).collect();
            let (lo, hi) = row
                .rounds
                .iter()
                .fold((f64::MAX, 0.0_f64), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
            if row.rounds.len() > 1 && lo > 0.0 {
                spread.push(format!("{} {:.0}%", row.name, 100.0 * (hi / lo - 1.0)));
            }
            if m == Mode::Close {
                let opens: Vec<u64> = (0..BACKENDS)
                    .map(|i| {
                        v.iter()
                            .map(|s| s.backend_opens.get(i).copied().unwrap_or(0))
                            .sum()
                    })
                    .collect();
                let total: u64 = opens.iter().sum();
                if total > 0 {
                    let split: Vec<String> = opens
                        .iter()
                        .map(|o| format!("{:.0}", 100.0 * *o as f64 / total as f64))
                        .collect();
                    splits.push(format!("{} {}", c.name(), split.join("/")));
                }
            }
            let wrk = med(&v, |s| s.pct(s.wrk_ms));
            if wrk >= 90.0 {
                busy_client.push(format!("{} {wrk:.0}%", row.name));
            }
            rows.push(row);
        }
    }
    if !splits.is_empty() {
        notes.push(format!(
            "Connections accepted per backend with `Connection: close`, all rounds (%): {}.",
            splits.join(", ")
        ));
    }
    if !busy_client.is_empty() {
        notes.push(format!(
            "wrk used 90% of a core or more in: {}. Its one thread is then the limit (its CPU \
             includes the network work done in its softirqs, see below), so requests/s there \
             compare the paths' cost as seen by the client, not the paths' capacity.",
            busy_client.join(", ")
        ));
    }
    if !spread.is_empty() {
        notes.push(format!(
            "Spread of requests/s between rounds (largest over smallest − 1): {}; every round's \
             figure is in report.json.",
            spread.join(", ")
        ));
    }
    let worst_others = samples
        .iter()
        .map(|s| s.pct(s.others_ms))
        .fold(0.0_f64, f64::max);
    if worst_others >= 5.0 {
        notes.push(format!(
            "Other processes on the host used up to {worst_others:.0}% of a core during a run: \
             host CPU and latency include their load (balancer CPU leaves their own time out)."
        ));
    }

    let mut targets = Vec::new();
    let pair = |a: Option<f64>, b: Option<f64>| a.zip(b);
    if let Some((l, i)) = pair(
        rps(Contender::Lb, Mode::KeepAlive),
        rps(Contender::Iptables, Mode::KeepAlive),
    ) {
        targets.push(Target {
            bar: "keep-alive requests/s at least iptables DNAT's".into(),
            actual: format!("{l:.0} vs {i:.0} ({:.2}x)", l / i.max(f64::MIN_POSITIVE)),
            met: l >= i,
        });
    }
    if let Some((l, i)) = pair(
        rps(Contender::Lb, Mode::Close),
        rps(Contender::Iptables, Mode::Close),
    ) {
        targets.push(Target {
            bar: "new connections/s at least iptables DNAT's".into(),
            actual: format!("{l:.0} vs {i:.0} ({:.2}x)", l / i.max(f64::MIN_POSITIVE)),
            met: l >= i,
        });
    }
    if let Some((l, h)) = pair(
        rps(Contender::Lb, Mode::Close),
        rps(Contender::Haproxy, Mode::Close),
    ) {
        targets.push(Target {
            bar: "new connections/s at least 1.5x haproxy's".into(),
            actual: format!("{l:.0} vs {h:.0} ({:.2}x)", l / h.max(f64::MIN_POSITIVE)),
            met: l >= 1.5 * h,
        });
    }
    for &m in &plan.modes {
        if let Some((l, d)) = pair(balancer(Contender::Lb, m), balancer(Contender::Direct, m)) {
            let host = |c| {
                let v = of(c, m);
                med(&v, |s| s.per_1k(s.host_ms))
            };
            targets.push(Target {
                bar: format!(
                    "balancer CPU per 1k requests ({}) no more than direct routing's",
                    m.name()
                ),
                actual: format!(
                    "{l:.2} ms vs {d:.2} ms (all host CPU: {:.1} vs {:.1} ms per 1k requests)",
                    host(Contender::Lb),
                    host(Contender::Direct)
                ),
                met: l <= d,
            });
        }
    }

    notes.push(
        "How to read the CPU columns: a veth delivers a packet in the sender's own softirq, so \
         much of the network path (routing, DNAT, lb's TC program, the peer's TCP receive) is \
         charged to whichever process sent the packet (wrk or nginx) and shows in the host \
         figure, not in the balancer figure. Balancer CPU is what is left: ksoftirqd, \
         softirqs on otherwise idle cores, and haproxy's or lb's own process (also shown on \
         its own as proxy process CPU). With every core busy, host CPU per 1k requests is \
         about cores × 1000 / requests/s."
            .into(),
    );
    if plan.contenders.contains(&Contender::Iptables) {
        notes.push(match nat_before {
            Some(false) => "The nat table existed only during iptables runs (the host had none: \
                            it was deleted after each), so no other contender paid for conntrack."
                .into(),
            Some(true) => "The host already had a nat table (someone else's), so conntrack \
                           tracked every contender's connections, not only iptables DNAT's."
                .into(),
            None => "Whether the host had a nat table is unknown (no `nft`): if it had, \
                     conntrack tracked every contender's connections."
                .into(),
        });
    }

    Section {
        key: "e2e".into(),
        title: "End to end with real servers (nginx, wrk)".into(),
        method: format!(
            "nginx {nginx} (Debian's; one worker, `return 200`, no access log) in each of \
             {BACKENDS} backend namespaces; `wrk -t1 -c{CONNECTIONS} -d{secs}s --latency` in a \
             client namespace, with and without `Connection: close`. Contenders: direct to one \
             backend (routed by the host), lb (`lb run`, TC on the client veth), iptables DNAT \
             (nat PREROUTING, `statistic --mode nth`, conntrack), haproxy {haproxy} (`mode \
             tcp`, `balance roundrobin`, in the host). Each contender has its own client \
             namespace and source address and is set up just before its run and torn down right \
             after; the clients' conntrack entries are deleted after every run; contenders \
             alternate round by round. GRO is on in the backends' namespaces for every \
             contender (lb turns it on). Host CPU from /proc/stat; wrk's CPU from its rusage; \
             balancer CPU = host − wrk − nginx − every other process and kernel thread except \
             ksoftirqd (lb's daemon and haproxy count as balancer).",
            nginx = tool_version("nginx", &["-v"]),
            haproxy = tool_version("haproxy", &["-v"]),
            secs = plan.secs,
        ),
        rounds: plan.rounds,
        columns: vec![
            Column::new("rps", "requests/s", 0),
            Column::new("vs_direct", "vs direct", 2),
            Column::new("p50_ms", "p50 ms", 2),
            Column::new("p99_ms", "p99 ms", 2),
            Column::new("host_ms_per_1k", "host CPU ms/1k req", 1),
            Column::new("balancer_ms_per_1k", "balancer CPU ms/1k req", 2),
            Column::new("proxy_ms_per_1k", "proxy process ms/1k req", 2),
            Column::new("wrk_cpu_pct", "wrk CPU %", 0),
            Column::new("others_cpu_pct", "other processes CPU %", 0),
            Column::new("errors", "errors", 0),
            Column::new("retrans", "retransmits", 0),
        ],
        rows,
        targets,
        chart: Some("rps".into()),
        notes,
    }
}

/// The version a tool prints (`nginx -v`, `haproxy -v`), or "(version
/// unknown)".
fn tool_version(program: &str, args: &[&str]) -> String {
    let Ok(out) = std::process::Command::new(program).args(args).output() else {
        return "(version unknown)".into();
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.split_whitespace()
        .find_map(|w| {
            let v = w.rsplit('/').next().unwrap_or(w);
            (v.chars().next().is_some_and(|c| c.is_ascii_digit()) && v.contains('.'))
                .then(|| v.to_owned())
        })
        .unwrap_or_else(|| "(version unknown)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(c: Contender, m: Mode, rps: f64) -> Sample {
        Sample {
            contender: c,
            mode: m,
            requests: (rps * 2.0) as u64,
            rps,
            p50_ms: 1.0,
            p99_ms: 2.0,
            errors: 0,
            wall_ms: 2_000.0,
            host_ms: 2_000.0,
            wrk_ms: 900.0,
            nginx_ms: 600.0,
            proxy_ms: (c == Contender::Haproxy).then_some(300.0),
            others_ms: 100.0,
            retrans: 0,
            backend_opens: vec![10, 10, 10],
        }
    }

    #[test]
    fn section_has_rows_ratios_and_targets() {
        let plan = Plan::quick();
        let mut s = Vec::new();
        for m in Mode::ALL {
            s.push(sample(Contender::Direct, m, 20_000.0));
            s.push(sample(Contender::Lb, m, 19_000.0));
            s.push(sample(Contender::Iptables, m, 15_000.0));
            s.push(sample(Contender::Haproxy, m, 10_000.0));
        }
        let sec = section(&plan, &s, Some(false));
        assert_eq!(sec.key, "e2e");
        assert_eq!(sec.rows.len(), 8);
        let lb = &sec.rows[1];
        assert_eq!(lb.name, "lb (keep-alive)");
        assert!((lb.get("vs_direct").expect("ratio") - 0.95).abs() < 1e-9);
        // 2000 - 900 - 600 - 100 = 400 ms over 38,000 requests.
        let b = lb.get("balancer_ms_per_1k").expect("balancer");
        assert!((b - 400.0 / 38.0).abs() < 1e-9, "{b}");
        assert!(lb.get("proxy_ms_per_1k").is_none());
        assert!(sec.rows[3].get("proxy_ms_per_1k").is_some());
        assert_eq!(sec.targets.len(), 5);
        assert!(
            sec.targets.iter().take(3).all(|t| t.met),
            "{:?}",
            sec.targets
        );
        assert!(
            sec.notes.iter().any(|n| n.contains("lb 33/33/33")),
            "{:?}",
            sec.notes
        );
    }

    #[test]
    fn reads_tcp_counters() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Tcp: RtoAlgorithm ActiveOpens PassiveOpens RetransSegs\n\
                    Tcp: 1 5 42 7\nUdp: InDatagrams\nUdp: 3\n";
        assert_eq!(tcp_counter(snmp, "PassiveOpens"), 42);
        assert_eq!(tcp_counter(snmp, "RetransSegs"), 7);
        assert_eq!(tcp_counter(snmp, "Nope"), 0);
    }
}
