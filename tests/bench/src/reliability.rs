//! The "reliability" section: what fails on the balancer's bad days, under
//! load. The scenarios are the end-to-end tests' own
//! ([`lb_harness::reliability`]): the daemon SIGKILLed and started again,
//! `dockerd` restarted with `live-restore`, a rolling update of three
//! containers; the tests assert that nothing fails, this section counts
//! over several runs. Then the data path fuzzer ([`lb_fuzz`]), as `cargo
//! xtask fuzz` runs it: frames, then backends changing state under traffic.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb::api::types::EventKind;
use lb_fuzz::{churn::churn, fixtures_dir, fuzz, Options};
use lb_harness::{
    load::LoadReport,
    reliability::{
        daemon_restart, engine_restart, rolling_update, Ending, RESTART_CONTAINERS, RESTART_HELD,
        ROLLING_CONTAINERS,
    },
};

use crate::report::{median, Column, Row, Section, Target};

/// What to run.
#[derive(Clone, Debug)]
pub struct Params {
    /// Runs of each scenario.
    pub runs: usize,
    /// Frames through the fuzzer.
    pub fuzz_frames: u64,
    /// Steps of the fuzzer's churn run.
    pub churn_steps: u64,
}

/// One run of the engine restart.
#[derive(Clone, Debug)]
pub struct EngineRun {
    /// The load through it.
    pub load: LoadReport,
    /// Who served what, and the pinned maps, the same after as before.
    pub unchanged: bool,
    /// The events published across it, by kind.
    pub events: Vec<EventKind>,
    /// From the engine's stop to its answering again, seconds.
    pub engine_away_s: f64,
    /// From the engine's stop to the daemon's `docker_connected`, seconds.
    pub reconnected_s: f64,
}

/// One run of the daemon's crash and restart.
#[derive(Clone, Debug)]
pub struct CrashRun {
    /// The load through it.
    pub load: LoadReport,
    /// Requests answered while no daemon ran.
    pub answered_without_daemon: usize,
    /// The second daemon adopted the data path.
    pub adopted: bool,
}

/// What the fuzzer did.
#[derive(Clone, Debug)]
pub struct FuzzRun {
    /// The seed.
    pub seed: u64,
    /// Frames sent.
    pub frames: u64,
    /// Program runs.
    pub runs: u64,
    /// Runs the kernel refused as too short.
    pub refused: u64,
    /// Frames that broke an invariant.
    pub failures: u64,
    /// The time limit stopped it.
    pub timed_out: bool,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Outcome counters that moved.
    pub outcomes: Vec<(String, u64)>,
    /// The churn run: packets, state changes, or what broke.
    pub churn: Result<(u64, u64), String>,
}

/// Everything the section measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The daemon killed and started again, each run.
    pub crash: Vec<CrashRun>,
    /// The engine restarted, each run.
    pub engine: Vec<EngineRun>,
    /// The rolling update, each run.
    pub rolling: Vec<LoadReport>,
    /// The fuzzer.
    pub fuzz: FuzzRun,
}

/// Runs every scenario `p.runs` times, then the fuzzer.
pub fn measure(p: &Params) -> Outcome {
    let mut crash = Vec::new();
    let mut engine = Vec::new();
    let mut rolling = Vec::new();
    for i in 0..p.runs {
        eprintln!("reliability: run {} of {}", i + 1, p.runs);
        let r = daemon_restart("lbq1", Ending::Crash);
        crash.push(CrashRun {
            load: r.load,
            answered_without_daemon: r.answered_without_daemon,
            adopted: r.adopted,
        });
        let r = engine_restart("lbq2");
        engine.push(EngineRun {
            unchanged: r.before == r.after && r.maps_before == r.maps_after,
            events: r.events.iter().map(|e| e.change.kind).collect(),
            engine_away_s: r.engine_away.as_secs_f64(),
            reconnected_s: r.reconnected_after.as_secs_f64(),
            load: r.load,
        });
        rolling.push(rolling_update("lbq3").load);
    }
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    eprintln!("reliability: fuzzing {} frames, seed {seed}", p.fuzz_frames);
    let f = fuzz(&Options {
        count: p.fuzz_frames,
        seed,
        time_limit: Duration::from_secs(1800),
        save_to: Some(fixtures_dir()),
    });
    let churn = if f.passed() {
        churn(seed, p.churn_steps).map(|c| (c.packets, c.changes))
    } else {
        Err("not run: the frames failed".into())
    };
    Outcome {
        crash,
        engine,
        rolling,
        fuzz: FuzzRun {
            seed,
            frames: f.frames,
            runs: f.runs,
            refused: f.refused,
            failures: f.failures.len() as u64,
            timed_out: f.timed_out,
            elapsed_s: f.elapsed.as_secs_f64(),
            outcomes: f
                .outcomes
                .iter()
                .filter(|(_, n)| *n > 0)
                .map(|(k, n)| ((*k).to_owned(), *n))
                .collect(),
            churn,
        },
    }
}

