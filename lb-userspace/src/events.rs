//! The change log: every change the controller commits, as numbered
//! [`Event`]s, for `GET /v1/events`, `lb events` and the dashboard page.
//!
//! One owner writes it: the controller, at the points where it commits a
//! change (a batch of API calls and Docker news, a health result, a
//! reachability refresh), by comparing what the reconciler holds now with
//! what it last published ([`diff`] of two [`Marks`]). Readers never hold it up:
//! [`EventLog::emit`] appends to a bounded history ([`HISTORY`] events)
//! under a lock held for one push, and wakes readers through a
//! `tokio::sync::watch` of the last sequence number. Each reader
//! ([`Subscription`]) keeps only its own cursor and copies what follows it
//! out of the history when it is ready. That is why this is not a
//! `tokio::sync::broadcast`: a broadcast channel keeps a ring of its own
//! and tells a lagging receiver only how many it lost, whereas the history
//! is needed anyway for `?since=`, and a reader that falls behind simply
//! goes on from the history; one that falls more than [`HISTORY`] events
//! behind gets a [`EventKind::Gap`] event naming what it missed, never a
//! silent skip.
//!
//! Sequence numbers start at 1 with every daemon start and have no holes.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::SocketAddrV4,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    api::types::BackendState,
    model::{Origin, Protocol},
};

/// Events the history keeps: a reader may resume from any of the last
/// this many.
pub const HISTORY: usize = 4096;

/// Most events a reader copies out of the history under one lock.
const READ_BATCH: usize = 256;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The daemon started serving (the first event of every run).
    DaemonStarted,
    /// The daemon is stopping (the last event of every run).
    DaemonStopping,
    /// A service was added.
    ServiceAdded,
    /// A service was removed.
    ServiceRemoved,
    /// A backend joined a service (its `state` says in which state).
    BackendAdded,
    /// A backend left a service.
    BackendRemoved,
    /// A backend takes new flows again.
    BackendUp,
    /// A backend takes no flows: its flows move on their next packet.
    BackendDown,
    /// A backend keeps its flows and takes no new ones.
    BackendDraining,
    /// A backend's weight changed.
    BackendWeight,
    /// The Docker engine client connected (and listed the containers).
    DockerConnected,
    /// The Docker engine client lost the engine; it retries.
    DockerLost,
    /// Not a change: events this reader asked for are no longer in the
    /// history (`missed_from`..=`missed_to`; absent when unknown).
    Gap,
}

/// Why a backend or service changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A call to the admin API.
    Api,
    /// The config file (or the state file), read at start.
    Config,
    /// The service's active health check.
    HealthCheck,
    /// No route, interface or neighbour reaches the backend.
    Unreachable,
    /// The backend can be reached again.
    Reachable,
    /// Docker: the container started.
    DockerStart,
    /// Docker: the container's process ended.
    DockerDie,
    /// Docker: the container was stopped.
    DockerStop,
    /// Docker: the container was sent a signal that stops it.
    DockerKill,
    /// Docker: the container was removed.
    DockerDestroy,
    /// Docker: the container's health check changed.
    DockerHealth,
    /// Docker: the container was paused.
    DockerPause,
    /// Docker: the container was unpaused.
    DockerUnpause,
    /// Docker: the container's networks or settings changed.
    DockerUpdate,
    /// Docker: what the engine's list of containers showed (at connection).
    DockerList,
    /// Cluster mode: another node published, changed or withdrew it.
    Cluster,
}

/// A change, before the log numbers it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    /// What happened.
    pub kind: EventKind,
    /// The service it is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The service's `"ip:port"` (service events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vip: Option<String>,
    /// The service's protocol (service events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    /// The backend's `"ip:port"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    /// The Docker container behind the backend, if it is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
    /// The backend's state after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<BackendState>,
    /// The backend's weight after the change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// One line more: the Docker engine's state, the daemon's version, what
    /// a gap means.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A gap's first missed sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed_from: Option<u64>,
    /// A gap's last missed sequence number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed_to: Option<u64>,
}

