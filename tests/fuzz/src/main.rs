//! `lb-fuzz`, run by `cargo xtask fuzz`: sends generated frames through
//! the data path's programs with `BPF_PROG_TEST_RUN` and checks every one
//! (see the `lb_fuzz` library), then runs the churn check (backends
//! changing state under traffic). Prints the seed first, then the outcome
//! counts and the rate; exits 1 if an invariant broke or the time limit
//! stopped it, after saving each failing frame as a fixture.

use std::{
    process::ExitCode,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use clap::Parser;
use lb_fuzz::{churn::churn, fixtures_dir, fuzz, Options};

/// Fuzz the lb data path (needs root).
#[derive(Parser)]
#[command(name = "lb-fuzz")]
struct Args {
    /// Frames to send, each through the XDP and the TC program.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// The generator's seed; a fresh one (printed) when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Give up (and fail) after this many seconds.
    #[arg(long, default_value_t = 1800)]
    time_limit: u64,
    /// Do not save failing frames under tests/fixtures/fuzz.
    #[arg(long)]
    no_save: bool,
    /// Steps of the churn run (backends changing state under traffic)
    /// after the frames; 0 for none.
    #[arg(long, default_value_t = 100_000)]
    churn_steps: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    });
    println!(
        "lb-fuzz: seed {seed} ({} frames; rerun with --seed {seed})",
        args.count
    );
    let report = fuzz(&Options {
        count: args.count,
        seed,
        time_limit: Duration::from_secs(args.time_limit),
        save_to: (!args.no_save).then(fixtures_dir),
    });
    print!("{}", report.summary());
    if !report.passed() {
        return ExitCode::FAILURE;
    }
    if args.churn_steps == 0 {
        return ExitCode::SUCCESS;
    }
    match churn(seed, args.churn_steps) {
        Ok(c) => {
            println!(
                "churn: {} packets, {} backend state changes, {} runs rebalanced, {} dropped with no active backend: every outcome as expected",
                c.packets, c.changes, c.rebalanced, c.dropped
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("churn FAILED (seed {seed}): {e}");
            ExitCode::FAILURE
        }
    }
}
