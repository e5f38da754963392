//! The plan: what the maps must hold for the desired services, and the
//! order of the writes that get them there. Pure: no I/O, no clock; the
//! caller hands in how each new backend is reached and the time, and gets
//! back an ordered list of [`MapOp`]s to apply.
//!
//! Order of writes, so that no packet ever sees an inconsistent state:
//! 1. the VIP filter gains new VIPs, and reverse-NAT entries their new
//!    VIPs, before any flow can reach a backend;
//! 2. backend entries a table will reference are written (active);
//! 3. the service's inactive Maglev copy is written (only the slots that
//!    differ from what that copy already holds);
//! 4. the service entry is replaced as a whole, pointing at that copy: the
//!    flip. A `HASH` map update swaps the element atomically;
//! 5. only then are leaving backends marked draining or down, so flows
//!    still on them move on their next packet, and their reverse entries
//!    and ids released.
//!
//! A freed backend id cools down for [`ID_COOL_DOWN`] before it is given
//! to another backend: a flow that still names it would otherwise follow
//! it to its new tenant.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use lb_common::{
    maps, Backend, RevNat, ServiceKey, ServiceValue, BACKEND_ACTIVE, BACKEND_DOWN,
    BACKEND_DRAINING, BACKEND_F_MAC, FLOW_IDLE_SECS, NO_BACKEND, REV_NAT_MAX, SERVICE_F_DSR,
    VIP_FILTER_WORDS,
};
use tracing::{info, warn};

use super::{read::ServiceView, store::MapOp, MapStore, ReconcileError};
use crate::{
    api::types::{BackendInfo, BackendState, Counters, Health, MapStatus, ServiceInfo},
    datapath::MapSizes,
    events::{BackendMark, Marks, Reason, ServiceMark},
    maglev::{self, MaglevBackend},
    model::{BackendSpec, Forwarding, Protocol, ServiceSpec, Via},
};

/// How long a freed backend id waits before it is handed out again: a flow
/// that carried no packet for this long is no longer counted as active.
pub const ID_COOL_DOWN: Duration = Duration::from_secs(FLOW_IDLE_SECS as u64);

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    Free,
    Used,
    Cooling(Instant),
}

/// Hands out ids round-robin, and a freed id only after it cooled down, so
/// a stale flow pointing at it does not find a new tenant.
#[derive(Debug)]
struct Ids {
    slots: Vec<Slot>,
    next: usize,
}

impl Ids {
    fn new(capacity: u32) -> Self {
        Self {
            slots: vec![Slot::Free; capacity as usize],
            next: 0,
        }
    }

    /// The next free id; when every free id is still cooling, the one that
    /// cooled longest (better than refusing a backend).
    fn alloc(&mut self, now: Instant) -> Option<u32> {
        let n = self.slots.len();
        let ready = (0..n)
            .map(|k| (self.next + k) % n)
            .find(|&i| match self.slots[i] {
                Slot::Free => true,
                Slot::Cooling(until) => until <= now,
                Slot::Used => false,
            });
        let i = ready.or_else(|| {
            (0..n)
                .filter_map(|i| match self.slots[i] {
                    Slot::Cooling(until) => Some((until, i)),
                    _ => None,
                })
                .min()
                .map(|(_, i)| i)
        })?;
        self.slots[i] = Slot::Used;
        self.next = (i + 1) % n;
        Some(i as u32)
    }

    fn claim(&mut self, id: u32) {
        self.slots[id as usize] = Slot::Used;
    }

    fn free(&mut self, id: u32, now: Instant) {
        self.slots[id as usize] = Slot::Cooling(now + ID_COOL_DOWN);
    }

    fn free_now(&mut self, id: u32) {
        self.slots[id as usize] = Slot::Free;
    }
}

/// One backend of one service, and what the map holds for it.
#[derive(Debug)]
pub(super) struct Member {
    pub(super) id: u32,
    pub(super) weight: u32,
    pub(super) delivery: Option<Delivery>,
    /// Drained by the operator.
    pub(super) drained: bool,
    /// Passing its health check (true when the service has none).
    pub(super) healthy: bool,
    /// What the map holds for it, once written.
    written: Option<Backend>,
    /// A container's interface, as Docker reported it.
    pub(super) via: Option<Via>,
}

