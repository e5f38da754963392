//! The Docker engine client: subscribes to container and network events
//! from just before it lists the running containers, so no event falls
//! between the list and the stream; reports the list, then each event. On a
//! lost connection it backs off, reconnects and does the same again, so an
//! event missed in between never leaves a stale or missing backend: the
//! list replaces everything the controller knew.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use bollard::{
    errors::Error as BollardError,
    models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum, HealthStatusEnum},
    query_parameters::{EventsOptions, ListContainersOptions},
    Docker,
};
use futures_util::{
    stream::{self, BoxStream},
    StreamExt as _,
};
use tracing::{debug, info, warn};

use super::membership::{Container, Endpoint, Health};
use crate::host::parse_mac;

/// What the watcher tells the control task.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DockerUpdate {
    /// Every running container: replaces what was known.
    Sync {
        /// The containers.
        containers: Vec<Container>,
        /// When the engine listed them.
        at: SystemTime,
    },
    /// A container started or changed.
    Upsert(Container),
    /// A container was sent a signal (`docker stop` sends its stop signal
    /// first, then SIGKILL after a grace period; `docker kill` one signal).
    Kill {
        /// Its engine id.
        id: String,
        /// The signal's number.
        signal: i32,
    },
    /// A container stopped or went away.
    Remove {
        /// Its engine id.
        id: String,
        /// The engine's event (`die`, `stop`, `destroy`), or what an
        /// inspection found.
        why: String,
    },
    /// The connection's state, for `lb status`.
    Status(String),
}

/// Where the engine client's reports go: the controller in the daemon, a
/// channel in tests. The client never imports the controller.
pub trait DockerSink: Send + Sync + 'static {
    /// Hands one report over; waits while the receiver is busy.
    fn report(&self, update: DockerUpdate) -> impl std::future::Future<Output = ()> + Send;
}

/// Why a session with the engine ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// Talking to the engine failed.
    #[error("docker at {host}: {source}")]
    Engine {
        /// The engine's address.
        host: String,
        /// What failed.
        #[source]
        source: BollardError,
    },
    /// The event stream ended.
    #[error("docker at {0}: the event stream ended")]
    StreamEnded(String),
}

/// How long an engine call may take before the session is given up.
const CALL_TIMEOUT_SECS: u64 = 10;
/// First and longest wait before reconnecting. While the engine is away
/// the backends stay as last known (with `live-restore` its containers
/// keep serving), but a container that dies meanwhile stays in its table
/// until the list after the reconnection: a restarted engine is found
/// again within a second of answering. An attempt costs one failed
/// connect.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often a connected engine is pinged (a remote one can vanish without
/// closing the event stream).
const PING_EVERY: Duration = Duration::from_secs(30);
/// Containers inspected at once while listing.
const INSPECT_CONCURRENCY: usize = 8;

