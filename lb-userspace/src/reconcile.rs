//! The one owner of the maps: turns the desired services into map contents.
//!
//! Sources of desired state (the config file now; the API and Docker later)
//! never write maps; they hand whole service lists to [`Reconciler::apply`].
//!
//! Order of writes, so that no packet ever sees an inconsistent state:
//! 1. backend entries a table will reference are written first;
//! 2. the service's inactive Maglev copy is written (only the slots that
//!    differ from what that copy already holds);
//! 3. the service entry is replaced as a whole, pointing at that copy: the
//!    flip. A `HASH` map update swaps the element atomically;
//! 4. only then are removed backends marked down, so flows still on them
//!    move on their next packet.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use aya::maps::MapError;
use lb_common::{
    maps, Backend, RevNat, ServiceKey, ServiceValue, BACKEND_ACTIVE, BACKEND_DOWN,
    BACKEND_DRAINING, BACKEND_F_MAC, BACKEND_F_PEER, BACKEND_F_XDP, NO_BACKEND, REV_NAT_MAX,
};
use tracing::{debug, info, warn};

use crate::{
    api::types::{
        BackendInfo, BackendState, Counters, Health, InterfaceStatus, MapStatus, ServiceInfo,
        ServiceStats, Stats,
    },
    config::{BackendSpec, Protocol, ServiceSpec, Via},
    datapath::{Datapath, DatapathError, MapSizes, Maps},
    host::{self, Host, HostError},
    maglev::{self, MaglevBackend, MaglevError},
};

/// Errors of the reconcile loop.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// A map write failed.
    #[error("writing map {name}")]
    Map {
        /// The map.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: MapError,
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
        /// [`REV_NAT_MAX`].
        max: usize,
    },
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> ReconcileError {
    move |source| ReconcileError::Map { name, source }
}

/// Backends re-checked per refresh tick: about 0.1 s of `ip` commands, so
/// the control task answers the API between ticks even with thousands of
/// backends (which are then each re-checked every few minutes).
pub const REFRESH_BATCH: usize = 32;

/// Hands out ids round-robin, so a freed id is reused as late as possible
/// and a stale flow pointing at it is unlikely to find a new tenant.
#[derive(Debug)]
struct Ids {
    used: Vec<bool>,
    next: usize,
}

impl Ids {
    fn new(capacity: u32) -> Self {
        Self {
            used: vec![false; capacity as usize],
            next: 0,
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        let n = self.used.len();
        let i = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| !self.used[i])?;
        self.used[i] = true;
        self.next = (i + 1) % n;
        Some(i as u32)
    }

    fn free(&mut self, id: u32) {
        self.used[id as usize] = false;
    }
}

/// How packets reach a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    /// Egress interface.
    pub ifindex: u32,
    /// Its MAC.
    pub src_mac: [u8; 6],
    /// The next hop's MAC, once resolved.
    pub dst_mac: Option<[u8; 6]>,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// Where its replies enter this host and the reverse path runs: the
    /// egress interface itself, or the bridge a container's veth is a port of.
    pub reply_ifindex: u32,
}

#[derive(Debug)]
struct Member {
    id: u32,
    weight: u32,
    delivery: Option<Delivery>,
    /// Drained by the operator.
    drained: bool,
    /// Passing its health check (true when the service has none).
    healthy: bool,
    /// What the map holds for it, once written.
    written: Option<Backend>,
    /// A container's interface, as Docker reported it.
    via: Option<Via>,
}

impl Member {
    fn new(id: u32, spec: &BackendSpec) -> Self {
        Self {
            id,
            weight: spec.weight,
            delivery: None,
            drained: spec.drained,
            healthy: true,
            written: None,
            via: spec.via,
        }
    }

    /// What the data path should do with it.
    fn state(&self) -> u32 {
        if self.delivery.is_none() || !self.healthy {
            BACKEND_DOWN
        } else if self.drained {
            BACKEND_DRAINING
        } else {
            BACKEND_ACTIVE
        }
    }

    fn value(&self, service_id: u32, addr: SocketAddrV4) -> Backend {
        let d = self.delivery.unwrap_or(Delivery {
            ifindex: 0,
            src_mac: [0; 6],
            dst_mac: None,
            flags: 0,
            reply_ifindex: 0,
        });
        Backend {
            addr: u32::from_ne_bytes(addr.ip().octets()),
            port: addr.port().to_be(),
            _pad: 0,
            ifindex: d.ifindex,
            service_id,
            state: self.state(),
            flags: d.flags,
            dst_mac: d.dst_mac.unwrap_or_default(),
            src_mac: d.src_mac,
        }
    }
}

#[derive(Debug)]
struct ServiceState {
    spec: ServiceSpec,
    id: u32,
    /// Which copy the service entry points at, once written.
    active: Option<usize>,
    /// What each copy of the table holds in the map (empty: unknown).
    copies: [Vec<u32>; 2],
    /// The table size and members the active copy was built from: an
    /// apply that changes neither skips the build (about 1 ms per service
    /// at M = 65,537, paid by every service on every change otherwise).
    built_from: Option<(u32, Vec<MaglevBackend>)>,
    backends: BTreeMap<SocketAddrV4, Member>,
}