impl Member {
    fn new(id: u32, spec: &BackendSpec, delivery: Option<Delivery>) -> Self {
        Self {
            id,
            weight: spec.weight,
            delivery,
            drained: spec.drained,
            healthy: true,
            written: None,
            via: spec.via,
        }
    }

    /// What the data path should do with it.
    pub(super) fn state(&self) -> u32 {
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

/// One service and what the maps hold for it.
#[derive(Debug)]
pub(super) struct ServiceState {
    pub(super) spec: ServiceSpec,
    pub(super) id: u32,
    /// Which copy the service entry points at, once written.
    active: Option<usize>,
    /// What each copy of the table holds in the map (empty: unknown).
    copies: [Vec<u32>; 2],
    /// The table size and members the active copy was built from: an
    /// apply that changes neither skips the build (about 1 ms per service
    /// at M = 65,537, paid by every service on every change otherwise).
    built_from: Option<(u32, Vec<MaglevBackend>)>,
    pub(super) backends: BTreeMap<SocketAddrV4, Member>,
    /// The maps hold what `spec` and the members say: an apply whose spec
    /// for it is unchanged has nothing to do for it (with a thousand
    /// services, every change would otherwise visit every backend).
    synced: bool,
}

fn service_key(s: &ServiceSpec) -> ServiceKey {
    ServiceKey::new(s.vip.ip().octets(), s.vip.port(), s.protocol.number())
}

/// The `SERVICE_F_*` bits of a service's entry.
fn service_flags(s: &ServiceSpec) -> u32 {
    match s.forwarding {
        Forwarding::Nat => 0,
        Forwarding::Dsr => SERVICE_F_DSR,
    }
}

/// The key a change of which makes a service another one: removed (its
/// flows forgotten) and added again.
fn identity(s: &ServiceSpec) -> (ServiceKey, Forwarding) {
    (service_key(s), s.forwarding)
}

/// Stable Maglev identity of a backend: its address and port.
fn maglev_key(addr: SocketAddrV4) -> u64 {
    (u64::from(u32::from(*addr.ip())) << 16) | u64::from(addr.port())
}

/// How each backend that is new, or whose container interface changed, is
/// reached; `None` for one that cannot be (it stays out of the table).
pub type Resolved = HashMap<(String, SocketAddrV4), Option<Delivery>>;

/// A backend to find a way to: its service, address and container, and
/// what its service asks of it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ToResolve {
    /// The service's name.
    pub service: String,
    /// The backend's address and port.
    pub addr: SocketAddrV4,
    /// Its container's side of its veth, when Docker told us.
    pub via: Option<Via>,
    /// Under direct server return, the VIP it must accept packets for: it
    /// must sit on a segment of this host, and a container gets the VIP
    /// set up in its namespace.
    pub dsr_vip: Option<Ipv4Addr>,
}

impl ToResolve {
    fn new(spec: &ServiceSpec, addr: SocketAddrV4, via: Option<Via>) -> Self {
        ToResolve {
            service: spec.name.clone(),
            addr,
            via,
            dsr_vip: (spec.forwarding == Forwarding::Dsr).then_some(*spec.vip.ip()),
        }
    }
}

/// The services as the maps hold them, ids, and the planning of writes.
#[derive(Debug)]
pub struct Tables {
    sizes: MapSizes,
    pub(super) services: BTreeMap<String, ServiceState>,
    service_ids: Ids,
    backend_ids: Ids,
    /// What `REV_NAT` holds: the services (VIPs) each backend serves.
    rev_nat: BTreeMap<(SocketAddrV4, Protocol), Vec<SocketAddrV4>>,
    /// What `VIP_FILTER` holds, by word; `None` until first written.
    vip_filter: Option<Vec<u64>>,
    /// Every reverse-NAT entry is written again at the next plan.
    rewrite_rev_nat: bool,
    /// A backend left or is reached another way since
    /// [`Tables::take_members_moved`] last said so: an interface may have
    /// lost its last backend.
    members_moved: bool,
}

impl Tables {
    /// Empty tables for maps of `sizes`.
    pub fn new(sizes: MapSizes) -> Self {
        Self {
            sizes,
            services: BTreeMap::new(),
            service_ids: Ids::new(sizes.max_services),
            backend_ids: Ids::new(sizes.max_backends),
            rev_nat: BTreeMap::new(),
            vip_filter: None,
            rewrite_rev_nat: false,
            members_moved: true,
        }
    }

