//! Desired state: the config file's services, plus what the admin API
//! changed. API changes are kept in a JSON state file next to the config
//! (`lb.toml` -> `lb.state.json`) and its journal (`lb.state.journal`, see
//! [`journal`]), so they survive a restart; the config file itself is never
//! rewritten.
//!
//! Ownership: a service created through the API belongs to the state file and
//! can be removed through the API. A service declared in the config file can
//! have backends added, removed and drained through the API (kept as changes
//! to that service), but is removed by editing the file.
//!
//! Every change is checked on a copy first (limits, duplicates, backends
//! shared by too many services) and written to disk before it takes effect:
//! a refused or unsaved change leaves everything as it was.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    fs,
    io::Write as _,
    net::SocketAddrV4,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use crate::{
    api::types::{NewBackend, NewService},
    config::Config,
    model::{
        image_rule, parse_socket_addr, service_spec, BackendSpec, Forwarding, ImageRule, Origin,
        Protocol, Refusal, ServiceSpec,
    },
};

mod catalog;
mod journal;

use catalog::Catalog;

/// Errors of reading or writing the state file.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file could not be read or written.
    #[error("state file {path}")]
    Io {
        /// The state file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a state file of this version.
    #[error("state file {path}: {reason} (move it away to start from the config alone)")]
    Corrupt {
        /// The state file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

/// A backend as the state file keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredBackend {
    address: SocketAddrV4,
    weight: u32,
    #[serde(default)]
    drained: bool,
}

impl From<&BackendSpec> for StoredBackend {
    fn from(b: &BackendSpec) -> Self {
        Self {
            address: b.addr,
            weight: b.weight,
            drained: b.drained,
        }
    }
}

impl From<&StoredBackend> for BackendSpec {
    fn from(b: &StoredBackend) -> Self {
        Self {
            addr: b.address,
            weight: b.weight,
            drained: b.drained,
            via: None,
        }
    }
}

/// A service created through the API, complete.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct StoredService {
    name: String,
    vip: SocketAddrV4,
    protocol: Protocol,
    table_size: u32,
    #[serde(default)]
    health: Option<crate::api::types::HealthCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target_port: Option<u16>,
    /// Absent in state files written before direct server return: NAT.
    #[serde(default)]
    forwarding: Forwarding,
    #[serde(default)]
    backends: Vec<StoredBackend>,
}

/// API changes to a config service's backends.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Changes {
    #[serde(default)]
    added: Vec<StoredBackend>,
    #[serde(default)]
    removed: Vec<SocketAddrV4>,
    #[serde(default)]
    drained: Vec<SocketAddrV4>,
    /// Weights changed in place, of the config's own backends.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    weights: BTreeMap<SocketAddrV4, u32>,
}

/// What the API changed of one backend of a config service: one journal
/// line's worth of [`Changes`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Override {
    /// Added through the API (not in the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    added: Option<StoredBackend>,
    /// A config backend removed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    removed: bool,
    /// A config backend drained.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    drained: bool,
    /// A config backend's weight changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    weight: Option<u32>,
}

impl Changes {
    /// Every address the changes name, with what they say of it.
    fn by_address(&self) -> HashMap<SocketAddrV4, Override> {
        let mut out: HashMap<SocketAddrV4, Override> = HashMap::new();
        for b in &self.added {
            out.entry(b.address).or_default().added = Some(b.clone());
        }
        for a in &self.removed {
            out.entry(*a).or_default().removed = true;
        }
        for a in &self.drained {
            out.entry(*a).or_default().drained = true;
        }
        for (a, w) in &self.weights {
            out.entry(*a).or_default().weight = Some(*w);
        }
        out
    }

    /// Sets what the changes say of `address` (`None`: nothing); an added
    /// backend keeps its place, or goes last if it is new.
    fn put(&mut self, address: SocketAddrV4, value: Option<Override>) {
        let o = value.unwrap_or_default();
        journal::put(&mut self.added, address, o.added, |b| b.address);
        self.removed.retain(|a| *a != address);
        if o.removed {
            self.removed.push(address);
        }
        self.drained.retain(|a| *a != address);
        if o.drained {
            self.drained.push(address);
        }
        match o.weight {
            Some(w) => self.weights.insert(address, w),
            None => self.weights.remove(&address),
        };
    }

    /// The per-backend entries that turn `before` into `self`, if putting
    /// them rebuilds the order of the added backends (see
    /// [`journal::list_patch`]).
    fn patch_from(&self, before: &Changes) -> Option<Vec<(SocketAddrV4, Option<Override>)>> {
        journal::list_patch(&before.added, &self.added, |b| b.address)?;
        let (old, new) = (before.by_address(), self.by_address());
        let new_added: HashSet<SocketAddrV4> = (self.added.iter())
            .map(|b| b.address)
            .filter(|a| old.get(a).is_none_or(|o| o.added.is_none()))
            .collect();
        // Added backends that are new go last, in their order.
        let mut out: Vec<(SocketAddrV4, Option<Override>)> = (old.keys().chain(new.keys()))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|a| !new_added.contains(a) && old.get(a) != new.get(a))
            .map(|a| (*a, new.get(a).cloned()))
            .collect();
        out.extend(
            (self.added.iter())
                .filter(|b| new_added.contains(&b.address))
                .map(|b| (b.address, new.get(&b.address).cloned())),
        );
        Some(out)
    }
}

/// The state file's contents.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Overlay {
    version: u32,
    #[serde(default)]
    services: Vec<StoredService>,
    #[serde(default)]
    changes: BTreeMap<String, Changes>,
}

const VERSION: u32 = 1;

/// Below this size the journal is never folded into a snapshot: with a small
/// state, rewriting it would cost little, but often.
const JOURNAL_MIN: u64 = 64 * 1024;

/// The state file as written: the state, and the last journal commit it
/// includes.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    #[serde(flatten)]
    overlay: &'a Overlay,
    journal_seq: u64,
}

/// The state file as read (`journal_seq` is absent from files written before
/// the journal existed).
#[derive(Deserialize)]
struct SnapshotIn {
    #[serde(flatten)]
    overlay: Overlay,
    #[serde(default)]
    journal_seq: u64,
}

/// Limits a desired state must fit in (the maps' sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Services.
    pub max_services: u32,
    /// Backends over all services.
    pub max_backends: u32,
    /// Largest Maglev table.
    pub max_table_size: u32,
}

/// The desired services: config plus API changes, plus the backends Docker
/// contributes (never saved: the engine is asked again after a restart).
#[derive(Debug)]
pub struct Desired {
    config: Vec<ServiceSpec>,
    overlay: Overlay,
    path: PathBuf,
    limits: Limits,
    docker: BTreeMap<String, Vec<BackendSpec>>,
    /// Other nodes' backends (cluster mode), never saved: etcd is read
    /// again after a restart.
    remote: BTreeMap<String, Vec<BackendSpec>>,
    /// While saves are held ([`Desired::hold`]): what the held changes
    /// replaced.
    held: Option<Held>,
    /// How the state is on disk, and what the next save writes.
    disk: Disk,
    /// Every service built, kept in step with the changes.
    catalog: Catalog,
}

/// The changes since [`Desired::hold`], each with the entries it replaced:
/// undone last first, they put a refused or unsaved group back exactly.
#[derive(Debug, Default)]
struct Held {
    log: Vec<(String, Before)>,
}

impl Held {
    /// Each touched service name with its entries as they were at the hold.
    fn first(&self) -> BTreeMap<&str, &Before> {
        let mut first = BTreeMap::new();
        for (name, before) in &self.log {
            first.entry(name.as_str()).or_insert(before);
        }
        first
    }
}

/// The state file's entries of one service name, as they were.
#[derive(Debug)]
struct Before {
    /// The API service of this name, and its place in the list.
    service: Option<(usize, StoredService)>,
    /// The API's changes to the config service of this name.
    changes: Option<Changes>,
}

/// The state file and its journal as last written.
#[derive(Debug)]
struct Disk {
    /// Sequence number of the last commit saved.
    seq: u64,
    /// Bytes in the state file.
    snapshot_len: u64,
    /// Bytes in the journal.
    journal_len: u64,
    /// The journal may end in a partial line (a failed or interrupted
    /// append): the next save writes a snapshot, which empties it.
    snapshot_next: bool,
    /// The journal is folded into a snapshot once it is larger than this
    /// and than the snapshot ([`JOURNAL_MIN`]; tests lower it).
    compact_above: u64,
}

