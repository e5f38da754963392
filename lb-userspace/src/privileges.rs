//! Least privilege: `lb run` keeps only the capabilities the daemon needs
//! and drops every other one, from every set including the bounding set, so
//! nothing it runs or becomes can get them back.
//!
//! The drop happens first thing, before the async runtime starts its
//! threads: Linux keeps capabilities per thread, and a thread made later
//! starts with its creator's, so dropping before any thread exists is the
//! one way every thread of the daemon ends up without them. What setup
//! alone needs therefore stays for the daemon's life; that is one
//! capability, `CAP_PERFMON`.
//!
//! What stays, and why:
//! - `CAP_BPF`: loading the programs, creating and pinning the maps, reading
//!   and writing them at every change, attaching the TC program to the
//!   veths of containers that start later;
//! - `CAP_PERFMON`: the verifier accepts the programs' pointer arithmetic
//!   only from a loader that has it (without it, it adds Spectre checks our
//!   programs are not written for); needed only at load;
//! - `CAP_NET_ADMIN`: XDP and TC attachments, neighbour entries, GRO
//!   through the ethtool netlink family;
//! - `CAP_SYS_ADMIN`: mounting bpffs when it is missing, and `setns()` into a
//!   container's network namespace to switch GRO on there;
//! - `CAP_SYS_PTRACE`: opening `/proc/PID/ns/net` of a container's process,
//!   which the kernel allows only with ptrace access to it.
//!
//! Everything else goes: overriding file permissions (the daemon's files
//! are its own), changing ownership, sending signals to others, raw
//! sockets, changing user ids, raising resource limits (the kernel charges
//! BPF memory to the cgroup, not to the memlock limit), and the rest.

use caps::{CapSet, Capability, CapsHashSet};

/// The capabilities the daemon keeps.
pub const KEPT: [Capability; 5] = [
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
];

/// Why dropping capabilities failed.
#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    /// The kernel refused to change a capability set.
    #[error("dropping capabilities ({set}): {reason}")]
    Drop {
        /// The set being changed.
        set: &'static str,
        /// What the kernel said.
        reason: String,
    },
}

/// Drops every capability but [`KEPT`] (those the process has: a daemon
/// started without one keeps without it) from the bounding, inheritable,
/// ambient, permitted and effective sets of the calling thread, which must
/// be the process's only one. Returns what it kept.
pub fn drop_to_kept() -> Result<Vec<Capability>, PrivilegeError> {
    let fail = |set: &'static str| {
        move |e: caps::errors::CapsError| PrivilegeError::Drop {
            set,
            reason: e.to_string(),
        }
    };
    let permitted = caps::read(None, CapSet::Permitted).map_err(fail("reading permitted"))?;
    let kept: CapsHashSet = KEPT.into_iter().filter(|c| permitted.contains(c)).collect();
    // The bounding set first: dropping from it needs CAP_SETPCAP, which the
    // permitted set is about to lose.
    for cap in caps::all() {
        if !kept.contains(&cap)
            && caps::has_cap(None, CapSet::Bounding, cap).map_err(fail("bounding"))?
        {
            caps::drop(None, CapSet::Bounding, cap).map_err(fail("bounding"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(fail("ambient"))?;
    caps::clear(None, CapSet::Inheritable).map_err(fail("inheritable"))?;
    // Effective must stay within permitted: shrink it first.
    caps::set(None, CapSet::Effective, &kept).map_err(fail("effective"))?;
    caps::set(None, CapSet::Permitted, &kept).map_err(fail("permitted"))?;
    let mut out: Vec<Capability> = kept.into_iter().collect();
    out.sort_by_key(|c| c.index());
    Ok(out)
}
