//! A real Docker engine for end-to-end tests (never a mock): the engine
//! itself ([`Engine`]), tiny local images, containers ([`Container`]) and
//! user-defined networks ([`Network`]), each a guard that undoes what it made.
//!
//! Everything goes through the `docker` CLI (`/usr/bin/docker` if it exists,
//! else `docker` from `PATH`) on the default socket [`DOCKER_SOCKET`], and
//! `dockerd` started with [`DOCKERD_ARGS`]: the default bridge `docker0` is
//! 198.18.0.1/24 and networks come from 198.19.0.0/16, and the engine leaves
//! the host's firewall and `ip_forward` alone. The bridges are on this host,
//! so a test reaches every container directly at its address.
//!
//! No registry is reachable: the images are made locally from
//! `/bin/busybox` (Debian's `busybox-static`) by `docker import`.
//!
//! Drop order matters: declare the [`Engine`] first, then [`Network`]s, then
//! [`Container`]s, so that containers are removed before their network and
//! both before the engine stops.

use std::{
    fs::{self, OpenOptions},
    io::Read,
    net::Ipv4Addr,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{cmd::run, lock::HostLock, tempdir::TempDir, topology::host_links};

/// The engine's API socket every command of this module uses.
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Where `dockerd` writes its process id.
pub const DOCKERD_PIDFILE: &str = "/var/run/docker.pid";
/// The arguments of every `dockerd` this module starts: default bridge
/// 198.18.0.1/24, networks from 198.19.0.0/16, and no change to the host's
/// firewall (no iptables rules, no `nat` table) nor to `ip_forward`.
pub const DOCKERD_ARGS: &[&str] = &[
    "--bip",
    "198.18.0.1/24",
    "--default-address-pool",
    "base=198.19.0.0/16,size=24",
    "--iptables=false",
    "--ip6tables=false",
    "--ip-forward=false",
];
/// The subnet the engine's default bridge (`docker0`) must have.
pub const BRIDGE_SUBNET: &str = "198.18.0.0/24";
/// The image [`Engine::image`] makes: busybox with [`IMAGE_APPLETS`].
pub const IMAGE: &str = "lb-test/busybox:1";
/// The same content as [`IMAGE`] under another name (and image id), made by
/// [`Engine::other_image`].
pub const OTHER_IMAGE: &str = "lb-test/other:1";
/// The busybox applets linked in `/bin` of both images (`PATH=/bin`).
pub const IMAGE_APPLETS: &[&str] = &[
    "sh", "httpd", "nc", "cat", "hostname", "sleep", "mkdir", "echo", "ls", "wget", "kill", "rm",
];
/// The port of the default command's HTTP server (see [`RunOpts::default`]).
pub const HTTP_PORT: u16 = 8080;
/// The label (value `1`) this module puts on every container and network it
/// creates: how a later run tells a crashed run's leftovers from objects made
/// by someone else (which it never removes).
pub const HARNESS_LABEL: &str = "lb-tests.harness";
/// `docker run --stop-timeout` of every container, in seconds. The main
/// process is PID 1 of its namespace and ignores SIGTERM, so without this a
/// `docker stop` (or an engine shutdown) would wait 10 s before SIGKILL.
pub const STOP_TIMEOUT_SECS: u32 = 1;

/// How long [`Engine::ensure`] gives an engine that is already there to
/// answer `docker version`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a started `dockerd` has to answer.
const START_WAIT: Duration = Duration::from_secs(30);
/// How long a `dockerd` has to exit after SIGTERM before SIGKILL.
const STOP_WAIT: Duration = Duration::from_secs(20);
/// How long one `docker` command may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`Engine::ensure`] waits for another engine user (in this or
/// another process) to drop its [`Engine`].
const LOCK_WAIT: Duration = Duration::from_secs(300);
/// The file whose `flock` serializes engine users on this host.
const LOCK_PATH: &str = "/run/lb-tests-docker.lock";
/// How often waits poll.
const POLL: Duration = Duration::from_millis(100);
/// How many lines of `dockerd`'s log a panic message shows.
const LOG_TAIL_LINES: usize = 40;

/// The `docker` client: `/usr/bin/docker` (Debian's, same version as the
/// engine) if it exists, else `docker` from `PATH`.
pub fn docker_binary() -> &'static str {
    if Path::new("/usr/bin/docker").is_file() {
        "/usr/bin/docker"
    } else {
        "docker"
    }
}

