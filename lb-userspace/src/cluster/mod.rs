//! Cluster mode (`[cluster]`): nodes share their backends through etcd.
//!
//! Each node holds one etcd lease while it runs and attaches every key it
//! writes to it, so what a node published leaves etcd when it stops (the
//! lease is revoked) or dies (the lease expires a TTL after its last
//! keep-alive). [`Membership`] is the one task that talks to etcd: it
//! connects, grants the lease, writes the node's record and its own
//! backends (see [`keys`]) and keeps them equal to what the controller
//! sends, keeps the lease alive, and follows every node's keys, sending
//! the controller the other nodes' backends ([`remote`]) after each change.
//!
//! When etcd is lost the controller keeps what it last received (nothing is
//! flushed: forwarding goes on as it was), and the task reconnects with
//! backoff, takes the same lease back when etcd still has it, publishes
//! again, and reads every node's keys afresh before following them: a
//! full read replaces the whole view, so nothing missed while away
//! (compacted or not) leaves a stale or missing backend.

pub mod keys;
pub mod remote;
pub mod spec;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
    time::Duration,
};

use etcd_client::{
    Certificate, Client, ConnectOptions, EventType, GetOptions, Identity, KeyValue, PutOptions,
    TlsOptions, WatchOptions,
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

pub use spec::ClusterSpec;

use crate::control::Handle;
use keys::BackendRecord;
use remote::{Clash, RemoteSet, View};

/// A node's own backends as it publishes them: by service, then address.
pub type LocalSet = BTreeMap<String, BTreeMap<SocketAddrV4, BackendRecord>>;

/// Why talking to etcd failed. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A TLS file named in `[cluster]` could not be read.
    #[error("{field} {path}: {source}")]
    TlsFile {
        /// The config field, e.g. `cluster.ca_file`.
        field: &'static str,
        /// The file.
        path: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// etcd refused a request or could not be reached.
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    /// etcd did not answer in time.
    #[error("etcd: no answer within {0:?}")]
    Timeout(Duration),
    /// The lease is gone: etcd let it expire or it was revoked.
    #[error("etcd: lease {0:x} expired")]
    LeaseLost(i64),
    /// The keep-alive stream ended.
    #[error("etcd: the lease keep-alive stream ended")]
    StreamEnded,
    /// etcd ended the watch (its start revision was compacted, or etcd
    /// cancelled it).
    #[error("etcd: the watch was cancelled: {0}")]
    WatchCancelled(String),
    /// The watch stream ended.
    #[error("etcd: the watch stream ended")]
    WatchEnded,
}

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 pings find a dead connection without waiting for a request.
const PING_EVERY: Duration = Duration::from_secs(2);
/// First wait before reconnecting; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest wait before reconnecting.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a clean stop waits for etcd to revoke the lease.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);

/// The client options for `spec`: timeouts, and TLS read from its files.
/// Called before anything is attached, so an unreadable file stops `lb
/// run` with one line.
pub fn connect_options(spec: &ClusterSpec) -> Result<ConnectOptions, ClusterError> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(PING_EVERY, PING_EVERY)
        .with_keep_alive_while_idle(true);
    if let Some(files) = &spec.tls {
        let read = |field: &'static str, path: &std::path::Path| {
            std::fs::read(path).map_err(|source| ClusterError::TlsFile {
                field,
                path: path.display().to_string(),
                source,
            })
        };
        let mut tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read("cluster.ca_file", &files.ca)?));
        if let Some((cert, key)) = &files.identity {
            tls = tls.identity(Identity::from_pem(
                read("cluster.cert_file", cert)?,
                read("cluster.key_file", key)?,
            ));
        }
        options = options.with_tls(tls);
    }
    Ok(options)
}

/// This node's membership of the cluster: a task that holds its lease.
#[derive(Debug)]
pub struct Membership {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Membership {
    /// Starts the node's membership in the background: it publishes what
    /// `local` holds and sends the other nodes' backends to `handle`; it
    /// keeps trying until etcd answers.
    pub fn start(
        spec: ClusterSpec,
        options: ConnectOptions,
        handle: Handle,
        local: watch::Receiver<LocalSet>,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(hold(spec, options, handle, local, stop_rx));
        Self { stop, task }
    }

