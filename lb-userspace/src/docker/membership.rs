//! Which containers are backends of which services: the membership policy.
//!
//! The engine client ([`super::watch`]) only reports what the engine says about
//! containers ([`Container`]) to the control task; it never touches maps.
//! The controller decides membership here ([`members`]) against the
//! current services, so a service added through the API with an image rule
//! picks up the containers already running, and a label naming a service
//! that appears later starts to count when it does.
//!
//! One rule, explicit before implicit:
//! - a container with an `lb.service` label serves that service alone, on
//!   its `lb.port`; image rules do not apply to it;
//! - a container without one serves every service whose image rule
//!   (`image` + `target_port`) matches its image;
//! - `lb.weight` and `lb.network` apply to whichever service it serves;
//! - a container with any malformed `lb.*` label serves no service at all,
//!   and one log line says which label and why ([`Tracker::assign`] logs
//!   it once).
//!
//! A container that is paused, or whose health check is starting or failing,
//! is drained: it keeps the flows it has and gets no new ones.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
    time::SystemTime,
};

use super::DockerUpdate;
use crate::{
    events::Reason,
    model::{one_line, BackendSpec, ServiceSpec, Via},
    state::{Desired, Limits},
};
use tracing::{info, warn};

/// The label naming a container's service.
pub const LABEL_SERVICE: &str = "lb.service";
/// The label giving the container's port.
pub const LABEL_PORT: &str = "lb.port";
/// The label giving the container's weight.
pub const LABEL_WEIGHT: &str = "lb.weight";
/// The label choosing one of the container's networks.
pub const LABEL_NETWORK: &str = "lb.network";
/// Every `lb.*` label there is; any other `lb.*` key is malformed.
const LABELS: [&str; 4] = [LABEL_SERVICE, LABEL_PORT, LABEL_WEIGHT, LABEL_NETWORK];

/// A container's health as its engine reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// No health check.
    None,
    /// The health check has not passed yet.
    Starting,
    /// Passing.
    Healthy,
    /// Failing.
    Unhealthy,
}

/// A container's address on one network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// IPv4 address.
    pub ip: Ipv4Addr,
    /// The container interface's MAC, when the network has one.
    pub mac: Option<[u8; 6]>,
}

/// What the daemon knows of one running container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Container {
    /// Engine id.
    pub id: String,
    /// Name, without the leading `/`.
    pub name: String,
    /// The image as it was asked for (`web:1`).
    pub image: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// IPv4 endpoints by network name.
    pub networks: BTreeMap<String, Endpoint>,
    /// Main process, whose network namespace holds the container's side.
    pub pid: u32,
    /// Paused (running, but it will not answer).
    pub paused: bool,
    /// Health check state.
    pub health: Health,
    /// The signal `docker stop` sends it (its image's or its own
    /// `StopSignal`; SIGTERM unless set).
    pub stop_signal: i32,
    /// Sent a signal that stops it (see [`stops`]) and not yet gone: it
    /// finishes what it serves and takes nothing new.
    pub stopping: bool,
}

/// Whether `signal`, sent to a container whose stop signal is
/// `stop_signal`, asks it to stop: its own stop signal (what `docker stop`
/// sends first), or SIGTERM, SIGINT, SIGQUIT or SIGKILL. Other signals
/// (SIGHUP to reload, SIGUSR1, …) leave it serving.
pub fn stops(signal: i32, stop_signal: i32) -> bool {
    signal == stop_signal
        || [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT, libc::SIGKILL].contains(&signal)
}

impl Container {
    /// Why it is drained (keeps its flows, takes no new ones), if it is.
    pub fn drained_by(&self) -> Option<&'static str> {
        if self.stopping {
            Some("stopping (signalled by docker stop or kill)")
        } else if self.paused {
            Some("paused")
        } else {
            match self.health {
                Health::Starting => Some("health check starting"),
                Health::Unhealthy => Some("health check failing"),
                Health::None | Health::Healthy => None,
            }
        }
    }
}

/// One container serving one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The service.
    pub service: String,
    /// The container's engine id.
    pub container_id: String,
    /// The container's name.
    pub container: String,
    /// The backend entry.
    pub backend: BackendSpec,
}

/// Why a container serves no service, or is left out of one: one log line
/// that names the container.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem(String);