/// The names whose list differs between `old` and `new`.
fn changed_names(
    old: &BTreeMap<String, Vec<BackendSpec>>,
    new: &BTreeMap<String, Vec<BackendSpec>>,
) -> BTreeSet<String> {
    old.keys()
        .chain(new.keys())
        .filter(|name| old.get(*name) != new.get(*name))
        .cloned()
        .collect()
}

/// Where the state file of config file `config` lives.
pub fn default_state_path(config: &Path) -> PathBuf {
    let stem = config
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "lb".into());
    config.with_file_name(format!("{stem}.state.json"))
}

impl Desired {
    /// The config's services plus the state file at `path`, if it exists.
    pub fn load(config: &Config, path: PathBuf) -> Result<Self, StateError> {
        let (mut overlay, snapshot_seq, snapshot_len) = match fs::read(&path) {
            Ok(bytes) => {
                let o: SnapshotIn =
                    serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                if o.overlay.version != VERSION {
                    return Err(StateError::Corrupt {
                        path,
                        reason: format!("version {} (this lb reads {VERSION})", o.overlay.version),
                    });
                }
                (o.overlay, o.journal_seq, bytes.len() as u64)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Overlay {
                    version: VERSION,
                    ..Overlay::default()
                },
                0,
                0,
            ),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let journal_path = journal::path_of(&path);
        let read = journal::read(&journal_path, snapshot_seq)?;
        if read.torn {
            warn!(
                journal = %journal_path.display(),
                "the journal's last line was cut short (a crash while saving a change that was never confirmed); it is dropped"
            );
        }
        journal::replay(&mut overlay, read.entries);
        let disk = Disk {
            seq: snapshot_seq.max(read.last_seq),
            snapshot_len,
            journal_len: read.len,
            snapshot_next: read.torn,
            compact_above: JOURNAL_MIN,
        };
        let d = &config.datapath;
        let mut desired = Self {
            config: config.services.clone(),
            overlay,
            path,
            limits: Limits {
                max_services: d.max_services,
                max_backends: d.max_backends,
                max_table_size: d.max_table_size,
            },
            docker: BTreeMap::new(),
            remote: BTreeMap::new(),
            held: None,
            disk,
            catalog: Catalog::default(),
        };
        let names: BTreeSet<String> = (desired.config.iter().map(|s| s.name.clone()))
            .chain(desired.overlay.services.iter().map(|s| s.name.clone()))
            .collect();
        for name in names {
            desired.rebuild(&name);
        }
        // A state file that no longer fits the config (the config now
        // declares a service of the same name or VIP) is not fatal: the
        // config wins, and the daemon warns about `shadowed()` services.
        Ok(desired)
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All desired services, by name: the config's (with API changes) and
    /// the API's, each with the backends Docker contributes to it. An API
    /// service whose name or VIP the config now uses is left out.
    pub fn services(&self) -> Vec<ServiceSpec> {
        self.catalog.specs().cloned().collect()
    }

    /// [`Desired::services`], borrowed.
    pub fn specs(&self) -> impl Iterator<Item = &ServiceSpec> {
        self.catalog.specs()
    }

    /// The services changed since the last call (at first: every one),
    /// each with its spec now (`None`: removed), for the reconciler.
    pub fn take_unapplied(&mut self) -> Vec<(String, Option<ServiceSpec>)> {
        self.catalog.take_unapplied()
    }

    /// Replaces the backends Docker contributes, by service name.
    pub fn set_docker(&mut self, backends: BTreeMap<String, Vec<BackendSpec>>) {
        let old = std::mem::replace(&mut self.docker, backends);
        for name in changed_names(&old, &self.docker) {
            self.rebuild(&name);
        }
    }

    /// Replaces the backends other nodes contribute, by service name.
    /// Those beyond `max_backends` (after this node's own) are left out;
    /// returns how many.
    pub fn set_remote(&mut self, mut backends: BTreeMap<String, Vec<BackendSpec>>) -> usize {
        let local: usize = self.local_backends().values().map(Vec::len).sum();
        let mut room = (self.limits.max_backends as usize).saturating_sub(local);
        let mut left_out = 0;
        for list in backends.values_mut() {
            let keep = list.len().min(room);
            left_out += list.len() - keep;
            list.truncate(keep);
            room -= keep;
        }
        backends.retain(|_, list| !list.is_empty());
        let old = std::mem::replace(&mut self.remote, backends);
        for name in changed_names(&old, &self.remote) {
            self.rebuild(&name);
        }
        left_out
    }

    /// This node's own backends by service (declared and Docker's, not
    /// other nodes'): what it publishes in cluster mode.
    pub fn local_backends(&self) -> BTreeMap<String, Vec<BackendSpec>> {
        self.declared()
            .into_iter()
            .map(|mut s| {
                self.add_source(&mut s, &self.docker);
                (s.name, s.backends)
            })
            .filter(|(_, b)| !b.is_empty())
            .collect()
    }

    /// Builds service `name` again from the config, the state and Docker.
    fn rebuild(&mut self, name: &str) {
        let spec = self.declared_one(name).map(|mut s| {
            self.add_contributed(&mut s);
            s
        });
        self.catalog.set(name, spec);
    }

    /// The limits the maps impose.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The services declared in the config file or through the API, without
    /// Docker's backends.
    pub fn declared(&self) -> Vec<ServiceSpec> {
        let mut out: Vec<ServiceSpec> = self.config.iter().map(|c| self.with_changes(c)).collect();
        // Sets, not a scan of `out` per service: with a thousand services
        // that scan was most of every change's time.
        let names: HashSet<&str> = self.config.iter().map(|c| c.name.as_str()).collect();
        let vips: HashSet<(SocketAddrV4, Protocol)> =
            self.config.iter().map(|c| (c.vip, c.protocol)).collect();
        for s in &self.overlay.services {
            if names.contains(s.name.as_str()) || vips.contains(&(s.vip, s.protocol)) {
                continue;
            }
            out.push(api_spec(s));
        }
        out
    }

    /// One declared service (see [`Desired::declared`]), built alone: a
    /// change looks at the service it changes, not at all of them.
    fn declared_one(&self, name: &str) -> Option<ServiceSpec> {
        if let Some(c) = self.config_service(name) {
            return Some(self.with_changes(c));
        }
        let s = self.overlay.services.iter().find(|s| s.name == name)?;
        let shadowed = self
            .config
            .iter()
            .any(|c| c.vip == s.vip && c.protocol == s.protocol);
        (!shadowed).then(|| api_spec(s))
    }

    /// A config service with the API's changes to its backends.
    fn with_changes(&self, config: &ServiceSpec) -> ServiceSpec {
        let mut s = config.clone();
        let Some(c) = self.overlay.changes.get(&s.name) else {
            return s;
        };
        // Sets, not list scans: a service with thousands of backends is
        // rebuilt on every change.
        let removed: HashSet<&SocketAddrV4> = c.removed.iter().collect();
        let drained: HashSet<&SocketAddrV4> = c.drained.iter().collect();
        s.backends.retain(|b| !removed.contains(&b.addr));
        let mut have: HashSet<SocketAddrV4> = s.backends.iter().map(|b| b.addr).collect();
        for b in &c.added {
            if have.insert(b.address) {
                s.backends.push(b.into());
            }
        }
        for b in &mut s.backends {
            b.drained |= drained.contains(&b.addr);
            if let Some(w) = c.weights.get(&b.addr) {
                b.weight = *w;
            }
        }
        s
    }

    /// API services the config now shadows (same name or VIP), to warn about.
    pub fn shadowed(&self) -> Vec<String> {
        self.overlay
            .services
            .iter()
            .filter(|s| {
                self.config
                    .iter()
                    .any(|c| c.name == s.name || (c.vip == s.vip && c.protocol == s.protocol))
            })
            .map(|s| s.name.clone())
            .collect()
    }

    fn config_service(&self, name: &str) -> Option<&ServiceSpec> {
        self.config.iter().find(|s| s.name == name)
    }

    /// Adds a service through the API.
    pub fn add_service(&mut self, new: &NewService) -> Result<ServiceSpec, Refusal> {
        let proto = new.protocol.map(|p| p.to_string());
        let spec = service_spec(
            &new.name,
            &new.vip,
            proto.as_deref(),
            new.table_size,
            new.health.clone(),
            new.forwarding,
            self.limits.max_table_size,
        )
        .map_err(|e| Refusal::invalid(format!("{}: {}", e.field, e.reason)))?;
        let image = image_rule(new.image.as_deref(), new.target_port)
            .map_err(|e| Refusal::invalid(format!("{}: {}", e.field, e.reason)))?;
        let spec = ServiceSpec { image, ..spec };
        if let Some(why) = spec.refuses_image() {
            return Err(Refusal::invalid(why));
        }
        if self.catalog.get(&spec.name).is_some() {
            return Err(Refusal::conflict(format!(
                "service {} already exists",
                spec.name
            )));
        }
        if let Some(s) = self
            .specs()
            .find(|s| s.vip == spec.vip && s.protocol == spec.protocol)
        {
            return Err(Refusal::conflict(format!(
                "{} {} is already used by service {}",
                spec.protocol, spec.vip, s.name
            )));
        }
        self.change(&spec.name, |o| {
            o.services.push(StoredService {
                name: spec.name.clone(),
                vip: spec.vip,
                protocol: spec.protocol,
                table_size: spec.table_size,
                health: spec.health.clone(),
                image: spec.image.as_ref().map(|r| r.image.clone()),
                target_port: spec.image.as_ref().map(|r| r.target_port),
                forwarding: spec.forwarding,
                backends: Vec::new(),
            })
        })?;
        Ok(ServiceSpec {
            origin: Origin::Api,
            ..spec
        })
    }

    /// Removes a service created through the API.
    pub fn remove_service(&mut self, name: &str) -> Result<(), Refusal> {
        if self.config_service(name).is_some() {
            return Err(Refusal::conflict(format!(
                "service {name} is declared in the config file: remove it there and restart"
            )));
        }
        if !self.overlay.services.iter().any(|s| s.name == name) {
            return Err(Refusal::not_found(format!("no service {name}")));
        }
        self.change(name, |o| o.services.retain(|s| s.name != name))
    }

    /// Adds a backend to any service.
    pub fn add_backend(&mut self, service: &str, new: &NewBackend) -> Result<(), Refusal> {
        self.add_backends(service, std::slice::from_ref(new))
    }

    /// Adds backends to any service, all or none: one refused backend
    /// refuses the call, naming it.
    pub fn add_backends(&mut self, service: &str, new: &[NewBackend]) -> Result<(), Refusal> {
        let current = self.service(service)?;
        let stored = parse_backends(new)?;
        let have: HashSet<SocketAddrV4> = current.backends.iter().map(|b| b.addr).collect();
        if let Some(b) = stored.iter().find(|b| have.contains(&b.address)) {
            return Err(Refusal::conflict(format!(
                "{} is already a backend of {service}",
                b.address
            )));
        }
        if self.config_service(service).is_some() {
            self.change(service, |o| {
                let c = o.changes.entry(service.to_owned()).or_default();
                for b in stored {
                    c.removed.retain(|a| *a != b.address);
                    c.drained.retain(|a| *a != b.address);
                    c.weights.remove(&b.address);
                    c.added.push(b);
                }
            })
        } else {
            self.change(service, |o| {
                if let Some(s) = o.services.iter_mut().find(|s| s.name == service) {
                    s.backends.extend(stored);
                }
            })
        }
    }

    /// Replaces a service's declared backends with `new`, all or none.
    /// Backends that stay keep their drain state; weights are those given.
    /// Docker's backends are not declared and are left as they are.
    pub fn set_backends(&mut self, service: &str, new: &[NewBackend]) -> Result<(), Refusal> {
        let declared = self
            .declared_one(service)
            .ok_or_else(|| Refusal::not_found(format!("no service {service}")))?;
        let mut stored = parse_backends(new)?;
        let drained: HashSet<SocketAddrV4> = declared
            .backends
            .into_iter()
            .filter(|b| b.drained)
            .map(|b| b.addr)
            .collect();
        for b in &mut stored {
            b.drained = drained.contains(&b.address);
        }
        if let Some(config) = self.config_service(service).cloned() {
            let kept: HashSet<SocketAddrV4> = stored.iter().map(|s| s.address).collect();
            let config_weights: HashMap<SocketAddrV4, u32> =
                config.backends.iter().map(|b| (b.addr, b.weight)).collect();
            self.change(service, |o| {
                let c = o.changes.entry(service.to_owned()).or_default();
                let own = |a: &SocketAddrV4| config_weights.get(a);
                c.removed = config
                    .backends
                    .iter()
                    .map(|b| b.addr)
                    .filter(|a| !kept.contains(a))
                    .collect();
                c.drained = stored
                    .iter()
                    .filter(|s| s.drained && own(&s.address).is_some())
                    .map(|s| s.address)
                    .collect();
                c.weights = stored
                    .iter()
                    .filter(|s| own(&s.address).is_some_and(|w| *w != s.weight))
                    .map(|s| (s.address, s.weight))
                    .collect();
                c.added = stored
                    .iter()
                    .filter(|s| own(&s.address).is_none())
                    .cloned()
                    .collect();
            })
        } else {
            self.change(service, |o| {
                if let Some(s) = o.services.iter_mut().find(|s| s.name == service) {
                    s.backends = stored;
                }
            })
        }
    }

    /// One service as [`Desired::services`] has it, Docker's backends
    /// included.
    fn service(&self, service: &str) -> Result<ServiceSpec, Refusal> {
        let mut s = self
            .declared_one(service)
            .ok_or_else(|| Refusal::not_found(format!("no service {service}")))?;
        self.add_contributed(&mut s);
        Ok(s)
    }

    /// Adds the backends Docker contributes to `s`. A backend declared by
    /// hand wins over a container at the same address (the membership check
    /// already warned).
    fn add_contributed(&self, s: &mut ServiceSpec) {
        self.add_source(s, &self.docker);
        // Other nodes' last: an address this node has is its own.
        self.add_source(s, &self.remote);
    }

    /// Adds `source`'s backends of `s` whose address it lacks, as many as
    /// its table has slots for.
    fn add_source(&self, s: &mut ServiceSpec, source: &BTreeMap<String, Vec<BackendSpec>>) {
        let Some(extra) = source.get(&s.name) else {
            return;
        };
        let room = (s.table_size as usize).saturating_sub(s.backends.len());
        let mut have: HashSet<SocketAddrV4> = s.backends.iter().map(|b| b.addr).collect();
        let mut usable = Vec::new();
        for b in extra.iter().filter(|b| have.insert(b.addr)) {
            if usable.len() == room {
                break;
            }
            // A contributed backend is observed, not asked for: one the
            // service cannot use stays out, said once per change of the
            // source's view.
            match s.refuses_backend(b.addr) {
                Some(why) => warn!(backend = %b.addr, "{why}; it stays out"),
                None => usable.push(*b),
            }
        }
        s.backends.extend(usable);
    }

    /// Removes a backend from any service.
    pub fn remove_backend(&mut self, service: &str, address: &str) -> Result<(), Refusal> {
        let addr = self.existing_backend(service, address)?;
        if self.config_service(service).is_some() {
            let in_config = self
                .config_service(service)
                .is_some_and(|s| s.backends.iter().any(|b| b.addr == addr));
            self.change(service, |o| {
                let c = o.changes.entry(service.to_owned()).or_default();
                c.added.retain(|b| b.address != addr);
                c.drained.retain(|a| *a != addr);
                c.weights.remove(&addr);
                if in_config {
                    c.removed.push(addr);
                }
            })
        } else {
            self.change(service, |o| {
                if let Some(s) = o.services.iter_mut().find(|s| s.name == service) {
                    s.backends.retain(|b| b.address != addr);
                }
            })
        }
    }

    /// Drains a backend: it keeps its flows and gets no new ones.
    pub fn drain_backend(&mut self, service: &str, address: &str) -> Result<(), Refusal> {
        self.set_drained(service, address, true)
    }

    /// Puts a drained backend back: it takes new flows again.
    pub fn undrain_backend(&mut self, service: &str, address: &str) -> Result<(), Refusal> {
        self.set_drained(service, address, false)
    }

    fn set_drained(&mut self, service: &str, address: &str, drained: bool) -> Result<(), Refusal> {
        let addr = self.existing_backend(service, address)?;
        if self.config_service(service).is_some() {
            self.change(service, |o| {
                let c = o.changes.entry(service.to_owned()).or_default();
                if let Some(b) = c.added.iter_mut().find(|b| b.address == addr) {
                    b.drained = drained;
                } else if drained && !c.drained.contains(&addr) {
                    c.drained.push(addr);
                } else if !drained {
                    c.drained.retain(|a| *a != addr);
                }
            })
        } else {
            self.change(service, |o| {
                if let Some(b) = o
                    .services
                    .iter_mut()
                    .find(|s| s.name == service)
                    .and_then(|s| s.backends.iter_mut().find(|b| b.address == addr))
                {
                    b.drained = drained;
                }
            })
        }
    }

    /// Changes a backend's weight in place: its flows stay where they are,
    /// new flows follow the new weights.
    pub fn set_weight(&mut self, service: &str, address: &str, weight: u32) -> Result<(), Refusal> {
        check_weight(weight)?;
        let addr = self.existing_backend(service, address)?;
        let in_config = self
            .config_service(service)
            .and_then(|s| s.backends.iter().find(|b| b.addr == addr))
            .map(|b| b.weight);
        if self.config_service(service).is_some() {
            self.change(service, |o| {
                let c = o.changes.entry(service.to_owned()).or_default();
                if let Some(b) = c.added.iter_mut().find(|b| b.address == addr) {
                    b.weight = weight;
                } else if in_config == Some(weight) {
                    c.weights.remove(&addr);
                } else {
                    c.weights.insert(addr, weight);
                }
            })
        } else {
            self.change(service, |o| {
                if let Some(b) = o
                    .services
                    .iter_mut()
                    .find(|s| s.name == service)
                    .and_then(|s| s.backends.iter_mut().find(|b| b.address == addr))
                {
                    b.weight = weight;
                }
            })
        }
    }

    fn existing_backend(&self, service: &str, address: &str) -> Result<SocketAddrV4, Refusal> {
        let addr =
            parse_socket_addr(address).map_err(|r| Refusal::invalid(format!("address: {r}")))?;
        let s = self.service(service)?;
        if !s.backends.iter().any(|b| b.addr == addr) {
            return Err(Refusal::not_found(format!(
                "{addr} is not a backend of {service}"
            )));
        }
        let declared = self
            .declared_one(service)
            .is_some_and(|s| s.backends.iter().any(|b| b.addr == addr));
        if !declared {
            return Err(Refusal::conflict(format!(
                "{addr} of {service} is a Docker container: stop it, or change its labels"
            )));
        }
        Ok(addr)
    }

    /// Applies `f`, which changes only the entries of service `name`,
    /// checks the result, saves it, and only then keeps it.
    ///
    /// While saves are held, the check and the save wait for
    /// [`Desired::flush`], once per group instead of once per change.
    fn change(&mut self, name: &str, f: impl FnOnce(&mut Overlay)) -> Result<(), Refusal> {
        let held_by_caller = self.held.is_some();
        self.hold();
        self.remember(name);
        f(&mut self.overlay);
        self.rebuild(name);
        if held_by_caller {
            return Ok(());
        }
        let Some(Flush { write, before }) = self.flush()? else {
            return Ok(());
        };
        let written = write.write();
        self.settle(before, &written);
        written
    }

    /// Holds saves: changes from now on are checked and kept, but written
    /// to disk only by [`Desired::flush`], once for all of them (a group
    /// commit: a burst of API calls pays for one write and one fsync).
    pub fn hold(&mut self) {
        self.held.get_or_insert_with(Held::default);
    }

    /// Keeps the entries of service `name` as they are now, if saves are
    /// held, for the change about to be made to them.
    fn remember(&mut self, name: &str) {
        let Some(held) = &mut self.held else {
            return;
        };
        let service = (self.overlay.services.iter())
            .position(|s| s.name == name)
            .map(|i| (i, self.overlay.services[i].clone()));
        let changes = self.overlay.changes.get(name).cloned();
        held.log
            .push((name.to_owned(), Before { service, changes }));
    }

    /// Undoes the changes `held` logged, the last first: each puts back
    /// the entries of one name, the service at its place in the list.
    fn restore(&mut self, held: Held) {
        let mut touched = BTreeSet::new();
        for (name, before) in held.log.into_iter().rev() {
            let services = &mut self.overlay.services;
            if let Some(i) = services.iter().position(|s| s.name == name) {
                services.remove(i);
            }
            if let Some((i, s)) = before.service {
                services.insert(i.min(services.len()), s);
            }
            match before.changes {
                Some(c) => self.overlay.changes.insert(name.clone(), c),
                None => self.overlay.changes.remove(&name),
            };
            touched.insert(name);
        }
        for name in touched {
            self.rebuild(&name);
        }
    }

    /// The journal entries that turn the state `held` kept into the state
    /// now: removed services first, then changed ones in the list's order,
    /// then the changes to config services.
    fn delta(&self, held: &Held) -> Vec<journal::Entry> {
        let first = held.first();
        let now: HashMap<&str, &StoredService> = (self.overlay.services.iter())
            .filter(|s| first.contains_key(s.name.as_str()))
            .map(|s| (s.name.as_str(), s))
            .collect();
        let mut out = Vec::new();
        for (name, before) in &first {
            if before.service.is_some() && !now.contains_key(*name) {
                out.push(journal::Entry::Service {
                    name: (*name).to_owned(),
                    value: None,
                });
            }
        }
        for s in &self.overlay.services {
            let Some(before) = first.get(s.name.as_str()) else {
                continue;
            };
            let old = before.service.as_ref().map(|(_, old)| old);
            if old == Some(s) {
                continue;
            }
            // A line per backend changed, not the whole service: adding one
            // backend to a thousand then writes one short line.
            let patch = old
                .filter(|old| same_but_backends(old, s))
                .and_then(|old| journal::list_patch(&old.backends, &s.backends, |b| b.address));
            match patch {
                Some(patch) => {
                    out.extend(
                        patch
                            .into_iter()
                            .map(|(address, value)| journal::Entry::Backend {
                                service: s.name.clone(),
                                address,
                                value: value.cloned(),
                            }),
                    )
                }
                None => out.push(journal::Entry::Service {
                    name: s.name.clone(),
                    value: Some(s.clone()),
                }),
            }
        }
        for (name, before) in &first {
            let now = self.overlay.changes.get(*name);
            if before.changes.as_ref() == now {
                continue;
            }
            let patch = now.and_then(|now| {
                let empty = Changes::default();
                now.patch_from(before.changes.as_ref().unwrap_or(&empty))
            });
            match patch {
                Some(patch) => out.extend(patch.into_iter().map(|(address, value)| {
                    journal::Entry::ConfigBackend {
                        service: (*name).to_owned(),
                        address,
                        value,
                    }
                })),
                None => out.push(journal::Entry::Changes {
                    service: (*name).to_owned(),
                    value: now.cloned(),
                }),
            }
        }
        out
    }

    /// Checks what changed since [`Desired::hold`] and encodes it for the
    /// state file; the held changes stay until [`Desired::settle`] says
    /// whether the write succeeded. A refusal of kind `Conflict` means the
    /// changes together break a limit (each may not), and every held change
    /// was undone: the caller can try them one at a time.
    ///
    /// Encoding and writing are apart so that the write (an fsync, the
    /// slowest step of a change but for the table build) can run on another
    /// thread while the maps are applied.
    pub fn flush(&mut self) -> Result<Option<Flush>, Refusal> {
        let Some(held) = self.held.take() else {
            return Ok(None);
        };
        let entries = self.delta(&held);
        if entries.is_empty() {
            return Ok(None);
        }
        let touched: BTreeSet<String> = held.log.iter().map(|(n, _)| n.clone()).collect();
        if let Err(e) = self
            .catalog
            .check(touched.iter().map(String::as_str), &self.limits)
        {
            self.restore(held);
            return Err(Refusal::conflict(e));
        }
        let seq = self.disk.seq + 1;
        let journal = journal::path_of(&self.path);
        let d = &self.disk;
        let write = if d.snapshot_next || d.journal_len > d.compact_above.max(d.snapshot_len) {
            // Compact: the snapshot is rewritten only now and then, and
            // pretty printing tripled its size (`jq .` shows it indented).
            let json = serde_json::to_vec(&SnapshotOut {
                overlay: &self.overlay,
                journal_seq: seq,
            })
            .expect("the state serialises");
            StateWrite::Snapshot {
                path: self.path.clone(),
                journal,
                json,
            }
        } else {
            StateWrite::Append {
                journal,
                lines: journal::encode(seq, entries),
            }
        };
        let wrote = write.wrote();
        Ok(Some(Flush {
            write,
            before: Undo { held, seq, wrote },
        }))
    }

    /// Ends a [`Desired::flush`]: if its write failed, every change it held
    /// is undone (nothing that was not saved stays).
    pub fn settle(&mut self, undo: Undo, written: &Result<(), Refusal>) {
        if written.is_err() {
            self.restore(undo.held);
            // A failed append may have left part of a line behind.
            self.disk.snapshot_next = true;
            return;
        }
        self.disk.seq = undo.seq;
        match undo.wrote {
            Wrote::Snapshot(len) => {
                self.disk.snapshot_len = len;
                self.disk.journal_len = 0;
                self.disk.snapshot_next = false;
            }
            Wrote::Journal(len) => self.disk.journal_len += len,
        }
    }
}

/// A group of held changes, checked, with the write that saves them and what
/// undoes them if that write fails.
#[derive(Debug)]
pub struct Flush {
    /// The state file to write.
    pub write: StateWrite,
    /// What [`Desired::settle`] restores if the write fails.
    pub before: Undo,
}

/// The state as it was before a [`Flush`], and what the flush wrote, for
/// [`Desired::settle`].
#[derive(Debug)]
pub struct Undo {
    held: Held,
    seq: u64,
    wrote: Wrote,
}

/// What a [`StateWrite`] writes, and how many bytes.
#[derive(Clone, Copy, Debug)]
enum Wrote {
    Snapshot(u64),
    Journal(u64),
}

/// One write of the state, ready to run on any thread.
#[derive(Debug)]
pub enum StateWrite {
    /// The lines of one commit, appended to the journal.
    Append {
        /// The journal.
        journal: PathBuf,
        /// One JSON line per changed entry.
        lines: Vec<u8>,
    },
    /// The whole state, then the journal emptied.
    Snapshot {
        /// The state file.
        path: PathBuf,
        /// The journal.
        journal: PathBuf,
        /// The state file's new content.
        json: Vec<u8>,
    },
}

impl StateWrite {
    fn wrote(&self) -> Wrote {
        match self {
            StateWrite::Append { lines, .. } => Wrote::Journal(lines.len() as u64),
            StateWrite::Snapshot { json, .. } => Wrote::Snapshot(json.len() as u64),
        }
    }

    /// Writes and waits until it is on disk: an append is one write and one
    /// fdatasync; a snapshot is written to a temporary file (mode 0600),
    /// synced and renamed over the state file, then the journal is emptied.
    pub fn write(self) -> Result<(), Refusal> {
        let started = std::time::Instant::now();
        let written = self.write_files();
        tracing::debug!(
            save_us = started.elapsed().as_micros() as u64,
            wrote = ?self.wrote(),
            "state saved"
        );
        // The caller sees one line with the cause, as anyhow prints a chain.
        written.map_err(|e| Refusal::failed(format!("{:#}", anyhow::Error::from(e))))
    }

    fn write_files(&self) -> Result<(), StateError> {
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| StateError::Io { path, source }
        };
        match self {
            StateWrite::Append { journal, lines } => {
                journal::append(journal, lines).map_err(io(journal))
            }
            StateWrite::Snapshot {
                path,
                journal,
                json,
            } => {
                let tmp = path.with_extension("json.tmp");
                let mut f = fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&tmp)
                    .map_err(io(&tmp))?;
                f.write_all(json).map_err(io(&tmp))?;
                f.sync_all().map_err(io(&tmp))?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600)).map_err(io(&tmp))?;
                fs::rename(&tmp, path).map_err(io(path))?;
                // Lines the snapshot includes are skipped at load by their
                // sequence number, so a crash before this loses nothing.
                journal::clear(journal).map_err(io(journal))
            }
        }
    }
}