    /// Whether a backend left or changed interface since the last call
    /// (at first: yes).
    pub fn take_members_moved(&mut self) -> bool {
        std::mem::take(&mut self.members_moved)
    }

    /// The map sizes planned for.
    pub fn sizes(&self) -> &MapSizes {
        &self.sizes
    }

    /// Backends of `desired` that need to be resolved before [`Tables::plan`]:
    /// new ones, and containers whose interface changed (restarted at the
    /// same address).
    pub fn to_resolve<'a>(
        &self,
        desired: impl IntoIterator<Item = &'a ServiceSpec>,
    ) -> Vec<ToResolve> {
        let mut out = Vec::new();
        for spec in desired {
            let st = self
                .services
                .get(&spec.name)
                .filter(|st| identity(&st.spec) == identity(spec));
            if st.is_some_and(|st| st.spec == *spec) {
                continue;
            }
            for b in &spec.backends {
                let known = st.and_then(|st| st.backends.get(&b.addr));
                if known.is_none_or(|m| m.via != b.via) {
                    out.push(ToResolve::new(spec, b.addr, b.via));
                }
            }
        }
        out
    }

    /// Forgets what the maps hold but for which copy each service entry
    /// points at (read back from `store`), so the next plan writes
    /// everything again: after a failed write, the maps are in an unknown
    /// state.
    pub fn forget_written(&mut self, store: &impl MapStore) {
        let entries: HashMap<ServiceKey, ServiceValue> = store.services().into_iter().collect();
        let max_table = self.sizes.max_table_size;
        for st in self.services.values_mut() {
            st.active = entries
                .get(&service_key(&st.spec))
                .filter(|v| v.id == st.id)
                .map(|v| ((v.table_base / max_table) % 2) as usize);
            st.copies = [Vec::new(), Vec::new()];
            st.built_from = None;
            st.synced = false;
            for m in st.backends.values_mut() {
                m.written = None;
            }
        }
        self.vip_filter = None;
        self.rewrite_rev_nat = true;
    }

    /// The writes that make the maps hold exactly `desired`, appended to
    /// `ops` in a safe order. On an error, `ops` holds the writes planned
    /// before it (a consistent prefix) and nothing after. The daemon plans
    /// only what changed ([`Tables::plan_changes`]); tests plan whole states.
    #[cfg(test)]
    pub fn plan(
        &mut self,
        desired: &[ServiceSpec],
        resolved: &Resolved,
        now: Instant,
        ops: &mut Vec<MapOp>,
    ) -> Result<(), ReconcileError> {
        let wanted: std::collections::HashSet<&str> =
            desired.iter().map(|s| s.name.as_str()).collect();
        let gone: Vec<String> = (self.services.keys())
            .filter(|name| !wanted.contains(name.as_str()))
            .cloned()
            .collect();
        let changes: Vec<(&str, Option<&ServiceSpec>)> = (gone.iter())
            .map(|name| (name.as_str(), None))
            .chain(desired.iter().map(|s| (s.name.as_str(), Some(s))))
            .collect();
        self.plan_changes(&changes, resolved, now, ops)
    }

    /// The writes that make the maps hold each service of `changes` as
    /// given (`None`: removed), leaving every other service as it is;
    /// appended to `ops` as [`Tables::plan`] does. A change then costs the
    /// services it names, not all of them.
    pub fn plan_changes(
        &mut self,
        changes: &[(&str, Option<&ServiceSpec>)],
        resolved: &Resolved,
        now: Instant,
        ops: &mut Vec<MapOp>,
    ) -> Result<(), ReconcileError> {
        if std::mem::take(&mut self.rewrite_rev_nat) {
            ops.extend(self.rev_nat.keys().map(|(a, p)| self.rev_nat_op(*a, *p)));
        }
        // The filter lets new VIPs' packets in before their service entries
        // exist; bits of removed VIPs go last, after their services are gone.
        let vips: Vec<Ipv4Addr> = (changes.iter())
            .filter_map(|(_, s)| s.map(|s| *s.vip.ip()))
            .collect();
        self.write_vip_filter(&vips, ops);
        for (name, spec) in changes {
            let gone = self
                .services
                .get(*name)
                .is_some_and(|st| spec.is_none_or(|s| identity(s) != identity(&st.spec)));
            if gone {
                self.remove_service(name, now, ops);
            }
        }
        for spec in changes.iter().filter_map(|(_, s)| *s) {
            self.upsert_service(spec, resolved, now, ops)?;
        }
        self.write_vip_filter(&[], ops);
        Ok(())
    }