/// The engine: `/usr/sbin/dockerd` if it exists, else `dockerd` from `PATH`.
fn dockerd_binary() -> &'static str {
    if Path::new("/usr/sbin/dockerd").is_file() {
        "/usr/sbin/dockerd"
    } else {
        "dockerd"
    }
}

/// Runs `docker -H unix://DOCKER_SOCKET args...` (at most 60 s) and returns
/// its output whatever its exit status. Panics only if it cannot be started
/// or does not finish in time.
pub fn docker(args: &[&str]) -> Output {
    docker_within(args, CLI_TIMEOUT).unwrap_or_else(|e| panic!("{e}"))
}

/// Like [`docker`], but panics with the command and its stderr unless it
/// succeeds; returns its stdout, trimmed.
pub fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    if !out.status.success() {
        panic!(
            "`docker {}` failed ({}): {}",
            args.join(" "),
            out.status,
            text(&out.stderr)
        );
    }
    text(&out.stdout)
}

/// Runs `docker` with `args` against [`DOCKER_SOCKET`], killing it after
/// `timeout`. Never panics: for `Drop` code and probes.
fn docker_within(args: &[&str], timeout: Duration) -> Result<Output, String> {
    let shown = format!("docker {}", args.join(" "));
    let mut child = Command::new(docker_binary())
        .arg("-H")
        .arg(format!("unix://{DOCKER_SOCKET}"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut pipe) = pipe {
                // Bounded by the pipe's EOF (the client exiting).
                let _ = pipe.read_to_end(&mut buf);
            }
            buf
        })
    };
    let stdout = drain(child.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "`{shown}` still running after {timeout:?}, killed it"
                ));
            }
            Err(e) => return Err(format!("waiting for `{shown}`: {e}")),
        }
    };
    Ok(Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    })
}

/// `bytes`, lossily decoded and trimmed.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim().to_owned()
}

/// Whether an engine answers `docker version` on [`DOCKER_SOCKET`] within
/// `timeout`.
fn answers(timeout: Duration) -> bool {
    docker_within(&["version", "--format", "{{.Server.Version}}"], timeout)
        .is_ok_and(|out| out.status.success() && !text(&out.stdout).is_empty())
}

/// Polls `f` every 100 ms until it returns true or `timeout` passes; returns
/// its last answer.
fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Polls `f` (every 100 ms) until it returns true; panics with
/// "gave up waiting for {what}" if it does not within `timeout`.
pub fn wait_for(timeout: Duration, what: &str, f: impl FnMut() -> bool) {
    if !poll_until(timeout, f) {
        panic!("gave up waiting {timeout:?} for {what}");
    }
}

/// The command of a TCP echo server on `port` for held connections:
/// `nc -ll -p PORT -e cat` (busybox `nc` forks a `cat` per connection).
pub fn echo_cmd(port: u16) -> Vec<String> {
    ["nc", "-ll", "-p", &port.to_string(), "-e", "cat"]
        .map(str::to_owned)
        .to_vec()
}

/// The command of an HTTP server on 8080 that answers the container's
/// name and, on SIGTERM, goes on serving for a second before it exits, as a
/// real server finishes what it serves (busybox `httpd` itself exits at
/// once).
pub fn http_name_cmd_draining() -> Vec<String> {
    [
        "sh",
        "-c",
        "echo -n $(hostname) > /www/index.html; \
         httpd -f -p 8080 -h /www & pid=$!; \
         trap 'sleep 1; kill $pid; exit 0' TERM; \
         wait $pid",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Panics unless `name` is a valid Docker object name of `kind`.
fn check_name(kind: &str, name: &str) {
    assert!(
        name.len() <= 63
            && name
                .bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphanumeric())
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)),
        "bad {kind} name {name:?}: 1 to 63 ASCII letters, digits, `_`, `.` or `-`, \
         starting with a letter or digit"
    );
}

