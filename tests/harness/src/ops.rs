//! Operating a running daemon from a test: the `lb` admin CLI as a real
//! process (as root or as another user), a guard for a daemon's bpffs pin
//! directory, config files with their own pin path, and stopping a daemon
//! while keeping everything it logged.

use std::{
    io::{BufRead as _, BufReader, ErrorKind},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use serde::de::DeserializeOwned;

use crate::{
    cmd::output_with_timeout,
    lb_process::{lb_binary, Daemon, READY_MARKER, STOP_GRACE},
    TempDir, Topology,
};

/// The longest one CLI command may take.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a daemon started by [`DaemonFiles::start`] may take to attach
/// and write its maps.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One test's config file, state file and admin socket in a temporary
/// directory, and its daemons' pin directory `/sys/fs/bpf/lb-e2e-{prefix}`.
/// All of it goes when dropped: declare it before the daemons that use it.
#[derive(Debug)]
pub struct DaemonFiles {
    /// The daemons' pin directory; the first field, so dropped first.
    pub pins: PinDir,
    /// The config file (written by [`DaemonFiles::write_config`]).
    pub config: PathBuf,
    /// The state file (`--state`); its journal sits next to it.
    pub state: PathBuf,
    /// The admin socket (`--socket`).
    pub socket: PathBuf,
    /// The temporary directory holding the three.
    pub dir: TempDir,
}

impl DaemonFiles {
    /// The files of a test on `topo`, in a temporary directory named after
    /// `tag` and the topology's prefix; no config written yet.
    pub fn new(topo: &Topology, tag: &str) -> DaemonFiles {
        let pins = PinDir::new(&format!("/sys/fs/bpf/lb-e2e-{}", topo.prefix()));
        let dir = TempDir::new(&format!("{tag}-{}", topo.prefix()));
        DaemonFiles {
            config: dir.path().join("lb.toml"),
            state: dir.path().join("lb.state.json"),
            socket: dir.path().join("lb.sock"),
            pins,
            dir,
        }
    }

    /// Lets other users reach the admin socket's directory (mode 0755), so
    /// that only the socket's own mode and the API's access rules keep them
    /// out.
    pub fn open_to_others(&self) {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod 755 the test directory");
    }

    /// Writes `config` as the config file, pinned under [`DaemonFiles::pins`].
    pub fn write_config(&self, config: &str) {
        self.dir
            .write("lb.toml", &with_pin_path(config, self.pins.as_str()));
    }

    /// Starts `lb run` with this config, state file and socket, plus
    /// `extra`, and waits (up to [`READY_TIMEOUT`]) until it is ready.
    pub fn start(&self, extra: &[&str]) -> Daemon {
        let s = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
        let (config, state, socket) = (s(&self.config), s(&self.state), s(&self.socket));
        let mut args = vec![
            "run", "--config", &config, "--state", &state, "--socket", &socket,
        ];
        args.extend_from_slice(extra);
        Daemon::start(&args, READY_MARKER, READY_TIMEOUT)
    }

    /// The admin CLI pointed at this socket.
    pub fn cli(&self) -> LbCli {
        LbCli::new(&self.socket)
    }
}

/// What one `lb` admin command did.
#[derive(Clone, Debug)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    /// Its exit status.
    pub status: ExitStatus,
    /// Its standard output.
    pub stdout: String,
    /// Its standard error.
    pub stderr: String,
}

impl CliOutput {
    /// The exit code (`None` if it died of a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// The non-empty lines of stderr.
    pub fn stderr_lines(&self) -> Vec<&str> {
        self.stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect()
    }

    /// Everything about the run, for a panic message.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}\nstdout:\n{}\nstderr:\n{}",
            self.command, self.status, self.stdout, self.stderr
        )
    }
}

/// The `lb` admin CLI pointed at one daemon's socket.
#[derive(Clone, Debug)]
pub struct LbCli {
    binary: PathBuf,
    socket: PathBuf,
}

impl LbCli {
    /// A CLI that runs [`lb_binary`] with `--socket socket`.
    pub fn new(socket: &Path) -> LbCli {
        LbCli {
            binary: lb_binary(),
            socket: socket.to_owned(),
        }
    }

