//! The test topology: a client namespace and N backend namespaces, each
//! joined to the host by a veth pair, plus the VIP on the host's `lo`.
//!
//! ```text
//!  netns {p}-c                host                     netns {p}-b{i}
//!  eth0 198.18.100.2/24 ── {p}c0   198.18.100.1/24
//!                            lo     198.18.101.1/32 (VIP)
//!                            {p}b{i} 198.18.{103+i}.1/24 ── eth0 198.18.{103+i}.2/24
//! ```
//!
//! The client side is left exactly as a fresh veth comes up (no ethtool, no
//! offload change, nothing attached): the load balancer must work with
//! whatever a real client-facing interface looks like. The backends are left
//! bare too: the daemon under test configures what it needs itself.

use std::{
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use crate::{
    cmd::{run, run_ok, stderr_of},
    lock::HostLock,
    netns::{list_netns, Netns},
};

/// The service address every topology puts on the host's `lo`.
pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 101, 1);
/// The client's address (its namespace's `eth0`).
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
/// The host's address on the client-facing veth, the client's gateway.
pub const CLIENT_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// The most backends a topology can have.
pub const MAX_BACKENDS: usize = 100;
/// The longest topology prefix (interface names must fit IFNAMSIZ).
pub const MAX_PREFIX_LEN: usize = 5;

/// How long [`Topology::new`] waits for another topology (in this or another
/// process) to be dropped: they share the same addresses.
const LOCK_WAIT: Duration = Duration::from_secs(300);
/// The file whose `flock` serializes topologies on this host.
const LOCK_PATH: &str = "/run/lb-tests-topology.lock";
/// The alias (`ip link set dev X alias`) of every host-side link a topology
/// makes: how a later run tells leftovers of a crashed run from links made by
/// someone else (which it never deletes).
pub const LINK_ALIAS: &str = "lb-tests harness";
/// The label of the VIP address on `lo`, for the same purpose.
pub const VIP_LABEL: &str = "lo:lbtests";

/// A client namespace and `backends` backend namespaces wired to the host
/// (see the [module docs](self) for names and addresses). Dropping it removes
/// every namespace, veth and address it created.
///
/// Only one topology exists on a host at a time (they share addresses):
/// [`Topology::new`] waits (bounded) for another one, in any process, to be
/// dropped.
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    backend_count: usize,
    vip_added: bool,
    /// The client namespace, `{prefix}-c`.
    pub client: Netns,
    /// The backend namespaces, `{prefix}-b{i}`.
    pub backends: Vec<Netns>,
    /// Held (and so dropped) last: serializes topologies on this host.
    _lock: HostLock,
}

impl Topology {
    /// Builds the topology with a short unique `prefix` (1 to 5 ASCII
    /// letters/digits, e.g. `"lbe1"`) and `backends` backend namespaces,
    /// deleting stale objects of a crashed run with the same names first.
    ///
    /// Panics (after undoing what it did) if anything fails.
    pub fn new(prefix: &str, backends: usize) -> Topology {
        assert!(
            !prefix.is_empty()
                && prefix.len() <= MAX_PREFIX_LEN
                && prefix
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "topology prefix {prefix:?} must be 1 to {MAX_PREFIX_LEN} lowercase letters or digits"
        );
        assert!(
            backends <= MAX_BACKENDS,
            "at most {MAX_BACKENDS} backends, not {backends}"
        );
        let lock = HostLock::acquire(LOCK_PATH, LOCK_WAIT, "another topology");
        remove_stale(prefix, backends);

        let client = Netns::new(&format!("{prefix}-c"));
        let mut topo = Topology {
            prefix: prefix.to_owned(),
            backend_count: backends,
            vip_added: false,
            client,
            backends: Vec::with_capacity(backends),
            _lock: lock,
        };

        let host_if = topo.client_host_if();
        link_veth(&topo.client, &host_if, CLIENT_HOST_ADDR, CLIENT_ADDR);
        for i in 0..backends {
            let ns = Netns::new(&format!("{prefix}-b{i}"));
            topo.backends.push(ns);
            link_veth(
                &topo.backends[i],
                &topo.backend_host_if(i),
                topo.backend_host_addr(i),
                topo.backend_addr(i),
            );
        }

        let vip = format!("{VIP}/32");
        let out = run(
            "ip",
            &["addr", "add", &vip, "dev", "lo", "label", VIP_LABEL],
        );
        if out.status.success() {
            topo.vip_added = true;
        } else {
            let err = stderr_of(&out);
            if !(err.contains("exists") || err.contains("already assigned")) {
                panic!("adding {vip} to lo: {err}");
            }
            // Someone else's VIP (a crashed run's, labelled, was removed by
            // `remove_stale`): use it, and leave it in place when dropped.
            eprintln!("note: {vip} is already on lo, not added by this harness: using it, will not remove it");
        }

        let mut host_ifs = vec![topo.client_host_if()];
        host_ifs.extend((0..backends).map(|i| topo.backend_host_if(i)));
        for ifname in &host_ifs {
            wait_oper_up(ifname, Duration::from_secs(5));
        }
        topo
    }