impl Problem {
    /// A problem told by `text`, kept on one line: it quotes labels, which
    /// may hold anything ([`one_line`]).
    pub fn new(text: String) -> Self {
        Self(one_line(&text))
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `web` and `docker.io/library/web:latest` name the same image.
fn normalize_image(r: &str) -> String {
    let r = r.strip_prefix("docker.io/").unwrap_or(r);
    let r = r.strip_prefix("library/").unwrap_or(r);
    let last = r.rsplit('/').next().unwrap_or(r);
    if last.contains(':') || r.contains('@') {
        r.to_owned()
    } else {
        format!("{r}:latest")
    }
}

/// What a container's `lb.*` labels ask for, once every one is well formed.
#[derive(Debug)]
struct Labels<'a> {
    /// `lb.service` with its `lb.port`.
    service: Option<(&'a str, u16)>,
    /// `lb.weight`, 1 without the label.
    weight: u32,
    /// `lb.network`, checked to be one of the container's networks.
    network: Option<&'a str>,
}

/// Reads `c`'s `lb.*` labels; the error names every malformed one and why.
fn read_labels(c: &Container) -> Result<Labels<'_>, Vec<String>> {
    let mut bad = Vec::new();
    let label = |k: &str| c.labels.get(k).map(String::as_str);
    for k in c.labels.keys() {
        if k.starts_with("lb.") && !LABELS.contains(&k.as_str()) {
            bad.push(format!("label {k} is not one of {}", LABELS.join(", ")));
        }
    }
    let port = label(LABEL_PORT).and_then(|p| match p.parse::<u16>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            bad.push(format!("label {LABEL_PORT}={p:?} is not a port (1-65535)"));
            None
        }
    });
    let service = match (label(LABEL_SERVICE), label(LABEL_PORT)) {
        (Some(""), _) => {
            bad.push(format!("label {LABEL_SERVICE} is empty"));
            None
        }
        (Some(name), None) => {
            bad.push(format!(
                "label {LABEL_SERVICE}={name:?} without {LABEL_PORT}"
            ));
            None
        }
        (None, Some(p)) => {
            bad.push(format!(
                "label {LABEL_PORT}={p:?} without {LABEL_SERVICE} (an image rule gives its own port)"
            ));
            None
        }
        (Some(name), Some(_)) => port.map(|p| (name, p)),
        (None, None) => None,
    };
    let weight = match label(LABEL_WEIGHT) {
        None => 1,
        Some(w) => match w.parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                bad.push(format!(
                    "label {LABEL_WEIGHT}={w:?} is not a whole number of at least 1"
                ));
                1
            }
        },
    };
    let network = label(LABEL_NETWORK);
    if let Some(n) = network.filter(|n| !c.networks.contains_key(*n)) {
        let have: Vec<&str> = c.networks.keys().map(String::as_str).collect();
        bad.push(format!(
            "label {LABEL_NETWORK}={n:?} is not one of its networks ({})",
            have.join(", ")
        ));
    }
    if bad.is_empty() {
        Ok(Labels {
            service,
            weight,
            network,
        })
    } else {
        Err(bad)
    }
}

/// The network `c` is reached on: the one `lb.network` names, else its only one.
fn endpoint(c: &Container, network: Option<&str>) -> Result<Endpoint, String> {
    if let Some(e) = network.and_then(|n| c.networks.get(n)) {
        return Ok(*e);
    }
    let mut all = c.networks.values();
    match (all.next(), all.next()) {
        (Some(e), None) => Ok(*e),
        (None, _) => Err("it has no IPv4 address on any network (host or none network?)".into()),
        (Some(_), Some(_)) => {
            let have: Vec<&str> = c.networks.keys().map(String::as_str).collect();
            Err(format!(
                "it is on several networks ({}): say which with label {LABEL_NETWORK}",
                have.join(", ")
            ))
        }
    }
}

