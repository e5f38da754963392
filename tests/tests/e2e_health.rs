//! End-to-end tests of the health checks beyond a TCP connect: an HTTP
//! check that takes out a backend answering 503 on its check path while
//! the others stay, and a UDP probe that keeps a UDP service without any
//! TCP listener up. Real namespaces and servers, `lb run` as a real
//! process, the host's FORWARD policy at DROP. Run as root, one at a time:
//! `cargo test -p lb-tests --test e2e_health -- --test-threads=1`.

use std::{
    net::SocketAddrV4,
    thread,
    time::{Duration, Instant},
};

use lb::api::types::{BackendInfo, BackendState, CheckKind, Event, EventKind, Health, Reason};
use lb_harness::{
    http_tally,
    ops::{DaemonFiles, LbCli},
    render_config, require_root, udp_tally, ForwardDrop, HttpServer, Topology, UdpEcho,
};

/// The backends' HTTP port and the check path.
const HTTP_PORT: u16 = 8080;
const CHECK_PATH: &str = "/healthz";
/// The backends' UDP port and the UDP service's port on the VIP.
const UDP_PORT: u16 = 5353;
const DNS_PORT: u16 = 53;
/// Fast checks, so the test takes seconds: a backend falls after two
/// failed checks 200 ms apart.
const CHECK_FLAGS: [&str; 8] = [
    "--health-interval",
    "200",
    "--health-timeout",
    "150",
    "--health-rise",
    "2",
    "--health-fall",
    "2",
];
/// How long a backend may take to reach the state its checks call for.
const LIMIT: Duration = Duration::from_secs(10);

/// A daemon on `topo` with no service in its config: the test adds them
/// through the CLI.
fn daemon_files(topo: &Topology) -> DaemonFiles {
    let files = DaemonFiles::new(topo, "health");
    files.write_config(&render_config(&[&topo.client_host_if()], &[]));
    files
}

fn backends(lb: &LbCli, service: &str) -> Vec<BackendInfo> {
    lb.json(&["backend", "ls", service, "--json"])
}