impl Change {
    /// A change of `kind`, every other field empty.
    pub fn new(kind: EventKind) -> Self {
        Self {
            kind,
            service: None,
            vip: None,
            protocol: None,
            backend: None,
            container: None,
            state: None,
            weight: None,
            reason: None,
            detail: None,
            missed_from: None,
            missed_to: None,
        }
    }
}

/// `GET /v1/events`: one line of the stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Sequence number: 1 for the first event of a daemon's run, one more
    /// for each event after it. A gap carries the last one it stands for.
    pub seq: u64,
    /// When, RFC 3339 in UTC with milliseconds.
    pub time: String,
    /// What happened, and to what.
    #[serde(flatten)]
    pub change: Change,
}

/// `t` as RFC 3339 in UTC with milliseconds: `2026-12-02T11:46:47.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rest = secs % 86_400;
    // Days since 1970-01-01 to a civil date, by 400-year eras of 146,097
    // days that start on 0000-03-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rest / 3_600,
        rest / 60 % 60,
        rest % 60,
        d.subsec_millis()
    )
}

/// The bounded history, and where its numbering stands.
#[derive(Debug)]
struct History {
    events: VecDeque<Arc<Event>>,
    capacity: usize,
    /// The last sequence number handed out (0 before the first event).
    last: u64,
    /// No more events will come: readers end once they have the rest.
    closed: bool,
}

/// What one read of the history found after a cursor.
#[derive(Debug)]
struct Read {
    /// A gap line to send before the events, if events were missed.
    gap: Option<Event>,
    /// The events that follow, in order.
    events: Vec<Arc<Event>>,
    /// The cursor after them.
    cursor: u64,
}

impl History {
    fn new(capacity: usize) -> Self {
        Self {
            events: VecDeque::with_capacity(capacity.min(HISTORY)),
            capacity: capacity.max(1),
            last: 0,
            closed: false,
        }
    }

    fn push(&mut self, change: Change, at: SystemTime) -> Arc<Event> {
        self.last += 1;
        let event = Arc::new(Event {
            seq: self.last,
            time: rfc3339(at),
            change,
        });
        if self.events.len() == self.capacity {
            self.events.pop_front();
        }
        self.events.push_back(Arc::clone(&event));
        event
    }

    /// The first sequence number still held (one past the last when empty).
    fn first(&self) -> u64 {
        self.events.front().map_or(self.last + 1, |e| e.seq)
    }

    /// Up to `max` events after `cursor` (the last sequence number the
    /// reader has), with a gap first when some of those are gone: older
    /// than the history, or numbered by an earlier run of the daemon.
    fn read_after(&self, cursor: u64, max: usize) -> Read {
        let first = self.first();
        let mut read = Read {
            gap: None,
            events: Vec::new(),
            cursor,
        };
        if cursor > self.last {
            let mut gap = Change::new(EventKind::Gap);
            gap.detail = Some(format!(
                "event {cursor} is past this daemon's last event {}: the daemon restarted since, \
                 and its numbering started again at 1; following from the oldest event it keeps",
                self.last
            ));
            read.gap = Some(self.gap_event(gap, first));
            read.cursor = first - 1;
        } else if cursor + 1 < first {
            let mut gap = Change::new(EventKind::Gap);
            gap.detail = Some(format!(
                "events {} to {} are no longer in the history (it keeps the last {}); \
                 following from {first}",
                cursor + 1,
                first - 1,
                self.capacity
            ));
            gap.missed_from = Some(cursor + 1);
            gap.missed_to = Some(first - 1);
            read.gap = Some(self.gap_event(gap, first));
            read.cursor = first - 1;
        }
        let skip = (read.cursor + 1 - first) as usize;
        read.events = self.events.iter().skip(skip).take(max).cloned().collect();
        if let Some(last) = read.events.last() {
            read.cursor = last.seq;
        }
        read
    }

    /// A gap line numbered as the last event it stands for, so that
    /// resuming after it (`since=seq`) goes on from the history's start.
    fn gap_event(&self, change: Change, first: u64) -> Event {
        Event {
            seq: first - 1,
            time: rfc3339(SystemTime::now()),
            change,
        }
    }
}

