//! The benchmark's server processes: nginx in a backend namespace and
//! haproxy in the host, each a guard that stops its process (and nginx's
//! workers) when dropped, also on panic.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use lb_harness::netns::Netns;

use super::cpu::{children_of, proc_stat};

/// How long a stopped process gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a server gets to start listening.
const START_LIMIT: Duration = Duration::from_secs(10);

/// Makes the spawned process get SIGKILL if the thread that spawned it dies
/// (a benchmark killed outright leaves no server behind; nginx's workers,
/// which do not inherit it, are stopped by [`Nginx`]'s guard).
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: prctl is async-signal-safe; nothing else runs in the child.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Sends `sig` to `pid` if it is still the process that started at `start`.
fn signal_if_same(pid: i32, start: u64, sig: libc::c_int) {
    if proc_stat(pid).is_some_and(|s| s.start == start) {
        // SAFETY: kill with a checked pid; a vanished pid only gives ESRCH.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// SIGTERMs `child`, waits up to [`STOP_GRACE`], then SIGKILLs it and
/// `extra` (processes it started); always reaps `child`.
fn stop(child: &mut Child, extra: &[(i32, u64)]) {
    if matches!(child.try_wait(), Ok(None)) {
        // SAFETY: our own unreaped child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        if matches!(child.try_wait(), Ok(None)) {
            eprintln!(
                "bench: pid {} still running after SIGTERM: SIGKILL",
                child.id()
            );
            let _ = child.kill();
        }
        let _ = child.wait();
    }
    for &(pid, start) in extra {
        let deadline = Instant::now() + STOP_GRACE;
        while proc_stat(pid).is_some_and(|s| s.start == start) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        signal_if_same(pid, start, libc::SIGKILL);
    }
}

/// Waits (bounded) until a TCP connection to `addr` from the host succeeds;
/// panics with `what`'s log if `child` exits first or time runs out.
fn wait_listening(child: &mut Child, addr: SocketAddrV4, what: &str, log: &Path) {
    let deadline = Instant::now() + START_LIMIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{what} exited ({status}) before listening on {addr}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        if TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_millis(200)).is_ok() {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{what} is not listening on {addr} after {START_LIMIT:?}; its log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// A file for a process's stdout and stderr.
fn log_file(path: &Path) -> (Stdio, Stdio) {
    let f = File::create(path).unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
    let g = f
        .try_clone()
        .unwrap_or_else(|e| panic!("cloning {}: {e}", path.display()));
    (Stdio::from(f), Stdio::from(g))
}

/// nginx's config: one worker, `return 200` with a small body, no access
/// log, everything it writes inside `dir`.
pub fn nginx_conf(dir: &Path, port: u16) -> String {
    let d = dir.display();
    format!(
        "worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile 8192;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 0.0.0.0:{port};
        default_type text/plain;
        location / {{ return 200 \"ok\\n\"; }}
    }}
}}
"
    )
}

/// nginx (master and one worker) serving in a backend namespace. Stopped
/// (master SIGTERM, then SIGKILL for whatever is left) when dropped.
#[derive(Debug)]
pub struct Nginx {
    child: Child,
    workers: Vec<(i32, u64)>,
    dir: PathBuf,
}

