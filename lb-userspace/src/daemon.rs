//! `lb run`: validate, load, attach, reconcile, then keep the maps in step
//! until SIGINT/SIGTERM, and detach on the way out.

use std::{path::PathBuf, time::Duration};

use anyhow::Context as _;
use aya::programs::XdpMode;
use lb_common::IFACE_F_XDP;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    config::{Config, ForwardMode},
    datapath::{Datapath, MapSizes},
    host,
    reconcile::Reconciler,
};

/// How often routes, neighbours and veth peers are checked again.
const REFRESH_EVERY: Duration = Duration::from_secs(5);

/// Options of `lb run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The TOML config file.
    #[arg(long, short, value_name = "FILE")]
    pub config: PathBuf,
}

/// Runs the daemon in the foreground.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let config = Config::load(&args.config)?;
    // Every external interface must exist before anything is loaded, so a
    // typo leaves the host exactly as it was.
    let mut externals = Vec::new();
    for name in &config.datapath.external {
        let link = host::link(name)
            .await
            .with_context(|| format!("{}: datapath.external", args.config.display()))?;
        externals.push(link);
    }

    let d = &config.datapath;
    let sizes = MapSizes {
        max_services: d.max_services,
        max_backends: d.max_backends,
        max_table_size: d.max_table_size,
        flow_table_size: d.flow_table_size,
    };
    let mut dp = Datapath::load(&sizes)
        .context("loading the data path (needs root, or CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON)")?;
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
    }

    let mut rec = Reconciler::new(dp, sizes);
    rec.apply(&config.services).await?;
    info!(services = config.services.len(), "data path ready");

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(REFRESH_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                if let Err(e) = rec.refresh().await {
                    warn!(error = %format!("{e:#}"), "refresh failed; retrying later");
                }
            }
        }
    }
    info!("shutting down: detaching the data path");
    rec.release_neighbors().await;
    drop(rec);
    info!("detached");
    Ok(())
}
