//! What the daemon needs to know about this host's network, and the one thing
//! it changes on a backend's side: interfaces, routes, neighbours, veth peers
//! and their GRO setting.
//!
//! Everything goes through netlink (rtnetlink, and the ethtool generic
//! netlink family for GRO): adding a backend starts no process, and the
//! daemon needs neither iproute2 nor ethtool nor util-linux on the host.
//! Containers' interfaces are read from sysfs through their process instead.

mod ethtool;
pub mod mountns;
mod netns;

use std::{
    collections::HashSet,
    fs::File,
    io,
    net::Ipv4Addr,
    os::{fd::AsRawFd, unix::fs::MetadataExt},
    path::{Path, PathBuf},
};

use futures_util::StreamExt as _;
use netlink_packet_core::{
    DefaultNla, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE,
    NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage, AddressScope},
    link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage},
    neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    nsid::{NsidAttribute, NsidMessage},
    route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    AddressFamily, RouteNetlinkMessage,
};

/// Errors of host queries and changes.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A netlink socket could not be opened.
    #[error("opening a {family} netlink socket")]
    Socket {
        /// `rtnetlink` or `ethtool`.
        family: &'static str,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A network namespace could not be opened or entered.
    #[error("entering network namespace {}", path.display())]
    Namespace {
        /// The namespace file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// The kernel refused a request, or the answer made no sense.
    #[error("netlink {request}")]
    Netlink {
        /// What was asked, e.g. `RTM_GETLINK eth0`.
        request: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A sysctl could not be written.
    #[error("writing {path}")]
    Sysctl {
        /// The file under /proc/sys.
        path: String,
        /// What went wrong.
        #[source]
        source: io::Error,
    },
    /// A direct-server-return backend is reached through a router.
    #[error(
        "{0} is behind a gateway: direct server return needs it on a segment of this host (the frame keeps the VIP as destination)"
    )]
    DsrBehindGateway(Ipv4Addr),
    /// No interface has that name or index.
    #[error("no interface {0}")]
    NoInterface(String),
    /// The kernel has no route to the address.
    #[error("no route to {0}")]
    NoRoute(Ipv4Addr),
    /// The address belongs to this host.
    #[error("{0} is an address of this host; a backend must sit behind an interface")]
    LocalAddress(Ipv4Addr),
    /// GRO stayed off after the kernel accepted the request to turn it on.
    #[error("GRO on {0} stayed off (the device does not let it change)")]
    GroFixed(String),
    /// A MAC address field did not parse.
    #[error("bad MAC address {0:?}")]
    Mac(String),
    /// A container's interface could not be found through its process.
    #[error("container process {pid}: no interface with MAC {mac} ({reason})")]
    ContainerLink {
        /// The container's main process.
        pid: u32,
        /// The MAC looked for.
        mac: String,
        /// What was missing.
        reason: String,
    },
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], HostError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(|| HostError::Mac(s.to_owned()))?;
        *b = u8::from_str_radix(p, 16).map_err(|_| HostError::Mac(s.to_owned()))?;
    }
    if parts.next().is_some() {
        return Err(HostError::Mac(s.to_owned()));
    }
    Ok(mac)
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A network interface of this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// Interface index.
    pub ifindex: u32,
    /// Interface name.
    pub name: String,
    /// Its MAC address (zero for interfaces without one).
    pub mac: [u8; 6],
    /// Whether it is one end of a veth pair.
    pub veth: bool,
    /// For a veth: the peer's ifindex, in the peer's namespace.
    pub peer_ifindex: Option<u32>,
    /// For a veth whose peer is in another namespace: that namespace's id here.
    pub peer_netnsid: Option<i32>,
}

