//! Where a plan's map operations land: the data path's maps, or an
//! in-memory store that checks, after every single operation, that a packet
//! arriving at that moment would find a consistent state.

use std::sync::atomic::{fence, Ordering};

use aya::maps::MapError;
use lb_common::{maps, Backend, RevNat, ServiceKey, ServiceValue};

use crate::datapath::Maps;

/// One write to the data path's maps. A plan is an ordered list of these;
/// the order is what keeps every packet's view consistent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Write backend `id`'s entry.
    Backend {
        /// Backend id (index into `LB_BACKENDS`).
        id: u32,
        /// The whole entry.
        value: Backend,
    },
    /// Set backend `id`'s counters to zero, before a new backend uses the id.
    ZeroCounters(u32),
    /// Write slots of the Maglev array, as (absolute index, backend id).
    Slots(Vec<(u32, u32)>),
    /// Insert or replace a service entry: the flip to a table copy.
    Service {
        /// VIP, port and protocol.
        key: ServiceKey,
        /// Id and table copy.
        value: ServiceValue,
    },
    /// Remove a service entry.
    RemoveService(ServiceKey),
    /// Insert or replace the services a backend address serves.
    RevNat {
        /// Backend address, port and protocol.
        key: ServiceKey,
        /// Its VIPs.
        value: RevNat,
    },
    /// Remove a backend address's reverse entry.
    RemoveRevNat(ServiceKey),
    /// Write one word of the VIP filter bitmap.
    VipFilter {
        /// Word index.
        word: u32,
        /// Its bits.
        value: u64,
    },
}

/// A failed map write.
#[derive(Debug, thiserror::Error)]
#[error("writing map {map}")]
pub struct StoreError {
    /// The map.
    pub map: &'static str,
    /// What went wrong.
    #[source]
    pub source: MapError,
}

/// What a plan is applied to. Reads serve adoption of a running data path.
pub trait MapStore {
    /// Carries out one operation.
    fn write(&mut self, op: &MapOp) -> Result<(), StoreError>;
    /// Every service entry.
    fn services(&self) -> Vec<(ServiceKey, ServiceValue)>;
    /// Every backend entry that is not all zeroes, by id.
    fn backends(&self) -> Vec<(u32, Backend)>;
    /// Maglev slot `index`, `None` past the end.
    fn slot(&self, index: u32) -> Option<u32>;
    /// Every reverse-NAT key.
    fn rev_nat_keys(&self) -> Vec<ServiceKey>;
}

/// Applies `ops` in order; stops at the first failure.
pub fn apply(store: &mut impl MapStore, ops: &[MapOp]) -> Result<(), StoreError> {
    ops.iter().try_for_each(|op| store.write(op))
}

fn err(map: &'static str) -> impl FnOnce(MapError) -> StoreError {
    move |source| StoreError { map, source }
}

/// A missing key is what a removal wants.
fn removed(r: Result<(), MapError>, map: &'static str) -> Result<(), StoreError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(source) => Err(StoreError { map, source }),
    }
}

impl MapStore for Maps {
    fn write(&mut self, op: &MapOp) -> Result<(), StoreError> {
        match op {
            MapOp::Backend { id, value } => self
                .backends
                .set(*id, value, 0)
                .map_err(err(maps::BACKENDS)),
            MapOp::ZeroCounters(id) => self
                .zero_backend_counters(*id)
                .map_err(err(maps::BACKEND_STATS)),
            MapOp::Slots(writes) => {
                for &(index, id) in writes {
                    if !self.maglev_slots.set(index, id) {
                        return Err(StoreError {
                            map: maps::MAGLEV,
                            source: MapError::OutOfBounds {
                                index,
                                max_entries: self.maglev_slots.len(),
                            },
                        });
                    }
                }
                Ok(())
            }
            MapOp::Service { key, value } => {
                // The slots' plain stores are seen before the entry that
                // points at them.
                fence(Ordering::SeqCst);
                self.services
                    .insert(key, value, 0)
                    .map_err(err(maps::SERVICES))
            }
            MapOp::RemoveService(key) => removed(self.services.remove(key), maps::SERVICES),
            MapOp::RevNat { key, value } => self
                .rev_nat
                .insert(key, value, 0)
                .map_err(err(maps::REV_NAT)),
            MapOp::RemoveRevNat(key) => removed(self.rev_nat.remove(key), maps::REV_NAT),
            MapOp::VipFilter { word, value } => self
                .vip_filter
                .set(*word, value, 0)
                .map_err(err(maps::VIP_FILTER)),
        }
    }

    fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
        self.services.iter().flatten().collect()
    }

    fn backends(&self) -> Vec<(u32, Backend)> {
        self.backends
            .iter()
            .enumerate()
            .filter_map(|(id, b)| b.ok().map(|b| (id as u32, b)))
            .filter(|(_, b)| *b != Backend::default())
            .collect()
    }

    fn slot(&self, index: u32) -> Option<u32> {
        self.maglev_slots.get(index)
    }

    fn rev_nat_keys(&self) -> Vec<ServiceKey> {
        self.rev_nat.keys().flatten().collect()
    }
}

#[cfg(test)]
pub use mem::MemStore;

#[cfg(test)]
mod mem {
    use std::collections::{BTreeMap, HashMap};

    use lb_common::{vip_filter_bit, BACKEND_ACTIVE, BACKEND_DRAINING, NO_BACKEND, SERVICE_F_DSR};

