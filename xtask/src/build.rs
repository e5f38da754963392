//! `cargo xtask build`: the release `lb` binary, with its real eBPF object.

use anyhow::ensure;

use crate::{cmd, setup};

pub fn run() -> anyhow::Result<()> {
    setup::check_toolchain()?;
    // LB_REQUIRE_EBPF (set by cmd::cargo) makes lb-userspace's build script
    // fail rather than embed an empty object if bpf-linker cannot be found.
    cmd::run(&mut cmd::cargo([
        "build",
        "--release",
        "--locked",
        "-p",
        "lb-userspace",
    ])?)?;
    let lb = cmd::lb_bin();
    ensure!(
        lb.is_file(),
        "the build succeeded but {} is missing",
        lb.display()
    );
    println!("build: {}", lb.display());
    Ok(())
}
