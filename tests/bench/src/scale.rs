//! How cost grows: per-packet cost of the data path as backends per
//! service, services and flows in the table grow; Maglev rebuild time; the
//! kernel memory of the maps.
//!
//! Per-packet figures are taken the way [`crate::per_packet`] takes them:
//! one `BPF_PROG_TEST_RUN` call with `repeat = 1` per packet and a fresh
//! input frame each call, the kernel's own timing averaged over a round, the
//! empty XDP program measured the same way as the floor, the median over
//! rounds, cases alternating within each round. Unlike there, traffic is
//! spread: the established path walks a set of flows already in the table
//! (each call another flow), new flows and established flows go to every
//! service of the case, and the non-service packets go to 4,096 different
//! addresses. A figure that only replays one hot flow would not show what
//! grows. Every call's output is checked (action, backend), and every batch
//! of calls checks through the services' counters that established packets
//! found their flow and new ones did not.
//!
//! The maps are written directly, as the reconcile loop would write them
//! (backend entries, `REV_NAT`, one Maglev copy, the service entry, the VIP
//! filter bit), and flows already in the table are written from userspace
//! with the values the data path itself records.

use std::{
    collections::HashMap as StdHashMap,
    fs,
    net::Ipv4Addr,
    os::fd::{AsFd as _, AsRawFd as _},
    time::Instant,
};

use aya::maps::MapInfo;
use lb::{
    datapath::{Datapath, MapSizes},
    maglev::{self, MaglevBackend},
};
use lb_common::{
    defaults, maps, vip_filter_bit, Backend, Flow, FlowKey, RevNat, ServiceKey, ServiceValue,
    BACKEND_ACTIVE, BACKEND_F_MAC, BACKEND_F_PEER, BACKEND_F_XDP, IPPROTO_TCP,
};
use lb_harness::packets::{
    frame, Rig, BACKEND_MACS, CLIENT, CLIENT_MAC, HOST_MAC, L4, LB_MAC, LO, TABLE, XDP_PASS,
    XDP_REDIRECT,
};
use nix::{
    sched::{sched_getaffinity, sched_setaffinity, CpuSet},
    unistd::Pid,
};

use crate::{
    raw_bpf::{ProgType, Program},
    report::{median, Column, Row, Section, Target},
};

/// Stride of the walks over flows and services: a prime, so consecutive
/// calls land far apart and every index is visited.
const STRIDE: u64 = 7_919;
/// Client ids of new flows start here; established flows use ids below.
const NEW_FLOW_BASE: u32 = 1 << 24;
/// Distinct destinations of the non-service packets.
const PASS_ADDRS: u32 = 4_096;

/// What one run measures; [`Params::quick`] and [`Params::full`] are the
/// report's, tests use smaller ones.
#[derive(Clone, Debug)]
pub struct Params {
    /// Rounds each per-packet figure is the median of.
    pub rounds: usize,
    /// `BPF_PROG_TEST_RUN` calls per case, path and round.
    pub calls: u32,
    /// Backends per service, one case each (one data path, a service per case).
    pub backends: Vec<u32>,
    /// Services in the maps, one data path each.
    pub services: Vec<u32>,
    /// Flows in the table, one data path each.
    pub flows: Vec<u32>,
    /// Flow table size of every data path here.
    pub flow_table_size: u32,
    /// Established flows walked in the backends and services cases.
    pub established: u32,
    /// Backends of the Maglev rebuild cases.
    pub maglev_backends: Vec<usize>,
    /// Rebuilds each Maglev figure is the median of.
    pub maglev_rounds: usize,
    /// Whether to measure map memory (loads a data path of default sizes).
    pub memory: bool,
}

impl Params {
    /// `--quick`: 5 rounds of 2,000 calls, every case of the issue.
    pub fn quick() -> Self {
        Self {
            rounds: 5,
            calls: 2_000,
            ..Self::full()
        }
    }

    /// The full run: 11 rounds of 10,000 calls.
    pub fn full() -> Self {
        Self {
            rounds: 11,
            calls: 10_000,
            backends: vec![1, 10, 100, 1_000],
            services: vec![1, 100, 10_000],
            // One hot flow first: the per-packet section's established case.
            flows: vec![1, 1_000, 100_000, 1_000_000],
            flow_table_size: defaults::FLOW_TABLE_SIZE,
            established: 10_000,
            maglev_backends: vec![10, 100, 1_000],
            maglev_rounds: 21,
            memory: true,
        }
    }
}

/// `n` with thousands separators: 1,000,000.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string().into_bytes();
    let groups: Vec<&str> = digits
        .rchunks(3)
        .rev()
        .map(|g| std::str::from_utf8(g).expect("ASCII digits"))
        .collect();
    groups.join(",")
}

/// Client `n`'s address and port: distinct for every `n` below 2^25, all in
/// 198.18.0.0/15 (never sent anywhere).
fn client(n: u32) -> ([u8; 4], u16) {
    (
        [
            198,
            18 + ((n >> 24) & 1) as u8,
            (n >> 16) as u8,
            (n >> 8) as u8,
        ],
        1024 + (n & 0xff) as u16,
    )
}