impl From<LinkMessage> for Link {
    fn from(msg: LinkMessage) -> Self {
        let mut link = Link {
            ifindex: msg.header.index,
            name: String::new(),
            mac: [0; 6],
            veth: false,
            peer_ifindex: None,
            peer_netnsid: None,
        };
        for attr in msg.attributes {
            match attr {
                LinkAttribute::IfName(name) => link.name = name,
                // Not six bytes (a tunnel, a loopback's zeros aside): no MAC.
                LinkAttribute::Address(a) => link.mac = a.try_into().unwrap_or([0; 6]),
                // The kernel sends IFLA_LINK only when it differs from the
                // interface's own index: for a veth, the peer.
                LinkAttribute::Link(peer) => link.peer_ifindex = Some(peer),
                LinkAttribute::LinkNetNsId(id) => link.peer_netnsid = Some(id),
                LinkAttribute::LinkInfo(infos) => {
                    link.veth |= infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                }
                _ => {}
            }
        }
        link
    }
}

/// A route to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Egress interface.
    pub ifindex: u32,
    /// Next hop, when the address is not on a connected network.
    pub gateway: Option<Ipv4Addr>,
}

/// The loopback's ifindex, the same in every namespace.
const LOOPBACK_IFINDEX: u32 = 1;

/// `NDA_FLAGS_EXT` (linux/neighbour.h): the neighbour flags past the 8 bits
/// of `ndm_flags`; netlink-packet-route 0.25 has no variant for it.
const NDA_FLAGS_EXT: u16 = 15;
/// `NTF_EXT_MANAGED` (linux/neighbour.h, Linux 5.16): the kernel resolves
/// the entry itself and keeps it resolved.
const NTF_EXT_MANAGED: u32 = 1;

/// RTM_GETROUTE for one destination: the kernel answers with the route it
/// would use, as `ip route get` shows it.
fn route_get_message(addr: Ipv4Addr) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = AddressFamily::Inet;
    msg.header.destination_prefix_length = 32;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::Inet(addr)));
    msg
}

/// The route in the kernel's answer to [`route_get_message`].
fn route_from_message(addr: Ipv4Addr, msg: &RouteMessage) -> Result<Route, HostError> {
    let mut ifindex = None;
    let mut gateway = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => ifindex = Some(*i),
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gateway = Some(*g),
            _ => {}
        }
    }
    if msg.header.kind == RouteType::Local || ifindex == Some(LOOPBACK_IFINDEX) {
        return Err(HostError::LocalAddress(addr));
    }
    Ok(Route {
        ifindex: ifindex.ok_or(HostError::NoRoute(addr))?,
        gateway,
    })
}

/// A neighbour message naming `addr` on `ifindex`: the key of an entry, as
/// RTM_GETNEIGH (one entry, not a dump) and RTM_DELNEIGH take it.
fn neighbor_message(addr: Ipv4Addr, ifindex: u32) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = AddressFamily::Inet;
    msg.header.ifindex = ifindex;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(
            addr,
        )));
    msg
}

/// RTM_NEWNEIGH for a managed entry, as `ip neigh replace ADDR dev DEV
/// managed` sends it: no state (the kernel resolves it) and
/// `NTF_EXT_MANAGED`.
fn managed_neighbor_message(addr: Ipv4Addr, ifindex: u32) -> NeighbourMessage {
    let mut msg = neighbor_message(addr, ifindex);
    msg.header.state = NeighbourState::None;
    msg.attributes
        .push(NeighbourAttribute::Other(DefaultNla::new(
            NDA_FLAGS_EXT,
            NTF_EXT_MANAGED.to_ne_bytes().to_vec(),
        )));
    msg
}

/// The MAC of a neighbour entry the kernel trusts enough to send to.
fn usable_mac(msg: &NeighbourMessage) -> Option<[u8; 6]> {
    let usable = matches!(
        msg.header.state,
        NeighbourState::Reachable
            | NeighbourState::Stale
            | NeighbourState::Delay
            | NeighbourState::Probe
            | NeighbourState::Permanent
            | NeighbourState::Noarp
    );
    if !usable {
        return None;
    }
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLocalAddress(l) => l.as_slice().try_into().ok(),
        _ => None,
    })
}

/// Whether a kernel error means "no such entry".
fn is_errno(e: &io::Error, errnos: &[i32]) -> bool {
    e.raw_os_error().is_some_and(|c| errnos.contains(&c))
}

