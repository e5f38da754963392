//! Loading the eBPF object, sizing and owning its maps, attaching programs.
//!
//! The object is embedded in the `lb` binary at build time (see `build.rs`),
//! so the binary and its data path can never be out of step.

use std::{
    collections::HashMap as StdHashMap,
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, IterableMap, MapData, MapError, PerCpuArray, PerCpuValues},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
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
    /// A second handle on a map could not be made.
    #[error("duplicating the handle of map {name}")]
    Dup {
        /// The map.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// This binary was built without its eBPF object.
    #[error("this lb binary was built without its data path (bpf-linker was missing); run `cargo xtask setup` and rebuild")]
    NoObject,
    /// The kernel refused the object or one of its maps.
    #[error("loading the eBPF object")]
    Load(#[source] EbpfError),
    /// A map the code expects is not in the object.
    #[error("map {0} missing from the eBPF object")]
    MissingMap(&'static str),
    /// A map could not be mapped into memory.
    #[error("mapping map {name} into memory")]
    Mmap {
        /// The map.
        name: &'static str,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
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
    /// Pinning in bpffs, or reading pins back, failed.
    #[error("{what}")]
    Pin {
        /// What was being done.
        what: String,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn pin_err<E: std::error::Error + Send + Sync + 'static>(
    what: String,
) -> impl FnOnce(E) -> DatapathError {
    move |e| DatapathError::Pin {
        what,
        source: Box::new(e),
    }
}

/// Version of the map layout in `lb-common`. A pin directory written with
/// another version (or other map sizes) is never adopted.
const MAPS_ABI: u32 = 7;

/// The name of the directory, under the pin path, that holds the pins of a
/// data path with these sizes. bpffs holds no regular files, so the layout
/// version and sizes that decide whether pins can be reused live in the name.
fn format_dir(sizes: &MapSizes) -> String {
    format!(
        "abi{MAPS_ABI}-s{}-b{}-t{}-f{}",
        sizes.max_services, sizes.max_backends, sizes.max_table_size, sizes.flow_table_size
    )
}

/// Whether `name` is a pin directory as [`format_dir`] names them, of this
/// layout version or any other (`abi<N>-…`).
fn is_layout_dir(name: &str) -> bool {
    name.strip_prefix("abi")
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(v, _)| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
}

/// Every map of the object, all pinned when the data path is pinned.
const ALL_MAPS: [&str; 10] = [
    maps::SERVICES,
    maps::BACKENDS,
    maps::MAGLEV,
    maps::FLOWS,
    maps::REV_NAT,
    maps::SERVICE_STATS,
    maps::BACKEND_STATS,
    maps::GLOBAL_STATS,
    maps::IFACES,
    maps::VIP_FILTER,
];

/// Where a program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Hook {
    Xdp,
    Tc,
}

impl Hook {
    fn name(self) -> &'static str {
        match self {
            Hook::Xdp => "xdp",
            Hook::Tc => "tc",
        }
    }
}

/// The name of a pinned link: `{hook}-{ifindex}-{interface}`. The
/// interface's name is kept so that, once the interface is gone, the
/// warning about its leftover link can still say which it was. bpffs
/// refuses names with a dot, which interface names may have (`eth0.100`):
/// `.` and `%` are written `%2e` and `%25`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct LinkPin {
    hook: Hook,
    ifindex: u32,
    /// `None` for a pin written before names were kept (`tc-12`).
    iface: Option<String>,
}

impl LinkPin {
    fn file_name(&self) -> String {
        let mut name = format!("{}-{}", self.hook.name(), self.ifindex);
        if let Some(iface) = &self.iface {
            name.push('-');
            for c in iface.chars() {
                match c {
                    '.' => name.push_str("%2e"),
                    '%' => name.push_str("%25"),
                    c => name.push(c),
                }
            }
        }
        name
    }

    fn parse(name: &str) -> Option<LinkPin> {
        let (kind, rest) = name.split_once('-')?;
        let hook = match kind {
            "xdp" => Hook::Xdp,
            "tc" => Hook::Tc,
            _ => return None,
        };
        let (index, iface) = match rest.split_once('-') {
            Some((index, iface)) => (index, Some(unescape(iface)?)),
            None => (rest, None),
        };
        Some(LinkPin {
            hook,
            ifindex: index.parse().ok()?,
            iface,
        })
    }

    /// The interface, for messages: its name, or its index when the pin
    /// does not say.
    fn iface_label(&self) -> String {
        match &self.iface {
            Some(name) => name.clone(),
            None => format!("(index {})", self.ifindex),
        }
    }
}

/// Undoes the escaping of [`LinkPin::file_name`]; `None` for a malformed name.
fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3)?;
        out.push(char::from(u8::from_str_radix(code, 16).ok()?));
        rest = &rest[at + 3..];
    }
    out.push_str(rest);
    (!out.is_empty()).then_some(out)
}