/// A host-order port as stored in keys (network order).
fn net_port(port: u16) -> u16 {
    u16::from_ne_bytes(port.to_be_bytes())
}

/// The flow key the data path builds for client `n`'s TCP packets to `vip:port`.
fn flow_key(n: u32, vip: [u8; 4], port: u16) -> FlowKey {
    let (src, sport) = client(n);
    FlowKey {
        src_addr: u32::from_ne_bytes(src),
        dst_addr: u32::from_ne_bytes(vip),
        src_port: net_port(sport),
        dst_port: net_port(port),
        proto: IPPROTO_TCP,
        _pad1: 0,
        _pad2: 0,
    }
}

/// Client `n`'s SYN to `vip:port`.
fn syn_frame(n: u32, vip: [u8; 4], port: u16) -> Vec<u8> {
    let (src, sport) = client(n);
    frame(
        (LB_MAC, CLIENT_MAC),
        None,
        src,
        vip,
        L4::Syn {
            src: sport,
            dst: port,
        },
        &[],
        &[],
    )
}

/// The `i`th non-service packet: to one of 4,096 addresses that are no VIP.
fn pass_frame(i: u32) -> Vec<u8> {
    let i = i % PASS_ADDRS;
    frame(
        (LB_MAC, CLIENT_MAC),
        None,
        CLIENT,
        [198, 19, 192 + (i >> 8) as u8, i as u8],
        L4::Syn {
            src: 40000,
            dst: 80,
        },
        &[],
        &[],
    )
}

/// Backend address number `b`: 198.18.160.0 and up, to 198.18.254.255.
fn backend_addr(b: u32) -> [u8; 4] {
    assert!(b < 95 * 256, "backend number {b} out of the plan");
    [198, 18, 160 + (b >> 8) as u8, b as u8]
}

/// The coarse monotonic clock in seconds, as the data path stamps flows.
pub(crate) fn now_secs() -> u32 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map(|t| t.tv_sec() as u32)
        .unwrap_or(0)
}

/// The CPUs this thread may run on.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    let set = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Runs `f` with this thread pinned to `cpu`, then restores its affinity.
/// An LRU map with per-CPU lists takes an insert's entry from the list of
/// the CPU the insert runs on, so this decides which list a flow lands in.
pub(crate) fn on_cpu<R>(cpu: usize, f: impl FnOnce() -> R) -> R {
    let old = sched_getaffinity(Pid::from_raw(0)).expect("sched_getaffinity");
    let mut set = CpuSet::new();
    set.set(cpu).expect("CPU in range");
    sched_setaffinity(Pid::from_raw(0), &set).expect("pinning to a CPU");
    let r = f();
    sched_setaffinity(Pid::from_raw(0), &old).expect("restoring the CPU affinity");
    r
}

/// A service written into a [`Bed`].
struct Svc {
    vip: [u8; 4],
    port: u16,
    id: u32,
    members: Vec<u32>,
}

/// A loaded data path with services, backends and flows written directly.
struct Bed {
    rig: Rig,
    table_size: u32,
    services: Vec<Svc>,
    /// Backend (address, port) by id.
    backends: Vec<([u8; 4], u16)>,
    /// Service id by backend (address, port), for checking outputs.
    service_of: StdHashMap<([u8; 4], u16), u32>,
    /// What the VIP filter holds, by word.
    filter: Vec<u64>,
}

impl Bed {
    fn load(max_services: u32, max_backends: u32, table_size: u32, flow_table_size: u32) -> Self {
        lb_harness::require_root();
        let dp = Datapath::load(&MapSizes {
            max_services,
            max_backends,
            max_table_size: table_size,
            flow_table_size,
        })
        .expect("the data path loads and passes the verifier");
        Self {
            rig: Rig { dp },
            table_size,
            services: Vec::new(),
            backends: Vec::new(),
            service_of: StdHashMap::new(),
            filter: vec![0; lb_common::VIP_FILTER_WORDS as usize],
        }
    }