impl ServiceState {
    fn key(&self) -> ServiceKey {
        service_key(&self.spec)
    }
}

fn service_key(s: &ServiceSpec) -> ServiceKey {
    ServiceKey::new(s.vip.ip().octets(), s.vip.port(), s.protocol.number())
}

/// Stable Maglev identity of a backend: its address and port.
fn maglev_key(addr: SocketAddrV4) -> u64 {
    (u64::from(u32::from(*addr.ip())) << 16) | u64::from(addr.port())
}

/// Owns the data path's maps and keeps them equal to the desired services.
pub struct Reconciler {
    dp: Datapath,
    sizes: MapSizes,
    services: BTreeMap<String, ServiceState>,
    service_ids: Ids,
    backend_ids: Ids,
    /// Backend-facing interfaces already set up (TC attached), by ifindex.
    ready_ifaces: BTreeMap<u32, String>,
    /// This host's network, over netlink.
    host: Host,
    /// Neighbour entries (address, ifindex) this daemon asked the kernel to
    /// keep resolved.
    managed_neighbors: BTreeSet<(Ipv4Addr, u32)>,
    /// What `REV_NAT` holds: the services (VIPs) each backend serves.
    rev_nat: BTreeMap<(SocketAddrV4, Protocol), Vec<SocketAddrV4>>,
    /// What `VIP_FILTER` holds, by word; `None` until first written.
    vip_filter: Option<Vec<u64>>,
    /// The last (service, backend) `refresh` re-checked.
    refresh_cursor: Option<(String, SocketAddrV4)>,
    /// Whether some external interface forwards with XDP, so backends'
    /// veth peers need GRO on to take redirected frames.
    xdp_forward: bool,
    /// Container veths (host side) this daemon attached to; detached when
    /// no backend uses them any more.
    container_ifaces: BTreeSet<u32>,
    /// veths whose peer was seen with GRO on. A peer keeps it for the
    /// interface's life, and a new container brings a new ifindex, so the
    /// periodic refresh does not enter every backend's namespace again.
    gro_ready: BTreeSet<u32>,
}

impl Reconciler {
    /// Takes over a loaded data path; `host` answers its questions about
    /// interfaces, routes and neighbours.
    pub fn new(dp: Datapath, sizes: MapSizes, host: Host) -> Self {
        Self {
            dp,
            sizes,
            host,
            services: BTreeMap::new(),
            service_ids: Ids::new(sizes.max_services),
            backend_ids: Ids::new(sizes.max_backends),
            ready_ifaces: BTreeMap::new(),
            managed_neighbors: BTreeSet::new(),
            rev_nat: BTreeMap::new(),
            vip_filter: None,
            gro_ready: BTreeSet::new(),
            refresh_cursor: None,
            xdp_forward: false,
            container_ifaces: BTreeSet::new(),
        }
    }

    /// Tells the reconciler whether the forward path runs in XDP anywhere:
    /// only then does it turn GRO on in backends' namespaces.
    pub fn set_xdp_forward(&mut self, on: bool) {
        self.xdp_forward = on;
    }

    /// The data path, e.g. to read counters.
    pub fn datapath(&self) -> &Datapath {
        &self.dp
    }

    /// Backend-facing interfaces the reverse path is attached to.
    pub fn backend_interfaces(&self) -> Vec<InterfaceStatus> {
        self.ready_ifaces
            .iter()
            .map(|(ifindex, name)| InterfaceStatus {
                name: name.clone(),
                ifindex: *ifindex,
                role: "backend".into(),
                programs: vec!["tc".into()],
            })
            .collect()
    }

    /// The services, as the API lists them.
    pub fn services_info(&self) -> Vec<ServiceInfo> {
        self.services
            .values()
            .map(|st| ServiceInfo {
                name: st.spec.name.clone(),
                vip: st.spec.vip.to_string(),
                protocol: st.spec.protocol,
                table_size: st.spec.table_size,
                origin: st.spec.origin,
                image: st.spec.image.as_ref().map(|r| r.image.clone()),
                target_port: st.spec.image.as_ref().map(|r| r.target_port),
                health: st.spec.health,
                backends: st.backends.len(),
                active_backends: st
                    .backends
                    .values()
                    .filter(|b| b.state() == BACKEND_ACTIVE)
                    .count(),
            })
            .collect()
    }

    /// Active flows (a packet in the last `FLOW_IDLE_SECS`) by backend id.
    /// Walks the whole table: an admin read, not something to poll at high
    /// rates.
    fn flows_by_backend(&self) -> HashMap<u32, u64> {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
            .map(|t| t.tv_sec() as u32)
            .unwrap_or(0);
        let mut n = HashMap::new();
        for (_, flow) in self.dp.maps.flows.iter().flatten() {
            if now.saturating_sub(flow.last_seen) <= lb_common::FLOW_IDLE_SECS {
                *n.entry(flow.backend_id).or_default() += 1;
            }
        }
        n
    }

    fn counters(
        &self,
        per_cpu: &aya::maps::PerCpuArray<aya::maps::MapData, lb_common::Counters>,
        id: u32,
    ) -> Counters {
        per_cpu
            .get(&id, 0)
            .map(|v| {
                let c = Maps::sum_counters(&v);
                Counters {
                    packets: c.packets,
                    bytes: c.bytes,
                    new_flows: c.new_flows,
                }
            })
            .unwrap_or_default()
    }

