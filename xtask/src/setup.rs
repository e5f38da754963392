//! `cargo xtask setup`: make a fresh Debian 12 machine able to build and test
//! lb. Every step checks first and does nothing when its work is done, so a
//! second run takes well under a second.

use std::{
    collections::HashSet,
    fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, ensure, Context as _};

use crate::cmd::{self, is_root, tools_bin, tools_dir};

/// Debian packages that the tests, the demo and the daemon run.
pub const PACKAGES: &[&str] = &[
    "iproute2",          // ip: namespaces, veths, addresses, routes
    "iptables",          // the FORWARD policy in tests; the iptables DNAT baseline
    "ethtool",           // GRO on veth peers (XDP redirect needs it)
    "util-linux",        // nsenter, mount
    "busybox-static",    // httpd and nc servers in namespaces and images
    "bpftool",           // inspecting loaded programs, maps and links
    "tcpdump",           // looking at traffic when a test fails
    "procps",            // ps, sysctl, pkill
    "conntrack",         // clearing the benchmark's conntrack entries between contenders
    "nginx",             // real HTTP backends in the end-to-end benchmark
    "wrk",               // the benchmark's HTTP load generator
    "haproxy",           // the proxy contender of the benchmark
    "nftables",          // nft: removing the nat table the iptables contender created
    "docker.io", // a real engine for the Docker watcher's tests (the harness starts dockerd)
    "chromium",  // a real browser for the dashboard's test
    "chromium-driver", // chromedriver: the test drives chromium over WebDriver
    "etcd-server", // the etcd the cluster tests start (never the package's service)
    "protobuf-compiler", // protoc: etcd-client's build compiles etcd's protos
    "libprotobuf-dev", // the well-known .proto files those protos import
];

/// The package whose service must not start: the tests start their own
/// etcd, and one on the default 127.0.0.1:2379 would answer for it.
const ETCD_PACKAGE: &str = "etcd-server";

/// Debian's hook that `invoke-rc.d` and `deb-systemd-invoke` ask before
/// starting a package's service; exit status 101 means "do not".
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

/// The bpf-linker release the eBPF build is known to work with (see
/// docs/HOST-FACTS.md).
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where bpffs is mounted for pinning.
const BPFFS: &str = "/sys/fs/bpf";

/// What a step found or did.
enum Outcome {
    /// Nothing to do.
    Already,
    /// It did this.
    Done(String),
    /// This is missing and installing it needs root.
    NeedsRoot(String),
}

type Step = fn(bool) -> anyhow::Result<Outcome>;

/// Runs every step, printing one line each.
pub fn run() -> anyhow::Result<()> {
    let start = Instant::now();
    let root = is_root();
    let steps: [(&str, Step); 4] = [
        ("packages", packages),
        ("rust-src", rust_src),
        ("bpf-linker", bpf_linker),
        ("bpffs", bpffs),
    ];
    let mut need_root = Vec::new();
    for (name, step) in steps {
        match step(root).with_context(|| format!("setup: {name}"))? {
            Outcome::Already => println!("setup: {name:<10} ok (already)"),
            Outcome::Done(what) => println!("setup: {name:<10} {what}"),
            Outcome::NeedsRoot(what) => {
                println!("setup: {name:<10} NEEDS ROOT: {what}");
                need_root.push(name);
            }
        }
    }
    if !need_root.is_empty() {
        bail!(
            "setup incomplete: {} need{} root; run `cargo xtask setup` as root",
            need_root.join(", "),
            if need_root.len() == 1 { "s" } else { "" },
        );
    }
    println!("setup: done in {}", cmd::secs(start.elapsed()));
    Ok(())
}

/// The checks that building lb relies on, without installing anything.
pub fn check_toolchain() -> anyhow::Result<()> {
    let sysroot = nightly_sysroot()?;
    if !has_rust_src(&sysroot) {
        bail!("the nightly toolchain has no rust-src (needed for -Z build-std): run `cargo xtask setup`");
    }
    if let Linker::Stale(why) = linker_state(&NightlyLlvm::find(&sysroot)?)? {
        bail!("bpf-linker is not ready ({why}): run `cargo xtask setup`");
    }
    Ok(())
}

fn packages(root: bool) -> anyhow::Result<Outcome> {
    let missing = missing_packages()?;
    if missing.is_empty() {
        return Ok(Outcome::Already);
    }
    let list = missing.join(" ");
    if !root {
        return Ok(Outcome::NeedsRoot(format!("missing {list}")));
    }
    cmd::run(Command::new("apt-get").arg("update"))?;
    let etcd = missing.contains(&ETCD_PACKAGE);
    let policy = if etcd { NoServiceStart::new()? } else { None };
    cmd::run(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing),
    )?;
    drop(policy);
    if etcd && Path::new("/run/systemd/system").is_dir() {
        // Not at the next boot either.
        cmd::run(Command::new("systemctl").args(["disable", "--now", "etcd.service"]))?;
    }
    let still = missing_packages()?;
    ensure!(still.is_empty(), "still not installed: {}", still.join(" "));
    Ok(Outcome::Done(format!("installed {list}")))
}