    fn remove_service(&mut self, name: &str, now: Instant, ops: &mut Vec<MapOp>) {
        let Some(st) = self.services.remove(name) else {
            return;
        };
        // The key goes first: from then on no packet reaches the backends.
        ops.push(MapOp::RemoveService(service_key(&st.spec)));
        self.members_moved |= !st.backends.is_empty();
        for (addr, b) in &st.backends {
            ops.push(backend_down(b, st.id, *addr));
            self.backend_ids.free(b.id, now);
            self.rev_nat_remove(*addr, st.spec.protocol, st.spec.vip, ops);
        }
        // A service id names counters and table copies only, never a flow.
        self.service_ids.free_now(st.id);
        info!(service = name, "service removed");
    }

    fn upsert_service(
        &mut self,
        spec: &ServiceSpec,
        resolved: &Resolved,
        now: Instant,
        ops: &mut Vec<MapOp>,
    ) -> Result<(), ReconcileError> {
        if !self.services.contains_key(&spec.name) {
            let id = self
                .service_ids
                .alloc(now)
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
                    synced: false,
                },
            );
            info!(service = spec.name, vip = %spec.vip, protocol = %spec.protocol, "service added");
        }
        let st = self.services.get_mut(&spec.name).expect("inserted above");
        if st.synced && st.spec == *spec {
            return Ok(());
        }
        st.synced = false;
        let wanted: BTreeMap<SocketAddrV4, &BackendSpec> =
            spec.backends.iter().map(|b| (b.addr, b)).collect();
        st.spec = spec.clone();
        let removed: Vec<SocketAddrV4> = st
            .backends
            .keys()
            .filter(|a| !wanted.contains_key(a))
            .copied()
            .collect();
        // Another process at a container backend's address (a new
        // container, or the same one restarted) is another backend: it
        // gets an id of its own, with counters from zero.
        let replaced: BTreeSet<SocketAddrV4> = wanted
            .values()
            .filter(|w| {
                st.backends
                    .get(&w.addr)
                    .is_some_and(|b| b.via.map(|v| v.pid) != w.via.map(|v| v.pid))
            })
            .map(|w| w.addr)
            .collect();
        let added: Vec<BackendSpec> = wanted
            .values()
            .filter(|b| !st.backends.contains_key(&b.addr) || replaced.contains(&b.addr))
            .map(|b| **b)
            .collect();
        let lookup =
            |addr: SocketAddrV4| resolved.get(&(spec.name.clone(), addr)).copied().flatten();
        for (addr, want) in &wanted {
            if replaced.contains(addr) {
                continue;
            }
            if let Some(b) = st.backends.get_mut(addr) {
                b.weight = want.weight;
                b.drained = want.drained;
                // The same process with another interface (its network
                // reconnected): reached anew, same backend.
                if b.via != want.via {
                    b.via = want.via;
                    b.delivery = lookup(*addr);
                    self.members_moved = true;
                }
            }
        }
        // Ids first: when the maps are full, nothing of this service changes.
        let mut ids = Vec::with_capacity(added.len());
        for want in &added {
            // Replies must be recognisable before the first flow reaches it.
            let id = self.rev_nat_add(want.addr, spec, ops).and_then(|()| {
                self.backend_ids
                    .alloc(now)
                    .ok_or_else(|| ReconcileError::BackendsFull(spec.name.clone()))
            });
            match id {
                Ok(id) => ids.push(id),
                Err(e) => {
                    for id in ids {
                        self.backend_ids.free_now(id);
                    }
                    return Err(e);
                }
            }
        }
        // Removed and replaced backends leave the membership before the
        // table is built, so the flip takes them out; their entries go down
        // only after it.
        let st = self.services.get_mut(&spec.name).expect("present");
        let mut leaving: Vec<(SocketAddrV4, Member)> = removed
            .iter()
            .filter_map(|a| st.backends.remove(a).map(|m| (*a, m)))
            .collect();
        for (want, id) in added.iter().zip(ids) {
            // The id's counters may still hold an earlier tenant's.
            ops.push(MapOp::ZeroCounters(id));
            let addr = want.addr;
            if let Some(old) = st
                .backends
                .insert(addr, Member::new(id, want, lookup(addr)))
            {
                leaving.push((addr, old));
            }
            info!(service = spec.name, backend = %addr, id, weight = want.weight, "backend added");
        }
        let service_id = st.id;
        self.members_moved |= !leaving.is_empty();
        self.sync(&spec.name, ops)?;
        for (addr, m) in leaving {
            ops.push(backend_down(&m, service_id, addr));
            self.backend_ids.free(m.id, now);
            if replaced.contains(&addr) {
                info!(service = spec.name, backend = %addr, id = m.id, "backend replaced: another process at its address");
            } else {
                self.rev_nat_remove(addr, spec.protocol, spec.vip, ops);
                info!(service = spec.name, backend = %addr, id = m.id, "backend removed");
            }
        }
        Ok(())
    }

    /// Marks a backend as passing or failing its health check; the writes
    /// that follow from it are appended to `ops`.
    pub fn set_health(
        &mut self,
        service: &str,
        addr: SocketAddrV4,
        healthy: bool,
        ops: &mut Vec<MapOp>,
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
        if let Some(st) = self.services.get_mut(service) {
            st.synced = false;
        }
        if healthy {
            info!(service, backend = %addr, "health check passes: backend back in");
        } else {
            warn!(service, backend = %addr, "health check fails: backend taken out");
        }
        self.sync(service, ops)
    }

    /// Sets how a backend is reached (after a refresh found it changed).
    /// Returns whether it changed; the caller then syncs the service.
    pub fn set_delivery(
        &mut self,
        service: &str,
        addr: SocketAddrV4,
        delivery: Option<Delivery>,
    ) -> bool {
        match self
            .services
            .get_mut(service)
            .and_then(|s| s.backends.get_mut(&addr))
        {
            Some(b) if b.delivery != delivery => {
                b.delivery = delivery;
                self.members_moved = true;
                if let Some(st) = self.services.get_mut(service) {
                    st.synced = false;
                }
                true
            }
            _ => false,
        }
    }

    /// Brings a service's backend entries and table in step with its
    /// members: backends becoming active are written before the table
    /// flips (no new flow meets a backend that is not ready), the others
    /// after it (new flows avoid a backend before its existing flows move).
    pub fn sync(&mut self, name: &str, ops: &mut Vec<MapOp>) -> Result<(), ReconcileError> {
        self.write_backends(name, true, ops);
        self.write_table(name, ops)?;
        self.write_backends(name, false, ops);
        if let Some(st) = self.services.get_mut(name) {
            st.synced = true;
        }
        Ok(())
    }

    fn write_backends(&mut self, name: &str, active: bool, ops: &mut Vec<MapOp>) {
        let st = self.services.get_mut(name).expect("caller checked");
        for (addr, b) in st.backends.iter_mut() {
            let value = b.value(st.id, *addr);
            if b.written == Some(value) || (value.state == BACKEND_ACTIVE) != active {
                continue;
            }
            ops.push(MapOp::Backend { id: b.id, value });
            b.written = Some(value);
        }
    }

    /// Builds the service's table, writes it into the inactive copy and flips.
    fn write_table(&mut self, name: &str, ops: &mut Vec<MapOp>) -> Result<(), ReconcileError> {
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
        let crowded = |n: usize, size: u32| n as u64 * 100 > u64::from(size);
        let was_crowded = (st.built_from.as_ref()).is_some_and(|(s, m)| crowded(m.len(), *s));
        if crowded(members.len(), size) && !was_crowded {
            warn!(
                service = name,
                backends = members.len(),
                table_size = size,
                "fewer than 100 Maglev slots a backend: their shares of new flows differ by up to {:.1}%; a table_size of at least {} keeps it under 1%",
                100.0 * members.len() as f64 / f64::from(size),
                members.len() * 100
            );
        }
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
        let writes: Vec<(u32, u32)> = table
            .iter()
            .enumerate()
            .filter(|(i, slot)| old.len() != table.len() || old[*i] != **slot)
            .map(|(i, slot)| (base + i as u32, *slot))
            .collect();
        let written = writes.len();
        ops.push(MapOp::Slots(writes));
        ops.push(MapOp::Service {
            key: service_key(&st.spec),
            value: ServiceValue {
                id: st.id,
                table_base: base,
                table_size: size,
                flags: service_flags(&st.spec),
            },
        });
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

    /// Makes `VIP_FILTER` have a bit for every service's VIP and no other,
    /// writing only the words that change. `extra` are set too: VIPs about
    /// to get their service entries.
    fn write_vip_filter(&mut self, extra: &[Ipv4Addr], ops: &mut Vec<MapOp>) {
        let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
        let vips = self
            .services
            .values()
            .map(|s| *s.spec.vip.ip())
            .chain(extra.iter().copied());
        for ip in vips {
            let bit = lb_common::vip_filter_bit(u32::from_ne_bytes(ip.octets()));
            words[(bit / 64) as usize] |= 1 << (bit % 64);
        }
        for (i, w) in words.iter().enumerate() {
            if self.vip_filter.as_ref().is_some_and(|old| old[i] == *w) {
                continue;
            }
            ops.push(MapOp::VipFilter {
                word: i as u32,
                value: *w,
            });
        }
        self.vip_filter = Some(words);
    }

    fn rev_nat_add(
        &mut self,
        addr: SocketAddrV4,
        spec: &ServiceSpec,
        ops: &mut Vec<MapOp>,
    ) -> Result<(), ReconcileError> {
        // Direct server return: replies come from the VIP itself, never
        // through the balancer.
        if spec.forwarding == Forwarding::Dsr {
            return Ok(());
        }
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
        ops.push(self.rev_nat_op(addr, spec.protocol));
        Ok(())
    }

    fn rev_nat_remove(
        &mut self,
        addr: SocketAddrV4,
        proto: Protocol,
        vip: SocketAddrV4,
        ops: &mut Vec<MapOp>,
    ) {
        if let Some(vips) = self.rev_nat.get_mut(&(addr, proto)) {
            vips.retain(|v| *v != vip);
            if vips.is_empty() {
                self.rev_nat.remove(&(addr, proto));
            }
        }
        ops.push(self.rev_nat_op(addr, proto));
    }

    fn rev_nat_op(&self, addr: SocketAddrV4, proto: Protocol) -> MapOp {
        let key = ServiceKey::new(addr.ip().octets(), addr.port(), proto.number());
        let Some(vips) = self.rev_nat.get(&(addr, proto)) else {
            return MapOp::RemoveRevNat(key);
        };
        let mut value = RevNat {
            count: vips.len() as u32,
            ..RevNat::default()
        };
        for (i, v) in vips.iter().enumerate() {
            value.vip[i] = u32::from_ne_bytes(v.ip().octets());
            value.vport[i] = v.port().to_be();
        }
        MapOp::RevNat { key, value }
    }

    /// Takes over what an earlier daemon left in `store`, before the first
    /// plan: services still desired keep their ids and active table, their
    /// backends keep their ids (flows in the flow table refer to them).
    /// Whatever is no longer desired is planned out, as a removal would.
    /// Returns how many services were taken over.
    pub fn adopt(
        &mut self,
        store: &impl MapStore,
        desired: &[ServiceSpec],
        ops: &mut Vec<MapOp>,
    ) -> Result<usize, ReconcileError> {
        let backends = store.backends();
        let max_table = self.sizes.max_table_size;
        let mut adopted = 0;
        let mut claimed: BTreeSet<u32> = BTreeSet::new();
        for (key, value) in store.services() {
            let spec = desired.iter().find(|s| service_key(s) == key);
            let copy = (value.table_base / max_table).wrapping_sub(value.id * 2);
            let usable = spec.is_some_and(|s| {
                value.id < self.sizes.max_services
                    && value.table_size == s.table_size
                    && value.flags == service_flags(s)
                    && copy < 2
                    && value.table_base == (value.id * 2 + copy) * max_table
                    && !self.services.contains_key(&s.name)
            });
            let Some(spec) = spec.filter(|_| usable) else {
                ops.push(MapOp::RemoveService(key));
                continue;
            };
            let table = (0..value.table_size)
                .map(|i| store.slot(value.table_base + i))
                .collect::<Option<Vec<u32>>>()
                .ok_or_else(|| ReconcileError::Adopt {
                    service: spec.name.clone(),
                })?;
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
                let mut m = Member::new(*id, want, delivery);
                m.written = Some(*b);
                members.insert(addr, m);
                self.backend_ids.claim(*id);
                claimed.insert(*id);
                if spec.forwarding == Forwarding::Nat {
                    self.rev_nat
                        .entry((addr, spec.protocol))
                        .or_default()
                        .push(spec.vip);
                }
            }
            let mut copies = [Vec::new(), Vec::new()];
            copies[copy as usize] = table;
            self.service_ids.claim(value.id);
            self.services.insert(
                spec.name.clone(),
                ServiceState {
                    spec: spec.clone(),
                    id: value.id,
                    active: Some(copy as usize),
                    copies,
                    built_from: None,
                    backends: members,
                    synced: false,
                },
            );
            adopted += 1;
        }
        // Backends no adopted service claims: down, so no flow stays on them.
        for (id, b) in &backends {
            if !claimed.contains(id) && b.state != BACKEND_DOWN {
                ops.push(MapOp::Backend {
                    id: *id,
                    value: Backend {
                        state: BACKEND_DOWN,
                        ..*b
                    },
                });
            }
        }
        Ok(adopted)
    }

    /// After the first plan over an adopted data path: removes reverse-path
    /// entries nothing claimed.
    pub fn finish_adoption(&self, store: &impl MapStore, ops: &mut Vec<MapOp>) {
        for k in store.rev_nat_keys() {
            let addr =
                SocketAddrV4::new(Ipv4Addr::from(k.addr.to_ne_bytes()), u16::from_be(k.port));
            let proto = if k.proto == lb_common::IPPROTO_UDP {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            if !self.rev_nat.contains_key(&(addr, proto)) {
                ops.push(MapOp::RemoveRevNat(k));
            }
        }
    }
}

