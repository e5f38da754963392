//! Delivery: how packets reach each backend, and what that needs on this
//! host: the route, the next hop's MAC (a managed neighbour entry keeps it
//! resolved), the reverse path attached where replies enter, and GRO on a
//! veth peer so XDP can deliver to it. The only part of reconciling that
//! talks to the host's network stack.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::Duration,
};

use futures_util::{stream, StreamExt as _};
use lb_common::{BACKEND_F_MAC, BACKEND_F_PEER, BACKEND_F_XDP, IFACE_F_REPLIES};
use tracing::{debug, info, warn};

use super::tables::{Delivery, ToResolve};
use crate::{
    api::types::InterfaceStatus,
    datapath::{Datapath, DatapathError},
    host::{self, Host, HostError, Link},
    model::Via,
};

/// What delivery set up on this host, to reuse and to undo.
#[derive(Debug)]
pub struct Deliveries {
    /// This host's network, over netlink.
    host: Host,
    /// Backend-facing interfaces set up (TC attached), by ifindex.
    ready_ifaces: BTreeMap<u32, String>,
    /// Neighbour entries (address, ifindex) this daemon asked the kernel to
    /// keep resolved.
    managed_neighbors: BTreeSet<(Ipv4Addr, u32)>,
    /// Whether some external interface forwards with XDP, so backends'
    /// veth peers need GRO on to take redirected frames.
    xdp_forward: bool,
    /// Container interfaces (a bridge, or a veth) this daemon attached to;
    /// detached when no backend uses them any more.
    container_ifaces: BTreeSet<u32>,
    /// veths whose peer was seen with GRO on. A peer keeps it for the
    /// interface's life, and a new container brings a new ifindex, so the
    /// periodic refresh does not enter every backend's namespace again.
    gro_ready: BTreeSet<u32>,
}

impl Deliveries {
    /// Nothing set up yet; `host` answers questions about interfaces,
    /// routes and neighbours.
    pub fn new(host: Host) -> Self {
        Self {
            host,
            ready_ifaces: BTreeMap::new(),
            managed_neighbors: BTreeSet::new(),
            xdp_forward: false,
            container_ifaces: BTreeSet::new(),
            gro_ready: BTreeSet::new(),
        }
    }

    /// Whether the forward path runs in XDP anywhere: only then is GRO
    /// turned on in backends' namespaces.
    pub fn set_xdp_forward(&mut self, on: bool) {
        self.xdp_forward = on;
    }

    /// Backend-facing interfaces the reverse path is attached to.
    pub fn interfaces(&self) -> Vec<InterfaceStatus> {
        self.ready_ifaces
            .iter()
            .map(|(ifindex, name)| InterfaceStatus {
                name: name.clone(),
                ifindex: *ifindex,
                role: "backend".into(),
                programs: vec!["tc".into()],
            })
            .collect()
    }

    /// Takes over the reverse path of the interfaces adopted backends use
    /// (one that is gone is skipped: its backends were resolved again);
    /// `containers` are those of container backends.
    pub fn adopt(
        &mut self,
        dp: &mut Datapath,
        used: &BTreeSet<u32>,
        containers: BTreeSet<u32>,
    ) -> Result<(), DatapathError> {
        self.container_ifaces.extend(containers);
        for &ifindex in used {
            if self.ready_ifaces.contains_key(&ifindex) {
                continue;
            }
            if let Some(name) = host::interface_name(ifindex) {
                dp.attach_tc(&name, ifindex)?;
                dp.add_iface_flags(ifindex, IFACE_F_REPLIES)?;
                self.ready_ifaces.insert(ifindex, name);
            }
        }
        Ok(())
    }

