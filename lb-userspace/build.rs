//! Builds the eBPF object with aya-build and leaves it in `OUT_DIR`, where
//! `include_bytes_aligned!` embeds it in the `lb` binary.
//!
//! aya-build shells out to `cargo +nightly build --target bpfel-unknown-none`
//! rather than using an artifact dependency, which cargo does not yet support
//! for this (see aya_build::build_ebpf's docs). When bpf-linker is missing
//! (e.g. `cargo clippy` on a machine without `cargo xtask setup`), an empty
//! object is written instead so host builds and unit tests still work; the
//! daemon then refuses to start with a message that says why.
use std::{env, fs, path::PathBuf};

use anyhow::Context as _;

const OBJECT: &str = "lb-datapath";

fn main() -> anyhow::Result<()> {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest.parent().context("workspace root")?;
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    println!("cargo:rerun-if-env-changed=LB_SKIP_EBPF");

    // bpf-linker lives in the repo's tools folder (see `cargo xtask setup`).
    let tools = root.join(".tools/bin");
    let path = env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = vec![tools.clone()];
    paths.extend(env::split_paths(&path));
    let joined = env::join_paths(paths)?;
    let has_linker = env::split_paths(&joined).any(|d| d.join("bpf-linker").is_file());

    if env::var_os("LB_SKIP_EBPF").is_some() || !has_linker {
        println!(
            "cargo:warning=bpf-linker not found (run `cargo xtask setup`): building lb without its data path"
        );
        fs::write(out_dir.join(OBJECT), [])?;
        return Ok(());
    }
    // SAFETY: build scripts are single-threaded at this point.
    unsafe { env::set_var("PATH", &joined) };
    let ebpf_dir = root.join("lb-ebpf");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "lb-ebpf",
            root_dir: ebpf_dir.to_str().context("non-UTF-8 path")?,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