/// Connects to the engine at `host` (`unix://…` or `tcp://…`).
async fn connect(host: &str) -> Result<Docker, WatchError> {
    let err = |source| WatchError::Engine {
        host: host.to_owned(),
        source,
    };
    let docker = if let Some(path) = host.strip_prefix("unix://") {
        Docker::connect_with_unix(path, CALL_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_http(host, CALL_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
    }
    .map_err(err)?;
    // Debian's engine speaks API 1.41; bollard asks for a newer one.
    docker.negotiate_version().await.map_err(err)
}

/// Every running container, inspected.
async fn list(docker: &Docker, host: &str) -> Result<Vec<Container>, WatchError> {
    let summaries = docker
        .list_containers(Some(ListContainersOptions {
            all: false,
            ..Default::default()
        }))
        .await
        .map_err(|source| WatchError::Engine {
            host: host.to_owned(),
            source,
        })?;
    let ids: Vec<String> = summaries.into_iter().filter_map(|s| s.id).collect();
    let found: Vec<Result<Option<Container>, WatchError>> = stream::iter(ids)
        .map(|id| async move { inspect(docker, host, &id).await })
        .buffer_unordered(INSPECT_CONCURRENCY)
        .collect()
        .await;
    let mut out = Vec::new();
    for c in found {
        out.extend(c?);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The container `id` if it is running; `None` if it is not or is gone.
async fn inspect(docker: &Docker, host: &str, id: &str) -> Result<Option<Container>, WatchError> {
    match docker.inspect_container(id, None).await {
        Ok(r) => Ok(from_inspect(r)),
        Err(BollardError::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(None),
        Err(source) => Err(WatchError::Engine {
            host: host.to_owned(),
            source,
        }),
    }
}

/// What an inspection says, if the container is running.
fn from_inspect(r: ContainerInspectResponse) -> Option<Container> {
    let state = r.state?;
    if state.running != Some(true) {
        return None;
    }
    let pid = u32::try_from(state.pid.unwrap_or(0)).unwrap_or(0);
    let health = match state.health.and_then(|h| h.status) {
        Some(HealthStatusEnum::STARTING) => Health::Starting,
        Some(HealthStatusEnum::HEALTHY) => Health::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => Health::Unhealthy,
        _ => Health::None,
    };
    let config = r.config.unwrap_or_default();
    let networks = r
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, e)| {
            let ip: Ipv4Addr = e.ip_address.as_deref()?.parse().ok()?;
            let mac = e.mac_address.as_deref().and_then(|m| parse_mac(m).ok());
            Some((name, Endpoint { ip, mac }))
        })
        .collect();
    Some(Container {
        id: r.id?,
        name: r
            .name
            .map(|n| n.trim_start_matches('/').to_owned())
            .unwrap_or_default(),
        image: config.image.unwrap_or_default(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        networks,
        pid,
        paused: state.paused == Some(true),
        health,
        stop_signal: config
            .stop_signal
            .as_deref()
            .and_then(signal_number)
            .unwrap_or(libc::SIGTERM),
        stopping: false,
    })
}

/// The number of a signal as Docker writes it: `SIGQUIT`, `QUIT` or `3`.
fn signal_number(s: &str) -> Option<i32> {
    if let Ok(n) = s.parse() {
        return Some(n);
    }
    let name = if s.starts_with("SIG") {
        s.to_owned()
    } else {
        format!("SIG{s}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .ok()
        .map(|s| s as i32)
}

/// A connection to the engine: its event stream (from just before the
/// list) and every running container at the time of the list.
pub struct Session {
    docker: Docker,
    events: BoxStream<'static, Result<EventMessage, BollardError>>,
    /// The running containers, inspected.
    pub containers: Vec<Container>,
    /// When they were listed.
    pub listed_at: SystemTime,
}

/// Connects to the engine at `host`, subscribes to its events, then lists
/// the running containers. Events are asked for from just before the list,
/// so none that happens while listing is lost; replaying one twice is
/// harmless.
pub async fn open(host: &str) -> Result<Session, WatchError> {
    let docker = connect(host).await?;
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let filters: HashMap<String, Vec<String>> =
        HashMap::from([("type".into(), vec!["container".into(), "network".into()])]);
    let events = docker
        .events(Some(EventsOptions {
            since: Some(format!("{}.{:09}", since.as_secs(), since.subsec_nanos())),
            until: None,
            filters: Some(filters),
        }))
        .boxed();
    let listed_at = SystemTime::now();
    let containers = list(&docker, host).await?;
    Ok(Session {
        docker,
        events,
        containers,
        listed_at,
    })
}

/// Follows the engine at `host` for as long as the daemon runs, reporting
/// to `sink`. `first` is a session already
/// open (the daemon's start-up list), followed before any new one.
pub async fn watch(host: String, sink: impl DockerSink, mut first: Option<Session>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        // Whether this attempt got a session (and so lost it when it ended).
        let (e, connected) = match first.take() {
            Some(s) => (follow(&host, &sink, s).await, true),
            None => match open(&host).await {
                Ok(s) => (follow(&host, &sink, s).await, true),
                Err(e) => (e, false),
            },
        };
        if connected {
            // A new loss: warned once, and the backoff starts over.
            backoff = BACKOFF_MIN;
            warn!(error = %e, retry_ms = backoff.as_millis() as u64, "docker watcher lost the engine");
        } else {
            // Still away: `lb status` shows each attempt, the log does not.
            debug!(error = %e, retry_ms = backoff.as_millis() as u64, "docker engine still unreachable");
        }
        let status = format!("disconnected: {e}; retrying in {} ms", backoff.as_millis());
        sink.report(DockerUpdate::Status(status)).await;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Reports a session's list, then follows its events until something fails.
async fn follow(host: &str, sink: &impl DockerSink, session: Session) -> WatchError {
    let Session {
        docker,
        mut events,
        containers,
        listed_at,
    } = session;
    let version = docker.client_version();
    info!(
        host,
        api = %version,
        containers = containers.len(),
        "docker watcher connected"
    );
    // Running containers as last reported: network events of others (a
    // container being created is connected before it starts) need no
    // inspection, which would wait for the engine to finish creating it
    // and hold up the events behind it.
    let mut running: HashSet<String> = containers.iter().map(|c| c.id.clone()).collect();
    sink.report(DockerUpdate::Sync {
        containers,
        at: listed_at,
    })
    .await;
    sink.report(DockerUpdate::Status(format!(
        "connected to {host} (API {version})"
    )))
    .await;
    // A remote engine can vanish without closing the connection: a quiet
    // stream is checked with a ping now and then.
    let mut liveness = tokio::time::interval(PING_EVERY);
    liveness.tick().await;
    loop {
        let event = tokio::select! {
            e = events.next() => e,
            _ = liveness.tick() => {
                if let Err(source) = docker.ping().await {
                    return WatchError::Engine { host: host.to_owned(), source };
                }
                continue;
            }
        };
        let Some(event) = event else { break };
        let event = match event {
            Ok(e) => e,
            Err(source) => {
                return WatchError::Engine {
                    host: host.to_owned(),
                    source,
                }
            }
        };
        if let Some(update) = on_event(&docker, host, event, &running).await {
            match update {
                Ok(u) => {
                    match &u {
                        DockerUpdate::Upsert(c) => running.insert(c.id.clone()),
                        DockerUpdate::Remove { id, .. } => running.remove(id),
                        _ => false,
                    };
                    sink.report(u).await;
                }
                Err(e) => return e,
            }
        }
    }
    WatchError::StreamEnded(host.to_owned())
}

/// What an event means for the container it is about.
async fn on_event(
    docker: &Docker,
    host: &str,
    event: EventMessage,
    running: &HashSet<String>,
) -> Option<Result<DockerUpdate, WatchError>> {
    let action = event.action.unwrap_or_default();
    let actor = event.actor.unwrap_or_default();
    let mut attributes = actor.attributes.unwrap_or_default();
    let id = match event.typ {
        Some(EventMessageTypeEnum::CONTAINER) => actor.id?,
        Some(EventMessageTypeEnum::NETWORK)
            if matches!(action.as_str(), "connect" | "disconnect") =>
        {
            attributes.remove("container")?
        }
        _ => return None,
    };
    debug!(action, container = id, "docker event");
    match action.as_str() {
        // Out at once, without asking the engine anything more: this is
        // the path whose latency matters.
        "die" | "stop" | "destroy" => Some(Ok(DockerUpdate::Remove { id, why: action })),
        "connect" | "disconnect" if !running.contains(&id) => None,
        // Drained at once when it is asked to stop: a server that finishes
        // its requests on SIGTERM loses none, as nothing new reaches it
        // between its exit and the `die` event.
        "kill" => {
            let signal = attributes.get("signal")?.parse().ok()?;
            Some(Ok(DockerUpdate::Kill { id, signal }))
        }
        "start" | "restart" | "pause" | "unpause" | "rename" | "update" | "connect"
        | "disconnect" => Some(refresh(docker, host, id, &action).await),
        a if a.starts_with("health_status") => Some(refresh(docker, host, id, a).await),
        // oom, exec_*, create, …: a die follows if the process ends.
        _ => None,
    }
}

/// The container `id` as an inspection finds it after event `action`.
async fn refresh(
    docker: &Docker,
    host: &str,
    id: String,
    action: &str,
) -> Result<DockerUpdate, WatchError> {
    let started = std::time::Instant::now();
    let found = inspect(docker, host, &id).await?;
    debug!(
        container = id,
        us = started.elapsed().as_micros() as u64,
        "container inspected"
    );
    Ok(match found {
        Some(c) => DockerUpdate::Upsert(c),
        None => DockerUpdate::Remove {
            id,
            why: format!("not running after {action}"),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::signal_number;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number("SIGQUIT"), Some(libc::SIGQUIT));
        assert_eq!(signal_number("QUIT"), Some(libc::SIGQUIT));
        assert_eq!(signal_number("15"), Some(libc::SIGTERM));
        assert_eq!(signal_number("SIGWINCH"), Some(libc::SIGWINCH));
        assert_eq!(signal_number("NOPE"), None);
    }
}