/// A Docker engine answering on [`DOCKER_SOCKET`], for as long as this
/// guard lives, exclusively for this process (a host-wide `flock` on
/// `/run/lb-tests-docker.lock` serializes engine users across processes).
///
/// [`Engine::ensure`] uses an engine that already answers ("not owned") or
/// starts `dockerd` [`DOCKERD_ARGS`] itself ("owned"), logging to a file in
/// a temporary directory. Dropping an owned engine stops it and deletes
/// `docker0` if that link did not exist before; dropping a not-owned engine
/// leaves it running (restarting it if [`Engine::stop`] stopped it).
/// Images, and containers of a crashed run, persist in the engine's data
/// root (`/var/lib/docker`).
#[derive(Debug)]
pub struct Engine {
    owned: bool,
    docker0_existed: bool,
    /// The `dockerd` this guard started (owned, or a restarted foreign one),
    /// while it has not been reaped.
    child: Option<Child>,
    /// Whether [`Engine::stop`] stopped the engine (and no `start` since).
    stopped: bool,
    /// Whether [`Engine::live_restore`] restarted it with `--live-restore`.
    live_restore: bool,
    /// The command line of a not-owned `dockerd`, read before stopping it.
    foreign_argv: Option<Vec<String>>,
    log: PathBuf,
    _log_dir: TempDir,
    /// Held (and so dropped) last.
    _lock: HostLock,
}

impl Engine {
    /// Takes the host-wide engine lock (waiting up to 300 s for another
    /// user), then uses the engine on [`DOCKER_SOCKET`] if `docker version`
    /// answers within 1 s, waits (30 s) for one that is still coming up
    /// (its pid in [`DOCKERD_PIDFILE`] alive), or else starts `dockerd`
    /// with [`DOCKERD_ARGS`] and waits (30 s) until it answers.
    ///
    /// Panics, with the tail of `dockerd`'s log if it started one (then
    /// stopped again), if no engine answers, or if the engine's default
    /// bridge is not [`BRIDGE_SUBNET`] (someone else's engine, which tests
    /// must not use: see the address plan).
    pub fn ensure() -> Engine {
        let lock = HostLock::acquire(LOCK_PATH, LOCK_WAIT, "another engine user");
        let log_dir = TempDir::new("dockerd");
        let mut engine = Engine {
            owned: false,
            docker0_existed: host_links().iter().any(|l| l == "docker0"),
            child: None,
            stopped: false,
            live_restore: false,
            foreign_argv: None,
            log: log_dir.path().join("dockerd.log"),
            _log_dir: log_dir,
            _lock: lock,
        };
        if !answers(PROBE_TIMEOUT) {
            if let Some(pid) = dockerd_pid() {
                if !poll_until(START_WAIT, || answers(PROBE_TIMEOUT)) {
                    panic!(
                        "dockerd pid {pid} (from {DOCKERD_PIDFILE}) runs but does not answer on \
                         {DOCKER_SOCKET} within {START_WAIT:?}"
                    );
                }
            } else {
                engine.owned = true;
                engine.spawn().unwrap_or_else(|e| panic!("{e}"));
            }
        }
        let subnet = docker_ok(&[
            "network",
            "inspect",
            "bridge",
            "--format",
            "{{range .IPAM.Config}}{{.Subnet}} {{end}}",
        ]);
        assert!(
            subnet == BRIDGE_SUBNET,
            "the engine on {DOCKER_SOCKET} has default bridge {subnet:?}, not {BRIDGE_SUBNET}: \
             tests must only use 198.18.0.0/15; restart dockerd with {}",
            DOCKERD_ARGS.join(" ")
        );
        engine
    }

    /// Whether this guard started the engine (and so stops it when dropped).
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// Whether the engine answers `docker version` (within 1 s) now.
    pub fn is_up(&self) -> bool {
        answers(PROBE_TIMEOUT)
    }

    /// Makes the engine keep its containers running while it is away
    /// (Docker's `live-restore`): unless `docker info` says it does already,
    /// stops it and starts it again with `--live-restore` added to its
    /// command line. An engine this guard did not start is put back as it
    /// was found when the guard is dropped. Call it before running
    /// containers: the restart stops those of an engine without it.
    ///
    /// Panics if the engine does not come back, or comes back without it.
    pub fn live_restore(&mut self) {
        if self.has_live_restore() {
            return;
        }
        self.terminate().unwrap_or_else(|e| panic!("{e}"));
        self.live_restore = true;
        self.spawn().unwrap_or_else(|e| panic!("{e}"));
        assert!(
            self.has_live_restore(),
            "dockerd restarted with --live-restore, but `docker info` says it is off"
        );
    }

    /// Whether the engine has `live-restore` on (`docker info`).
    fn has_live_restore(&self) -> bool {
        docker_ok(&["info", "--format", "{{.LiveRestoreEnabled}}"]) == "true"
    }