/// The services `c` serves, with its backend entry for each (none for a
/// container nothing asks for), or why it serves none although it asks to
/// (a malformed label, a service that does not exist, no usable network).
/// The rule is in the module docs.
pub fn members(c: &Container, services: &[ServiceSpec]) -> Result<Vec<Member>, Problem> {
    let skip = |why: String| {
        Problem::new(format!(
            "container {} skipped, serves no service: {why}",
            c.name
        ))
    };
    let labels = read_labels(c).map_err(|bad| skip(bad.join("; ")))?;
    let targets: Vec<(&ServiceSpec, u16)> = match labels.service {
        Some((name, port)) => {
            let s = services.iter().find(|s| s.name == name).ok_or_else(|| {
                skip(format!(
                    "label {LABEL_SERVICE}={name:?}: no such service (it joins once one of that name is added)"
                ))
            })?;
            vec![(s, port)]
        }
        None => {
            let image = normalize_image(&c.image);
            services
                .iter()
                .filter_map(|s| {
                    let rule = s.image.as_ref()?;
                    (normalize_image(&rule.image) == image).then_some((s, rule.target_port))
                })
                .collect()
        }
    };
    if targets.is_empty() {
        // Labels that only make sense for a service it does not get.
        return match [LABEL_WEIGHT, LABEL_NETWORK].iter().find(|k| c.labels.contains_key(**k)) {
            Some(k) => Err(skip(format!(
                "label {k} is set, but it has no {LABEL_SERVICE} label and no image rule takes image {:?}",
                c.image
            ))),
            None => Ok(Vec::new()),
        };
    }
    let e = endpoint(c, labels.network).map_err(skip)?;
    let drained = c.drained_by().is_some();
    Ok(targets
        .into_iter()
        .map(|(s, port)| Member {
            service: s.name.clone(),
            container_id: c.id.clone(),
            container: c.name.clone(),
            backend: BackendSpec {
                addr: SocketAddrV4::new(e.ip, port),
                weight: labels.weight,
                drained,
                via: e
                    .mac
                    .filter(|_| c.pid > 0)
                    .map(|mac| Via { pid: c.pid, mac }),
            },
        })
        .collect())
}

/// The members that fit beside the declared services within the maps'
/// limits, and a problem for each member left out. Members are taken in
/// container-name order, so the same containers win every time.
pub fn fit(
    declared: &[ServiceSpec],
    mut members: Vec<Member>,
    limits: &Limits,
) -> (Vec<Member>, Vec<Problem>) {
    members.sort_by(|a, b| (&a.container, &a.service).cmp(&(&b.container, &b.service)));
    let mut total: usize = declared.iter().map(|s| s.backends.len()).sum();
    let mut per_service: HashMap<&str, usize> = declared
        .iter()
        .map(|s| (s.name.as_str(), s.backends.len()))
        .collect();
    let mut shared: HashMap<(SocketAddrV4, u8), usize> = HashMap::new();
    for s in declared {
        for b in &s.backends {
            *shared.entry((b.addr, s.protocol.number())).or_default() += 1;
        }
    }
    let mut taken: BTreeSet<(&str, SocketAddrV4)> = BTreeSet::new();
    let mut kept = Vec::new();
    let mut problems = Vec::new();
    for m in &members {
        let Some(s) = declared.iter().find(|s| s.name == m.service) else {
            continue;
        };
        let addr = m.backend.addr;
        let left_out = |why: String| {
            Problem::new(format!(
                "container {} ({addr}) left out of service {}: {why}",
                m.container, m.service
            ))
        };
        if s.backends.iter().any(|b| b.addr == addr) {
            problems.push(left_out(
                "the address is already a backend declared by hand".into(),
            ));
            continue;
        }
        if taken.contains(&(m.service.as_str(), addr)) {
            problems.push(left_out("another container has the same address".into()));
            continue;
        }
        let n = per_service.entry(s.name.as_str()).or_default();
        let sharing = shared.entry((addr, s.protocol.number())).or_default();
        let why = if total >= limits.max_backends as usize {
            Some(format!(
                "datapath.max_backends {} reached",
                limits.max_backends
            ))
        } else if *n >= s.table_size as usize {
            Some(format!("the table's {} slots are all taken", s.table_size))
        } else if *sharing >= lb_common::REV_NAT_MAX {
            Some(format!(
                "the address already serves {} services",
                lb_common::REV_NAT_MAX
            ))
        } else {
            None
        };
        if let Some(why) = why {
            problems.push(left_out(why));
            continue;
        }
        total += 1;
        *n += 1;
        *sharing += 1;
        taken.insert((m.service.as_str(), addr));
        kept.push(m.clone());
    }
    (kept, problems)
}

/// One container serving one service, as last logged.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Serving {
    /// The container's name.
    container: String,
    /// Its backend address in the service.
    addr: SocketAddrV4,
    /// Its weight there.
    weight: u32,
    /// Why it is drained, if it is.
    drained_by: Option<&'static str>,
}

