//! `cargo xtask demo`: the quick start. Builds, then runs `lb-demo`: a client
//! namespace, three backends with real servers, `lb` balancing a VIP over
//! them, 300 requests and how they were spread; everything is removed after.

use anyhow::bail;

use crate::{build, cmd, setup};

pub fn run() -> anyhow::Result<()> {
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
    demo.env("LB_BIN", cmd::lb_bin());
    cmd::run(&mut demo)
}
