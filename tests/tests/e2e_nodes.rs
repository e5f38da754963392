//! Several balancer nodes behind an ECMP router (`lb_harness::nodes`), each
//! node an `lb run` in its own network namespace started with
//! `ip netns exec`, as an operator would: every node picks the same backend
//! for the same flow, a reply comes back through whichever node the
//! backends' route picks, and no held connection breaks when a node dies
//! (SIGKILL, links down, routes withdrawn) or comes back.
//!
//! Needs root.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{
        atomic::{AtomicBool, Ordering},
        Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use lb::api::types::Stats;
use lb_common::{FlowKey, ServiceKey, IPPROTO_TCP};
use lb_harness::{
    netns::Netns,
    nodes::{node_backend_addr, EcmpNodes, Node, NODES_VIP},
    require_root,
    stream::{StreamConn, StreamServer},
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

const BACKENDS: usize = 3;
const BACKEND_PORT: u16 = 8080;
/// Connections held open across a node's death and return.
const HELD: usize = 32;
/// Random client flows whose backend every node must agree on.
const TUPLES: usize = 100_000;
/// The longest the churn of new connections runs (a bound, not a timing).
const CHURN_LIMIT: Duration = Duration::from_secs(60);
/// The most new connections the churn opens.
const CHURN_MAX: usize = 5_000;

fn backend(j: usize) -> String {
    format!("{}:{BACKEND_PORT}", node_backend_addr(j))
}

/// A node's config: service `web` on the VIP over `backends`, in that
/// order (every node gets them in another order).
fn config(backends: &[usize]) -> String {
    let list: Vec<String> = backends
        .iter()
        .map(|&j| format!("\"{}\"", backend(j)))
        .collect();
    service_config(&list, "nat")
}

/// A node's config with service `web` over `backends` (quoted), forwarded
/// by `forwarding`.
fn service_config(backends: &[String], forwarding: &str) -> String {
    format!(
        "[datapath]\nexternal = [\"eth0\"]\nmax_services = 4\nmax_backends = 16\n\
         flow_table_size = 65536\n\n[docker]\nenabled = false\n\n\
         [[service]]\nname = \"web\"\nvip = \"{NODES_VIP}:80\"\nprotocol = \"tcp\"\n\
         forwarding = \"{forwarding}\"\nbackends = [{}]\n",
        backends.join(", ")
    )
}

fn stats(node: &Node) -> Stats {
    node.cli().json(&["stats", "--json"])
}

/// A node's global counter.
fn counter(s: &Stats, name: &str) -> u64 {
    s.global.get(name).copied().unwrap_or_default()
}

/// New flows the node's service `web` took.
fn new_flows(s: &Stats) -> u64 {
    s.services
        .iter()
        .find(|svc| svc.name == "web")
        .map_or(0, |svc| svc.counters.new_flows)
}

/// Random client flows to the VIP, the same ones for every call.
fn tuples() -> Vec<FlowKey> {
    let mut rng = ChaCha8Rng::seed_from_u64(0x6c62_6e6f_6465);
    (0..TUPLES)
        .map(|_| FlowKey {
            src_addr: rng.random::<u32>(),
            dst_addr: u32::from_ne_bytes(NODES_VIP.octets()),
            src_port: rng.random::<u16>(),
            dst_port: 80u16.to_be(),
            proto: IPPROTO_TCP,
            _pad1: 0,
            _pad2: 0,
        })
        .collect()
}

/// Checks that both nodes pick the same backend for every one of
/// [`TUPLES`] random flows, and that the picks spread over every backend.
fn assert_same_choices(a: &Node, b: &Node, when: &str) {
    let (ta, tb) = (a.pinned(), b.pinned());
    // Slot for slot, the two tables name the same backends.
    let web = ServiceKey::new(NODES_VIP.octets(), 80, IPPROTO_TCP);
    let (table_a, table_b) = (ta.table(&web), tb.table(&web));
    assert!(table_a.iter().all(Option::is_some), "{when}: empty slots");
    assert!(table_a == table_b, "{when}: the nodes' tables differ");
    let mut spread: BTreeMap<(Ipv4Addr, u16), usize> = BTreeMap::new();
    for key in tuples() {
        let (ca, cb) = (ta.choice(&key), tb.choice(&key));
        assert_eq!(ca, cb, "{when}: the nodes pick differently for {key:?}");
        let pick = ca.unwrap_or_else(|| panic!("{when}: no backend for {key:?}"));
        *spread.entry(pick).or_default() += 1;
    }
    assert_eq!(spread.len(), BACKENDS, "{when}: picks {spread:?}");
    for (b, n) in &spread {
        assert!(
            *n > TUPLES / BACKENDS / 2,
            "{when}: backend {b:?} got {n} of {TUPLES} flows: {spread:?}"
        );
    }
}

/// Echoes a numbered line on every held connection, round after round,
/// until `stop`; returns the rounds done and the first failure, if any.
fn echo_rounds(conns: &mut [StreamConn], stop: &AtomicBool) -> (usize, Option<String>) {
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        for (i, c) in conns.iter_mut().enumerate() {
            let line = format!("conn {i} round {round}\n");
            if let Err(e) = c.echo(line.as_bytes()) {
                return (
                    round,
                    Some(format!("held connection {i} ({}): {e}", c.backend())),
                );
            }
        }
        round += 1;
        thread::sleep(Duration::from_millis(50));
    }
    (round, None)
}