/// The writer's side and the readers' source; cheap to clone.
#[derive(Clone, Debug)]
pub struct EventLog {
    history: Arc<Mutex<History>>,
    /// The last sequence number, to wake readers.
    wake: Arc<watch::Sender<u64>>,
}

impl Default for EventLog {
    fn default() -> Self {
        Self::new(HISTORY)
    }
}

impl EventLog {
    /// An empty log that keeps the last `capacity` events.
    pub fn new(capacity: usize) -> Self {
        Self {
            history: Arc::new(Mutex::new(History::new(capacity))),
            wake: Arc::new(watch::channel(0).0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Numbers `change`, keeps it and wakes the readers; never waits for
    /// them. Returns the event.
    pub fn emit(&self, change: Change) -> Arc<Event> {
        let event = self.lock().push(change, SystemTime::now());
        self.wake.send_replace(event.seq);
        event
    }

    /// The last sequence number handed out (0 before the first event).
    pub fn last_seq(&self) -> u64 {
        self.lock().last
    }

    /// Ends every reader's stream once it has read what is there; events
    /// emitted later are kept but no stream sends them.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.send_modify(|_| {});
    }

    /// A reader of the events after `since` (the last sequence number the
    /// reader has; 0 for the whole history), or of those from now on when
    /// `since` is `None`. With `service`, only that service's events and
    /// those about the daemon as a whole (daemon, Docker engine, gaps).
    pub fn subscribe(&self, since: Option<u64>, service: Option<String>) -> Subscription {
        let rx = self.wake.subscribe();
        let cursor = since.unwrap_or_else(|| self.last_seq());
        Subscription {
            log: self.clone(),
            rx,
            cursor,
            service,
            pending: VecDeque::new(),
        }
    }
}

/// One reader's position in the log.
#[derive(Debug)]
pub struct Subscription {
    log: EventLog,
    rx: watch::Receiver<u64>,
    cursor: u64,
    service: Option<String>,
    pending: VecDeque<Arc<Event>>,
}

impl Subscription {
    /// The next event for this reader, waiting for one if need be; `None`
    /// once the log is closed and everything before that was read.
    pub async fn next(&mut self) -> Option<Arc<Event>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            // Marked seen before the read: an event emitted after it wakes
            // the wait below.
            self.rx.borrow_and_update();
            let (read, closed) = {
                let h = self.log.lock();
                (h.read_after(self.cursor, READ_BATCH), h.closed)
            };
            self.cursor = read.cursor;
            let gap = read.gap.map(Arc::new);
            let found = gap.is_some() || !read.events.is_empty();
            let service = self.service.as_deref();
            let wanted = gap
                .into_iter()
                .chain(read.events)
                .filter(|e| wants(service, e));
            self.pending.extend(wanted);
            if found {
                continue;
            }
            if closed || self.rx.changed().await.is_err() {
                return None;
            }
        }
    }
}

/// Whether a filter on `service` lets `e` through: its own events and
/// those about no service.
fn wants(service: Option<&str>, e: &Event) -> bool {
    match (service, &e.change.service) {
        (Some(want), Some(s)) => want == s,
        _ => true,
    }
}

/// One backend as the log last published it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendMark {
    /// What it does with flows.
    pub state: BackendState,
    /// Its weight.
    pub weight: u32,
    /// The container behind it, if it is one.
    pub container: Option<String>,
    /// Why it is down, when it is: it fails its health check, or nothing
    /// reaches it.
    pub down_why: Option<Reason>,
}

/// One service as the log last published it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceMark {
    /// `"ip:port"`.
    pub vip: String,
    /// Its protocol.
    pub protocol: Protocol,
    /// Where it was declared.
    pub origin: Origin,
    /// Its backends by address.
    pub backends: BTreeMap<SocketAddrV4, BackendMark>,
}

/// The services as the log last published them, by name.
pub type Marks = BTreeMap<String, ServiceMark>;

