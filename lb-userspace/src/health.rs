//! Active TCP health checks of backends.
//!
//! The checker never touches maps: it reports results through a
//! [`HealthSink`] (the controller's handle in the daemon), and the
//! reconciler takes a backend out of or back into its service's table.
//!
//! Each (service, backend) of a service with a [`HealthCheck`] gets its own
//! task, which tries a TCP connection to the backend every `interval_ms`
//! (one attempt in flight at a time, closed as soon as it is established).
//! A backend starts as healthy, as the reconciler assumes: a new backend
//! takes traffic at once, and a check can only take it out, after `fall`
//! failures in a row. A backend that was taken out comes back after `rise`
//! successes in a row. Only these transitions are reported.
//!
//! The check is a TCP connect to the backend's address and port whatever the
//! service's protocol: a UDP service's check needs a TCP listener there.

use std::{
    collections::BTreeMap,
    future::Future,
    hash::{BuildHasher, RandomState},
    net::SocketAddrV4,
    time::Duration,
};

use tokio::{
    net::TcpStream,
    sync::{mpsc, watch},
    task::JoinSet,
    time::{self, Instant, MissedTickBehavior},
};
use tracing::{debug, info};

use crate::model::{HealthCheck, Protocol, ServiceSpec};

/// Where health results go. The daemon uses the controller's handle;
/// tests use an `mpsc` channel.
pub trait HealthSink: Clone + Send + Sync + 'static {
    /// Reports that `backend` of `service` now passes (`true`) or fails
    /// (`false`) its check.
    fn report(
        &self,
        service: String,
        backend: SocketAddrV4,
        healthy: bool,
    ) -> impl Future<Output = ()> + Send;
}

impl HealthSink for mpsc::Sender<(String, SocketAddrV4, bool)> {
    async fn report(&self, service: String, backend: SocketAddrV4, healthy: bool) {
        let _ = self.send((service, backend, healthy)).await;
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
        .filter_map(|s| s.health.map(|h| (s, h)))
        .flat_map(|(s, h)| {
            s.backends.iter().map(move |b| {
                let key = CheckKey {
                    service: s.name.clone(),
                    vip: s.vip,
                    protocol: s.protocol,
                    backend: b.addr,
                };
                (key, h)
            })
        })
        .collect()
}

/// Replaces the set of running checks; see [`spawn`]. Dropping it stops
/// every check.
#[derive(Debug)]
pub struct HealthUpdater {
    targets: watch::Sender<BTreeMap<CheckKey, HealthCheck>>,
}

impl HealthUpdater {
    /// Checks the backends of every service in `services` that has a health
    /// check, and only those: checks of removed services or backends stop,
    /// new ones start, and unchanged ones go on with their counts (a changed
    /// interval, timeout, rise or fall applies from the next check).
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
}

/// Starts the checker with no checks; [`HealthUpdater::set`] gives it some.
/// Must be called within a Tokio runtime.
pub fn spawn(sink: impl HealthSink) -> HealthUpdater {
    let (tx, rx) = watch::channel(BTreeMap::new());
    tokio::spawn(supervise(sink, rx));
    HealthUpdater { targets: tx }
}

/// Keeps one task per check in step with the wanted set. Each task gets its
/// parameters through a watch channel: `None` means "this check is removed".
async fn supervise<S: HealthSink>(
    sink: S,
    mut wanted: watch::Receiver<BTreeMap<CheckKey, HealthCheck>>,
) {
    // Seeded at random once: first checks are spread over the interval, and
    // not in the same order on every restart.
    let seed = RandomState::new();
    let mut running: BTreeMap<CheckKey, watch::Sender<Option<HealthCheck>>> = BTreeMap::new();
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
                    let changed = *cur != Some(hc);
                    *cur = Some(hc);
                    changed
                });
                continue;
            }
            let (tx, rx) = watch::channel(Some(hc));
            let jitter = seed.hash_one(&key);
            tasks.spawn(check(sink.clone(), key.clone(), rx, jitter));
            running.insert(key, tx);
        }
        // Reap checks that ended, so the set does not grow with churn.
        while tasks.try_join_next().is_some() {}
        if wanted.changed().await.is_err() {
            return;
        }
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

