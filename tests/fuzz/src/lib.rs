//! The data path fuzzer behind `cargo xtask fuzz`: frames from
//! [`generate`] through both programs with `BPF_PROG_TEST_RUN`, over maps
//! holding services, backends and flows ([`scenario`]), every run checked
//! against [`check`]'s invariants, and the global outcome counters read
//! every [`BATCH`] frames: each counter must have moved by exactly the
//! number of runs that ended in its outcome, so together they add up to
//! the runs. A frame that breaks an invariant is saved as a fixture
//! ([`Fixture`]) that [`replay`] runs again. [`churn`] adds backends that
//! change state under traffic.
//!
//! Needs root (BPF).

#![warn(missing_docs)]

pub mod check;
pub mod churn;
pub mod generate;
pub mod scenario;
pub mod wire;

use std::{
    fmt::Write as _,
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb::datapath::Maps;
use lb_common::stat;
use lb_harness::packets::{Rig, Run};

use crate::{
    check::{check, expect, key_of, Expect, Prog},
    generate::Gen,
    scenario::Model,
    wire::{classify, Class},
};

/// Frames between two readings of the counters.
pub const BATCH: usize = 1024;
/// Failures after which a run stops looking for more.
pub const MAX_FAILURES: usize = 16;

/// The counters, by index.
type Counts = [u64; stat::COUNT as usize];

/// Where saved fixtures live: `tests/fixtures/fuzz` in the repository.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/fuzz has a parent")
        .join("fixtures/fuzz")
}

/// A failing frame, as saved: the frames that set up its flows, the frame,
/// and what the reference expects of it in each program.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fixture {
    /// What failed, and where it was found.
    pub comment: String,
    /// Frames run first, through both programs, checked like the others
    /// (the forward packet of a reply's flow, say).
    pub context: Vec<Vec<u8>>,
    /// The frame.
    pub frame: Vec<u8>,
    /// What it must lead to in XDP.
    pub xdp: Expect,
    /// What it must lead to in TC.
    pub tc: Expect,
}

impl Fixture {
    /// The file's text: `#` comment lines, then `context HEX` lines,
    /// `frame HEX`, `xdp OUTCOME` and `tc OUTCOME`.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        for line in self.comment.lines() {
            let _ = writeln!(s, "# {line}");
        }
        for c in &self.context {
            let _ = writeln!(s, "context {}", hex(c));
        }
        let _ = writeln!(s, "frame {}", hex(&self.frame));
        let _ = writeln!(s, "xdp {}", self.xdp);
        let _ = writeln!(s, "tc {}", self.tc);
        s
    }

    /// Reads a fixture's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (mut comment, mut context) = (Vec::new(), Vec::new());
        let (mut frame, mut xdp, mut tc) = (None, None, None);
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}", n + 1);
            if let Some(c) = line.strip_prefix('#') {
                comment.push(c.trim());
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let (key, value) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "context" => context.push(unhex(value).map_err(at)?),
                "frame" => frame = Some(unhex(value).map_err(at)?),
                "xdp" => xdp = Some(value.parse().map_err(at)?),
                "tc" => tc = Some(value.parse().map_err(at)?),
                other => return Err(at(format!("unknown key {other:?}"))),
            }
        }
        Ok(Self {
            comment: comment.join("\n"),
            context,
            frame: frame.ok_or("no frame line")?,
            xdp: xdp.ok_or("no xdp line")?,
            tc: tc.ok_or("no tc line")?,
        })
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    let s = s.trim();
    if !s.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            u8::from_str_radix(&s[i..i + 2], 16)
                .map_err(|_| format!("{:?} is not hex", &s[i..i + 2]))
        })
        .collect()
}

/// One frame's run through both programs.
pub struct Outcome {
    /// What the reference expected of each program.
    pub expected: [Expect; 2],
    /// The counters the runs moved (none for a refused run), or the first
    /// invariant broken.
    pub result: Result<[Option<u32>; 2], String>,
}

/// The data path under test, with the model of its flows.
pub struct Fuzzer {
    rig: Rig,
    model: Model,
    exact: bool,
    /// Frames forwarded, and their bytes as received.
    forwarded: (u64, u64),
}

