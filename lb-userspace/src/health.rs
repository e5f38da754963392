//! Active health checks of backends: a TCP connect, an HTTP `GET`, or a
//! UDP probe (see [`CheckKind`]).
//!
//! The checker never touches maps: it reports results through a
//! [`HealthSink`] (the controller's handle in the daemon), and the
//! reconciler takes a backend out of or back into its service's table.
//!
//! Each (service, backend) of a service with a [`HealthCheck`] gets its own
//! task, which checks the backend every `interval_ms` (one check in flight
//! at a time, each within `timeout_ms`). A backend starts as healthy, as
//! the reconciler assumes: a new backend takes traffic at once, and a check
//! can only take it out, after `fall` failures in a row. A backend that was
//! taken out comes back after `rise` successes in a row. Only these
//! transitions are reported, with the last check's words; every check's
//! result is kept in [`LastChecks`] for `lb backend ls` and the page, so
//! reads cost the controller nothing and results cost it no message.
//!
//! A `tcp` check is a TCP connect whatever the service's protocol (so a UDP
//! service checked that way needs a TCP listener); `http` sends `GET path`
//! over HTTP/1.1 with hyper and compares the status; `udp` sends the
//! payload from a connected UDP socket and passes on any answer (an ICMP
//! port unreachable fails it at once).

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    hash::{BuildHasher, RandomState},
    io,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use http_body_util::Empty;
use hyper::{body::Bytes, header, Request};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::{
    net::{TcpStream, UdpSocket},
    sync::{mpsc, watch},
    task::JoinSet,
    time::{self, Instant, MissedTickBehavior},
};
use tracing::{debug, info};

use crate::{
    events::rfc3339,
    model::{
        CheckKind, HealthCheck, Protocol, ServiceSpec, DEFAULT_HTTP_PATH, DEFAULT_HTTP_STATUS,
    },
};

/// A backend's change of health, as the checker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    /// The service.
    pub service: String,
    /// The backend.
    pub backend: SocketAddrV4,
    /// Passes (`true`) or fails (`false`) its check from now on.
    pub healthy: bool,
    /// What the last check found, e.g. `HTTP 503, expected 200`.
    pub detail: String,
}

/// Where health results go. The daemon uses the controller's handle;
/// tests use an `mpsc` channel.
pub trait HealthSink: Clone + Send + Sync + 'static {
    /// Reports that a backend now passes or fails its check.
    fn report(&self, report: HealthReport) -> impl Future<Output = ()> + Send;
}

impl HealthSink for mpsc::Sender<HealthReport> {
    async fn report(&self, report: HealthReport) {
        let _ = self.send(report).await;
    }
}

/// One check's outcome, as `lb backend ls`, its `--json` and the page show
/// it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckResult {
    /// Whether it passed.
    pub ok: bool,
    /// What it found, one line: `connected`, `HTTP 200`, `connect
    /// refused`, `HTTP 503, expected 200`, `timeout after 500 ms`, `no UDP
    /// answer within 500 ms`, …
    pub detail: String,
    /// When it ended, RFC 3339 in UTC with milliseconds.
    pub time: String,
    /// How long it took, in milliseconds.
    pub took_ms: u64,
}

/// A check's last result and the task that wrote it.
#[derive(Clone, Debug)]
struct LastEntry {
    task: u64,
    result: CheckResult,
}

/// The last result of every running check, by service and backend; cheap
/// to clone. Each check's task is the one writer of its entry and removes
/// it when the check stops.
#[derive(Clone, Debug, Default)]
pub struct LastChecks(Arc<Mutex<HashMap<String, HashMap<SocketAddrV4, LastEntry>>>>);

impl LastChecks {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, HashMap<SocketAddrV4, LastEntry>>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last check of `backend` in `service`, once one has ended.
    pub fn get(&self, service: &str, backend: SocketAddrV4) -> Option<CheckResult> {
        self.lock()
            .get(service)?
            .get(&backend)
            .map(|e| e.result.clone())
    }