    /// Writes a TCP service `vip:port` over `backends` (new backend entries,
    /// `REV_NAT`, the active Maglev copy, the VIP filter bit, then the
    /// service entry, as the reconciler orders them); returns its index.
    fn add_service(&mut self, vip: [u8; 4], port: u16, backends: &[([u8; 4], u16)]) -> usize {
        let sid = self.services.len() as u32;
        let maps = &mut self.rig.dp.maps;
        let mut members = Vec::with_capacity(backends.len());
        for &(addr, bport) in backends {
            let id = self.backends.len() as u32;
            let value = Backend {
                addr: u32::from_ne_bytes(addr),
                port: net_port(bport),
                _pad: 0,
                ifindex: LO,
                service_id: sid,
                state: BACKEND_ACTIVE,
                flags: BACKEND_F_XDP | BACKEND_F_MAC | BACKEND_F_PEER,
                dst_mac: BACKEND_MACS[id as usize % BACKEND_MACS.len()],
                src_mac: HOST_MAC,
            };
            maps.backends.set(id, value, 0).expect("backend written");
            let mut rev = RevNat {
                count: 1,
                ..RevNat::default()
            };
            rev.vip[0] = u32::from_ne_bytes(vip);
            rev.vport[0] = net_port(port);
            maps.rev_nat
                .insert(ServiceKey::new(addr, bport, IPPROTO_TCP), rev, 0)
                .expect("rev nat written");
            self.backends.push((addr, bport));
            self.service_of.insert((addr, bport), sid);
            members.push(id);
        }
        let input: Vec<MaglevBackend> = members
            .iter()
            .map(|&id| {
                let (addr, bport) = self.backends[id as usize];
                MaglevBackend {
                    key: (u64::from(u32::from(Ipv4Addr::from(addr))) << 16) | u64::from(bport),
                    id,
                    weight: 1,
                }
            })
            .collect();
        let table = maglev::build(&input, self.table_size).expect("table builds");
        let base = sid * 2 * self.table_size;
        for (i, slot) in table.iter().enumerate() {
            maps.maglev
                .set(base + i as u32, slot, 0)
                .expect("slot written");
        }
        let bit = vip_filter_bit(u32::from_ne_bytes(vip));
        let word = (bit / 64) as usize;
        self.filter[word] |= 1 << (bit % 64);
        maps.vip_filter
            .set(word as u32, self.filter[word], 0)
            .expect("filter written");
        let value = ServiceValue {
            id: sid,
            table_base: base,
            table_size: self.table_size,
            flags: 0,
        };
        maps.services
            .insert(ServiceKey::new(vip, port, IPPROTO_TCP), value, 0)
            .expect("service written");
        self.services.push(Svc {
            vip,
            port,
            id: sid,
            members,
        });
        self.services.len() - 1
    }

    /// Writes `flows` (key, backend id) into the flow table, flow `i` from
    /// the `i % n`th of the `n` CPUs this thread may use, as RSS would
    /// spread them.
    fn prefill(&mut self, flows: &[(FlowKey, u32)]) {
        let cpus = allowed_cpus();
        for (k, &cpu) in cpus.iter().enumerate() {
            let share: Vec<(FlowKey, u32)> =
                flows.iter().skip(k).step_by(cpus.len()).copied().collect();
            on_cpu(cpu, || self.insert_flows(&share));
        }
    }

    fn insert_flows(&mut self, flows: &[(FlowKey, u32)]) {
        let now = now_secs();
        for &(key, backend_id) in flows {
            let value = Flow {
                backend_id,
                ifindex: LO,
                client_mac: CLIENT_MAC,
                lb_mac: LB_MAC,
                vlan_tci: 0,
                flags: 0,
                last_seen: now,
            };
            self.rig
                .dp
                .maps
                .flows
                .insert(key, value, 0)
                .expect("flow written");
        }
    }

    /// Entries in the flow table (walks it).
    fn flow_count(&self) -> u64 {
        self.rig.dp.maps.flows.keys().filter(Result::is_ok).count() as u64
    }

    /// New flows counted by these services, summed over CPUs.
    fn new_flows(&self, services: &[usize]) -> u64 {
        services
            .iter()
            .map(|&s| self.rig.service_counters(self.services[s].id).new_flows)
            .sum()
    }
}

/// One case: traffic to some services of one bed.
struct Case {
    name: String,
    bed: usize,
    /// Service indexes in the bed that the traffic goes to.
    targets: Vec<usize>,
    /// Established flows: client ids `0..est_n`, flow `j` to target
    /// `j % targets.len()`.
    est_n: u32,
    cursor: u64,
}

impl Case {
    /// Established flow `j`: (client id, target service index, backend id).
    fn established(&self, bed: &Bed, j: u32) -> (u32, usize, u32) {
        let t = self.targets.len() as u32;
        let s = self.targets[(j % t) as usize];
        let members = &bed.services[s].members;
        let b = members[((j / t) as usize) % members.len()];
        (j, s, b)
    }

    /// Every established flow, for prefilling.
    fn established_flows(&self, bed: &Bed) -> Vec<(FlowKey, u32)> {
        (0..self.est_n)
            .map(|j| {
                let (n, s, b) = self.established(bed, j);
                let svc = &bed.services[s];
                (flow_key(n, svc.vip, svc.port), b)
            })
            .collect()
    }

    fn next_established(&mut self) -> u32 {
        let n = u64::from(self.est_n);
        let stride = if n % STRIDE == 0 { 1 } else { STRIDE };
        let j = (self.cursor * stride) % n;
        self.cursor += 1;
        j as u32
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Pass,
    Established,
    NewFlow,
}

impl Path {
    const ALL: [Path; 3] = [Path::Pass, Path::Established, Path::NewFlow];

    fn key(self) -> &'static str {
        match self {
            Path::Pass => "pass_ns",
            Path::Established => "est_ns",
            Path::NewFlow => "new_ns",
        }
    }
}

/// A set of cases measured together, alternating within each round.
struct Axis {
    beds: Vec<Bed>,
    cases: Vec<Case>,
    /// `r0 = XDP_PASS; exit`: the floor.
    empty: Program,
    next_new: u32,
    next_pass: u32,
    /// New flows inserted this round, by bed.
    inserted: Vec<(usize, FlowKey)>,
}