impl Fuzzer {
    /// Loads the data path with the scenario's maps. `exact`: nothing will
    /// be evicted from the flow table (a replay of a few frames), so a
    /// reply to a recorded flow must be reversed.
    pub fn new(exact: bool) -> Self {
        Self {
            rig: scenario::load(),
            model: Model::default(),
            exact,
            forwarded: (0, 0),
        }
    }

    fn run(&mut self, prog: Prog, f: &[u8]) -> Result<Run, String> {
        match prog {
            Prog::Xdp => self.rig.xdp(f),
            Prog::Tc => self.rig.tc(f),
        }
        .map_err(|e| e.to_string())
    }

    /// Runs `f` through XDP, then TC, checking each run.
    pub fn frame(&mut self, f: &[u8]) -> Outcome {
        let mut expected = [Expect::Refused; 2];
        let mut moved = [None; 2];
        for (i, prog) in [Prog::Xdp, Prog::Tc].into_iter().enumerate() {
            let want = expect(prog, f, &self.model);
            expected[i] = want;
            let run = self.run(prog, f);
            match check(prog, f, want, run, &mut self.model, self.exact) {
                Ok(m) => moved[i] = m,
                Err(e) => {
                    // What the other program expects still goes in a fixture.
                    if i == 0 {
                        expected[1] = expect(Prog::Tc, f, &self.model);
                    }
                    return Outcome {
                        expected,
                        result: Err(e),
                    };
                }
            }
            if matches!(want, Expect::Forward(_)) {
                self.forwarded.0 += 1;
                self.forwarded.1 += f.len() as u64;
            }
        }
        Outcome {
            expected,
            result: Ok(moved),
        }
    }

    /// The global counters, summed over CPUs.
    pub fn counters(&self) -> Counts {
        let mut c = [0; stat::COUNT as usize];
        for (name, v) in self
            .rig
            .dp
            .maps
            .global_counters()
            .expect("counters readable")
        {
            let i = stat::NAMES
                .iter()
                .position(|n| *n == name)
                .expect("a known counter");
            c[i] = v;
        }
        c
    }

    /// [`Fuzzer::frame`], with the counters read before and after: each
    /// run must move its counter by one and nothing else.
    pub fn frame_counted(&mut self, f: &[u8]) -> Outcome {
        let before = self.counters();
        let mut out = self.frame(f);
        let after = self.counters();
        if let Ok(moved) = &out.result {
            let mut want = [0u64; stat::COUNT as usize];
            for m in moved.iter().flatten() {
                want[*m as usize] += 1;
            }
            if let Some(e) = counter_mismatch(&before, &after, &want) {
                out.result = Err(e);
            }
        }
        out
    }

    /// The frames that opened the flows `f` may belong to, so that a
    /// replay of `f` meets them recorded.
    fn context(&self, f: &[u8]) -> Vec<Vec<u8>> {
        let Class::Ipv4(p) = classify(f) else {
            return Vec::new();
        };
        let mut keys = vec![key_of(&p)];
        for (s, _) in scenario::served_by(p.src, p.sport, p.proto) {
            keys.push((p.dst, s.vip, p.dport, s.port, p.proto));
        }
        keys.iter()
            .filter_map(|k| self.model.flow(k))
            .map(|r| r.frame.clone())
            .filter(|c| c != f)
            .collect()
    }

    /// Checks the service and backend counters against the frames seen
    /// forwarded: every one counted once, in its service and its backend,
    /// with its bytes.
    pub fn check_flow_counters(&self) -> Result<(), String> {
        let sum = |map: &aya::maps::PerCpuArray<aya::maps::MapData, lb_common::Counters>,
                   ids: u32| {
            (0..ids).fold((0u64, 0u64), |(p, b), id| {
                let c = Maps::sum_counters(&map.get(&id, 0).expect("counters readable"));
                (p + c.packets, b + c.bytes)
            })
        };
        let maps = &self.rig.dp.maps;
        let services = sum(&maps.service_stats, scenario::SERVICE_DEFS.len() as u32);
        let backends = sum(&maps.backend_stats, scenario::BACKEND_DEFS.len() as u32);
        for (what, got) in [("service", services), ("backend", backends)] {
            if got != self.forwarded {
                return Err(format!(
                    "{what} counters: {} packets and {} bytes, but {} frames of {} bytes were forwarded",
                    got.0, got.1, self.forwarded.0, self.forwarded.1
                ));
            }
        }
        Ok(())
    }
}