    fn backend_infos(&self, st: &ServiceState, flows: &HashMap<u32, u64>) -> Vec<BackendInfo> {
        st.backends
            .iter()
            .map(|(addr, b)| BackendInfo {
                address: addr.to_string(),
                weight: b.weight,
                state: match b.state() {
                    BACKEND_ACTIVE => BackendState::Active,
                    BACKEND_DRAINING => BackendState::Draining,
                    _ => BackendState::Down,
                },
                health: match (st.spec.health.is_some(), b.healthy) {
                    (false, _) => Health::Unchecked,
                    (true, true) => Health::Healthy,
                    (true, false) => Health::Unhealthy,
                },
                active_flows: flows.get(&b.id).copied().unwrap_or(0),
                counters: self.counters(&self.dp.maps.backend_stats, b.id),
                container: None,
            })
            .collect()
    }

    /// One service's backends, or `None` if there is no such service.
    pub fn backends_info(&self, name: &str) -> Option<Vec<BackendInfo>> {
        let st = self.services.get(name)?;
        Some(self.backend_infos(st, &self.flows_by_backend()))
    }

    /// Counters of all services, or of one (`None` if there is no such service).
    pub fn stats(&self, name: Option<&str>) -> Option<Stats> {
        let flows = self.flows_by_backend();
        let mut services = Vec::new();
        for st in self.services.values() {
            if name.is_some_and(|n| n != st.spec.name) {
                continue;
            }
            let backends = self.backend_infos(st, &flows);
            services.push(ServiceStats {
                name: st.spec.name.clone(),
                counters: self.counters(&self.dp.maps.service_stats, st.id),
                active_flows: backends.iter().map(|b| b.active_flows).sum(),
                backends,
            });
        }
        if name.is_some() && services.is_empty() {
            return None;
        }
        let global = self
            .dp
            .maps
            .global_counters()
            .map(|g| g.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            .unwrap_or_default();
        Some(Stats { services, global })
    }

    /// Fill levels of the maps this loop writes, and of the flow table.
    pub fn map_status(&self) -> Vec<MapStatus> {
        let backends: u64 = self
            .services
            .values()
            .map(|s| s.backends.len() as u64)
            .sum();
        let flows = self.dp.maps.flows.keys().flatten().count() as u64;
        let slots: u64 = self
            .services
            .values()
            .map(|s| 2 * u64::from(s.spec.table_size))
            .sum();
        vec![
            MapStatus {
                name: maps::SERVICES.into(),
                used: self.services.len() as u64,
                capacity: self.sizes.max_services.into(),
            },
            MapStatus {
                name: maps::BACKENDS.into(),
                used: backends,
                capacity: self.sizes.max_backends.into(),
            },
            MapStatus {
                name: maps::MAGLEV.into(),
                used: slots,
                capacity: self.sizes.maglev_slots().into(),
            },
            MapStatus {
                name: maps::FLOWS.into(),
                used: flows,
                capacity: self.sizes.flow_table_size.into(),
            },
            MapStatus {
                name: maps::REV_NAT.into(),
                used: self.rev_nat.len() as u64,
                capacity: self.sizes.max_backends.into(),
            },
        ]
    }

    /// Takes over what an earlier daemon left in pinned maps, before the
    /// first [`Reconciler::apply`]: services still desired keep their ids and
    /// active table, their backends keep their ids (flows in the flow table
    /// refer to them), and backend-facing interfaces keep their reverse
    /// path. Whatever is no longer desired is taken out, as a removal would.
    /// Returns how many services were taken over.
    pub fn adopt(&mut self, desired: &[ServiceSpec]) -> Result<usize, ReconcileError> {
        let existing: Vec<(ServiceKey, ServiceValue)> =
            self.dp.maps.services.iter().flatten().collect();
        let backends: Vec<(u32, Backend)> = self
            .dp
            .maps
            .backends
            .iter()
            .enumerate()
            .filter_map(|(id, b)| b.ok().map(|b| (id as u32, b)))
            .filter(|(_, b)| *b != Backend::default())
            .collect();
        let max_table = self.sizes.max_table_size;
        let mut adopted = 0;
        let mut claimed: BTreeSet<u32> = BTreeSet::new();
        for (key, value) in existing {
            let spec = desired.iter().find(|s| service_key(s) == key);
            let copy = (value.table_base / max_table).wrapping_sub(value.id * 2);
            let usable = spec.is_some_and(|s| {
                value.id < self.sizes.max_services
                    && value.table_size == s.table_size
                    && copy < 2
                    && value.table_base == (value.id * 2 + copy) * max_table
                    && !self.services.contains_key(&s.name)
            });
            let Some(spec) = spec.filter(|_| usable) else {
                match self.dp.maps.services.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(maps::SERVICES)(e)),
                }
                continue;
            };
            let slots = &self.dp.maps.maglev_slots;
            let table = (0..value.table_size)
                .map(|i| {
                    let index = value.table_base + i;
                    slots.get(index).ok_or(ReconcileError::Map {
                        name: maps::MAGLEV,
                        source: MapError::OutOfBounds {
                            index,
                            max_entries: slots.len(),
                        },
                    })
                })
                .collect::<Result<Vec<u32>, _>>()?;
            let mut members = BTreeMap::new();
            for (id, b) in backends.iter().filter(|(_, b)| b.service_id == value.id) {
                let addr =
                    SocketAddrV4::new(Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port));
                let Some(want) = spec.backends.iter().find(|w| w.addr == addr) else {
                    continue;
                };
                let delivery = (b.ifindex != 0).then_some(Delivery {
                    ifindex: b.ifindex,
                    src_mac: b.src_mac,
                    dst_mac: (b.flags & BACKEND_F_MAC != 0).then_some(b.dst_mac),
                    flags: b.flags,
                    // The earlier daemon's choice is not recorded: the
                    // backend's own interface always sees its replies.
                    reply_ifindex: b.ifindex,
                });
                let mut m = Member::new(*id, want);
                m.delivery = delivery;
                m.written = Some(*b);
                members.insert(addr, m);
                self.backend_ids.used[*id as usize] = true;
                claimed.insert(*id);
                self.rev_nat
                    .entry((addr, spec.protocol))
                    .or_default()
                    .push(spec.vip);
            }
            let mut copies = [Vec::new(), Vec::new()];
            copies[copy as usize] = table;
            self.service_ids.used[value.id as usize] = true;
            self.services.insert(
                spec.name.clone(),
                ServiceState {
                    spec: spec.clone(),
                    id: value.id,
                    active: Some(copy as usize),
                    copies,
                    built_from: None,
                    backends: members,
                },
            );
            adopted += 1;
        }
        // Backends no adopted service claims: down, so no flow stays on them.
        for (id, b) in &backends {
            if !claimed.contains(id) && b.state != BACKEND_DOWN {
                self.write_backend_down(*id)?;
            }
        }
        // The reverse path of every adopted backend's interface is taken over.
        self.container_ifaces = self
            .services
            .values()
            .flat_map(|s| s.backends.values())
            .filter(|m| m.via.is_some())
            .filter_map(|m| m.delivery.map(|d| d.reply_ifindex))
            .collect();
        for ifindex in self.used_ifindexes() {
            if let Ok(name) = nix::net::if_::if_indextoname(ifindex) {
                let name = name.to_string_lossy().into_owned();
                self.dp.attach_tc(&name, ifindex)?;
                self.ready_ifaces.insert(ifindex, name);
            }
        }
        Ok(adopted)
    }

    /// After the first apply of an adopted data path: removes reverse-path
    /// entries and attachments nothing claimed.
    pub fn finish_adoption(&mut self) -> Result<(), ReconcileError> {
        let stale: Vec<ServiceKey> = self
            .dp
            .maps
            .rev_nat
            .keys()
            .flatten()
            .filter(|k| {
                let addr =
                    SocketAddrV4::new(Ipv4Addr::from(k.addr.to_ne_bytes()), u16::from_be(k.port));
                let proto = if k.proto == lb_common::IPPROTO_UDP {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                !self.rev_nat.contains_key(&(addr, proto))
            })
            .collect();
        for k in stale {
            match self.dp.maps.rev_nat.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(maps::REV_NAT)(e)),
            }
        }
        self.dp.release_orphans();
        Ok(())
    }

    /// Hands the data path back, e.g. to close it on shutdown.
    pub fn into_datapath(self) -> Datapath {
        self.dp
    }

    /// Makes the maps hold exactly `desired`.
    pub async fn apply(&mut self, desired: &[ServiceSpec]) -> Result<(), ReconcileError> {
        let wanted: HashMap<&str, &ServiceSpec> =
            desired.iter().map(|s| (s.name.as_str(), s)).collect();
        let gone: Vec<String> = self
            .services
            .iter()
            .filter(|(name, st)| {
                wanted
                    .get(name.as_str())
                    .is_none_or(|s| service_key(s) != st.key())
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            self.remove_service(&name)?;
        }
        for spec in desired {
            self.upsert_service(spec).await?;
        }
        // Bits of removed VIPs go last, after their services are gone.
        self.write_vip_filter(None)
    }

    fn remove_service(&mut self, name: &str) -> Result<(), ReconcileError> {
        let Some(st) = self.services.remove(name) else {
            return Ok(());
        };
        // The key goes first: from then on no packet reaches the backends.
        match self.dp.maps.services.remove(&st.key()) {
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::SERVICES)(e)),
        }
        for (addr, b) in &st.backends {
            self.write_backend_down(b.id)?;
            self.backend_ids.free(b.id);
            self.rev_nat_remove(*addr, st.spec.protocol, st.spec.vip)?;
        }
        self.service_ids.free(st.id);
        self.release_container_ifaces();
        info!(service = name, "service removed");
        Ok(())
    }

    async fn upsert_service(&mut self, spec: &ServiceSpec) -> Result<(), ReconcileError> {
        if !self.services.contains_key(&spec.name) {
            let id = self
                .service_ids
                .alloc()
                .ok_or_else(|| ReconcileError::ServicesFull(spec.name.clone()))?;
            self.services.insert(
                spec.name.clone(),
                ServiceState {
                    spec: spec.clone(),
                    id,
                    active: None,
                    copies: [Vec::new(), Vec::new()],
                    built_from: None,
                    backends: BTreeMap::new(),
                },
            );
            info!(service = spec.name, vip = %spec.vip, protocol = %spec.protocol, "service added");
        }
        let wanted: BTreeMap<SocketAddrV4, &BackendSpec> =
            spec.backends.iter().map(|b| (b.addr, b)).collect();
        let st = self.services.get_mut(&spec.name).expect("inserted above");
        st.spec = spec.clone();
        let removed: Vec<(SocketAddrV4, u32)> = st
            .backends
            .iter()
            .filter(|(a, _)| !wanted.contains_key(a))
            .map(|(a, b)| (*a, b.id))
            .collect();
        let added: Vec<BackendSpec> = wanted
            .values()
            .filter(|b| !st.backends.contains_key(&b.addr))
            .map(|b| **b)
            .collect();
        // A container restarted at the same address has a new interface.
        let mut moved = Vec::new();
        for (addr, want) in &wanted {
            if let Some(b) = st.backends.get_mut(addr) {
                b.weight = want.weight;
                b.drained = want.drained;
                if b.via != want.via {
                    b.via = want.via;
                    moved.push(*addr);
                }
            }
        }
        for addr in moved {
            let via = wanted[&addr].via;
            let delivery = self.resolve(addr, via, &spec.name).await?;
            if let Some(b) = self
                .services
                .get_mut(&spec.name)
                .and_then(|s| s.backends.get_mut(&addr))
            {
                b.delivery = delivery;
            }
        }
        for want in added {
            let addr = want.addr;
            // Replies must be recognisable before the first flow reaches it.
            self.rev_nat_add(addr, spec)?;
            let id = self
                .backend_ids
                .alloc()
                .ok_or_else(|| ReconcileError::BackendsFull(spec.name.clone()))?;
            let mut b = Member::new(id, &want);
            b.delivery = self.resolve(addr, want.via, &spec.name).await?;
            let st = self.services.get_mut(&spec.name).expect("present");
            st.backends.insert(addr, b);
            info!(service = spec.name, backend = %addr, id, weight = want.weight, "backend added");
        }
        // Removed backends leave the membership before the table is built, so
        // the flip takes them out; their entries go down only after it.
        let st = self.services.get_mut(&spec.name).expect("present");
        for (addr, _) in &removed {
            st.backends.remove(addr);
        }
        // The filter lets the VIP's packets in before its service entry exists.
        self.write_vip_filter(Some(*spec.vip.ip()))?;
        self.sync_table(&spec.name)?;
        for (addr, id) in removed {
            self.write_backend_down(id)?;
            self.backend_ids.free(id);
            self.rev_nat_remove(addr, spec.protocol, spec.vip)?;
            info!(service = spec.name, backend = %addr, id, "backend removed");
        }
        self.release_container_ifaces();
        Ok(())
    }

    /// The interfaces backends are delivered through.
    fn used_ifindexes(&self) -> BTreeSet<u32> {
        self.services
            .values()
            .flat_map(|s| s.backends.values())
            .filter_map(|m| m.delivery)
            .flat_map(|d| [d.ifindex, d.reply_ifindex])
            .collect()
    }

    /// Detaches the reverse path from container interfaces (a bridge, or a
    /// veth) no backend uses any more (its containers are gone, or left every
    /// service).
    fn release_container_ifaces(&mut self) {
        let used = self.used_ifindexes();
        let unused: Vec<u32> = self
            .container_ifaces
            .iter()
            .filter(|i| !used.contains(i))
            .copied()
            .collect();
        for ifindex in unused {
            self.container_ifaces.remove(&ifindex);
            if let Some(name) = self.ready_ifaces.remove(&ifindex) {
                self.dp.detach_tc(ifindex);
                info!(
                    iface = name,
                    "reverse path detached: no container backend behind it"
                );
            }
        }
        // A gone container's veth takes its GRO state with it.
        self.gro_ready.retain(|i| used.contains(i));
    }

    /// Makes `VIP_FILTER` have a bit for every service's VIP and no other,
    /// writing only the words that change. `extra` is set too: a VIP about
    /// to get its service entry.
    fn write_vip_filter(&mut self, extra: Option<Ipv4Addr>) -> Result<(), ReconcileError> {
        let mut words = vec![0u64; lb_common::VIP_FILTER_WORDS as usize];
        let vips = self
            .services
            .values()
            .map(|s| *s.spec.vip.ip())
            .chain(extra);
        for ip in vips {
            let bit = lb_common::vip_filter_bit(u32::from_ne_bytes(ip.octets()));
            words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        for (i, w) in words.iter().enumerate() {
            if self.vip_filter.as_ref().is_some_and(|old| old[i] == *w) {
                continue;
            }
            self.dp
                .maps
                .vip_filter
                .set(i as u32, w, 0)
                .map_err(map_err(maps::VIP_FILTER))?;
        }
        self.vip_filter = Some(words);
        Ok(())
    }

    /// Brings a service's backend entries and table in step with its state:
    /// backends becoming active are written before the table flips (no new
    /// flow meets a backend that is not ready), the others after it (new
    /// flows avoid a backend before its existing flows move).
    fn sync_table(&mut self, name: &str) -> Result<(), ReconcileError> {
        self.write_backends(name, true)?;
        self.write_table(name)?;
        self.write_backends(name, false)
    }

    fn write_backends(&mut self, name: &str, active: bool) -> Result<(), ReconcileError> {
        let Self { services, dp, .. } = self;
        let st = services.get_mut(name).expect("caller checked");
        for (addr, b) in st.backends.iter_mut() {
            let value = b.value(st.id, *addr);
            if b.written == Some(value) || (value.state == BACKEND_ACTIVE) != active {
                continue;
            }
            dp.maps
                .backends
                .set(b.id, value, 0)
                .map_err(map_err(maps::BACKENDS))?;
            b.written = Some(value);
        }
        Ok(())
    }

    /// Marks a backend as passing or failing its health check.
    pub fn set_health(
        &mut self,
        service: &str,
        addr: SocketAddrV4,
        healthy: bool,
    ) -> Result<(), ReconcileError> {
        let Some(b) = self
            .services
            .get_mut(service)
            .and_then(|s| s.backends.get_mut(&addr))
        else {
            return Ok(());
        };
        if b.healthy == healthy {
            return Ok(());
        }
        b.healthy = healthy;
        if healthy {
            info!(service, backend = %addr, "health check passes: backend back in");
        } else {
            warn!(service, backend = %addr, "health check fails: backend taken out");
        }
        self.sync_table(service)
    }

    fn rev_nat_add(
        &mut self,
        addr: SocketAddrV4,
        spec: &ServiceSpec,
    ) -> Result<(), ReconcileError> {
        let vips = self.rev_nat.entry((addr, spec.protocol)).or_default();
        if vips.contains(&spec.vip) {
            return Ok(());
        }
        if vips.len() >= REV_NAT_MAX {
            return Err(ReconcileError::BackendShared {
                service: spec.name.clone(),
                backend: addr,
                max: REV_NAT_MAX,
            });
        }
        vips.push(spec.vip);
        self.write_rev_nat(addr, spec.protocol)
    }

    fn rev_nat_remove(
        &mut self,
        addr: SocketAddrV4,
        proto: Protocol,
        vip: SocketAddrV4,
    ) -> Result<(), ReconcileError> {
        if let Some(vips) = self.rev_nat.get_mut(&(addr, proto)) {
            vips.retain(|v| *v != vip);
        }
        self.write_rev_nat(addr, proto)
    }

    fn write_rev_nat(&mut self, addr: SocketAddrV4, proto: Protocol) -> Result<(), ReconcileError> {
        let key = ServiceKey::new(addr.ip().octets(), addr.port(), proto.number());
        let vips = self
            .rev_nat
            .get(&(addr, proto))
            .cloned()
            .unwrap_or_default();
        if vips.is_empty() {
            self.rev_nat.remove(&(addr, proto));
            return match self.dp.maps.rev_nat.remove(&key) {
                Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(maps::REV_NAT)(e)),
            };
        }
        let mut value = RevNat {
            count: vips.len() as u32,
            ..RevNat::default()
        };
        for (i, v) in vips.iter().enumerate() {
            value.vip[i] = u32::from_ne_bytes(v.ip().octets());
            value.vport[i] = v.port().to_be();
        }
        self.dp
            .maps
            .rev_nat
            .insert(key, value, 0)
            .map_err(map_err(maps::REV_NAT))
    }

    /// Works out how to reach `addr` and prepares its interface: TC attached
    /// for the replies, and GRO on the veth peer so XDP can deliver to it.
    /// `None` (the backend stays out of the table) when it cannot be reached.
    async fn resolve(
        &mut self,
        addr: SocketAddrV4,
        via: Option<Via>,
        service: &str,
    ) -> Result<Option<Delivery>, ReconcileError> {
        let result = match via {
            Some(via) => self.resolve_container(via).await,
            None => self.try_resolve(*addr.ip()).await,
        };
        match result {
            Ok(d) => Ok(Some(d)),
            Err(ResolveError::Host(e)) => {
                warn!(service, backend = %addr, error = %e, "backend unreachable; kept out of the table until it is");
                Ok(None)
            }
            Err(ResolveError::Datapath(e)) => Err(e.into()),
        }
    }

    /// A container's delivery, from what Docker reported: the host side of
    /// its veth and its MAC, found through its process without asking the
    /// routing table (a bridge port is not what a route names).
    async fn resolve_container(&mut self, via: Via) -> Result<Delivery, ResolveError> {
        let inner = host::container_link(via.pid, via.mac)?;
        let link = host::container_veth(inner.host_ifindex)?;
        // Replies to clients go to the container's gateway: on a bridge
        // network, the bridge itself, whose ingress sees them all. One
        // attachment there serves every container on it; one per veth would
        // put a TCX attach (an RCU grace period, about 8 ms here) on every
        // container's way in.
        let (reply_ifindex, reply_name) = match host::bridge_of(&link.name) {
            Ok(Some(bridge)) => bridge,
            _ => (link.ifindex, link.name.clone()),
        };
        if !self.ready_ifaces.contains_key(&reply_ifindex) {
            let started = std::time::Instant::now();
            self.dp
                .attach_tc(&reply_name, reply_ifindex)
                .map_err(ResolveError::Datapath)?;
            self.container_ifaces.insert(reply_ifindex);
            info!(
                iface = reply_name,
                us = started.elapsed().as_micros() as u64,
                "reverse path attached for containers (TC ingress)"
            );
        }
        self.ready_ifaces.insert(reply_ifindex, reply_name);
        let mut flags = BACKEND_F_MAC | BACKEND_F_PEER;
        if self.xdp_forward {
            if !self.gro_ready.contains(&link.ifindex) {
                let ns = PathBuf::from(format!("/proc/{}/ns/net", via.pid));
                match self.host.ensure_gro(&ns, &inner.name).await {
                    Ok(changed) => {
                        if changed {
                            info!(iface = link.name, peer = inner.name, netns = %ns.display(), "turned GRO on in the backend's namespace so XDP can deliver to it");
                        }
                        self.gro_ready.insert(link.ifindex);
                    }
                    Err(e) => {
                        warn!(iface = link.name, error = %e, "could not prepare the container for XDP; using the skb path");
                    }
                }
            }
            if self.gro_ready.contains(&link.ifindex) {
                flags |= BACKEND_F_XDP;
            }
        }
        Ok(Delivery {
            ifindex: link.ifindex,
            src_mac: link.mac,
            dst_mac: Some(via.mac),
            flags,
            reply_ifindex,
        })
    }

    async fn try_resolve(&mut self, ip: Ipv4Addr) -> Result<Delivery, ResolveError> {
        let route = self.host.route_get(ip).await?;
        let link = self.host.link_by_index(route.ifindex).await?;
        let next_hop = route.gateway.unwrap_or(ip);
        let mut mac = self.host.neighbor(next_hop, link.ifindex).await?;
        if mac.is_none() {
            self.host
                .keep_neighbor_resolved(next_hop, link.ifindex)
                .await?;
            self.managed_neighbors.insert((next_hop, link.ifindex));
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(50)).await;
                mac = self.host.neighbor(next_hop, link.ifindex).await?;
                if mac.is_some() {
                    break;
                }
            }
        }
        let mut flags = 0;
        if mac.is_some() {
            flags |= BACKEND_F_MAC;
        }
        // Only a backend on the veth's own link lives in the peer namespace;
        // behind a gateway the peer is a router this daemon does not own, so
        // it gets the skb path (`bpf_redirect_neigh`) and its devices are
        // left alone.
        let peer = link.veth && link.peer_netnsid.is_some() && route.gateway.is_none();
        if peer {
            flags |= BACKEND_F_PEER;
        }
        if !self.ready_ifaces.contains_key(&link.ifindex) {
            self.dp
                .attach_tc(&link.name, link.ifindex)
                .map_err(ResolveError::Datapath)?;
            info!(iface = link.name, "reverse path attached (TC ingress)");
        }
        if peer && mac.is_some() && self.xdp_forward {
            if !self.gro_ready.contains(&link.ifindex) && self.peer_takes_xdp(&link).await {
                self.gro_ready.insert(link.ifindex);
            }
            if self.gro_ready.contains(&link.ifindex) {
                flags |= BACKEND_F_XDP;
            }
        }
        self.ready_ifaces.insert(link.ifindex, link.name.clone());
        Ok(Delivery {
            ifindex: link.ifindex,
            src_mac: link.mac,
            dst_mac: mac,
            flags,
            reply_ifindex: link.ifindex,
        })
    }

    /// Makes sure the veth peer behind `link` has GRO on; `false` when its
    /// namespace cannot be found or changed (delivery then takes the skb path).
    async fn peer_takes_xdp(&self, link: &host::Link) -> bool {
        let (Some(peer), Some(nsid)) = (link.peer_ifindex, link.peer_netnsid) else {
            return false;
        };
        let result = async {
            let Some(ns) = self.host.find_peer_netns(nsid).await? else {
                return Ok::<_, HostError>(false);
            };
            let Some(peer_link) = self.host.link_in_netns(&ns, peer).await? else {
                return Ok(false);
            };
            if self.host.ensure_gro(&ns, &peer_link.name).await? {
                info!(
                    iface = link.name,
                    peer = peer_link.name,
                    netns = %ns.display(),
                    "turned GRO on in the backend's namespace so XDP can deliver to it"
                );
            }
            Ok(true)
        }
        .await;
        match result {
            Ok(ok) => {
                if !ok {
                    debug!(
                        iface = link.name,
                        "veth peer namespace not found; using the skb path"
                    );
                }
                ok
            }
            Err(e) => {
                warn!(iface = link.name, error = %e, "could not prepare the veth peer for XDP; using the skb path");
                false
            }
        }
    }

    fn write_backend_down(&mut self, id: u32) -> Result<(), ReconcileError> {
        let mut b = self
            .dp
            .maps
            .backends
            .get(&id, 0)
            .map_err(map_err(maps::BACKENDS))?;
        b.state = BACKEND_DOWN;
        self.dp
            .maps
            .backends
            .set(id, b, 0)
            .map_err(map_err(maps::BACKENDS))
    }

    /// Builds the service's table, writes it into the inactive copy and flips.
    fn write_table(&mut self, name: &str) -> Result<(), ReconcileError> {
        let max_table = self.sizes.max_table_size;
        let st = self.services.get_mut(name).expect("caller checked");
        let members: Vec<MaglevBackend> = st
            .backends
            .iter()
            .filter(|(_, b)| b.state() == BACKEND_ACTIVE)
            .map(|(a, b)| MaglevBackend {
                key: maglev_key(*a),
                id: b.id,
                weight: b.weight,
            })
            .collect();
        let size = st.spec.table_size;
        let from = (size, members);
        if st.active.is_some() && st.built_from.as_ref() == Some(&from) {
            return Ok(());
        }
        let (size, members) = from;
        let table = maglev::build(&members, size).map_err(|source| ReconcileError::Maglev {
            service: name.to_owned(),
            source,
        })?;
        if st.active.is_some_and(|a| st.copies[a] == table) {
            st.built_from = Some((size, members));
            return Ok(());
        }
        let copy = st.active.map_or(0, |a| 1 - a);
        let base = (st.id * 2 + copy as u32) * max_table;
        let old = &st.copies[copy];
        let mut written = 0usize;
        let slots = &self.dp.maps.maglev_slots;
        for (i, &slot) in table.iter().enumerate() {
            if old.len() == table.len() && old[i] == slot {
                continue;
            }
            let index = base + i as u32;
            if !slots.set(index, slot) {
                return Err(ReconcileError::Map {
                    name: maps::MAGLEV,
                    source: MapError::OutOfBounds {
                        index,
                        max_entries: slots.len(),
                    },
                });
            }
            written += 1;
        }
        // The stores above are seen before the entry that points at them.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let value = ServiceValue {
            id: st.id,
            table_base: base,
            table_size: size,
            flags: 0,
        };
        self.dp
            .maps
            .services
            .insert(st.key(), value, 0)
            .map_err(map_err(maps::SERVICES))?;
        let in_table = members.len();
        let empty = table.first() == Some(&NO_BACKEND);
        st.copies[copy] = table;
        st.built_from = Some((size, members));
        st.active = Some(copy);
        info!(
            service = name,
            backends = in_table,
            slots_written = written,
            copy,
            "table flipped"
        );
        if empty {
            warn!(
                service = name,
                "no usable backend: new flows are dropped (counted drop_no_backend)"
            );
        }
        Ok(())
    }

    /// Re-resolves backends' delivery (routes, neighbours, veth peers) and
    /// rewrites what changed; a backend that became reachable or
    /// unreachable changes its service's table.
    ///
    /// Each call re-checks at most [`REFRESH_BATCH`] backends, continuing
    /// round-robin where the last call stopped: this runs in the one task
    /// that also answers the API, and re-checking a thousand backends at
    /// once (a few `ip` commands each) kept it from answering for seconds.
    pub async fn refresh(&mut self) -> Result<(), ReconcileError> {
        let all: Vec<(String, SocketAddrV4)> = self
            .services
            .iter()
            .flat_map(|(n, s)| s.backends.keys().map(move |a| (n.clone(), *a)))
            .collect();
        if all.is_empty() {
            return Ok(());
        }
        let batch = next_batch(&all, self.refresh_cursor.as_ref(), REFRESH_BATCH);
        self.refresh_cursor = batch.last().cloned();
        let mut changed: BTreeSet<String> = BTreeSet::new();
        for (name, addr) in batch {
            let via = self
                .services
                .get(&name)
                .and_then(|s| s.backends.get(&addr))
                .and_then(|b| b.via);
            let new = self.resolve(addr, via, &name).await?;
            if let Some(b) = self
                .services
                .get_mut(&name)
                .and_then(|s| s.backends.get_mut(&addr))
            {
                if b.delivery != new {
                    debug!(service = name, backend = %addr, ?new, "backend delivery updated");
                    b.delivery = new;
                    changed.insert(name);
                }
            }
        }
        for name in changed {
            self.sync_table(&name)?;
        }
        Ok(())
    }

    /// Removes the neighbour entries this daemon made managed.
    pub async fn release_neighbors(&mut self) {
        for (addr, ifindex) in std::mem::take(&mut self.managed_neighbors) {
            if let Err(e) = self.host.remove_neighbor(addr, ifindex).await {
                warn!(neighbor = %addr, ifindex, error = %e, "could not remove a managed neighbour entry");
            }
        }
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

enum ResolveError {
    Host(HostError),
    Datapath(DatapathError),
}

impl From<HostError> for ResolveError {
    fn from(e: HostError) -> Self {
        Self::Host(e)
    }
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

    #[test]
    fn ids_are_reused_as_late_as_possible() {
        let mut ids = Ids::new(3);
        assert_eq!(ids.alloc(), Some(0));
        assert_eq!(ids.alloc(), Some(1));
        ids.free(0);
        assert_eq!(ids.alloc(), Some(2));
        assert_eq!(ids.alloc(), Some(0));
        assert_eq!(ids.alloc(), None);
    }

    #[test]
    fn maglev_keys_differ_by_port_and_address() {
        let a: SocketAddrV4 = "198.18.103.2:8080".parse().unwrap();
        let b: SocketAddrV4 = "198.18.103.2:8081".parse().unwrap();
        let c: SocketAddrV4 = "198.18.103.3:8080".parse().unwrap();
        assert_ne!(maglev_key(a), maglev_key(b));
        assert_ne!(maglev_key(a), maglev_key(c));
    }
}