/// A `policy-rc.d` that refuses every service start while it lives, unless
/// the machine has one of its own (then that one decides).
struct NoServiceStart;

impl NoServiceStart {
    fn new() -> anyhow::Result<Option<Self>> {
        if Path::new(POLICY_RC_D).exists() {
            return Ok(None);
        }
        fs::write(
            POLICY_RC_D,
            "#!/bin/sh\n# cargo xtask setup: no service starts while it installs\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        fs::set_permissions(
            POLICY_RC_D,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Some(Self))
    }
}

impl Drop for NoServiceStart {
    fn drop(&mut self) {
        let _ = fs::remove_file(POLICY_RC_D);
    }
}

/// The packages of [`PACKAGES`] that dpkg does not list as installed.
fn missing_packages() -> anyhow::Result<Vec<&'static str>> {
    // One query for all: dpkg-query prints a line per package it knows and
    // exits 1 if it knows of some not at all; those are missing too.
    let out = cmd::output(
        Command::new("dpkg-query")
            .args(["-W", "--showformat=${Package} ${Status}\\n"])
            .args(PACKAGES),
    )
    .context("this step needs Debian's dpkg-query")?;
    let query = String::from_utf8_lossy(&out.stdout);
    let installed = installed_packages(&query);
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|p| !installed.contains(p))
        .collect())
}

/// The names in `dpkg-query -f='${Package} ${Status}\n'` output whose status
/// is "install ok installed".
fn installed_packages(query: &str) -> HashSet<&str> {
    query
        .lines()
        .filter_map(|l| l.split_once(' '))
        .filter(|(_, status)| status.trim() == "install ok installed")
        .map(|(name, _)| name)
        .collect()
}

fn rust_src(_root: bool) -> anyhow::Result<Outcome> {
    let sysroot = nightly_sysroot()?;
    if has_rust_src(&sysroot) {
        return Ok(Outcome::Already);
    }
    cmd::run(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))?;
    ensure!(
        has_rust_src(&sysroot),
        "rust-src is still missing from {}",
        sysroot.display()
    );
    Ok(Outcome::Done(
        "added rust-src to the nightly toolchain".into(),
    ))
}

/// The installed nightly toolchain's sysroot. The machines come with one;
/// setup uses it rather than pinning a dated nightly that may be absent.
fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let out = cmd::output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    if !out.status.success() {
        bail!(
            "`rustc +nightly --print sysroot` failed; the eBPF build needs a nightly toolchain \
             (`rustup toolchain install nightly`): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot.join("lib/rustlib/src/rust/library/core").is_dir()
}

/// The nightly toolchain's own libLLVM, which bpf-linker is built against.
struct NightlyLlvm {
    /// Its file name, e.g. `libLLVM.so.22.1-rust-1.97.0-nightly`.
    file: String,
    /// Its full path in the sysroot.
    path: PathBuf,
    /// The LLVM major version, e.g. `22`: bpf-linker's `llvm-22` feature.
    major: String,
}

impl NightlyLlvm {
    fn find(sysroot: &Path) -> anyhow::Result<Self> {
        let lib = sysroot.join("lib");
        let mut files: Vec<String> = fs::read_dir(&lib)
            .with_context(|| format!("reading {}", lib.display()))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.starts_with("libLLVM.so."))
            .collect();
        let file = match files.len() {
            1 => files.remove(0),
            _ => bail!(
                "expected one libLLVM.so.* in {}, found {files:?}",
                lib.display()
            ),
        };
        let major = llvm_major(&file)
            .with_context(|| format!("no LLVM version in {file}"))?
            .to_owned();
        Ok(Self {
            path: lib.join(&file),
            file,
            major,
        })
    }
}

/// `22` from `libLLVM.so.22.1-rust-1.97.0-nightly`.
fn llvm_major(file: &str) -> Option<&str> {
    let major = file.strip_prefix("libLLVM.so.")?.split(['.', '-']).next()?;
    (!major.is_empty() && major.bytes().all(|b| b.is_ascii_digit())).then_some(major)
}

/// `<repo>/.tools/llvm`: the LLVM_PREFIX bpf-linker is built with.
fn llvm_prefix() -> PathBuf {
    tools_dir().join("llvm")
}

/// The two links to the nightly's libLLVM in `.tools/llvm/lib`: `libLLVM.so`
/// for the link step, and the versioned name for the run-time lookup through
/// bpf-linker's RUNPATH. Without the second the binary builds but cannot
/// start.
fn llvm_links(llvm: &NightlyLlvm) -> [PathBuf; 2] {
    let lib = llvm_prefix().join("lib");
    [lib.join("libLLVM.so"), lib.join(&llvm.file)]
}

enum Linker {
    /// `bpf-linker --version` printed this.
    Ready(String),
    /// Why it has to be (re)built.
    Stale(String),
}

