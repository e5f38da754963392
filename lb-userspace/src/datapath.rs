//! Loading the eBPF object, sizing and owning its maps, attaching programs.
//!
//! The object is embedded in the `lb` binary at build time (see `build.rs`),
//! so the binary and its data path can never be out of step.

use std::collections::HashMap as StdHashMap;

use aya::{
    maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        tc::{SchedClassifierLinkId, TcAttachType},
        xdp::XdpLinkId,
        ProgramError, SchedClassifier, Xdp, XdpMode,
    },
    util::nr_cpus,
    Ebpf, EbpfError, EbpfLoader,
};
use lb_common::{
    defaults, maps, programs, stat, Backend, Counters, Flow, FlowKey, RevNat, ServiceKey,
    ServiceValue,
};

/// The data path object, built by `build.rs` (empty when built without bpf-linker).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-datapath"));

/// Errors of loading, attaching and reading the data path.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// This binary was built without its eBPF object.
    #[error("this lb binary was built without its data path (bpf-linker was missing); run `cargo xtask setup` and rebuild")]
    NoObject,
    /// The kernel refused the object or one of its maps.
    #[error("loading the eBPF object")]
    Load(#[source] EbpfError),
    /// A map the code expects is not in the object.
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    /// A map has another type than expected.
    #[error("map {name}")]
    Map {
        /// The map's name.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: MapError,
    },
    /// A program is missing, failed verification or failed to attach.
    #[error("{what}")]
    Program {
        /// What was being done, e.g. "attaching lb_xdp_fwd to eth1".
        what: String,
        /// What went wrong.
        #[source]
        source: ProgramError,
    },
    /// The number of CPUs could not be read.
    #[error("reading the number of possible CPUs: {0}")]
    Cpus(String),
}

/// Map capacities, fixed when the object is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    /// Services the maps can hold.
    pub max_services: u32,
    /// Backends over all services.
    pub max_backends: u32,
    /// Largest Maglev table a service may use.
    pub max_table_size: u32,
    /// Entries in each flow table.
    pub flow_table_size: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_services: defaults::MAX_SERVICES,
            max_backends: defaults::MAX_BACKENDS,
            max_table_size: defaults::TABLE_SIZE,
            flow_table_size: defaults::FLOW_TABLE_SIZE,
        }
    }
}

impl MapSizes {
    /// Slots of the Maglev array: two tables per service.
    pub fn maglev_slots(&self) -> u32 {
        self.max_services * 2 * self.max_table_size
    }
}

/// Typed handles on every map, owned by whoever writes them (the reconcile loop).
pub struct Maps {
    /// Services by (VIP, port, protocol).
    pub services: HashMap<MapData, ServiceKey, ServiceValue>,
    /// Backends by id.
    pub backends: Array<MapData, Backend>,
    /// Every service's two Maglev tables.
    pub maglev: Array<MapData, u32>,
    /// Forward flow table.
    pub flows: HashMap<MapData, FlowKey, Flow>,
    /// Services each backend address:port serves, for the reverse path.
    pub rev_nat: HashMap<MapData, ServiceKey, RevNat>,
    /// Per-CPU counters by service id.
    pub service_stats: PerCpuArray<MapData, Counters>,
    /// Per-CPU counters by backend id.
    pub backend_stats: PerCpuArray<MapData, Counters>,
    /// Per-CPU outcome counters.
    pub global_stats: PerCpuArray<MapData, u64>,
    /// Flags of the interfaces `lb` attached to.
    pub ifaces: HashMap<MapData, u32, u32>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            services: take(ebpf, maps::SERVICES)?,
            backends: take(ebpf, maps::BACKENDS)?,
            maglev: take(ebpf, maps::MAGLEV)?,
            flows: take(ebpf, maps::FLOWS)?,
            rev_nat: take(ebpf, maps::REV_NAT)?,
            service_stats: take(ebpf, maps::SERVICE_STATS)?,
            backend_stats: take(ebpf, maps::BACKEND_STATS)?,
            global_stats: take(ebpf, maps::GLOBAL_STATS)?,
            ifaces: take(ebpf, maps::IFACES)?,
        })
    }

    /// Sums a per-CPU counter array entry over all CPUs.
    pub fn sum_counters(values: &PerCpuValues<Counters>) -> Counters {
        values.iter().fold(Counters::default(), |a, c| Counters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            new_flows: a.new_flows + c.new_flows,
        })
    }

    /// The global outcome counters, summed over CPUs, by name.
    pub fn global_counters(&self) -> Result<Vec<(&'static str, u64)>, DatapathError> {
        (0..stat::COUNT)
            .map(|i| {
                let v = self
                    .global_stats
                    .get(&i, 0)
                    .map_err(|source| DatapathError::Map {
                        name: maps::GLOBAL_STATS,
                        source,
                    })?;
                Ok((stat::NAMES[i as usize], v.iter().sum()))
            })
            .collect()
    }
}