/// Sends `msg` with `flags` and collects the answers; the kernel's error, if
/// any, as an [`io::Error`] with its errno.
async fn rtnl_request(
    handle: &rtnetlink::Handle,
    msg: RouteNetlinkMessage,
    flags: u16,
) -> io::Result<Vec<RouteNetlinkMessage>> {
    let mut req = NetlinkMessage::from(msg);
    req.header.flags = flags;
    let mut answers = handle
        .clone()
        .request(req)
        .map_err(|_| io::Error::other("the netlink connection is closed"))?;
    let mut out = Vec::new();
    while let Some(answer) = answers.next().await {
        match answer.payload {
            NetlinkPayload::InnerMessage(m) => out.push(m),
            NetlinkPayload::Error(e) if e.code.is_some() => return Err(e.to_io()),
            _ => {}
        }
    }
    Ok(out)
}

/// This host's network, through one rtnetlink connection.
///
/// Cheap to clone: clones share the connection.
#[derive(Clone, Debug)]
pub struct Host {
    handle: rtnetlink::Handle,
}

/// A new rtnetlink connection in the calling thread's namespace, its task
/// spawned on the current runtime.
fn rtnetlink_connection() -> Result<rtnetlink::Handle, HostError> {
    let (conn, handle, _) = rtnetlink::new_connection().map_err(|source| HostError::Socket {
        family: "rtnetlink",
        source,
    })?;
    tokio::spawn(conn);
    Ok(handle)
}

impl Host {
    /// Opens the rtnetlink connection in the daemon's namespace; its task
    /// runs on the current tokio runtime until the last clone is dropped.
    pub fn new() -> Result<Self, HostError> {
        Ok(Self {
            handle: rtnetlink_connection()?,
        })
    }