    /// Stops the engine while the test runs: SIGTERM, then SIGKILL if it has
    /// not exited after 20 s. Running containers stop with it (after
    /// [`STOP_TIMEOUT_SECS`]) but stay known to it, unless it has
    /// [`Engine::live_restore`]: then they keep running, and it finds them
    /// again when it starts. An engine this guard did
    /// not start is found by the pid in [`DOCKERD_PIDFILE`], and its command
    /// line is kept for [`Engine::start`]. Does nothing if no engine runs.
    ///
    /// Panics if it does not exit.
    pub fn stop(&mut self) {
        self.stopped = true;
        self.terminate().unwrap_or_else(|e| panic!("{e}"));
    }

    /// Starts the engine again (after [`Engine::stop`]) and waits (30 s)
    /// until it answers; does nothing if an engine answers already. An owned
    /// engine restarts with [`DOCKERD_ARGS`]; a not-owned one with the
    /// command line it had (minus a systemd `-H fd://`), either with
    /// `--live-restore` after [`Engine::live_restore`], as its own process
    /// group so that it outlives the test, logging to
    /// `{temp_dir}/lb-tests-dockerd.log`.
    ///
    /// Panics, with the tail of its log, if it does not answer in time.
    pub fn start(&mut self) {
        if !answers(PROBE_TIMEOUT) {
            self.spawn().unwrap_or_else(|e| panic!("{e}"));
        }
        self.stopped = false;
    }

    /// Makes sure [`IMAGE`] exists (importing it if it is missing or was made
    /// with other applets; quick otherwise) and returns its name.
    pub fn image(&self) -> String {
        ensure_image(IMAGE);
        IMAGE.to_owned()
    }

    /// Like [`Engine::image`] for [`OTHER_IMAGE`]: the same content under
    /// another name and image id, for "a container from another image".
    pub fn other_image(&self) -> String {
        ensure_image(OTHER_IMAGE);
        OTHER_IMAGE.to_owned()
    }

    /// Creates and starts container `name` (see [`RunOpts`]; its hostname is
    /// `name` too), first removing a leftover container of that name from a
    /// crashed run. Makes [`IMAGE`] first if the options use it.
    ///
    /// Panics if `name` is taken by a container this harness did not create,
    /// or if `docker run` fails.
    pub fn run(&self, name: &str, opts: RunOpts) -> Container {
        check_name("container", name);
        remove_stale("container", name);
        let image = match opts.image {
            Some(image) => image,
            None => self.image(),
        };
        let harness_label = format!("{HARNESS_LABEL}=1");
        let stop_timeout = STOP_TIMEOUT_SECS.to_string();
        let mut args: Vec<String> = [
            "run",
            "-d",
            "--name",
            name,
            "--hostname",
            name,
            "--label",
            &harness_label,
            "--stop-timeout",
            &stop_timeout,
        ]
        .map(str::to_owned)
        .to_vec();
        for (key, value) in &opts.labels {
            args.extend(["--label".to_owned(), format!("{key}={value}")]);
        }
        if let Some(network) = &opts.network {
            args.extend(["--network".to_owned(), network.clone()]);
        }
        if let Some(ip) = opts.ip {
            args.extend(["--ip".to_owned(), ip.to_string()]);
        }
        if opts.restart_always {
            args.extend(["--restart".to_owned(), "always".to_owned()]);
        }
        if let Some(health) = &opts.health_cmd {
            args.extend([
                "--health-cmd".to_owned(),
                health.clone(),
                "--health-interval".to_owned(),
                format!("{}ms", opts.health_interval.as_millis()),
                "--health-retries".to_owned(),
                opts.health_retries.to_string(),
                "--health-timeout".to_owned(),
                format!("{}ms", opts.health_timeout.as_millis()),
            ]);
        }
        args.push(image);
        args.extend(opts.cmd);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let id = docker_ok(&args);
        Container {
            name: name.to_owned(),
            id,
            network: opts.network,
        }
    }

    /// Creates user-defined bridge network `name` with subnet
    /// `198.19.{octet}.0/24` (gateway `.1`, on this host), first removing a
    /// leftover network of that name from a crashed run (with the harness'
    /// containers still attached to it).
    ///
    /// Panics if `name` is taken by a network this harness did not create,
    /// or if `docker network create` fails (e.g. the subnet is in use).
    pub fn network(&self, name: &str, octet: u8) -> Network {
        check_name("network", name);
        remove_stale("network", name);
        let subnet = format!("198.19.{octet}.0/24");
        docker_ok(&[
            "network",
            "create",
            "--subnet",
            &subnet,
            "--label",
            &format!("{HARNESS_LABEL}=1"),
            name,
        ]);
        Network {
            name: name.to_owned(),
            subnet,
        }
    }

