//! The controller: the one task that owns the [`Reconciler`] (and so the
//! maps) and the [`Desired`] state. The admin API, the health checker and
//! the Docker watcher never touch either: they send a [`Request`], a health
//! result or a Docker update through a [`Handle`], and [`Controller::run`]
//! carries them out one at a time.
//!
//! Docker updates that arrive together (a deploy starting 100 containers)
//! are taken in together: each service's table is rebuilt once for the
//! batch. A lone event is handled at once, nothing waits for a batch.
//!
//! Every change it commits is published to the change log ([`EventLog`])
//! from here, the one place that knows both what changed and why.
//!
//! Reads (counters, flows, status) are answered off this task: the
//! controller takes a cheap view of the membership and a blocking thread
//! fills it in through the [`Reader`], so a scrape never holds up a change.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::{
    api::types::{
        AttachmentStatus, BackendInfo, ContainersStatus, InterfaceStatus, NewBackend, NewService,
        ServiceInfo, Stats, Status,
    },
    cluster::{keys::BackendRecord, remote::RemoteSet, LocalSet},
    docker::{DockerSink, DockerUpdate, Tracker},
    events::{self, Cause, Change, EventKind, EventLog, Marks, Reason},
    health::{HealthReport, HealthSink, HealthUpdater},
    model::{Refusal, RefusalKind},
    reconcile::{Reader, Reconciler, ServiceView},
    state::{Desired, Flush},
};

/// What a client asks of the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// All services.
    ListServices,
    /// Create a service.
    AddService(NewService),
    /// Remove an API-created service.
    RemoveService(String),
    /// A service's backends.
    ListBackends(String),
    /// Add backends to a service, all or none.
    AddBackends(String, Vec<NewBackend>),
    /// Replace a service's declared backends, all or none.
    SetBackends(String, Vec<NewBackend>),
    /// Remove a backend (service, address).
    RemoveBackend(String, String),
    /// Drain a backend (service, address).
    DrainBackend(String, String),
    /// Put a drained backend back (service, address).
    UndrainBackend(String, String),
    /// Change a backend's weight in place (service, address, weight).
    SetWeight(String, String, u32),
    /// Counters, of one service or all.
    Stats(Option<String>),
    /// Daemon status.
    Status,
}

/// The daemon's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// Services.
    Services(Vec<ServiceInfo>),
    /// One service.
    Service(ServiceInfo),
    /// Backends.
    Backends(Vec<BackendInfo>),
    /// Counters.
    Stats(Stats),
    /// Status.
    Status(Box<Status>),
    /// Done, nothing to report.
    Done,
}

/// One message to the control task.
#[derive(Debug)]
pub enum Input {
    /// A client's request and where to send the answer.
    Call(Request, oneshot::Sender<Result<Response, Refusal>>),
    /// A backend's change of health.
    Health(HealthReport),
    /// What the Docker watcher saw.
    Docker(DockerUpdate),
    /// Every other node's backends, as etcd now holds them (cluster mode).
    Remote(RemoteSet),
}

/// The sending side of the control task's inbox; cheap to clone.
#[derive(Clone, Debug)]
pub struct Handle {
    tx: mpsc::Sender<Input>,
}

impl Handle {
    /// A handle and the receiver the control task reads.
    pub fn new() -> (Self, mpsc::Receiver<Input>) {
        let (tx, rx) = mpsc::channel(64);
        (Self { tx }, rx)
    }

    /// Sends a request and waits for its answer.
    pub async fn call(&self, request: Request) -> Result<Response, Refusal> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Input::Call(request, tx))
            .await
            .map_err(|_| Refusal::failed("the daemon is shutting down".into()))?;
        rx.await
            .map_err(|_| Refusal::failed("the daemon is shutting down".into()))?
    }

    /// Reports what the Docker watcher saw.
    pub async fn docker(&self, update: DockerUpdate) {
        let _ = self.tx.send(Input::Docker(update)).await;
    }

    /// Reports the other nodes' backends.
    pub async fn remote(&self, set: RemoteSet) {
        let _ = self.tx.send(Input::Remote(set)).await;
    }

    /// Reports a backend's change of health.
    pub async fn health(&self, report: HealthReport) {
        let _ = self.tx.send(Input::Health(report)).await;
    }
}

