//! `lb-bench`: per-packet cost of the data path through `BPF_PROG_TEST_RUN`,
//! run by `cargo xtask bench`.
//!
//! Every measurement is one `BPF_PROG_TEST_RUN` call with `repeat = 1` and a
//! fresh copy of the input frame, so a program that rewrites the packet
//! never sees its own output (which is what `repeat > 1` would time). The
//! kernel's own timing of each call is averaged over many calls; the empty
//! program's cost, measured the same way, is the floor subtracted from the
//! others. Contenders alternate within each round (A B C … A B C …) so that
//! drift of the machine hits all of them alike; the figure is the median of
//! the rounds. The last output of every contender is checked against the
//! expected rewrite, so a figure can only come from the intended path.

use std::{fs, path::PathBuf, time::Duration};

use lb_common::{BACKEND_F_MAC, BACKEND_F_PEER, BACKEND_F_XDP};
use lb_tests::packets::{
    assert_checksums_valid, backend_of, frame, reply_from_backend, reply_to_client, syn,
    syn_to_backend, Rig, Run, BACKENDS, CLIENT_MAC, L4, LB_MAC, TC_ACT_OK, TC_ACT_REDIRECT, VIP,
    XDP_PASS, XDP_REDIRECT,
};
use serde::Serialize;

#[derive(Debug)]
struct Args {
    quick: bool,
    out: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        quick: false,
        out: PathBuf::from("target/bench"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(x) = it.next() {
        match x.as_str() {
            "--quick" => a.quick = true,
            "--out" => a.out = it.next().expect("--out takes a directory").into(),
            other => panic!("unknown argument {other:?} (use --quick, --out DIR)"),
        }
    }
    a
}

/// The machine the figures come from.
#[derive(Serialize)]
struct Machine {
    cpu: String,
    cores: usize,
    kernel: String,
}

fn machine() -> Machine {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());
    Machine {
        cpu,
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel,
    }
}

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

    fn key(self) -> &'static str {
        match self {
            Path::XdpEmpty => "xdp_empty",
            Path::NonService => "non_service",
            Path::NewFlow => "new_flow",
            Path::Established => "established",
            Path::TcEmpty => "tc_empty",
            Path::Reverse => "reverse",
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
    flow_table_size: u32,
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
        Self {
            rig,
            flow_table_size,
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
                Path::XdpEmpty => self.rig.xdp_noop(&input),
                Path::NonService | Path::NewFlow | Path::Established => self.rig.xdp(&input),
                Path::TcEmpty => self.rig.tc_noop(&input),
                Path::Reverse => self.rig.tc(&input),
            }
            .expect("BPF_PROG_TEST_RUN");
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
            Path::TcEmpty => assert_eq!(run.action, TC_ACT_OK, "{what}"),
            Path::Reverse => {
                assert_eq!(run.action, TC_ACT_REDIRECT, "{what}");
                assert_eq!(run.output, reply_to_client(40000), "{what}: rewrite");
            }
        }
    }
}

#[derive(Serialize)]
struct PathResult {
    key: &'static str,
    name: &'static str,
    rounds_ns: Vec<f64>,
    median_ns: f64,
    net_ns: Option<f64>,
    mpps_per_core: Option<f64>,
    target: Option<String>,
    target_met: Option<bool>,
}

#[derive(Serialize)]
struct Report {
    machine: Machine,
    method: &'static str,
    rounds: usize,
    calls_per_round: u32,
    flow_table_size: u32,
    per_packet: Vec<PathResult>,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

fn main() {
    let args = args();
    let (rounds, calls) = if args.quick { (5, 5_000) } else { (11, 50_000) };
    let mut bench = Bench::new(calls);
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); Path::ALL.len()];
    for round in 0..rounds {
        for (i, p) in Path::ALL.iter().enumerate() {
            samples[i].push(bench.measure(*p));
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }
    let medians: Vec<f64> = samples.iter().map(|s| median(s)).collect();
    let med = |p: Path| medians[Path::ALL.iter().position(|q| *q == p).expect("listed")];
    let per_packet: Vec<PathResult> = Path::ALL
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let net = p.floor().map(|f| (medians[i] - med(f)).max(0.0));
            let (target, met) = match p {
                Path::Established => (Some("<= 90 ns net".to_owned()), net.map(|n| n <= 90.0)),
                Path::NewFlow => (Some("<= 160 ns net".to_owned()), net.map(|n| n <= 160.0)),
                Path::NonService => (
                    Some("within 10% of the empty program".to_owned()),
                    Some(medians[i] <= med(Path::XdpEmpty) * 1.10),
                ),
                _ => (None, None),
            };
            PathResult {
                key: p.key(),
                name: p.name(),
                rounds_ns: samples[i].clone(),
                median_ns: medians[i],
                net_ns: net,
                mpps_per_core: net.filter(|n| *n > 0.0).map(|n| 1_000.0 / n),
                target,
                target_met: met,
            }
        })
        .collect();
    let report = Report {
        machine: machine(),
        method: "BPF_PROG_TEST_RUN with repeat = 1 and a fresh input frame each call (so no \
                 program sees its own rewrite), the kernel's time per call averaged over a round, \
                 median over rounds, contenders alternating within each round; net = minus the \
                 empty program of the same type, measured the same way; the last output of every \
                 contender is checked against the expected rewrite",
        rounds,
        calls_per_round: calls,
        flow_table_size: bench.flow_table_size,
        per_packet,
    };
    fs::create_dir_all(&args.out).expect("create the output directory");
    let json = serde_json::to_string_pretty(&report).expect("report serialises");
    fs::write(args.out.join("report.json"), json).expect("write report.json");
    let md = markdown(&report);
    fs::write(args.out.join("report.md"), &md).expect("write report.md");
    println!("{md}");
    println!("written: {}/report.json, report.md", args.out.display());
}

fn markdown(r: &Report) -> String {
    let m = &r.machine;
    let mut s = format!(
        "### Per-packet cost (`BPF_PROG_TEST_RUN`)\n\n\
         Machine: {}, {} cores, Linux {}. Median of {} rounds of {} calls each.\n\n\
         Method: {}. The new-flow path inserts every call's flow into a \
         {}-entry flow table, as a busy balancer would; the established path \
         replays one flow.\n\n\
         | path | ns/packet | net of floor | Mpps/core (net) | target |\n\
         |---|---:|---:|---:|---|\n",
        m.cpu, m.cores, m.kernel, r.rounds, r.calls_per_round, r.method, r.flow_table_size
    );
    for p in &r.per_packet {
        let net = p.net_ns.map_or("—".to_owned(), |n| format!("{n:.1}"));
        let mpps = p
            .mpps_per_core
            .map_or("—".to_owned(), |n| format!("{n:.1}"));
        let target = match (&p.target, p.target_met) {
            (Some(t), Some(true)) => format!("{t}: met"),
            (Some(t), Some(false)) => format!("{t}: **missed**"),
            _ => String::new(),
        };
        s.push_str(&format!(
            "| {} | {:.1} | {net} | {mpps} | {target} |\n",
            p.name, p.median_ns
        ));
    }
    s
}
