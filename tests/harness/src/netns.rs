//! Named network namespaces (`ip netns`), and running code inside one.

use std::{fs::File, path::PathBuf, process::Output, thread};

use nix::sched::{setns, CloneFlags};

use crate::cmd::{run, stderr_of};

/// A named network namespace, created by `ip netns add` and deleted by
/// `ip netns del` when dropped.
///
/// Deleting only unmounts its name: the namespace itself (and the devices in
/// it) lives on while a socket or process still uses it, so drop servers
/// before their namespace.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates namespace `name` (deleting a stale one of the same name
    /// first). Panics if it cannot be created.
    pub fn new(name: &str) -> Netns {
        assert!(
            !name.is_empty() && !name.contains('/') && !name.contains(char::is_whitespace),
            "bad namespace name {name:?}"
        );
        let _ = run("ip", &["netns", "del", name]);
        let out = run("ip", &["netns", "add", name]);
        if !out.status.success() {
            panic!("`ip netns add {name}` failed: {}", stderr_of(&out));
        }
        Netns {
            name: name.to_owned(),
        }
    }

    /// The namespace's name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread that first enters this namespace, and
    /// returns its result (a panic in `f` is propagated).
    ///
    /// Sockets created by `f` belong to this namespace for their whole life,
    /// whichever thread uses them afterwards; threads spawned by `f` start in
    /// this namespace too.
    pub fn run<F, R>(&self, f: F) -> R
    where
        F: FnOnce() -> R + Send,
        R: Send,
    {
        let path = self.path();
        thread::scope(|scope| {
            let handle = thread::Builder::new()
                .name(format!("netns:{}", self.name))
                .spawn_scoped(scope, move || {
                    let file = File::open(&path)
                        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                    setns(&file, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("setns({}): {e}", path.display()));
                    f()
                })
                .expect("spawning a thread");
            match handle.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            }
        })
    }

    /// Runs `ip netns exec NAME args...` and returns its output, whatever its
    /// exit status. Panics only if `ip` cannot be started.
    pub fn exec(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", self.name.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Like [`Netns::exec`], but panics (with stderr) unless the command
    /// succeeds, and returns its stdout.
    pub fn exec_ok(&self, args: &[&str]) -> String {
        let out = self.exec(args);
        if !out.status.success() {
            panic!(
                "`ip netns exec {} {}` failed ({}): {}",
                self.name,
                args.join(" "),
                out.status,
                stderr_of(&out)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip -n NAME args...` (an `ip` command acting on this namespace),
    /// panicking with stderr unless it succeeds; returns stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut full = vec!["-n", self.name.as_str()];
        full.extend_from_slice(args);
        crate::cmd::run_ok("ip", &full)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleted already (e.g. by a test that removes a backend's namespace).
        if !self.path().exists() {
            return;
        }
        let out = run("ip", &["netns", "del", &self.name]);
        if !out.status.success() {
            eprintln!(
                "warning: `ip netns del {}` failed: {}",
                self.name,
                stderr_of(&out)
            );
        }
    }
}

/// Names of the namespaces `ip netns list` shows.
pub fn list_netns() -> Vec<String> {
    let out = run("ip", &["netns", "list"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}
