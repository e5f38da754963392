//! `lb run`: validate, load, attach, reconcile, serve the admin API, then
//! keep the maps in step until SIGINT/SIGTERM, and detach on the way out.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use etcd_client::ConnectOptions;
use lb_common::IFACE_F_XDP;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    api::{server, types::InterfaceStatus},
    cluster::{self, ClusterSpec, LocalSet, Membership},
    config::{self, ApiSpec, Config, ForwardMode},
    control::{Controller, DaemonInfo, Handle},
    datapath::{Datapath, MapSizes},
    docker::{self, DockerUpdate, Session, Tracker},
    events::EventLog,
    health,
    host::{Host, Link},
    metrics,
    reconcile::Reconciler,
    state::{default_state_path, Desired},
    ui,
};

/// Options of `lb run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The TOML config file.
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
    /// Admin API socket (created mode 0600).
    #[arg(long, value_name = "PATH", default_value = server::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Where changes made through the API are kept [default: next to the
    /// config, e.g. lb.toml -> lb.state.json].
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// On SIGINT/SIGTERM, leave the data path forwarding (maps and programs
    /// stay pinned) for the next `lb run` to take over without dropping a
    /// connection. Without it, stopping detaches everything.
    #[arg(long)]
    pub keep_datapath: bool,
    /// Serve Prometheus metrics on http://ADDR/metrics, e.g. 127.0.0.1:9106
    /// [default: off]. Keep it on loopback: anyone who can reach it sees the
    /// services, their backends and their traffic.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Serve the read-only dashboard page on http://ADDR/, e.g.
    /// 127.0.0.1:9107 [default: off]. Keep it on loopback, as --metrics.
    #[arg(long, value_name = "ADDR")]
    pub ui: Option<SocketAddr>,
    /// Docker engine to follow, e.g. unix:///var/run/docker.sock or
    /// tcp://127.0.0.1:2375 [default: the config's docker.host, else the
    /// local socket]. Turns the watcher on unless the config turns it off.
    #[arg(long, value_name = "URL", value_parser = parse_docker_host)]
    pub docker_host: Option<String>,
}

fn parse_docker_host(s: &str) -> Result<String, String> {
    config::check_docker_host(s).map(|()| s.to_owned())
}

/// How long `lb run` waits for the engine's first list before it starts
/// without it (the watcher keeps trying).
const DOCKER_FIRST_LIST: Duration = Duration::from_secs(5);

/// Runs the daemon in the foreground: every check that can fail comes
/// before anything is attached, so a bad config or a busy socket leaves the
/// host as it was.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let desired = load_desired(&args, &config)?;
    let cluster_options = config
        .cluster
        .as_ref()
        .map(cluster::connect_options)
        .transpose()?;
    let host = Host::new()?;
    let externals = find_externals(&host, &config, &args.config).await?;
    let listeners = bind_listeners(&args, &config.api).await?;
    let sizes = MapSizes::from(&config.datapath);
    let mut dp = Datapath::open(&sizes, &config.datapath.pin_path)
        .context("loading the data path (needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)")?;
    let adopted = dp.adopted();
    if adopted {
        info!(pin_path = %config.datapath.pin_path.display(), "taking over the running data path");
    }
    let attached = attach_externals(&mut dp, &externals, config.datapath.mode)?;
    let docker = DockerStart::new(&args, &config);
    // Containers are known before the maps are touched, so a restart that
    // takes over a running data path keeps their backends and flows.
    let (tracker, mut desired, first) = docker.first_list(desired).await;

    let mut rec = Reconciler::new(dp, sizes, host);
    rec.set_xdp_forward(attached.iter().any(|a| a.xdp));
    let services = desired.services();
    // Applied whole just below: the controller starts from here and
    // applies only what changes.
    desired.take_unapplied();
    if adopted {
        let n = rec.adopt(&services).await?;
        info!(services = n, "services taken over with their flows");
    }
    rec.apply(&services).await?;
    rec.finish_adoption()?;
    let info = DaemonInfo {
        started: std::time::Instant::now(),
        adopted,
        pin_path: config.datapath.pin_path.display().to_string(),
        externals: attached.into_iter().map(|a| a.status).collect(),
    };
    let cluster = config.cluster.zip(cluster_options);
    let running = serve(
        rec, desired, tracker, info, listeners, &docker, first, cluster,
    )?;
    info!(services = services.len(), socket = %args.socket.display(), "data path ready");

    wait_for_signal().await?;
    if args.keep_datapath {
        info!("shutting down: the data path keeps forwarding (--keep-datapath)");
    } else {
        info!("shutting down: detaching the data path");
    }
    let mut rec = running.stop().await?;
    if args.keep_datapath {
        rec.into_datapath().close(true);
        info!("left running; the next `lb run` takes it over");
    } else {
        rec.release_neighbors().await;
        rec.into_datapath().close(false);
        info!("detached");
    }
    Ok(())
}