    /// Starts `dockerd` (see [`Engine::start`] for which command line and
    /// log) and waits until it answers. On failure, returns a message with
    /// the tail of its log; the process (if still running) stays in
    /// `self.child` for `Drop`.
    fn spawn(&mut self) -> Result<(), String> {
        let (mut argv, log) = if self.owned {
            (harness_argv(), self.log.clone())
        } else {
            let argv = self.foreign_argv.clone().unwrap_or_else(harness_argv);
            (argv, std::env::temp_dir().join("lb-tests-dockerd.log"))
        };
        if self.live_restore && !argv.iter().any(|a| a == "--live-restore") {
            argv.push("--live-restore".to_owned());
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(|e| format!("opening {}: {e}", log.display()))?;
        let file2 = file
            .try_clone()
            .map_err(|e| format!("duplicating {}: {e}", log.display()))?;
        let mut command = Command::new(&argv[0]);
        command
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(file2);
        if !self.owned {
            // Someone else's engine: it must outlive this test (and a ^C).
            command.process_group(0);
        }
        let shown = argv.join(" ");
        let child = command
            .spawn()
            .map_err(|e| format!("cannot start `{shown}`: {e}"))?;
        self.child = Some(child);
        let mut exited = None;
        let up = poll_until(START_WAIT, || {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                exited = Some(status);
                return true;
            }
            answers(PROBE_TIMEOUT)
        });
        match (up, exited) {
            (true, None) => Ok(()),
            (_, Some(status)) => {
                self.child = None;
                Err(format!(
                    "`{shown}` exited ({status}) before answering on {DOCKER_SOCKET}; \
                     tail of {}:\n{}",
                    log.display(),
                    log_tail(&log)
                ))
            }
            (false, None) => Err(format!(
                "`{shown}` does not answer on {DOCKER_SOCKET} after {START_WAIT:?}; tail of {}:\n{}",
                log.display(),
                log_tail(&log)
            )),
        }
    }

    /// Stops the running `dockerd`, if any: SIGTERM, up to 20 s, SIGKILL.
    fn terminate(&mut self) -> Result<(), String> {
        if let Some(mut child) = self.child.take() {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return Ok(());
            }
            signal(child.id(), Signal::SIGTERM);
            if poll_until(STOP_WAIT, || !matches!(child.try_wait(), Ok(None))) {
                return Ok(());
            }
            eprintln!("dockerd still running {STOP_WAIT:?} after SIGTERM: SIGKILL");
            let _ = child.kill();
            return child
                .wait()
                .map(drop)
                .map_err(|e| format!("waiting for the killed dockerd: {e}"));
        }
        let Some(pid) = dockerd_pid() else {
            return Ok(());
        };
        if !self.owned && self.foreign_argv.is_none() {
            self.foreign_argv = Some(foreign_argv(pid));
        }
        signal(pid, Signal::SIGTERM);
        if poll_until(STOP_WAIT, || !is_dockerd(pid)) {
            return Ok(());
        }
        eprintln!("dockerd pid {pid} still running {STOP_WAIT:?} after SIGTERM: SIGKILL");
        signal(pid, Signal::SIGKILL);
        if poll_until(Duration::from_secs(5), || !is_dockerd(pid)) {
            Ok(())
        } else {
            Err(format!("dockerd pid {pid} survives SIGKILL"))
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if self.owned {
            if let Err(e) = self.terminate() {
                eprintln!("warning: stopping the engine: {e}");
            }
            if !self.docker0_existed {
                let out = run("ip", &["link", "del", "docker0"]);
                let err = text(&out.stderr);
                if !out.status.success() && !err.contains("Cannot find device") {
                    eprintln!("warning: `ip link del docker0`: {err}");
                }
            }
        } else if self.stopped || self.live_restore {
            // Someone else's engine, stopped or restarted by this test:
            // leave it running as it was found.
            if self.live_restore {
                if let Err(e) = self.terminate() {
                    eprintln!("warning: stopping the engine restarted with --live-restore: {e}");
                }
                self.live_restore = false;
            }
            if let Err(e) = self.spawn() {
                eprintln!("warning: restarting the engine this test stopped: {e}");
            }
        }
        // Fields drop next: the log directory, then the lock.
    }
}

