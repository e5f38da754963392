//! The read side: counters and active flows, read through second handles on
//! the maps (see [`ReadMaps`]) on a blocking thread, never on the control
//! task. The controller hands over a [`ServiceView`] of each service's
//! membership (cheap to make) and answers the caller from here, so a scrape
//! that walks a million flows leaves API changes and Docker events alone.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aya::maps::{MapData, PerCpuArray};
use lb_common::{maps, FLOW_IDLE_SECS};

use crate::{
    api::types::{BackendInfo, Counters, MapStatus, ServiceInfo, ServiceStats, Stats},
    datapath::{global_counters, Maps, ReadMaps},
};

/// One walk of the flow table serves later reads for this many times the
/// walk's own duration: reads then spend at most a tenth of a core walking,
/// however often they come. A small table is walked afresh for nearly every
/// read; a full one (1M entries, about a second a walk) every ten seconds.
pub const FLOW_COUNT_REUSE: u32 = 10;

/// One service as the controller saw it when a read was asked.
#[derive(Clone, Debug)]
pub struct ServiceView {
    /// Its id (index of its counters).
    pub id: u32,
    /// What the API lists.
    pub info: ServiceInfo,
    /// Its backends by id, counters and flows still to fill in.
    pub backends: Vec<(u32, BackendInfo)>,
}

/// One walk of the flow table.
#[derive(Clone, Debug, Default)]
struct FlowCount {
    /// Active flows (a packet in the last [`FLOW_IDLE_SECS`]) by backend id.
    active: Arc<HashMap<u32, u64>>,
    /// Entries in the table, active or not.
    entries: u64,
}

/// Reads counters and flows; shared by the blocking threads that answer.
pub struct Reader {
    maps: ReadMaps,
    /// The last walk: when it ended, how long it took, what it found.
    flows: Mutex<Option<(Instant, Duration, FlowCount)>>,
}

impl Reader {
    /// A reader over second handles on the maps.
    pub fn new(maps: ReadMaps) -> Self {
        Self {
            maps,
            flows: Mutex::new(None),
        }
    }

    /// The flow table's counts, walked again unless the last walk is
    /// younger than [`FLOW_COUNT_REUSE`] times its duration. Readers that
    /// arrive during a walk wait for it rather than start another.
    fn flow_count(&self) -> FlowCount {
        let mut cached = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, took, count)) = cached.as_ref() {
            if at.elapsed() < *took * FLOW_COUNT_REUSE {
                return count.clone();
            }
        }
        let started = Instant::now();
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
            .map(|t| t.tv_sec() as u32)
            .unwrap_or(0);
        let mut active: HashMap<u32, u64> = HashMap::new();
        let mut entries = 0;
        for (_, flow) in self.maps.flows.iter().flatten() {
            entries += 1;
            if now.saturating_sub(flow.last_seen) <= FLOW_IDLE_SECS {
                *active.entry(flow.backend_id).or_default() += 1;
            }
        }
        let count = FlowCount {
            active: Arc::new(active),
            entries,
        };
        *cached = Some((Instant::now(), started.elapsed(), count.clone()));
        count
    }

    fn counters(per_cpu: &PerCpuArray<MapData, lb_common::Counters>, id: u32) -> Counters {
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

    fn fill(&self, backends: Vec<(u32, BackendInfo)>, flows: &FlowCount) -> Vec<BackendInfo> {
        backends
            .into_iter()
            .map(|(id, mut b)| {
                b.active_flows = flows.active.get(&id).copied().unwrap_or(0);
                b.counters = Self::counters(&self.maps.backend_stats, id);
                b
            })
            .collect()
    }

    /// One service's backends with their counters and active flows.
    pub fn backends(&self, view: ServiceView) -> Vec<BackendInfo> {
        let flows = self.flow_count();
        self.fill(view.backends, &flows)
    }

    /// Counters of the services viewed, and the global outcome counters.
    pub fn stats(&self, views: Vec<ServiceView>) -> Stats {
        let flows = self.flow_count();
        let services = views
            .into_iter()
            .map(|v| {
                let backends = self.fill(v.backends, &flows);
                ServiceStats {
                    name: v.info.name,
                    counters: Self::counters(&self.maps.service_stats, v.id),
                    active_flows: backends.iter().map(|b| b.active_flows).sum(),
                    backends,
                }
            })
            .collect();
        let global = global_counters(&self.maps.global_stats)
            .map(|g| g.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
            .unwrap_or_default();
        Stats { services, global }
    }

    /// Fills in the flow table's fill level in `maps`.
    pub fn map_status(&self, mut maps: Vec<MapStatus>) -> Vec<MapStatus> {
        let entries = self.flow_count().entries;
        for m in &mut maps {
            if m.name == maps::FLOWS {
                m.used = entries;
            }
        }
        maps
    }
}