    fn set(&self, service: &str, backend: SocketAddrV4, task: u64, result: CheckResult) {
        let mut all = self.lock();
        // A String per service, not per result: most calls find it.
        let backends = match all.get_mut(service) {
            Some(b) => b,
            None => all.entry(service.to_owned()).or_default(),
        };
        backends.insert(backend, LastEntry { task, result });
    }

    /// Forgets `task`'s entry; one written since by another task (the same
    /// backend checked anew) stays.
    fn remove(&self, service: &str, backend: SocketAddrV4, task: u64) {
        let mut all = self.lock();
        if let Some(backends) = all.get_mut(service) {
            if backends.get(&backend).is_some_and(|e| e.task == task) {
                backends.remove(&backend);
            }
            if backends.is_empty() {
                all.remove(service);
            }
        }
    }
}

/// What identifies one check. The VIP and protocol are part of it because
/// the reconciler re-creates a service whose address changes, and its new
/// backends start healthy: the check must start over with them.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct CheckKey {
    service: String,
    vip: SocketAddrV4,
    protocol: Protocol,
    backend: SocketAddrV4,
}

/// The checks the desired services call for.
fn targets<'a>(
    services: impl IntoIterator<Item = &'a ServiceSpec>,
) -> BTreeMap<CheckKey, HealthCheck> {
    services
        .into_iter()
        .filter_map(|s| s.health.as_ref().map(|h| (s, h)))
        .flat_map(|(s, h)| {
            s.backends.iter().map(move |b| {
                let key = CheckKey {
                    service: s.name.clone(),
                    vip: s.vip,
                    protocol: s.protocol,
                    backend: b.addr,
                };
                (key, h.clone())
            })
        })
        .collect()
}

/// Replaces the set of running checks; see [`spawn`]. Dropping it stops
/// every check.
#[derive(Debug)]
pub struct HealthUpdater {
    targets: watch::Sender<BTreeMap<CheckKey, HealthCheck>>,
    last: LastChecks,
}

impl HealthUpdater {
    /// Checks the backends of every service in `services` that has a health
    /// check, and only those: checks of removed services or backends stop,
    /// new ones start, and unchanged ones go on with their counts (a changed
    /// interval, timeout, rise, fall or probe applies from the next check).
    ///
    /// Never blocks, and wakes the checker only when the set of checks
    /// changed, so it can be called after every change of desired state.
    pub fn set<'a>(&self, services: impl IntoIterator<Item = &'a ServiceSpec>) {
        let new = targets(services);
        self.targets.send_if_modified(|cur| {
            if *cur == new {
                return false;
            }
            *cur = new;
            true
        });
    }

    /// The last result of each running check.
    pub fn last(&self) -> &LastChecks {
        &self.last
    }
}

/// Starts the checker with no checks; [`HealthUpdater::set`] gives it some.
/// Must be called within a Tokio runtime.
pub fn spawn(sink: impl HealthSink) -> HealthUpdater {
    let (tx, rx) = watch::channel(BTreeMap::new());
    let last = LastChecks::default();
    tokio::spawn(supervise(sink, rx, last.clone()));
    HealthUpdater { targets: tx, last }
}

/// Keeps one task per check in step with the wanted set. Each task gets its
/// parameters through a watch channel: `None` means "this check is removed".
async fn supervise<S: HealthSink>(
    sink: S,
    mut wanted: watch::Receiver<BTreeMap<CheckKey, HealthCheck>>,
    last: LastChecks,
) {
    // Seeded at random once: first checks are spread over the interval, and
    // not in the same order on every restart.
    let seed = RandomState::new();
    let mut running: BTreeMap<CheckKey, watch::Sender<Option<HealthCheck>>> = BTreeMap::new();
    // Numbers the tasks, so that one stopping never removes the result of
    // another that checks the same backend after it.
    let mut spawned = 0u64;
    // Dropped when the updater is: that aborts every check.
    let mut tasks = JoinSet::new();
    loop {
        let targets = wanted.borrow_and_update().clone();
        running.retain(|key, params| {
            let keep = targets.contains_key(key);
            if !keep {
                params.send_replace(None);
            }
            keep
        });
        for (key, hc) in targets {
            if let Some(params) = running.get(&key) {
                params.send_if_modified(|cur| {
                    let changed = cur.as_ref() != Some(&hc);
                    *cur = Some(hc);
                    changed
                });
                continue;
            }
            let (tx, rx) = watch::channel(Some(hc));
            let jitter = seed.hash_one(&key);
            spawned += 1;
            let task = Task {
                key: key.clone(),
                id: spawned,
                last: last.clone(),
            };
            tasks.spawn(check(sink.clone(), task, rx, jitter));
            running.insert(key, tx);
        }
        // Reap checks that ended, so the set does not grow with churn.
        while tasks.try_join_next().is_some() {}
        if wanted.changed().await.is_err() {
            return;
        }
    }
}