impl HealthSink for Handle {
    async fn report(&self, report: HealthReport) {
        self.health(report).await;
    }
}

impl DockerSink for Handle {
    async fn report(&self, update: DockerUpdate) {
        self.docker(update).await;
    }
}

/// What `status` reports that only the daemon knows.
#[derive(Clone, Debug)]
pub struct DaemonInfo {
    /// When the daemon started.
    pub started: Instant,
    /// Whether it adopted a running data path.
    pub adopted: bool,
    /// bpffs directory of its pins.
    pub pin_path: String,
    /// External interfaces and how the forward path is attached there.
    pub externals: Vec<InterfaceStatus>,
}

/// The change log's event for the Docker engine client's status going from
/// `was` to `now`, if any. While the engine is away the client retries and
/// reports each failed attempt (for `lb status`); only the first is an
/// event, so a restart of the engine shows as one `docker_lost` and one
/// `docker_connected`.
fn status_event(was: &str, now: &str) -> Option<EventKind> {
    let lost = |s: &str| s.starts_with("disconnected");
    if now.starts_with("connected") {
        Some(EventKind::DockerConnected)
    } else if lost(now) && !lost(was) {
        Some(EventKind::DockerLost)
    } else {
        None
    }
}

/// How often routes, neighbours and veth peers are checked again.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Most inbox messages taken in one go.
const BATCH_MAX: usize = 1024;

type Reply = oneshot::Sender<Result<Response, Refusal>>;

/// Owns the reconciler and the desired state; carries out requests.
pub struct Controller {
    rec: Reconciler,
    desired: Desired,
    docker: Tracker,
    info: DaemonInfo,
    reader: Arc<Reader>,
    health: Option<HealthUpdater>,
    events: EventLog,
    /// The services as last published to `events`.
    marks: Marks,
    /// The last apply failed: the maps' state is unknown, so the next one
    /// applies every service, not only those that changed.
    apply_all: bool,
    /// Other nodes' backends received and not yet committed.
    remote_pending: Option<RemoteSet>,
    /// The node (and container) behind each applied remote backend, by
    /// service and address.
    remote_names: BTreeMap<(String, SocketAddrV4), (String, Option<String>)>,
    /// Remote backends the last set left out (the maps were full).
    remote_left_out: usize,
    /// Where this node's own backends are published (cluster mode).
    local: Option<watch::Sender<LocalSet>>,
}

impl Controller {
    /// Takes over a reconciler that has applied `desired`, whose Docker
    /// backends `docker` assigned. `reader` answers reads; every change is
    /// published to `events`.
    pub fn new(
        rec: Reconciler,
        desired: Desired,
        docker: Tracker,
        info: DaemonInfo,
        reader: Reader,
        events: EventLog,
    ) -> Self {
        Self {
            rec,
            desired,
            docker,
            info,
            reader: Arc::new(reader),
            health: None,
            events,
            marks: Marks::new(),
            apply_all: false,
            remote_pending: None,
            remote_names: BTreeMap::new(),
            remote_left_out: 0,
            local: None,
        }
    }

    /// Publishes this node's own backends to `local` after every change
    /// (cluster mode), starting now.
    pub fn with_cluster(mut self, local: watch::Sender<LocalSet>) -> Self {
        self.local = Some(local);
        self.publish_local();
        self
    }

    /// Sends this node's own backends to the cluster task, if they changed.
    fn publish_local(&self) {
        let Some(tx) = &self.local else { return };
        let set: LocalSet = self
            .desired
            .local_backends()
            .into_iter()
            .map(|(service, backends)| {
                let records = backends
                    .iter()
                    .map(|b| {
                        let record = BackendRecord {
                            version: crate::cluster::keys::VERSION,
                            weight: b.weight,
                            drained: b.drained,
                            container: self.docker.container(&service, b.addr).map(str::to_owned),
                        };
                        (b.addr, record)
                    })
                    .collect();
                (service, records)
            })
            .collect();
        tx.send_if_modified(|now| {
            let changed = *now != set;
            if changed {
                *now = set;
            }
            changed
        });
    }

