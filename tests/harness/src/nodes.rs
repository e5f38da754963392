//! Several balancer nodes behind an ECMP router, every host a network
//! namespace (nothing is added to the host's own namespace):
//!
//! ```text
//!  {p}-cl               {p}-rt                       {p}-n{i}                     {p}-sw   {p}-b{j}
//!  eth0 .140.2 ─── eth0 .140.1
//!                  eth{1+i} .141.{4i+1}/30 ─── eth0 .141.{4i+2}/30
//!                                              eth1 .142.{1+i}/24 ─── s{i} ─ br0 ─ b{j} ─── eth0 .142.{10+j}/24
//!                  seg .142.254/24 ──────────────────────────────── r ─┘
//! ```
//!
//! (addresses are in 198.18.0.0/15). The router reaches the VIP
//! ([`NODES_VIP`]) through every node at once (an ECMP route hashing the
//! 5-tuple); each node runs its own `lb run` ([`Node`]) with the backends
//! on the shared segment behind `eth1`; the backends reach the clients
//! through every node at once too, so a reply may come back through
//! another node than its request went through. A node is taken out as a
//! router would see a dead machine ([`EcmpNodes::fail_node`]): its links go
//! down and both ECMP routes leave it out.

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{Backend, FlowKey, ServiceKey, ServiceValue, NO_BACKEND};
use lb_ebpf::flow::{maglev_slot, service_key};

use crate::{
    lb_process::{lb_binary, no_tools_path, Daemon, READY_MARKER},
    netns::Netns,
    ops::{with_pin_path, LbCli, PinDir, READY_TIMEOUT},
    TempDir,
};

/// The VIP the router spreads over the nodes.
pub const NODES_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 143, 1);
/// The client's address.
pub const NODES_CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 140, 2);
/// The router's address on the backends' segment.
const ROUTER_SEGMENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 142, 254);
/// The clients' network, which the backends route through the nodes.
const CLIENT_NET: &str = "198.18.140.0/24";
/// The most nodes and backends a topology can have.
pub const MAX_NODES: usize = 4;
/// The most backends.
pub const MAX_NODE_BACKENDS: usize = 8;

/// Node `i`'s address towards the router.
fn node_uplink(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 141, (4 * i + 2) as u8)
}

/// The router's address towards node `i`.
fn router_downlink(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 141, (4 * i + 1) as u8)
}

/// Node `i`'s address on the backends' segment.
pub fn node_segment_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 142, (1 + i) as u8)
}

/// Backend `j`'s address.
pub fn node_backend_addr(j: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 142, (10 + j) as u8)
}

/// The ECMP topology (see the [module docs](self)). Dropping it deletes
/// every namespace, and with them every link; drop servers and daemons
/// first.
#[derive(Debug)]
pub struct EcmpNodes {
    /// Which nodes the routes go through.
    up: Mutex<Vec<bool>>,
    /// The clients' namespace.
    pub client: Netns,
    /// The router's.
    pub router: Netns,
    /// The balancer nodes', `{p}-n{i}`.
    pub nodes: Vec<Netns>,
    /// The backends', `{p}-b{j}`.
    pub backends: Vec<Netns>,
    /// The segment's switch (a bridge).
    pub switch: Netns,
}

impl EcmpNodes {
    /// Builds the topology with prefix `prefix` (namespace names start with
    /// it), `nodes` balancer nodes and `backends` backends. Panics if
    /// anything fails (the namespaces made so far are deleted).
    pub fn new(prefix: &str, nodes: usize, backends: usize) -> EcmpNodes {
        assert!((2..=MAX_NODES).contains(&nodes), "2 to {MAX_NODES} nodes");
        assert!(
            (1..=MAX_NODE_BACKENDS).contains(&backends),
            "1 to {MAX_NODE_BACKENDS} backends"
        );
        let ns = |suffix: String| Netns::new(&format!("{prefix}-{suffix}"));
        let topo = EcmpNodes {
            up: Mutex::new(vec![true; nodes]),
            client: ns("cl".into()),
            router: ns("rt".into()),
            nodes: (0..nodes).map(|i| ns(format!("n{i}"))).collect(),
            backends: (0..backends).map(|j| ns(format!("b{j}"))).collect(),
            switch: ns("sw".into()),
        };
        topo.wire();
        topo
    }

