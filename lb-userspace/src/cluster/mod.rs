//! Cluster mode (`[cluster]`): nodes share what they know through etcd.
//!
//! Each node holds one etcd lease while it runs and attaches every key it
//! writes to it, so what a node published leaves etcd when it stops (the
//! lease is revoked) or dies (the lease expires a TTL after its last
//! keep-alive). [`Membership`] owns that lease: it connects, grants it,
//! writes the node's record (see [`keys`]), keeps the lease alive, and
//! reconnects with backoff when etcd is lost, taking the same lease back
//! when etcd still has it.

pub mod keys;
pub mod spec;

use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, PutOptions, TlsOptions};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

pub use spec::ClusterSpec;

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
    /// Starts holding a lease for `spec.node` in the background; it keeps
    /// trying until etcd answers.
    pub fn start(spec: ClusterSpec, options: ConnectOptions) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(hold(spec, options, stop_rx));
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

/// Holds the lease until `stop`, reconnecting with backoff.
async fn hold(spec: ClusterSpec, options: ConnectOptions, mut stop: watch::Receiver<bool>) {
    let mut backoff = BACKOFF_MIN;
    let mut lease = None;
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
                let lost = tokio::select! {
                    () = stopped(&mut stop) => {
                        session.revoke().await;
                        return;
                    }
                    e = session.keep_alive(spec.lease_ttl) => e,
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