/// Runs the section: each scenario 3 times, 1,000,000 fuzzed frames and
/// 100,000 churn steps (`quick`: once, 100,000 and 20,000).
pub fn run(quick: bool) -> Section {
    section(&measure(&Params {
        runs: if quick { 1 } else { 3 },
        fuzz_frames: if quick { 100_000 } else { 1_000_000 },
        churn_steps: if quick { 20_000 } else { 100_000 },
    }))
}

/// A row of load runs: requests, failed, held, broken, summed over the
/// runs; each run's failures (requests and broken connections) kept.
fn load_row(name: &str, loads: &[&LoadReport], held: bool) -> Row {
    let sum = |f: fn(&LoadReport) -> usize| loads.iter().map(|l| f(l)).sum::<usize>() as f64;
    let mut row = Row::new(name)
        .with("count", sum(|l| l.requests))
        .with("failed", sum(|l| l.failed));
    if held {
        row = row
            .with("held", sum(|l| l.held_by.len()))
            .with("broken", sum(|l| l.broken));
    }
    row.rounds = loads.iter().map(|l| (l.failed + l.broken) as f64).collect();
    row
}

/// "F of N requests failed, B of H held connections broke".
fn load_words(loads: &[&LoadReport], held: bool) -> String {
    let n: usize = loads.iter().map(|l| l.requests).sum();
    let f: usize = loads.iter().map(|l| l.failed).sum();
    let mut s = format!("{f} of {n} requests failed");
    if held {
        let h: usize = loads.iter().map(|l| l.held_by.len()).sum();
        let b: usize = loads.iter().map(|l| l.broken).sum();
        let _ = write!(s, ", {b} of {h} held connections broke");
    }
    let t = loads.iter().filter(|l| l.timed_out).count();
    if t > 0 {
        let _ = write!(s, ", {t} runs stopped by the load's time limit");
    }
    s
}

