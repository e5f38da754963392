//! `cargo xtask lint`: rustfmt, then clippy in passes, because the eBPF
//! crate's binary only builds for the BPF target (with `panic=abort` and
//! `-Z build-std=core`) while its library also builds, and is unit-tested,
//! on the host.

use anyhow::bail;

use crate::{cmd, setup};

/// Each pass: a name for the report, and cargo's arguments.
const PASSES: &[(&str, &[&str])] = &[
    ("rustfmt", &["fmt", "--all", "--check"]),
    (
        "clippy (workspace but lb-ebpf)",
        &[
            "clippy",
            "--locked",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    ),
    (
        "clippy (lb-ebpf lib, host)",
        &[
            "clippy", "--locked", "-p", "lb-ebpf", "--lib", "--tests", "--", "-D", "warnings",
        ],
    ),
    // The programs themselves, as the kernel gets them. Clippy only checks,
    // so this needs the nightly's rust-src but not bpf-linker.
    (
        "clippy (lb-ebpf bins, bpfel)",
        &[
            "+nightly",
            "clippy",
            "--locked",
            "-p",
            "lb-ebpf",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--bins",
            "--",
            "-D",
            "warnings",
        ],
    ),
];

pub fn run() -> anyhow::Result<()> {
    // Clippy builds lb-userspace's build script, which builds the eBPF object.
    setup::check_toolchain()?;
    // Run every pass, so that a rustfmt diff does not hide clippy's errors.
    let mut failed = Vec::new();
    for (name, args) in PASSES {
        if let Err(e) = cmd::run(&mut cmd::cargo(*args)?) {
            println!("lint: {name}: {e:#}");
            failed.push(*name);
        }
    }
    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    println!("lint: ok");
    Ok(())
}
