//! Cluster mode against a real etcd (`lb_harness::etcd`, Debian's
//! etcd-server) in the router's namespace of an ECMP topology
//! (`lb_harness::nodes`), each node an `lb run` in its own namespace with
//! `[cluster]` pointing at it.
//!
//! Needs root.

use std::{
    net::SocketAddrV4,
    thread,
    time::{Duration, Instant},
};

use lb::{
    api::types::{BackendInfo, BackendState, Stats},
    cluster::keys::NodeRecord,
};
use lb_harness::{
    etcd::Etcd,
    netns::Netns,
    nodes::{node_backend_addr, EcmpNodes, Node, NODES_VIP},
    require_root,
    stream::{StreamConn, StreamServer},
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

const BACKEND_PORT: u16 = 8080;

fn backend(j: usize) -> String {
    format!("{}:{BACKEND_PORT}", node_backend_addr(j))
}

/// Service `web`'s backends on `node`, each with the node that published
/// it (`None`: its own), in address order.
fn backends(node: &Node) -> Vec<(String, Option<String>, BackendState)> {
    let list: Vec<BackendInfo> = node.cli().json(&["backend", "ls", "web", "--json"]);
    let mut out: Vec<_> = list
        .into_iter()
        .map(|b| (b.address, b.node, b.state))
        .collect();
    out.sort_by(|x, y| x.0.cmp(&y.0));
    out
}

/// `n` new connections from the client to the VIP, each echoing a line;
/// the failures.
fn connections(client: &Netns, n: usize) -> Vec<String> {
    let vip = SocketAddrV4::new(NODES_VIP, 80);
    (0..n)
        .filter_map(|i| {
            StreamConn::connect(client, vip)
                .and_then(|mut c| c.echo(format!("{i}\n").as_bytes()))
                .err()
        })
        .collect()
}

/// New flows node's service `web` took.
fn new_flows(node: &Node) -> u64 {
    let s: Stats = node.cli().json(&["stats", "--json"]);
    s.services
        .iter()
        .find(|svc| svc.name == "web")
        .map_or(0, |svc| svc.counters.new_flows)
}

#[test]
fn backends_added_on_one_node_are_served_by_the_other_and_leave_with_it() {
    require_root();
    let topo = EcmpNodes::new("lbd", 2, 2);
    let servers: Vec<StreamServer> = (0..2)
        .map(|j| StreamServer::start(&topo.backends[j], BACKEND_PORT, &format!("b{j}")))
        .collect();
    let etcd = Etcd::start(&topo.router, ETCD_ADDR);
    let a = Node::new("lbda", &topo.nodes[0], &config("a", &etcd));
    let b = Node::new("lbdb", &topo.nodes[1], &config("b", &etcd));
    let _da = a.start();
    let mut db = b.start();

    // b's API backends: published under b's keys, applied by a.
    b.cli()
        .ok(&["backend", "add", "web", &backend(0), &backend(1)]);
    let b_node = Some("b".to_owned());
    let want = vec![
        (backend(0), b_node.clone(), BackendState::Active),
        (backend(1), b_node.clone(), BackendState::Active),
    ];
    let took = wait_until(Duration::from_secs(2), "b's backends on a", || {
        backends(&a) == want
    });
    eprintln!("b's backends reached a in {took:?}");
    let keys: Vec<String> = etcd
        .get_prefix("/lb/nodes/b/backends/")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys,
        [
            format!("/lb/nodes/b/backends/web/{}", backend(0)),
            format!("/lb/nodes/b/backends/web/{}", backend(1)),
        ]
    );
    assert!(
        backends(&b).iter().all(|(_, node, _)| node.is_none()),
        "b's own backends are its own: {:?}",
        backends(&b)
    );

    // Served through both nodes' VIP: the router spreads over a and b.
    let failed = connections(&topo.client, 64);
    assert!(failed.is_empty(), "{} failed: {:?}", failed.len(), failed);
    assert!(new_flows(&a) > 0, "a took none of 64 connections");

    // A drain on b shows on a.
    b.cli().ok(&["backend", "drain", "web", &backend(1)]);
    wait_until(Duration::from_secs(2), "b's drain on a", || {
        backends(&a)[1].2 == BackendState::Draining
    });
    b.cli().ok(&["backend", "undrain", "web", &backend(1)]);

    // b stops cleanly: its lease is revoked, its backends leave a at once.
    let status = db.stop();
    assert!(status.success(), "b exited with {status}");
    let took = wait_until(Duration::from_secs(1), "b's backends leaving a", || {
        backends(&a).is_empty()
    });
    eprintln!("clean stop: b's backends left a in {took:?}");

    // b comes back (its API backends from its state file) and publishes
    // them again; SIGKILLed, they leave a within the TTL + 1 s.
    db = b.start();
    wait_until(Duration::from_secs(3), "b's backends on a again", || {
        backends(&a) == want
    });
    db.kill();
    let took = wait_until(
        Duration::from_secs(TTL_SECS + 1),
        "b's backends leaving a after SIGKILL",
        || backends(&a).is_empty(),
    );
    eprintln!("SIGKILL: b's backends left a in {took:?}");
    drop(db);
    drop(servers);
}