    /// Detaches the reverse path from container interfaces (a bridge, or a
    /// veth) no backend uses any more (its containers are gone, or left every
    /// service), and from any interface that no longer exists. `used`: the
    /// interfaces backends are delivered through.
    pub fn release_unused(&mut self, dp: &mut Datapath, used: &BTreeSet<u32>) {
        let unused: Vec<u32> = self
            .container_ifaces
            .iter()
            .filter(|i| !used.contains(i))
            .copied()
            .collect();
        for ifindex in unused {
            self.container_ifaces.remove(&ifindex);
            if let Some(name) = self.ready_ifaces.remove(&ifindex) {
                dp.detach_tc(ifindex);
                dp.clear_iface_flags(ifindex, IFACE_F_REPLIES);
                info!(
                    iface = name,
                    "reverse path detached: no container backend behind it"
                );
            }
        }
        // A gone container's veth takes its GRO state with it.
        self.gro_ready.retain(|i| used.contains(i));
        // An interface deleted under a running daemon severed its link:
        // unpinned now, so no stale pin outlives it and status does not
        // list it (an interface of the same name is attached afresh when a
        // backend is resolved to it).
        let gone: Vec<(u32, String)> = self
            .ready_ifaces
            .iter()
            .filter(|(i, _)| host::interface_name(**i).is_none())
            .map(|(i, n)| (*i, n.clone()))
            .collect();
        for (ifindex, name) in gone {
            self.ready_ifaces.remove(&ifindex);
            self.container_ifaces.remove(&ifindex);
            dp.detach_tc(ifindex);
            dp.clear_iface_flags(ifindex, IFACE_F_REPLIES);
            info!(
                iface = name,
                ifindex, "reverse path dropped: the interface is gone"
            );
        }
    }

    /// Works out how to reach each of `backends` (service, address,
    /// container interface) and prepares its interface: TC attached for
    /// the replies, GRO on the veth peer so XDP can deliver to it. `None`
    /// (the backend stays out of the table) for one that cannot be
    /// reached. The netlink questions of routed backends are asked
    /// [`LOOKUPS_IN_FLIGHT`] at a time, so a batch of new backends waits
    /// for their neighbours once, not once each.
    pub async fn resolve_all(
        &mut self,
        dp: &mut Datapath,
        backends: Vec<ToResolve>,
    ) -> Result<Vec<(String, SocketAddrV4, Option<Delivery>)>, DatapathError> {
        let host = self.host.clone();
        let found: Vec<(ToResolve, Found)> = stream::iter(backends)
            .map(|want| {
                let host = host.clone();
                async move {
                    let found = match want.via {
                        Some(via) => Found::Container(via),
                        None => Found::Routed(locate(&host, *want.addr.ip()).await),
                    };
                    (want, found)
                }
            })
            .buffered(LOOKUPS_IN_FLIGHT)
            .collect()
            .await;
        let mut out = Vec::with_capacity(found.len());
        for (want, found) in found {
            let ToResolve {
                service,
                addr,
                dsr_vip,
                ..
            } = want;
            let result = match found {
                Found::Container(via) => match self.resolve_container(dp, via).await {
                    Ok(d) => match dsr_vip {
                        Some(vip) => self.hold_vip(via.pid, vip).await.map(|()| d),
                        None => Ok(d),
                    },
                    Err(e) => Err(e),
                },
                Found::Routed(Ok(l)) if dsr_vip.is_some() && l.gateway => {
                    Err(ResolveError::Host(HostError::DsrBehindGateway(*addr.ip())))
                }
                Found::Routed(Ok(l)) => self.prepare(dp, l).await,
                Found::Routed(Err(e)) => Err(ResolveError::Host(e)),
            };
            let delivery = match result {
                Ok(d) => Some(d),
                Err(ResolveError::Host(e)) => {
                    warn!(service, backend = %addr, error = %e, "backend unreachable; kept out of the table until it is");
                    None
                }
                Err(ResolveError::Datapath(e)) => return Err(e),
            };
            out.push((service, addr, delivery));
        }
        Ok(out)
    }

    /// Sets a direct-server-return container up to take the VIP's packets
    /// (see [`Host::hold_vip`]), as it turns GRO on for XDP: nothing is
    /// asked of whoever runs the container.
    async fn hold_vip(&self, pid: u32, vip: Ipv4Addr) -> Result<(), ResolveError> {
        let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
        if self.host.hold_vip(&ns, vip).await? {
            info!(%vip, netns = %ns.display(), "direct server return: the VIP set on the container's lo, ARP for it suppressed");
        }
        Ok(())
    }

