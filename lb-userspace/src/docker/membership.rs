//! Which containers are backends of which services: the membership policy.
//!
//! The engine client ([`super::watch`]) only reports what the engine says about
//! containers ([`Container`]) to the control task; it never touches maps.
//! The controller decides membership here ([`members`]) against the
//! current services, so a service added through the API with an image rule
//! picks up the containers already running, and a label naming a service
//! that appears later starts to count when it does.
//!
//! A container joins a service in two ways:
//! - labels: `lb.service=<name>`, `lb.port=<port>`, optional `lb.weight=<n>`
//!   and `lb.network=<network>`;
//! - the service's image rule (`image` + `target_port`).
//!
//! A container that is paused, or whose health check is starting or failing,
//! is drained: it keeps the flows it has and gets no new ones.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::{Ipv4Addr, SocketAddrV4},
};

use super::DockerUpdate;
use crate::{
    model::{BackendSpec, ServiceSpec, Via},
    state::{Desired, Limits},
};
use tracing::warn;

/// The label naming a container's service.
pub const LABEL_SERVICE: &str = "lb.service";
/// The label giving the container's port.
pub const LABEL_PORT: &str = "lb.port";
/// The label giving the container's weight.
pub const LABEL_WEIGHT: &str = "lb.weight";
/// The label choosing one of the container's networks.
pub const LABEL_NETWORK: &str = "lb.network";

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
}

/// One container serving one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    /// The service.
    pub service: String,
    /// The container's name.
    pub container: String,
    /// The backend entry.
    pub backend: BackendSpec,
}

/// Why a container is not (fully) a backend, for one log line.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Problem(pub String);

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

/// The services `c` serves, with its backend entry for each, and what is
/// wrong with its labels (the container then does not join the labelled
/// service, and the rest keep working).
pub fn members(c: &Container, services: &[ServiceSpec]) -> (Vec<Member>, Vec<Problem>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let problem = |what: String| Problem(format!("container {}: {what}", c.name));
    let label = |k: &str| c.labels.get(k).map(String::as_str);

    let weight = match label(LABEL_WEIGHT) {
        None => Ok(1),
        Some(w) => match w.parse::<u32>() {
            Ok(n) if n >= 1 => Ok(n),
            _ => Err(problem(format!(
                "label {LABEL_WEIGHT}={w:?} is not a whole number of at least 1; ignored"
            ))),
        },
    };
    let endpoint = match label(LABEL_NETWORK) {
        Some(n) => c.networks.get(n).map(|e| (n, *e)).ok_or_else(|| {
            let have: Vec<&str> = c.networks.keys().map(String::as_str).collect();
            problem(format!(
                "label {LABEL_NETWORK}={n:?} is not one of its networks ({}); ignored",
                have.join(", ")
            ))
        }),
        None if c.networks.len() == 1 => {
            let (n, e) = c.networks.iter().next().expect("one network");
            Ok((n.as_str(), *e))
        }
        None if c.networks.is_empty() => Err(problem(
            "has no IPv4 address on any network (host or none network?); ignored".into(),
        )),
        None => {
            let have: Vec<&str> = c.networks.keys().map(String::as_str).collect();
            Err(problem(format!(
                "is on several networks ({}): say which with label {LABEL_NETWORK}; ignored",
                have.join(", ")
            )))
        }
    };
    let drained = c.paused || matches!(c.health, Health::Starting | Health::Unhealthy);
    let backend = |port: u16, weight: u32, (_, e): (&str, Endpoint)| BackendSpec {
        addr: SocketAddrV4::new(e.ip, port),
        weight,
        drained,
        via: e
            .mac
            .filter(|_| c.pid > 0)
            .map(|mac| Via { pid: c.pid, mac }),
    };

    // Labels.
    let wanted = label(LABEL_SERVICE);
    if let Some(name) = wanted {
        let port = match label(LABEL_PORT) {
            None => Err(problem(format!(
                "label {LABEL_SERVICE}={name:?} without {LABEL_PORT}; ignored"
            ))),
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(problem(format!(
                    "label {LABEL_PORT}={p:?} is not a port (1-65535); ignored"
                ))),
            },
        };
        let service = services.iter().find(|s| s.name == name).ok_or_else(|| {
            problem(format!(
                "label {LABEL_SERVICE}={name:?}: no such service; ignored until it exists"
            ))
        });
        match (service, port, &weight, &endpoint) {
            (Ok(s), Ok(port), Ok(w), Ok(e)) => out.push(Member {
                service: s.name.clone(),
                container: c.name.clone(),
                backend: backend(port, *w, *e),
            }),
            (s, p, w, e) => problems.extend(
                [s.err(), p.err(), w.clone().err(), e.clone().err()]
                    .into_iter()
                    .flatten(),
            ),
        }
    } else if let Some(k) = [LABEL_PORT, LABEL_WEIGHT, LABEL_NETWORK]
        .into_iter()
        .find(|k| label(k).is_some())
    {
        // Only worth saying when no image rule takes the container.
        let image = normalize_image(&c.image);
        let by_image = services.iter().any(|s| {
            s.image
                .as_ref()
                .is_some_and(|r| normalize_image(&r.image) == image)
        });
        if !by_image {
            problems.push(problem(format!(
                "label {k} without {LABEL_SERVICE}; ignored"
            )));
        }
    }

    // Image rules.
    let image = normalize_image(&c.image);
    for s in services {
        let Some(rule) = &s.image else { continue };
        if normalize_image(&rule.image) != image || out.iter().any(|m| m.service == s.name) {
            continue;
        }
        match (&weight, &endpoint) {
            (Ok(w), Ok(e)) => out.push(Member {
                service: s.name.clone(),
                container: c.name.clone(),
                backend: backend(rule.target_port, *w, *e),
            }),
            (w, e) => {
                for p in [w.clone().err(), e.clone().err()].into_iter().flatten() {
                    if !problems.contains(&p) {
                        problems.push(p);
                    }
                }
            }
        }
    }
    (out, problems)
}

