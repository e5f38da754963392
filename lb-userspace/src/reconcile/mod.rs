//! The one owner of the maps: turns the desired services into map contents.
//!
//! Sources of desired state (config file, API, Docker) never write maps;
//! the controller hands the services that changed to
//! [`Reconciler::apply_changes`] (the whole list to [`Reconciler::apply`] at
//! start), which goes through three steps:
//! 1. [`delivery`]: how each new backend is reached (netlink, and the
//!    reverse path attached where its replies enter);
//! 2. [`tables`]: the plan, pure: the map writes, in an order that never
//!    shows a packet a half state (the order is described there);
//! 3. [`store`]: the writes applied to the maps.
//!
//! Reads (counters, active flows) go through [`read`], off the control task.

pub mod delivery;
pub mod read;
pub mod store;
pub mod tables;

use std::{collections::BTreeSet, net::SocketAddrV4, time::Instant};

use tracing::{debug, info, warn};

pub use self::{
    read::{Reader, ServiceView},
    store::{MapOp, MapStore, StoreError},
    tables::{Delivery, Resolved, Tables},
};
use crate::{
    api::types::{InterfaceStatus, MapStatus, ServiceInfo},
    datapath::{Datapath, DatapathError, MapSizes},
    events::Marks,
    host::{self, Host},
    maglev::MaglevError,
    model::ServiceSpec,
};
/// Errors of the reconcile loop.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A map write failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A pinned table could not be read back.
    #[error("service {service}: its table in the pinned maps is unreadable")]
    Adopt {
        /// The service.
        service: String,
    },
    /// Attaching to a backend's interface failed.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// A Maglev table could not be built.
    #[error("service {service}: building its Maglev table")]
    Maglev {
        /// The service.
        service: String,
        /// What went wrong.
        #[source]
        source: MaglevError,
    },
    /// No service id left.
    #[error("service {0}: the maps are full (datapath.max_services)")]
    ServicesFull(String),
    /// No backend id left.
    #[error("service {0}: the maps are full (datapath.max_backends)")]
    BackendsFull(String),
    /// A backend address:port would serve more services than the reverse
    /// path can tell apart.
    #[error("service {service}: backend {backend} already serves {max} services (the most one backend can)")]
    BackendShared {
        /// The service.
        service: String,
        /// The backend.
        backend: SocketAddrV4,
        /// [`lb_common::REV_NAT_MAX`].
        max: usize,
    },
}

/// Backends re-checked per refresh tick, so the control task answers the
/// API between ticks even with thousands of backends (which are then each
/// re-checked every few minutes).
pub const REFRESH_BATCH: usize = 32;

/// Keeps the data path's maps equal to the desired services.
pub struct Reconciler {
    dp: Datapath,
    tables: Tables,
    delivery: delivery::Deliveries,
    /// The last (service, backend) `refresh` re-checked.
    refresh_cursor: Option<tables::ToResolve>,
}

impl Reconciler {
    /// Takes over a loaded data path; `host` answers questions about
    /// interfaces, routes and neighbours.
    pub fn new(dp: Datapath, sizes: MapSizes, host: Host) -> Self {
        Self {
            dp,
            tables: Tables::new(sizes),
            delivery: delivery::Deliveries::new(host),
            refresh_cursor: None,
        }
    }

    /// Tells the reconciler whether the forward path runs in XDP anywhere:
    /// only then does it turn GRO on in backends' namespaces.
    pub fn set_xdp_forward(&mut self, on: bool) {
        self.delivery.set_xdp_forward(on);
    }

    /// The data path, e.g. to read counters.
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// A reader of counters and flows for the read side, with its own
    /// handles on the maps.
    pub fn reader(&self) -> Result<Reader, DatapathError> {
        Ok(Reader::new(self.dp.maps.read_handles()?))
    }

    /// Backend-facing interfaces the reverse path is attached to.
    pub fn backend_interfaces(&self) -> Vec<InterfaceStatus> {
        self.delivery.interfaces()
    }

    /// The services, as the API lists them.
    pub fn services_info(&self) -> Vec<ServiceInfo> {
        self.tables.services_info()
    }