/// `dockerd` with [`DOCKERD_ARGS`].
fn harness_argv() -> Vec<String> {
    std::iter::once(dockerd_binary())
        .chain(DOCKERD_ARGS.iter().copied())
        .map(str::to_owned)
        .collect()
}

/// The command line of `dockerd` process `pid` without a systemd socket
/// activation `-H fd://` (it listens on [`DOCKER_SOCKET`] by default then);
/// [`harness_argv`] if it cannot be read.
fn foreign_argv(pid: u32) -> Vec<String> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut argv = Vec::new();
    let mut args = raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned());
    while let Some(arg) = args.next() {
        if arg == "-H" || arg == "--host" {
            match args.next() {
                Some(host) if host.starts_with("fd://") => {}
                Some(host) => argv.extend([arg, host]),
                None => argv.push(arg),
            }
        } else if !(arg.starts_with("-H=fd://") || arg.starts_with("--host=fd://")) {
            argv.push(arg);
        }
    }
    if argv.is_empty() {
        harness_argv()
    } else {
        argv
    }
}

/// The pid in [`DOCKERD_PIDFILE`] if that process is a live `dockerd`.
fn dockerd_pid() -> Option<u32> {
    let pid = fs::read_to_string(DOCKERD_PIDFILE)
        .ok()?
        .trim()
        .parse::<u32>()
        .ok()?;
    is_dockerd(pid).then_some(pid)
}

/// Whether `pid` is a live (not zombie) process named `dockerd`.
fn is_dockerd(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "PID (COMM) STATE ...": COMM may hold spaces and parentheses.
    let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
        return false;
    };
    let comm = &stat[open + 1..close];
    let state = stat[close + 1..].split_whitespace().next().unwrap_or("");
    comm == "dockerd" && state != "Z" && state != "X"
}

/// Sends `sig` to `pid`, ignoring errors (it may be gone already).
fn signal(pid: u32, sig: Signal) {
    if let Ok(pid) = i32::try_from(pid) {
        let _ = kill(Pid::from_raw(pid), sig);
    }
}

/// The last lines of the log at `path` (or why it cannot be read).
fn log_tail(path: &Path) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let log = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = log.lines().collect();
            lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The value [`HARNESS_LABEL`] on image `tag`: its tag and applets, so that
/// an image made differently (by hand, or by an older harness) is re-made.
fn image_version(tag: &str) -> String {
    format!("{tag}:{}", IMAGE_APPLETS.join(","))
}

/// Imports image `tag` from `/bin/busybox` unless it exists with the
/// current [`image_version`].
fn ensure_image(tag: &str) {
    let version = image_version(tag);
    let format = format!("{{{{index .Config.Labels \"{HARNESS_LABEL}\"}}}}");
    let out = docker(&["image", "inspect", "--format", &format, tag]);
    if out.status.success() && text(&out.stdout) == version {
        return;
    }
    let busybox = Path::new("/bin/busybox");
    assert!(
        busybox.is_file(),
        "{} is missing: install busybox-static (`apt-get install -y busybox-static`)",
        busybox.display()
    );
    let dir = TempDir::new("image");
    let root = dir.path().join("root");
    for sub in ["bin", "www", "tmp"] {
        let path = root.join(sub);
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    }
    let tmp = root.join("tmp");
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o1777))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", tmp.display()));
    let target = root.join("bin/busybox");
    fs::copy(busybox, &target).unwrap_or_else(|e| panic!("copying {}: {e}", busybox.display()));
    for applet in IMAGE_APPLETS {
        let link = root.join("bin").join(applet);
        std::os::unix::fs::symlink("busybox", &link)
            .unwrap_or_else(|e| panic!("linking {}: {e}", link.display()));
    }
    let tarball = dir.path().join("root.tar");
    let (root_s, tar_s) = (root.to_string_lossy(), tarball.to_string_lossy());
    crate::cmd::run_ok("tar", &["-C", &root_s, "-cf", &tar_s, "."]);
    docker_ok(&[
        "import",
        "--change",
        "ENV PATH=/bin",
        "--change",
        &format!("LABEL {HARNESS_LABEL}=\"{version}\""),
        &tar_s,
        tag,
    ]);
}