    /// Leaves the cluster: revokes the lease, so every key attached to it
    /// is deleted at once (waits [`REVOKE_TIMEOUT`] at most; without an
    /// answer the lease expires on its own).
    pub async fn leave(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Holds the lease, publishes and follows until `stop`, reconnecting with
/// backoff.
async fn hold(
    spec: ClusterSpec,
    options: ConnectOptions,
    handle: Handle,
    mut local: watch::Receiver<LocalSet>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = BACKOFF_MIN;
    let mut lease = None;
    let mut follower = Follower::new(&spec, handle);
    loop {
        let opened = tokio::select! {
            () = stopped(&mut stop) => return,
            s = Session::open(&spec, &options, lease) => s,
        };
        match opened {
            Ok(mut session) => {
                backoff = BACKOFF_MIN;
                lease = Some(session.lease);
                info!(
                    node = spec.node,
                    lease = %format!("{:x}", session.lease),
                    ttl_secs = spec.lease_ttl.as_secs(),
                    "cluster: joined through etcd"
                );
                let (publisher, reader) = (session.client.clone(), session.client.clone());
                let id = session.lease;
                let lost = tokio::select! {
                    () = stopped(&mut stop) => {
                        session.revoke().await;
                        return;
                    }
                    e = session.keep_alive(spec.lease_ttl) => e,
                    e = publish(publisher, &spec, id, &mut local) => e,
                    e = follower.follow(reader) => e,
                };
                if matches!(lost, ClusterError::LeaseLost(_)) {
                    lease = None;
                }
                warn!(error = %lost, "cluster: lost etcd; reconnecting");
            }
            Err(e) => {
                warn!(error = %e, retry_ms = backoff.as_millis() as u64, "cluster: etcd not reachable; retrying")
            }
        }
        tokio::select! {
            () = stopped(&mut stop) => return,
            () = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Keeps this node's backend keys equal to what `local` holds, on `lease`:
/// all of them at once first (keys left by an earlier run are deleted),
/// then each change. Returns what went wrong.
async fn publish(
    mut client: Client,
    spec: &ClusterSpec,
    lease: i64,
    local: &mut watch::Receiver<LocalSet>,
) -> ClusterError {
    let mine = format!("{}backends/", keys::node_prefix(&spec.prefix, &spec.node));
    let existing = match client
        .get(
            mine.as_str(),
            Some(GetOptions::new().with_prefix().with_keys_only()),
        )
        .await
    {
        Ok(r) => r,
        Err(e) => return e.into(),
    };
    // Every key is written again: one left by a run that was killed is
    // still on that run's lease, which is expiring.
    let mut published: BTreeMap<String, Vec<u8>> = existing
        .kvs()
        .iter()
        .map(|kv| (String::from_utf8_lossy(kv.key()).into_owned(), Vec::new()))
        .collect();
    loop {
        let want: BTreeMap<String, Vec<u8>> = local
            .borrow_and_update()
            .iter()
            .flat_map(|(service, backends)| {
                backends.iter().map(move |(addr, record)| {
                    (
                        keys::backend_key(&spec.prefix, &spec.node, service, *addr),
                        record.encode(),
                    )
                })
            })
            .collect();
        for (key, value) in &want {
            if published.get(key) == Some(value) {
                continue;
            }
            let put = PutOptions::new().with_lease(lease);
            if let Err(e) = client.put(key.as_str(), value.clone(), Some(put)).await {
                return e.into();
            }
            published.insert(key.clone(), value.clone());
        }
        let gone: Vec<String> = published
            .keys()
            .filter(|k| !want.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Err(e) = client.delete(key.as_str(), None).await {
                return e.into();
            }
            published.remove(&key);
        }
        if local.changed().await.is_err() {
            // The controller is gone: the daemon is stopping.
            std::future::pending::<()>().await;
        }
    }
}

/// Follows every node's keys and sends the controller the other nodes'
/// backends whenever they change.
struct Follower {
    prefix: String,
    view: View,
    handle: Handle,
    /// What the controller was last sent.
    sent: Option<RemoteSet>,
    /// Clashes already logged.
    clashes: BTreeSet<Clash>,
    /// Keys whose value was refused, with why (logged once each).
    skipped: BTreeMap<Vec<u8>, String>,
}

impl Follower {
    fn new(spec: &ClusterSpec, handle: Handle) -> Self {
        Self {
            prefix: keys::nodes_prefix(&spec.prefix),
            view: View::new(&spec.prefix, &spec.node),
            handle,
            sent: None,
            clashes: BTreeSet::new(),
            skipped: BTreeMap::new(),
        }
    }

    /// Reads every node's keys, then follows them from the next revision
    /// until something goes wrong; returns what did.
    async fn follow(&mut self, mut client: Client) -> ClusterError {
        let all = match client
            .get(self.prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
        {
            Ok(r) => r,
            Err(e) => return e.into(),
        };
        let revision = all.header().map_or(0, |h| h.revision());
        self.view.clear();
        self.skipped.clear();
        for kv in all.kvs() {
            self.take(kv);
        }
        self.send().await;
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision + 1);
        let mut stream = match client.watch(self.prefix.as_str(), Some(options)).await {
            Ok(s) => s,
            Err(e) => return e.into(),
        };
        loop {
            let answer = match stream.message().await {
                Ok(Some(a)) => a,
                Ok(None) => return ClusterError::WatchEnded,
                Err(e) => return e.into(),
            };
            if answer.canceled() {
                return ClusterError::WatchCancelled(answer.cancel_reason().to_owned());
            }
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                match event.event_type() {
                    EventType::Put => self.take(kv),
                    EventType::Delete => {
                        self.skipped.remove(kv.key());
                        self.view.delete(kv.key());
                    }
                }
            }
            self.send().await;
        }
    }

    /// Takes in one key, or logs (once) why it is skipped.
    fn take(&mut self, kv: &KeyValue) {
        match self.view.put(kv.key(), kv.value(), kv.create_revision()) {
            Ok(()) => {
                self.skipped.remove(kv.key());
            }
            Err(e) => {
                let why = e.to_string();
                if self.skipped.get(kv.key()) != Some(&why) {
                    warn!(
                        key = %String::from_utf8_lossy(kv.key()),
                        error = why,
                        skipped = self.skipped.len() + 1,
                        "cluster: a value in etcd that lb does not read is skipped"
                    );
                    self.skipped.insert(kv.key().to_vec(), why);
                }
            }
        }
    }

    /// Sends the merged view if it changed, and logs new clashes.
    async fn send(&mut self) {
        let (set, clashes) = self.view.merge();
        for c in clashes.difference(&self.clashes) {
            warn!("cluster: {c}");
        }
        self.clashes = clashes;
        if self.sent.as_ref() != Some(&set) {
            self.sent = Some(set.clone());
            self.handle.remote(set).await;
        }
    }
}

/// Completes once `stop` says so (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// A connection to etcd and the lease held through it.
struct Session {
    client: Client,
    lease: i64,
}

impl Session {
    /// Connects, takes back `previous` if etcd still has it (else grants a
    /// new lease), and writes this node's record on it.
    async fn open(
        spec: &ClusterSpec,
        options: &ConnectOptions,
        previous: Option<i64>,
    ) -> Result<Self, ClusterError> {
        let mut client = Client::connect(&spec.endpoints, Some(options.clone())).await?;
        let ttl = spec.lease_ttl.as_secs() as i64;
        let kept = match previous {
            Some(id) => client
                .lease_time_to_live(id, None)
                .await
                .ok()
                .filter(|r| r.ttl() > 0)
                .map(|_| id),
            None => None,
        };
        let lease = match kept {
            Some(id) => id,
            None => client.lease_grant(ttl, None).await?.id(),
        };
        let record = keys::NodeRecord::new(lease);
        client
            .put(
                keys::node_key(&spec.prefix, &spec.node),
                record.encode(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        Ok(Self { client, lease })
    }

    /// Renews the lease every third of `ttl` until something goes wrong,
    /// and returns what did.
    async fn keep_alive(&mut self, ttl: Duration) -> ClusterError {
        let every = ttl / 3;
        let (mut keeper, mut answers) = match self.client.lease_keep_alive(self.lease).await {
            Ok(pair) => pair,
            Err(e) => return e.into(),
        };
        loop {
            if let Err(e) = keeper.keep_alive().await {
                return e.into();
            }
            match tokio::time::timeout(every.max(REQUEST_TIMEOUT), answers.message()).await {
                Err(_) => return ClusterError::Timeout(every.max(REQUEST_TIMEOUT)),
                Ok(Err(e)) => return e.into(),
                Ok(Ok(None)) => return ClusterError::StreamEnded,
                Ok(Ok(Some(answer))) if answer.ttl() <= 0 => {
                    return ClusterError::LeaseLost(self.lease)
                }
                Ok(Ok(Some(_))) => {}
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Revokes the lease: its keys leave etcd now.
    async fn revoke(&mut self) {
        match tokio::time::timeout(REVOKE_TIMEOUT, self.client.lease_revoke(self.lease)).await {
            Ok(Ok(_)) => {
                info!(lease = %format!("{:x}", self.lease), "cluster: left (lease revoked)")
            }
            Ok(Err(e)) => {
                warn!(error = %e, "cluster: revoking the lease failed; it expires on its own")
            }
            Err(_) => {
                warn!("cluster: etcd did not answer the revoke; the lease expires on its own")
            }
        }
    }
}