    /// A container's delivery, from what Docker reported: the host side of
    /// its veth and its MAC, found through its process without asking the
    /// routing table (a bridge port is not what a route names).
    async fn resolve_container(
        &mut self,
        dp: &mut Datapath,
        via: Via,
    ) -> Result<Delivery, ResolveError> {
        let inner = host::container_link(via.pid, via.mac)?;
        let link = host::container_veth(inner.host_ifindex)?;
        // Replies to clients go to the container's gateway: on a bridge
        // network, the bridge itself, whose ingress sees them all. One
        // attachment there serves every container on it; one per veth would
        // put a TCX attach (an RCU grace period, about 8 ms here) on every
        // container's way in.
        let (reply_ifindex, reply_name) = match host::bridge_of(&link.name) {
            Ok(Some(bridge)) => bridge,
            _ => (link.ifindex, link.name.clone()),
        };
        let started = std::time::Instant::now();
        if self.attach_reverse_path(dp, reply_ifindex, &reply_name)? {
            self.container_ifaces.insert(reply_ifindex);
            info!(
                iface = reply_name,
                us = started.elapsed().as_micros() as u64,
                "reverse path attached for containers (TC ingress)"
            );
        }
        let mut flags = BACKEND_F_MAC | BACKEND_F_PEER;
        if self.xdp_forward {
            if !self.gro_ready.contains(&link.ifindex) {
                let ns = PathBuf::from(format!("/proc/{}/ns/net", via.pid));
                match self.host.ensure_gro(&ns, &inner.name).await {
                    Ok(changed) => {
                        if changed {
                            info!(iface = link.name, peer = inner.name, netns = %ns.display(), "turned GRO on in the backend's namespace so XDP can deliver to it");
                        }
                        self.gro_ready.insert(link.ifindex);
                    }
                    Err(e) => {
                        warn!(iface = link.name, error = %e, "could not prepare the container for XDP; using the skb path");
                    }
                }
            }
            if self.gro_ready.contains(&link.ifindex) {
                flags |= BACKEND_F_XDP;
            }
        }
        Ok(Delivery {
            ifindex: link.ifindex,
            src_mac: link.mac,
            dst_mac: Some(via.mac),
            flags,
            reply_ifindex,
        })
    }

    /// Sets up what [`locate`] found: the reverse path attached, GRO on a
    /// veth peer for XDP.
    async fn prepare(&mut self, dp: &mut Datapath, l: Located) -> Result<Delivery, ResolveError> {
        let Located {
            link,
            mac,
            gateway,
            managed,
        } = l;
        if let Some(m) = managed {
            self.managed_neighbors.insert(m);
        }
        let mut flags = 0;
        if mac.is_some() {
            flags |= BACKEND_F_MAC;
        }
        // Only a backend on the veth's own link lives in the peer namespace;
        // behind a gateway the peer is a router this daemon does not own, so
        // it gets the skb path (`bpf_redirect_neigh`) and its devices are
        // left alone.
        let peer = link.veth && link.peer_netnsid.is_some() && !gateway;
        if peer {
            flags |= BACKEND_F_PEER;
        }
        if self.attach_reverse_path(dp, link.ifindex, &link.name)? {
            info!(iface = link.name, "reverse path attached (TC ingress)");
        }
        if peer && mac.is_some() && self.xdp_forward {
            if !self.gro_ready.contains(&link.ifindex) && self.peer_takes_xdp(&link).await {
                self.gro_ready.insert(link.ifindex);
            }
            if self.gro_ready.contains(&link.ifindex) {
                flags |= BACKEND_F_XDP;
            }
        }
        Ok(Delivery {
            ifindex: link.ifindex,
            src_mac: link.mac,
            dst_mac: mac,
            flags,
            reply_ifindex: link.ifindex,
        })
    }