    fn wire(&self) {
        let (rt, sw) = (&self.router, &self.switch);
        for ns in self.all() {
            ns.ip(&["link", "set", "lo", "up"]);
        }
        // Client and router.
        veth(rt, "eth0", &self.client, "eth0");
        up_with(&self.client, "eth0", &format!("{NODES_CLIENT}/24"));
        self.client
            .ip(&["route", "add", "default", "via", "198.18.140.1"]);
        up_with(rt, "eth0", "198.18.140.1/24");
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            // Spread by the whole 5-tuple, as routers in front of
            // balancers do, not by addresses alone.
            ("net.ipv4.fib_multipath_hash_policy", "1"),
            ("net.ipv4.conf.all.ignore_routes_with_linkdown", "1"),
        ] {
            rt.exec_ok(&["sysctl", "-qw", &format!("{key}={value}")]);
        }
        // The segment's bridge.
        sw.ip(&["link", "add", "br0", "type", "bridge"]);
        sw.ip(&["link", "set", "br0", "up"]);
        // Nodes: uplink to the router, downlink to the segment.
        for (i, node) in self.nodes.iter().enumerate() {
            let uplink = format!("eth{}", i + 1);
            veth(rt, &uplink, node, "eth0");
            up_with(rt, &uplink, &format!("{}/30", router_downlink(i)));
            up_with(node, "eth0", &format!("{}/30", node_uplink(i)));
            bridge_port(sw, &format!("s{i}"), node, "eth1");
            up_with(node, "eth1", &format!("{}/24", node_segment_addr(i)));
            node.ip(&[
                "route",
                "add",
                "default",
                "via",
                &router_downlink(i).to_string(),
            ]);
            // Forwarding on: the FIB routes replies no flow entry holds.
            node.exec_ok(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        }
        // The router's own leg on the segment: the way back to the clients
        // that skips the nodes, for direct server return.
        bridge_port(sw, "r", rt, "seg");
        up_with(rt, "seg", &format!("{ROUTER_SEGMENT_ADDR}/24"));
        for (j, backend) in self.backends.iter().enumerate() {
            bridge_port(sw, &format!("b{j}"), backend, "eth0");
            up_with(backend, "eth0", &format!("{}/24", node_backend_addr(j)));
            backend.exec_ok(&["sysctl", "-qw", "net.ipv4.fib_multipath_hash_policy=1"]);
        }
        self.route_over_live_nodes();
    }

    fn all(&self) -> impl Iterator<Item = &Netns> {
        [&self.client, &self.router, &self.switch]
            .into_iter()
            .chain(&self.nodes)
            .chain(&self.backends)
    }

    /// Points the router's route to the VIP and the backends' route to the
    /// clients at every node that is up (what a routing protocol would
    /// converge to).
    fn route_over_live_nodes(&self) {
        let live: Vec<usize> = {
            let up = self.up.lock().unwrap_or_else(PoisonError::into_inner);
            (0..self.nodes.len()).filter(|&i| up[i]).collect()
        };
        assert!(!live.is_empty(), "at least one node stays up");
        let mut vip_route = vec![
            "route".to_owned(),
            "replace".to_owned(),
            format!("{NODES_VIP}/32"),
        ];
        let mut client_route = vec![
            "route".to_owned(),
            "replace".to_owned(),
            CLIENT_NET.to_owned(),
        ];
        for &i in &live {
            vip_route.extend([
                "nexthop".into(),
                "via".into(),
                node_uplink(i).to_string(),
                "dev".into(),
                format!("eth{}", i + 1),
            ]);
            client_route.extend([
                "nexthop".into(),
                "via".into(),
                node_segment_addr(i).to_string(),
                "dev".into(),
                "eth0".into(),
            ]);
        }
        self.router.ip(&as_strs(&vip_route));
        for b in &self.backends {
            b.ip(&as_strs(&client_route));
        }
    }

    /// Routes the backends' replies to the clients straight through the
    /// router, past every node, as direct server return has them go.
    pub fn replies_past_the_nodes(&self) {
        for b in &self.backends {
            b.ip(&[
                "route",
                "replace",
                CLIENT_NET,
                "via",
                &ROUTER_SEGMENT_ADDR.to_string(),
            ]);
        }
    }

    /// Takes node `i` out as a dead machine: its links go down, and the
    /// router and the backends stop routing through it.
    pub fn fail_node(&self, i: usize) {
        self.up.lock().unwrap_or_else(PoisonError::into_inner)[i] = false;
        self.nodes[i].ip(&["link", "set", "eth0", "down"]);
        self.nodes[i].ip(&["link", "set", "eth1", "down"]);
        self.route_over_live_nodes();
    }

    /// Brings node `i` back: links up, routed through again.
    pub fn restore_node(&self, i: usize) {
        self.nodes[i].ip(&["link", "set", "eth0", "up"]);
        self.nodes[i].ip(&["link", "set", "eth1", "up"]);
        self.nodes[i].ip(&[
            "route",
            "replace",
            "default",
            "via",
            &router_downlink(i).to_string(),
        ]);
        self.up.lock().unwrap_or_else(PoisonError::into_inner)[i] = true;
        self.route_over_live_nodes();
    }
}

/// Links `a`'s interface `a_if` and `b`'s `b_if` with a veth pair.
fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ]);
}

/// Gives `ns`'s interface `ifname` the address `cidr` and brings it up.
fn up_with(ns: &Netns, ifname: &str, cidr: &str) {
    ns.ip(&["addr", "add", cidr, "dev", ifname]);
    ns.ip(&["link", "set", ifname, "up"]);
}

