//! The fuzzer in the kernel test stage (needs root): every saved fixture
//! replayed, a run of 100,000 frames (`LB_FUZZ_COUNT` to change it,
//! `LB_FUZZ_SEED` to repeat one; the seed is printed either way), and
//! 20,000 steps of backends changing state under traffic.

use std::{
    fs,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use lb_fuzz::{churn::churn, fixtures_dir, fuzz, replay, Fixture, Options};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| {
        v.parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
    })
}

#[test]
fn every_saved_fixture_replays() {
    lb_harness::require_root();
    let dir = fixtures_dir();
    let mut paths: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "fixture"))
        .collect();
    paths.sort();
    let mut failed = Vec::new();
    for p in &paths {
        let text = fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let fixture = Fixture::parse(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        if let Err(e) = replay(&fixture) {
            failed.push(format!("{}: {e}", p.display()));
        }
    }
    assert!(
        failed.is_empty(),
        "fixtures failing:\n{}",
        failed.join("\n")
    );
    println!("{} fixtures replayed", paths.len());
}

fn seed() -> u64 {
    env_u64("LB_FUZZ_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    })
}

#[test]
fn backends_changing_state_under_traffic() {
    lb_harness::require_root();
    let seed = seed();
    println!("churn: seed {seed} (LB_FUZZ_SEED={seed} to repeat)");
    let r = churn(seed, 20_000).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    println!("{r:?}");
    assert!(r.changes > 0 && r.rebalanced > 0 && r.dropped > 0, "{r:?}");
}

#[test]
fn fuzz_the_data_path() {
    lb_harness::require_root();
    let count = env_u64("LB_FUZZ_COUNT").unwrap_or(100_000);
    let seed = seed();
    println!("lb-fuzz: seed {seed} (LB_FUZZ_SEED={seed} to repeat)");
    let report = fuzz(&Options {
        count,
        seed,
        time_limit: Duration::from_secs(600),
        save_to: Some(fixtures_dir()),
    });
    print!("{}", report.summary());
    assert!(report.passed(), "{}", report.summary());
    assert_eq!(report.frames, count);
}