fn linker_state(llvm: &NightlyLlvm) -> anyhow::Result<Linker> {
    let bin = tools_bin().join("bpf-linker");
    if !bin.is_file() {
        return Ok(Linker::Stale(format!("{} not found", bin.display())));
    }
    let want = fs::canonicalize(&llvm.path).ok();
    for link in llvm_links(llvm) {
        if fs::canonicalize(&link).ok() != want {
            return Ok(Linker::Stale(format!(
                "{} does not point at the nightly's {}",
                link.display(),
                llvm.path.display()
            )));
        }
    }
    let out = cmd::output(Command::new(&bin).arg("--version"))?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        return Ok(Linker::Stale(format!(
            "`{} --version` failed: {}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    if version != format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Ok(Linker::Stale(format!(
            "found `{version}`, want {BPF_LINKER_VERSION}"
        )));
    }
    Ok(Linker::Ready(version))
}

fn bpf_linker(_root: bool) -> anyhow::Result<Outcome> {
    let llvm = NightlyLlvm::find(&nightly_sysroot()?)?;
    let why = match linker_state(&llvm)? {
        Linker::Ready(_) => return Ok(Outcome::Already),
        Linker::Stale(why) => why,
    };
    println!("setup: building bpf-linker {BPF_LINKER_VERSION} ({why}); about a minute");
    let start = Instant::now();

    let lib = llvm_prefix().join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    // Drop links to an older nightly's libLLVM, then link the current one.
    for entry in fs::read_dir(&lib)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with("libLLVM") {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    for link in llvm_links(&llvm) {
        symlink(&llvm.path, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    // --force: cargo would otherwise keep a recorded install of the same
    // version even when it was built against another libLLVM.
    cmd::run(
        Command::new("cargo")
            .current_dir(cmd::repo_root())
            .env("LLVM_PREFIX", llvm_prefix())
            .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
            .args(["--no-default-features", "--features"])
            .arg(format!("llvm-{}", llvm.major))
            .args(["--locked", "--force", "--root"])
            .arg(tools_dir()),
    )?;
    match linker_state(&llvm)? {
        Linker::Ready(version) => Ok(Outcome::Done(format!(
            "built {version} against {} in {}",
            llvm.file,
            cmd::secs(start.elapsed())
        ))),
        Linker::Stale(why) => bail!("bpf-linker was installed but is not usable: {why}"),
    }
}

fn bpffs(root: bool) -> anyhow::Result<Outcome> {
    if bpffs_mounted()? {
        return Ok(Outcome::Already);
    }
    if !root {
        return Ok(Outcome::NeedsRoot(format!(
            "bpffs is not mounted on {BPFFS}"
        )));
    }
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    ensure!(
        bpffs_mounted()?,
        "bpffs is still not on {BPFFS} after mount"
    );
    Ok(Outcome::Done(format!("mounted bpffs on {BPFFS}")))
}

fn bpffs_mounted() -> anyhow::Result<bool> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    Ok(bpffs_in(&mounts))
}

/// Whether the mount in effect on [`BPFFS`] in `/proc/mounts` text is bpf
/// (the last one listed on a path hides the others).
fn bpffs_in(mounts: &str) -> bool {
    mounts
        .lines()
        .filter_map(|l| {
            let mut fields = l.split_whitespace().skip(1);
            Some((fields.next()?, fields.next()?))
        })
        .rfind(|(mountpoint, _)| *mountpoint == BPFFS)
        .is_some_and(|(_, fstype)| fstype == "bpf")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_installed_packages() {
        let query = "bpftool install ok installed\n\
                     tcpdump deinstall ok config-files\n\
                     procps unknown ok not-installed\n\
                     iproute2 install ok installed\n";
        let installed = installed_packages(query);
        assert_eq!(installed, HashSet::from(["bpftool", "iproute2"]));
    }

    #[test]
    fn finds_llvm_major() {
        assert_eq!(
            llvm_major("libLLVM.so.22.1-rust-1.97.0-nightly"),
            Some("22")
        );
        assert_eq!(llvm_major("libLLVM.so.23-rust-1.99.0-nightly"), Some("23"));
        assert_eq!(llvm_major("libLLVM-22-rust-1.97.0-nightly.so"), None);
        assert_eq!(llvm_major("libLLVM.so."), None);
    }

    #[test]
    fn sees_bpffs_only_when_it_is_on_top() {
        let sysfs = "sysfs /sys sysfs rw,nosuid 0 0\n";
        assert!(!bpffs_in(sysfs));
        let bpf = format!("{sysfs}bpf /sys/fs/bpf bpf rw,relatime,mode=700 0 0\n");
        assert!(bpffs_in(&bpf));
        let hidden = format!("{bpf}tmpfs /sys/fs/bpf tmpfs rw 0 0\n");
        assert!(!bpffs_in(&hidden));
        assert!(!bpffs_in("bpf /sys/fs/bpf/x bpf rw 0 0\n"));
    }
}