    /// The socket it talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn command_line(&self, prefix: &[&str], args: &[&str]) -> String {
        let mut parts: Vec<String> = prefix.iter().map(|s| (*s).to_owned()).collect();
        parts.push(self.binary.display().to_string());
        parts.push("--socket".into());
        parts.push(self.socket.display().to_string());
        parts.extend(args.iter().map(|s| (*s).to_owned()));
        parts.join(" ")
    }

    fn finish(command: String, cmd: &mut Command) -> CliOutput {
        let out = output_with_timeout(cmd, CLI_TIMEOUT);
        CliOutput {
            command,
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs `lb --socket S args...` (bounded by [`CLI_TIMEOUT`]) whatever
    /// its exit status.
    pub fn run(&self, args: &[&str]) -> CliOutput {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--socket").arg(&self.socket).args(args);
        LbCli::finish(self.command_line(&[], args), &mut cmd)
    }

    /// Like [`LbCli::run`], as user and group `uid` with no supplementary
    /// groups (through util-linux `setpriv`).
    pub fn run_as(&self, uid: u32, args: &[&str]) -> CliOutput {
        self.run_as_member(uid, &[], args)
    }

    /// Like [`LbCli::run`], as user `uid` whose primary group is `uid` and
    /// whose supplementary groups are exactly `groups` (through util-linux
    /// `setpriv`).
    pub fn run_as_member(&self, uid: u32, groups: &[u32], args: &[&str]) -> CliOutput {
        let reuid = format!("--reuid={uid}");
        let regid = format!("--regid={uid}");
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        let groups = if list.is_empty() {
            "--clear-groups".to_owned()
        } else {
            format!("--groups={}", list.join(","))
        };
        let prefix = ["setpriv", reuid.as_str(), regid.as_str(), groups.as_str()];
        let mut cmd = Command::new(prefix[0]);
        cmd.args(&prefix[1..])
            .arg(&self.binary)
            .arg("--socket")
            .arg(&self.socket)
            .args(args);
        LbCli::finish(self.command_line(&prefix, args), &mut cmd)
    }

    /// Starts `lb --socket S args...` (e.g. `events --json`) in the
    /// background; its output is collected line by line as it comes, and
    /// it is killed when the [`Follower`] is dropped.
    pub fn follow(&self, args: &[&str]) -> Follower {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--socket").arg(&self.socket).args(args);
        Self::spawn_follower(self.command_line(&[], args), cmd)
    }

    /// Like [`LbCli::follow`], as user `uid` in exactly the supplementary
    /// `groups` (through util-linux `setpriv`, as [`LbCli::run_as_member`]).
    pub fn follow_as_member(&self, uid: u32, groups: &[u32], args: &[&str]) -> Follower {
        let reuid = format!("--reuid={uid}");
        let regid = format!("--regid={uid}");
        let list: Vec<String> = groups.iter().map(u32::to_string).collect();
        let groups = format!("--groups={}", list.join(","));
        let prefix = ["setpriv", reuid.as_str(), regid.as_str(), groups.as_str()];
        let mut cmd = Command::new(prefix[0]);
        cmd.args(&prefix[1..])
            .arg(&self.binary)
            .arg("--socket")
            .arg(&self.socket)
            .args(args);
        Self::spawn_follower(self.command_line(&prefix, args), cmd)
    }

    fn spawn_follower(command: String, mut cmd: Command) -> Follower {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting `{command}`: {e}"));
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr: Arc<Mutex<String>> = Arc::default();
        let out = child.stdout.take().expect("piped stdout");
        let err = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&lines);
        let readers = vec![
            thread::spawn(move || {
                for line in BufReader::new(out).lines().map_while(Result::ok) {
                    sink.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            }),
            {
                let sink = Arc::clone(&stderr);
                thread::spawn(move || {
                    for line in BufReader::new(err).lines().map_while(Result::ok) {
                        let mut s = sink.lock().unwrap_or_else(|e| e.into_inner());
                        s.push_str(&line);
                        s.push('\n');
                    }
                })
            },
        ];
        Follower {
            command,
            child,
            lines,
            stderr,
            readers,
        }
    }

    /// Runs `lb --socket S args...` and returns its stdout; panics with
    /// everything it printed unless it exits 0.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lb admin command failed: {}",
            out.describe()
        );
        out.stdout
    }

    /// Runs a `--json` command (pass `--json` in `args`) and parses its
    /// output as `T`; panics with the output if it fails or does not parse.
    pub fn json<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "lb admin command failed: {}",
            out.describe()
        );
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "output of `{}` is not the expected JSON ({e}):\n{}",
                out.command, out.stdout
            )
        })
    }
}