/// Removes `kind` (`container` or `network`) `name` if it exists and carries
/// [`HARNESS_LABEL`] (a leftover of a crashed run; for a network, with the
/// harness' containers still attached to it); panics if it exists without.
fn remove_stale(kind: &str, name: &str) {
    let (labels, attached) = if kind == "container" {
        (".Config.Labels", "")
    } else {
        (".Labels", "{{range .Containers}}{{.Name}} {{end}}")
    };
    let format = format!("{{{{index {labels} \"{HARNESS_LABEL}\"}}}}|{attached}");
    let out = docker(&[kind, "inspect", "--format", &format, name]);
    if !out.status.success() {
        // No such object (any other problem shows when creating it).
        return;
    }
    let found = text(&out.stdout);
    let (label, attached) = found.split_once('|').unwrap_or((&found, ""));
    assert!(
        label == "1",
        "{kind} {name} exists and was not made by this harness (no label {HARNESS_LABEL}=1): \
         remove it or pick another name"
    );
    eprintln!("removing stale {kind} {name}");
    for container in attached.split_whitespace() {
        remove_stale("container", container);
    }
    if kind == "container" {
        docker_ok(&["rm", "-f", name]);
    } else {
        docker_ok(&["network", "rm", name]);
    }
}

/// How [`Engine::run`] makes a container. The default: [`IMAGE`], running
/// an HTTP server on port [`HTTP_PORT`] that answers `GET /` with the
/// container's name (its hostname) and a newline, on the default bridge, no
/// health check, no labels other than [`HARNESS_LABEL`].
#[derive(Clone, Debug)]
pub struct RunOpts {
    /// Labels (`--label KEY=VALUE`), in order.
    pub labels: Vec<(String, String)>,
    /// The image; [`IMAGE`] if `None`.
    pub image: Option<String>,
    /// The command (arguments after the image); see [`echo_cmd`].
    pub cmd: Vec<String>,
    /// A health check (`--health-cmd`, run by `sh -c` in the container).
    pub health_cmd: Option<String>,
    /// `--health-interval` (with a health check; default 1 s).
    pub health_interval: Duration,
    /// `--health-retries` (with a health check; default 1).
    pub health_retries: u32,
    /// `--health-timeout` (with a health check; default 1 s).
    pub health_timeout: Duration,
    /// The network (`--network`); the default bridge if `None`.
    pub network: Option<String>,
    /// A fixed address on that network (`--ip`; a user-defined network
    /// only); the engine picks one if `None`.
    pub ip: Option<Ipv4Addr>,
    /// `--restart always`: the engine starts it again, e.g. after its own
    /// restart.
    pub restart_always: bool,
}

impl Default for RunOpts {
    fn default() -> RunOpts {
        RunOpts {
            labels: Vec::new(),
            image: None,
            cmd: [
                "sh",
                "-c",
                &format!("hostname > /www/index.html && exec httpd -f -p {HTTP_PORT} -h /www"),
            ]
            .map(str::to_owned)
            .to_vec(),
            health_cmd: None,
            health_interval: Duration::from_secs(1),
            health_retries: 1,
            health_timeout: Duration::from_secs(1),
            network: None,
            ip: None,
            restart_always: false,
        }
    }
}

impl RunOpts {
    /// Adds label `key=value`.
    pub fn label(mut self, key: &str, value: &str) -> RunOpts {
        self.labels.push((key.to_owned(), value.to_owned()));
        self
    }

    /// Uses `image` instead of [`IMAGE`].
    pub fn image(mut self, image: &str) -> RunOpts {
        self.image = Some(image.to_owned());
        self
    }

    /// Runs `cmd` instead of the HTTP server.
    pub fn cmd(mut self, cmd: Vec<String>) -> RunOpts {
        self.cmd = cmd;
        self
    }

    /// Adds health check `cmd`, run every `interval`.
    pub fn health(mut self, cmd: &str, interval: Duration) -> RunOpts {
        self.health_cmd = Some(cmd.to_owned());
        self.health_interval = interval;
        self
    }

    /// Restart policy `always`.
    pub fn restart_always(mut self) -> RunOpts {
        self.restart_always = true;
        self
    }

    /// Attaches the container to `network` instead of the default bridge.
    pub fn network(mut self, network: &str) -> RunOpts {
        self.network = Some(network.to_owned());
        self
    }