/// Tries one connection; the error says why it failed.
async fn probe(addr: SocketAddrV4, timeout_ms: u64) -> Result<(), String> {
    match time::timeout(
        Duration::from_millis(timeout_ms.max(1)),
        TcpStream::connect(addr),
    )
    .await
    {
        // Dropped at once: the check only needs the handshake.
        Ok(Ok(_stream)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no connection within {timeout_ms} ms")),
    }
}

/// Checks one backend until its check is removed (`None`) or the checker
/// stops (the sender is gone).
async fn check<S: HealthSink>(
    sink: S,
    key: CheckKey,
    mut params: watch::Receiver<Option<HealthCheck>>,
    jitter: u64,
) {
    let first = *params.borrow_and_update();
    let Some(mut hc) = first else {
        return;
    };
    let mut tally = Tally::default();
    let offset = Duration::from_millis(jitter % hc.interval_ms.max(1));
    let mut ticks = time::interval_at(Instant::now() + offset, interval(&hc));
    // A slow check delays the next one rather than causing a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let service = key.service.as_str();
    let backend = key.backend;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                let result = probe(backend, hc.timeout_ms).await;
                if let Err(error) = &result {
                    debug!(service, %backend, error, "health check failed");
                }
                match tally.record(result.is_ok(), &hc) {
                    Some(false) => info!(
                        service,
                        %backend,
                        failures = hc.fall,
                        error = result.err().unwrap_or_default(),
                        "health check: backend down"
                    ),
                    Some(true) => info!(service, %backend, successes = hc.rise, "health check: backend up"),
                    None => continue,
                }
                sink.report(key.service.clone(), backend, tally.up).await;
            }
            changed = params.changed() => {
                if changed.is_err() {
                    // The checker is stopping (daemon shutdown): say nothing.
                    return;
                }
                let next = *params.borrow_and_update();
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
                            sink.report(key.service.clone(), backend, true).await;
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

    use tokio::net::TcpListener;

    use super::*;
    use crate::model::{BackendSpec, Origin};

    type Report = (String, SocketAddrV4, bool);

    // A closed loopback port refuses at once, so the timeout only matters
    // for a listening one: generous, so a loaded machine raises no alarm
    // (longer than the interval, which config validation would refuse;
    // the next check then waits for this one).
    const FAST: HealthCheck = HealthCheck {
        interval_ms: 20,
        timeout_ms: 1000,
        rise: 2,
        fall: 3,
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

    async fn next(rx: &mut mpsc::Receiver<Report>, within: Duration) -> Option<Report> {
        time::timeout(within, rx.recv()).await.ok().flatten()
    }

    #[test]
    fn tally_needs_fall_failures_then_rise_successes() {
        let hc = FAST;
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
            service("checked", Some(FAST), &[a, b]),
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
        checker.set(&[service("web", Some(FAST), &[addr])]);
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
        checker.set(&[service("web", Some(FAST), &[addr])]);
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
        let web = service("web", Some(FAST), &[down]);
        checker.set(std::slice::from_ref(&web));
        let report = next(&mut rx, Duration::from_secs(5)).await;
        assert_eq!(report, Some(("web".into(), down, false)));

        // Another service and backend join: the down backend's check goes
        // on as it was (no second report, no release).
        let mut web2 = web.clone();
        web2.backends.extend(backend_specs(&[up]));
        checker.set(&[web2.clone(), service("api", Some(FAST), &[up])]);
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
        let slow_to_fall = HealthCheck { fall: 1000, ..FAST };
        checker.set(&[service("web", Some(slow_to_fall), &[addr])]);
        time::sleep(Duration::from_millis(100)).await;
        drop(checker);
        // Every task held a clone of the sender: the channel closes once
        // they are all gone, with nothing reported on the way out.
        let closed = time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(closed, Ok(None));
    }
}