impl Tables {
    /// The services, as the API lists them.
    pub fn services_info(&self) -> Vec<ServiceInfo> {
        self.services.values().map(service_info).collect()
    }

    /// One service, as the API shows it.
    pub fn service_info(&self, name: &str) -> Option<ServiceInfo> {
        self.services.get(name).map(service_info)
    }

    /// Services (all, or the one named) with their backends, for the read
    /// side to fill in counters; `None` for a name that is not a service.
    pub fn view(&self, name: Option<&str>) -> Option<Vec<ServiceView>> {
        let views: Vec<ServiceView> = self
            .services
            .values()
            .filter(|st| name.is_none_or(|n| n == st.spec.name))
            .map(|st| ServiceView {
                id: st.id,
                info: service_info(st),
                backends: st
                    .backends
                    .iter()
                    .map(|(addr, b)| (b.id, backend_info(st, *addr, b)))
                    .collect(),
            })
            .collect();
        (name.is_none() || !views.is_empty()).then_some(views)
    }

    /// Every service (or those named) as the change log publishes it:
    /// each backend's state and weight, the container `container` names
    /// behind it, and why it is down when it is.
    pub fn marks(
        &self,
        names: Option<&BTreeSet<String>>,
        container: impl Fn(&str, SocketAddrV4) -> Option<String>,
    ) -> Marks {
        let mark = |st: &ServiceState| ServiceMark {
            vip: st.spec.vip.to_string(),
            protocol: st.spec.protocol,
            origin: st.spec.origin,
            backends: st
                .backends
                .iter()
                .map(|(addr, b)| {
                    let state = backend_state(b);
                    let down_why = match (state, b.healthy) {
                        (BackendState::Down, false) => Some(Reason::HealthCheck),
                        (BackendState::Down, true) => Some(Reason::Unreachable),
                        _ => None,
                    };
                    let mark = BackendMark {
                        state,
                        weight: b.weight,
                        container: container(&st.spec.name, *addr),
                        down_why,
                    };
                    (*addr, mark)
                })
                .collect(),
        };
        match names {
            Some(names) => names
                .iter()
                .filter_map(|n| self.services.get_key_value(n))
                .map(|(n, st)| (n.clone(), mark(st)))
                .collect(),
            None => self
                .services
                .iter()
                .map(|(n, st)| (n.clone(), mark(st)))
                .collect(),
        }
    }