/// What became of the interface a pinned link was made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinkTarget {
    /// Still attached to the interface its pin names, which exists.
    Attached,
    /// The kernel cut the link when its interface went (deleted, or its
    /// namespace removed): it reports no interface.
    Severed,
    /// Attached to another interface than its pin names.
    Elsewhere(u32),
    /// Its interface index no longer names an interface here.
    Missing,
}

impl LinkTarget {
    /// From the interface the kernel reports for the link (`0`: none) and
    /// whether the pin's interface index still names an interface.
    fn judge(pinned: u32, reported: u32, exists: bool) -> LinkTarget {
        match reported {
            0 => LinkTarget::Severed,
            i if i != pinned => LinkTarget::Elsewhere(i),
            _ if !exists => LinkTarget::Missing,
            _ => LinkTarget::Attached,
        }
    }

    fn reason(self) -> String {
        match self {
            LinkTarget::Attached => "attached".into(),
            LinkTarget::Severed => "its interface is gone (the link was severed)".into(),
            LinkTarget::Elsewhere(i) => format!("it is attached to interface index {i} instead"),
            LinkTarget::Missing => "its interface index no longer exists".into(),
        }
    }
}

/// The interface index a BPF link's `/proc/self/fdinfo` reports (XDP and
/// TCX links print `ifindex:`, 0 once the interface is gone).
fn fdinfo_ifindex(fdinfo: &str) -> Option<u32> {
    fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("ifindex:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Opens the pinned object at `path` (`BPF_OBJ_GET`): a descriptor of our
/// own, to read its fdinfo (aya does not show a link's descriptor).
fn open_pinned(path: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::{fd::FromRawFd as _, unix::ffi::OsStrExt as _};
    /// `union bpf_attr` as `BPF_OBJ_GET` reads it.
    #[repr(C)]
    struct ObjGet {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGet {
        pathname: c_path.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: `attr` is a valid BPF_OBJ_GET attribute of the size passed,
    // and `c_path` outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGet,
            std::mem::size_of::<ObjGet>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::other("descriptor out of range"))?;
    // SAFETY: the kernel just returned this descriptor to us alone.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Where the link pinned at `path` is attached now.
fn pinned_link_target(path: &Path, pin: &LinkPin) -> std::io::Result<LinkTarget> {
    use std::os::fd::AsRawFd as _;
    let fd = open_pinned(path)?;
    let info = fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    let reported = fdinfo_ifindex(&info).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not an interface's link (no ifindex in its fdinfo)",
        )
    })?;
    let exists = crate::host::interface_name(pin.ifindex).is_some();
    Ok(LinkTarget::judge(pin.ifindex, reported, exists))
}

/// The one warning about a pinned link that is dropped rather than taken over.
fn warn_dropped(path: &Path, pin: &LinkPin, reason: &str) {
    tracing::warn!(
        pin = %path.display(),
        iface = pin.iface_label(),
        "dropping a pinned attachment left by an earlier daemon: {reason}"
    );
}

/// A pinned attachment of an earlier daemon, not yet taken over.
struct Orphan {
    link: FdLink,
    /// Its pin, removed when it is taken over (and pinned again under the
    /// interface's current name) or released.
    path: PathBuf,
}

/// One attachment of the data path, as the kernel knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attachment {
    /// Interface index.
    pub ifindex: u32,
    /// `xdp`, or `tc` (ingress).
    pub hook: &'static str,
    /// The BPF link's id; `None` when the data path is not pinned (its
    /// attachments are then held without a link handle of their own).
    pub link_id: Option<u32>,
    /// The attached program's id.
    pub program_id: Option<u32>,
    /// Where the link is pinned.
    pub pin: Option<PathBuf>,
}

/// An attachment this process holds.
enum Held {
    /// Pinned at `path`: survives this process if the pin is kept. `ids`:
    /// the kernel's (link id, program id), for `lb status`, when they could
    /// be read.
    Pinned {
        link: PinnedLink,
        path: PathBuf,
        ids: Option<(u32, u32)>,
    },
    /// Not pinned (no pin directory): held only so that dropping it detaches.
    Xdp { _link: XdpLink },
    /// Not pinned TC link, likewise.
    Tc { _link: SchedClassifierLink },
}