    /// One service, as the API shows it.
    pub fn service_info(&self, name: &str) -> Option<ServiceInfo> {
        self.tables.service_info(name)
    }

    /// Services (all, or one) for the read side; `None` for an unknown name.
    pub fn view(&self, name: Option<&str>) -> Option<Vec<ServiceView>> {
        self.tables.view(name)
    }

    /// Services (all, or those named) as the change log publishes them;
    /// `container` names the container behind a backend.
    pub fn marks(
        &self,
        names: Option<&BTreeSet<String>>,
        container: impl Fn(&str, SocketAddrV4) -> Option<String>,
    ) -> Marks {
        self.tables.marks(names, container)
    }

    /// Fill levels of the maps (the flow table's for the read side to fill).
    pub fn map_status(&self) -> Vec<MapStatus> {
        self.tables.map_status()
    }

    /// Applies `ops`; after a failed write, the next plan writes everything
    /// again.
    fn write(&mut self, ops: &[MapOp]) -> Result<(), ReconcileError> {
        store::apply(&mut self.dp.maps, ops).map_err(|e| {
            self.tables.forget_written(&self.dp.maps);
            e.into()
        })
    }

    /// Takes over what an earlier daemon left in pinned maps, before the
    /// first [`Reconciler::apply`] (see [`Tables::adopt`]); backend-facing
    /// interfaces keep their reverse path. Backends delivered through an
    /// interface that went while no daemon ran (deleted, or its namespace
    /// removed) are resolved again at once: through an interface of the
    /// same name, or whatever the routes say now. Returns how many services
    /// were taken over.
    pub async fn adopt(&mut self, desired: &[ServiceSpec]) -> Result<usize, ReconcileError> {
        let mut ops = Vec::new();
        let adopted = self.tables.adopt(&self.dp.maps, desired, &mut ops)?;
        self.write(&ops)?;
        let gone: BTreeSet<u32> = self
            .tables
            .used_ifindexes()
            .into_iter()
            .filter(|&i| host::interface_name(i).is_none())
            .collect();
        if !gone.is_empty() {
            let stale = self.tables.backends_through(&gone);
            info!(
                backends = stale.len(),
                "resolving again the backends whose interface is gone"
            );
            for (name, addr, new) in self.delivery.resolve_all(&mut self.dp, stale).await? {
                self.tables.set_delivery(&name, addr, new);
            }
        }
        let used = self.tables.used_ifindexes();
        let containers = self.tables.container_ifindexes();
        self.delivery.adopt(&mut self.dp, &used, containers)?;
        Ok(adopted)
    }

    /// After the first apply of an adopted data path: removes reverse-path
    /// entries and attachments nothing claimed.
    pub fn finish_adoption(&mut self) -> Result<(), ReconcileError> {
        let mut ops = Vec::new();
        self.tables.finish_adoption(&self.dp.maps, &mut ops);
        self.write(&ops)?;
        self.dp.release_orphans();
        Ok(())
    }

    /// Hands the data path back, e.g. to close it on shutdown.
    pub fn into_datapath(self) -> Datapath {
        self.dp
    }

    /// Makes the maps hold exactly `desired`: every service not in it is
    /// removed (see [`Reconciler::apply_changes`]).
    pub async fn apply(&mut self, desired: &[ServiceSpec]) -> Result<(), ReconcileError> {
        let wanted: BTreeSet<&str> = desired.iter().map(|s| s.name.as_str()).collect();
        let mut changes: Vec<(String, Option<ServiceSpec>)> = (self.tables.services.keys())
            .filter(|name| !wanted.contains(name.as_str()))
            .map(|name| (name.clone(), None))
            .collect();
        changes.extend(desired.iter().map(|s| (s.name.clone(), Some(s.clone()))));
        self.apply_changes(&changes).await
    }