    /// Fill levels of the maps planned here; the flow table's is left at 0
    /// for the read side.
    pub fn map_status(&self) -> Vec<MapStatus> {
        let backends: u64 = self
            .services
            .values()
            .map(|s| s.backends.len() as u64)
            .sum();
        let slots: u64 = self
            .services
            .values()
            .map(|s| 2 * u64::from(s.spec.table_size))
            .sum();
        let status = |name: &str, used: u64, capacity: u32| MapStatus {
            name: name.into(),
            used,
            capacity: capacity.into(),
        };
        vec![
            status(
                maps::SERVICES,
                self.services.len() as u64,
                self.sizes.max_services,
            ),
            status(maps::BACKENDS, backends, self.sizes.max_backends),
            status(maps::MAGLEV, slots, self.sizes.maglev_slots()),
            status(maps::FLOWS, 0, self.sizes.flow_table_size),
            status(
                maps::REV_NAT,
                self.rev_nat.len() as u64,
                self.sizes.max_backends,
            ),
        ]
    }

    /// The interfaces backends are delivered through (egress and replies).
    pub fn used_ifindexes(&self) -> BTreeSet<u32> {
        self.members()
            .filter_map(|m| m.delivery)
            .flat_map(|d| [d.ifindex, d.reply_ifindex])
            .collect()
    }