/// A CLI command left running (`lb events`), its stdout collected line by
/// line; killed when dropped.
#[derive(Debug)]
pub struct Follower {
    command: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<thread::JoinHandle<()>>,
}

impl Follower {
    /// The lines printed so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits (up to `timeout`) until `done` holds for the lines printed so
    /// far, and returns them; panics with everything it printed if not.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[String]) -> bool,
    ) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let lines = self.lines();
            if done(&lines) {
                return lines;
            }
            if Instant::now() >= deadline {
                panic!(
                    "`{}`: {what} not within {timeout:?}; it printed:\n{}\nstderr:\n{}",
                    self.command,
                    lines.join("\n"),
                    self.stderr.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (up to `timeout`) for the command to exit by itself; its exit
    /// status and every line it printed. Panics if it does not exit.
    pub fn wait_exit(mut self, timeout: Duration) -> (ExitStatus, Vec<String>) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for the follower") {
                for r in std::mem::take(&mut self.readers) {
                    let _ = r.join();
                }
                return (status, self.lines());
            }
            assert!(
                Instant::now() < deadline,
                "`{}` still running after {timeout:?}; it printed:\n{}",
                self.command,
                self.lines().join("\n")
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The bpffs directory a test's daemon pins its maps and links under
/// (`datapath.pin_path`). Anything there is removed, recursively, when the
/// guard is created (a crashed run's leftovers) and when it is dropped: so
/// a failing test leaves no pin behind. Create it before the daemon guard,
/// so it is dropped after it.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
}

impl PinDir {
    /// A guard for `path`, which must be a directory directly under
    /// `/sys/fs/bpf` whose name starts with `lb-e2e-` (so that it can never
    /// be someone else's).
    pub fn new(path: &str) -> PinDir {
        let path = PathBuf::from(path);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        assert!(
            path.parent() == Some(Path::new("/sys/fs/bpf")) && name.starts_with("lb-e2e-"),
            "pin directory {} must be /sys/fs/bpf/lb-e2e-*",
            path.display()
        );
        let guard = PinDir { path };
        if guard.path.exists() {
            eprintln!("removing stale pins under {}", guard.path.display());
            guard.remove();
        }
        guard
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory as a string (for the config file).
    pub fn as_str(&self) -> &str {
        self.path.to_str().expect("UTF-8 pin path")
    }

    /// Whether the directory exists.
    pub fn exists(&self) -> bool {
        self.path.exists()
    }

    /// Every path under the directory (bounded), for messages.
    pub fn listing(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut dirs = vec![self.path.clone()];
        while let Some(dir) = dirs.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                if out.len() >= 200 {
                    return out;
                }
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p.clone());
                }
                out.push(p);
            }
        }
        out
    }

    fn remove(&self) {
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("warning: removing {}: {e}", self.path.display()),
        }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if self.path.exists() {
            eprintln!("removing pins left under {}", self.path.display());
            self.remove();
        }
    }
}

/// `config` (as [`crate::render_config`] makes it) with
/// `pin_path = "{pin}"` added to its `[datapath]` table.
pub fn with_pin_path(config: &str, pin: &str) -> String {
    let with = config.replacen(
        "[datapath]\n",
        &format!("[datapath]\npin_path = \"{pin}\"\n"),
        1,
    );
    assert_ne!(with, config, "no [datapath] table in:\n{config}");
    with
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound, then
/// released), for `lb run --metrics`.
pub fn free_loopback_port() -> u16 {
    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
        .unwrap_or_else(|e| panic!("binding 127.0.0.1:0: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("local address of 127.0.0.1:0: {e}"))
        .port()
}

/// Stops `daemon` with SIGTERM like [`Daemon::stop`], but returns its exit
/// status together with everything it logged (up to its exit).
pub fn stop_with_output(mut daemon: Daemon) -> (ExitStatus, String) {
    if let Some(pid) = daemon.pid().and_then(|p| i32::try_from(p).ok()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + STOP_GRACE;
    while daemon.is_running() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    // The output readers see the pipes' end shortly after the exit: wait
    // (bounded) until the output stops growing.
    let settle = Instant::now() + Duration::from_secs(2);
    let mut seen = daemon.output().len();
    while Instant::now() < settle {
        thread::sleep(Duration::from_millis(100));
        let now = daemon.output().len();
        if now == seen {
            break;
        }
        seen = now;
    }
    let output = daemon.output();
    // Still running past the grace period: `stop` SIGKILLs it.
    let status = daemon.stop();
    (status, output)
}