/// Whether two API services differ in their backends at most.
fn same_but_backends(a: &StoredService, b: &StoredService) -> bool {
    // Every field named, so a new one cannot be forgotten here.
    let StoredService {
        name,
        vip,
        protocol,
        table_size,
        health,
        image,
        target_port,
        forwarding,
        backends: _,
    } = a;
    (
        name,
        vip,
        protocol,
        table_size,
        health,
        image,
        target_port,
        forwarding,
    ) == (
        &b.name,
        &b.vip,
        &b.protocol,
        &b.table_size,
        &b.health,
        &b.image,
        &b.target_port,
        &b.forwarding,
    )
}

/// A service created through the API, as a spec.
fn api_spec(s: &StoredService) -> ServiceSpec {
    ServiceSpec {
        name: s.name.clone(),
        vip: s.vip,
        protocol: s.protocol,
        table_size: s.table_size,
        backends: s.backends.iter().map(BackendSpec::from).collect(),
        origin: Origin::Api,
        health: s.health.clone(),
        image: s
            .image
            .clone()
            .zip(s.target_port)
            .map(|(image, target_port)| ImageRule { image, target_port }),
        forwarding: s.forwarding,
    }
}

fn check_weight(weight: u32) -> Result<(), Refusal> {
    if weight == 0 {
        return Err(Refusal::invalid(
            "weight: 0 is not a weight (at least 1; drain or remove a backend instead)".into(),
        ));
    }
    Ok(())
}