/// Per-round samples of one axis: the floor and each case's paths.
struct Samples {
    floor: Vec<f64>,
    /// `[case][path]` → rounds.
    cases: Vec<[Vec<f64>; 3]>,
}

impl Axis {
    /// Mean kernel-measured ns per call of the empty XDP program.
    fn floor(&mut self, calls: u32) -> f64 {
        let mut total = 0u128;
        for _ in 0..calls {
            let input = pass_frame(self.next_pass);
            self.next_pass = self.next_pass.wrapping_add(1);
            let run = self
                .empty
                .test_run(&input)
                .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
            assert_eq!(run.action, XDP_PASS, "empty program");
            total += run.duration.as_nanos();
        }
        total as f64 / f64::from(calls)
    }

    /// Mean kernel-measured ns per call of `path` in case `c`, every output
    /// checked.
    fn measure(&mut self, c: usize, path: Path, calls: u32) -> f64 {
        let case = &mut self.cases[c];
        let bed = &mut self.beds[case.bed];
        let before = match path {
            Path::Pass => 0,
            _ => bed.new_flows(&case.targets),
        };
        let mut inserted = Vec::new();
        let mut total = 0u128;
        for _ in 0..calls {
            let (input, expect) = match path {
                Path::Pass => {
                    let f = pass_frame(self.next_pass);
                    self.next_pass = self.next_pass.wrapping_add(1);
                    (f, None)
                }
                Path::Established => {
                    let j = case.next_established();
                    let (n, s, b) = case.established(bed, j);
                    let svc = &bed.services[s];
                    (syn_frame(n, svc.vip, svc.port), Some((s, Some(b))))
                }
                Path::NewFlow => {
                    let k = self.next_new;
                    self.next_new = NEW_FLOW_BASE + (k + 1 - NEW_FLOW_BASE) % NEW_FLOW_BASE;
                    let t = case.targets.len() as u64;
                    let s = case.targets[((u64::from(k) * STRIDE) % t) as usize];
                    let svc = &bed.services[s];
                    inserted.push(flow_key(k, svc.vip, svc.port));
                    (syn_frame(k, svc.vip, svc.port), Some((s, None)))
                }
            };
            let run = bed.rig.xdp(&input).expect("BPF_PROG_TEST_RUN");
            total += run.duration.as_nanos();
            match expect {
                None => {
                    assert_eq!(run.action, XDP_PASS, "{}: non-service packet", case.name);
                    assert_eq!(
                        run.output, input,
                        "{}: non-service packet untouched",
                        case.name
                    );
                }
                Some((s, backend)) => {
                    assert_eq!(run.action, XDP_REDIRECT, "{}: {path:?}", case.name);
                    let dst: [u8; 4] = run.output[30..34].try_into().expect("IPv4 header");
                    let port = u16::from_be_bytes([run.output[36], run.output[37]]);
                    match backend {
                        Some(b) => assert_eq!(
                            (dst, port),
                            bed.backends[b as usize],
                            "{}: established flow kept its backend",
                            case.name
                        ),
                        None => assert_eq!(
                            bed.service_of.get(&(dst, port)),
                            Some(&bed.services[s].id),
                            "{}: new flow sent to a backend of its service",
                            case.name
                        ),
                    }
                }
            }
        }
        match path {
            Path::Pass => {}
            Path::Established => {
                let after = bed.new_flows(&case.targets);
                assert_eq!(
                    after, before,
                    "{}: established packets must find their flow in the table",
                    case.name
                );
            }
            Path::NewFlow => {
                let after = bed.new_flows(&case.targets);
                assert_eq!(
                    after - before,
                    u64::from(calls),
                    "{}: every new-flow packet starts a flow",
                    case.name
                );
                // Removed at the end of the round (see `run`).
                self.inserted
                    .extend(inserted.into_iter().map(|k| (case.bed, k)));
            }
        }
        total as f64 / f64::from(calls)
    }

    /// Runs `rounds` rounds: the floor, then each path with the cases
    /// alternating.
    fn run(&mut self, label: &str, rounds: usize, calls: u32) -> Samples {
        let mut s = Samples {
            floor: Vec::new(),
            cases: self.cases.iter().map(|_| Default::default()).collect(),
        };
        for round in 0..rounds {
            s.floor.push(self.floor(calls));
            // Case after case, each one's paths in turn: a case's new flows
            // come right after its established packets, whose LRU marks the
            // inserts then pay to age (as they would with both kinds of
            // traffic mixed). Each round starts with another case, so that
            // being first in a round (which costs the new-flow path more)
            // falls on every case alike.
            let n = self.cases.len();
            for c in (0..n).map(|i| (i + round) % n) {
                for (p, &path) in Path::ALL.iter().enumerate() {
                    let v = self.measure(c, path, calls);
                    s.cases[c][p].push(v);
                }
            }
            // Back to each case's own flows, so the tables do not grow from
            // round to round. Not after each case: the next case's inserts
            // would reuse entries the removal just touched (warm in cache).
            for (bed, key) in std::mem::take(&mut self.inserted) {
                let _ = self.beds[bed].rig.dp.maps.flows.remove(&key);
            }
            eprintln!("scale/{label}: round {}/{rounds} done", round + 1);
        }
        s
    }