    /// The prefix the topology was built with.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The host side of the client's veth, `{prefix}c0`: where clients'
    /// packets arrive (the daemon's `external` interface).
    pub fn client_host_if(&self) -> String {
        format!("{}c0", self.prefix)
    }

    /// The client's address, 198.18.100.2.
    pub fn client_addr(&self) -> Ipv4Addr {
        CLIENT_ADDR
    }

    /// The host's address on the client veth, 198.18.100.1.
    pub fn client_host_addr(&self) -> Ipv4Addr {
        CLIENT_HOST_ADDR
    }

    /// The VIP, 198.18.101.1 (on the host's `lo`).
    pub fn vip(&self) -> Ipv4Addr {
        VIP
    }

    /// How many backends the topology has.
    pub fn backend_count(&self) -> usize {
        self.backend_count
    }

    /// The host side of backend `i`'s veth, `{prefix}b{i}`.
    pub fn backend_host_if(&self, i: usize) -> String {
        format!("{}b{i}", self.prefix)
    }

    /// Backend `i`'s address, 198.18.{103+i}.2.
    pub fn backend_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.backend_octet(i), 2)
    }

    /// The host's address on backend `i`'s veth (its gateway), 198.18.{103+i}.1.
    pub fn backend_host_addr(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.backend_octet(i), 1)
    }

    /// `"ip:port"` of every backend, in index order (config file syntax).
    pub fn backend_endpoints(&self, port: u16) -> Vec<String> {
        (0..self.backend_count)
            .map(|i| format!("{}:{port}", self.backend_addr(i)))
            .collect()
    }

    /// Deletes the client's veth (both ends) and makes a new one with the
    /// same names and addresses, as when a container's interface is
    /// replaced: a new interface index behind the same name.
    pub fn replace_client_link(&self) {
        let host_if = self.client_host_if();
        run_ok("ip", &["link", "del", &host_if]);
        link_veth(&self.client, &host_if, CLIENT_HOST_ADDR, CLIENT_ADDR);
        wait_oper_up(&host_if, Duration::from_secs(5));
    }

    /// Like [`Topology::replace_client_link`] for backend `i`'s veth.
    pub fn replace_backend_link(&self, i: usize) {
        let host_if = self.backend_host_if(i);
        run_ok("ip", &["link", "del", &host_if]);
        link_veth(
            &self.backends[i],
            &host_if,
            self.backend_host_addr(i),
            self.backend_addr(i),
        );
        wait_oper_up(&host_if, Duration::from_secs(5));
    }

    /// Deletes backend `i`'s namespace (`ip netns del`), which takes its
    /// veth with it once nothing uses the namespace any more (stop its
    /// servers first), and waits (bounded) until the host side is gone.
    /// Panics if it stays.
    pub fn remove_backend_netns(&self, i: usize) {
        run_ok("ip", &["netns", "del", self.backends[i].name()]);
        let host_if = self.backend_host_if(i);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::path::Path::new("/sys/class/net")
            .join(&host_if)
            .exists()
        {
            assert!(
                Instant::now() < deadline,
                "{host_if} still exists 10 s after its peer's namespace was deleted \
                 (is a process or socket still in it?)"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Panics unless the client's `eth0` is still as a fresh veth comes up:
    /// GRO off (`ethtool -k`), no XDP program (`ip link show`), and no
    /// `clsact`/`ingress` qdisc (`tc qdisc show`).
    pub fn assert_client_side_pristine(&self) {
        let features = self.client.exec_ok(&["ethtool", "-k", "eth0"]);
        assert!(
            features
                .lines()
                .any(|l| l.trim() == "generic-receive-offload: off"),
            "client eth0 was changed: GRO is not off:\n{features}"
        );
        let link = self.client.ip(&["link", "show", "eth0"]);
        assert!(
            !link.contains("xdp"),
            "client eth0 has an XDP program:\n{link}"
        );
        let qdiscs = self.client.exec_ok(&["tc", "qdisc", "show", "dev", "eth0"]);
        assert!(
            !qdiscs.contains("clsact") && !qdiscs.contains("ingress"),
            "client eth0 has a clsact/ingress qdisc:\n{qdiscs}"
        );
    }

    fn backend_octet(&self, i: usize) -> u8 {
        assert!(
            i < self.backend_count,
            "no backend {i} (topology has {})",
            self.backend_count
        );
        u8::try_from(103 + i).expect("backend index within MAX_BACKENDS")
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut links = vec![self.client_host_if()];
        links.extend((0..self.backend_count).map(|i| format!("{}b{i}", self.prefix)));
        for link in &links {
            let out = run("ip", &["link", "del", link]);
            let err = stderr_of(&out);
            if !out.status.success() && !err.contains("Cannot find device") {
                eprintln!("warning: `ip link del {link}`: {err}");
            }
        }
        if self.vip_added {
            let _ = run("ip", &["addr", "del", &format!("{VIP}/32"), "dev", "lo"]);
        }
        // Fields drop next: the namespaces (`ip netns del`), then the lock.
    }
}

/// Creates veth `host_if` in the host with its peer `eth0` directly in `ns`
/// (so it never clashes with the host's own eth0), addresses both /24 sides,
/// brings them and the namespace's `lo` up, and routes the namespace's
/// default via the host.
fn link_veth(ns: &Netns, host_if: &str, host_addr: Ipv4Addr, ns_addr: Ipv4Addr) {
    run_ok(
        "ip",
        &[
            "link",
            "add",
            host_if,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            ns.name(),
        ],
    );
    run_ok("ip", &["link", "set", "dev", host_if, "alias", LINK_ALIAS]);
    run_ok(
        "ip",
        &["addr", "add", &format!("{host_addr}/24"), "dev", host_if],
    );
    run_ok("ip", &["link", "set", host_if, "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    ns.ip(&["addr", "add", &format!("{ns_addr}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["route", "add", "default", "via", &host_addr.to_string()]);
}

/// Waits (bounded) until `ifname`'s operstate is `up`, panicking otherwise.
fn wait_oper_up(ifname: &str, limit: Duration) {
    let path = format!("/sys/class/net/{ifname}/operstate");
    let deadline = Instant::now() + limit;
    loop {
        let state = std::fs::read_to_string(&path).unwrap_or_default();
        if state.trim() == "up" {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{ifname} is not up after {limit:?} (operstate {:?})",
                state.trim()
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `name` is a backend-side name: `{prefix}{sep}{digits}`.
fn is_indexed(name: &str, prefix: &str, sep: &str) -> bool {
    name.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix(sep))
        .is_some_and(|digits| !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
}

/// Host interface names, as `ip -o link show` lists them (without `@peer`).
pub fn host_links() -> Vec<String> {
    let out = run("ip", &["-o", "link", "show"]);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|n| {
            n.trim_end_matches(':')
                .split('@')
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .filter(|n| !n.is_empty())
        .collect()
}

/// Whether host link `ifname` carries [`LINK_ALIAS`], i.e. was made by a
/// topology.
fn is_harness_link(ifname: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{ifname}/ifalias"))
        .is_ok_and(|alias| alias.trim() == LINK_ALIAS)
}

/// Deletes what a crashed run may have left (called with the host lock held,
/// so no live topology exists): namespaces and host links with this prefix's
/// names, links of any prefix marked with [`LINK_ALIAS`] that hold one of the
/// subnets this topology is about to use, and a VIP labelled [`VIP_LABEL`].
///
/// Panics, touching nothing else, if such a subnet is held by an interface
/// that the harness did not make (someone else's setup on this host).
fn remove_stale(prefix: &str, backends: usize) {
    for ns in list_netns() {
        if ns == format!("{prefix}-c") || is_indexed(&ns, &format!("{prefix}-"), "b") {
            eprintln!("removing stale namespace {ns}");
            let _ = run("ip", &["netns", "del", &ns]);
        }
    }
    for link in host_links() {
        if link == format!("{prefix}c0") || is_indexed(&link, prefix, "b") {
            eprintln!("removing stale link {link}");
            let _ = run("ip", &["link", "del", &link]);
        }
    }

    let mut subnets = vec![[198u8, 18, 100]];
    subnets.extend((0..backends).map(|i| [198, 18, 103 + i as u8]));
    let out = run("ip", &["-o", "-4", "addr", "show"]);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (Some(ifname), Some(cidr)) = (fields.get(1), fields.get(3)) else {
            continue;
        };
        let Some(Ok(addr)) = cidr.split('/').next().map(str::parse::<Ipv4Addr>) else {
            continue;
        };
        if *ifname == "lo" {
            if addr == VIP && line.contains(VIP_LABEL) {
                eprintln!("removing stale VIP {cidr} from lo");
                let _ = run("ip", &["addr", "del", cidr, "dev", "lo"]);
            }
            continue;
        }
        let o = addr.octets();
        if !subnets.contains(&[o[0], o[1], o[2]]) {
            continue;
        }
        if is_harness_link(ifname) {
            eprintln!("removing stale link {ifname} (holds {cidr}, needed by topology {prefix})");
            let _ = run("ip", &["link", "del", ifname]);
        } else {
            panic!(
                "{cidr} is on {ifname}, which this harness did not create (someone else's setup?); \
                 topology {prefix} needs that subnet: remove {ifname} or wait until it is gone"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_indexed("lbe1b12", "lbe1", "b"));
        assert!(!is_indexed("lbe1b", "lbe1", "b"));
        assert!(!is_indexed("lbe1bx", "lbe1", "b"));
        assert!(is_indexed("lbe1-b0", "lbe1-", "b"));
        assert!(!is_indexed("lbe1-b0", "lbe", "b"));
    }
}
