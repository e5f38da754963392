//! `cargo xtask test`: everything CI runs, in order, each step timed.

use std::time::{Duration, Instant};

use anyhow::bail;

use crate::{build, cmd, lint, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Skip rustfmt and clippy (for local iteration; CI lints).
    #[arg(long)]
    skip_lint: bool,
    /// Run only this test target of lb-tests, lb-bench or lb-fuzz (a file
    /// in tests/tests/, tests/bench/tests/ or tests/fuzz/tests/, e.g. `e2e`,
    /// `bench_rate` or `fuzz`);
    /// repeatable. Passed to cargo as `--test TARGET`.
    #[arg(long = "test", value_name = "TARGET")]
    targets: Vec<String>,
    /// Passed to the kernel tests' run after `--test-threads=1`: a filter on
    /// test names, or libtest flags such as `--nocapture`.
    #[arg(last = true)]
    kernel_tests_args: Vec<String>,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!(
            "cargo xtask test must run as root: the kernel and end-to-end tests load BPF \
             programs and create network namespaces (CI runs as root). Without root, \
             `cargo xtask build` and `cargo xtask lint` still work."
        );
    }
    let mut steps = Steps::new();
    // Everything after needs these two.
    steps.must("setup", setup::run)?;
    steps.must("build", build::run)?;
    // The rest are independent: run them all, so one CI run reports lint
    // errors and test failures together.
    if args.skip_lint {
        println!("\n==> lint: skipped (--skip-lint)");
    } else {
        steps.keep_going("lint", lint::run);
    }
    steps.keep_going("host unit tests", || {
        cmd::run(&mut cmd::cargo([
            "test",
            "--release",
            "--locked",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--exclude",
            "lb-tests",
            "--exclude",
            "lb-bench",
            "--exclude",
            "lb-fuzz",
        ])?)?;
        cmd::run(&mut cmd::cargo([
            "test",
            "--release",
            "--locked",
            "-p",
            "lb-ebpf",
            "--lib",
        ])?)
    });
    steps.keep_going("kernel tests", || {
        // One thread: the tests share the host's network stack, its FORWARD
        // policy and bpffs. lb-bench's tests run its sections small;
        // lb-fuzz's replay every saved fixture and fuzz 100,000 frames.
        let mut test = cmd::cargo([
            "test",
            "--release",
            "--locked",
            "-p",
            "lb-tests",
            "-p",
            "lb-bench",
            "-p",
            "lb-fuzz",
        ])?;
        for target in &args.targets {
            test.args(["--test", target]);
        }
        test.args(["--", "--test-threads=1"])
            .args(&args.kernel_tests_args)
            .env("LB_BIN", cmd::lb_bin());
        cmd::run(&mut test)
    });
    steps.finish()
}

/// The steps run so far, how long each took and whether it passed.
struct Steps {
    start: Instant,
    done: Vec<(&'static str, Duration, bool)>,
}

impl Steps {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Runs a step that the later ones need: on failure, prints the summary
    /// and stops.
    fn must(
        &mut self,
        name: &'static str,
        step: impl FnOnce() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        if self.keep_going(name, step) {
            Ok(())
        } else {
            self.finish()
        }
    }

    /// Runs one step between a header and a timing line, and records how it
    /// went; returns whether it passed.
    fn keep_going(
        &mut self,
        name: &'static str,
        step: impl FnOnce() -> anyhow::Result<()>,
    ) -> bool {
        println!("\n==> {name}");
        let start = Instant::now();
        let result = step();
        let took = start.elapsed();
        match &result {
            Ok(()) => println!("==> {name}: ok in {}", cmd::secs(took)),
            Err(e) => println!("==> {name}: FAILED after {}: {e:#}", cmd::secs(took)),
        }
        self.done.push((name, took, result.is_ok()));
        result.is_ok()
    }

    /// Prints each step's time and result; fails if any step failed.
    fn finish(&self) -> anyhow::Result<()> {
        println!("\n==> summary");
        for (name, took, ok) in &self.done {
            let status = if *ok { "ok" } else { "FAILED" };
            println!("  {name:<16} {:>8}  {status}", cmd::secs(*took));
        }
        println!("  {:<16} {:>8}", "total", cmd::secs(self.start.elapsed()));
        let failed: Vec<_> = self
            .done
            .iter()
            .filter(|(_, _, ok)| !ok)
            .map(|(name, _, _)| *name)
            .collect();
        if !failed.is_empty() {
            bail!("cargo xtask test: failed: {}", failed.join(", "));
        }
        Ok(())
    }
}