/// The section from what was measured.
pub fn section(o: &Outcome) -> Section {
    let runs = o.crash.len();
    let crash: Vec<&LoadReport> = o.crash.iter().map(|r| &r.load).collect();
    let engine: Vec<&LoadReport> = o.engine.iter().map(|r| &r.load).collect();
    let rolling: Vec<&LoadReport> = o.rolling.iter().collect();
    let f = &o.fuzz;
    let fuzz_failed = f.failures + u64::from(f.timed_out);
    let mut fuzz_row =
        Row::new("fuzzer: generated frames, each through the XDP and the TC program")
            .with("count", f.frames as f64)
            .with("failed", fuzz_failed as f64);
    fuzz_row.rounds = vec![fuzz_failed as f64];
    let mut rows = vec![
        load_row(
            "`lb` killed (kill -9) under load, then a plain `lb run` takes over",
            &crash,
            true,
        ),
        load_row(
            "`dockerd` stopped and started again, with live-restore",
            &engine,
            true,
        ),
        load_row(
            &format!("rolling update of {ROLLING_CONTAINERS} containers"),
            &rolling,
            false,
        ),
        fuzz_row,
    ];
    if let Ok((packets, _)) = &f.churn {
        let mut row = Row::new("fuzzer: churn packets while backends change state")
            .with("count", *packets as f64)
            .with("failed", 0.0);
        row.rounds = vec![0.0];
        rows.push(row);
    }

    let engine_runs = o.engine.len();
    let adopted = o.crash.iter().filter(|r| r.adopted).count();
    let unchanged = o.engine.iter().filter(|r| r.unchanged).count();
    let quiet = o
        .engine
        .iter()
        .filter(|r| r.events == [EventKind::DockerLost, EventKind::DockerConnected])
        .count();
    let clean = |loads: &[&LoadReport]| loads.iter().all(|l| l.clean());
    let targets = vec![
        Target {
            bar: "`kill -9` of the daemon under load, then a plain `lb run`: no request fails, no held connection breaks, the new daemon adopts the data path".into(),
            actual: format!(
                "{} over {runs} runs; adopted in {adopted} of {runs}",
                load_words(&crash, true)
            ),
            met: clean(&crash) && adopted == runs,
        },
        Target {
            bar: "`dockerd` restarted with live-restore under load: no request fails, no held connection breaks, the resync changes nothing (backends and maps the same, only `docker_lost` and `docker_connected` published)".into(),
            actual: format!(
                "{} over {engine_runs} runs; unchanged in {unchanged} of {engine_runs}, only those two events in {quiet} of {engine_runs}",
                load_words(&engine, true)
            ),
            met: clean(&engine) && unchanged == engine_runs && quiet == engine_runs,
        },
        Target {
            bar: format!("rolling update of {ROLLING_CONTAINERS} containers under load: no request fails"),
            actual: format!(
                "{} over {} runs",
                load_words(&rolling, false),
                rolling.len()
            ),
            met: clean(&rolling),
        },
        Target {
            bar: "fuzzer: every frame and every churn packet as expected".into(),
            actual: match &f.churn {
                Ok((packets, changes)) => format!(
                    "{} of {} frames broke an invariant{}; churn: {packets} packets, {changes} state changes, all as expected",
                    f.failures,
                    f.frames,
                    if f.timed_out { " (stopped by the time limit)" } else { "" }
                ),
                Err(e) => format!("{} of {} frames broke an invariant; churn: {e}", f.failures, f.frames),
            },
            met: fuzz_failed == 0 && f.churn.is_ok(),
        },
    ];

    let away: Vec<f64> = o.engine.iter().map(|r| r.engine_away_s).collect();
    let reconnected: Vec<f64> = o.engine.iter().map(|r| r.reconnected_s).collect();
    let without: Vec<String> = o
        .crash
        .iter()
        .map(|r| r.answered_without_daemon.to_string())
        .collect();
    let outcomes: Vec<String> = f.outcomes.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let notes = vec![
        String::from(
            "Load (`lb_harness::load`, the end-to-end tests' own): from a client namespace, `GET /` \
             through the VIP one after another, each on a new connection, 5 ms apart, and \
             connections held to a stream service through the VIP, each echoing a sequence \
             number every 5 ms; a request fails on a refused or reset connection, no answer \
             within 2 s, or anything but `200`, and a held connection breaks when an echo fails \
             or comes back wrong. The load starts before each scenario's action and ends once 20 \
             more requests were answered after it."
        ),
        format!(
            "Crash: `lb run` over two backend namespaces (real HTTP and stream servers), one \
             connection held; after a second the daemon is SIGKILLed, a second later a plain \
             `lb run` starts and takes over the pinned data path, and the load goes on a second \
             more. Requests answered with no daemon running, per run: {}.",
            without.join(", ")
        ),
        format!(
            "Engine restart: `dockerd --live-restore` (Debian's, started as the tests start it), \
             `lb run` following it, {RESTART_CONTAINERS} labelled containers in `web` (a health \
             check every 200 ms, Docker's default 3 retries; the HTTP load) and \
             {RESTART_CONTAINERS} in `echo` by an image rule ({RESTART_HELD} connections held); `dockerd` is sent SIGTERM, and once `lb status` shows the engine lost and 20 \
             more requests were answered, started again; then one second after the daemon's \
             `docker_connected`. Unchanged: `lb backend ls` of both services (address, \
             container, state, weight) and the pinned maps (every service entry with its active \
             Maglev copy, every backend entry with its id) the same before and after. Engine \
             away (SIGTERM to answering again): median {:.1} s; reconnected (SIGTERM to \
             `docker_connected`): median {:.1} s.",
            median(&away),
            median(&reconnected)
        ),
        format!(
            "Rolling update: {ROLLING_CONTAINERS} containers in `web`, with a health check (every \
             200 ms) and a server that answers for a second after SIGTERM, then exits; each in \
             turn, a new one is started and waited for until it serves, then the old one is \
             `docker stop`ped and waited for until it left."
        ),
        format!(
            "Fuzzer: `lb_fuzz` as `cargo xtask fuzz` runs it, seed {}: {} frames ({} program \
             runs, {} more refused by the kernel as too short) in {:.1} s; outcomes: {}.",
            f.seed,
            f.frames,
            f.runs,
            f.refused,
            f.elapsed_s,
            outcomes.join(", ")
        ),
    ];
    Section {
        key: "reliability".into(),
        title: "Reliability: crash, engine restart, rolling update, fuzzing".into(),
        method: format!(
            "Each scenario run {runs} times under load; figures are totals over the runs \
             (each run's failures are in report.json). The fuzzer once."
        ),
        rounds: 1,
        columns: vec![
            Column::new("count", "requests or frames", 0),
            Column::new("failed", "failed", 0),
            Column::new("held", "held connections", 0),
            Column::new("broken", "broken", 0),
        ],
        rows,
        targets,
        chart: None,
        notes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(requests: usize, failed: usize, held: usize, broken: usize) -> LoadReport {
        LoadReport {
            requests,
            failed,
            held_by: vec!["b0".into(); held],
            broken,
            ..LoadReport::default()
        }
    }

    fn outcome() -> Outcome {
        Outcome {
            crash: vec![CrashRun {
                load: load(300, 0, 1, 0),
                answered_without_daemon: 90,
                adopted: true,
            }],
            engine: vec![EngineRun {
                load: load(500, 0, 6, 0),
                unchanged: true,
                events: vec![EventKind::DockerLost, EventKind::DockerConnected],
                engine_away_s: 2.0,
                reconnected_s: 2.5,
            }],
            rolling: vec![load(900, 0, 0, 0)],
            fuzz: FuzzRun {
                seed: 1,
                frames: 1000,
                runs: 1900,
                refused: 100,
                failures: 0,
                timed_out: false,
                elapsed_s: 0.1,
                outcomes: vec![("pass_no_service".into(), 1900)],
                churn: Ok((900, 100)),
            },
        }
    }

    #[test]
    fn totals_per_scenario_and_every_target_met_when_nothing_failed() {
        let s = section(&outcome());
        assert_eq!(s.key, "reliability");
        let crash = s.row("`lb` killed (kill -9) under load, then a plain `lb run` takes over");
        assert_eq!(crash.get("count"), Some(300.0));
        assert_eq!(crash.get("held"), Some(1.0));
        let rolling = s.row("rolling update of 3 containers");
        assert_eq!(rolling.get("held"), None, "no connection is held there");
        assert_eq!(
            s.row("fuzzer: churn packets while backends change state")
                .get("count"),
            Some(900.0)
        );
        assert_eq!(s.targets.len(), 4);
        assert!(s.targets.iter().all(|t| t.met), "{:#?}", s.targets);
    }

    #[test]
    fn a_failure_anywhere_misses_its_target() {
        let mut o = outcome();
        o.engine[0].load.broken = 1;
        o.crash[0].adopted = false;
        o.engine.push(EngineRun {
            events: vec![EventKind::DockerLost, EventKind::DockerLost],
            ..o.engine[0].clone()
        });
        o.fuzz.failures = 1;
        let s = section(&o);
        let met: Vec<bool> = s.targets.iter().map(|t| t.met).collect();
        assert_eq!(met, [false, false, true, false], "{:#?}", s.targets);
        assert!(
            s.targets[1]
                .actual
                .contains("2 of 12 held connections broke"),
            "{:#?}",
            s.targets[1]
        );
        assert!(s.targets[1]
            .actual
            .contains("only those two events in 1 of 2"));
    }
}