#[test]
fn both_nodes_keep_serving_while_etcd_is_away_and_catch_up_after() {
    require_root();
    let topo = EcmpNodes::new("lbe", 2, 2);
    let servers: Vec<StreamServer> = (0..2)
        .map(|j| StreamServer::start(&topo.backends[j], BACKEND_PORT, &format!("b{j}")))
        .collect();
    let mut etcd = Etcd::start(&topo.router, ETCD_ADDR);
    let a = Node::new("lbea", &topo.nodes[0], &config("a", &etcd));
    let b = Node::new("lbeb", &topo.nodes[1], &config("b", &etcd));
    let da = a.start();
    let db = b.start();
    b.cli()
        .ok(&["backend", "add", "web", &backend(0), &backend(1)]);
    let b_node = Some("b".to_owned());
    let both = vec![
        (backend(0), b_node.clone(), BackendState::Active),
        (backend(1), b_node.clone(), BackendState::Active),
    ];
    wait_until(Duration::from_secs(2), "b's backends on a", || {
        backends(&a) == both
    });

    // etcd goes away for 10 s: both nodes keep serving with what they
    // knew. Then, still without etcd, b drops a backend. (Requests are
    // not counted after that: while the nodes' tables differ, a reply
    // crossing to the node without the backend cannot get the VIP back.)
    etcd.stop();
    let away = Instant::now();
    let (mut sent, mut failed) = (0, Vec::new());
    while away.elapsed() < Duration::from_secs(8) {
        failed.extend(connections(&topo.client, 8));
        sent += 8;
    }
    assert!(
        failed.is_empty(),
        "{} of {sent} failed while etcd was away: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(sent >= 64, "only {sent} connections in 8 s");
    assert_eq!(backends(&a), both, "a kept what it knew");
    b.cli().ok(&["backend", "rm", "web", &backend(1)]);
    thread::sleep(Duration::from_secs(10).saturating_sub(away.elapsed()));

    // Back: a catches up with b's change.
    etcd.resume();
    let took = wait_until(Duration::from_secs(10), "a catching up", || {
        backends(&a) == vec![(backend(0), b_node.clone(), BackendState::Active)]
    });
    eprintln!("etcd back: a caught up in {took:?}");
    let failed = connections(&topo.client, 32);
    assert!(
        failed.is_empty(),
        "{} failed after: {:?}",
        failed.len(),
        failed
    );
    for (d, name) in [(db, "b"), (da, "a")] {
        let status = d.stop();
        assert!(status.success(), "{name} exited with {status}");
    }
    drop(servers);
}