    /// Looks an interface up by name.
    pub async fn link(&self, name: &str) -> Result<Link, HostError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_owned()));
        get_link(&self.handle, msg, || name.to_owned())
            .await?
            .ok_or_else(|| HostError::NoInterface(name.to_owned()))
    }

    /// Looks an interface up by index.
    pub async fn link_by_index(&self, ifindex: u32) -> Result<Link, HostError> {
        let missing = || format!("with index {ifindex}");
        get_link(&self.handle, link_index_message(ifindex), missing)
            .await?
            .ok_or_else(|| HostError::NoInterface(missing()))
    }

    /// Asks the kernel how it would reach `addr`.
    pub async fn route_get(&self, addr: Ipv4Addr) -> Result<Route, HostError> {
        let answers = rtnl_request(
            &self.handle,
            RouteNetlinkMessage::GetRoute(route_get_message(addr)),
            NLM_F_REQUEST,
        )
        .await
        .map_err(|e| {
            // Unreachable and prohibit routes, and blackhole ones (EINVAL,
            // as `ip route get` shows them): no way there.
            if is_errno(
                &e,
                &[
                    libc::ENETUNREACH,
                    libc::EHOSTUNREACH,
                    libc::EACCES,
                    libc::EINVAL,
                ],
            ) {
                HostError::NoRoute(addr)
            } else {
                netlink_error(format!("RTM_GETROUTE {addr}"), e)
            }
        })?;
        answers
            .iter()
            .find_map(|a| match a {
                RouteNetlinkMessage::NewRoute(r) => Some(route_from_message(addr, r)),
                _ => None,
            })
            .unwrap_or(Err(HostError::NoRoute(addr)))
    }

    /// The MAC of neighbour `addr` on interface `ifindex`, if the kernel has
    /// one it trusts.
    pub async fn neighbor(
        &self,
        addr: Ipv4Addr,
        ifindex: u32,
    ) -> Result<Option<[u8; 6]>, HostError> {
        let answers = match rtnl_request(
            &self.handle,
            RouteNetlinkMessage::GetNeighbour(neighbor_message(addr, ifindex)),
            NLM_F_REQUEST,
        )
        .await
        {
            Ok(a) => a,
            Err(e) if is_errno(&e, &[libc::ENOENT]) => return Ok(None),
            Err(e) => {
                return Err(netlink_error(
                    format!("RTM_GETNEIGH {addr} ifindex {ifindex}"),
                    e,
                ))
            }
        };
        Ok(answers.iter().find_map(|a| match a {
            RouteNetlinkMessage::NewNeighbour(n) => usable_mac(n),
            _ => None,
        }))
    }

    /// Asks the kernel to resolve `addr` on interface `ifindex` and keep it
    /// resolved (a "managed" neighbour entry, Linux 5.16), so XDP always has
    /// a fresh MAC.
    pub async fn keep_neighbor_resolved(
        &self,
        addr: Ipv4Addr,
        ifindex: u32,
    ) -> Result<(), HostError> {
        rtnl_request(
            &self.handle,
            RouteNetlinkMessage::NewNeighbour(managed_neighbor_message(addr, ifindex)),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE,
        )
        .await
        .map_err(|e| netlink_error(format!("RTM_NEWNEIGH {addr} ifindex {ifindex} managed"), e))?;
        Ok(())
    }

    /// Removes the neighbour entry for `addr` on interface `ifindex`; one
    /// already gone is no error.
    pub async fn remove_neighbor(&self, addr: Ipv4Addr, ifindex: u32) -> Result<(), HostError> {
        match rtnl_request(
            &self.handle,
            RouteNetlinkMessage::DelNeighbour(neighbor_message(addr, ifindex)),
            NLM_F_REQUEST | NLM_F_ACK,
        )
        .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_errno(&e, &[libc::ENOENT, libc::ENODEV]) => Ok(()),
            Err(e) => Err(netlink_error(
                format!("RTM_DELNEIGH {addr} ifindex {ifindex}"),
                e,
            )),
        }
    }

    /// The id this namespace gives the namespace behind `netns` (a file
    /// such as `/proc/<pid>/ns/net`); `None` when it has given it none.
    pub async fn nsid_of(&self, netns: &Path) -> Result<Option<i32>, HostError> {
        let file = File::open(netns).map_err(|source| HostError::Namespace {
            path: netns.to_owned(),
            source,
        })?;
        let mut msg = NsidMessage::default();
        // The fd only has to stay open until the kernel answered.
        msg.attributes
            .push(NsidAttribute::Fd(file.as_raw_fd() as u32));
        let answers = rtnl_request(
            &self.handle,
            RouteNetlinkMessage::GetNsId(msg),
            NLM_F_REQUEST,
        )
        .await
        .map_err(|e| netlink_error(format!("RTM_GETNSID {}", netns.display()), e))?;
        drop(file);
        Ok(answers
            .iter()
            .filter_map(|a| match a {
                RouteNetlinkMessage::NewNsId(m) => Some(&m.attributes),
                _ => None,
            })
            .flatten()
            .find_map(|a| match a {
                // -1: NETNSA_NSID_NOT_ASSIGNED.
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            }))
    }

    /// Finds a file for the namespace this one knows as `nsid` (a veth
    /// peer's `link_netnsid`): named namespaces (`/run/netns`) first, then
    /// every process's namespace (containers).
    pub async fn find_peer_netns(&self, nsid: i32) -> Result<Option<PathBuf>, HostError> {
        let named = std::fs::read_dir("/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path());
        let procs = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
            .map(|e| e.path().join("ns/net"));
        let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
        let mut seen = HashSet::new();
        for path in named.chain(procs) {
            let Ok(ino) = std::fs::metadata(&path).map(|m| m.ino()) else {
                continue;
            };
            if Some(ino) == own || !seen.insert(ino) {
                continue;
            }
            // A process may exit, or a name go, while this looks.
            match self.nsid_of(&path).await {
                Ok(Some(id)) if id == nsid => return Ok(Some(path)),
                Ok(_) | Err(HostError::Namespace { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Interface `ifindex` inside the namespace `netns`.
    pub async fn link_in_netns(
        &self,
        netns: &Path,
        ifindex: u32,
    ) -> Result<Option<Link>, HostError> {
        let handle = netns::in_netns(netns, rtnetlink_connection).await?;
        get_link(&handle, link_index_message(ifindex), || {
            format!("with index {ifindex} in {}", netns.display())
        })
        .await
    }

    /// Makes the namespace `netns` accept packets for `vip` without
    /// answering ARP for it, as a direct-server-return backend must: the
    /// VIP on its `lo`, and `arp_ignore = 1`, `arp_announce = 2` for all
    /// its interfaces (it answers ARP only for addresses of the interface
    /// asked on, and never announces the VIP as a source). Returns whether
    /// the VIP was added now.
    pub async fn hold_vip(&self, netns: &Path, vip: Ipv4Addr) -> Result<bool, HostError> {
        let handle = netns::in_netns(netns, || {
            // Written from inside the namespace: /proc/sys/net is the
            // opener's namespace's.
            for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
                let path = format!("/proc/sys/net/ipv4/conf/all/{key}");
                std::fs::write(&path, value)
                    .map_err(|source| HostError::Sysctl { path, source })?;
            }
            rtnetlink_connection()
        })
        .await?;
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = 32;
        msg.header.scope = AddressScope::Host;
        // `lo` is interface 1 in every namespace.
        msg.header.index = 1;
        msg.attributes.push(AddressAttribute::Local(vip.into()));
        msg.attributes.push(AddressAttribute::Address(vip.into()));
        match rtnl_request(
            &handle,
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        )
        .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_errno(&e, &[libc::EEXIST]) => Ok(false),
            Err(e) => Err(netlink_error(
                format!("RTM_NEWADDR {vip}/32 on lo in {}", netns.display()),
                e,
            )),
        }
    }

    /// Turns GRO on for `ifname` in `netns` unless it already is. Returns
    /// whether it changed anything. A veth only delivers frames that XDP
    /// redirected into it when its receiving peer has GRO on (or an XDP
    /// program).
    pub async fn ensure_gro(&self, netns: &Path, ifname: &str) -> Result<bool, HostError> {
        ethtool::ensure_gro(netns, ifname).await
    }
}

fn netlink_error(request: String, source: io::Error) -> HostError {
    HostError::Netlink { request, source }
}

fn link_index_message(ifindex: u32) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.header.index = ifindex;
    msg
}

/// RTM_GETLINK for one interface; `None` when there is no such interface.
async fn get_link(
    handle: &rtnetlink::Handle,
    msg: LinkMessage,
    describe: impl Fn() -> String,
) -> Result<Option<Link>, HostError> {
    let answers = match rtnl_request(handle, RouteNetlinkMessage::GetLink(msg), NLM_F_REQUEST).await
    {
        Ok(a) => a,
        Err(e) if is_errno(&e, &[libc::ENODEV]) => return Ok(None),
        Err(e) => return Err(netlink_error(format!("RTM_GETLINK {}", describe()), e)),
    };
    Ok(answers.into_iter().find_map(|a| match a {
        RouteNetlinkMessage::NewLink(l) => Some(Link::from(l)),
        _ => None,
    }))
}

/// A container's interface: its name inside the container and the ifindex
/// of its veth peer on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerLink {
    /// The interface's name in the container (`eth0`).
    pub name: String,
    /// The host side of the veth.
    pub host_ifindex: u32,
}

/// Finds the interface with `mac` in the network namespace of process
/// `pid`, without entering it: the container's own sysfs (mounted in its
/// namespace by the engine) is read through `/proc/<pid>/root`. A veth's
/// `iflink` there is its peer's ifindex here.
pub fn container_link(pid: u32, mac: [u8; 6]) -> Result<ContainerLink, HostError> {
    let err = |reason: String| HostError::ContainerLink {
        pid,
        mac: format_mac(mac),
        reason,
    };
    let dir = PathBuf::from(format!("/proc/{pid}/root/sys/class/net"));
    let entries = std::fs::read_dir(&dir).map_err(|e| err(format!("{}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(address) = std::fs::read_to_string(path.join("address")) else {
            continue;
        };
        if parse_mac(address.trim()).ok() != Some(mac) {
            continue;
        }
        let iflink = std::fs::read_to_string(path.join("iflink"))
            .map_err(|e| err(format!("{}/iflink: {e}", path.display())))?;
        let host_ifindex = iflink
            .trim()
            .parse()
            .map_err(|_| err(format!("iflink {:?} is not a number", iflink.trim())))?;
        return Ok(ContainerLink {
            name: entry.file_name().to_string_lossy().into_owned(),
            host_ifindex,
        });
    }
    Err(err(format!("not in {}", dir.display())))
}

/// The name of interface `ifindex` in this process's namespace; `None`
/// when no interface has that index (any more). nix's `if_indextoname`
/// is not used: it misses the C function's NULL return and answers an
/// empty name for an index that does not exist.
pub fn interface_name(ifindex: u32) -> Option<String> {
    let mut buf = [0u8; libc::IF_NAMESIZE];
    // SAFETY: `buf` holds IF_NAMESIZE bytes, as if_indextoname requires.
    let ret = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr().cast()) };
    if ret.is_null() {
        return None;
    }
    let name = std::ffi::CStr::from_bytes_until_nul(&buf).ok()?;
    let name = name.to_string_lossy().into_owned();
    (!name.is_empty()).then_some(name)
}