/// One check's identity and where its results go. Dropped when the check
/// ends, however it ends (removed, or aborted with the checker): that
/// removes its last result.
struct Task {
    key: CheckKey,
    id: u64,
    last: LastChecks,
}

impl Drop for Task {
    fn drop(&mut self) {
        self.last
            .remove(&self.key.service, self.key.backend, self.id);
    }
}

/// Consecutive results that contradict a backend's current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tally {
    /// Taking traffic as far as the checker is concerned.
    up: bool,
    /// Results in a row that disagree with `up`.
    streak: u32,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            up: true,
            streak: 0,
        }
    }
}

impl Tally {
    /// Counts one result; the new state when it changes.
    fn record(&mut self, ok: bool, hc: &HealthCheck) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { hc.fall } else { hc.rise };
        if self.streak < needed.max(1) {
            return None;
        }
        self.up = ok;
        self.streak = 0;
        Some(ok)
    }
}

fn interval(hc: &HealthCheck) -> Duration {
    Duration::from_millis(hc.interval_ms.max(1))
}

/// Runs one check of `addr` within the check's timeout: `Ok` with what
/// passed it, `Err` with why it failed, in a few words.
async fn probe(hc: &HealthCheck, addr: SocketAddrV4) -> Result<String, String> {
    let timeout_ms = hc.timeout_ms.max(1);
    let run = async {
        match hc.kind {
            CheckKind::Tcp => tcp(addr).await,
            CheckKind::Http => {
                let path = hc.path.as_deref().unwrap_or(DEFAULT_HTTP_PATH);
                http(addr, path, hc.status.unwrap_or(DEFAULT_HTTP_STATUS)).await
            }
            CheckKind::Udp => udp(addr, hc.payload.as_deref().unwrap_or_default()).await,
        }
    };
    match time::timeout(Duration::from_millis(timeout_ms), run).await {
        Ok(result) => result,
        Err(_) if hc.kind == CheckKind::Udp => Err(format!("no UDP answer within {timeout_ms} ms")),
        Err(_) => Err(format!("timeout after {timeout_ms} ms")),
    }
}

fn connect_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect refused".into(),
        _ => format!("connect failed: {e}"),
    }
}

/// A TCP connection, dropped as soon as it is established.
async fn tcp(addr: SocketAddrV4) -> Result<String, String> {
    TcpStream::connect(addr)
        .await
        .map(|_| "connected".into())
        .map_err(|e| connect_error(&e))
}

/// `GET path` on a connection of its own (`Connection: close`); only the
/// status is read.
async fn http(addr: SocketAddrV4, path: &str, expect: u16) -> Result<String, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| connect_error(&e))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let request = Request::get(path)
        .header(header::HOST, addr.to_string())
        .header(
            header::USER_AGENT,
            concat!("lb-health-check/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("HTTP request: {e}"))?;
    let send = sender.send_request(request);
    tokio::pin!(conn, send);
    // The connection is driven here, not spawned: it ends with the check.
    // It may finish (`Connection: close`) in the same poll that hands the
    // answer over, so the answer is still taken after it.
    let response = tokio::select! {
        biased;
        r = &mut send => r,
        c = &mut conn => match c {
            Ok(()) => send.await,
            Err(e) => return Err(format!("HTTP: {e}")),
        },
    }
    .map_err(|e| format!("HTTP: {e}"))?;
    let status = response.status().as_u16();
    if status == expect {
        Ok(format!("HTTP {status}"))
    } else {
        Err(format!("HTTP {status}, expected {expect}"))
    }
}

fn udp_error(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => "UDP port unreachable".into(),
        _ => format!("UDP: {e}"),
    }
}