    /// Attaches the reverse path (TC ingress) to `ifindex` unless it is
    /// already; whether it was attached now.
    fn attach_reverse_path(
        &mut self,
        dp: &mut Datapath,
        ifindex: u32,
        name: &str,
    ) -> Result<bool, ResolveError> {
        if self.ready_ifaces.contains_key(&ifindex) {
            return Ok(false);
        }
        dp.attach_tc(name, ifindex)
            .map_err(ResolveError::Datapath)?;
        dp.add_iface_flags(ifindex, IFACE_F_REPLIES)
            .map_err(ResolveError::Datapath)?;
        self.ready_ifaces.insert(ifindex, name.to_owned());
        Ok(true)
    }

    /// Makes sure the veth peer behind `link` has GRO on; `false` when its
    /// namespace cannot be found or changed (delivery then takes the skb path).
    async fn peer_takes_xdp(&self, link: &host::Link) -> bool {
        let (Some(peer), Some(nsid)) = (link.peer_ifindex, link.peer_netnsid) else {
            return false;
        };
        let result = async {
            let Some(ns) = self.host.find_peer_netns(nsid).await? else {
                return Ok::<_, HostError>(false);
            };
            let Some(peer_link) = self.host.link_in_netns(&ns, peer).await? else {
                return Ok(false);
            };
            if self.host.ensure_gro(&ns, &peer_link.name).await? {
                info!(
                    iface = link.name,
                    peer = peer_link.name,
                    netns = %ns.display(),
                    "turned GRO on in the backend's namespace so XDP can deliver to it"
                );
            }
            Ok(true)
        }
        .await;
        match result {
            Ok(ok) => {
                if !ok {
                    debug!(
                        iface = link.name,
                        "veth peer namespace not found; using the skb path"
                    );
                }
                ok
            }
            Err(e) => {
                warn!(iface = link.name, error = %e, "could not prepare the veth peer for XDP; using the skb path");
                false
            }
        }
    }

    /// Removes the neighbour entries this daemon made managed.
    pub async fn release_neighbors(&mut self) {
        for (addr, ifindex) in std::mem::take(&mut self.managed_neighbors) {
            if let Err(e) = self.host.remove_neighbor(addr, ifindex).await {
                warn!(neighbor = %addr, ifindex, error = %e, "could not remove a managed neighbour entry");
            }
        }
    }
}

/// Netlink questions of routed backends asked at once.
pub const LOOKUPS_IN_FLIGHT: usize = 64;

/// A backend's first step of resolution.
enum Found {
    /// A container: its interface is found through its process.
    Container(Via),
    /// A routed backend, as the kernel answered.
    Routed(Result<Located, HostError>),
}

/// What the kernel says about reaching a routed backend.
struct Located {
    /// The egress interface.
    link: Link,
    /// The next hop's MAC, once resolved.
    mac: Option<[u8; 6]>,
    /// Whether the next hop is a gateway rather than the backend.
    gateway: bool,
    /// A neighbour entry made managed for it, to remove at shutdown.
    managed: Option<(Ipv4Addr, u32)>,
}

/// Route, egress interface and next hop MAC of `ip`. A next hop the
/// kernel has no MAC for gets a managed neighbour entry (Linux 5.16: the
/// kernel keeps it resolved, so XDP always has a fresh MAC), waited for 1 s
/// at most.
async fn locate(host: &Host, ip: Ipv4Addr) -> Result<Located, HostError> {
    let route = host.route_get(ip).await?;
    let link = host.link_by_index(route.ifindex).await?;
    let next_hop = route.gateway.unwrap_or(ip);
    let mut mac = host.neighbor(next_hop, link.ifindex).await?;
    let mut managed = None;
    if mac.is_none() {
        host.keep_neighbor_resolved(next_hop, link.ifindex).await?;
        managed = Some((next_hop, link.ifindex));
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            mac = host.neighbor(next_hop, link.ifindex).await?;
            if mac.is_some() {
                break;
            }
        }
    }
    Ok(Located {
        link,
        mac,
        gateway: route.gateway.is_some(),
        managed,
    })
}

enum ResolveError {
    Host(HostError),
    Datapath(DatapathError),
}

impl From<HostError> for ResolveError {
    fn from(e: HostError) -> Self {
        Self::Host(e)
    }
}