    /// Takes in the other nodes' backends.
    fn take_remote(&mut self, set: RemoteSet) {
        self.remote_names = set
            .iter()
            .flat_map(|(service, list)| {
                list.iter().map(|r| {
                    (
                        (service.clone(), r.spec.addr),
                        (r.node.clone(), r.container.clone()),
                    )
                })
            })
            .collect();
        let specs = set
            .into_iter()
            .map(|(service, list)| (service, list.into_iter().map(|r| r.spec).collect()))
            .collect();
        let left_out = self.desired.set_remote(specs);
        if left_out > 0 && left_out != self.remote_left_out {
            warn!(
                left_out,
                "other nodes' backends left out: datapath.max_backends reached"
            );
        }
        self.remote_left_out = left_out;
    }

    /// Keeps `health`'s checks in step with the desired services.
    pub fn with_health(mut self, health: HealthUpdater) -> Self {
        health.set(self.desired.specs());
        self.health = Some(health);
        self
    }

    /// Carries out what arrives in `inbox`, re-checks delivery every
    /// [`REFRESH_EVERY`], until `shutdown` completes. Then answers what was
    /// already accepted and gives the reconciler back, for shutdown.
    ///
    /// The change log starts with `daemon_started` and the services and
    /// backends the daemon starts with, and ends with `daemon_stopping`,
    /// after which it is closed (every stream of it ends).
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Input>,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Reconciler {
        self.events.emit(Change {
            detail: Some(format!("lb {}", env!("CARGO_PKG_VERSION"))),
            ..Change::new(EventKind::DaemonStarted)
        });
        self.publish(None, Reason::Config);
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(REFRESH_EVERY);
        tick.tick().await;
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                n = inbox.recv_many(&mut batch, BATCH_MAX) => {
                    if n == 0 {
                        break;
                    }
                    self.handle_batch(std::mem::take(&mut batch)).await;
                }
                _ = tick.tick() => {
                    if let Err(e) = self.rec.refresh().await {
                        warn!(error = %format!("{e:#}"), "refresh failed; retrying at the next tick");
                    }
                    self.publish(None, Reason::Reachable);
                }
            }
        }
        // No more health results: the checks stop with their updater.
        self.health = None;
        inbox.close();
        while let Ok(input) = inbox.try_recv() {
            self.handle_batch(vec![input]).await;
        }
        self.events.emit(Change::new(EventKind::DaemonStopping));
        self.events.close();
        self.rec
    }

    /// Publishes to the change log how the services (all, or those
    /// named) differ from what it last published; `default` is the reason
    /// of a change no more specific rule explains (see [`Cause`]).
    fn publish(&mut self, services: Option<&BTreeSet<String>>, default: Reason) {
        self.publish_noting(services, default, None);
    }

    /// [`Self::publish`], and the health check's words (`note`) as the
    /// detail of that backend's change for the health check.
    fn publish_noting(
        &mut self,
        services: Option<&BTreeSet<String>>,
        default: Reason,
        note: Option<(SocketAddrV4, &str)>,
    ) {
        let docker = self.docker.take_causes();
        let tracker = &self.docker;
        let after = self.rec.marks(services, |s, addr| {
            tracker.container(s, addr).map(str::to_owned)
        });
        let cause = Cause {
            default,
            docker: &docker,
        };
        let before = match services {
            Some(names) => names
                .iter()
                .filter_map(|n| self.marks.remove_entry(n.as_str()))
                .collect(),
            None => std::mem::take(&mut self.marks),
        };
        for mut change in events::diff(&before, &after, &cause) {
            if let Some((addr, detail)) = note {
                let noted = change.reason == Some(Reason::HealthCheck)
                    && change.backend.as_deref() == Some(addr.to_string().as_str());
                if noted {
                    change.detail = Some(detail.to_owned());
                }
            }
            self.events.emit(change);
        }
        self.marks.extend(after);
    }

    /// Publishes what the Docker engine client says about its connection
    /// (before the tracker takes the new status in).
    fn docker_status(&self, status: &str) {
        let Some(kind) = status_event(self.docker.status(), status) else {
            return;
        };
        self.events.emit(Change {
            detail: Some(status.to_owned()),
            ..Change::new(kind)
        });
    }

    /// Handles messages in arrival order. Docker updates and changes that
    /// arrive together are committed together: each change checked and
    /// staged on its own (a refused one changes nothing), the state file
    /// written once, the maps applied once, then every caller answered.
    /// Reads and health results keep their place in the order.
    async fn handle_batch(&mut self, batch: Vec<Input>) {
        let mut docker_changed = false;
        let mut changes: Vec<(Request, Reply)> = Vec::new();
        // Whether anything may have changed the desired services.
        let mut touched = false;
        for input in batch {
            match input {
                Input::Docker(update) => {
                    if let DockerUpdate::Status(s) = &update {
                        self.docker_status(s);
                    }
                    docker_changed |= self.docker.update(update);
                }
                Input::Remote(set) => self.remote_pending = Some(set),
                Input::Call(req, reply) if req.is_change() => changes.push((req, reply)),
                // A read or a health result: what came before it is
                // committed first, so it sees it.
                Input::Call(req, reply) => {
                    touched |= self.commit_pending(&mut changes, &mut docker_changed).await;
                    self.call(req, reply).await;
                }
                Input::Health(report) => {
                    touched |= self.commit_pending(&mut changes, &mut docker_changed).await;
                    self.health_result(&report);
                }
            }
        }
        touched |= self.commit_pending(&mut changes, &mut docker_changed).await;
        if let (Some(h), true) = (&self.health, touched) {
            // Only a different set of checks wakes the checker.
            h.set(self.desired.specs());
        }
    }

    /// Commits what is pending and empties it; whether there was anything.
    async fn commit_pending(
        &mut self,
        changes: &mut Vec<(Request, Reply)>,
        docker_changed: &mut bool,
    ) -> bool {
        let any = !changes.is_empty() || *docker_changed || self.remote_pending.is_some();
        self.commit(std::mem::take(changes), std::mem::take(docker_changed))
            .await;
        any
    }

    /// Carries out `changes` and the Docker news with one save and one apply.
    async fn commit(&mut self, changes: Vec<(Request, Reply)>, docker_changed: bool) {
        let remote = self.remote_pending.take();
        if changes.is_empty() && !docker_changed && remote.is_none() {
            return;
        }
        // Only other nodes' news: their changes are the cluster's.
        let reason = if changes.is_empty() && !docker_changed {
            Reason::Cluster
        } else {
            Reason::Api
        };
        self.desired.hold();
        let mut membership = docker_changed;
        let (requests, replies): (Vec<Request>, Vec<Reply>) = changes.into_iter().unzip();
        let mut results: Vec<Result<Staged, Refusal>> =
            requests.iter().map(|req| self.stage(req)).collect();
        let mut flushed = self.desired.flush();
        if matches!(&flushed, Err(e) if e.kind == RefusalKind::Conflict) && requests.len() > 1 {
            // Together they break a limit, and every change was undone:
            // each is checked and saved on its own instead, so only the
            // ones at fault are refused.
            results = requests.iter().map(|req| self.stage(req)).collect();
            flushed = Ok(None);
        }
        membership |= results
            .iter()
            .any(|r| r.as_ref().is_ok_and(|s| s.membership));
        if membership {
            // Image rules and labels may name a service added or removed.
            self.docker.assign(&mut self.desired);
        }
        if let Some(set) = remote {
            self.take_remote(set);
        }
        // The state file is written on a blocking thread while the maps
        // are applied here: a change costs the slower of the two, not both.
        // Callers are answered only once both are done.
        let writing = flushed.map(|f| {
            f.map(|Flush { write, before }| {
                (tokio::task::spawn_blocking(move || write.write()), before)
            })
        });
        // The services this commit applied: only those are published.
        let mut touched = Some(BTreeSet::new());
        let mut applied = self.apply(&mut touched).await;
        let saved = match writing {
            Ok(Some((write, undo))) => {
                let written = write.await.unwrap_or_else(|e| {
                    Err(Refusal::failed(format!("writing the state file: {e}")))
                });
                self.desired.settle(undo, &written);
                if written.is_err() {
                    // Nothing that was not saved stays, in the maps either.
                    if membership {
                        self.docker.assign(&mut self.desired);
                    }
                    applied = self.apply(&mut touched).await;
                }
                written
            }
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        if let Err(e) = &applied {
            warn!(
                error = e.message,
                "applying changes failed; retrying at the next change"
            );
        }
        self.publish(touched.as_ref(), reason);
        self.publish_local();
        for (r, reply) in results.into_iter().zip(replies) {
            let answer = match (r, &saved, &applied) {
                (Err(e), _, _) => Err(e),
                (Ok(_), Err(e), _) | (Ok(_), _, Err(e)) => Err(e.clone()),
                (
                    Ok(Staged {
                        created: Some(name),
                        ..
                    }),
                    _,
                    _,
                ) => self.service_info(&name).map(Response::Service),
                (Ok(_), _, _) => Ok(Response::Done),
            };
            let _ = reply.send(answer);
        }
    }

    fn health_result(&mut self, report: &HealthReport) {
        let HealthReport {
            service,
            backend: addr,
            healthy,
            detail,
        } = report;
        if let Err(e) = self.rec.set_health(service, *addr, *healthy) {
            warn!(service, backend = %addr, error = %format!("{e:#}"), "applying a health result failed");
        }
        self.publish_noting(
            Some(&BTreeSet::from([service.clone()])),
            Reason::HealthCheck,
            Some((*addr, detail)),
        );
    }

    /// Applies the services that changed since the last apply (all of
    /// them after a failed one), and adds their names to `touched` (`None`:
    /// every service).
    async fn apply(&mut self, touched: &mut Option<BTreeSet<String>>) -> Result<(), Refusal> {
        let changes = self.desired.take_unapplied();
        let applied = if std::mem::take(&mut self.apply_all) {
            *touched = None;
            self.rec.apply(&self.desired.services()).await
        } else if changes.is_empty() {
            return Ok(());
        } else {
            if let Some(names) = touched {
                names.extend(changes.iter().map(|(name, _)| name.clone()));
            }
            self.rec.apply_changes(&changes).await
        };
        self.apply_all = applied.is_err();
        applied.map_err(|e| Refusal::failed(format!("{e:#}")))
    }

    fn service_info(&self, name: &str) -> Result<ServiceInfo, Refusal> {
        self.rec
            .service_info(name)
            .ok_or_else(|| Refusal::not_found(format!("no service {name}")))
    }

    /// Answers a read on a blocking thread, through the reader.
    fn read(
        &self,
        reply: Reply,
        answer: impl FnOnce(&Reader) -> Result<Response, Refusal> + Send + 'static,
    ) {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || {
            let _ = reply.send(answer(&reader));
        });
    }

    async fn call(&mut self, req: Request, reply: Reply) {
        let r = match req {
            Request::ListBackends(name) => {
                let Some(mut views) = self.view(Some(&name)) else {
                    let _ = reply.send(Err(Refusal::not_found(format!("no service {name}"))));
                    return;
                };
                let view = views.remove(0);
                return self.read(reply, move |r| Ok(Response::Backends(r.backends(view))));
            }
            Request::Stats(name) => {
                let Some(views) = self.view(name.as_deref()) else {
                    let name = name.unwrap_or_default();
                    let _ = reply.send(Err(Refusal::not_found(format!("no service {name}"))));
                    return;
                };
                return self.read(reply, move |r| Ok(Response::Stats(r.stats(views))));
            }
            Request::Status => {
                let mut interfaces = self.info.externals.clone();
                interfaces.extend(self.rec.backend_interfaces());
                let attachments = self.attachments(&interfaces);
                let status = Status {
                    version: env!("CARGO_PKG_VERSION").into(),
                    uptime_secs: self.info.started.elapsed().as_secs(),
                    adopted: self.info.adopted,
                    pin_path: self.info.pin_path.clone(),
                    interfaces,
                    maps: self.rec.map_status(),
                    docker: self.docker.status().to_owned(),
                    services: self.rec.services_info().len(),
                    containers: self.containers(),
                    attachments,
                };
                return self.read(reply, move |r| {
                    let maps = r.map_status(status.maps.clone());
                    Ok(Response::Status(Box::new(Status { maps, ..status })))
                });
            }
            Request::ListServices => Ok(Response::Services(self.rec.services_info())),
            change => return self.commit(vec![(change, reply)], false).await,
        };
        let _ = reply.send(r);
    }

    /// Services (all, or the one named) for the read side, each backend
    /// with the name of the container behind it, if one is; `None` for a
    /// name that is not a service.
    fn view(&self, name: Option<&str>) -> Option<Vec<ServiceView>> {
        let mut views = self.rec.view(name)?;
        let last = self.health.as_ref().map(HealthUpdater::last);
        for v in &mut views {
            let checked = v.info.health.is_some();
            for (_, b) in &mut v.backends {
                if let Ok(addr) = b.address.parse() {
                    b.container = self.docker.container(&v.info.name, addr).map(str::to_owned);
                    if let Some((node, container)) =
                        self.remote_names.get(&(v.info.name.clone(), addr))
                    {
                        b.node = Some(node.clone());
                        b.container.clone_from(container);
                    }
                    if checked {
                        b.last_check = last.and_then(|l| l.get(&v.info.name, addr));
                    }
                }
            }
        }
        Some(views)
    }

    /// Docker's containers for `status`.
    fn containers(&self) -> ContainersStatus {
        let listed = self
            .docker
            .listed_at()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        ContainersStatus {
            running: self.docker.running(),
            serving: self.docker.serving_containers(),
            services: self.docker.serving(),
            skipped: self.docker.skipped(),
            last_list_unix_secs: listed.map(|t| t.as_secs()),
            last_list_age_secs: listed.map(|t| now.saturating_sub(t).as_secs()),
        }
    }

    /// The data path's attachments for `status`, named after `interfaces`
    /// (the kernel's name when an interface is not among them).
    fn attachments(&self, interfaces: &[InterfaceStatus]) -> Vec<AttachmentStatus> {
        self.rec
            .datapath()
            .attachments()
            .into_iter()
            .map(|a| AttachmentStatus {
                interface: interfaces
                    .iter()
                    .find(|i| i.ifindex == a.ifindex)
                    .map(|i| i.name.clone())
                    .or_else(|| {
                        nix::net::if_::if_indextoname(a.ifindex)
                            .ok()
                            .map(|n| n.to_string_lossy().into_owned())
                    })
                    .unwrap_or_else(|| "?".into()),
                ifindex: a.ifindex,
                hook: a.hook.into(),
                link_id: a.link_id,
                program_id: a.program_id,
                pin: a.pin.map(|p| p.display().to_string()),
            })
            .collect()
    }

    /// Checks a change against the desired state and keeps it (saved by
    /// the commit).
    fn stage(&mut self, req: &Request) -> Result<Staged, Refusal> {
        let mut staged = Staged::default();
        match req {
            Request::AddService(new) => {
                staged.created = Some(self.desired.add_service(new)?.name);
                staged.membership = true;
            }
            Request::RemoveService(name) => {
                self.desired.remove_service(name)?;
                staged.membership = true;
            }
            Request::AddBackends(name, new) => self.desired.add_backends(name, new)?,
            Request::SetBackends(name, new) => self.desired.set_backends(name, new)?,
            Request::RemoveBackend(name, addr) => self.desired.remove_backend(name, addr)?,
            Request::DrainBackend(name, addr) => self.desired.drain_backend(name, addr)?,
            Request::UndrainBackend(name, addr) => self.desired.undrain_backend(name, addr)?,
            Request::SetWeight(name, addr, weight) => {
                self.desired.set_weight(name, addr, *weight)?;
                info!(service = name, backend = addr, weight, "weight changed");
            }
            Request::ListServices
            | Request::ListBackends(_)
            | Request::Stats(_)
            | Request::Status => {
                return Err(Refusal::failed("a read reached the write path".into()))
            }
        }
        Ok(staged)
    }
}

/// What staging a change left to do after the commit.
#[derive(Debug, Default)]
struct Staged {
    /// A service was created: its info is the answer.
    created: Option<String>,
    /// Services came or went: Docker's membership is worked out again.
    membership: bool,
}

impl Request {
    /// Whether it changes the desired state (else it only reads).
    fn is_change(&self) -> bool {
        !matches!(
            self,
            Request::ListServices | Request::ListBackends(_) | Request::Stats(_) | Request::Status
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{status_event, EventKind};

    #[test]
    fn an_engine_away_is_lost_once_however_often_the_client_retries() {
        let retry =
            |ms: u32| format!("disconnected: docker at unix:///x: gone; retrying in {ms} ms");
        assert_eq!(
            status_event("connected to unix:///x (API 1.41)", &retry(100)),
            Some(EventKind::DockerLost)
        );
        assert_eq!(status_event(&retry(100), &retry(200)), None);
        assert_eq!(
            status_event(&retry(200), "connected to unix:///x (API 1.41)"),
            Some(EventKind::DockerConnected)
        );
        assert_eq!(
            status_event("connecting", &retry(100)),
            Some(EventKind::DockerLost)
        );
        assert_eq!(status_event("disabled", "disabled"), None);
    }
}