    /// Makes the maps hold each service of `changes` as given (`None`:
    /// removed), and leaves the others alone: resolves the new backends,
    /// plans the writes and applies them.
    pub async fn apply_changes(
        &mut self,
        changes: &[(String, Option<ServiceSpec>)],
    ) -> Result<(), ReconcileError> {
        let started = Instant::now();
        let wanted = self
            .tables
            .to_resolve(changes.iter().filter_map(|(_, s)| s.as_ref()));
        let resolved: Resolved = self
            .delivery
            .resolve_all(&mut self.dp, wanted)
            .await?
            .into_iter()
            .map(|(service, addr, d)| ((service, addr), d))
            .collect();
        let resolving = started.elapsed();
        let mut ops = Vec::new();
        let changes: Vec<(&str, Option<&ServiceSpec>)> = (changes.iter())
            .map(|(name, spec)| (name.as_str(), spec.as_ref()))
            .collect();
        let planned = self
            .tables
            .plan_changes(&changes, &resolved, Instant::now(), &mut ops);
        let planning = started.elapsed() - resolving;
        // A refused step still leaves a consistent prefix to apply.
        self.write(&ops)?;
        if self.tables.take_members_moved() {
            self.delivery
                .release_unused(&mut self.dp, &self.tables.used_ifindexes());
        }
        debug!(
            resolved = resolved.len(),
            ops = ops.len(),
            resolve_us = resolving.as_micros() as u64,
            plan_us = planning.as_micros() as u64,
            total_us = started.elapsed().as_micros() as u64,
            "applied"
        );
        planned
    }

    /// Marks a backend as passing or failing its health check.
    pub fn set_health(
        &mut self,
        service: &str,
        addr: SocketAddrV4,
        healthy: bool,
    ) -> Result<(), ReconcileError> {
        let mut ops = Vec::new();
        let r = self.tables.set_health(service, addr, healthy, &mut ops);
        self.write(&ops)?;
        r
    }

    /// Re-resolves backends' delivery (routes, neighbours, veth peers) and
    /// rewrites what changed; a backend that became reachable or
    /// unreachable changes its service's table.
    ///
    /// Each call re-checks at most [`REFRESH_BATCH`] backends, continuing
    /// round-robin where the last call stopped: this runs in the one task
    /// that also answers the API.
    pub async fn refresh(&mut self) -> Result<(), ReconcileError> {
        let all = self.tables.backends();
        if all.is_empty() {
            return Ok(());
        }
        let wanted = next_batch(&all, self.refresh_cursor.as_ref(), REFRESH_BATCH);
        self.refresh_cursor = wanted.last().cloned();
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for (name, addr, new) in self.delivery.resolve_all(&mut self.dp, wanted).await? {
            if self.tables.set_delivery(&name, addr, new) {
                debug!(service = name, backend = %addr, ?new, "backend delivery updated");
                changed.insert(name);
            }
        }
        let mut ops = Vec::new();
        for name in changed {
            if let Err(e) = self.tables.sync(&name, &mut ops) {
                warn!(service = name, error = %e, "refresh: table not rebuilt");
            }
        }
        self.write(&ops)?;
        self.delivery
            .release_unused(&mut self.dp, &self.tables.used_ifindexes());
        Ok(())
    }

    /// Removes the neighbour entries this daemon made managed.
    pub async fn release_neighbors(&mut self) {
        self.delivery.release_neighbors().await;
    }
}

/// Up to `n` items of the sorted `all`, starting after `cursor` and
/// wrapping around: a round-robin sweep that survives items coming and going.
fn next_batch<T: Ord + Clone>(all: &[T], cursor: Option<&T>, n: usize) -> Vec<T> {
    let start = all.iter().position(|k| Some(k) > cursor).unwrap_or(0);
    all.iter()
        .cycle()
        .skip(start)
        .take(n.min(all.len()))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_sweeps_round_robin() {
        let all = [1, 2, 3, 4, 5];
        assert_eq!(next_batch(&all, None, 2), [1, 2]);
        assert_eq!(next_batch(&all, Some(&2), 2), [3, 4]);
        assert_eq!(next_batch(&all, Some(&4), 2), [5, 1], "wraps around");
        assert_eq!(
            next_batch(&all, Some(&5), 9),
            [1, 2, 3, 4, 5],
            "never repeats"
        );
        assert_eq!(
            next_batch(&all, Some(&3), 2),
            [4, 5],
            "a removed cursor is fine"
        );
        assert!(next_batch::<u8>(&[], None, 3).is_empty());
    }
}