/// The control task's view of the engine: the running containers, which of
/// them serve which service, and the problems already logged.
#[derive(Debug)]
pub struct Tracker {
    status: String,
    containers: BTreeMap<String, Container>,
    /// When the engine last listed every running container.
    listed_at: Option<SystemTime>,
    /// Containers gone since the last [`Tracker::assign`], by id, and why.
    gone: HashMap<String, String>,
    reported: BTreeSet<Problem>,
    /// Containers that serve no service because of a problem, by name.
    skipped: BTreeSet<String>,
    /// Who serves what now, by (container id, service).
    serving: BTreeMap<(String, String), Serving>,
    /// The container behind each backend, by service then address (the
    /// change log looks up every backend at every commit, so a lookup
    /// allocates nothing).
    names: HashMap<String, HashMap<SocketAddrV4, String>>,
    /// The Docker event behind each container's latest change since the
    /// change log last took them, by container name.
    causes: HashMap<String, Reason>,
}

/// The Docker event that turned `old` into `new` (`None`: not running).
fn cause(old: Option<&Container>, new: &Container) -> Reason {
    match old {
        None => Reason::DockerStart,
        Some(o) if o.paused != new.paused => {
            if new.paused {
                Reason::DockerPause
            } else {
                Reason::DockerUnpause
            }
        }
        Some(o) if o.health != new.health => Reason::DockerHealth,
        Some(o) if o.pid != new.pid => Reason::DockerStart,
        Some(_) => Reason::DockerUpdate,
    }
}

/// The reason of a container's departure, from the engine's event.
fn gone_cause(why: &str) -> Reason {
    match why {
        "stop" => Reason::DockerStop,
        "destroy" => Reason::DockerDestroy,
        // `die`, or not running when inspected after another event.
        _ => Reason::DockerDie,
    }
}

impl Tracker {
    /// A tracker whose status reads `status` until the watcher reports.
    pub fn new(status: impl Into<String>) -> Self {
        Self {
            status: status.into(),
            containers: BTreeMap::new(),
            listed_at: None,
            gone: HashMap::new(),
            reported: BTreeSet::new(),
            skipped: BTreeSet::new(),
            serving: BTreeMap::new(),
            names: HashMap::new(),
            causes: HashMap::new(),
        }
    }

    /// The Docker event behind each container's latest change since the
    /// last call, by container name (for the change log), and forgets them.
    pub fn take_causes(&mut self) -> HashMap<String, Reason> {
        std::mem::take(&mut self.causes)
    }

    /// The connection state, for `lb status`.
    pub fn status(&self) -> &str {
        &self.status
    }

    /// When the engine last listed every running container, if it has.
    pub fn listed_at(&self) -> Option<SystemTime> {
        self.listed_at
    }

    /// Running containers, as last reported.
    pub fn running(&self) -> usize {
        self.containers.len()
    }