    /// One row per case: net of the floor per path.
    fn rows(&self, s: &Samples) -> (Vec<Row>, f64) {
        let floor = median(&s.floor);
        let rows = self
            .cases
            .iter()
            .zip(&s.cases)
            .map(|(case, paths)| {
                let mut row = Row::new(&case.name);
                for (p, path) in Path::ALL.iter().enumerate() {
                    row = row.with(path.key(), (median(&paths[p]) - floor).max(0.0));
                }
                // The record: the established path's rounds, net of the floor's median.
                row.rounds = paths[1].iter().map(|v| v - floor).collect();
                row
            })
            .collect();
        (rows, floor)
    }
}

impl Axis {
    fn new() -> Self {
        Self {
            beds: Vec::new(),
            cases: Vec::new(),
            empty: Program::returning(ProgType::Xdp, XDP_PASS, "lb_bench_empty")
                .unwrap_or_else(|e| panic!("{e}")),
            next_new: NEW_FLOW_BASE,
            next_pass: 0,
            inserted: Vec::new(),
        }
    }
}

/// Backends per service: one data path (default Maglev table size), one
/// service per case, each with its own established flows.
fn backends_axis(p: &Params) -> Axis {
    let n = p.backends.len() as u32;
    let total: u32 = p.backends.iter().sum();
    let table = defaults::TABLE_SIZE;
    let mut bed = Bed::load(n.max(1), total.max(1), table, p.flow_table_size);
    let mut axis = Axis::new();
    let mut next = 0u32;
    for (i, &count) in p.backends.iter().enumerate() {
        let backends: Vec<_> = (next..next + count)
            .map(|b| (backend_addr(b), 8080))
            .collect();
        next += count;
        let s = bed.add_service([198, 18, 101, 1], 80 + i as u16, &backends);
        axis.cases.push(Case {
            name: format!(
                "{} backend{} per service",
                thousands(count.into()),
                if count == 1 { "" } else { "s" }
            ),
            bed: 0,
            targets: vec![s],
            est_n: p.established,
            cursor: 0,
        });
    }
    let mut flows = Vec::new();
    for case in &axis.cases {
        flows.extend(case.established_flows(&bed));
    }
    bed.prefill(&flows);
    axis.beds.push(bed);
    axis
}

/// Services: a data path per case, all with room for the largest count
/// (small Maglev tables, 251 slots, so 10,000 services' two copies fit),
/// two backends per service, each service on its own VIP address.
fn services_axis(p: &Params) -> Axis {
    let max = p.services.iter().copied().max().unwrap_or(1);
    let mut axis = Axis::new();
    for (i, &count) in p.services.iter().enumerate() {
        let mut bed = Bed::load(max, 2 * max, TABLE, p.flow_table_size);
        // VIPs 198.19.0.0 and up, below the non-service packets' 198.19.192.0/20.
        assert!(
            count <= 192 * 256,
            "{count} services do not fit the address plan"
        );
        for s in 0..count {
            let vip = [198, 19, (s >> 8) as u8, s as u8];
            let backends = [(backend_addr(2 * s), 8080), (backend_addr(2 * s + 1), 8080)];
            bed.add_service(vip, 80, &backends);
        }
        let case = Case {
            name: format!(
                "{} service{}",
                thousands(count.into()),
                if count == 1 { "" } else { "s" }
            ),
            bed: i,
            targets: (0..count as usize).collect(),
            est_n: p.established,
            cursor: 0,
        };
        let flows = case.established_flows(&bed);
        bed.prefill(&flows);
        axis.beds.push(bed);
        axis.cases.push(case);
    }
    axis
}

/// Flows in the table: a data path per case, one service of 10 backends,
/// the table prefilled with the case's flows from every CPU in turn; the
/// established path walks all of them.
fn flows_axis(p: &Params) -> (Axis, Vec<u64>) {
    let mut axis = Axis::new();
    let mut present = Vec::new();
    for (i, &count) in p.flows.iter().enumerate() {
        let mut bed = Bed::load(1, 10, defaults::TABLE_SIZE, p.flow_table_size);
        let backends: Vec<_> = (0..10).map(|b| (backend_addr(b), 8080)).collect();
        bed.add_service([198, 18, 101, 1], 80, &backends);
        let case = Case {
            name: if count == 1 {
                "1 flow in the table (replayed, as in the per-packet section)".into()
            } else {
                format!("{} flows in the table", thousands(count.into()))
            },
            bed: i,
            targets: vec![0],
            est_n: count,
            cursor: 0,
        };
        let t = Instant::now();
        let flows = case.established_flows(&bed);
        bed.prefill(&flows);
        let n = bed.flow_count();
        eprintln!(
            "scale/flows: {} flows written in {:.1} s, {} in the table",
            thousands(count.into()),
            t.elapsed().as_secs_f64(),
            thousands(n)
        );
        present.push(n);
        axis.beds.push(bed);
        axis.cases.push(case);
    }
    (axis, present)
}

