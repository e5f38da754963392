//! `cargo xtask fuzz`: the data path fuzzer (`lb-fuzz`, in `tests/fuzz`),
//! built and run like the other kernel suites. A failing frame is saved
//! under `tests/fixtures/fuzz/`, where the kernel test stage replays it.

use anyhow::bail;

use crate::{cmd, setup};

#[derive(clap::Args)]
pub struct Args {
    /// Frames to send, each through the XDP and the TC program.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    /// The generator's seed (printed either way); a fresh one when absent.
    #[arg(long)]
    seed: Option<u64>,
    /// Give up, and fail, after this many seconds.
    #[arg(long, default_value_t = 1800)]
    time_limit: u64,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cargo xtask fuzz must run as root: it loads BPF programs");
    }
    setup::run()?;
    let mut fuzz = cmd::cargo([
        "run",
        "--release",
        "--locked",
        "-p",
        "lb-fuzz",
        "--bin",
        "lb-fuzz",
        "--",
    ])?;
    fuzz.arg("--count")
        .arg(args.count.to_string())
        .arg("--time-limit")
        .arg(args.time_limit.to_string());
    if let Some(seed) = args.seed {
        fuzz.arg("--seed").arg(seed.to_string());
    }
    cmd::run(&mut fuzz)
}