impl Nginx {
    /// Writes its config to `dir` (created), starts `ip netns exec NS nginx
    /// -p dir -c dir/nginx.conf -g 'daemon off;'` and waits until
    /// `addr:port` accepts connections from the host.
    pub fn start(ns: &Netns, dir: &Path, addr: Ipv4Addr, port: u16) -> Nginx {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let conf = dir.join("nginx.conf");
        std::fs::write(&conf, nginx_conf(dir, port))
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
        let log = dir.join("nginx.out");
        let (out, err) = log_file(&log);
        let (p, c, e) = (
            dir.display().to_string(),
            conf.display().to_string(),
            dir.join("error.log").display().to_string(),
        );
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            ns.name(),
            "nginx",
            "-p",
            &p,
            "-e",
            &e,
            "-c",
            &c,
            "-g",
            "daemon off;",
        ])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start nginx in {}: {e}", ns.name()));
        let mut nginx = Nginx {
            child,
            workers: Vec::new(),
            dir: dir.to_owned(),
        };
        let what = format!("nginx in {}", ns.name());
        wait_listening(
            &mut nginx.child,
            SocketAddrV4::new(addr, port),
            &what,
            &dir.join("error.log"),
        );
        let master = nginx.child.id() as i32;
        let deadline = Instant::now() + START_LIMIT;
        loop {
            nginx.workers = children_of(master)
                .into_iter()
                .map(|(pid, s)| (pid, s.start))
                .collect();
            if !nginx.workers.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{what}: no worker process");
            thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    /// The master's and workers' pids.
    pub fn pids(&self) -> Vec<i32> {
        let mut v = vec![self.child.id() as i32];
        v.extend(self.workers.iter().map(|(p, _)| *p));
        v
    }

    /// Its directory (config, pid file, logs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        stop(&mut self.child, &self.workers);
    }
}

/// haproxy's config: `mode tcp`, `balance roundrobin` over `backends`,
/// listening on `bind`, with `maxconn` global and per frontend.
pub fn haproxy_conf(bind: SocketAddrV4, backends: &[SocketAddrV4], maxconn: u64) -> String {
    let mut servers = String::new();
    for (i, b) in backends.iter().enumerate() {
        servers.push_str(&format!("    server b{i} {b}\n"));
    }
    format!(
        "global
    maxconn {maxconn}

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend bench
    bind {bind}
    maxconn {maxconn}
    default_backend nginx

backend nginx
    balance roundrobin
{servers}"
    )
}

/// The largest `maxconn` haproxy 2.6 accepts under this process's file
/// descriptor limit (which it inherits): it needs two descriptors a
/// connection and some of its own; capped at 4096 (wrk opens 32).
pub fn haproxy_maxconn() -> u64 {
    // SAFETY: all-zero is a valid rlimit; getrlimit fills it.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer.
    let hard = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_max
    } else {
        1024
    };
    (hard.saturating_sub(256) / 2).clamp(64, 4096)
}

/// haproxy in the host namespace. Stopped when dropped.
#[derive(Debug)]
pub struct Haproxy {
    child: Child,
}

impl Haproxy {
    /// Writes `haproxy.cfg` to `dir`, starts `haproxy -db -f` it and waits
    /// until `bind` accepts connections.
    pub fn start(dir: &Path, bind: SocketAddrV4, backends: &[SocketAddrV4]) -> Haproxy {
        let conf = dir.join("haproxy.cfg");
        std::fs::write(&conf, haproxy_conf(bind, backends, haproxy_maxconn()))
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
        let log = dir.join("haproxy.out");
        let (out, err) = log_file(&log);
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db")
            .arg("-f")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        die_with_parent(&mut cmd);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start haproxy: {e}"));
        let mut h = Haproxy { child };
        wait_listening(&mut h.child, bind, "haproxy", &log);
        h
    }

    /// Its pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        stop(&mut self.child, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_config_balances_round_robin_in_tcp_mode() {
        let c = haproxy_conf(
            "198.18.101.1:80".parse().expect("addr"),
            &[
                "198.18.103.2:80".parse().expect("addr"),
                "198.18.104.2:80".parse().expect("addr"),
            ],
            1000,
        );
        assert!(c.contains("mode tcp"));
        assert!(c.contains("balance roundrobin"));
        assert!(c.contains("bind 198.18.101.1:80"));
        assert!(c.contains("server b1 198.18.104.2:80"));
        assert!(c.contains("maxconn 1000"));
    }

    #[test]
    fn maxconn_fits_the_descriptor_limit() {
        let m = haproxy_maxconn();
        assert!((64..=4096).contains(&m));
    }

    #[test]
    fn nginx_config_keeps_everything_in_its_directory() {
        let c = nginx_conf(Path::new("/tmp/x"), 80);
        assert!(c.contains("pid /tmp/x/nginx.pid;"));
        assert!(c.contains("worker_processes 1;"));
        assert!(c.contains("access_log off;"));
        assert!(c.contains("listen 0.0.0.0:80;"));
    }
}