/// Why the changes of one commit happened: a backend behind a container
/// whose Docker event is in `docker` changed for that event; a backend
/// that went down for what took it down; anything else for `default`
/// ([`Reason::Config`] at start, where an API service's own reason is the
/// API: it came from the state file).
#[derive(Clone, Copy, Debug)]
pub struct Cause<'a> {
    /// The reason of a change no more specific rule explains.
    pub default: Reason,
    /// The Docker event behind each container's latest change, by name.
    pub docker: &'a HashMap<String, Reason>,
}

impl Cause<'_> {
    fn of_service(&self, s: &ServiceMark) -> Reason {
        match (self.default, s.origin) {
            (Reason::Config, Origin::Api) | (Reason::Api, _) => Reason::Api,
            (Reason::Config, Origin::Config) => Reason::Config,
            (r, _) => r,
        }
    }

    fn of_backend(&self, s: &ServiceMark, b: &BackendMark, kind: EventKind) -> Reason {
        if let Some(r) = b.container.as_ref().and_then(|c| self.docker.get(c)) {
            return *r;
        }
        match (kind, b.down_why) {
            (EventKind::BackendDown, Some(why)) => why,
            _ => self.of_service(s),
        }
    }
}

fn service_change(kind: EventKind, name: &str, s: &ServiceMark, cause: &Cause<'_>) -> Change {
    Change {
        service: Some(name.to_owned()),
        vip: Some(s.vip.clone()),
        protocol: Some(s.protocol),
        reason: Some(cause.of_service(s)),
        ..Change::new(kind)
    }
}

fn backend_change(
    kind: EventKind,
    name: &str,
    s: &ServiceMark,
    addr: SocketAddrV4,
    b: &BackendMark,
    cause: &Cause<'_>,
) -> Change {
    Change {
        service: Some(name.to_owned()),
        backend: Some(addr.to_string()),
        container: b.container.clone(),
        state: Some(b.state),
        weight: Some(b.weight),
        reason: Some(cause.of_backend(s, b, kind)),
        ..Change::new(kind)
    }
}

/// The changes from `before` to `after`, in an order a reader can replay:
/// services added (each followed by its backends), backends of kept
/// services added, changed and removed, then services removed (after their
/// backends' removal).
pub fn diff(before: &Marks, after: &Marks, cause: &Cause<'_>) -> Vec<Change> {
    let empty = BTreeMap::new();
    let mut out = Vec::new();
    for (name, s) in after {
        let old = before.get(name);
        if old.is_none() {
            out.push(service_change(EventKind::ServiceAdded, name, s, cause));
        }
        let old_backends = old.map_or(&empty, |o| &o.backends);
        for (addr, b) in &s.backends {
            let Some(was) = old_backends.get(addr) else {
                out.push(backend_change(
                    EventKind::BackendAdded,
                    name,
                    s,
                    *addr,
                    b,
                    cause,
                ));
                continue;
            };
            if was.state != b.state {
                let kind = match b.state {
                    BackendState::Active => EventKind::BackendUp,
                    BackendState::Draining => EventKind::BackendDraining,
                    BackendState::Down => EventKind::BackendDown,
                };
                out.push(backend_change(kind, name, s, *addr, b, cause));
            }
            if was.weight != b.weight {
                out.push(backend_change(
                    EventKind::BackendWeight,
                    name,
                    s,
                    *addr,
                    b,
                    cause,
                ));
            }
        }
        for (addr, was) in old_backends {
            if !s.backends.contains_key(addr) {
                out.push(backend_change(
                    EventKind::BackendRemoved,
                    name,
                    s,
                    *addr,
                    was,
                    cause,
                ));
            }
        }
    }
    for (name, s) in before {
        if after.contains_key(name) {
            continue;
        }
        for (addr, was) in &s.backends {
            out.push(backend_change(
                EventKind::BackendRemoved,
                name,
                s,
                *addr,
                was,
                cause,
            ));
        }
        out.push(service_change(EventKind::ServiceRemoved, name, s, cause));
    }
    out
}

#[cfg(test)]
mod tests;
