//! Pins that outlive the daemon wherever it runs.
//!
//! `ip netns exec NS lb run` starts the daemon in a mount namespace of its
//! own, with a fresh sysfs on `/sys` (so that `/sys/class/net` shows NS's
//! interfaces). The host's bpffs at `/sys/fs/bpf` is not in it, and a
//! bpffs mounted there lives and dies with that namespace: every pin would
//! vanish with the process, and with them what `--keep-datapath` and a
//! crash promise (the data path forwarding alone, adopted at the next
//! start). [`share_host_bpffs`] puts the bpffs of the namespace `ip` was
//! called from (the host's) back under the namespace's own sysfs before
//! anything is pinned.

use std::{
    fs::{File, OpenOptions},
    io,
    os::{
        fd::AsRawFd,
        unix::fs::{MetadataExt, OpenOptionsExt},
    },
    path::Path,
};

use nix::{
    mount::{mount, MsFlags},
    sched::{setns, unshare, CloneFlags},
    sys::statfs::{statfs, BPF_FS_MAGIC},
};

/// Where bpffs lives.
const BPFFS: &str = "/sys/fs/bpf";

/// A step of [`share_host_bpffs`] failed.
#[derive(Debug, thiserror::Error)]
#[error("keeping pins on the host's bpffs: {step}")]
pub struct MountNsError {
    /// What was being done.
    step: &'static str,
    /// What went wrong.
    #[source]
    source: io::Error,
}

fn step(step: &'static str) -> impl FnOnce(nix::Error) -> MountNsError {
    move |e| MountNsError {
        step,
        source: e.into(),
    }
}

fn on_bpffs(path: &str) -> bool {
    statfs(path).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC)
}

/// The mount namespace of the process that started this one, when it is
/// not this one's: the namespace `ip netns exec` was called from. `None`
/// in the usual case of a daemon started in its caller's namespace.
fn callers_mount_ns() -> Option<File> {
    let mine = std::fs::metadata("/proc/self/ns/mnt").ok()?;
    let path = format!("/proc/{}/ns/mnt", nix::unistd::getppid());
    let theirs = std::fs::metadata(&path).ok()?;
    if (theirs.ino(), theirs.dev()) == (mine.ino(), mine.dev()) {
        return None;
    }
    File::open(&path).ok()
}

/// When the daemon was started in a mount namespace of its own, other
/// than its caller's, in which `/sys/fs/bpf` is no bpffs (as under
/// `ip netns exec`), makes the caller's bpffs (mounting it there first if
/// the caller has none) appear at `/sys/fs/bpf` here, with this network
/// namespace's sysfs around it, so that pins outlive the process. Returns
/// whether it did.
///
/// To do so the process moves to a copy of the caller's mount namespace
/// (what it sees under `/etc` is then the caller's: `ip netns exec`'s
/// per-namespace `/etc/netns/NS` files are not used). It keeps its working
/// directory by path. Must run before any other thread starts: the kernel
/// refuses to move a multi-threaded process to another mount namespace.
pub fn share_host_bpffs() -> Result<bool, MountNsError> {
    if on_bpffs(BPFFS) {
        return Ok(false);
    }
    // Started in its caller's namespace (the usual case), a bpffs mounted
    // later stays there.
    let Some(host) = callers_mount_ns() else {
        return Ok(false);
    };
    let cwd = std::env::current_dir().ok();
    setns(&host, CloneFlags::CLONE_NEWNS).map_err(step("entering the caller's mount namespace"))?;
    if !on_bpffs(BPFFS) {
        mount(
            Some("bpf"),
            BPFFS,
            Some("bpf"),
            MsFlags::empty(),
            None::<&str>,
        )
        .map_err(step(
            "mounting bpffs at /sys/fs/bpf in the caller's namespace",
        ))?;
    }
    // A copy of the caller's namespace, that its mounts still reach (slave)
    // and whose own mounts stay here: the sysfs below.
    unshare(CloneFlags::CLONE_NEWNS).map_err(step("making a mount namespace"))?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .map_err(step("making mounts slaves of the caller's"))?;
    // Held across the sysfs mount, which hides the bpffs under it.
    let bpffs = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
        .open(BPFFS)
        .map_err(|source| MountNsError {
            step: "opening /sys/fs/bpf",
            source,
        })?;
    // A sysfs mounted now shows this process's network namespace.
    mount(
        Some("sysfs"),
        "/sys",
        Some("sysfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step("mounting this network namespace's sysfs"))?;
    let source = format!("/proc/self/fd/{}", bpffs.as_raw_fd());
    mount(
        Some(Path::new(&source)),
        BPFFS,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step("binding the caller's bpffs at /sys/fs/bpf"))?;
    if let Some(cwd) = cwd {
        // The same path names the same directory: this namespace is a copy
        // of the caller's, as `ip netns exec`'s was.
        let _ = std::env::set_current_dir(cwd);
    }
    Ok(true)
}
