//! Builds the eBPF object with aya-build and leaves it in `OUT_DIR`, where
//! `include_bytes_aligned!` embeds it in the `lb` binary.
//!
//! aya-build shells out to `cargo +nightly build --target bpfel-unknown-none`
//! rather than using an artifact dependency, which cargo does not yet support
//! for this (see aya_build::build_ebpf's docs). When bpf-linker is missing
//! (e.g. `cargo clippy` on a machine without `cargo xtask setup`), an empty
//! object is written instead so host builds and unit tests still work; the
//! daemon then refuses to start with a message that says why. With
//! `LB_REQUIRE_EBPF` set (as `cargo xtask build` and `cargo xtask test` do),
//! a missing bpf-linker is an error instead, so a release build can never
//! carry the stub.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

const OBJECT: &str = "lb-datapath";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("workspace root")?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-env-changed=LB_SKIP_EBPF");
    println!("cargo:rerun-if-env-changed=LB_REQUIRE_EBPF");

    // bpf-linker lives in the repo's tools folder (see `cargo xtask setup`).
    let tools = root.join(".tools/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = vec![tools.clone()];
    paths.extend(env::split_paths(&path));
    let joined = env::join_paths(paths)?;
    let has_linker = env::split_paths(&joined).any(|d| d.join("bpf-linker").is_file());

    let skip = env::var_os("LB_SKIP_EBPF").is_some();
    if env::var_os("LB_REQUIRE_EBPF").is_some() {
        if skip {
            anyhow::bail!("LB_REQUIRE_EBPF and LB_SKIP_EBPF are both set; unset one");
        }
        if !has_linker {
            anyhow::bail!(
                "LB_REQUIRE_EBPF is set but bpf-linker is not in {} or PATH: run `cargo xtask setup`",
                tools.display()
            );
        }
    }
    if skip || !has_linker {
        // Once `cargo xtask setup` installs bpf-linker, rebuild the real
        // object instead of keeping this stub. While that file is missing,
        // cargo reruns this script (and so recompiles lb) on every build;
        // that only happens on machines that have not run setup.
        println!(
            "cargo:rerun-if-changed={}",
            tools.join("bpf-linker").display()
        );
        println!(
            "cargo:warning=bpf-linker not found (run `cargo xtask setup`): building lb without its data path"
        );
        fs::write(out_dir.join(OBJECT), [])?;
        return Ok(());
    }
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", &joined) };
    let ebpf_dir = root.join("lb-ebpf");
    // aya-build watches lb-ebpf; the types and helpers the programs compile
    // from lb-common must rebuild the object too.
    println!(
        "cargo:rerun-if-changed={}",
        root.join("lb-common").display()
    );
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