/// Docker's backends, by service, that fit beside the declared services
/// within the maps' limits, and a problem for each member left out.
/// Members are taken in container-name order, so the same containers win
/// every time.
pub fn fit(
    declared: &[ServiceSpec],
    mut members: Vec<Member>,
    limits: &Limits,
) -> (BTreeMap<String, Vec<BackendSpec>>, Vec<Problem>) {
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
    let mut out: BTreeMap<String, Vec<BackendSpec>> = BTreeMap::new();
    let mut problems = Vec::new();
    for m in &members {
        let Some(s) = declared.iter().find(|s| s.name == m.service) else {
            continue;
        };
        let addr = m.backend.addr;
        let left_out = |why: String| {
            Problem(format!(
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
        if out
            .get(&m.service)
            .is_some_and(|v| v.iter().any(|b| b.addr == addr))
        {
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
        out.entry(m.service.clone()).or_default().push(m.backend);
    }
    (out, problems)
}

/// The control task's view of the engine: the running containers, the
/// problems already logged, and which container is behind which backend.
#[derive(Debug)]
pub struct Tracker {
    status: String,
    containers: BTreeMap<String, Container>,
    reported: BTreeSet<Problem>,
    names: BTreeMap<(String, SocketAddrV4), String>,
}

impl Tracker {
    /// A tracker whose status reads `status` until the watcher reports.
    pub fn new(status: impl Into<String>) -> Self {
        Self {
            status: status.into(),
            containers: BTreeMap::new(),
            reported: BTreeSet::new(),
            names: BTreeMap::new(),
        }
    }

    /// The connection state, for `lb status`.
    pub fn status(&self) -> &str {
        &self.status
    }

    /// Takes in what the watcher reported. `true` when the containers
    /// changed, so membership must be worked out again.
    pub fn update(&mut self, u: DockerUpdate) -> bool {
        match u {
            DockerUpdate::Sync(all) => {
                let all: BTreeMap<String, Container> =
                    all.into_iter().map(|c| (c.id.clone(), c)).collect();
                let changed = all != self.containers;
                self.containers = all;
                changed
            }
            DockerUpdate::Upsert(c) => self.containers.insert(c.id.clone(), c.clone()) != Some(c),
            DockerUpdate::Remove(id) => self.containers.remove(&id).is_some(),
            DockerUpdate::Status(s) => {
                self.status = s;
                false
            }
        }
    }

    /// Works out which containers serve which of `desired`'s services and
    /// hands their backends to it. Each problem is logged once, when it
    /// first appears.
    pub fn assign(&mut self, desired: &mut Desired) {
        let declared = desired.declared();
        let mut all = Vec::new();
        let mut problems = BTreeSet::new();
        for c in self.containers.values() {
            let (m, p) = members(c, &declared);
            all.extend(m);
            problems.extend(p);
        }
        self.names = all
            .iter()
            .map(|m| ((m.service.clone(), m.backend.addr), m.container.clone()))
            .collect();
        let (backends, p) = fit(&declared, all, desired.limits());
        problems.extend(p);
        for p in problems.difference(&self.reported) {
            warn!("{p}");
        }
        self.reported = problems;
        desired.set_docker(backends);
    }

    /// The container behind `service`'s backend `addr`, if it is one.
    pub fn container(&self, service: &str, addr: SocketAddrV4) -> Option<&str> {
        self.names
            .get(&(service.to_owned(), addr))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests;
