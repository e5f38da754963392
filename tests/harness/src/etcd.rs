//! A real etcd for the cluster tests: Debian's `etcd-server` (`/usr/bin/etcd`,
//! installed by `cargo xtask setup`), run in a network namespace on a
//! 198.18 address, never on etcd's default 127.0.0.1:2379 (another etcd may
//! be there), with its data in a temporary directory. It can be stopped and
//! started again on the same data (an outage), and is stopped, its data
//! removed, when dropped.
//!
//! The test reads and writes it with the same client crate lb uses.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use etcd_client::{Client, GetOptions};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};

use crate::{netns::Netns, TempDir};

/// Debian's etcd.
pub const ETCD_BINARY: &str = "/usr/bin/etcd";
/// The client port etcd listens on (at its own address).
pub const ETCD_PORT: u16 = 2379;
/// How long etcd gets to answer after a start.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long etcd gets to exit on SIGTERM before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// A running (or stopped) single-member etcd in a namespace.
#[derive(Debug)]
pub struct Etcd {
    netns: String,
    netns_path: PathBuf,
    addr: Ipv4Addr,
    child: Option<Child>,
    dir: TempDir,
}

impl Etcd {
    /// Starts etcd in `netns`, listening on `addr` (which must be one of the
    /// namespace's addresses), and waits until it answers.
    pub fn start(netns: &Netns, addr: Ipv4Addr) -> Etcd {
        assert!(
            PathBuf::from(ETCD_BINARY).is_file(),
            "{ETCD_BINARY} is missing: run `cargo xtask setup` (Debian's etcd-server)"
        );
        let mut etcd = Etcd {
            netns: netns.name().to_owned(),
            netns_path: netns.path(),
            addr,
            child: None,
            dir: TempDir::new("etcd"),
        };
        etcd.resume();
        etcd
    }

    /// The client URL lb's `[cluster] etcd` names.
    pub fn url(&self) -> String {
        format!("http://{}:{ETCD_PORT}", self.addr)
    }

    /// Starts it again on its data (after [`Etcd::stop`]) and waits until it
    /// answers.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "etcd is already running");
        let peer = format!("http://{}:{}", self.addr, ETCD_PORT + 1);
        let client = self.url();
        let data = self.dir.path().join("data");
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("etcd's log file");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.netns, ETCD_BINARY])
            .args(["--name", "lb-test"])
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client])
            .args(["--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("lb-test={peer}")])
            // No metrics or debug listener on a default port.
            .args(["--listen-metrics-urls", ""])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {ETCD_BINARY}: {e}"));
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while self.try_status().is_none() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                panic!("etcd exited ({status}); its log:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not answer within {START_TIMEOUT:?}; its log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops it (SIGTERM, then SIGKILL after a grace), keeping its data.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            // `ip netns exec` execs etcd: this pid is etcd's.
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    /// What etcd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `f` with a client connected from inside etcd's namespace.
    fn with_client<R: Send>(
        &self,
        f: impl AsyncFnOnce(&mut Client) -> Result<R, etcd_client::Error> + Send,
    ) -> Result<R, etcd_client::Error> {
        let url = self.url();
        let path = self.netns_path.clone();
        thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = File::open(&path).expect("etcd's namespace");
                    nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET)
                        .expect("entering etcd's namespace");
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("a tokio runtime");
                    rt.block_on(async move {
                        let options = etcd_client::ConnectOptions::new()
                            .with_connect_timeout(Duration::from_secs(2))
                            .with_timeout(Duration::from_secs(3));
                        let mut client = Client::connect([url], Some(options)).await?;
                        f(&mut client).await
                    })
                })
                .join()
                .expect("the etcd client thread")
        })
    }

    /// The cluster's revision, or `None` when etcd does not answer.
    fn try_status(&self) -> Option<i64> {
        self.with_client(async |c| c.status().await)
            .ok()
            .and_then(|s| s.header().map(|h| h.revision()))
    }

    /// Every key under `prefix` with its value, in key order.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        let prefix = prefix.to_owned();
        self.with_client(async move |c| {
            let r = c.get(prefix, Some(GetOptions::new().with_prefix())).await?;
            Ok(r.kvs()
                .iter()
                .map(|kv| {
                    (
                        String::from_utf8_lossy(kv.key()).into_owned(),
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    )
                })
                .collect())
        })
        .unwrap_or_else(|e| panic!("reading etcd: {e}"))
    }

    /// The ids of the leases etcd holds.
    pub fn leases(&self) -> Vec<i64> {
        self.with_client(async |c| Ok(c.leases().await?.leases().iter().map(|l| l.id()).collect()))
            .unwrap_or_else(|e| panic!("listing etcd's leases: {e}"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}
