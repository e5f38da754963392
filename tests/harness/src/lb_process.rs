//! A guard for the `lb` daemon process.

use std::{
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

/// What `lb run` logs once it has attached and written its maps.
pub const READY_MARKER: &str = "data path ready";
/// How long [`Daemon::stop`] waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// The `lb` binary to test: `$LB_BIN` if set, else
/// `<workspace>/target/release/lb` if it exists, else
/// `<workspace>/target/debug/lb`. Panics if none exists.
pub fn lb_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("LB_BIN") {
        let path = PathBuf::from(path);
        assert!(path.is_file(), "LB_BIN={} is not a file", path.display());
        return path;
    }
    // This crate is `<workspace>/tests/harness`.
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the harness crate lives in the workspace");
    let release = workspace.join("target/release/lb");
    let debug = workspace.join("target/debug/lb");
    for candidate in [&release, &debug] {
        if candidate.is_file() {
            warn_if_stale(candidate, workspace);
            return candidate.clone();
        }
    }
    panic!(
        "no lb binary: set LB_BIN, or build one (`cargo build -p lb-userspace` makes {}; \
         `cargo build --release -p lb-userspace` makes {})",
        debug.display(),
        release.display()
    );
}

/// An empty directory, for a `PATH` under which no program can be found.
pub fn no_tools_path() -> PathBuf {
    let dir = std::env::temp_dir().join("lb-tests-no-tools");
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

/// Prints a warning if a source file of the daemon is newer than `binary`:
/// `cargo test` of the tests or the benchmark does not rebuild the `lb`
/// binary.
fn warn_if_stale(binary: &Path, workspace: &Path) {
    let Ok(built) = binary.metadata().and_then(|m| m.modified()) else {
        return;
    };
    let mut dirs: Vec<PathBuf> = ["lb-userspace/src", "lb-ebpf/src", "lb-common/src"]
        .iter()
        .map(|d| workspace.join(d))
        .collect();
    // Bounded walk: a few hundred entries at most in these trees.
    let mut budget = 2000;
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            budget -= 1;
            if budget == 0 {
                return;
            }
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if entry
                .metadata()
                .and_then(|m| m.modified())
                .is_ok_and(|t| t > built)
            {
                eprintln!(
                    "warning: {} is newer than {}: rebuild lb (`cargo build -p lb-userspace`) \
                     or set LB_BIN",
                    path.display(),
                    binary.display()
                );
                return;
            }
        }
    }
}

/// A running `lb` process whose stdout and stderr are collected (see
/// [`Daemon::output`]) and echoed to the test's stderr with a `[lb] ` prefix.
/// Dropping it stops it like [`Daemon::stop`].
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    output: Arc<Mutex<String>>,
    readers: Vec<JoinHandle<()>>,
    command: String,
}

impl Daemon {
    /// Starts [`lb_binary`] with `args` and waits up to `timeout` for an
    /// output line containing `ready_marker` (normally [`READY_MARKER`]).
    ///
    /// Panics, with the command and everything it printed, if it exits
    /// first or the marker does not appear in time (it is then stopped).
    pub fn start(args: &[&str], ready_marker: &str, timeout: Duration) -> Daemon {
        Daemon::start_with_env(args, &[], ready_marker, timeout)
    }

    /// Like [`Daemon::start`], with extra environment variables (e.g.
    /// `("RUST_LOG", "debug")`).
    ///
    /// `lb` runs with `PATH` set to an empty directory ([`no_tools_path`]),
    /// so every test that starts it also shows it needs no `ip`, `ethtool`
    /// or `nsenter` (`env` may still set another `PATH`).
    pub fn start_with_env(
        args: &[&str],
        env: &[(&str, &str)],
        ready_marker: &str,
        timeout: Duration,
    ) -> Daemon {
        let path = no_tools_path();
        let path = path.to_str().expect("the temporary directory is UTF-8");
        let env: Vec<(&str, &str)> = [("PATH", path)]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
        Daemon::start_program(&lb_binary(), args, &env, ready_marker, timeout)
    }

    /// Like [`Daemon::start_with_env`] for any `program` (not only `lb`).
    pub fn start_program(
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        ready_marker: &str,
        timeout: Duration,
    ) -> Daemon {
        let command = format!("{} {}", program.display(), args.join(" "));
        let mut child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{command}`: {e}"));
        let output = Arc::new(Mutex::new(String::new()));
        let readers = vec![
            collect(
                Box::new(child.stdout.take().expect("piped stdout")),
                output.clone(),
            ),
            collect(
                Box::new(child.stderr.take().expect("piped stderr")),
                output.clone(),
            ),
        ];
        // From here on a panic drops (and so stops) the daemon.
        let mut daemon = Daemon {
            child: Some(child),
            output,
            readers,
            command,
        };
        let deadline = Instant::now() + timeout;
        loop {
            if daemon.output().contains(ready_marker) {
                return daemon;
            }
            let exited = daemon
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                daemon.child = None;
                daemon.join_readers();
                panic!(
                    "`{}` exited ({status}) before logging {ready_marker:?}; its output:\n{}",
                    daemon.command,
                    daemon.output()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "`{}` did not log {ready_marker:?} within {timeout:?}; its output:\n{}",
                    daemon.command,
                    daemon.output()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the daemon printed so far (stdout and stderr, by line).
    pub fn output(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for an output line containing `marker`.
    pub fn wait_for_output(&self, marker: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.output().contains(marker) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The daemon's process id (`None` once it was stopped).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILLs it, as a crash would end it (nothing of its own clean-up
    /// runs), and reaps it; its output stays readable.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM, waits up to [`STOP_GRACE`] for it to exit, then
    /// SIGKILLs it; returns its exit status.
    pub fn stop(mut self) -> ExitStatus {
        let status = self.terminate();
        status.expect("the daemon was running")
    }

    fn terminate(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            self.join_readers();
            return Some(status);
        }
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                _ => {
                    eprintln!("[lb] still running {STOP_GRACE:?} after SIGTERM: SIGKILL");
                    let _ = child.kill();
                    break child.wait().expect("waiting for the killed daemon");
                }
            }
        };
        self.join_readers();
        Some(status)
    }

    /// Joins the output readers, giving up after 2 s (a child of the daemon
    /// may keep its pipes open).
    fn join_readers(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        for reader in std::mem::take(&mut self.readers) {
            if reader.is_finished() {
                let _ = reader.join();
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// Reads `pipe` line by line into `output`, echoing each line to stderr.
fn collect(pipe: Box<dyn Read + Send>, output: Arc<Mutex<String>>) -> JoinHandle<()> {
    thread::Builder::new()
        .name("lb-output".into())
        .spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            // Bounded by the pipe's EOF (the process exiting).
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let text = String::from_utf8_lossy(&line);
                        let text = text.trim_end_matches(['\n', '\r']);
                        eprintln!("[lb] {text}");
                        let mut all = output.lock().unwrap_or_else(|p| p.into_inner());
                        all.push_str(text);
                        all.push('\n');
                    }
                }
            }
        })
        .expect("spawning an output reader")
}
