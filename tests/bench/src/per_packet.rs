//! Per-packet cost of the data path through `BPF_PROG_TEST_RUN`.
//!
//! Every measurement is one `BPF_PROG_TEST_RUN` call with `repeat = 1` and a
//! fresh copy of the input frame, so a program that rewrites the packet
//! never sees its own output (which is what `repeat > 1` would time). The
//! kernel's own timing of each call is averaged over many calls; the cost
//! of an empty program of the same type (`r0 = XDP_PASS; exit`, or
//! `TC_ACT_UNSPEC` for TC), measured the same way, is the floor subtracted from
//! the others. Contenders alternate within each round (A B C … A B C …) so
//! that drift of the machine hits all of them alike; the figure is the
//! median of the rounds. The last output of every contender is checked
//! against the expected rewrite, so a figure can only come from the intended
//! path.

use std::time::Duration;

use lb_common::{BACKEND_F_MAC, BACKEND_F_PEER, BACKEND_F_XDP};
use lb_harness::packets::{
    assert_checksums_valid, backend_of, frame, reply_from_backend, reply_to_client, syn,
    syn_to_backend, Rig, Run, BACKENDS, CLIENT_MAC, L4, LB_MAC, TC_ACT_REDIRECT, TC_ACT_UNSPEC,
    VIP, XDP_PASS, XDP_REDIRECT,
};

use crate::{
    raw_bpf::{ProgType, Program},
    report::{median, Column, Row, Section, Target},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    XdpEmpty,
    NonService,
    NewFlow,
    Established,
    TcEmpty,
    Reverse,
}

impl Path {
    const ALL: [Path; 6] = [
        Path::XdpEmpty,
        Path::NonService,
        Path::NewFlow,
        Path::Established,
        Path::TcEmpty,
        Path::Reverse,
    ];

    fn name(self) -> &'static str {
        match self {
            Path::XdpEmpty => "empty XDP program (floor)",
            Path::NonService => "non-service packet (XDP_PASS)",
            Path::NewFlow => "forward, new flow (XDP)",
            Path::Established => "forward, established flow (XDP)",
            Path::TcEmpty => "empty TC program (floor)",
            Path::Reverse => "reverse, reply to client (TC)",
        }
    }

    fn floor(self) -> Option<Path> {
        match self {
            Path::XdpEmpty | Path::TcEmpty => None,
            Path::Reverse => Some(Path::TcEmpty),
            _ => Some(Path::XdpEmpty),
        }
    }
}

/// A client address and port for the `n`th new flow: all distinct for
/// millions of flows, all inside 198.18.0.0/15 (never sent anywhere).
fn new_flow_frame(n: u32) -> Vec<u8> {
    let src = [
        198,
        18 + ((n >> 24) & 1) as u8,
        (n >> 16) as u8,
        (n >> 8) as u8,
    ];
    frame(
        (LB_MAC, CLIENT_MAC),
        None,
        src,
        VIP,
        L4::Syn {
            src: 1024 + (n & 0xff) as u16,
            dst: 80,
        },
        &[],
        &[],
    )
}

struct Bench {
    rig: Rig,
    /// `r0 = XDP_PASS; exit` and `r0 = TC_ACT_UNSPEC; exit`: the floors.
    empty_xdp: Program,
    empty_tc: Program,
    calls: u32,
    next_flow: u32,
    non_service: Vec<u8>,
    established: Vec<u8>,
    established_out: Vec<u8>,
    reply: Vec<u8>,
}

impl Bench {
    fn new(calls: u32) -> Self {
        // Default flow table size: the new-flow path pays for a realistic table.
        let flow_table_size = lb_common::defaults::FLOW_TABLE_SIZE;
        let mut rig = Rig::web(
            3,
            BACKEND_F_XDP | BACKEND_F_MAC | BACKEND_F_PEER,
            flow_table_size,
        );
        let established = syn(40000);
        let first = rig.xdp(&established).expect("test run");
        assert_eq!(first.action, XDP_REDIRECT);
        let b = backend_of(&first.output);
        let established_out = syn_to_backend(40000, b);
        let non_service = frame(
            (LB_MAC, CLIENT_MAC),
            None,
            [198, 18, 100, 2],
            [198, 18, 101, 9],
            L4::Syn {
                src: 40000,
                dst: 80,
            },
            &[],
            &[],
        );
        let reply = reply_from_backend(40000, b);
        let empty = |ty, action| {
            Program::returning(ty, action, "lb_bench_empty").unwrap_or_else(|e| panic!("{e}"))
        };
        Self {
            rig,
            empty_xdp: empty(ProgType::Xdp, XDP_PASS),
            empty_tc: empty(ProgType::SchedCls, TC_ACT_UNSPEC),
            calls,
            next_flow: 0,
            non_service,
            established,
            established_out,
            reply,
        }
    }