    /// Every (service, backend, container interface) delivered through one
    /// of `ifindexes` (egress or replies), e.g. interfaces that are gone.
    pub fn backends_through(&self, ifindexes: &BTreeSet<u32>) -> Vec<ToResolve> {
        let through = |m: &Member| {
            m.delivery.is_some_and(|d| {
                ifindexes.contains(&d.ifindex) || ifindexes.contains(&d.reply_ifindex)
            })
        };
        self.services
            .values()
            .flat_map(|s| {
                s.backends
                    .iter()
                    .filter(move |(_, m)| through(m))
                    .map(move |(a, m)| ToResolve::new(&s.spec, *a, m.via))
            })
            .collect()
    }

    /// The reply interfaces of container backends.
    pub fn container_ifindexes(&self) -> BTreeSet<u32> {
        self.members()
            .filter(|m| m.via.is_some())
            .filter_map(|m| m.delivery.map(|d| d.reply_ifindex))
            .collect()
    }

    fn members(&self) -> impl Iterator<Item = &Member> {
        self.services.values().flat_map(|s| s.backends.values())
    }

    /// Every (service, backend, container interface), in order, for the
    /// periodic re-check of delivery.
    pub fn backends(&self) -> Vec<ToResolve> {
        self.services
            .values()
            .flat_map(|s| (s.backends.iter()).map(move |(a, m)| ToResolve::new(&s.spec, *a, m.via)))
            .collect()
    }
}