fn load_desired(args: &RunArgs, config: &Config) -> anyhow::Result<Desired> {
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| default_state_path(&args.config));
    let desired = Desired::load(config, state_path)?;
    for name in desired.shadowed() {
        warn!(service = name, state = %desired.path().display(), "service from the state file ignored: the config now declares its name or address");
    }
    Ok(desired)
}

/// Every external interface must exist before anything is loaded, so a
/// typo leaves the host exactly as it was.
async fn find_externals(
    host: &Host,
    config: &Config,
    path: &std::path::Path,
) -> anyhow::Result<Vec<Link>> {
    let mut externals = Vec::new();
    for name in &config.datapath.external {
        let link = host
            .link(name)
            .await
            .with_context(|| format!("{}: datapath.external", path.display()))?;
        externals.push(link);
    }
    Ok(externals)
}

/// The admin socket, the metrics port and the dashboard's, bound before
/// anything is attached: a second daemon, or a busy port, stops here.
struct Listeners {
    api: tokio::net::UnixListener,
    /// Who may use it and its bounds.
    api_spec: ApiSpec,
    /// Removes the socket when the daemon exits.
    _socket: RemoveOnDrop,
    metrics: Option<tokio::net::TcpListener>,
    ui: Option<tokio::net::TcpListener>,
}

async fn bind_listeners(args: &RunArgs, api_spec: &ApiSpec) -> anyhow::Result<Listeners> {
    let api = server::bind(&args.socket, api_spec.access.is_shared()).await?;
    let socket = RemoveOnDrop(args.socket.clone());
    let metrics = match args.metrics {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .with_context(|| format!("binding --metrics {addr}"))?,
        ),
        None => None,
    };
    let ui = match args.ui {
        Some(addr) => Some(
            ui::bind(addr)
                .await
                .with_context(|| format!("binding --ui {addr}"))?,
        ),
        None => None,
    };
    Ok(Listeners {
        api,
        api_spec: api_spec.clone(),
        _socket: socket,
        metrics,
        ui,
    })
}

/// An external interface as attached.
struct Attached {
    status: InterfaceStatus,
    /// The forward path runs in XDP there.
    xdp: bool,
}

fn attach_externals(
    dp: &mut Datapath,
    externals: &[Link],
    mode: ForwardMode,
) -> anyhow::Result<Vec<Attached>> {
    let mut attached = Vec::new();
    for link in externals {
        let xdp = match mode {
            ForwardMode::Xdp => true,
            ForwardMode::Tc => false,
            // A veth hands XDP the peer's CHECKSUM_PARTIAL packets, whose
            // checksum XDP cannot finish: TC can (see ARCHITECTURE.md).
            ForwardMode::Auto => !link.veth,
        };
        if xdp {
            dp.attach_xdp(&link.name, link.ifindex, XdpMode::Default)
                .with_context(|| format!("attaching to {}; try mode = \"tc\"", link.name))?;
            dp.add_iface_flags(link.ifindex, IFACE_F_XDP)?;
        }
        dp.attach_tc(&link.name, link.ifindex)?;
        info!(
            iface = link.name,
            forward = if xdp { "xdp" } else { "tc" },
            "external interface attached"
        );
        let programs = if xdp { vec!["xdp", "tc"] } else { vec!["tc"] };
        attached.push(Attached {
            status: InterfaceStatus {
                name: link.name.clone(),
                ifindex: link.ifindex,
                role: "external".into(),
                programs: programs.into_iter().map(String::from).collect(),
            },
            xdp,
        });
    }
    Ok(attached)
}

/// Where the Docker engine is, and whether to follow it.
struct DockerStart {
    host: String,
    on: bool,
}

impl DockerStart {
    fn new(args: &RunArgs, config: &Config) -> Self {
        let host = args
            .docker_host
            .clone()
            .unwrap_or(config.docker.host.clone());
        let on = match config.docker.enabled {
            Some(on) => on,
            None if args.docker_host.is_some() => true,
            None => host
                .strip_prefix("unix://")
                .is_none_or(|p| std::path::Path::new(p).exists()),
        };
        Self { host, on }
    }