/// The host side (`ifindex`) of a container's veth, read from sysfs: no
/// subprocess, since this is on the path of a container joining a service.
pub fn container_veth(ifindex: u32) -> Result<Link, HostError> {
    let missing = || HostError::NoInterface(format!("with index {ifindex}"));
    let name = interface_name(ifindex).ok_or_else(missing)?;
    let address = std::fs::read_to_string(Path::new("/sys/class/net").join(&name).join("address"))
        .map_err(|_| missing())?;
    Ok(Link {
        ifindex,
        mac: parse_mac(address.trim())?,
        veth: true,
        peer_ifindex: None,
        peer_netnsid: None,
        name,
    })
}

/// The bridge `ifname` is a port of, as (ifindex, name); `None` when it is
/// not a bridge port.
pub fn bridge_of(ifname: &str) -> Result<Option<(u32, String)>, HostError> {
    let master = match std::fs::read_link(Path::new("/sys/class/net").join(ifname).join("master")) {
        Ok(m) => m,
        Err(_) => return Ok(None),
    };
    let Some(name) = master.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return Ok(None);
    };
    if !Path::new("/sys/class/net")
        .join(&name)
        .join("bridge")
        .exists()
    {
        return Ok(None);
    }
    let ifindex = nix::net::if_::if_nametoindex(name.as_str())
        .map_err(|_| HostError::NoInterface(name.clone()))?;
    Ok(Some((ifindex, name)))
}