/// Checks a list of new backends: each address valid, each weight at
/// least 1, no address twice. The error names the backend at fault.
fn parse_backends(new: &[NewBackend]) -> Result<Vec<StoredBackend>, Refusal> {
    let mut out: Vec<StoredBackend> = Vec::with_capacity(new.len());
    let mut seen = HashSet::with_capacity(new.len());
    for b in new {
        let address =
            parse_socket_addr(&b.address).map_err(|r| Refusal::invalid(format!("address: {r}")))?;
        let weight = b.weight.unwrap_or(1);
        check_weight(weight).map_err(|e| Refusal::invalid(format!("{address}: {e}")))?;
        if !seen.insert(address) {
            return Err(Refusal::invalid(format!("{address} is listed twice")));
        }
        out.push(StoredBackend {
            address,
            weight,
            drained: false,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RefusalKind;
    use proptest::prelude::*;

    fn config() -> Config {
        Config::parse(
            Path::new("lb.toml"),
            r#"
[datapath]
external = ["eth1"]
max_services = 3

[[service]]
name = "web"
vip = "198.18.101.1:80"
backends = ["198.18.103.2:8080", "198.18.104.2:8080"]
"#,
        )
        .unwrap()
    }

    /// The state file and its journal, as text (either may be absent).
    fn on_disk(path: &Path) -> String {
        [path.to_owned(), journal::path_of(path)]
            .iter()
            .map(|p| fs::read_to_string(p).unwrap_or_default())
            .collect()
    }

    struct Tmp(PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tmp(tag: &str) -> Tmp {
        let p = std::env::temp_dir().join(format!("lb-state-test-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).unwrap();
        Tmp(p)
    }

    fn new_service(name: &str, vip: &str) -> NewService {
        NewService {
            name: name.into(),
            vip: vip.into(),
            protocol: None,
            table_size: Some(251),
            image: None,
            target_port: None,
            health: None,
            forwarding: None,
        }
    }

    fn backend(a: &str) -> NewBackend {
        NewBackend {
            address: a.into(),
            weight: None,
        }
    }

    #[test]
    fn api_changes_survive_a_reload() {
        let dir = tmp("reload");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        d.add_service(&new_service("api", "198.18.101.2:80"))
            .unwrap();
        d.add_backend("api", &backend("198.18.105.2:80")).unwrap();
        d.add_backend("web", &backend("198.18.105.2:8080")).unwrap();
        d.remove_backend("web", "198.18.103.2:8080").unwrap();
        d.drain_backend("web", "198.18.104.2:8080").unwrap();
        let before = d.services();
        let mode = fs::metadata(journal::path_of(&path))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);

        let again = Desired::load(&config(), path).unwrap();
        assert_eq!(again.services(), before);
        let named = |name: &str| before.iter().find(|s| s.name == name).unwrap();
        let web = named("web");
        let addrs: Vec<String> = web.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(addrs, ["198.18.104.2:8080", "198.18.105.2:8080"]);
        assert!(web.backends[0].drained);
        assert_eq!(before.len(), 2);
        assert_eq!(named("api").origin, Origin::Api);
    }

    fn addrs_of(d: &Desired, name: &str) -> Vec<(String, u32, bool)> {
        d.services()
            .into_iter()
            .find(|s| s.name == name)
            .unwrap()
            .backends
            .iter()
            .map(|b| (b.addr.to_string(), b.weight, b.drained))
            .collect()
    }

    #[test]
    fn batches_undrain_and_weights_survive_a_reload() {
        let dir = tmp("batch");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        d.add_service(&new_service("api", "198.18.101.2:80"))
            .unwrap();
        let many: Vec<NewBackend> = (1..=3)
            .map(|i| backend(&format!("198.18.105.{i}:80")))
            .collect();
        d.add_backends("api", &many).unwrap();
        d.drain_backend("api", "198.18.105.1:80").unwrap();
        d.set_weight("api", "198.18.105.2:80", 5).unwrap();
        // A config service: its own backend reweighted, drained, undrained.
        d.set_weight("web", "198.18.103.2:8080", 3).unwrap();
        d.drain_backend("web", "198.18.104.2:8080").unwrap();
        d.undrain_backend("web", "198.18.104.2:8080").unwrap();
        assert_eq!(
            addrs_of(&d, "web"),
            [
                ("198.18.103.2:8080".into(), 3, false),
                ("198.18.104.2:8080".into(), 1, false)
            ]
        );
        // Set: one stays (keeps its drain state), one new, others leave.
        d.set_backends(
            "api",
            &[
                NewBackend {
                    address: "198.18.105.1:80".into(),
                    weight: Some(2),
                },
                backend("198.18.105.9:80"),
            ],
        )
        .unwrap();
        assert_eq!(
            addrs_of(&d, "api"),
            [
                ("198.18.105.1:80".into(), 2, true),
                ("198.18.105.9:80".into(), 1, false)
            ]
        );
        d.set_backends(
            "web",
            &[backend("198.18.104.2:8080"), backend("198.18.106.1:80")],
        )
        .unwrap();
        assert_eq!(
            addrs_of(&d, "web"),
            [
                ("198.18.104.2:8080".into(), 1, false),
                ("198.18.106.1:80".into(), 1, false)
            ]
        );
        let before = d.services();
        assert_eq!(Desired::load(&config(), path).unwrap().services(), before);
    }

    /// Flushes and writes on this thread, as the controller does on two.
    fn flush_now(d: &mut Desired) -> Result<(), Refusal> {
        let Some(Flush { write, before }) = d.flush()? else {
            return Ok(());
        };
        let written = write.write();
        d.settle(before, &written);
        written
    }

    #[test]
    fn held_changes_are_saved_once_or_not_at_all() {
        let dir = tmp("hold");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        d.hold();
        d.add_backend("web", &backend("198.18.105.1:80")).unwrap();
        // A refused change in the group changes nothing, the others stay.
        assert!(d.add_backend("web", &backend("198.18.105.1:80")).is_err());
        d.drain_backend("web", "198.18.103.2:8080").unwrap();
        assert!(!path.exists(), "nothing is written while held");
        flush_now(&mut d).unwrap();
        let again = Desired::load(&config(), path.clone()).unwrap();
        assert_eq!(again.services(), d.services());
        assert_eq!(addrs_of(&again, "web").len(), 3);

        // A commit whose write fails undoes every held change.
        let before = d.services();
        let mut gone = Desired::load(&config(), dir.0.join("missing/lb.state.json")).unwrap();
        gone.hold();
        gone.add_backend("web", &backend("198.18.105.7:80"))
            .unwrap();
        let e = flush_now(&mut gone).unwrap_err();
        assert_eq!(e.kind, RefusalKind::Failed);
        assert!(
            e.message.contains("lb.state.journal") && e.message.contains("No such file"),
            "one line with the file and the cause: {}",
            e.message
        );
        assert_eq!(
            addrs_of(&gone, "web").len(),
            2,
            "the held change was undone"
        );
        assert_eq!(d.services(), before);
    }

    #[test]
    fn held_changes_that_together_break_a_limit_are_all_undone() {
        let dir = tmp("hold-limit");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        let before = d.services();
        d.hold();
        // max_services = 3: web, a and b fit, c does not. Each alone passes
        // what is checked per change; the group is checked at the flush.
        for (name, vip) in [
            ("a", "198.18.101.2:80"),
            ("b", "198.18.101.3:80"),
            ("c", "198.18.101.4:80"),
        ] {
            d.add_service(&new_service(name, vip)).unwrap();
        }
        let e = d.flush().unwrap_err();
        assert_eq!(e.kind, RefusalKind::Conflict, "{}", e.message);
        assert_eq!(d.services(), before, "every held change was undone");
        assert!(!path.exists(), "nothing was saved");
        // One at a time, only the one at fault is refused.
        d.add_service(&new_service("a", "198.18.101.2:80")).unwrap();
        d.add_service(&new_service("b", "198.18.101.3:80")).unwrap();
        let e = d
            .add_service(&new_service("c", "198.18.101.4:80"))
            .unwrap_err();
        assert_eq!(e.kind, RefusalKind::Conflict);
        assert_eq!(d.services().len(), 3);
    }

    #[test]
    fn a_refused_group_puts_every_entry_back_in_its_place() {
        let dir = tmp("hold-restore");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        d.add_service(&new_service("a", "198.18.101.2:80")).unwrap();
        d.add_service(&new_service("b", "198.18.101.3:80")).unwrap();
        d.add_backend("b", &backend("198.18.105.2:80")).unwrap();
        d.add_backend("web", &backend("198.18.105.2:8080")).unwrap();
        d.take_unapplied();
        let overlay = d.overlay.clone();
        let services = d.services();
        d.hold();
        // a leaves, b and web change, c and e arrive: five services
        // (max_services = 3), refused at the flush.
        d.remove_service("a").unwrap();
        d.add_backend("b", &backend("198.18.105.3:80")).unwrap();
        d.remove_backend("web", "198.18.105.2:8080").unwrap();
        d.drain_backend("web", "198.18.103.2:8080").unwrap();
        d.add_service(&new_service("c", "198.18.101.4:80")).unwrap();
        d.add_service(&new_service("e", "198.18.101.5:80")).unwrap();
        d.remove_service("c").unwrap();
        d.add_service(&new_service("a", "198.18.101.6:80")).unwrap();
        let e = d.flush().unwrap_err();
        assert_eq!(e.kind, RefusalKind::Conflict, "{}", e.message);
        assert_eq!(d.overlay, overlay, "every entry back, in its place");
        assert_eq!(d.services(), services);
        let [kept, counted] = d.catalog.totals_and_recount();
        assert_eq!(kept, counted);
        // What the reconciler is handed again is the state before the group.
        for (name, spec) in d.take_unapplied() {
            let was = services.iter().find(|s| s.name == name);
            assert_eq!(spec.as_ref(), was, "{name}");
        }
    }

    #[test]
    fn only_the_services_a_change_touches_are_applied_again() {
        let dir = tmp("unapplied");
        let mut d = Desired::load(&config(), dir.0.join("lb.state.json")).unwrap();
        let first: Vec<String> = d.take_unapplied().into_iter().map(|c| c.0).collect();
        assert_eq!(first, ["web"], "at first, every service");
        d.add_service(&new_service("a", "198.18.101.2:80")).unwrap();
        d.add_service(&new_service("b", "198.18.101.3:80")).unwrap();
        d.take_unapplied();
        d.add_backend("b", &backend("198.18.105.2:80")).unwrap();
        let b = d.take_unapplied();
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].0, "b");
        assert_eq!(b[0].1.as_ref().unwrap().backends.len(), 1);
        d.drain_backend("b", "198.18.105.2:80").unwrap();
        d.drain_backend("b", "198.18.105.2:80").unwrap();
        assert_eq!(d.take_unapplied().len(), 1, "draining twice is one change");
        d.remove_service("a").unwrap();
        assert_eq!(d.take_unapplied(), [("a".to_owned(), None)]);
        let mut docker = BTreeMap::new();
        docker.insert(
            "web".to_owned(),
            vec![BackendSpec::from(&StoredBackend {
                address: "198.18.105.9:8080".parse().unwrap(),
                weight: 1,
                drained: false,
            })],
        );
        d.set_docker(docker.clone());
        let web: Vec<String> = d.take_unapplied().into_iter().map(|c| c.0).collect();
        assert_eq!(web, ["web"], "a container joins one service");
        d.set_docker(docker);
        assert!(
            d.take_unapplied().is_empty(),
            "the same containers change nothing"
        );
    }

    #[test]
    fn one_backend_more_is_one_short_journal_line() {
        let (_dir, _path, journal, mut d) = fresh("journal-patch");
        d.disk.compact_above = u64::MAX;
        d.add_service(&new_service("api", "198.18.101.2:80"))
            .unwrap();
        let many = |n: u8| -> Vec<NewBackend> {
            (1..=n)
                .map(|i| backend(&format!("198.18.105.{i}:80")))
                .collect()
        };
        d.add_backends("api", &many(200)).unwrap();
        d.add_backends("web", &many(200)).unwrap();
        for (service, address) in [("api", "198.18.106.1:80"), ("web", "198.18.106.1:80")] {
            let before = fs::metadata(&journal).unwrap().len();
            d.add_backend(service, &backend(address)).unwrap();
            let line = fs::metadata(&journal).unwrap().len() - before;
            assert!(line < 200, "{service}: {line} bytes for one backend");
        }
        let before = fs::metadata(&journal).unwrap().len();
        d.drain_backend("web", "198.18.103.2:8080").unwrap();
        d.set_weight("web", "198.18.105.7:80", 3).unwrap();
        assert!(fs::metadata(&journal).unwrap().len() - before < 400);
        let again = Desired::load(&config(), d.path().to_owned()).unwrap();
        assert_eq!(again.services(), d.services());
    }

    #[test]
    fn a_refused_batch_changes_nothing() {
        let dir = tmp("batch-bad");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        let before = d.services();
        let cases: Vec<(Result<(), Refusal>, RefusalKind)> = vec![
            (
                d.add_backends(
                    "web",
                    &[backend("198.18.105.1:80"), backend("198.18.105.1:80")],
                ),
                RefusalKind::Invalid,
            ),
            (
                d.add_backends("web", &[backend("198.18.105.1:80"), backend("bad")]),
                RefusalKind::Invalid,
            ),
            (
                d.add_backends(
                    "web",
                    &[backend("198.18.105.1:80"), backend("198.18.103.2:8080")],
                ),
                RefusalKind::Conflict,
            ),
            (
                d.set_backends("web", &[backend("198.18.105.1:80"), backend("x")]),
                RefusalKind::Invalid,
            ),
            (
                d.set_backends("nope", &[backend("198.18.105.1:80")]),
                RefusalKind::NotFound,
            ),
            (
                d.set_weight("web", "198.18.103.2:8080", 0),
                RefusalKind::Invalid,
            ),
            (
                d.set_weight("web", "198.18.109.9:80", 2),
                RefusalKind::NotFound,
            ),
            (
                d.undrain_backend("web", "198.18.109.9:80"),
                RefusalKind::NotFound,
            ),
        ];
        for (i, (r, kind)) in cases.into_iter().enumerate() {
            let e = r.expect_err(&format!("case {i} must be refused"));
            assert_eq!(e.kind, kind, "case {i}: {}", e.message);
        }
        assert_eq!(d.services(), before);
        assert!(!path.exists(), "nothing was saved");
    }

    #[test]
    fn bad_inputs_change_nothing() {
        let dir = tmp("bad");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        let before = d.services();
        let cases: Vec<(Result<(), Refusal>, RefusalKind)> = vec![
            (
                d.add_service(&new_service("web", "198.18.101.9:80"))
                    .map(|_| ()),
                RefusalKind::Conflict,
            ),
            (
                d.add_service(&new_service("x", "198.18.101.1:80"))
                    .map(|_| ()),
                RefusalKind::Conflict,
            ),
            (
                d.add_service(&new_service("x", "198.18.101.9:0"))
                    .map(|_| ()),
                RefusalKind::Invalid,
            ),
            (
                d.add_service(&new_service("x", "198.18.101.9:65536"))
                    .map(|_| ()),
                RefusalKind::Invalid,
            ),
            (
                d.add_service(&new_service("bad name", "198.18.101.9:80"))
                    .map(|_| ()),
                RefusalKind::Invalid,
            ),
            (
                d.add_service(&NewService {
                    table_size: Some(250),
                    ..new_service("x", "198.18.101.9:80")
                })
                .map(|_| ()),
                RefusalKind::Invalid,
            ),
            (d.remove_service("web"), RefusalKind::Conflict),
            (d.remove_service("nope"), RefusalKind::NotFound),
            (
                d.add_backend("nope", &backend("198.18.103.2:1")),
                RefusalKind::NotFound,
            ),
            (
                d.add_backend("web", &backend("198.18.103.2:8080")),
                RefusalKind::Conflict,
            ),
            (
                d.add_backend("web", &backend("198.18.103.2")),
                RefusalKind::Invalid,
            ),
            (
                d.add_backend(
                    "web",
                    &NewBackend {
                        address: "198.18.103.9:1".into(),
                        weight: Some(0),
                    },
                ),
                RefusalKind::Invalid,
            ),
            (
                d.remove_backend("web", "198.18.109.9:1"),
                RefusalKind::NotFound,
            ),
            (
                d.drain_backend("web", "not an address"),
                RefusalKind::Invalid,
            ),
        ];
        for (i, (r, kind)) in cases.into_iter().enumerate() {
            let e = r.expect_err(&format!("case {i} must be refused"));
            assert_eq!(e.kind, kind, "case {i}: {}", e.message);
            assert!(!e.message.contains('\n'));
        }
        assert_eq!(d.services(), before, "refused changes changed nothing");
        assert!(!path.exists(), "nothing was saved");
    }

    #[test]
    fn image_rules_are_kept_and_checked() {
        let dir = tmp("image");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        let with_rule = NewService {
            image: Some("web:1".into()),
            target_port: Some(8080),
            ..new_service("img", "198.18.101.2:80")
        };
        let spec = d.add_service(&with_rule).unwrap();
        let rule = Some(ImageRule {
            image: "web:1".into(),
            target_port: 8080,
        });
        assert_eq!(spec.image, rule);
        let again = Desired::load(&config(), path).unwrap();
        let img = again.specs().find(|s| s.name == "img").unwrap();
        assert_eq!(img.image, rule);
        for (image, port, field) in [
            (Some("web:1"), None, "target_port"),
            (None, Some(80), "image"),
            (Some("bad image"), Some(80), "image"),
        ] {
            let e = d
                .add_service(&NewService {
                    image: image.map(Into::into),
                    target_port: port,
                    ..new_service("x", "198.18.101.3:80")
                })
                .unwrap_err();
            assert_eq!(e.kind, RefusalKind::Invalid);
            assert!(e.message.starts_with(field), "{}", e.message);
        }
    }

    #[test]
    fn docker_backends_are_served_but_not_saved_nor_removable() {
        let dir = tmp("docker");
        let path = dir.0.join("lb.state.json");
        let mut d = Desired::load(&config(), path.clone()).unwrap();
        let b: BackendSpec = "198.18.0.2:8080".parse().unwrap();
        d.set_docker(BTreeMap::from([("web".to_owned(), vec![b])]));
        assert_eq!(d.services()[0].backends.len(), 3);
        assert_eq!(d.declared()[0].backends.len(), 2);
        for r in [
            d.remove_backend("web", "198.18.0.2:8080"),
            d.drain_backend("web", "198.18.0.2:8080"),
        ] {
            let e = r.unwrap_err();
            assert_eq!(e.kind, RefusalKind::Conflict);
            assert!(e.message.contains("Docker container"), "{}", e.message);
        }
        d.add_backend("web", &backend("198.18.105.2:8080")).unwrap();
        let saved = on_disk(&path);
        assert!(saved.contains("198.18.105.2"), "{saved}");
        assert!(!saved.contains("198.18.0.2"), "{saved}");
    }

    #[test]
    fn remote_backends_come_after_own_ones_and_are_not_published() {
        let dir = tmp("remote");
        let mut d = Desired::load(&config(), dir.0.join("lb.state.json")).unwrap();
        let b = |s: &str| s.parse::<BackendSpec>().unwrap();
        d.set_docker(BTreeMap::from([(
            "web".to_owned(),
            vec![b("198.18.0.2:8080")],
        )]));
        // One address this node has (its own wins), one new, and one for
        // a service this node does not declare.
        let left_out = d.set_remote(BTreeMap::from([
            (
                "web".to_owned(),
                vec![b("198.18.103.2:8080@5"), b("198.18.142.10:8080@2")],
            ),
            ("api".to_owned(), vec![b("198.18.142.11:8080")]),
        ]));
        assert_eq!(left_out, 0);
        let web = &d.services()[0];
        let addrs: Vec<String> = web.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(
            addrs,
            [
                "198.18.103.2:8080",
                "198.18.104.2:8080",
                "198.18.0.2:8080",
                "198.18.142.10:8080"
            ]
        );
        assert_eq!(web.backends[0].weight, 1, "this node's own entry is kept");
        assert_eq!(web.backends[3].weight, 2);
        assert_eq!(d.services().len(), 1, "no service comes from another node");
        let local = d.local_backends();
        assert_eq!(local["web"].len(), 3, "what is published: {local:?}");

        // Gone from etcd, gone here.
        d.set_remote(BTreeMap::new());
        assert_eq!(d.services()[0].backends.len(), 3);
    }

    #[test]
    fn remote_backends_beyond_max_backends_are_left_out() {
        let dir = tmp("remote-full");
        let mut d = Desired::load(&config(), dir.0.join("lb.state.json")).unwrap();
        let room = d.limits().max_backends as usize - 2;
        let many: Vec<BackendSpec> = (0..room + 3)
            .map(|i| BackendSpec {
                addr: SocketAddrV4::new(std::net::Ipv4Addr::from(0xc612_8e00 + i as u32), 80),
                weight: 1,
                drained: false,
                via: None,
            })
            .collect();
        let left_out = d.set_remote(BTreeMap::from([("web".to_owned(), many)]));
        assert_eq!(left_out, 3);
        let total = d.services()[0].backends.len();
        assert!(total <= d.limits().max_backends as usize, "{total}");
    }

    #[test]
    fn limits_are_enforced() {
        let dir = tmp("limits");
        let mut d = Desired::load(&config(), dir.0.join("s.json")).unwrap();
        d.add_service(&new_service("a", "198.18.101.2:80")).unwrap();
        d.add_service(&new_service("b", "198.18.101.3:80")).unwrap();
        let e = d
            .add_service(&new_service("c", "198.18.101.4:80"))
            .unwrap_err();
        assert!(e.message.contains("max_services"), "{}", e.message);
        assert_eq!(d.services().len(), 3);
    }

    #[test]
    fn a_corrupt_state_file_is_one_clear_error() {
        let dir = tmp("corrupt");
        let path = dir.0.join("s.json");
        fs::write(&path, b"{not json").unwrap();
        let e = Desired::load(&config(), path).unwrap_err().to_string();
        assert!(e.contains("s.json") && e.contains("move it away"), "{e}");
    }

    #[test]
    fn state_file_sits_next_to_the_config() {
        assert_eq!(
            default_state_path(Path::new("/etc/lb/lb.toml")),
            Path::new("/etc/lb/lb.state.json")
        );
    }

    /// One change through the API, for the journal's property test.
    #[derive(Clone, Debug)]
    enum Op {
        AddService(u8),
        RemoveService(u8),
        AddBackend(u8, u8),
        RemoveBackend(u8, u8),
        Drain(u8, u8),
        Undrain(u8, u8),
        Weight(u8, u8, u32),
        SetBackends(u8, Vec<u8>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3).prop_map(Op::AddService),
            (0u8..3).prop_map(Op::RemoveService),
            (0u8..4, 0u8..6).prop_map(|(s, b)| Op::AddBackend(s, b)),
            (0u8..4, 0u8..6).prop_map(|(s, b)| Op::RemoveBackend(s, b)),
            (0u8..4, 0u8..6).prop_map(|(s, b)| Op::Drain(s, b)),
            (0u8..4, 0u8..6).prop_map(|(s, b)| Op::Undrain(s, b)),
            (0u8..4, 0u8..6, 1u32..5).prop_map(|(s, b, w)| Op::Weight(s, b, w)),
            (0u8..4, prop::collection::vec(0u8..6, 0..4)).prop_map(|(s, b)| Op::SetBackends(s, b)),
        ]
    }

    /// Service `i`: the config's `web` for 3, else an API service.
    fn svc(i: u8) -> String {
        if i == 3 {
            "web".into()
        } else {
            format!("s{i}")
        }
    }

    /// Backend `b`; 5 is one of the config's `web` backends.
    fn addr(b: u8) -> String {
        if b == 5 {
            "198.18.103.2:8080".into()
        } else {
            format!("198.18.105.{b}:80")
        }
    }

    fn run(d: &mut Desired, op: &Op) {
        // Refusals are part of the sequence: they must change nothing.
        let _ = match op {
            Op::AddService(i) => d
                .add_service(&new_service(&svc(*i), &format!("198.18.101.{}:80", 10 + i)))
                .map(|_| ()),
            Op::RemoveService(i) => d.remove_service(&svc(*i)),
            Op::AddBackend(s, b) => d.add_backend(&svc(*s), &backend(&addr(*b))),
            Op::RemoveBackend(s, b) => d.remove_backend(&svc(*s), &addr(*b)),
            Op::Drain(s, b) => d.drain_backend(&svc(*s), &addr(*b)),
            Op::Undrain(s, b) => d.undrain_backend(&svc(*s), &addr(*b)),
            Op::Weight(s, b, w) => d.set_weight(&svc(*s), &addr(*b), *w),
            Op::SetBackends(s, bs) => {
                let new: Vec<NewBackend> = bs.iter().map(|b| backend(&addr(*b))).collect();
                d.set_backends(&svc(*s), &new)
            }
        };
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever the changes and however often the journal is folded
        /// into a snapshot, a restart at any point loads exactly the state
        /// the daemon had.
        #[test]
        fn a_reload_after_any_change_finds_the_same_state(
            ops in prop::collection::vec(op(), 1..40),
            compact_above in prop::sample::select(vec![0u64, 300, JOURNAL_MIN]),
        ) {
            let dir = tmp("journal-prop");
            let path = dir.0.join("lb.state.json");
            let mut d = Desired::load(&config(), path.clone()).unwrap();
            d.disk.compact_above = compact_above;
            for (n, op) in ops.iter().enumerate() {
                run(&mut d, op);
                let again = Desired::load(&config(), path.clone()).unwrap();
                prop_assert_eq!(again.services(), d.services(), "after change {} ({:?})", n, op);
                let [kept, counted] = d.catalog.totals_and_recount();
                prop_assert_eq!(kept, counted, "totals after change {} ({:?})", n, op);
            }
        }
    }

    /// A fresh state in its own directory: the directory, the state file,
    /// its journal and the loaded state.
    fn fresh(tag: &str) -> (Tmp, PathBuf, PathBuf, Desired) {
        let dir = tmp(tag);
        let path = dir.0.join("lb.state.json");
        let journal = journal::path_of(&path);
        let d = Desired::load(&config(), path.clone()).unwrap();
        (dir, path, journal, d)
    }

    #[test]
    fn changes_are_appended_and_folded_into_the_snapshot_now_and_then() {
        let (_dir, path, journal, mut d) = fresh("journal-fold");
        d.add_service(&new_service("api", "198.18.101.2:80"))
            .unwrap();
        assert!(
            !path.exists(),
            "a change is appended, the snapshot is not written"
        );
        let one = fs::metadata(&journal).unwrap().len();
        d.add_backend("api", &backend("198.18.105.2:80")).unwrap();
        assert!(fs::metadata(&journal).unwrap().len() > one, "appended");

        d.disk.compact_above = 0;
        d.add_backend("api", &backend("198.18.105.3:80")).unwrap();
        assert!(path.exists(), "the journal outgrew the snapshot: folded");
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::metadata(&journal).unwrap().len(), 0, "and emptied");
        let again = Desired::load(&config(), path).unwrap();
        assert_eq!(again.services(), d.services());
    }

    #[test]
    fn a_crash_before_the_journal_is_emptied_replays_nothing_twice() {
        let (_dir, path, journal, mut d) = fresh("journal-crash");
        d.add_service(&new_service("api", "198.18.101.2:80"))
            .unwrap();
        d.add_backend("api", &backend("198.18.105.2:80")).unwrap();
        let old_journal = fs::read(&journal).unwrap();
        // Folded with a change the old journal does not have, then the
        // journal as it was before it was emptied.
        d.disk.compact_above = 0;
        d.remove_backend("api", "198.18.105.2:80").unwrap();
        fs::write(&journal, old_journal).unwrap();
        let again = Desired::load(&config(), path).unwrap();
        assert_eq!(again.services(), d.services(), "the old lines are skipped");
        assert!(addrs_of(&again, "api").is_empty());
    }

    #[test]
    fn a_torn_last_line_is_dropped_and_the_next_save_cleans_it() {
        let (_dir, path, journal, mut d) = fresh("journal-torn");
        d.add_service(&new_service("api", "198.18.101.2:80"))
            .unwrap();
        let before = d.services();
        let mut f = fs::OpenOptions::new().append(true).open(&journal).unwrap();
        f.write_all(br#"{"seq":9,"service":{"name":"api","val"#)
            .unwrap();
        drop(f);

        let mut again = Desired::load(&config(), path.clone()).unwrap();
        assert_eq!(again.services(), before, "the cut line is dropped");
        again
            .add_backend("api", &backend("198.18.105.2:80"))
            .unwrap();
        assert_eq!(
            fs::metadata(&journal).unwrap().len(),
            0,
            "a snapshot emptied it"
        );
        let third = Desired::load(&config(), path).unwrap();
        assert_eq!(third.services(), again.services());
    }

    #[test]
    fn a_bad_line_inside_the_journal_is_one_clear_error() {
        let (_dir, path, journal, mut d) = fresh("journal-bad");
        d.add_service(&new_service("api", "198.18.101.2:80"))
            .unwrap();
        let good = fs::read_to_string(&journal).unwrap();
        fs::write(&journal, format!("not json\n{good}")).unwrap();
        let e = Desired::load(&config(), path).unwrap_err().to_string();
        assert!(
            e.contains("lb.state.journal") && e.contains("line 1"),
            "{e}"
        );
    }
}