/// Makes sure `path` is on a bpffs, mounting one at /sys/fs/bpf if that is
/// where the path lives and none is mounted (it is not mounted at boot on
/// every distribution).
fn ensure_bpffs(path: &Path) -> Result<(), DatapathError> {
    use nix::sys::statfs::{statfs, BPF_FS_MAGIC};
    let root = Path::new("/sys/fs/bpf");
    let on_bpffs = |p: &Path| statfs(p).is_ok_and(|s| s.filesystem_type() == BPF_FS_MAGIC);
    if path.starts_with(root) && !on_bpffs(root) {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(pin_err(format!("mounting bpffs at {}", root.display())))?;
        tracing::info!("mounted bpffs at /sys/fs/bpf");
    }
    let mut probe = path;
    while !probe.exists() {
        probe = probe.parent().unwrap_or(root);
    }
    if !on_bpffs(probe) {
        return Err(DatapathError::Pin {
            what: format!("pin path {} is not on a bpffs", path.display()),
            source: "mount one with `mount -t bpf bpf /sys/fs/bpf`".into(),
        });
    }
    Ok(())
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
    /// Entries in the flow table.
    pub flow_table_size: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            max_services: defaults::MAX_SERVICES,
            max_backends: defaults::MAX_BACKENDS,
            max_table_size: defaults::MAX_TABLE_SIZE,
            flow_table_size: defaults::FLOW_TABLE_SIZE,
        }
    }
}

