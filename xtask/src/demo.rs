//! `cargo xtask demo`: the quick start. Builds, then runs `lb-demo`: with the
//! Docker engine, containers joining and leaving a service by their labels
//! while requests are spread over them (`--netns`: network namespaces with
//! real servers instead); everything is removed after.

use anyhow::bail;

use crate::{build, cmd, setup};

/// `cargo xtask demo`'s options.
#[derive(clap::Args)]
pub struct Args {
    /// Balance over network namespaces instead of Docker containers.
    #[arg(long)]
    netns: bool,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if !cmd::is_root() {
        bail!("cargo xtask demo must run as root: it loads BPF programs and creates network namespaces");
    }
    setup::run()?;
    build::run()?;
    let mut demo = cmd::cargo([
        "run",
        "--release",
        "--locked",
        "-p",
        "lb-harness",
        "--bin",
        "lb-demo",
    ])?;
    if args.netns {
        demo.arg("--").arg("--netns");
    }
    demo.env("LB_BIN", cmd::lb_bin());
    cmd::run(&mut demo)
}