/// Polls `backend ls` until every backend of `service` has the health
/// given for its address; returns the last answer, or panics with it.
fn wait_until(lb: &LbCli, service: &str, want: &[(&str, Health)]) -> Vec<BackendInfo> {
    let deadline = Instant::now() + LIMIT;
    loop {
        let list = backends(lb, service);
        let done = want.iter().all(|(addr, health)| {
            list.iter()
                .any(|b| b.address == *addr && b.health == *health && b.last_check.is_some())
        });
        if done {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "{service}: not {want:?} within {LIMIT:?}: {list:#?}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn find<'a>(list: &'a [BackendInfo], address: &str) -> &'a BackendInfo {
    list.iter()
        .find(|b| b.address == address)
        .unwrap_or_else(|| panic!("no backend {address} in {list:#?}"))
}

/// The last check's words of `address`.
fn last_detail(list: &[BackendInfo], address: &str) -> String {
    let b = find(list, address);
    b.last_check
        .as_ref()
        .unwrap_or_else(|| panic!("{address} has no last check: {b:#?}"))
        .detail
        .clone()
}

#[test]
fn an_http_check_takes_out_the_backend_answering_503_and_keeps_the_others() {
    require_root();
    let topo = Topology::new("lbk1", 3);
    // b1 serves every request but answers its health check with 503.
    let _servers: Vec<HttpServer> = (0..3)
        .map(|i| {
            let status = if i == 1 { 503 } else { 200 };
            HttpServer::with_check(
                &topo.backends[i],
                HTTP_PORT,
                &format!("b{i}"),
                CHECK_PATH,
                status,
            )
        })
        .collect();
    let _forward = ForwardDrop::new();
    let files = daemon_files(&topo);
    let _daemon = files.start(&[]);
    let lb = files.cli();
    let events = lb.follow(&["events", "--json", "--since", "0"]);
    let vip = SocketAddrV4::new(topo.vip(), 80);
    let eps: Vec<String> = (0..3)
        .map(|i| format!("{}:{HTTP_PORT}", topo.backend_addr(i)))
        .collect();

    let vip_text = vip.to_string();
    let mut add = vec![
        "service",
        "add",
        "web",
        "--vip",
        &vip_text,
        "--health",
        "http",
        "--health-path",
        CHECK_PATH,
    ];
    add.extend(CHECK_FLAGS);
    lb.ok(&add);
    let mut backend_add = vec!["backend", "add", "web"];
    backend_add.extend(eps.iter().map(String::as_str));
    lb.ok(&backend_add);

    let list = wait_until(
        &lb,
        "web",
        &[
            (&eps[0], Health::Healthy),
            (&eps[1], Health::Unhealthy),
            (&eps[2], Health::Healthy),
        ],
    );
    assert_eq!(find(&list, &eps[1]).state, BackendState::Down, "{list:#?}");
    for i in [0, 2] {
        assert_eq!(
            find(&list, &eps[i]).state,
            BackendState::Active,
            "{list:#?}"
        );
        assert_eq!(last_detail(&list, &eps[i]), "HTTP 200");
    }
    assert_eq!(last_detail(&list, &eps[1]), "HTTP 503, expected 200");
    let services: Vec<lb::api::types::ServiceInfo> = lb.json(&["service", "ls", "--json"]);
    let health = services[0].health.clone().expect("web's health check");
    assert_eq!(
        (health.kind, health.path.as_deref(), health.status),
        (CheckKind::Http, Some(CHECK_PATH), Some(200))
    );

    // The table says why, on b1's row.
    let table = lb.ok(&["backend", "ls", "web"]);
    let row = table
        .lines()
        .find(|l| l.starts_with(&eps[1]))
        .unwrap_or_else(|| panic!("no row for {} in:\n{table}", eps[1]));
    assert!(row.contains("HTTP 503, expected 200"), "{table}");
    assert!(table.contains("LAST CHECK"), "{table}");

    // So does the event that took it down.
    let lines = events.wait_for("b1's backend_down", LIMIT, |lines| {
        lines.iter().any(|l| l.contains("backend_down"))
    });
    let down: Vec<Event> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<Event>(l).ok())
        .filter(|e| e.change.kind == EventKind::BackendDown)
        .collect();
    assert_eq!(down.len(), 1, "{lines:#?}");
    assert_eq!(down[0].change.backend.as_deref(), Some(eps[1].as_str()));
    assert_eq!(down[0].change.reason, Some(Reason::HealthCheck));
    assert_eq!(
        down[0].change.detail.as_deref(),
        Some("HTTP 503, expected 200")
    );

    // Traffic goes to the two that pass.
    let tally = http_tally(&topo.client, vip, 30, Duration::from_secs(60));
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(
        tally.count("b1"),
        0,
        "b1 is down but took requests: {tally:?}"
    );
    assert_eq!(tally.count("b0") + tally.count("b2"), 30, "{tally:?}");
}

#[test]
fn a_udp_probe_keeps_a_udp_service_without_tcp_listener_up() {
    require_root();
    let topo = Topology::new("lbk2", 2);
    // UDP only: nothing listens on TCP anywhere. b1 has no server at all.
    let _echo = UdpEcho::start(&topo.backends[0], UDP_PORT, "b0");
    let _forward = ForwardDrop::new();
    let files = daemon_files(&topo);
    let _daemon = files.start(&[]);
    let lb = files.cli();
    let vip = SocketAddrV4::new(topo.vip(), DNS_PORT);
    let vip_text = vip.to_string();
    let eps: Vec<String> = (0..2)
        .map(|i| format!("{}:{UDP_PORT}", topo.backend_addr(i)))
        .collect();

    let mut add = vec![
        "service",
        "add",
        "dns",
        "--vip",
        &vip_text,
        "--proto",
        "udp",
        "--health",
        "udp",
        "--health-payload",
        "ping",
    ];
    add.extend(CHECK_FLAGS);
    lb.ok(&add);
    lb.ok(&["backend", "add", "dns", &eps[0], &eps[1]]);

    let list = wait_until(
        &lb,
        "dns",
        &[(&eps[0], Health::Healthy), (&eps[1], Health::Unhealthy)],
    );
    assert_eq!(last_detail(&list, &eps[0]), "UDP answer of 7 bytes");
    // The kernel rate-limits ICMP errors to a host: a probe it did not
    // answer with port unreachable times out instead.
    let why = last_detail(&list, &eps[1]);
    assert!(
        why == "UDP port unreachable" || why == "no UDP answer within 150 ms",
        "{why}"
    );

    // Up it stays, check after check: ten intervals more.
    thread::sleep(Duration::from_secs(2));
    let list = backends(&lb, "dns");
    let b0 = find(&list, &eps[0]);
    assert_eq!(
        (b0.health, b0.state),
        (Health::Healthy, BackendState::Active),
        "{list:#?}"
    );
    assert!(b0.last_check.as_ref().is_some_and(|c| c.ok), "{list:#?}");

    let tally = udp_tally(&topo.client, vip, 20, Duration::from_secs(30));
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(tally.counts.get("b0"), Some(&20), "{tally:?}");
}