/// Loads (verifies) program `name` unless it already is loaded.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DatapathError> {
    let what = || format!("loading program {name} (verifier)");
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Program {
            what: what(),
            source: ProgramError::UnexpectedProgramType,
        })?;
    if prog.fd().is_ok() {
        return Ok(());
    }
    match prog {
        aya::programs::Program::Xdp(p) => p.load(),
        aya::programs::Program::SchedClassifier(p) => p.load(),
        _ => Err(ProgramError::UnexpectedProgramType),
    }
    .map_err(|source| DatapathError::Program {
        what: what(),
        source,
    })
}

/// The loaded data path: programs, maps and attachments. Dropping it detaches
/// every program (all attachments are bpf links owned by this process).
pub struct Datapath {
    ebpf: Ebpf,
    /// The maps, for the reconcile loop.
    pub maps: Maps,
    xdp_links: StdHashMap<u32, XdpLinkId>,
    tc_links: StdHashMap<u32, SchedClassifierLinkId>,
}

impl Datapath {
    /// Loads the embedded object with the given map sizes and loads (verifies)
    /// both programs, attaching nothing yet.
    pub fn load(sizes: &MapSizes) -> Result<Self, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        // Per-CPU maps hold a value per possible CPU: make sure we can count them.
        nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e.to_string()))?;
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(maps::SERVICES, sizes.max_services)
            .map_max_entries(maps::SERVICE_STATS, sizes.max_services)
            .map_max_entries(maps::BACKENDS, sizes.max_backends)
            .map_max_entries(maps::BACKEND_STATS, sizes.max_backends)
            .map_max_entries(maps::MAGLEV, sizes.maglev_slots())
            .map_max_entries(maps::REV_NAT, sizes.max_backends)
            .map_max_entries(maps::FLOWS, sizes.flow_table_size)
            .load(OBJECT)
            .map_err(DatapathError::Load)?;
        for name in [programs::XDP_FORWARD, programs::TC] {
            load_program(&mut ebpf, name)?;
        }
        let maps = Maps::take(&mut ebpf)?;
        Ok(Self {
            ebpf,
            maps,
            xdp_links: StdHashMap::new(),
            tc_links: StdHashMap::new(),
        })
    }

    /// The XDP forward program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn xdp_program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(programs::XDP_FORWARD)
            .and_then(|p| p.try_into().ok())
            .expect("the object has an XDP forward program (checked at load)")
    }

    /// The TC program, e.g. for `BPF_PROG_TEST_RUN`.
    pub fn tc_program(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(programs::TC)
            .and_then(|p| p.try_into().ok())
            .expect("the object has a TC program (checked at load)")
    }

    /// The empty XDP program (loaded on first use): the floor of the
    /// per-packet benchmarks.
    pub fn xdp_noop(&mut self) -> Result<&mut Xdp, DatapathError> {
        load_program(&mut self.ebpf, programs::XDP_NOOP)?;
        Ok(self
            .ebpf
            .program_mut(programs::XDP_NOOP)
            .and_then(|p| p.try_into().ok())
            .expect("loaded above as XDP"))
    }

    /// The empty TC program (loaded on first use).
    pub fn tc_noop(&mut self) -> Result<&mut SchedClassifier, DatapathError> {
        load_program(&mut self.ebpf, programs::TC_NOOP)?;
        Ok(self
            .ebpf
            .program_mut(programs::TC_NOOP)
            .and_then(|p| p.try_into().ok())
            .expect("loaded above as TC"))
    }

    /// Attaches the XDP forward program to `iface`.
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpMode,
    ) -> Result<(), DatapathError> {
        if self.xdp_links.contains_key(&ifindex) {
            return Ok(());
        }
        let id = self
            .xdp_program()
            .attach_to_if_index(ifindex, mode)
            .map_err(|source| DatapathError::Program {
                what: format!("attaching XDP to {iface} in {mode:?} mode"),
                source,
            })?;
        self.xdp_links.insert(ifindex, id);
        Ok(())
    }

    /// Attaches the TC program to `iface`'s ingress.
    pub fn attach_tc(&mut self, iface: &str, ifindex: u32) -> Result<(), DatapathError> {
        if self.tc_links.contains_key(&ifindex) {
            return Ok(());
        }
        let id = self
            .tc_program()
            .attach(iface, TcAttachType::Ingress)
            .map_err(|source| DatapathError::Program {
                what: format!("attaching TC ingress to {iface}"),
                source,
            })?;
        self.tc_links.insert(ifindex, id);
        Ok(())
    }

    /// Records `IFACE_F_*` flags for `ifindex` for the programs to read.
    pub fn set_iface_flags(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
        self.maps
            .ifaces
            .insert(ifindex, flags, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::IFACES,
                source,
            })
    }

    /// Interfaces with the XDP program attached.
    pub fn xdp_ifindexes(&self) -> impl Iterator<Item = u32> + '_ {
        self.xdp_links.keys().copied()
    }

    /// Interfaces with the TC program attached.
    pub fn tc_ifindexes(&self) -> impl Iterator<Item = u32> + '_ {
        self.tc_links.keys().copied()
    }
}