/// `payload` in one datagram from a connected socket; any datagram back
/// passes.
async fn udp(addr: SocketAddrV4, payload: &str) -> Result<String, String> {
    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .await
        .map_err(|e| udp_error(&e))?;
    // Connected, so only the backend's answer is taken, and an ICMP port
    // unreachable comes back as a refused receive.
    socket.connect(addr).await.map_err(|e| udp_error(&e))?;
    socket
        .send(payload.as_bytes())
        .await
        .map_err(|e| udp_error(&e))?;
    let mut answer = [0u8; 1500];
    let n = socket.recv(&mut answer).await.map_err(|e| udp_error(&e))?;
    Ok(format!("UDP answer of {n} bytes"))
}

/// Checks one backend until its check is removed (`None`) or the checker
/// stops (the sender is gone).
async fn check<S: HealthSink>(
    sink: S,
    task: Task,
    mut params: watch::Receiver<Option<HealthCheck>>,
    jitter: u64,
) {
    let first = params.borrow_and_update().clone();
    let Some(mut hc) = first else {
        return;
    };
    let mut tally = Tally::default();
    let offset = Duration::from_millis(jitter % hc.interval_ms.max(1));
    let mut ticks = time::interval_at(Instant::now() + offset, interval(&hc));
    // A slow check delays the next one rather than causing a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let key = &task.key;
    let service = key.service.as_str();
    let backend = key.backend;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let started = Instant::now();
                let result = probe(&hc, backend).await;
                let ok = result.is_ok();
                let detail = match result {
                    Ok(d) | Err(d) => d,
                };
                if !ok {
                    debug!(service, %backend, error = detail, "health check failed");
                }
                task.last.set(service, backend, task.id, CheckResult {
                    ok,
                    detail: detail.clone(),
                    time: rfc3339(SystemTime::now()),
                    took_ms: started.elapsed().as_millis() as u64,
                });
                match tally.record(ok, &hc) {
                    Some(false) => info!(
                        service,
                        %backend,
                        failures = hc.fall,
                        error = detail,
                        "health check: backend down"
                    ),
                    Some(true) => info!(service, %backend, successes = hc.rise, detail, "health check: backend up"),
                    None => continue,
                }
                sink.report(HealthReport {
                    service: key.service.clone(),
                    backend,
                    healthy: tally.up,
                    detail,
                }).await;
            }
            changed = params.changed() => {
                if changed.is_err() {
                    // The checker is stopping (daemon shutdown): say nothing.
                    return;
                }
                let next = params.borrow_and_update().clone();
                match next {
                    Some(new) => {
                        if new.interval_ms != hc.interval_ms {
                            let period = interval(&new);
                            ticks = time::interval_at(Instant::now() + period, period);
                            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
                        }
                        hc = new;
                    }
                    None => {
                        // The check was removed while the backend was out
                        // (e.g. the service lost its health check): nothing
                        // would ever bring it back, so put it back now. For
                        // a removed backend this is a no-op.
                        if !tally.up {
                            info!(service, %backend, "health check removed: backend back in");
                            sink.report(HealthReport {
                                service: key.service.clone(),
                                backend,
                                healthy: true,
                                detail: "health check removed".into(),
                            }).await;
                        }
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};

    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;
    use crate::model::{BackendSpec, Forwarding, Origin};

    type Report = (String, SocketAddrV4, bool);

    /// A report without its words, for comparisons.
    fn brief(r: HealthReport) -> Report {
        (r.service, r.backend, r.healthy)
    }

    // A closed loopback port refuses at once, so the timeout only matters
    // for a listening one: generous, so a loaded machine raises no alarm
    // (longer than the interval, which config validation would refuse;
    // the next check then waits for this one).
    const FAST: HealthCheck = HealthCheck {
        kind: CheckKind::Tcp,
        interval_ms: 20,
        timeout_ms: 1000,
        rise: 2,
        fall: 3,
        path: None,
        status: None,
        payload: None,
    };

    fn service(name: &str, health: Option<HealthCheck>, backends: &[SocketAddrV4]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            vip: "198.18.101.1:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            table_size: 251,
            backends: backend_specs(backends),
            origin: Origin::Config,
            health,
            image: None,
            forwarding: Forwarding::Nat,
        }
    }

    fn backend_specs(addrs: &[SocketAddrV4]) -> Vec<BackendSpec> {
        addrs
            .iter()
            .map(|&addr| BackendSpec {
                addr,
                weight: 1,
                drained: false,
                via: None,
            })
            .collect()
    }

    fn v4(addr: SocketAddr) -> SocketAddrV4 {
        match addr {
            SocketAddr::V4(a) => a,
            SocketAddr::V6(_) => unreachable!("bound on 127.0.0.1"),
        }
    }

    /// A listener on loopback that accepts and closes every connection.
    async fn accepting(listener: TcpListener) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                drop(conn);
            }
        })
    }

    /// A loopback port with nothing listening on it.
    /// A loopback port that refuses connections, and the socket that keeps
    /// it: bound but not listening, so no other test running meanwhile can
    /// be given it and answer there (a port freed again could be), and
    /// `listen` opens it.
    fn closed_port() -> (tokio::net::TcpSocket, SocketAddrV4) {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).unwrap();
        let addr = v4(s.local_addr().unwrap());
        (s, addr)
    }

    async fn next(rx: &mut mpsc::Receiver<HealthReport>, within: Duration) -> Option<Report> {
        time::timeout(within, rx.recv())
            .await
            .ok()
            .flatten()
            .map(brief)
    }

    #[test]
    fn tally_needs_fall_failures_then_rise_successes() {
        let hc = FAST.clone();
        let mut t = Tally::default();
        assert_eq!(t.record(false, &hc), None);
        assert_eq!(t.record(false, &hc), None);
        // A success in between starts the count over.
        assert_eq!(t.record(true, &hc), None);
        assert_eq!(t.record(false, &hc), None);
        assert_eq!(t.record(false, &hc), None);
        assert_eq!(t.record(false, &hc), Some(false));
        assert_eq!(t.record(false, &hc), None);
        assert_eq!(t.record(true, &hc), None);
        assert_eq!(t.record(false, &hc), None);
        assert_eq!(t.record(true, &hc), None);
        assert_eq!(t.record(true, &hc), Some(true));
        assert_eq!(t.record(true, &hc), None);
    }

    #[test]
    fn only_services_with_a_check_are_checked() {
        let a: SocketAddrV4 = "198.18.103.2:8080".parse().unwrap();
        let b: SocketAddrV4 = "198.18.104.2:8080".parse().unwrap();
        let t = targets(&[
            service("checked", Some(FAST.clone()), &[a, b]),
            service("unchecked", None, &[a]),
        ]);
        let keys: Vec<(&str, SocketAddrV4)> =
            t.keys().map(|k| (k.service.as_str(), k.backend)).collect();
        assert_eq!(keys, [("checked", a), ("checked", b)]);
    }

    #[tokio::test]
    async fn a_listening_backend_is_never_reported() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = v4(listener.local_addr().unwrap());
        let server = accepting(listener).await;
        let (tx, mut rx) = mpsc::channel(16);
        let checker = spawn(tx);
        checker.set(&[service("web", Some(FAST.clone()), &[addr])]);
        // Twenty intervals: any report would be a false alarm.
        assert_eq!(next(&mut rx, Duration::from_millis(400)).await, None);
        server.abort();
    }

    #[tokio::test]
    async fn a_closed_port_goes_down_once_then_comes_back() {
        let (closed, addr) = closed_port();
        let (tx, mut rx) = mpsc::channel(16);
        let checker = spawn(tx);
        let started = Instant::now();
        checker.set(&[service("web", Some(FAST.clone()), &[addr])]);
        let report = next(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(report, Some(("web".into(), addr, false)));
        // `fall` checks, the first within one interval (jitter).
        let min = Duration::from_millis(FAST.interval_ms * u64::from(FAST.fall - 1));
        assert!(
            started.elapsed() >= min,
            "down after {:?}",
            started.elapsed()
        );
        // Reported once, however many more checks fail.
        assert_eq!(next(&mut rx, Duration::from_millis(200)).await, None);

        // Timed from before the port opens: a check's SYN sent before that
        // is refused, so the first success is at the first tick after it
        // and the `rise`-th one `rise - 1` intervals later. (Timed from
        // after the bind, a success in between made it look early.)
        let back = Instant::now();
        let listener = closed.listen(16).unwrap();
        let server = accepting(listener).await;
        let report = next(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(report, Some(("web".into(), addr, true)));
        let min = Duration::from_millis(FAST.interval_ms * u64::from(FAST.rise - 1));
        assert!(back.elapsed() >= min, "up after {:?}", back.elapsed());
        assert_eq!(next(&mut rx, Duration::from_millis(200)).await, None);
        server.abort();
    }

    #[tokio::test]
    async fn unchanged_checks_keep_their_state_and_removed_ones_release_the_backend() {
        let (_closed, down) = closed_port();
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let up = v4(listener.local_addr().unwrap());
        let server = accepting(listener).await;
        let (tx, mut rx) = mpsc::channel(16);
        let checker = spawn(tx);
        let web = service("web", Some(FAST.clone()), &[down]);
        checker.set(std::slice::from_ref(&web));
        let report = next(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(report, Some(("web".into(), down, false)));

        // Another service and backend join: the down backend's check goes
        // on as it was (no second report, no release).
        let mut web2 = web.clone();
        web2.backends.extend(backend_specs(&[up]));
        checker.set(&[web2.clone(), service("api", Some(FAST.clone()), &[up])]);
        assert_eq!(next(&mut rx, Duration::from_millis(200)).await, None);

        // The service loses its health check: the backend it took out is
        // put back, since no check will ever do it now.
        let mut unchecked = web2;
        unchecked.health = None;
        checker.set(&[unchecked]);
        let report = next(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(report, Some(("web".into(), down, true)));
        assert_eq!(next(&mut rx, Duration::from_millis(200)).await, None);
        server.abort();
    }

    #[tokio::test]
    async fn dropping_the_updater_stops_every_check() {
        let (_closed, addr) = closed_port();
        let (tx, mut rx) = mpsc::channel(16);
        let checker = spawn(tx);
        // Failing checks that would take long to report anything.
        let slow_to_fall = HealthCheck {
            fall: 1000,
            ..FAST.clone()
        };
        checker.set(&[service("web", Some(slow_to_fall), &[addr])]);
        time::sleep(Duration::from_millis(100)).await;
        drop(checker);
        // Every task held a clone of the sender: the channel closes once
        // they are all gone, with nothing reported on the way out.
        let closed = time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(closed, Ok(None));
    }

    /// A check of `kind` with a short timeout: a server that never answers
    /// fails it quickly.
    fn quick(kind: CheckKind) -> HealthCheck {
        let hc = HealthCheck {
            kind,
            interval_ms: 20,
            timeout_ms: 300,
            ..HealthCheck::default()
        };
        match kind {
            CheckKind::Tcp => hc,
            CheckKind::Http => HealthCheck {
                path: Some("/healthz".into()),
                status: Some(200),
                ..hc
            },
            CheckKind::Udp => HealthCheck {
                payload: Some("ping".into()),
                ..hc
            },
        }
    }

    /// An HTTP server on loopback that answers every request with
    /// `status`, and the request lines it got.
    async fn http_server(status: u16) -> (SocketAddrV4, mpsc::UnboundedReceiver<String>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = v4(listener.local_addr().unwrap());
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let text = String::from_utf8_lossy(&head);
                    let _ = tx.send(text.lines().next().unwrap_or_default().to_owned());
                    let answer = format!(
                        "HTTP/1.1 {status} Whatever\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                    );
                    let _ = conn.write_all(answer.as_bytes()).await;
                });
            }
        });
        (addr, rx)
    }

    /// A TCP listener on loopback that accepts and never answers.
    async fn silent_tcp() -> (SocketAddrV4, tokio::task::JoinHandle<()>) {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = v4(listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = listener.accept().await {
                held.push(conn);
            }
        });
        (addr, server)
    }

    #[tokio::test]
    async fn tcp_probe_passes_on_a_listener_and_names_a_refusal() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = v4(listener.local_addr().unwrap());
        let server = accepting(listener).await;
        assert_eq!(
            probe(&quick(CheckKind::Tcp), addr).await,
            Ok("connected".into())
        );
        server.abort();
        let (_closed, closed) = closed_port();
        assert_eq!(
            probe(&quick(CheckKind::Tcp), closed).await,
            Err("connect refused".into())
        );
    }

    #[tokio::test]
    async fn http_probe_asks_for_the_path_and_compares_the_status() {
        let (ok, mut requests) = http_server(200).await;
        assert_eq!(
            probe(&quick(CheckKind::Http), ok).await,
            Ok("HTTP 200".into())
        );
        assert_eq!(requests.recv().await.unwrap(), "GET /healthz HTTP/1.1");

        let (failing, _) = http_server(503).await;
        assert_eq!(
            probe(&quick(CheckKind::Http), failing).await,
            Err("HTTP 503, expected 200".into())
        );
        // Another expected status makes 503 the passing one.
        let want_503 = HealthCheck {
            status: Some(503),
            ..quick(CheckKind::Http)
        };
        assert_eq!(probe(&want_503, failing).await, Ok("HTTP 503".into()));
    }

    #[tokio::test]
    async fn http_probe_times_out_on_a_silent_server_and_names_a_refusal() {
        let (silent, server) = silent_tcp().await;
        let started = Instant::now();
        assert_eq!(
            probe(&quick(CheckKind::Http), silent).await,
            Err("timeout after 300 ms".into())
        );
        assert!(started.elapsed() >= Duration::from_millis(300));
        server.abort();
        let (_closed, closed) = closed_port();
        assert_eq!(
            probe(&quick(CheckKind::Http), closed).await,
            Err("connect refused".into())
        );
    }

    #[tokio::test]
    async fn udp_probe_passes_on_an_answer_and_fails_on_silence_or_a_closed_port() {
        let echo = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let echo_addr = v4(echo.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf).await {
                // Only the configured payload is answered.
                if &buf[..n] == b"ping" {
                    let _ = echo.send_to(b"pong!", from).await;
                }
            }
        });
        assert_eq!(
            probe(&quick(CheckKind::Udp), echo_addr).await,
            Ok("UDP answer of 5 bytes".into())
        );
        server.abort();

        // Bound, so no ICMP error comes back, and never answering.
        let silent = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let silent_addr = v4(silent.local_addr().unwrap());
        assert_eq!(
            probe(&quick(CheckKind::Udp), silent_addr).await,
            Err("no UDP answer within 300 ms".into())
        );

        // Nothing bound there: loopback answers with port unreachable.
        let freed = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let closed = v4(freed.local_addr().unwrap());
        drop(freed);
        assert_eq!(
            probe(&quick(CheckKind::Udp), closed).await,
            Err("UDP port unreachable".into())
        );
    }

    #[tokio::test]
    async fn a_failing_http_backend_is_reported_down_with_why_and_its_last_check_kept() {
        let (failing, _) = http_server(503).await;
        let (passing, _) = http_server(200).await;
        let (tx, mut rx) = mpsc::channel(16);
        let checker = spawn(tx);
        let hc = quick(CheckKind::Http);
        checker.set(&[service("web", Some(hc.clone()), &[failing, passing])]);
        let report = time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap();
        assert_eq!(
            report,
            Some(HealthReport {
                service: "web".into(),
                backend: failing,
                healthy: false,
                detail: "HTTP 503, expected 200".into(),
            })
        );
        let last = checker.last().get("web", failing).expect("a last check");
        assert!(!last.ok);
        assert_eq!(last.detail, "HTTP 503, expected 200");
        let last = checker.last().get("web", passing).expect("a last check");
        assert_eq!((last.ok, last.detail.as_str()), (true, "HTTP 200"));

        // A backend no longer checked has no last check.
        checker.set(&[service("web", Some(hc), &[passing])]);
        let gone = async {
            while checker.last().get("web", failing).is_some() {
                time::sleep(Duration::from_millis(10)).await;
            }
        };
        time::timeout(Duration::from_secs(5), gone).await.unwrap();
        assert!(checker.last().get("web", passing).is_some());
    }
}