/// Compares the counters' movement from `before` to `after` with `want`.
fn counter_mismatch(before: &Counts, after: &Counts, want: &Counts) -> Option<String> {
    let wrong: Vec<String> = (0..before.len())
        .filter(|&i| after[i].wrapping_sub(before[i]) != want[i])
        .map(|i| {
            format!(
                "{} moved by {}, {} expected",
                stat::NAMES[i],
                after[i].wrapping_sub(before[i]),
                want[i]
            )
        })
        .collect();
    (!wrong.is_empty()).then(|| format!("counters: {}", wrong.join("; ")))
}

/// What one fuzz run is asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Frames to send (each through both programs).
    pub count: u64,
    /// The generator's seed.
    pub seed: u64,
    /// Stop (and fail) when the run takes longer than this.
    pub time_limit: Duration,
    /// Where to save failing frames as fixtures; `None`: not saved.
    pub save_to: Option<PathBuf>,
}

/// One invariant broken.
#[derive(Debug)]
pub struct Failure {
    /// The frame's number in the run (from 0).
    pub index: u64,
    /// What broke, and the fixture to replay it.
    pub fixture: Fixture,
    /// Where the fixture was saved.
    pub saved: Option<PathBuf>,
}

/// What a fuzz run did.
#[derive(Debug)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Frames sent.
    pub frames: u64,
    /// Program runs (two per frame, less those the kernel refused).
    pub runs: u64,
    /// Runs the kernel refused (frames too short for the test run).
    pub refused: u64,
    /// Wall time.
    pub elapsed: Duration,
    /// How far each counter moved.
    pub outcomes: Vec<(&'static str, u64)>,
    /// What broke.
    pub failures: Vec<Failure>,
    /// Whether the time limit stopped the run before `count` frames.
    pub timed_out: bool,
}

impl Report {
    /// Whether every frame ran and nothing broke.
    pub fn passed(&self) -> bool {
        self.failures.is_empty() && !self.timed_out
    }

    /// Frames per second.
    pub fn rate(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// A summary for people, several lines.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "seed {}: {} frames, {} program runs ({} refused by the kernel as too short) in {:.1} s: {:.0} frames/s\n",
            self.seed,
            self.frames,
            self.runs,
            self.refused,
            self.elapsed.as_secs_f64(),
            self.rate()
        );
        for (name, n) in self.outcomes.iter().filter(|(_, n)| *n > 0) {
            let _ = writeln!(s, "  {name:<20} {n:>10}");
        }
        if self.timed_out {
            let _ = writeln!(s, "STOPPED by the time limit before every frame ran");
        }
        for f in &self.failures {
            let _ = writeln!(s, "FAILED at frame {}: {}", f.index, f.fixture.comment);
            if let Some(p) = &f.saved {
                let _ = writeln!(s, "  saved as {}", p.display());
            }
        }
        s
    }
}

