//! `lb run`: validate, load, attach, reconcile, serve the admin API, then
//! keep the maps in step until SIGINT/SIGTERM, and detach on the way out.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use lb_common::IFACE_F_XDP;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::watch,
};
use tracing::{info, warn};

use crate::{
    api::{server, types::InterfaceStatus},
    config::{self, Config, ForwardMode},
    control::{Controller, DaemonInfo, Handle},
    datapath::{Datapath, MapSizes},
    docker::{self, DockerUpdate, Tracker},
    health,
    host::Host,
    metrics,
    reconcile::Reconciler,
    state::{default_state_path, Desired},
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

/// Runs the daemon in the foreground.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| default_state_path(&args.config));
    let desired = Desired::load(&config, state_path)?;
    for name in desired.shadowed() {
        warn!(service = name, state = %desired.path().display(), "service from the state file ignored: the config now declares its name or address");
    }
    // Every external interface must exist before anything is loaded, so a
    // typo leaves the host exactly as it was.
    let host = Host::new()?;
    let mut externals = Vec::new();
    for name in &config.datapath.external {
        let link = host
            .link(name)
            .await
            .with_context(|| format!("{}: datapath.external", args.config.display()))?;
        externals.push(link);
    }
    // Bound before anything is attached: a second daemon stops here.
    let listener = server::bind(&args.socket).await?;
    let _socket = RemoveOnDrop(args.socket.clone());
    // Bound before anything is attached too: a busy port stops here.
    let metrics_listener = match args.metrics {
        Some(addr) => Some(
            metrics::bind(addr)
                .await
                .with_context(|| format!("binding --metrics {addr}"))?,
        ),
        None => None,
    };

    let d = &config.datapath;
    let sizes = MapSizes {
        max_services: d.max_services,
        max_backends: d.max_backends,
        max_table_size: d.max_table_size,
        flow_table_size: d.flow_table_size,
    };
    let mut dp = Datapath::open(&sizes, &d.pin_path)
        .context("loading the data path (needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)")?;
    let adopted = dp.adopted();
    if adopted {
        info!(pin_path = %d.pin_path.display(), "taking over the running data path");
    }
    let mut attached = Vec::new();
    for link in &externals {
        let xdp = match d.mode {
            ForwardMode::Xdp => true,
            ForwardMode::Tc => false,
            // A veth hands XDP the peer's CHECKSUM_PARTIAL packets, whose
            // checksum XDP cannot finish: TC can (see ARCHITECTURE.md).
            ForwardMode::Auto => !link.veth,
        };
        if xdp {
            dp.attach_xdp(&link.name, link.ifindex, XdpMode::Default)
                .with_context(|| format!("attaching to {}; try mode = \"tc\"", link.name))?;
            dp.set_iface_flags(link.ifindex, IFACE_F_XDP)?;
        }
        dp.attach_tc(&link.name, link.ifindex)?;
        info!(
            iface = link.name,
            forward = if xdp { "xdp" } else { "tc" },
            "external interface attached"
        );
        attached.push(InterfaceStatus {
            name: link.name.clone(),
            ifindex: link.ifindex,
            role: "external".into(),
            programs: if xdp {
                vec!["xdp".into(), "tc".into()]
            } else {
                vec!["tc".into()]
            },
        });
    }

    // Containers are known before the maps are touched, so a restart that
    // takes over a running data path keeps their backends and flows.
    let docker_host = args
        .docker_host
        .clone()
        .unwrap_or(config.docker.host.clone());
    let docker_on = match config.docker.enabled {
        Some(on) => on,
        None if args.docker_host.is_some() => true,
        None => docker_host
            .strip_prefix("unix://")
            .is_none_or(|p| std::path::Path::new(p).exists()),
    };
    let mut tracker = Tracker::new(if docker_on { "connecting" } else { "disabled" });
    let mut desired = desired;
    // The first session's list is both what the maps start with and what
    // the watcher reports first; its events follow on from that list.
    let mut first = None;
    if docker_on {
        match tokio::time::timeout(DOCKER_FIRST_LIST, docker::open(&docker_host)).await {
            Ok(Ok(session)) => {
                info!(
                    host = docker_host,
                    containers = session.containers.len(),
                    "docker: first list"
                );
                tracker.update(DockerUpdate::Sync(session.containers.clone()));
                first = Some(session);
            }
            Ok(Err(e)) => {
                warn!(error = %e, "docker: engine not reachable; starting without its containers and retrying")
            }
            Err(_) => warn!(
                host = docker_host,
                "docker: no answer in 5 s; starting without its containers and retrying"
            ),
        }
        tracker.assign(&mut desired);
    }

    let mut rec = Reconciler::new(dp, sizes, host);
    rec.set_xdp_forward(
        attached
            .iter()
            .any(|i| i.programs.iter().any(|p| p == "xdp")),
    );
    let services = desired.services();
    if adopted {
        let n = rec.adopt(&services)?;
        info!(services = n, "services taken over with their flows");
    }
    rec.apply(&services).await?;
    rec.finish_adoption()?;
    let reader = rec.reader()?;
    let (handle, inbox) = Handle::new();
    let (stop_tx, stop_rx) = watch::channel(false);
    // Backends start healthy (as the reconciler assumes); checks can only
    // take them out. The controller keeps them in step with the services.
    let control = Controller::new(
        rec,
        desired,
        tracker,
        DaemonInfo {
            started: std::time::Instant::now(),
            adopted,
            pin_path: d.pin_path.display().to_string(),
            externals: attached,
        },
        reader,
    )
    .with_health(health::spawn(handle.clone()));
    let control = tokio::spawn(control.run(inbox, wait_for(stop_rx.clone())));

    let api = tokio::spawn(server::serve(
        listener,
        handle.clone(),
        wait_for(stop_rx.clone()),
    ));
    let metrics_task = metrics_listener.map(|listener| {
        if let Ok(addr) = listener.local_addr() {
            info!(%addr, "serving Prometheus metrics at /metrics");
        }
        tokio::spawn(metrics::serve_on(
            listener,
            handle.clone(),
            wait_for(stop_rx.clone()),
        ))
    });
    let watcher =
        docker_on.then(|| tokio::spawn(docker::watch(docker_host.clone(), handle.clone(), first)));
    drop(handle);
    info!(services = services.len(), socket = %args.socket.display(), "data path ready");

    wait_for_signal().await?;
    if args.keep_datapath {
        info!("shutting down: the data path keeps forwarding (--keep-datapath)");
    } else {
        info!("shutting down: detaching the data path");
    }
    let _ = stop_tx.send(true);
    if let Some(w) = watcher {
        w.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), api).await;
    if let Some(task) = metrics_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let mut rec = control.await.context("the controller stopped abnormally")?;
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