fn service_info(st: &ServiceState) -> ServiceInfo {
    ServiceInfo {
        name: st.spec.name.clone(),
        vip: st.spec.vip.to_string(),
        protocol: st.spec.protocol,
        table_size: st.spec.table_size,
        origin: st.spec.origin,
        image: st.spec.image.as_ref().map(|r| r.image.clone()),
        target_port: st.spec.image.as_ref().map(|r| r.target_port),
        health: st.spec.health.clone(),
        forwarding: st.spec.forwarding,
        backends: st.backends.len(),
        active_backends: st
            .backends
            .values()
            .filter(|b| b.state() == BACKEND_ACTIVE)
            .count(),
    }
}

fn backend_info(st: &ServiceState, addr: SocketAddrV4, b: &Member) -> BackendInfo {
    BackendInfo {
        address: addr.to_string(),
        weight: b.weight,
        state: backend_state(b),
        health: match (st.spec.health.is_some(), b.healthy) {
            (false, _) => Health::Unchecked,
            (true, true) => Health::Healthy,
            (true, false) => Health::Unhealthy,
        },
        last_check: None,
        active_flows: 0,
        counters: Counters::default(),
        container: None,
        node: None,
    }
}

fn backend_state(b: &Member) -> BackendState {
    match b.state() {
        BACKEND_ACTIVE => BackendState::Active,
        BACKEND_DRAINING => BackendState::Draining,
        _ => BackendState::Down,
    }
}

/// A leaving backend's entry, down: flows still naming it move on their
/// next packet.
fn backend_down(m: &Member, service_id: u32, addr: SocketAddrV4) -> MapOp {
    let mut value = m.written.unwrap_or_else(|| m.value(service_id, addr));
    value.state = BACKEND_DOWN;
    MapOp::Backend { id: m.id, value }
}

#[cfg(test)]
mod tests;
