//! What the daemon needs to know about this host's network, and the one thing
//! it changes on a backend's side: interfaces, routes, neighbours, veth peers
//! and their GRO setting.
//!
//! Read through iproute2's JSON output (`ip -j`), ethtool and nsenter, the
//! tools an operator would use by hand to check the same facts.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use tokio::process::Command;

/// Errors of host queries and changes.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A tool could not be started (is iproute2/ethtool installed?).
    #[error("running {cmd}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// What went wrong.
        #[source]
        source: std::io::Error,
    },
    /// A tool exited non-zero.
    #[error("{cmd}: {stderr}")]
    Failed {
        /// The command line.
        cmd: String,
        /// Its standard error, trimmed.
        stderr: String,
    },
    /// A tool printed something other than the JSON expected.
    #[error("{cmd}: unexpected output")]
    Json {
        /// The command line.
        cmd: String,
        /// What went wrong.
        #[source]
        source: serde_json::Error,
    },
    /// No interface has that name or index.
    #[error("no interface {0}")]
    NoInterface(String),
    /// The kernel has no route to the address.
    #[error("no route to {0}")]
    NoRoute(Ipv4Addr),
    /// The address belongs to this host.
    #[error("{0} is an address of this host; a backend must sit behind an interface")]
    LocalAddress(Ipv4Addr),
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