/// Opens, echoes on and closes new connections until `stop` (bounded in
/// count and time); returns (successes, failures).
fn churn(client: &Netns, stop: &AtomicBool) -> (usize, Vec<String>) {
    let vip = SocketAddrV4::new(NODES_VIP, 80);
    let started = Instant::now();
    let (mut ok, mut failed) = (0, Vec::new());
    while !stop.load(Ordering::Relaxed)
        && started.elapsed() < CHURN_LIMIT
        && ok + failed.len() < CHURN_MAX
    {
        match StreamConn::connect(client, vip).and_then(|mut c| c.echo(b"new\n")) {
            Ok(()) => ok += 1,
            Err(e) => failed.push(e),
        }
        thread::sleep(Duration::from_millis(10));
    }
    (ok, failed)
}

#[test]
fn two_nodes_behind_ecmp_agree_and_lose_nothing_when_one_dies() {
    require_root();
    let topo = EcmpNodes::new("lbn", 2, BACKENDS);
    let servers: Vec<StreamServer> = (0..BACKENDS)
        .map(|j| StreamServer::start(&topo.backends[j], BACKEND_PORT, &format!("b{j}")))
        .collect();

    // Node 0 reads its backends from its config; node 1 gets the same ones
    // through the API, one by one in another order (so other ids).
    let n0 = Node::new("lbn0", &topo.nodes[0], &config(&[0, 1, 2]));
    let n1 = Node::new("lbn1", &topo.nodes[1], &config(&[]));
    let mut d0 = n0.start();
    let d1 = n1.start();
    for j in [2, 0, 1] {
        n1.cli().ok(&["backend", "add", "web", &backend(j)]);
    }
    assert_same_choices(&n0, &n1, "backends from the config and from the API");

    // Restarted (detached, then rebuilt from config and state), node 1
    // builds the same table again.
    let status = d1.stop();
    assert!(status.success(), "node 1 exited with {status}");
    let d1 = n1.start();
    assert_same_choices(&n0, &n1, "after node 1 restarted");

    // Held connections, spread by the router over both nodes.
    let vip = SocketAddrV4::new(NODES_VIP, 80);
    let mut held: Vec<StreamConn> = (0..HELD)
        .map(|i| {
            StreamConn::connect(&topo.client, vip)
                .unwrap_or_else(|e| panic!("held connection {i}: {e}"))
        })
        .collect();
    let before = [stats(&n0), stats(&n1)];
    for (i, s) in before.iter().enumerate() {
        assert!(
            new_flows(s) > 0,
            "node {i} took none of {HELD} connections: the router does not spread them"
        );
    }
    let backends: Vec<String> = held.iter().map(|c| c.backend().to_owned()).collect();

    let stop = AtomicBool::new(false);
    let outcome = Mutex::new(None);
    thread::scope(|scope| {
        let echo = scope.spawn(|| echo_rounds(&mut held, &stop));
        let churner = scope.spawn(|| churn(&topo.client, &stop));
        thread::sleep(Duration::from_secs(1));

        // Node 0 dies: its process is killed and its links go down, and
        // the routes converge to node 1.
        d0.kill();
        topo.fail_node(0);
        thread::sleep(Duration::from_secs(4));
        let during = stats(&n1);

        // It comes back: links up, routed through again, and a plain
        // `lb run` takes over its pinned data path.
        topo.restore_node(0);
        d0 = n0.start();
        let back = stats(&n0);
        thread::sleep(Duration::from_secs(4));
        let after = stats(&n0);

        stop.store(true, Ordering::Relaxed);
        let echoed = echo.join().expect("echo thread");
        let churned = churner.join().expect("churn thread");
        *outcome.lock().unwrap() = Some((echoed, churned, during, back, after));
    });
    let ((rounds, echo_error), (opened, failed), during, back, after) =
        outcome.into_inner().unwrap().expect("the scope ran");

    assert_eq!(
        echo_error, None,
        "a held connection broke ({rounds} rounds done)"
    );
    assert!(rounds >= 20, "only {rounds} echo rounds in 9 s");
    assert!(
        failed.is_empty(),
        "{} of {} new connections failed: {:?}",
        failed.len(),
        opened + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(opened >= 100, "only {opened} new connections in 9 s");
    // Every held connection is still served by the backend it began with:
    // node 1 picked as node 0 had.
    for (i, c) in held.iter_mut().enumerate() {
        c.echo(b"last\n")
            .unwrap_or_else(|e| panic!("held connection {i} after the test: {e}"));
        assert_eq!(c.backend(), backends[i]);
    }
    assert!(
        new_flows(&during) > new_flows(&before[1]),
        "node 1 took no flow while node 0 was down"
    );
    assert!(
        new_flows(&after) > new_flows(&back),
        "node 0 took no new flow after it came back"
    );
    // Replies crossed nodes: the backends' route hashes apart from the
    // router's, so some replies reached a node that saw no request.
    let crossed =
        counter(&stats(&n0), "reverse_nat_no_flow") + counter(&stats(&n1), "reverse_nat_no_flow");
    assert!(crossed > 0, "no reply was restored without its flow");
    assert_same_choices(&n0, &n1, "after node 0 died and came back");

    drop(held);
    for (d, i) in [(d0, 0), (d1, 1)] {
        let status = d.stop();
        assert!(status.success(), "node {i} exited with {status}");
    }
    drop(servers);
}

#[test]
fn direct_server_return_replies_skip_the_nodes() {
    require_root();
    const CONNS: usize = 60;
    let topo = EcmpNodes::new("lbd", 2, BACKENDS);
    topo.replies_past_the_nodes();
    // What the README has an operator set on a static DSR backend.
    for b in &topo.backends {
        b.ip(&["addr", "add", &format!("{NODES_VIP}/32"), "dev", "lo"]);
        for key in ["arp_ignore=1", "arp_announce=2"] {
            b.exec_ok(&["sysctl", "-qw", &format!("net.ipv4.conf.all.{key}")]);
        }
    }
    // Direct server return cannot change the port: the backends listen on
    // the VIP's.
    let servers: Vec<StreamServer> = (0..BACKENDS)
        .map(|j| StreamServer::start(&topo.backends[j], 80, &format!("b{j}")))
        .collect();
    let list: Vec<String> = (0..BACKENDS)
        .map(|j| format!("\"{}:80\"", node_backend_addr(j)))
        .collect();
    let n0 = Node::new("lbd0", &topo.nodes[0], &service_config(&list, "dsr"));
    let n1 = Node::new("lbd1", &topo.nodes[1], &service_config(&list, "dsr"));
    let d0 = n0.start();
    let d1 = n1.start();
    assert_same_choices(&n0, &n1, "direct server return");

    let before = [stats(&n0), stats(&n1)];
    let vip = SocketAddrV4::new(NODES_VIP, 80);
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let payload = vec![b'x'; 1000];
    for i in 0..CONNS {
        let mut c = StreamConn::connect(&topo.client, vip)
            .unwrap_or_else(|e| panic!("connection {i} through the VIP: {e}"));
        c.echo(&payload)
            .unwrap_or_else(|e| panic!("connection {i} ({}): {e}", c.backend()));
        *seen.entry(c.backend().to_owned()).or_default() += 1;
    }
    assert_eq!(seen.len(), BACKENDS, "every backend answered: {seen:?}");
    let after = [stats(&n0), stats(&n1)];
    let delta = |name: &str| -> u64 {
        (0..2)
            .map(|i| counter(&after[i], name) - counter(&before[i], name))
            .sum()
    };
    assert!(
        delta("fwd_xdp") + delta("fwd_skb") >= (CONNS * 3) as u64,
        "the nodes forwarded the requests"
    );
    assert_eq!(delta("reverse_nat") + delta("reverse_nat_no_flow"), 0);
    // Every IPv4 packet reaching a node's backend side is seen by its TC
    // program: the replies (at least three a connection) would show as
    // packets of no service.
    let crossed = delta("pass_no_service");
    assert!(
        crossed < CONNS as u64,
        "{crossed} IPv4 packets not to the service reached the nodes: replies went through them"
    );

    // A backend on another port is refused, with one clear line.
    let out = n0.cli().run(&["backend", "add", "web", &backend(0)]);
    assert!(
        !out.status.success(),
        "a DSR backend on another port was taken"
    );
    let lines = out.stderr_lines();
    assert_eq!(lines.len(), 1, "{}", out.describe());
    assert!(lines[0].contains("port"), "{}", out.describe());

    for (d, i) in [(d0, 0), (d1, 1)] {
        let status = d.stop();
        assert!(status.success(), "node {i} exited with {status}");
    }
    drop(servers);
}