    /// Mean kernel-measured ns per call over `self.calls` calls, and checks
    /// the last output.
    fn measure(&mut self, path: Path) -> f64 {
        let mut total = Duration::ZERO;
        let mut last: Option<(Vec<u8>, Run)> = None;
        for _ in 0..self.calls {
            let input = match path {
                Path::XdpEmpty | Path::NonService => self.non_service.clone(),
                Path::NewFlow => {
                    self.next_flow += 1;
                    new_flow_frame(self.next_flow)
                }
                Path::Established => self.established.clone(),
                Path::TcEmpty | Path::Reverse => self.reply.clone(),
            };
            let run = match path {
                Path::XdpEmpty => self.empty_xdp.test_run(&input),
                Path::NonService | Path::NewFlow | Path::Established => {
                    self.rig.xdp(&input).map_err(|e| e.to_string())
                }
                Path::TcEmpty => self.empty_tc.test_run(&input),
                Path::Reverse => self.rig.tc(&input).map_err(|e| e.to_string()),
            }
            .unwrap_or_else(|e| panic!("BPF_PROG_TEST_RUN: {e}"));
            total += run.duration;
            last = Some((input, run));
        }
        let (input, run) = last.expect("at least one call");
        self.check(path, &input, &run);
        total.as_nanos() as f64 / f64::from(self.calls)
    }

    fn check(&self, path: Path, input: &[u8], run: &Run) {
        let what = path.name();
        match path {
            Path::XdpEmpty | Path::NonService => {
                assert_eq!(run.action, XDP_PASS, "{what}");
                assert_eq!(run.output, input, "{what}: untouched");
            }
            Path::NewFlow => {
                assert_eq!(run.action, XDP_REDIRECT, "{what}");
                let b = backend_of(&run.output);
                assert!(b < BACKENDS.len());
                assert_eq!(&run.output[26..30], &input[26..30], "{what}: client kept");
                assert_checksums_valid(what, &run.output);
            }
            Path::Established => {
                assert_eq!(run.action, XDP_REDIRECT, "{what}");
                assert_eq!(run.output, self.established_out, "{what}: rewrite");
            }
            Path::TcEmpty => assert_eq!(run.action, TC_ACT_UNSPEC, "{what}"),
            Path::Reverse => {
                assert_eq!(run.action, TC_ACT_REDIRECT, "{what}");
                assert_eq!(run.output, reply_to_client(40000), "{what}: rewrite");
            }
        }
    }
}

/// Runs the section: `quick` takes 5 rounds of 5,000 calls, else 11 of 50,000.
pub fn run(quick: bool) -> Section {
    let (rounds, calls) = if quick { (5, 5_000) } else { (11, 50_000) };
    let mut bench = Bench::new(calls);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Path::ALL.len()];
    for round in 0..rounds {
        for (i, p) in Path::ALL.iter().enumerate() {
            samples[i].push(bench.measure(*p));
        }
        eprintln!("per-packet: round {}/{rounds} done", round + 1);
    }
    let medians: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    let med = |p: Path| medians[Path::ALL.iter().position(|q| *q == p).expect("listed")];
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (i, &p) in Path::ALL.iter().enumerate() {
        let mut row = Row::new(p.name()).with("ns", medians[i]);
        row.rounds = samples[i].clone();
        let net = p.floor().map(|f| (medians[i] - med(f)).max(0.0));
        if let Some(n) = net {
            row = row.with("net_ns", n);
            if n > 0.0 {
                row = row.with("mpps", 1_000.0 / n);
            }
        }
        match (p, net) {
            (Path::Established, Some(n)) => targets.push(Target {
                bar: "established flow <= 90 ns net".into(),
                actual: format!("{n:.1} ns"),
                met: n <= 90.0,
            }),
            (Path::NewFlow, Some(n)) => targets.push(Target {
                bar: "new flow <= 160 ns net".into(),
                actual: format!("{n:.1} ns"),
                met: n <= 160.0,
            }),
            (Path::NonService, _) => {
                let floor = med(Path::XdpEmpty);
                targets.push(Target {
                    bar: "non-service packet within 10% of the empty program".into(),
                    actual: format!("{:.1} ns vs {floor:.1} ns", medians[i]),
                    met: medians[i] <= floor * 1.10,
                });
            }
            _ => {}
        }
        rows.push(row);
    }
    Section {
        key: "per_packet".into(),
        title: "Per-packet cost (BPF_PROG_TEST_RUN)".into(),
        method: format!(
            "BPF_PROG_TEST_RUN with repeat = 1 and a fresh input frame each call (so no program \
             sees its own rewrite), the kernel's time per call averaged over {calls} calls a \
             round, contenders alternating within each round; net = minus the empty program of \
             the same type, measured the same way; the last output of every contender is \
             checked against the expected rewrite. The new-flow path inserts every call's flow \
             into a {}-entry flow table, as a busy balancer would; the established path replays \
             one flow.",
            lb_common::defaults::FLOW_TABLE_SIZE
        ),
        rounds,
        columns: vec![
            Column::new("ns", "ns/packet", 1),
            Column::new("net_ns", "net of floor (ns)", 1),
            Column::new("mpps", "Mpps/core (net)", 1),
        ],
        rows,
        targets,
        chart: Some("ns".into()),
        notes: Vec::new(),
    }
}
