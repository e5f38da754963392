//! The admin API's JSON bodies. These are the stable names behind every
//! `--json` output of the CLI: fields are only ever added, never renamed.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

// The domain types a body carries, part of the wire vocabulary too.
pub use crate::{
    events::{Change, Event, EventKind, Reason},
    health::CheckResult,
    model::{CheckKind, Forwarding, HealthCheck, Origin, Protocol},
};

/// An error body: `{"error": "one line"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// What went wrong, one line.
    pub error: String,
}

/// `POST /v1/services`: a new service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewService {
    /// Unique name.
    pub name: String,
    /// `"ip:port"`.
    pub vip: String,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: Option<Protocol>,
    /// Maglev table size (prime); the default when absent.
    #[serde(default)]
    pub table_size: Option<u32>,
    /// Containers of this image join the service (Docker).
    #[serde(default)]
    pub image: Option<String>,
    /// The containers' port for `image`.
    #[serde(default)]
    pub target_port: Option<u16>,
    /// Active health check of the backends (TCP, HTTP or UDP).
    #[serde(default)]
    pub health: Option<HealthCheck>,
    /// `nat` (default) or `dsr` (direct server return).
    #[serde(default)]
    pub forwarding: Option<Forwarding>,
}

/// `GET /v1/services`: one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Unique name.
    pub name: String,
    /// `"ip:port"`.
    pub vip: String,
    /// `tcp` or `udp`.
    pub protocol: Protocol,
    /// Maglev table size.
    pub table_size: u32,
    /// Where it was declared.
    pub origin: Origin,
    /// Image rule, if any.
    pub image: Option<String>,
    /// Port of the image rule.
    pub target_port: Option<u16>,
    /// Health check, if any.
    pub health: Option<HealthCheck>,
    /// How packets reach the backends (absent from daemons before direct
    /// server return: NAT).
    #[serde(default)]
    pub forwarding: Forwarding,
    /// Backends, any state.
    pub backends: usize,
    /// Backends taking new flows.
    pub active_backends: usize,
}

/// `POST /v1/services/{name}/backends`: a new backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewBackend {
    /// `"ip:port"`.
    pub address: String,
    /// Relative share of new flows, at least 1 (default 1).
    #[serde(default)]
    pub weight: Option<u32>,
}

/// `PUT /v1/services/{name}/backends/{address}/weight`: a new weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Weight {
    /// Relative share of new flows, at least 1.
    pub weight: u32,
}

/// What a backend does with flows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new flows and keeps its own.
    Active,
    /// Keeps its flows, takes no new ones (drained by the operator).
    Draining,
    /// Takes no flows; its flows move on their next packet (unreachable, or
    /// failed its health check).
    Down,
}

/// Result of the last health checks of a backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// The service has no health check.
    Unchecked,
    /// Passing.
    Healthy,
    /// Failing: taken out.
    Unhealthy,
}

/// Per-CPU counters summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded.
    pub bytes: u64,
    /// Flows started.
    pub new_flows: u64,
}

/// `GET /v1/services/{name}/backends`: one backend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// `"ip:port"`.
    pub address: String,
    /// Weight.
    pub weight: u32,
    /// What it does with flows.
    pub state: BackendState,
    /// Health check result.
    pub health: Health,
    /// The last health check and what it found, once one ran (absent when
    /// the service has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<CheckResult>,
    /// Flows given to it that carried a packet in the last 60 s.
    pub active_flows: u64,
    /// Its counters.
    pub counters: Counters,
    /// The Docker container behind it, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The other node that published it (cluster mode); absent for this
    /// node's own backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// `GET /v1/stats`: one service's counters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStats {
    /// Service name.
    pub name: String,
    /// Its counters.
    pub counters: Counters,
    /// Its flows that carried a packet in the last 60 s.
    pub active_flows: u64,
    /// Per backend.
    pub backends: Vec<BackendInfo>,
}

/// `GET /v1/stats`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Per service (one service when asked for one).
    pub services: Vec<ServiceStats>,
    /// Data path outcome counters by name (`fwd_xdp`, `pass_no_service`, …).
    pub global: BTreeMap<String, u64>,
}

/// An interface the data path is attached to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceStatus {
    /// Name.
    pub name: String,
    /// Index.
    pub ifindex: u32,
    /// `external` (clients arrive) or `backend` (replies arrive).
    pub role: String,
    /// Programs attached: `xdp` and/or `tc`.
    pub programs: Vec<String>,
}

/// Fill level of one map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapStatus {
    /// Map name.
    pub name: String,
    /// Entries in use.
    pub used: u64,
    /// Capacity.
    pub capacity: u64,
}

/// One attachment of the data path (a BPF link), as `bpftool link show`
/// lists it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentStatus {
    /// Interface name.
    pub interface: String,
    /// Interface index.
    pub ifindex: u32,
    /// `xdp`, or `tc` (a TCX link on ingress).
    pub hook: String,
    /// The kernel's id of the link (`bpftool link show id N`); absent for
    /// an attachment that is not a BPF link (an unpinned data path).
    pub link_id: Option<u32>,
    /// The kernel's id of the program attached (`bpftool prog show id N`).
    pub program_id: Option<u32>,
    /// Where the link is pinned in bpffs, if it is.
    pub pin: Option<String>,
}

/// Docker's containers, for `GET /v1/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainersStatus {
    /// Running containers at the engine, as last reported.
    pub running: usize,
    /// Containers serving at least one service now.
    pub serving: usize,
    /// The containers serving each service, by name (services with none
    /// are left out).
    pub services: BTreeMap<String, Vec<String>>,
    /// Containers that ask to serve (an `lb.*` label or an image rule) but
    /// serve nothing: a malformed label, a missing service, no usable
    /// network. The daemon's log says why.
    pub skipped: Vec<String>,
    /// When the engine last listed every running container, seconds since
    /// the Unix epoch; absent before the first list.
    pub last_list_unix_secs: Option<u64>,
    /// How long ago that was, in seconds.
    pub last_list_age_secs: Option<u64>,
}

/// `GET /v1/status`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// `lb` version.
    pub version: String,
    /// Seconds since the daemon started.
    pub uptime_secs: u64,
    /// Whether the data path was adopted from a previous daemon.
    pub adopted: bool,
    /// bpffs directory of the pinned maps and links.
    pub pin_path: String,
    /// Attached interfaces.
    pub interfaces: Vec<InterfaceStatus>,
    /// Map fill levels.
    pub maps: Vec<MapStatus>,
    /// The Docker engine connection: `disabled`, `connecting`, `connected
    /// to HOST (API V)` or `disconnected: …`.
    pub docker: String,
    /// Services.
    pub services: usize,
    /// Docker's containers: how many serve, in which services.
    #[serde(default)]
    pub containers: ContainersStatus,
    /// The data path's attachments (BPF links).
    #[serde(default)]
    pub attachments: Vec<AttachmentStatus>,
}