    /// The names of the containers serving each service (services without
    /// one are left out), sorted.
    pub fn serving(&self) -> BTreeMap<String, Vec<String>> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ((_, service), s) in &self.serving {
            out.entry(service.clone())
                .or_default()
                .push(s.container.clone());
        }
        for names in out.values_mut() {
            names.sort();
        }
        out
    }

    /// How many containers serve at least one service.
    pub fn serving_containers(&self) -> usize {
        self.serving
            .keys()
            .map(|(id, _)| id)
            .collect::<BTreeSet<_>>()
            .len()
    }

    /// Containers that ask to serve but serve nothing because of a
    /// problem (a malformed label, a missing service, no usable network).
    pub fn skipped(&self) -> Vec<String> {
        self.skipped.iter().cloned().collect()
    }

    /// Takes in what the watcher reported. `true` when the containers
    /// changed, so membership must be worked out again.
    pub fn update(&mut self, u: DockerUpdate) -> bool {
        match u {
            DockerUpdate::Sync { containers, at } => {
                self.listed_at = Some(at);
                let all: BTreeMap<String, Container> = containers
                    .into_iter()
                    .map(|c| (c.id.clone(), self.still_stopping(c)))
                    .collect();
                if all == self.containers {
                    return false;
                }
                for (id, c) in self
                    .containers
                    .iter()
                    .filter(|(id, _)| !all.contains_key(*id))
                {
                    self.gone
                        .insert(id.clone(), "not running at the engine's last list".into());
                    self.causes.insert(c.name.clone(), Reason::DockerList);
                }
                for c in all.values() {
                    if self.containers.get(&c.id) != Some(c) {
                        self.causes.insert(c.name.clone(), Reason::DockerList);
                    }
                }
                self.containers = all;
                true
            }
            DockerUpdate::Upsert(c) => {
                self.gone.remove(&c.id);
                let c = self.still_stopping(c);
                let old = self.containers.insert(c.id.clone(), c.clone());
                if old.as_ref() == Some(&c) {
                    return false;
                }
                self.causes.insert(c.name.clone(), cause(old.as_ref(), &c));
                true
            }
            DockerUpdate::Kill { id, signal } => match self.containers.get_mut(&id) {
                Some(c) if !c.stopping && stops(signal, c.stop_signal) => {
                    c.stopping = true;
                    self.causes.insert(c.name.clone(), Reason::DockerKill);
                    true
                }
                _ => false,
            },
            DockerUpdate::Remove { id, why } => {
                let Some(c) = self.containers.remove(&id) else {
                    return false;
                };
                self.causes.insert(c.name, gone_cause(&why));
                self.gone.insert(id, why);
                true
            }
            DockerUpdate::Status(s) => {
                self.status = s;
                false
            }
        }
    }

    /// `c` as the engine describes it, still stopping if it was signalled
    /// to stop and is the same process (a restart starts another one).
    fn still_stopping(&self, mut c: Container) -> Container {
        c.stopping = self
            .containers
            .get(&c.id)
            .is_some_and(|old| old.stopping && old.pid == c.pid);
        c
    }

    /// Works out which containers serve which of `desired`'s services and
    /// hands their backends to it. Logs each change of membership once,
    /// naming the container (joined, drained, back, left), and each
    /// problem once, when it first appears.
    pub fn assign(&mut self, desired: &mut Desired) {
        let declared = desired.declared();
        let mut all = Vec::new();
        let mut problems = BTreeSet::new();
        self.skipped.clear();
        for c in self.containers.values() {
            match members(c, &declared) {
                Ok(m) => all.extend(m),
                Err(p) => {
                    self.skipped.insert(c.name.clone());
                    problems.insert(p);
                }
            }
        }
        let (kept, p) = fit(&declared, all, desired.limits());
        problems.extend(p);
        for p in problems.difference(&self.reported) {
            warn!("{p}");
        }
        self.reported = problems;
        let serving: BTreeMap<(String, String), Serving> = kept
            .iter()
            .map(|m| {
                let serving = Serving {
                    container: m.container.clone(),
                    addr: m.backend.addr,
                    weight: m.backend.weight,
                    drained_by: self
                        .containers
                        .get(&m.container_id)
                        .and_then(Container::drained_by),
                };
                ((m.container_id.clone(), m.service.clone()), serving)
            })
            .collect();
        self.log_changes(&serving, &declared);
        self.serving = serving;
        self.gone.clear();
        self.names.clear();
        for m in &kept {
            self.names
                .entry(m.service.clone())
                .or_default()
                .insert(m.backend.addr, m.container.clone());
        }
        let mut backends: BTreeMap<String, Vec<BackendSpec>> = BTreeMap::new();
        for m in kept {
            backends.entry(m.service).or_default().push(m.backend);
        }
        desired.set_docker(backends);
    }

    /// One line per container and service whose membership changed between
    /// what was logged and `now`.
    fn log_changes(&self, now: &BTreeMap<(String, String), Serving>, declared: &[ServiceSpec]) {
        for ((id, service), was) in &self.serving {
            if now.contains_key(&(id.clone(), service.clone())) {
                continue;
            }
            let why = match self.gone.get(id) {
                Some(why) => why.as_str(),
                None if !declared.iter().any(|s| &s.name == service) => "service removed",
                None => "no longer selected",
            };
            info!(
                container = was.container,
                service,
                backend = %was.addr,
                why,
                "container left"
            );
        }
        for ((id, service), is) in now {
            let Some(was) = self.serving.get(&(id.clone(), service.clone())) else {
                match is.drained_by {
                    None => info!(
                        container = is.container,
                        service,
                        backend = %is.addr,
                        weight = is.weight,
                        "container joined"
                    ),
                    Some(why) => info!(
                        container = is.container,
                        service,
                        backend = %is.addr,
                        weight = is.weight,
                        drained = why,
                        "container joined, drained"
                    ),
                }
                continue;
            };
            if was.addr != is.addr {
                info!(
                    container = is.container,
                    service,
                    from = %was.addr,
                    backend = %is.addr,
                    "container moved to another address"
                );
            }
            match (was.drained_by, is.drained_by) {
                (None, Some(why)) => info!(
                    container = is.container,
                    service,
                    backend = %is.addr,
                    why,
                    "container drained"
                ),
                (Some(was_by), None) => info!(
                    container = is.container,
                    service,
                    backend = %is.addr,
                    was = was_by,
                    "container back"
                ),
                _ => {}
            }
        }
    }

    /// The container behind `service`'s backend `addr`, if it is one.
    pub fn container(&self, service: &str, addr: SocketAddrV4) -> Option<&str> {
        self.names.get(service)?.get(&addr).map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