async fn run(program: &str, args: &[&str]) -> Result<Vec<u8>, HostError> {
    let cmd = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .map_err(|source| HostError::Spawn {
            cmd: cmd.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(HostError::Failed {
            cmd,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

async fn run_json<T: for<'de> Deserialize<'de>>(
    program: &str,
    args: &[&str],
) -> Result<T, HostError> {
    let out = run(program, args).await?;
    // `ip -j` prints nothing at all for an empty answer on some versions.
    let text = if out.iter().all(u8::is_ascii_whitespace) {
        &b"[]"[..]
    } else {
        &out[..]
    };
    serde_json::from_slice(text).map_err(|source| HostError::Json {
        cmd: format!("{program} {}", args.join(" ")),
        source,
    })
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

#[derive(Deserialize)]
struct RawLink {
    ifindex: u32,
    ifname: String,
    address: Option<String>,
    link_index: Option<u32>,
    link_netnsid: Option<i32>,
    linkinfo: Option<RawLinkInfo>,
}

#[derive(Deserialize)]
struct RawLinkInfo {
    info_kind: Option<String>,
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

impl TryFrom<RawLink> for Link {
    type Error = HostError;

    fn try_from(r: RawLink) -> Result<Self, HostError> {
        let mac = match r.address.as_deref() {
            Some(a) if a.split(':').count() == 6 => parse_mac(a)?,
            _ => [0; 6],
        };
        let veth = r
            .linkinfo
            .and_then(|i| i.info_kind)
            .is_some_and(|k| k == "veth");
        Ok(Self {
            ifindex: r.ifindex,
            name: r.ifname,
            mac,
            veth,
            peer_ifindex: r.link_index,
            peer_netnsid: r.link_netnsid,
        })
    }
}

/// Looks an interface up by name.
pub async fn link(name: &str) -> Result<Link, HostError> {
    let links: Vec<RawLink> = match run_json("ip", &["-j", "-d", "link", "show", "dev", name]).await
    {
        Ok(l) => l,
        Err(HostError::Failed { .. }) => return Err(HostError::NoInterface(name.to_owned())),
        Err(e) => return Err(e),
    };
    links
        .into_iter()
        .next()
        .ok_or_else(|| HostError::NoInterface(name.to_owned()))?
        .try_into()
}

/// A route to an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Egress interface.
    pub dev: String,
    /// Next hop, when the address is not on a connected network.
    pub gateway: Option<Ipv4Addr>,
}

#[derive(Deserialize)]
struct RawRoute {
    #[serde(rename = "type")]
    kind: Option<String>,
    dev: Option<String>,
    gateway: Option<Ipv4Addr>,
}

/// Asks the kernel how it would reach `addr`.
pub async fn route_get(addr: Ipv4Addr) -> Result<Route, HostError> {
    let a = addr.to_string();
    let routes: Vec<RawRoute> = match run_json("ip", &["-j", "route", "get", &a]).await {
        Ok(r) => r,
        Err(HostError::Failed { .. }) => return Err(HostError::NoRoute(addr)),
        Err(e) => return Err(e),
    };
    let r = routes.into_iter().next().ok_or(HostError::NoRoute(addr))?;
    if r.kind.as_deref() == Some("local") || r.dev.as_deref() == Some("lo") {
        return Err(HostError::LocalAddress(addr));
    }
    Ok(Route {
        dev: r.dev.ok_or(HostError::NoRoute(addr))?,
        gateway: r.gateway,
    })
}

#[derive(Deserialize)]
struct RawNeigh {
    lladdr: Option<String>,
    #[serde(default)]
    state: Vec<String>,
}

/// The MAC of neighbour `addr` on `dev`, if the kernel has one it trusts.
pub async fn neighbor(addr: Ipv4Addr, dev: &str) -> Result<Option<[u8; 6]>, HostError> {
    let a = addr.to_string();
    let neighs: Vec<RawNeigh> =
        run_json("ip", &["-j", "neigh", "show", "to", &a, "dev", dev]).await?;
    for n in neighs {
        let usable = n.state.iter().any(|s| {
            matches!(
                s.as_str(),
                "REACHABLE" | "STALE" | "DELAY" | "PROBE" | "PERMANENT" | "NOARP"
            )
        });
        if let (true, Some(mac)) = (usable, n.lladdr) {
            return Ok(Some(parse_mac(&mac)?));
        }
    }
    Ok(None)
}

/// Asks the kernel to resolve `addr` on `dev` and keep it resolved (a
/// "managed" neighbour entry, Linux 5.16), so XDP always has a fresh MAC.
pub async fn keep_neighbor_resolved(addr: Ipv4Addr, dev: &str) -> Result<(), HostError> {
    let a = addr.to_string();
    run("ip", &["neigh", "replace", &a, "dev", dev, "managed"]).await?;
    Ok(())
}

/// Finds a namespace file for the namespace with id `nsid` (as seen from
/// here) that holds interface `peer_ifindex` whose own peer is `ifindex`
/// here. Looks at named namespaces (`/run/netns`) first, then at every
/// process's namespace (containers).
pub async fn find_peer_netns(
    ifindex: u32,
    peer_ifindex: u32,
    nsid: i32,
) -> Result<Option<PathBuf>, HostError> {
    #[derive(Deserialize)]
    struct RawNsid {
        nsid: i32,
        name: Option<String>,
    }
    let ids: Vec<RawNsid> = run_json("ip", &["-j", "netns", "list-id"])
        .await
        .unwrap_or_default();
    if let Some(name) = ids
        .into_iter()
        .find(|i| i.nsid == nsid)
        .and_then(|i| i.name)
    {
        return Ok(Some(Path::new("/run/netns").join(name)));
    }
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut seen = HashSet::new();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Ok(None);
    };
    for entry in procs.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let path = entry.path().join("ns/net");
        let Ok(ino) = std::fs::metadata(&path).map(|m| m.ino()) else {
            continue;
        };
        if Some(ino) == own || !seen.insert(ino) {
            continue;
        }
        if let Ok(Some(l)) = link_in_netns(&path, peer_ifindex).await {
            if l.peer_ifindex == Some(ifindex) && l.peer_netnsid.is_some() {
                return Ok(Some(path));
            }
        }
    }
    Ok(None)
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
        mac: mac
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
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

/// The host side (`ifindex`) of a container's veth, read from sysfs: no
/// subprocess, since this is on the path of a container joining a service.
pub fn container_veth(ifindex: u32) -> Result<Link, HostError> {
    let missing = || HostError::NoInterface(format!("with index {ifindex}"));
    let name = nix::net::if_::if_indextoname(ifindex)
        .map_err(|_| missing())?
        .to_string_lossy()
        .into_owned();
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

/// Interface `ifindex` inside the namespace `netns`.
pub async fn link_in_netns(netns: &Path, ifindex: u32) -> Result<Option<Link>, HostError> {
    let ns = format!("--net={}", netns.display());
    let links: Vec<RawLink> = run_json("nsenter", &[&ns, "ip", "-j", "-d", "link", "show"]).await?;
    links
        .into_iter()
        .find(|l| l.ifindex == ifindex)
        .map(Link::try_from)
        .transpose()
}

/// Turns GRO on for `ifname` in `netns` unless it already is. Returns whether
/// it changed anything. A veth only delivers frames that XDP redirected into
/// it when its receiving peer has GRO on (or an XDP program).
pub async fn ensure_gro(netns: &Path, ifname: &str) -> Result<bool, HostError> {
    let ns = format!("--net={}", netns.display());
    let out = run("nsenter", &[&ns, "ethtool", "-k", ifname]).await?;
    let on = String::from_utf8_lossy(&out)
        .lines()
        .any(|l| l.trim() == "generic-receive-offload: on");
    if on {
        return Ok(false);
    }
    run("nsenter", &[&ns, "ethtool", "-K", ifname, "gro", "on"]).await?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("66:c5:ca:b3:7b:f4").unwrap(),
            [0x66, 0xc5, 0xca, 0xb3, 0x7b, 0xf4]
        );
        assert!(parse_mac("66:c5:ca:b3:7b").is_err());
        assert!(parse_mac("66:c5:ca:b3:7b:f4:00").is_err());
        assert!(parse_mac("zz:c5:ca:b3:7b:f4").is_err());
    }

    #[test]
    fn veth_link_json_parses() {
        let raw: Vec<RawLink> = serde_json::from_str(
            r#"[{"ifindex":5,"link_index":2,"ifname":"tnxh","address":"de:08:88:2d:26:35","link_netnsid":0,"linkinfo":{"info_kind":"veth"}}]"#,
        )
        .unwrap();
        let l = Link::try_from(raw.into_iter().next().unwrap()).unwrap();
        assert!(l.veth);
        assert_eq!(l.peer_ifindex, Some(2));
        assert_eq!(l.peer_netnsid, Some(0));
        assert_eq!(l.mac[0], 0xde);
    }
}