/// Plugs `peer`'s new interface `peer_if` into the switch's bridge as port
/// `port`.
fn bridge_port(sw: &Netns, port: &str, peer: &Netns, peer_if: &str) {
    veth(sw, port, peer, peer_if);
    sw.ip(&["link", "set", port, "master", "br0", "up"]);
}

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// The `ip` binary (`lb` itself runs with an empty `PATH`).
fn ip_binary() -> PathBuf {
    ["/usr/sbin/ip", "/usr/bin/ip", "/sbin/ip", "/bin/ip"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("iproute2's ip is installed")
}

/// One balancer node's daemon files: config, state, socket and pins
/// (`/sys/fs/bpf/lb-e2e-{tag}`). Dropped after its daemon.
#[derive(Debug)]
pub struct Node {
    /// The node's pins; dropped first of the files.
    pub pins: PinDir,
    /// Its namespace's name.
    pub netns: String,
    /// Config file.
    pub config: PathBuf,
    /// State file.
    pub state: PathBuf,
    /// Admin socket.
    pub socket: PathBuf,
    _dir: TempDir,
}

impl Node {
    /// The files of a daemon for namespace `netns`, with `config` (the
    /// pin path is set here).
    pub fn new(tag: &str, netns: &Netns, config: &str) -> Node {
        let pins = PinDir::new(&format!("/sys/fs/bpf/lb-e2e-{tag}"));
        let dir = TempDir::new(&format!("node-{tag}"));
        let path = dir.write("lb.toml", &with_pin_path(config, pins.as_str()));
        Node {
            pins,
            netns: netns.name().to_owned(),
            state: dir.path().join("lb.state.json"),
            socket: dir.path().join("lb.sock"),
            config: path,
            _dir: dir,
        }
    }

    /// Starts `lb run` in the node's namespace as an operator would,
    /// `ip netns exec NS lb run …`, and waits until it is ready.
    pub fn start(&self) -> Daemon {
        let s = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
        let lb = s(&lb_binary());
        let (config, state, socket) = (s(&self.config), s(&self.state), s(&self.socket));
        let path = s(&no_tools_path());
        Daemon::start_program(
            &ip_binary(),
            &[
                "netns",
                "exec",
                &self.netns,
                &lb,
                "run",
                "--config",
                &config,
                "--state",
                &state,
                "--socket",
                &socket,
            ],
            &[("PATH", &path)],
            READY_MARKER,
            READY_TIMEOUT,
        )
    }

    /// The admin CLI of this node.
    pub fn cli(&self) -> LbCli {
        LbCli::new(&self.socket)
    }

    /// This node's data path as pinned, read directly.
    pub fn pinned(&self) -> PinnedTables {
        PinnedTables::open(self.pins.path())
    }
}

/// A node's services, backends and Maglev tables, read from its pins: what
/// its data path picks for a new flow, without sending a packet.
pub struct PinnedTables {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, u32>,
}

impl PinnedTables {
    /// Opens the maps pinned under `root` (its one layout directory).
    pub fn open(root: &Path) -> PinnedTables {
        let dirs: Vec<PathBuf> = std::fs::read_dir(root)
            .unwrap_or_else(|e| panic!("{}: {e}", root.display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir())
            .collect();
        assert_eq!(
            dirs.len(),
            1,
            "one layout directory under {}",
            root.display()
        );
        let map = |name: &str| {
            let path = dirs[0].join(name);
            let data =
                MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            Map::from_map_data(data).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        };
        PinnedTables {
            services: map("LB_SERVICES").try_into().expect("a hash map"),
            backends: map("LB_BACKENDS").try_into().expect("an array"),
            maglev: map("LB_MAGLEV").try_into().expect("an array"),
        }
    }

    /// Service `key`'s whole active Maglev table, each slot as the backend
    /// (address, port) it names (`None`: empty): ids are each node's own,
    /// the backends they name must be the same on every node.
    pub fn table(&self, key: &ServiceKey) -> Vec<Option<(Ipv4Addr, u16)>> {
        let svc = self
            .services
            .get(key, 0)
            .unwrap_or_else(|e| panic!("no service {key:?}: {e}"));
        (svc.table_base..svc.table_base + svc.table_size)
            .map(|slot| {
                let id = self.maglev.get(&slot, 0).expect("a slot of the table");
                (id != NO_BACKEND).then(|| self.backend(id)).flatten()
            })
            .collect()
    }

    fn backend(&self, id: u32) -> Option<(Ipv4Addr, u16)> {
        let b = self.backends.get(&id, 0).ok()?;
        Some((Ipv4Addr::from(b.addr.to_ne_bytes()), u16::from_be(b.port)))
    }

    /// The backend (address, port) a new flow `key` goes to, as the data
    /// path picks it from the Maglev table; `None` for no service or an
    /// empty slot.
    pub fn choice(&self, key: &FlowKey) -> Option<(Ipv4Addr, u16)> {
        let svc = self.services.get(&service_key(key), 0).ok()?;
        let slot = maglev_slot(key, &svc)?;
        let id = self.maglev.get(&slot, 0).ok()?;
        if id == NO_BACKEND {
            return None;
        }
        self.backend(id)
    }
}