/// Runs `opts.count` generated frames through both programs.
pub fn fuzz(opts: &Options) -> Report {
    let mut fz = Fuzzer::new(false);
    let mut gen = Gen::new(opts.seed);
    let start = Instant::now();
    let mut report = Report {
        seed: opts.seed,
        frames: 0,
        runs: 0,
        refused: 0,
        elapsed: Duration::ZERO,
        outcomes: Vec::new(),
        failures: Vec::new(),
        timed_out: false,
    };
    let mut totals = [0u64; stat::COUNT as usize];
    let mut before = fz.counters();
    let mut want = [0u64; stat::COUNT as usize];
    let mut batch: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
    while report.frames < opts.count && report.failures.len() < MAX_FAILURES {
        if start.elapsed() > opts.time_limit {
            report.timed_out = true;
            break;
        }
        let f = gen.next(&fz.model);
        let index = report.frames;
        report.frames += 1;
        let out = fz.frame(&f);
        match out.result {
            Ok(moved) => {
                for m in moved {
                    match m {
                        Some(c) => {
                            want[c as usize] += 1;
                            report.runs += 1;
                        }
                        None => report.refused += 1,
                    }
                }
                batch.push(f);
            }
            Err(message) => {
                let context = fz.context(&f);
                fail(&mut report, opts, index, message, context, f, out.expected);
                // Start counting afresh after the frame that broke.
                add_moved(&mut totals, &before, &fz.counters());
                before = fz.counters();
                want = [0; stat::COUNT as usize];
                batch.clear();
                continue;
            }
        }
        if batch.len() == BATCH || report.frames == opts.count {
            let after = fz.counters();
            if let Some(message) = counter_mismatch(&before, &after, &want) {
                // Find the frame: run the batch again one frame at a time.
                let first = index + 1 - batch.len() as u64;
                let found = batch.iter().enumerate().find_map(|(i, f)| {
                    let out = fz.frame_counted(f);
                    out.result.err().map(|e| (i, f.clone(), e, out.expected))
                });
                match found {
                    Some((i, f, e, expected)) => {
                        let context = fz.context(&f);
                        fail(&mut report, opts, first + i as u64, e, context, f, expected);
                    }
                    None => report.failures.push(Failure {
                        index: first,
                        fixture: Fixture {
                            comment: format!(
                                "frames {first}..={index}: {message} (not found again frame by frame)"
                            ),
                            context: Vec::new(),
                            frame: Vec::new(),
                            xdp: Expect::Refused,
                            tc: Expect::Refused,
                        },
                        saved: None,
                    }),
                }
            }
            add_moved(&mut totals, &before, &fz.counters());
            before = fz.counters();
            want = [0; stat::COUNT as usize];
            batch.clear();
        }
    }
    if report.failures.is_empty() && !report.timed_out {
        if let Err(message) = fz.check_flow_counters() {
            report.failures.push(Failure {
                index: report.frames,
                fixture: Fixture {
                    comment: message,
                    context: Vec::new(),
                    frame: Vec::new(),
                    xdp: Expect::Refused,
                    tc: Expect::Refused,
                },
                saved: None,
            });
        }
    }
    report.elapsed = start.elapsed();
    report.outcomes = stat::NAMES.iter().copied().zip(totals).collect();
    report
}

fn add_moved(totals: &mut Counts, before: &Counts, after: &Counts) {
    for i in 0..totals.len() {
        totals[i] += after[i].wrapping_sub(before[i]);
    }
}

fn fail(
    report: &mut Report,
    opts: &Options,
    index: u64,
    message: String,
    context: Vec<Vec<u8>>,
    frame: Vec<u8>,
    expected: [Expect; 2],
) {
    let fixture = Fixture {
        comment: format!(
            "found by lb-fuzz --seed {} at frame {index}\n{message}",
            opts.seed
        ),
        context,
        frame,
        xdp: expected[0],
        tc: expected[1],
    };
    let saved = opts.save_to.as_ref().map(|dir| {
        let path = dir.join(format!("seed-{}-frame-{index}.fixture", opts.seed));
        fs::create_dir_all(dir)
            .and_then(|()| fs::write(&path, fixture.to_text()))
            .unwrap_or_else(|e| panic!("saving {}: {e}", path.display()));
        path
    });
    report.failures.push(Failure {
        index,
        fixture,
        saved,
    });
}

/// Runs a saved fixture on a freshly loaded data path: its context frames,
/// then its frame, each checked with the counters read around it; the
/// frame must lead to the outcomes the fixture names.
pub fn replay(fixture: &Fixture) -> Result<(), String> {
    let mut fz = Fuzzer::new(true);
    for (i, c) in fixture.context.iter().enumerate() {
        fz.frame_counted(c)
            .result
            .map_err(|e| format!("context frame {i}: {e}"))?;
    }
    let out = fz.frame_counted(&fixture.frame);
    let want = [fixture.xdp, fixture.tc];
    if out.expected != want {
        return Err(format!(
            "the reference now expects xdp {} and tc {}, the fixture says xdp {} and tc {}",
            out.expected[0], out.expected[1], want[0], want[1]
        ));
    }
    out.result.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixtures_read_back_as_written() {
        let f = Fixture {
            comment: "found here\nbecause".into(),
            context: vec![vec![1, 2, 0xff]],
            frame: vec![0xab; 20],
            xdp: Expect::Pass(stat::PASS_NO_SERVICE),
            tc: Expect::Forward(2),
        };
        assert_eq!(Fixture::parse(&f.to_text()), Ok(f));
        assert!(Fixture::parse("frame 0g\nxdp refused\ntc refused\n").is_err());
        assert!(
            Fixture::parse("frame 00\nxdp refused\n").is_err(),
            "no tc line"
        );
    }
}