    /// Gives the container address `ip` on its (user-defined) network.
    pub fn ip(mut self, ip: Ipv4Addr) -> RunOpts {
        self.ip = Some(ip);
        self
    }
}

/// A container made by [`Engine::run`], removed (`docker rm -f`) when
/// dropped; errors are ignored then (it may be gone already, or the engine
/// stopped).
#[derive(Debug)]
pub struct Container {
    name: String,
    id: String,
    network: Option<String>,
}

impl Container {
    /// Its name (also its hostname).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its full id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `docker container inspect --format FORMAT` of it, trimmed; panics if
    /// that fails (e.g. the container was removed).
    pub fn inspect(&self, format: &str) -> String {
        docker_ok(&["container", "inspect", "--format", format, &self.id])
    }

    /// Whether the engine reports it running.
    pub fn is_running(&self) -> bool {
        self.inspect("{{.State.Running}}") == "true"
    }

    /// Its IPv4 address on its network (the default bridge, or
    /// [`RunOpts::network`]); panics if it has none (not running).
    pub fn ip(&self) -> Ipv4Addr {
        let network = self.network.as_deref().unwrap_or("bridge");
        let addr = self.inspect(&format!(
            "{{{{with index .NetworkSettings.Networks \"{network}\"}}}}{{{{.IPAddress}}}}{{{{end}}}}"
        ));
        addr.parse().unwrap_or_else(|_| {
            panic!(
                "container {} has no IPv4 address on network {network} (got {addr:?}): not running?",
                self.name
            )
        })
    }

    /// The host pid of its main process; panics if it is not running.
    pub fn pid(&self) -> u32 {
        let pid = self.inspect("{{.State.Pid}}");
        match pid.parse::<u32>() {
            Ok(pid) if pid > 0 => pid,
            _ => panic!("container {} is not running (pid {pid:?})", self.name),
        }
    }

    /// `docker stop -t GRACE`: the engine sends its stop signal, then
    /// SIGKILL after `grace` seconds if it still runs; returns once it has
    /// stopped. Panics if that fails.
    pub fn stop(&self, grace: u32) {
        docker_ok(&["stop", "-t", &grace.to_string(), &self.id]);
    }

    /// `docker kill`: the engine SIGKILLs it; panics if that fails.
    pub fn kill(&self) {
        docker_ok(&["kill", &self.id]);
    }

    /// SIGKILLs its main process from the host, behind the engine's back
    /// (the engine then sees it exit); panics if it is not running.
    pub fn kill_process(&self) {
        let pid = self.pid();
        let raw = i32::try_from(pid).expect("a pid fits i32");
        kill(Pid::from_raw(raw), Signal::SIGKILL)
            .unwrap_or_else(|e| panic!("kill -9 {pid} (container {}): {e}", self.name));
    }

    /// `docker rm -f`: removes it now; panics if that fails.
    pub fn rm(&self) {
        docker_ok(&["rm", "-f", &self.id]);
    }

    /// `docker exec` of `cmd` in it; panics if that fails.
    pub fn exec(&self, cmd: &[&str]) -> String {
        let mut args = vec!["exec", self.id.as_str()];
        args.extend_from_slice(cmd);
        docker_ok(&args)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker_within(&["rm", "-f", &self.id], CLI_TIMEOUT);
    }
}

/// A user-defined bridge network made by [`Engine::network`], removed when
/// dropped (after its containers: declare it before them).
#[derive(Debug)]
pub struct Network {
    name: String,
    subnet: String,
}

impl Network {
    /// Its name (for [`RunOpts::network`]).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its subnet, `198.19.N.0/24`.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        match docker_within(&["network", "rm", &self.name], CLI_TIMEOUT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!(
                "warning: `docker network rm {}`: {}",
                self.name,
                text(&out.stderr)
            ),
            Err(e) => eprintln!("warning: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_cmd_is_busybox_nc() {
        assert_eq!(echo_cmd(7), ["nc", "-ll", "-p", "7", "-e", "cat"]);
    }

    #[test]
    fn names() {
        check_name("container", "lbdh-a_1.x");
        assert!(std::panic::catch_unwind(|| check_name("container", "-a")).is_err());
        assert!(std::panic::catch_unwind(|| check_name("container", "a b")).is_err());
        assert!(std::panic::catch_unwind(|| check_name("container", "")).is_err());
    }
}