/// How many of `n` distinct flows a table of `table` entries holds after
/// they are all inserted from one CPU (the first this thread may use).
pub fn flows_fit_one_cpu(table: u32, n: u32) -> u64 {
    let mut bed = Bed::load(1, 1, TABLE, table);
    bed.add_service([198, 18, 101, 1], 80, &[(backend_addr(0), 8080)]);
    let flows: Vec<(FlowKey, u32)> = (0..n)
        .map(|j| (flow_key(j, [198, 18, 101, 1], 80), 0))
        .collect();
    let cpu = allowed_cpus().first().copied().unwrap_or(0);
    on_cpu(cpu, || bed.insert_flows(&flows));
    bed.flow_count()
}

/// How many of `n` distinct flows a table of `table` entries holds after
/// they are inserted in equal shares from every CPU.
pub fn flows_fit_spread(table: u32, n: u32) -> u64 {
    let mut bed = Bed::load(1, 1, TABLE, table);
    bed.add_service([198, 18, 101, 1], 80, &[(backend_addr(0), 8080)]);
    let flows: Vec<(FlowKey, u32)> = (0..n)
        .map(|j| (flow_key(j, [198, 18, 101, 1], 80), 0))
        .collect();
    bed.prefill(&flows);
    bed.flow_count()
}

/// Median time in ms of `maglev::build` for `n` backends at `table_size`,
/// over `rounds` builds (after one warm-up build).
pub fn maglev_rebuild_ms(n: usize, table_size: u32, rounds: usize) -> f64 {
    let backends: Vec<MaglevBackend> = (0..n as u32)
        .map(|i| {
            // Keys as the daemon derives them: address << 16 | port.
            let addr = Ipv4Addr::new(198, 18, 103 + (i % 3) as u8, 2);
            MaglevBackend {
                key: (u64::from(u32::from(addr)) << 16) | u64::from(10_000 + i / 3),
                id: i,
                weight: 1,
            }
        })
        .collect();
    let _ = maglev::build(&backends, table_size).expect("table builds");
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds.max(1) {
        let t = Instant::now();
        let table = maglev::build(&backends, table_size).expect("table builds");
        times.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(table.len(), table_size as usize);
    }
    median(&times)
}

/// One map's kernel memory.
#[derive(Clone, Debug)]
pub struct MapMemory {
    /// Map name.
    pub name: String,
    /// Capacity.
    pub max_entries: u32,
    /// The kernel's own accounting (`memlock` in the map fd's fdinfo).
    pub bytes: u64,
}

