//! A guard that sets the host's iptables FORWARD policy to DROP.

use crate::cmd::{run, run_ok, stderr_of};

/// The host's current iptables FORWARD policy (`ACCEPT` or `DROP`), read from
/// the first line of `iptables -S FORWARD` (`-P FORWARD POLICY`).
pub fn forward_policy() -> String {
    let rules = run_ok("iptables", &["-S", "FORWARD"]);
    let first = rules.lines().next().unwrap_or("");
    match first.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["-P", "FORWARD", policy] => (*policy).to_owned(),
        _ => panic!("unexpected `iptables -S FORWARD` output:\n{rules}"),
    }
}

/// Sets the iptables FORWARD policy to DROP while it lives, and restores the
/// policy it found when dropped.
///
/// With it in place, any packet the kernel's own IP forwarding handles is
/// dropped by netfilter: traffic that still flows between the client and the
/// backends proves the balanced path bypasses the kernel's forwarding.
#[derive(Debug)]
pub struct ForwardDrop {
    saved: String,
}

impl ForwardDrop {
    /// Saves the current policy and sets `iptables -P FORWARD DROP`.
    pub fn new() -> ForwardDrop {
        let saved = forward_policy();
        let guard = ForwardDrop { saved };
        run_ok("iptables", &["-P", "FORWARD", "DROP"]);
        guard
    }

    /// The policy that will be restored.
    pub fn saved_policy(&self) -> &str {
        &self.saved
    }
}

impl Default for ForwardDrop {
    fn default() -> Self {
        ForwardDrop::new()
    }
}

impl Drop for ForwardDrop {
    fn drop(&mut self) {
        let out = run("iptables", &["-P", "FORWARD", &self.saved]);
        if !out.status.success() {
            eprintln!(
                "warning: could not restore the FORWARD policy {}: {}",
                self.saved,
                stderr_of(&out)
            );
        }
    }
}