#[cfg(test)]
mod tests {
    use netlink_packet_core::Emitable as _;
    use netlink_packet_route::route::RouteHeader;

    use super::*;

    #[test]
    fn macs_parse_and_format() {
        let mac = [0x66, 0xc5, 0xca, 0xb3, 0x7b, 0xf4];
        assert_eq!(parse_mac("66:c5:ca:b3:7b:f4").unwrap(), mac);
        assert_eq!(format_mac(mac), "66:c5:ca:b3:7b:f4");
        assert_eq!(format_mac([0, 1, 2, 3, 4, 0xa]), "00:01:02:03:04:0a");
        assert!(parse_mac("66:c5:ca:b3:7b").is_err());
        assert!(parse_mac("66:c5:ca:b3:7b:f4:00").is_err());
        assert!(parse_mac("zz:c5:ca:b3:7b:f4").is_err());
    }

    #[test]
    fn veth_link_message_reads() {
        let mut msg = LinkMessage::default();
        msg.header.index = 5;
        msg.attributes = vec![
            LinkAttribute::IfName("tnxh".into()),
            LinkAttribute::Address(vec![0xde, 0x08, 0x88, 0x2d, 0x26, 0x35]),
            LinkAttribute::Link(2),
            LinkAttribute::LinkNetNsId(0),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]),
        ];
        let l = Link::from(msg);
        assert_eq!(l.ifindex, 5);
        assert_eq!(l.name, "tnxh");
        assert!(l.veth);
        assert_eq!(l.peer_ifindex, Some(2));
        assert_eq!(l.peer_netnsid, Some(0));
        assert_eq!(l.mac, [0xde, 0x08, 0x88, 0x2d, 0x26, 0x35]);
    }

    #[test]
    fn plain_link_message_reads() {
        let mut msg = LinkMessage::default();
        msg.header.index = 1;
        msg.attributes = vec![
            LinkAttribute::IfName("tun0".into()),
            // A point-to-point device has no six-byte address.
            LinkAttribute::Address(vec![]),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Tun)]),
        ];
        let l = Link::from(msg);
        assert!(!l.veth);
        assert_eq!(l.mac, [0; 6]);
        assert_eq!((l.peer_ifindex, l.peer_netnsid), (None, None));
    }

    fn route(kind: RouteType, attrs: Vec<RouteAttribute>) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header = RouteHeader {
            kind,
            ..Default::default()
        };
        msg.attributes = attrs;
        msg
    }

    #[test]
    fn route_answers_read() {
        let addr = Ipv4Addr::new(198, 18, 0, 10);
        let gw = Ipv4Addr::new(198, 18, 0, 1);
        let direct = route(RouteType::Unicast, vec![RouteAttribute::Oif(7)]);
        assert_eq!(
            route_from_message(addr, &direct).unwrap(),
            Route {
                ifindex: 7,
                gateway: None
            }
        );
        let routed = route(
            RouteType::Unicast,
            vec![
                RouteAttribute::Gateway(RouteAddress::Inet(gw)),
                RouteAttribute::Oif(3),
            ],
        );
        assert_eq!(route_from_message(addr, &routed).unwrap().gateway, Some(gw));
        let local = route(RouteType::Local, vec![RouteAttribute::Oif(1)]);
        assert!(matches!(
            route_from_message(addr, &local),
            Err(HostError::LocalAddress(a)) if a == addr
        ));
        let nowhere = route(RouteType::Unicast, vec![]);
        assert!(matches!(
            route_from_message(addr, &nowhere),
            Err(HostError::NoRoute(_))
        ));
    }

    #[test]
    fn route_request_names_one_destination() {
        let msg = route_get_message(Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(msg.header.address_family, AddressFamily::Inet);
        assert_eq!(msg.header.destination_prefix_length, 32);
        assert_eq!(
            msg.attributes,
            vec![RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::new(198, 18, 0, 10)
            ))]
        );
    }

    /// What `ip neigh replace 198.18.200.2 dev DEV managed` sends (iproute2
    /// 6.1 under strace): ndmsg with state NUD_NONE, NDA_DST, NDA_FLAGS_EXT.
    #[test]
    fn managed_neighbor_request_bytes() {
        let msg = managed_neighbor_message(Ipv4Addr::new(198, 18, 200, 2), 9);
        let mut buf = vec![0; msg.buffer_len()];
        msg.emit(&mut buf);
        let mut expected = vec![libc::AF_INET as u8, 0, 0, 0];
        expected.extend(9i32.to_ne_bytes());
        expected.extend(0u16.to_ne_bytes()); // ndm_state: NUD_NONE
        expected.extend([0, 0]); // ndm_flags, ndm_type
        expected.extend(8u16.to_ne_bytes());
        expected.extend(1u16.to_ne_bytes()); // NDA_DST
        expected.extend([198, 18, 200, 2]);
        expected.extend(8u16.to_ne_bytes());
        expected.extend(15u16.to_ne_bytes()); // NDA_FLAGS_EXT
        expected.extend(1u32.to_ne_bytes()); // NTF_EXT_MANAGED
        assert_eq!(buf, expected);
    }

    #[test]
    fn only_trusted_neighbors_give_a_mac() {
        let mac = vec![2, 0, 0, 0, 0, 1];
        let entry = |state| {
            let mut msg = neighbor_message(Ipv4Addr::new(198, 18, 0, 1), 4);
            msg.header.state = state;
            msg.attributes
                .push(NeighbourAttribute::LinkLocalAddress(mac.clone()));
            msg
        };
        for state in [
            NeighbourState::Reachable,
            NeighbourState::Stale,
            NeighbourState::Permanent,
        ] {
            assert_eq!(usable_mac(&entry(state)), Some([2, 0, 0, 0, 0, 1]));
        }
        for state in [
            NeighbourState::Incomplete,
            NeighbourState::Failed,
            NeighbourState::None,
        ] {
            assert_eq!(usable_mac(&entry(state)), None);
        }
    }
}
