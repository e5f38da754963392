//! Cluster mode against a real etcd (`lb_harness::etcd`, Debian's
//! etcd-server) in the router's namespace of an ECMP topology
//! (`lb_harness::nodes`), each node an `lb run` in its own namespace with
//! `[cluster]` pointing at it.
//!
//! Needs root.

use std::{
    thread,
    time::{Duration, Instant},
};

use lb::cluster::keys::NodeRecord;
use lb_harness::{
    etcd::Etcd,
    nodes::{EcmpNodes, Node, NODES_VIP},
    require_root,
};

/// The nodes' lease TTL: short, so a dead node's keys go quickly.
const TTL_SECS: u64 = 3;
/// etcd's address: the router's, which every node routes to.
const ETCD_ADDR: std::net::Ipv4Addr = std::net::Ipv4Addr::new(198, 18, 140, 1);

/// Node `name`'s config: service `web` on the VIP with no backends of its
/// own, in cluster mode through `etcd`.
fn config(name: &str, etcd: &Etcd) -> String {
    format!(
        "[datapath]\nexternal = [\"eth0\"]\nmax_services = 4\nmax_backends = 16\n\
         flow_table_size = 65536\n\n[docker]\nenabled = false\n\n\
         [[service]]\nname = \"web\"\nvip = \"{NODES_VIP}:80\"\nprotocol = \"tcp\"\n\n\
         [cluster]\netcd = [\"{}\"]\nnode = \"{name}\"\nlease_ttl_secs = {TTL_SECS}\n",
        etcd.url()
    )
}

/// Waits up to `within` for `check` to hold; how long it took.
fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Node `name`'s record in etcd, if it is there.
fn record(etcd: &Etcd, name: &str) -> Option<NodeRecord> {
    etcd.get_prefix(&format!("/lb/nodes/{name}/node"))
        .first()
        .map(|(_, v)| NodeRecord::decode(v.as_bytes()).expect("lb's own record"))
}

#[test]
fn a_node_holds_a_lease_while_it_runs_revokes_it_on_stop_and_loses_it_when_killed() {
    require_root();
    let topo = EcmpNodes::new("lbc", 2, 1);
    let etcd = Etcd::start(&topo.router, ETCD_ADDR);
    let a = Node::new("lbca", &topo.nodes[0], &config("a", &etcd));
    let b = Node::new("lbcb", &topo.nodes[1], &config("b", &etcd));
    let mut da = a.start();
    let db = b.start();
    wait_until(
        Duration::from_secs(5),
        "both nodes' records in etcd",
        || record(&etcd, "a").is_some() && record(&etcd, "b").is_some(),
    );
    let (ra, rb) = (record(&etcd, "a").unwrap(), record(&etcd, "b").unwrap());
    assert_ne!(ra.lease, rb.lease, "each node has a lease of its own");
    let leases: Vec<String> = etcd.leases().iter().map(|l| format!("{l:x}")).collect();
    assert!(
        leases.contains(&ra.lease) && leases.contains(&rb.lease),
        "etcd's leases {leases:?} lack the nodes' {} and {}",
        ra.lease,
        rb.lease
    );

    // Kept alive: still there well past the TTL.
    thread::sleep(Duration::from_secs(TTL_SECS + 2));
    assert_eq!(
        record(&etcd, "a"),
        Some(ra.clone()),
        "a's record after {}",
        TTL_SECS + 2
    );

    // A clean stop revokes b's lease: its record is gone as it exits.
    let status = db.stop();
    assert!(status.success(), "node b exited with {status}");
    assert_eq!(record(&etcd, "b"), None, "b's record after a clean stop");
    assert!(
        !etcd.leases().iter().any(|l| format!("{l:x}") == rb.lease),
        "b's lease outlived its clean stop"
    );

    // SIGKILL: nothing revokes a's lease; it expires within the TTL + 1 s.
    da.kill();
    let killed = Instant::now();
    wait_until(
        Duration::from_secs(TTL_SECS + 1),
        "a's record leaving etcd after SIGKILL",
        || record(&etcd, "a").is_none(),
    );
    assert!(
        killed.elapsed() >= Duration::from_secs(1),
        "a's record went in {:?}: before its lease could expire",
        killed.elapsed()
    );
    drop(da);
}