    use super::*;

    /// The maps as plain collections. With `check` on, every write is
    /// followed by [`MemStore::consistent`], and the first inconsistency
    /// (with the operation that caused it) is kept.
    #[derive(Debug, Default)]
    pub struct MemStore {
        /// Service entries.
        pub services: HashMap<ServiceKey, ServiceValue>,
        /// Backend entries by id.
        pub backends: BTreeMap<u32, Backend>,
        /// The Maglev array.
        pub slots: Vec<u32>,
        /// Reverse-NAT entries.
        pub rev_nat: HashMap<ServiceKey, RevNat>,
        /// VIP filter words.
        pub vip_filter: BTreeMap<u32, u64>,
        /// Check after every write.
        pub check: bool,
        /// The first inconsistency seen, with the operation after which.
        pub broken: Option<String>,
        /// Operations carried out.
        pub writes: usize,
        /// Backend ids whose counters were set to zero, in order.
        pub zeroed: Vec<u32>,
    }

    impl MemStore {
        /// A store with a Maglev array of `slots` entries.
        pub fn new(slots: u32) -> Self {
            Self {
                slots: vec![0; slots as usize],
                check: true,
                ..Self::default()
            }
        }

        /// What a packet arriving now would need: every slot of every
        /// service's active table names an active backend of that service
        /// (or no backend); every backend a flow may be sent to (active or
        /// draining) has its replies recognised; every VIP passes the
        /// filter.
        pub fn consistent(&self) -> Result<(), String> {
            for (key, svc) in &self.services {
                let bit = vip_filter_bit(key.addr);
                let word = self.vip_filter.get(&(bit / 64)).copied().unwrap_or(0);
                if word & (1 << (bit % 64)) == 0 {
                    return Err(format!("service {key:?} is not in the VIP filter"));
                }
                for i in 0..svc.table_size {
                    let index = svc.table_base + i;
                    let id = *self
                        .slots
                        .get(index as usize)
                        .ok_or(format!("service {key:?}: slot {index} out of the array"))?;
                    if id == NO_BACKEND {
                        continue;
                    }
                    let b = self.backends.get(&id).ok_or(format!(
                        "service {key:?}: slot {index} names backend {id}, which has no entry"
                    ))?;
                    if b.service_id != svc.id || b.state != BACKEND_ACTIVE {
                        return Err(format!(
                            "service {key:?} (id {}): slot {index} names backend {id} {b:?}",
                            svc.id
                        ));
                    }
                }
            }
            for (id, b) in &self.backends {
                if b.state != BACKEND_ACTIVE && b.state != BACKEND_DRAINING {
                    continue;
                }
                let Some((key, svc)) = self.services.iter().find(|(_, s)| s.id == b.service_id)
                else {
                    continue;
                };
                // Direct server return: no reply comes back this way.
                if svc.flags & SERVICE_F_DSR != 0 {
                    continue;
                }
                let rev = ServiceKey {
                    addr: b.addr,
                    port: b.port,
                    proto: key.proto,
                    _pad: 0,
                };
                let serves = self.rev_nat.get(&rev).is_some_and(|r| {
                    (0..r.count as usize).any(|i| r.vip[i] == key.addr && r.vport[i] == key.port)
                });
                if !serves {
                    return Err(format!(
                        "backend {id} {b:?} can take flows of {key:?} but its replies are not recognised"
                    ));
                }
            }
            Ok(())
        }
    }

    impl MapStore for MemStore {
        fn write(&mut self, op: &MapOp) -> Result<(), StoreError> {
            match op {
                MapOp::Backend { id, value } => {
                    self.backends.insert(*id, *value);
                }
                MapOp::ZeroCounters(id) => {
                    self.zeroed.push(*id);
                }
                MapOp::Slots(writes) => {
                    for &(index, id) in writes {
                        let len = self.slots.len() as u32;
                        *self.slots.get_mut(index as usize).ok_or(StoreError {
                            map: maps::MAGLEV,
                            source: MapError::OutOfBounds {
                                index,
                                max_entries: len,
                            },
                        })? = id;
                    }
                }
                MapOp::Service { key, value } => {
                    self.services.insert(*key, *value);
                }
                MapOp::RemoveService(key) => {
                    self.services.remove(key);
                }
                MapOp::RevNat { key, value } => {
                    self.rev_nat.insert(*key, *value);
                }
                MapOp::RemoveRevNat(key) => {
                    self.rev_nat.remove(key);
                }
                MapOp::VipFilter { word, value } => {
                    self.vip_filter.insert(*word, *value);
                }
            }
            self.writes += 1;
            if self.check && self.broken.is_none() {
                if let Err(e) = self.consistent() {
                    self.broken = Some(format!("after write {} ({op:?}): {e}", self.writes));
                }
            }
            Ok(())
        }

        fn services(&self) -> Vec<(ServiceKey, ServiceValue)> {
            self.services.iter().map(|(k, v)| (*k, *v)).collect()
        }

        fn backends(&self) -> Vec<(u32, Backend)> {
            self.backends
                .iter()
                .filter(|(_, b)| **b != Backend::default())
                .map(|(k, v)| (*k, *v))
                .collect()
        }

        fn slot(&self, index: u32) -> Option<u32> {
            self.slots.get(index as usize).copied()
        }

        fn rev_nat_keys(&self) -> Vec<ServiceKey> {
            self.rev_nat.keys().copied().collect()
        }
    }
}
