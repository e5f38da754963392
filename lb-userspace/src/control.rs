//! The reconcile loop's inbox. The admin API and the health checker never
//! touch maps or the state file: they send a [`Request`] (or a health
//! result) through a [`Handle`] and the one task that owns the
//! [`Reconciler`] and the [`Desired`] state carries it out, one at a time.

use std::{net::SocketAddrV4, time::Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use crate::{
    api::types::{
        BackendInfo, InterfaceStatus, NewBackend, NewService, ServiceInfo, Stats, Status,
    },
    docker::{DockerSink, DockerUpdate, Tracker},
    health::HealthSink,
    model::Refusal,
    reconcile::Reconciler,
    state::Desired,
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
    /// Add a backend to a service.
    AddBackend(String, NewBackend),
    /// Remove a backend (service, address).
    RemoveBackend(String, String),
    /// Drain a backend (service, address).
    DrainBackend(String, String),
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
    /// A health check result for (service, backend).
    Health(String, SocketAddrV4, bool),
    /// What the Docker watcher saw.
    Docker(DockerUpdate),
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

    /// Reports a health check result.
    pub async fn health(&self, service: String, backend: SocketAddrV4, healthy: bool) {
        let _ = self.tx.send(Input::Health(service, backend, healthy)).await;
    }
}

impl HealthSink for Handle {
    async fn report(&self, service: String, backend: SocketAddrV4, healthy: bool) {
        self.health(service, backend, healthy).await;
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

/// Owns the reconciler and the desired state; carries out requests.
pub struct Controller {
    rec: Reconciler,
    desired: Desired,
    docker: Tracker,
    info: DaemonInfo,
}

impl Controller {
    /// Takes over a reconciler that has applied `desired`, whose Docker
    /// backends `docker` assigned.
    pub fn new(rec: Reconciler, desired: Desired, docker: Tracker, info: DaemonInfo) -> Self {
        Self {
            rec,
            desired,
            docker,
            info,
        }
    }

    /// The reconciler, e.g. for periodic refreshes and shutdown.
    pub fn reconciler(&mut self) -> &mut Reconciler {
        &mut self.rec
    }

    /// Gives the reconciler back, for shutdown.
    pub fn into_reconciler(self) -> Reconciler {
        self.rec
    }

    /// The desired services, as last applied.
    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Handles one inbox message.
    pub async fn handle(&mut self, input: Input) {
        match input {
            Input::Call(req, reply) => {
                let r = self.call(req).await;
                let _ = reply.send(r);
            }
            Input::Health(service, addr, healthy) => {
                if let Err(e) = self.rec.set_health(&service, addr, healthy) {
                    warn!(service, backend = %addr, error = %format!("{e:#}"), "applying a health result failed");
                }
            }
            Input::Docker(update) => {
                if self.docker.update(update) {
                    self.docker.assign(&mut self.desired);
                    if let Err(e) = self.apply().await {
                        warn!(error = e.message, "applying Docker's changes failed; retrying at the next change or refresh");
                    }
                }
            }
        }
    }

    async fn apply(&mut self) -> Result<(), Refusal> {
        let services = self.desired.services();
        self.rec
            .apply(&services)
            .await
            .map_err(|e| Refusal::failed(format!("{e:#}")))
    }

    fn service_info(&self, name: &str) -> Result<ServiceInfo, Refusal> {
        self.rec
            .services_info()
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Refusal::not_found(format!("no service {name}")))
    }

    async fn call(&mut self, req: Request) -> Result<Response, Refusal> {
        match req {
            Request::ListServices => Ok(Response::Services(self.rec.services_info())),
            Request::AddService(new) => {
                let spec = self.desired.add_service(&new)?;
                // Its image rule or containers' labels may name it already.
                self.docker.assign(&mut self.desired);
                self.apply().await?;
                Ok(Response::Service(self.service_info(&spec.name)?))
            }
            Request::RemoveService(name) => {
                self.desired.remove_service(&name)?;
                self.docker.assign(&mut self.desired);
                self.apply().await?;
                Ok(Response::Done)
            }
            Request::ListBackends(name) => {
                let mut list = self
                    .rec
                    .backends_info(&name)
                    .ok_or_else(|| Refusal::not_found(format!("no service {name}")))?;
                for b in &mut list {
                    if let Ok(addr) = b.address.parse() {
                        b.container = self.docker.container(&name, addr).map(str::to_owned);
                    }
                }
                Ok(Response::Backends(list))
            }
            Request::AddBackend(name, new) => {
                self.desired.add_backend(&name, &new)?;
                self.apply().await?;
                Ok(Response::Done)
            }
            Request::RemoveBackend(name, addr) => {
                self.desired.remove_backend(&name, &addr)?;
                self.apply().await?;
                Ok(Response::Done)
            }
            Request::DrainBackend(name, addr) => {
                self.desired.drain_backend(&name, &addr)?;
                self.apply().await?;
                Ok(Response::Done)
            }
            Request::Stats(name) => self
                .rec
                .stats(name.as_deref())
                .map(Response::Stats)
                .ok_or_else(|| {
                    Refusal::not_found(format!("no service {}", name.unwrap_or_default()))
                }),
            Request::Status => {
                let mut interfaces = self.info.externals.clone();
                interfaces.extend(self.rec.backend_interfaces());
                Ok(Response::Status(Box::new(Status {
                    version: env!("CARGO_PKG_VERSION").into(),
                    uptime_secs: self.info.started.elapsed().as_secs(),
                    adopted: self.info.adopted,
                    pin_path: self.info.pin_path.clone(),
                    interfaces,
                    maps: self.rec.map_status(),
                    docker: self.docker.status().to_owned(),
                    services: self.rec.services_info().len(),
                })))
            }
        }
    }
}