    /// Opens the engine client's first session: its list is both what the
    /// maps start with and what the client reports first, and its events
    /// follow on from that list. Waits [`DOCKER_FIRST_LIST`] at most.
    async fn first_list(&self, mut desired: Desired) -> (Tracker, Desired, Option<Session>) {
        let mut tracker = Tracker::new(if self.on { "connecting" } else { "disabled" });
        if !self.on {
            return (tracker, desired, None);
        }
        let mut first = None;
        match tokio::time::timeout(DOCKER_FIRST_LIST, docker::open(&self.host)).await {
            Ok(Ok(session)) => {
                info!(
                    host = self.host,
                    containers = session.containers.len(),
                    "docker: first list"
                );
                tracker.update(DockerUpdate::Sync {
                    containers: session.containers.clone(),
                    at: session.listed_at,
                });
                first = Some(session);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "docker: engine not reachable; starting without its containers and retrying")
            }
            Err(_) => warn!(
                host = self.host,
                "docker: no answer in 5 s; starting without its containers and retrying"
            ),
        }
        tracker.assign(&mut desired);
        (tracker, desired, first)
    }
}

/// The daemon's tasks while it serves.
struct Running {
    stop: watch::Sender<bool>,
    control: tokio::task::JoinHandle<Reconciler>,
    api: tokio::task::JoinHandle<std::io::Result<()>>,
    metrics: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    ui: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    watcher: Option<tokio::task::JoinHandle<()>>,
    membership: Option<Membership>,
    _listeners: RemoveOnDrop,
}

/// Starts the controller, the admin API, metrics, the dashboard, the Docker
/// engine client, the health checker and, in cluster mode, the node's
/// membership.
#[allow(clippy::too_many_arguments)]
fn serve(
    rec: Reconciler,
    desired: Desired,
    tracker: Tracker,
    info: DaemonInfo,
    listeners: Listeners,
    docker: &DockerStart,
    first: Option<Session>,
    cluster: Option<(ClusterSpec, ConnectOptions)>,
) -> anyhow::Result<Running> {
    let reader = rec.reader()?;
    let events = EventLog::default();
    let (handle, inbox) = Handle::new();
    let (stop, stop_rx) = watch::channel(false);
    // Backends start healthy (as the reconciler assumes); checks can only
    // take them out. The controller keeps them in step with the services.
    let mut control = Controller::new(rec, desired, tracker, info, reader, events.clone())
        .with_health(health::spawn(handle.clone()));
    let mut membership = None;
    if let Some((spec, options)) = cluster {
        let (local, local_rx) = watch::channel(LocalSet::new());
        control = control.with_cluster(local);
        membership = Some(Membership::start(spec, options, handle.clone(), local_rx));
    }
    let control = tokio::spawn(control.run(inbox, wait_for(stop_rx.clone())));
    let api = tokio::spawn(server::serve(
        listeners.api,
        handle.clone(),
        events.clone(),
        listeners.api_spec,
        wait_for(stop_rx.clone()),
    ));
    let metrics = listeners.metrics.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "serving Prometheus metrics at /metrics");
        }
        tokio::spawn(metrics::serve_on(
            listener,
            handle.clone(),
            wait_for(stop_rx.clone()),
        ))
    });
    let ui = listeners.ui.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            info!(url = %format!("http://{addr}/"), "serving the dashboard");
        }
        tokio::spawn(ui::serve_on(
            listener,
            handle.clone(),
            events.clone(),
            wait_for(stop_rx.clone()),
        ))
    });
    let watcher = docker
        .on
        .then(|| tokio::spawn(docker::watch(docker.host.clone(), handle.clone(), first)));
    Ok(Running {
        stop,
        control,
        api,
        metrics,
        ui,
        watcher,
        membership,
        _listeners: listeners._socket,
    })
}

impl Running {
    /// Stops serving: the node leaves the cluster, the engine client goes, the API and metrics finish
    /// what they accepted (5 s at most), the controller answers what is in
    /// its inbox and hands the reconciler back.
    async fn stop(self) -> anyhow::Result<Reconciler> {
        if let Some(m) = self.membership {
            // First: the other nodes drop what this one published at once.
            m.leave().await;
        }
        let _ = self.stop.send(true);
        if let Some(w) = self.watcher {
            w.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), self.api).await;
        for task in [self.metrics, self.ui].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        self.control
            .await
            .context("the controller stopped abnormally")
    }
}

/// Waits for SIGINT or SIGTERM.
async fn wait_for_signal() -> std::io::Result<()> {
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = sigint.recv() => {}
        _ = sigterm.recv() => {}
    }
    Ok(())
}

async fn wait_for(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Removes the admin socket when the daemon exits.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