impl From<&crate::config::DatapathSpec> for MapSizes {
    fn from(d: &crate::config::DatapathSpec) -> Self {
        Self {
            max_services: d.max_services,
            max_backends: d.max_backends,
            max_table_size: d.max_table_size,
            flow_table_size: d.flow_table_size,
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
    /// The same tables, mapped into this process for writing.
    pub maglev_slots: MaglevSlots,
    /// The flow table, keyed by the client-side 5-tuple.
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
    /// Bitmap of hashed VIP addresses.
    pub vip_filter: Array<MapData, u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(DatapathError::MissingMap(name))?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// The Maglev array (created `BPF_F_MMAPABLE`) mapped into this process.
/// A table is written with plain stores, a few hundred microseconds for a
/// 65,537-slot table where a syscall per slot took about 10 ms; the service
/// entry's update (a syscall) then publishes it.
pub struct MaglevSlots {
    base: std::ptr::NonNull<u8>,
    len: usize,
    slots: u32,
}

// SAFETY: the mapping is plain shared memory owned by this value; access goes
// through atomics (the kernel reads it concurrently).
unsafe impl Send for MaglevSlots {}

impl MaglevSlots {
    /// Maps the array `name` of `ebpf` (before it is taken as a typed map).
    fn map(ebpf: &Ebpf, name: &'static str) -> Result<Self, DatapathError> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let map = ebpf.map(name).ok_or(DatapathError::MissingMap(name))?;
        let aya::maps::Map::Array(data) = map else {
            return Err(DatapathError::MissingMap(name));
        };
        let slots = data
            .info()
            .map_err(|source| DatapathError::Map { name, source })?
            .max_entries();
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let len = (slots as usize * lb_common::MAGLEV_SLOT_STRIDE).div_ceil(page) * page;
        // SAFETY: a fresh shared mapping of the map's own fd, of the size
        // the kernel allocated for it (values rounded to 8 bytes, pages).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::Mmap {
                name,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            base: std::ptr::NonNull::new(ptr.cast()).ok_or(DatapathError::MissingMap(name))?,
            len,
            slots,
        })
    }

    fn slot(&self, i: u32) -> Option<&std::sync::atomic::AtomicU32> {
        if i >= self.slots {
            return None;
        }
        // SAFETY: `i` is in bounds, slots are 8-byte aligned (page-aligned
        // base, 8-byte stride), and the mapping lives as long as `self`.
        Some(unsafe {
            std::sync::atomic::AtomicU32::from_ptr(
                self.base
                    .as_ptr()
                    .add(i as usize * lb_common::MAGLEV_SLOT_STRIDE)
                    .cast(),
            )
        })
    }

    /// Slot `i`, or `None` past the end.
    pub fn get(&self, i: u32) -> Option<u32> {
        self.slot(i)
            .map(|s| s.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Writes slot `i`; `false` (nothing written) past the end.
    pub fn set(&self, i: u32, id: u32) -> bool {
        self.slot(i)
            .map(|s| s.store(id, std::sync::atomic::Ordering::Relaxed))
            .is_some()
    }

    /// Slots in the array.
    pub fn len(&self) -> u32 {
        self.slots
    }

    /// Whether the array has no slot (never, for a loaded data path).
    pub fn is_empty(&self) -> bool {
        self.slots == 0
    }
}

impl Drop for MaglevSlots {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

impl Maps {
    fn take(ebpf: &mut Ebpf) -> Result<Self, DatapathError> {
        Ok(Self {
            services: take(ebpf, maps::SERVICES)?,
            backends: take(ebpf, maps::BACKENDS)?,
            maglev_slots: MaglevSlots::map(ebpf, maps::MAGLEV)?,
            maglev: take(ebpf, maps::MAGLEV)?,
            flows: take(ebpf, maps::FLOWS)?,
            rev_nat: take(ebpf, maps::REV_NAT)?,
            service_stats: take(ebpf, maps::SERVICE_STATS)?,
            backend_stats: take(ebpf, maps::BACKEND_STATS)?,
            global_stats: take(ebpf, maps::GLOBAL_STATS)?,
            ifaces: take(ebpf, maps::IFACES)?,
            vip_filter: take(ebpf, maps::VIP_FILTER)?,
        })
    }

    /// Sets backend `id`'s counters to zero on every CPU, for a backend
    /// that takes over the id: its series start from nothing.
    pub fn zero_backend_counters(&mut self, id: u32) -> Result<(), MapError> {
        let failed = |io_error| {
            MapError::SyscallError(aya::sys::SyscallError {
                call: "reading the possible CPUs",
                io_error,
            })
        };
        let cpus = nr_cpus().map_err(|(_, e)| failed(e))?;
        let zeros = PerCpuValues::try_from(vec![Counters::default(); cpus]).map_err(failed)?;
        self.backend_stats.set(id, zeros, 0)
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
        global_counters(&self.global_stats)
    }
}

/// The outcome counters of `stats` (an `LB_GLOBAL_STATS` handle), summed
/// over CPUs, by name.
pub fn global_counters(
    stats: &PerCpuArray<MapData, u64>,
) -> Result<Vec<(&'static str, u64)>, DatapathError> {
    (0..stat::COUNT)
        .map(|i| {
            let v = stats.get(&i, 0).map_err(|source| DatapathError::Map {
                name: maps::GLOBAL_STATS,
                source,
            })?;
            Ok((stat::NAMES[i as usize], v.iter().sum()))
        })
        .collect()
}

/// Second handles on the maps that are only read (counters and the flow
/// table), for the read side: walking a million flows there never holds up
/// the control task, which keeps the writing handles.
pub struct ReadMaps {
    /// Forward flow table.
    pub flows: HashMap<MapData, FlowKey, Flow>,
    /// Per-CPU counters by service id.
    pub service_stats: PerCpuArray<MapData, Counters>,
    /// Per-CPU counters by backend id.
    pub backend_stats: PerCpuArray<MapData, Counters>,
    /// Per-CPU outcome counters.
    pub global_stats: PerCpuArray<MapData, u64>,
}

/// A new handle on the same kernel map as `map` (a duplicated fd).
fn second_handle<K: aya::Pod, V, T>(
    map: &impl IterableMap<K, V>,
    name: &'static str,
) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    use std::os::fd::AsFd as _;
    let failed = |source| DatapathError::Map { name, source };
    let fd = map
        .map()
        .fd()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|source| DatapathError::Dup { name, source })?;
    let data = MapData::from_fd(fd).map_err(failed)?;
    let map = aya::maps::Map::from_map_data(data).map_err(failed)?;
    T::try_from(map).map_err(failed)
}

impl Maps {
    /// Second handles on the maps only read, for the read side.
    pub fn read_handles(&self) -> Result<ReadMaps, DatapathError> {
        Ok(ReadMaps {
            flows: second_handle(&self.flows, maps::FLOWS)?,
            service_stats: second_handle(&self.service_stats, maps::SERVICE_STATS)?,
            backend_stats: second_handle(&self.backend_stats, maps::BACKEND_STATS)?,
            global_stats: second_handle(&self.global_stats, maps::GLOBAL_STATS)?,
        })
    }
}

/// Loads (verifies) program `name`.
fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<(), DatapathError> {
    let what = || format!("loading program {name} (verifier)");
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| DatapathError::Program {
            what: what(),
            source: ProgramError::UnexpectedProgramType,
        })?;
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

/// The loaded data path: programs, maps and attachments.
///
/// Unpinned ([`Datapath::load`]): dropping it detaches everything. Pinned
/// ([`Datapath::open`]): maps and attachments live in bpffs, so the data path
/// keeps forwarding without this process; [`Datapath::close`] decides
/// whether it stays that way.
pub struct Datapath {
    ebpf: Ebpf,
    /// The maps, for the reconcile loop.
    pub maps: Maps,
    links: StdHashMap<(Hook, u32), Held>,
    /// Pinned attachments of a previous daemon, not yet taken over.
    orphans: StdHashMap<(Hook, u32), Orphan>,
    pin: Option<PathBuf>,
    adopted: bool,
}

impl Datapath {
    /// Loads the embedded object with the given map sizes, unpinned, and
    /// loads (verifies) both programs, attaching nothing yet.
    pub fn load(sizes: &MapSizes) -> Result<Self, DatapathError> {
        Self::load_with(sizes, None, false)
    }

    /// Loads the data path pinned under `root` (a bpffs directory). Maps
    /// already pinned there by an earlier daemon with the same layout and
    /// sizes are reused, and its attachments are taken over by the first
    /// `attach_*` on the same interface (the program is replaced in place,
    /// atomically); attachments whose interface is gone are dropped. A data
    /// path pinned there with another layout or sizes is detached and
    /// removed first (see [`Datapath::remove_other_layouts`]).
    pub fn open(sizes: &MapSizes, root: &Path) -> Result<Self, DatapathError> {
        ensure_bpffs(root)?;
        fs::create_dir_all(root).map_err(pin_err(format!("creating {}", root.display())))?;
        let _ = fs::set_permissions(root, fs::Permissions::from_mode(0o700));
        let name = format_dir(sizes);
        let dir = root.join(&name);
        Self::remove_other_layouts(root, &name)?;
        let reuse = dir.join(maps::SERVICES).exists();
        let links = dir.join("links");
        fs::create_dir_all(&links).map_err(pin_err(format!("creating {}", links.display())))?;
        let mut dp = Self::load_with(sizes, Some(&dir), reuse)?;
        // Interface flags are set again as this daemon attaches.
        let stale: Vec<u32> = dp.maps.ifaces.keys().flatten().collect();
        for k in stale {
            let _ = dp.maps.ifaces.remove(&k);
        }
        if reuse {
            dp.take_pinned_links(&links)?;
        }
        Ok(dp)
    }

    /// Removes the data paths pinned under `root` with another layout or
    /// other sizes than `keep` (directories named like [`format_dir`]'s):
    /// this binary cannot take them over, and left in place their programs
    /// would stay attached next to this daemon's. Their links are detached
    /// before this returns, so the interfaces are free to attach to; their
    /// established flows are re-balanced. Anything else under `root` is not
    /// lb's and is left alone.
    fn remove_other_layouts(root: &Path, keep: &str) -> Result<(), DatapathError> {
        let entries = fs::read_dir(root).map_err(pin_err(format!("reading {}", root.display())))?;
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name == keep {
                continue;
            }
            if !is_layout_dir(&name) || !e.path().is_dir() {
                tracing::warn!(path = %e.path().display(), "not a data path of lb: left alone");
                continue;
            }
            tracing::warn!(
                pins = %e.path().display(),
                layout = keep,
                "a data path pinned with another map layout or sizes cannot be taken over: \
                 detaching and removing it (its established flows are re-balanced)"
            );
            if let Ok(links) = fs::read_dir(e.path().join("links")) {
                for link in links.flatten() {
                    // Unpinned while held, then closed: the last reference
                    // goes synchronously, so the interface is free at once
                    // (a bare unlink detaches later, from a kernel worker).
                    if let Ok(held) = PinnedLink::from_pin(link.path()) {
                        let _ = held.unpin();
                    }
                }
            }
            fs::remove_dir_all(e.path())
                .map_err(pin_err(format!("removing {}", e.path().display())))?;
        }
        Ok(())
    }

    /// Collects the attachments an earlier daemon pinned under `links`, to
    /// be taken over by the first `attach_*` on their interface. A link
    /// whose interface is gone (deleted, its namespace removed: the kernel
    /// severs the link) or that cannot be read is unpinned and dropped with
    /// one warning: it can never be taken over, and an interface of the
    /// same name that is still wanted is attached afresh.
    fn take_pinned_links(&mut self, links: &Path) -> Result<(), DatapathError> {
        let entries =
            fs::read_dir(links).map_err(pin_err(format!("reading {}", links.display())))?;
        for e in entries.flatten() {
            let path = e.path();
            let Some(pin) = LinkPin::parse(&e.file_name().to_string_lossy()) else {
                continue;
            };
            let link = match PinnedLink::from_pin(&path) {
                Ok(link) => link,
                Err(e) => {
                    warn_dropped(&path, &pin, &format!("it cannot be opened ({e})"));
                    let _ = fs::remove_file(&path);
                    continue;
                }
            };
            match pinned_link_target(&path, &pin) {
                Ok(LinkTarget::Attached) => {
                    self.orphans.insert(
                        (pin.hook, pin.ifindex),
                        Orphan {
                            link: FdLink::from(link),
                            path,
                        },
                    );
                }
                target => {
                    let reason = match target {
                        Ok(t) => t.reason(),
                        Err(e) => format!("where it is attached cannot be read ({e})"),
                    };
                    warn_dropped(&path, &pin, &reason);
                    // Unpinned while held, so it goes at once (see
                    // `remove_other_layouts`).
                    let _ = link.unpin();
                }
            }
        }
        Ok(())
    }

    /// Removes every pin under `root`: the maps and attachments there go away
    /// once nothing else holds them.
    fn remove_pins(root: &Path) {
        for m in ALL_MAPS {
            let _ = fs::remove_file(root.join(m));
        }
        if let Ok(entries) = fs::read_dir(root.join("links")) {
            for e in entries.flatten() {
                let _ = fs::remove_file(e.path());
            }
        }
        let _ = fs::remove_dir(root.join("links"));
        let _ = fs::remove_dir(root);
    }

    /// Whether maps of an earlier daemon were reused.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directory, if pinned.
    pub fn pin_path(&self) -> Option<&Path> {
        self.pin.as_deref()
    }

    fn load_with(
        sizes: &MapSizes,
        pin: Option<&Path>,
        adopted: bool,
    ) -> Result<Self, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        // Per-CPU maps hold a value per possible CPU: make sure we can count them.
        nr_cpus().map_err(|(_, e)| DatapathError::Cpus(e.to_string()))?;
        let pin_paths: Vec<(&str, PathBuf)> = match pin {
            Some(root) => ALL_MAPS.iter().map(|m| (*m, root.join(m))).collect(),
            None => Vec::new(),
        };
        let mut loader = EbpfLoader::new();
        for (name, path) in &pin_paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
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
            links: StdHashMap::new(),
            orphans: StdHashMap::new(),
            pin: pin.map(Path::to_owned),
            adopted,
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

    /// Attaches the XDP forward program to `iface`, taking over an earlier
    /// daemon's attachment there if there is one.
    pub fn attach_xdp(
        &mut self,
        iface: &str,
        ifindex: u32,
        mode: XdpMode,
    ) -> Result<(), DatapathError> {
        if self.links.contains_key(&(Hook::Xdp, ifindex)) {
            return Ok(());
        }
        let what = format!("attaching XDP to {iface} in {mode:?} mode");
        let orphan = self.orphans.remove(&(Hook::Xdp, ifindex));
        let prog = self.xdp_program();
        let id = match orphan {
            Some(orphan) => {
                // Re-pinned below under the interface's current name.
                let _ = fs::remove_file(&orphan.path);
                let link = XdpLink::try_from(orphan.link).map_err(pin_err(what.clone()))?;
                prog.attach_to_link(link)
            }
            None => prog.attach_to_if_index(ifindex, mode),
        }
        .map_err(|source| DatapathError::Program {
            what: what.clone(),
            source,
        })?;
        let link = prog
            .take_link(id)
            .map_err(|source| DatapathError::Program {
                what: what.clone(),
                source,
            })?;
        let pin = LinkPin {
            hook: Hook::Xdp,
            ifindex,
            iface: Some(iface.to_owned()),
        };
        self.hold(pin, link, &what, |link| Held::Xdp { _link: link })
    }

    /// Attaches the TC program to `iface`'s ingress, taking over an earlier
    /// daemon's attachment there if there is one.
    pub fn attach_tc(&mut self, iface: &str, ifindex: u32) -> Result<(), DatapathError> {
        if self.links.contains_key(&(Hook::Tc, ifindex)) {
            return Ok(());
        }
        let what = format!("attaching TC ingress to {iface}");
        let orphan = self.orphans.remove(&(Hook::Tc, ifindex));
        let prog = self.tc_program();
        let id = match orphan {
            Some(orphan) => {
                // Re-pinned below under the interface's current name.
                let _ = fs::remove_file(&orphan.path);
                let link =
                    SchedClassifierLink::try_from(orphan.link).map_err(pin_err(what.clone()))?;
                prog.attach_to_link(link)
            }
            None => prog.attach(iface, TcAttachType::Ingress),
        }
        .map_err(|source| DatapathError::Program {
            what: what.clone(),
            source,
        })?;
        let link = prog
            .take_link(id)
            .map_err(|source| DatapathError::Program {
                what: what.clone(),
                source,
            })?;
        let pin = LinkPin {
            hook: Hook::Tc,
            ifindex,
            iface: Some(iface.to_owned()),
        };
        self.hold(pin, link, &what, |link| Held::Tc { _link: link })
    }

    /// Keeps a just-attached link: pinned in the pin directory (so it
    /// outlives this process), or, when the data path is not pinned, held
    /// as `unpinned` makes it so that dropping it detaches.
    fn hold<L>(
        &mut self,
        pin: LinkPin,
        link: L,
        what: &str,
        unpinned: fn(L) -> Held,
    ) -> Result<(), DatapathError>
    where
        FdLink: TryFrom<L>,
        <FdLink as TryFrom<L>>::Error: std::error::Error + Send + Sync + 'static,
    {
        let held = match self.pin.clone() {
            Some(root) => {
                let fd = FdLink::try_from(link).map_err(pin_err(what.to_owned()))?;
                let ids = fd
                    .info()
                    .map(|info| (info.id(), info.program_id()))
                    .inspect_err(|e| {
                        tracing::warn!(ifindex = pin.ifindex, hook = pin.hook.name(), error = %e, "reading the attachment's link id")
                    })
                    .ok();
                let path = root.join("links").join(pin.file_name());
                let link = fd
                    .pin(&path)
                    .map_err(pin_err(format!("pinning {}", path.display())))?;
                Held::Pinned { link, path, ids }
            }
            None => unpinned(link),
        };
        self.links.insert((pin.hook, pin.ifindex), held);
        Ok(())
    }

    /// Every attachment this data path holds, by interface, XDP first.
    pub fn attachments(&self) -> Vec<Attachment> {
        let mut out: Vec<Attachment> = self
            .links
            .iter()
            .map(|(&(hook, ifindex), held)| {
                let (ids, pin) = match held {
                    Held::Pinned { path, ids, .. } => (*ids, Some(path.clone())),
                    Held::Xdp { .. } | Held::Tc { .. } => (None, None),
                };
                Attachment {
                    ifindex,
                    hook: hook.name(),
                    link_id: ids.map(|i| i.0),
                    program_id: ids.map(|i| i.1),
                    pin,
                }
            })
            .collect();
        out.sort_by_key(|a| (a.ifindex, a.hook != "xdp"));
        out
    }

    /// Detaches the TC program from `ifindex` (and removes its pin), e.g.
    /// from a container's veth once no backend uses it. A no-op if it was
    /// not attached by this data path.
    pub fn detach_tc(&mut self, ifindex: u32) {
        if let Some(Held::Pinned { link, .. }) = self.links.remove(&(Hook::Tc, ifindex)) {
            let _ = link.unpin();
        }
    }

    /// Detaches an earlier daemon's attachments that nothing took over
    /// (interfaces no longer configured).
    pub fn release_orphans(&mut self) {
        for ((hook, ifindex), orphan) in self.orphans.drain() {
            let _ = fs::remove_file(&orphan.path);
            drop(orphan.link);
            tracing::info!(ifindex, hook = ?hook, pin = %orphan.path.display(), "detached a stale attachment of an earlier daemon");
        }
    }

    /// Ends this process's hold on the data path. `keep`: leave maps and
    /// attachments pinned, so the data path goes on forwarding and the next
    /// daemon takes it over. Otherwise detach everything and remove the pins.
    pub fn close(mut self, keep: bool) {
        let Some(root) = self.pin.clone() else { return };
        if keep {
            // Closing our descriptors leaves the pinned objects alive.
            self.links.clear();
            self.orphans.clear();
            return;
        }
        for (_, held) in self.links.drain() {
            if let Held::Pinned { link, .. } = held {
                let _ = link.unpin();
            }
        }
        self.release_orphans();
        Self::remove_pins(&root);
        // The pin path itself, if this was its only data path.
        if let Some(parent) = root.parent() {
            let _ = fs::remove_dir(parent);
        }
    }

    /// Adds `IFACE_F_*` flags for `ifindex`, for the programs to read,
    /// keeping those it has.
    pub fn add_iface_flags(&mut self, ifindex: u32, flags: u32) -> Result<(), DatapathError> {
        let have = self.maps.ifaces.get(&ifindex, 0).unwrap_or(0);
        self.maps
            .ifaces
            .insert(ifindex, have | flags, 0)
            .map_err(|source| DatapathError::Map {
                name: maps::IFACES,
                source,
            })
    }

    /// Clears `IFACE_F_*` flags of `ifindex`; its entry goes with the last.
    /// An interface gone already is no error.
    pub fn clear_iface_flags(&mut self, ifindex: u32, flags: u32) {
        let Ok(have) = self.maps.ifaces.get(&ifindex, 0) else {
            return;
        };
        let _ = if have & !flags == 0 {
            self.maps.ifaces.remove(&ifindex)
        } else {
            self.maps.ifaces.insert(ifindex, have & !flags, 0)
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pin(hook: Hook, ifindex: u32, iface: Option<&str>) -> LinkPin {
        LinkPin {
            hook,
            ifindex,
            iface: iface.map(str::to_owned),
        }
    }

    #[test]
    fn link_pin_names_round_trip() {
        for p in [
            pin(Hook::Tc, 12, Some("lbp1b1")),
            pin(Hook::Xdp, 3, Some("eth0.100")),
            pin(Hook::Tc, 7, Some("odd%name-with-dash")),
            pin(Hook::Tc, 9, None),
        ] {
            let name = p.file_name();
            assert!(!name.contains('.'), "bpffs refuses dots: {name}");
            assert_eq!(LinkPin::parse(&name), Some(p), "{name}");
        }
        assert_eq!(
            pin(Hook::Xdp, 3, Some("eth0.100")).file_name(),
            "xdp-3-eth0%2e100"
        );
    }

    #[test]
    fn link_pins_of_an_earlier_daemon_and_junk() {
        // Written before interface names were kept.
        assert_eq!(LinkPin::parse("tc-12"), Some(pin(Hook::Tc, 12, None)));
        assert_eq!(LinkPin::parse("xdp-4"), Some(pin(Hook::Xdp, 4, None)));
        for junk in [
            "",
            "tc",
            "tc-",
            "tc-x",
            "tcx-1",
            "xdp-1-",
            "tc-1-a%2",
            "tc-1-a%zz",
        ] {
            assert_eq!(LinkPin::parse(junk), None, "{junk:?}");
        }
        assert_eq!(pin(Hook::Tc, 12, None).iface_label(), "(index 12)");
    }

    #[test]
    fn a_link_is_reused_only_while_on_its_own_interface() {
        assert_eq!(LinkTarget::judge(12, 12, true), LinkTarget::Attached);
        assert_eq!(LinkTarget::judge(12, 0, false), LinkTarget::Severed);
        assert_eq!(LinkTarget::judge(12, 0, true), LinkTarget::Severed);
        assert_eq!(LinkTarget::judge(12, 15, true), LinkTarget::Elsewhere(15));
        assert_eq!(LinkTarget::judge(12, 12, false), LinkTarget::Missing);
    }

    #[test]
    fn fdinfo_of_links() {
        let tcx = "pos:\t0\nflags:\t02000000\nmnt_id:\t15\nino:\t1057\nlink_type:\ttcx\n\
                   link_id:\t4\nprog_tag:\tabc\nprog_id:\t20\nifindex:\t12\nattach_type:\t46 (tcx_ingress)\n";
        assert_eq!(fdinfo_ifindex(tcx), Some(12));
        let severed = "link_type:\txdp\nlink_id:\t5\nprog_id:\t21\nifindex:\t0\n";
        assert_eq!(fdinfo_ifindex(severed), Some(0));
        assert_eq!(fdinfo_ifindex("link_type:\tcgroup\nlink_id:\t6\n"), None);
    }

    #[test]
    fn layout_directories() {
        let sizes = MapSizes::default();
        assert!(is_layout_dir(&format_dir(&sizes)));
        assert!(is_layout_dir("abi1-s64-b4096-t65537-f1048576"));
        for other in ["abi-s64", "abix-1", "abi6", "lb", "links", "not-lb"] {
            assert!(!is_layout_dir(other), "{other}");
        }
    }
}