/// The kernel memory of every map of a data path loaded with `sizes`: the
/// maps the two programs use, as the kernel accounts them.
pub fn map_memory(sizes: &MapSizes) -> Vec<MapMemory> {
    lb_harness::require_root();
    let mut dp = Datapath::load(sizes).expect("the data path loads");
    let mut ids: Vec<u32> = Vec::new();
    for info in [
        dp.xdp_program().info().expect("XDP program info"),
        dp.tc_program().info().expect("TC program info"),
    ] {
        ids.extend(info.map_ids().expect("map ids").unwrap_or_default());
    }
    ids.sort_unstable();
    ids.dedup();
    let mut out: Vec<MapMemory> = ids
        .into_iter()
        .map(|id| {
            let info = MapInfo::from_id(id).expect("map info");
            let fd = info.fd().expect("map fd");
            let raw = fd.as_fd().as_raw_fd();
            let fdinfo = fs::read_to_string(format!("/proc/self/fdinfo/{raw}"))
                .unwrap_or_else(|e| panic!("reading fdinfo of map {id}: {e}"));
            let bytes = fdinfo
                .lines()
                .find_map(|l| l.strip_prefix("memlock:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| panic!("no memlock in fdinfo of map {id}:\n{fdinfo}"));
            MapMemory {
                name: info.name_as_str().unwrap_or("?").to_owned(),
                max_entries: info.max_entries(),
                bytes,
            }
        })
        .collect();
    out.sort_by_key(|m| std::cmp::Reverse(m.bytes));
    drop(dp);
    out
}

const MIB: f64 = 1024.0 * 1024.0;

/// Memory rows: every map, then per item and the total.
fn memory_rows(sizes: &MapSizes) -> (Vec<Row>, Vec<String>) {
    let mem = map_memory(sizes);
    let get = |name: &str| mem.iter().find(|m| m.name == name);
    let per = |name: &str| get(name).map_or(0.0, |m| m.bytes as f64 / f64::from(m.max_entries));
    let mut rows: Vec<Row> = mem
        .iter()
        .map(|m| {
            Row::new(&format!("memory: {}", m.name))
                .with("mib", m.bytes as f64 / MIB)
                .with("entries", f64::from(m.max_entries))
                .with("bytes_per", m.bytes as f64 / f64::from(m.max_entries))
        })
        .collect();
    let total: u64 = mem.iter().map(|m| m.bytes).sum();
    let slot = per(maps::MAGLEV);
    let service = per(maps::SERVICES) + per(maps::SERVICE_STATS);
    let service_tables = 2.0 * f64::from(sizes.max_table_size) * slot;
    let backend = per(maps::BACKENDS) + per(maps::BACKEND_STATS) + per(maps::REV_NAT);
    rows.push(
        Row::new(&format!(
            "memory per service (entry, counters, 2 Maglev tables of {})",
            thousands(sizes.max_table_size.into())
        ))
        .with("mib", (service + service_tables) / MIB)
        .with("bytes_per", service + service_tables),
    );
    rows.push(Row::new("memory per backend (entry, counters, REV_NAT)").with("bytes_per", backend));
    rows.push(Row::new("memory per flow entry").with("bytes_per", per(maps::FLOWS)));
    rows.push(Row::new("memory per Maglev slot").with("bytes_per", slot));
    rows.push(
        Row::new(&format!("memory: all {} maps, default sizes", mem.len()))
            .with("mib", total as f64 / MIB),
    );
    let mut notes = vec![format!(
        "Map memory is the kernel's own accounting of each map (`memlock` in the map's \
         fdinfo) for a data path loaded with the default sizes: {} services, {} backends, \
         Maglev tables of {} slots (two per service), {} flows; {:.1} MiB in all. The \
         flow table and the Maglev array are allocated in full at load, whatever is in them; \
         per-CPU counters count once per possible CPU ({}).",
        sizes.max_services,
        thousands(sizes.max_backends.into()),
        thousands(sizes.max_table_size.into()),
        thousands(sizes.flow_table_size.into()),
        total as f64 / MIB,
        aya::util::nr_cpus().unwrap_or(0),
    )];
    let value = std::mem::size_of::<u32>() as f64;
    if slot >= 2.0 * value {
        notes.push(format!(
            "A Maglev slot holds a 4-byte backend id but takes {slot:.0} bytes: an ARRAY map \
             keeps each value in a cell rounded up to 8 bytes, so half of LB_MAGLEV ({:.0} \
             MiB) is padding; a flow entry takes {:.0} bytes for its 16-byte key and 28-byte \
             value (the hash element's header and the bucket array come on top).",
            get(maps::MAGLEV).map_or(0.0, |m| m.bytes as f64 / MIB),
            per(maps::FLOWS),
        ));
    }
    (rows, notes)
}

/// Runs the section with the report's parameters.
pub fn run(quick: bool) -> Section {
    run_with(&if quick {
        Params::quick()
    } else {
        Params::full()
    })
}

/// Runs the section with `p`.
pub fn run_with(p: &Params) -> Section {
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    let mut notes = Vec::new();
    let mut floors = Vec::new();

    // One axis at a time: its data paths are dropped before the next loads.
    if !p.backends.is_empty() {
        let mut axis = backends_axis(p);
        let s = axis.run("backends", p.rounds, p.calls);
        let (r, floor) = axis.rows(&s);
        rows.extend(r);
        floors.push(("backends", floor));
    }
    if !p.services.is_empty() {
        let mut axis = services_axis(p);
        let s = axis.run("services", p.rounds, p.calls);
        let (r, floor) = axis.rows(&s);
        rows.extend(r);
        floors.push(("services", floor));
    }
    let mut present = Vec::new();
    if !p.flows.is_empty() {
        let (mut axis, fill) = flows_axis(p);
        let s = axis.run("flows", p.rounds, p.calls);
        let (r, floor) = axis.rows(&s);
        rows.extend(r);
        floors.push(("flows", floor));
        present = fill;
        let est = |name: &str| rows.iter().find(|r| r.name == name)?.get("est_ns");
        let biggest = p.flows.iter().copied().max().unwrap_or(1);
        let many = format!("{} flows in the table", thousands(biggest.into()));
        if let (Some(one), Some(all)) = (
            est("1 flow in the table (replayed, as in the per-packet section)"),
            est(&many),
        ) {
            notes.push(format!(
                "What grows is memory traffic, not work: an established packet does the same \
                 lookups whatever the table holds, {one:.0} ns net when one flow is replayed \
                 (its entries stay in cache) and {all:.0} ns when each packet is another of \
                 {} flows, whose hash bucket and entry are rarely cached (and, in a VM, \
                 rarely in the TLB: the table's entries alone span over 100 MiB). The \
                 per-packet section's established figure is the one-flow case.",
                thousands(biggest.into())
            ));
        }
    }

    let cpus = allowed_cpus().len();
    if let (Some(&n), Some(&got)) = (p.flows.iter().max(), present.iter().max()) {
        let one = flows_fit_one_cpu(p.flow_table_size, n);
        rows.push(
            Row::new(&format!(
                "flow table fill: {} flows written from {cpus} CPUs",
                thousands(n.into())
            ))
            .with("entries", got as f64),
        );
        rows.push(
            Row::new(&format!(
                "flow table fill: {} flows written from 1 CPU",
                thousands(n.into())
            ))
            .with("entries", one as f64),
        );
        targets.push(Target {
            bar: format!(
                "{} flows fit in the {}flow table ({} entries): all still in the table after \
                 writing them, spread over the CPUs as RSS spreads them",
                thousands(n.into()),
                if p.flow_table_size == defaults::FLOW_TABLE_SIZE {
                    "default "
                } else {
                    ""
                },
                thousands(p.flow_table_size.into())
            ),
            actual: format!("{} of {} in the table", thousands(got), thousands(n.into())),
            met: got == u64::from(n),
        });
        targets.push(Target {
            bar: format!(
                "{} flows fit when they all arrive on one CPU",
                thousands(n.into())
            ),
            actual: format!("{} of {} in the table", thousands(one), thousands(n.into())),
            met: one == u64::from(n),
        });
        notes.push(format!(
            "The flow table is an LRU hash with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`): \
             the kernel splits its {} entries evenly between the {} possible CPUs, and a \
             flow can only take an entry of the CPU its first packet is handled on; when \
             that CPU's share is used up the CPU evicts its own least recently used flow, \
             even with the other CPUs' shares free. So the table holds {} flows only when \
             they arrive spread over the CPUs (RSS on a multi-queue NIC); flows that all \
             arrive on one CPU (a single-queue NIC, or one veth sender) fit {} of them.",
            thousands(p.flow_table_size.into()),
            aya::util::nr_cpus().unwrap_or(0),
            thousands(got),
            thousands(one)
        ));
    }

    // The default table size, and the largest the default maps take.
    for (m, &n) in [defaults::TABLE_SIZE, defaults::MAX_TABLE_SIZE]
        .into_iter()
        .flat_map(|m| p.maglev_backends.iter().map(move |n| (m, n)))
    {
        let ms = maglev_rebuild_ms(n, m, p.maglev_rounds);
        rows.push(
            Row::new(&format!(
                "Maglev rebuild, {} backends (M = {})",
                thousands(n as u64),
                thousands(m.into())
            ))
            .with("ms", ms),
        );
        if n == 1_000 && m == defaults::MAX_TABLE_SIZE {
            targets.push(Target {
                bar: "Maglev rebuild for 1,000 backends (M = 65,537) under 5 ms".into(),
                actual: format!("{ms:.2} ms"),
                met: ms < 5.0,
            });
        }
    }

    if p.memory {
        let (r, n) = memory_rows(&MapSizes::default());
        rows.extend(r);
        notes.extend(n);
    }

    notes.insert(
        0,
        format!(
            "Per-packet columns are ns per packet net of the empty XDP program (floors this \
             run: {}). Established: each call \
             another of the case's flows already in the table ({} for the backends and \
             services cases, every flow of the table for the flows cases), visited in a \
             strided order; new flow: each call a flow never seen, removed again after the \
             round so the table stays at the case's fill; non-service: each call to another \
             of {} addresses that are no VIP. Backends: one service per case, Maglev table \
             of {} slots. Services: each on its own VIP address, two backends each, Maglev \
             tables of {} slots so that 10,000 services fit; traffic spread over all of \
             them. Flows: one service of 10 backends. Every flow table has {} entries; the \
             established flows are written into it from userspace, in equal shares from \
             each CPU. Compare rows within a group: each group has data paths of its own.",
            floors
                .iter()
                .map(|(axis, f)| format!("{f:.1} ns for the {axis} cases"))
                .collect::<Vec<_>>()
                .join(", "),
            thousands(p.established.into()),
            thousands(PASS_ADDRS.into()),
            thousands(defaults::TABLE_SIZE.into()),
            TABLE,
            thousands(p.flow_table_size.into()),
        ),
    );
    notes.push(
        "Maglev rebuild: `lb::maglev::build` of one service's table as the daemon keys \
         backends (address << 16 | port), median of the rebuilds; writing only the slots \
         that changed into the map comes on top (see the control plane section). Daemon \
         RSS is in the control plane section."
            .into(),
    );

    Section {
        key: "scale".into(),
        title: "How cost grows".into(),
        method: format!(
            "BPF_PROG_TEST_RUN with repeat = 1 and a fresh input frame each call, the kernel's \
             time per call averaged over {} calls a round, cases alternating within each \
             round; net = minus the empty XDP program measured the same way; every call's \
             output checked (action and backend), and every batch checks through the \
             services' counters that established packets found their flow and new ones \
             started one. Maglev rebuild: median of {} builds.",
            thousands(p.calls.into()),
            p.maglev_rounds
        ),
        rounds: p.rounds,
        columns: vec![
            Column::new("pass_ns", "non-service (ns net)", 1),
            Column::new("est_ns", "established (ns net)", 1),
            Column::new("new_ns", "new flow (ns net)", 1),
            Column::new("ms", "time (ms)", 2),
            Column::new("mib", "memory (MiB)", 2),
            Column::new("entries", "entries", 0),
            Column::new("bytes_per", "bytes/entry", 1),
        ],
        rows,
        targets,
        chart: Some("new_ns".into()),
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_000), "1,000");
        assert_eq!(thousands(1_048_576), "1,048,576");
    }

    #[test]
    fn clients_are_distinct_and_in_range() {
        let mut seen = std::collections::HashSet::new();
        for n in (0..(1u32 << 25))
            .step_by(4099)
            .chain([1, 255, 256, (1 << 25) - 1])
        {
            let (a, p) = client(n);
            assert!(a[0] == 198 && (a[1] == 18 || a[1] == 19));
            assert!(seen.insert((a, p)), "client {n} repeats");
        }
        assert_ne!(client(0), client(1 << 24));
        assert_ne!(client(5), client(5 + 256));
    }
}
