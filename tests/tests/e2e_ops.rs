//! End-to-end tests of operating the `lb` daemon: the admin API through the
//! CLI, hitless restart, drain, health checks and Prometheus metrics. Real
//! namespaces, real kernel servers and clients, the daemon binary attached
//! to a veth, the host's FORWARD policy at DROP. Run as root, one at a time:
//! `cargo test -p lb-tests --test e2e_ops -- --test-threads=1`.
//!
//! The binary under test is `$LB_BIN`, else `target/release/lb`, else
//! `target/debug/lb` (see [`lb_harness::lb_binary`]). Every test has its own
//! topology prefix, socket, state file and bpffs pin path, and removes its
//! pins even when it fails.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::unix::fs::{FileTypeExt as _, MetadataExt as _},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use lb::api::types::{
    BackendInfo, BackendState, Health, HealthCheck, Origin, ServiceInfo, Stats, Status,
};
use lb_harness::{
    http_tally,
    ops::{free_loopback_port, DaemonFiles, LbCli},
    reliability::{daemon_restart, Ending},
    render_config, require_root,
    stream::{StreamConn, StreamServer},
    ForwardDrop, HttpServer, HttpTally, ServiceConfig, Topology,
};

/// The HTTP service's port on the VIP, and the backends' HTTP port.
const WEB_PORT: u16 = 80;
const HTTP_PORT: u16 = 8080;
/// The stream service's port, on the VIP and on the backends.
const STREAM_PORT: u16 = 7000;
/// The second service of the CLI tests (not on any interface: the data
/// path takes its packets before routing).
const API_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 101, 2);
/// The health-checked service's VIP.
const HC_VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 101, 3);
/// The flow table size when the config does not set one.
const DEFAULT_FLOW_TABLE_SIZE: u64 = 1_048_576;
/// What the daemon logs when it leaves the data path running.
const KEEP_MARKER: &str = "the data path keeps forwarding";
/// What a daemon logs when it adopts a running data path.
const TAKEOVER_MARKER: &str = "taking over the running data path";

/// The files of a test on `topo`: the config of `services` on the
/// topology's client interface.
fn ops_files(topo: &Topology, services: &[ServiceConfig]) -> DaemonFiles {
    let files = DaemonFiles::new(topo, "ops");
    files.write_config(&render_config(&[&topo.client_host_if()], services));
    files
}

/// `"ip:port"` of backend `i`.
fn endpoint(topo: &Topology, i: usize, port: u16) -> String {
    format!("{}:{port}", topo.backend_addr(i))
}

fn http_servers(topo: &Topology) -> Vec<HttpServer> {
    (0..topo.backend_count())
        .map(|i| HttpServer::start(&topo.backends[i], HTTP_PORT, &format!("b{i}")))
        .collect()
}

fn stream_servers(topo: &Topology) -> Vec<StreamServer> {
    (0..topo.backend_count())
        .map(|i| StreamServer::start(&topo.backends[i], STREAM_PORT, &format!("b{i}")))
        .collect()
}

fn web_service(topo: &Topology, backends: &[usize]) -> ServiceConfig {
    let eps: Vec<String> = backends
        .iter()
        .map(|&i| endpoint(topo, i, HTTP_PORT))
        .collect();
    ServiceConfig::new("web", &format!("{}:{WEB_PORT}", topo.vip()), "tcp", &eps)
}

fn stream_service(topo: &Topology) -> ServiceConfig {
    let eps: Vec<String> = (0..topo.backend_count())
        .map(|i| endpoint(topo, i, STREAM_PORT))
        .collect();
    ServiceConfig::new(
        "stream",
        &format!("{}:{STREAM_PORT}", topo.vip()),
        "tcp",
        &eps,
    )
}

fn find_service<'a>(services: &'a [ServiceInfo], name: &str) -> &'a ServiceInfo {
    services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name} in {services:#?}"))
}

fn find_backend<'a>(backends: &'a [BackendInfo], address: &str) -> &'a BackendInfo {
    backends
        .iter()
        .find(|b| b.address == address)
        .unwrap_or_else(|| panic!("no backend {address} in {backends:#?}"))
}

/// The backends' addresses and weights, sorted by address.
fn addresses_and_weights(backends: &[BackendInfo]) -> Vec<(String, u32)> {
    let mut v: Vec<(String, u32)> = backends
        .iter()
        .map(|b| (b.address.clone(), b.weight))
        .collect();
    v.sort();
    v
}

fn assert_http_ok(tally: &HttpTally, what: &str) {
    assert_eq!(tally.failures, 0, "{what}: failed HTTP requests: {tally:?}");
    assert_eq!(
        tally.successes(),
        tally.requested,
        "{what}: unexpected answers: {tally:?}"
    );
}

/// Checks service `name` in `stats` against `requests` HTTP requests whose
/// answers were counted in `tally` (body `b{i}` is backend `addr_of(i)`).
fn check_service_stats(
    stats: &Stats,
    name: &str,
    requests: u64,
    tally: &HttpTally,
    topo: &Topology,
) {
    let s = stats
        .services
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name} in stats {stats:#?}"));
    assert_eq!(
        s.counters.new_flows, requests,
        "service {name}: new_flows should be the {requests} connections made: {s:#?}"
    );
    assert!(
        s.counters.packets >= requests * 3,
        "service {name}: {} packets for {requests} TCP connections (want >= 3 each): {s:#?}",
        s.counters.packets
    );
    assert!(
        s.counters.bytes > 0,
        "service {name}: no bytes counted: {s:#?}"
    );
    let per_backend: u64 = s.backends.iter().map(|b| b.counters.new_flows).sum();
    assert_eq!(
        per_backend, s.counters.new_flows,
        "service {name}: backends' new_flows do not add up to the service's: {s:#?}"
    );
    assert!(
        s.active_flows > 0,
        "service {name}: no active flows right after traffic: {s:#?}"
    );
    for b in &s.backends {
        let i = (0..topo.backend_count())
            .find(|&i| endpoint(topo, i, HTTP_PORT) == b.address)
            .unwrap_or_else(|| panic!("service {name}: unknown backend {}", b.address));
        assert_eq!(
            b.counters.new_flows,
            tally.count(&format!("b{i}")) as u64,
            "service {name}: backend {} (b{i}) counted {} new flows, the client saw b{i} answer {}: \
             stats {s:#?}, client {tally:?}",
            b.address,
            b.counters.new_flows,
            tally.count(&format!("b{i}"))
        );
    }
}

#[test]
fn cli_commands_match_what_traffic_did() {
    require_root();
    let topo = Topology::new("lbo1", 3);
    let _http = http_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = ops_files(&topo, &[web_service(&topo, &[0, 1])]);
    let daemon = files.start(&[]);
    let lb = files.cli();
    let (b0, b1, b2) = (
        endpoint(&topo, 0, HTTP_PORT),
        endpoint(&topo, 1, HTTP_PORT),
        endpoint(&topo, 2, HTTP_PORT),
    );
    let web_vip = SocketAddrV4::new(topo.vip(), WEB_PORT);
    let api_vip = SocketAddrV4::new(API_VIP, WEB_PORT);

    lb.ok(&[
        "service",
        "add",
        "api",
        "--vip",
        &api_vip.to_string(),
        "--table-size",
        "251",
    ]);
    lb.ok(&["backend", "add", "api", &b2]);
    lb.ok(&["backend", "add", "web", &b2, "--weight", "2"]);

    let services: Vec<ServiceInfo> = lb.json(&["service", "ls", "--json"]);
    assert_eq!(services.len(), 2, "want web and api: {services:#?}");
    let web = find_service(&services, "web");
    assert_eq!(web.origin, Origin::Config, "{web:#?}");
    assert_eq!(web.vip, web_vip.to_string(), "{web:#?}");
    assert_eq!(
        (web.backends, web.active_backends),
        (3, 3),
        "web: 2 from the config + b2 from the API: {web:#?}"
    );
    let api = find_service(&services, "api");
    assert_eq!(api.origin, Origin::Api, "{api:#?}");
    assert_eq!(api.vip, api_vip.to_string(), "{api:#?}");
    assert_eq!(api.table_size, 251, "{api:#?}");
    assert_eq!((api.backends, api.active_backends), (1, 1), "{api:#?}");

    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "web", "--json"]);
    assert_eq!(
        addresses_and_weights(&backends),
        vec![(b0.clone(), 1), (b1.clone(), 1), (b2.clone(), 2)],
        "web's backends and weights: {backends:#?}"
    );
    for b in &backends {
        assert_eq!(b.state, BackendState::Active, "{b:#?}");
        assert_eq!(b.health, Health::Unchecked, "{b:#?}");
    }

    let web_tally = http_tally(&topo.client, web_vip, 60, Duration::from_secs(60));
    assert_http_ok(&web_tally, "60 requests to web");
    let api_tally = http_tally(&topo.client, api_vip, 30, Duration::from_secs(60));
    assert_http_ok(&api_tally, "30 requests to api");
    assert_eq!(
        api_tally.count("b2"),
        30,
        "api's only backend is b2: {api_tally:?}"
    );

    let all: Stats = lb.json(&["stats", "--json"]);
    check_service_stats(&all, "web", 60, &web_tally, &topo);
    check_service_stats(&all, "api", 30, &api_tally, &topo);
    assert!(
        all.global.get("fwd_skb").is_some_and(|&n| n > 0)
            || all.global.get("fwd_xdp").is_some_and(|&n| n > 0),
        "no forwarded packets in the data path totals: {:#?}",
        all.global
    );
    let one: Stats = lb.json(&["stats", "web", "--json"]);
    assert_eq!(
        one.services
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>(),
        ["web"],
        "`stats web` must show web only: {one:#?}"
    );
    check_service_stats(&one, "web", 60, &web_tally, &topo);

    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "web", "--json"]);
    for (i, addr) in [&b0, &b1, &b2].into_iter().enumerate() {
        let b = find_backend(&backends, addr);
        assert_eq!(
            b.counters.new_flows,
            web_tally.count(&format!("b{i}")) as u64,
            "`backend ls web`: {addr} counted {} new flows, the client saw b{i} answer {}: \
             {backends:#?} {web_tally:?}",
            b.counters.new_flows,
            web_tally.count(&format!("b{i}"))
        );
        if web_tally.count(&format!("b{i}")) > 0 {
            assert!(b.counters.packets >= 3, "{addr}: {b:#?}");
            assert!(b.active_flows > 0, "{addr}: no active flows: {b:#?}");
        }
    }

    let status: Status = lb.json(&["status", "--json"]);
    assert!(!status.version.is_empty(), "no version: {status:#?}");
    let ext = topo.client_host_if();
    assert!(
        status
            .interfaces
            .iter()
            .any(|i| i.name == ext && i.role == "external"),
        "{ext} is not listed as external: {status:#?}"
    );
    let flows = status
        .maps
        .iter()
        .find(|m| m.name == "LB_FLOWS")
        .unwrap_or_else(|| panic!("no LB_FLOWS in status maps: {status:#?}"));
    assert!(flows.used > 0, "LB_FLOWS empty after traffic: {status:#?}");
    assert_eq!(flows.capacity, DEFAULT_FLOW_TABLE_SIZE, "{status:#?}");
    assert_eq!(status.services, 2, "{status:#?}");
    assert!(
        !status.adopted,
        "a fresh daemon adopted something: {status:#?}"
    );

    lb.ok(&["backend", "rm", "web", &b2]);
    let after_rm = http_tally(&topo.client, web_vip, 30, Duration::from_secs(60));
    if after_rm.failures > 0 {
        let stats = lb.ok(&["stats", "--json"]);
        let backends = lb.ok(&["backend", "ls", "web", "--json"]);
        panic!(
            "after `lb --socket {} backend rm web {b2}`, {} of 30 new connections to web failed: \
             {after_rm:?}\n`backend ls web --json`:\n{backends}\n`stats --json`:\n{stats}",
            files.socket.display(),
            after_rm.failures
        );
    }
    assert_http_ok(&after_rm, "30 requests to web after removing b2");
    assert_eq!(
        after_rm.count("b2"),
        0,
        "b2 was removed from web but still answered: {after_rm:?}"
    );

    lb.ok(&["service", "rm", "api"]);
    let refused = lb.run(&["service", "rm", "web"]);
    assert_eq!(
        refused.code(),
        Some(1),
        "removing a config service must be refused with exit 1: {}",
        refused.describe()
    );
    assert_eq!(
        refused.stderr_lines().len(),
        1,
        "the refusal must be one line: {}",
        refused.describe()
    );

    let before: Vec<ServiceInfo> = lb.json(&["service", "ls", "--json"]);
    assert_eq!(
        before.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["web"],
        "after `service rm api`: {before:#?}"
    );
    assert_eq!(before[0].backends, 2, "web without b2: {before:#?}");
    let before_backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "web", "--json"]);

    let status = daemon.stop();
    assert!(status.success(), "lb exited with {status} on SIGTERM");
    let daemon = files.start(&[]);
    let after: Vec<ServiceInfo> = lb.json(&["service", "ls", "--json"]);
    assert_eq!(
        after, before,
        "after a restart the services differ from what the API left"
    );
    let after_backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "web", "--json"]);
    assert_eq!(
        addresses_and_weights(&after_backends),
        vec![(b0, 1), (b1, 1)],
        "web's backends after a restart: {after_backends:#?}"
    );
    assert_eq!(
        addresses_and_weights(&after_backends),
        addresses_and_weights(&before_backends)
    );
    let tally = http_tally(&topo.client, web_vip, 20, Duration::from_secs(60));
    assert_http_ok(&tally, "20 requests to web after the restart");
    assert_eq!(
        tally.count("b2"),
        0,
        "b2 answered after a restart: {tally:?}"
    );
    let status = daemon.stop();
    assert!(status.success(), "lb exited with {status} on SIGTERM");
}

#[test]
fn bad_inputs_are_refused_and_change_nothing() {
    require_root();
    let topo = Topology::new("lbo2", 3);
    let files = ops_files(&topo, &[web_service(&topo, &[0, 1])]);
    let _daemon = files.start(&[]);
    let lb = files.cli();
    let b2 = endpoint(&topo, 2, HTTP_PORT);
    // Valid changes first, so there is a state file to keep unchanged.
    lb.ok(&[
        "service",
        "add",
        "api",
        "--vip",
        "198.18.101.2:80",
        "--table-size",
        "251",
    ]);
    lb.ok(&["backend", "add", "api", &b2]);
    lb.ok(&["backend", "add", "web", &b2]);

    let snapshot = || {
        let services = lb.ok(&["service", "ls", "--json"]);
        let web = lb.ok(&["backend", "ls", "web", "--json"]);
        let api = lb.ok(&["backend", "ls", "api", "--json"]);
        // The state file and its journal (either may not exist yet).
        let state: Vec<Vec<u8>> = [files.state.clone(), files.state.with_extension("journal")]
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_default())
            .collect();
        (services, web, api, state)
    };
    let before = snapshot();

    // Refused by the daemon: exit 1 and its one line.
    let refusals: Vec<(&str, Vec<&str>)> = vec![
        (
            "unknown service",
            vec!["backend", "add", "nope", "198.18.103.2:8080"],
        ),
        (
            "address without a port",
            vec!["backend", "add", "web", "198.18.103.2"],
        ),
        (
            "address that is no address",
            vec!["backend", "add", "web", "nowhere:80"],
        ),
        (
            "VIP port 0",
            vec!["service", "add", "x", "--vip", "198.18.101.9:0"],
        ),
        (
            "VIP port 70000",
            vec!["service", "add", "x", "--vip", "198.18.101.9:70000"],
        ),
        (
            "backend port 0",
            vec!["backend", "add", "web", "198.18.103.2:0"],
        ),
        (
            "duplicate service name",
            vec!["service", "add", "web", "--vip", "198.18.101.9:80"],
        ),
        (
            "duplicate VIP",
            vec!["service", "add", "x", "--vip", "198.18.101.1:80"],
        ),
        (
            "duplicate backend (config)",
            vec!["backend", "add", "web", "198.18.103.2:8080"],
        ),
        (
            "duplicate backend (API)",
            vec!["backend", "add", "web", b2.as_str()],
        ),
        (
            "duplicate backend (API service)",
            vec!["backend", "add", "api", b2.as_str()],
        ),
        (
            "weight 0",
            vec![
                "backend",
                "add",
                "web",
                "198.18.105.2:9999",
                "--weight",
                "0",
            ],
        ),
        (
            "table size not prime",
            vec![
                "service",
                "add",
                "x",
                "--vip",
                "198.18.101.9:80",
                "--table-size",
                "100",
            ],
        ),
        (
            "table size 0",
            vec![
                "service",
                "add",
                "x",
                "--vip",
                "198.18.101.9:80",
                "--table-size",
                "0",
            ],
        ),
        ("remove a config service", vec!["service", "rm", "web"]),
        ("remove an unknown service", vec!["service", "rm", "nope"]),
        (
            "remove an unknown backend",
            vec!["backend", "rm", "web", "198.18.109.9:1"],
        ),
        (
            "drain an unknown backend",
            vec!["backend", "drain", "web", "198.18.109.9:1"],
        ),
        (
            "drain a malformed address",
            vec!["backend", "drain", "web", "not-an-address"],
        ),
        (
            "backends of an unknown service",
            vec!["backend", "ls", "nope", "--json"],
        ),
        (
            "stats of an unknown service",
            vec!["stats", "nope", "--json"],
        ),
    ];
    // Refused by the CLI itself (clap types): exit 2, usage message.
    let usage: Vec<(&str, Vec<&str>)> = vec![
        (
            "table size not a number",
            vec![
                "service",
                "add",
                "x",
                "--vip",
                "198.18.101.9:80",
                "--table-size",
                "abc",
            ],
        ),
        (
            "negative weight",
            vec![
                "backend",
                "add",
                "web",
                "198.18.105.2:9999",
                "--weight",
                "-1",
            ],
        ),
        (
            "unknown protocol",
            vec![
                "service",
                "add",
                "x",
                "--vip",
                "198.18.101.9:80",
                "--proto",
                "sctp",
            ],
        ),
        ("missing address", vec!["backend", "add", "web"]),
    ];

    let mut problems = Vec::new();
    for (what, args) in &refusals {
        let out = lb.run(args);
        eprintln!("{what}: {}", out.stderr.trim());
        if out.code() != Some(1) {
            problems.push(format!("{what}: want exit 1: {}", out.describe()));
        }
        if out.stderr_lines().len() != 1 {
            problems.push(format!(
                "{what}: stderr is not exactly one line: {}",
                out.describe()
            ));
        }
        if out.stderr.contains("panicked") {
            problems.push(format!("{what}: panicked: {}", out.describe()));
        }
        if snapshot() != before {
            problems.push(format!(
                "{what}: changed the services, backends or state file"
            ));
        }
    }
    for (what, args) in &usage {
        let out = lb.run(args);
        if out.code() != Some(2) {
            problems.push(format!(
                "{what}: want usage error exit 2: {}",
                out.describe()
            ));
        }
        if snapshot() != before {
            problems.push(format!(
                "{what}: changed the services, backends or state file"
            ));
        }
    }
    let after = snapshot();
    assert!(problems.is_empty(), "{}", problems.join("\n\n"));
    assert_eq!(after.0, before.0, "`service ls --json` changed");
    assert_eq!(after.1, before.1, "`backend ls web --json` changed");
    assert_eq!(after.2, before.2, "`backend ls api --json` changed");
    assert_eq!(after.3, before.3, "the state file changed");
}

#[test]
fn socket_is_root_only() {
    require_root();
    let topo = Topology::new("lbo3", 1);
    let files = ops_files(&topo, &[web_service(&topo, &[0])]);
    // Others may reach the socket's directory: only the socket's own mode
    // keeps them out.
    files.open_to_others();
    let _daemon = files.start(&[]);
    let lb = files.cli();

    let meta = std::fs::symlink_metadata(&files.socket)
        .unwrap_or_else(|e| panic!("stat {}: {e}", files.socket.display()));
    assert!(
        meta.file_type().is_socket(),
        "{} is not a socket: {meta:?}",
        files.socket.display()
    );
    assert_eq!(
        meta.mode() & 0o7777,
        0o600,
        "socket mode is {:o}, want 600",
        meta.mode() & 0o7777
    );
    assert_eq!(
        meta.uid(),
        0,
        "socket owner is uid {}, want root",
        meta.uid()
    );
    assert_eq!(
        meta.gid(),
        0,
        "socket group is gid {}, want root",
        meta.gid()
    );

    // Root is served.
    let services: Vec<ServiceInfo> = lb.json(&["service", "ls", "--json"]);
    assert_eq!(services.len(), 1, "{services:#?}");

    let nobody = lb.run_as(65534, &["service", "ls"]);
    assert_eq!(
        nobody.code(),
        Some(1),
        "uid 65534 must be refused with exit 1: {}",
        nobody.describe()
    );
    assert_eq!(nobody.stderr_lines().len(), 1, "{}", nobody.describe());
    assert!(
        nobody.stderr.to_lowercase().contains("permission denied"),
        "stderr does not say permission denied: {}",
        nobody.describe()
    );
    assert!(nobody.stdout.trim().is_empty(), "{}", nobody.describe());

    let missing = LbCli::new(Path::new("/nonexistent.sock")).run(&["service", "ls"]);
    assert_eq!(missing.code(), Some(1), "{}", missing.describe());
    assert_eq!(missing.stderr_lines().len(), 1, "{}", missing.describe());
    assert!(
        missing.stderr.contains("no lb daemon"),
        "stderr does not say there is no daemon: {}",
        missing.describe()
    );
}

#[test]
fn restart_keeps_connections_and_serves_throughout() {
    restart_serves_throughout("lbo4", Ending::KeepDatapath);
}

/// `kill -9` of the daemon under load: the pinned data path forwards alone,
/// and the next plain `lb run` takes it over as `--keep-datapath` would; no
/// request fails and the held connection carries on.
#[test]
fn a_crashed_daemon_fails_no_request_and_the_next_one_takes_over() {
    restart_serves_throughout("lbo11", Ending::Crash);
}

/// A first daemon under HTTP requests and a held connection, ended as
/// `ending` says, a while with no daemon, then a plain second one
/// ([`daemon_restart`]): every request answered, the connection unbroken,
/// the second daemon adopting, and nothing left once it stops.
fn restart_serves_throughout(prefix: &str, ending: Ending) {
    require_root();
    let r = daemon_restart(prefix, ending);
    eprintln!(
        "load: {:?}; {} answered with no daemon",
        r.load, r.answered_without_daemon
    );
    match ending {
        Ending::KeepDatapath => {
            let status = r.first_exit.expect("daemon A was stopped with SIGTERM");
            assert!(
                status.success(),
                "daemon A (--keep-datapath) exited with {status} on SIGTERM; its output:\n{}",
                r.first_output
            );
            assert!(
                r.first_output.contains(KEEP_MARKER),
                "daemon A did not log {KEEP_MARKER:?}; its output:\n{}",
                r.first_output
            );
        }
        Ending::Crash => assert!(!r.first_survived_kill, "daemon A survived SIGKILL"),
    }
    assert!(
        r.answered_without_daemon > 0,
        "no HTTP request succeeded while no daemon ran"
    );
    assert!(
        r.load.clean(),
        "requests failed or the held connection broke across the restart: {:#?}",
        r.load
    );
    assert!(
        r.load.answered() > 20,
        "too few HTTP requests made: {:?}",
        r.load
    );
    assert!(
        r.load.echoes > 100,
        "too few sequence numbers went through the held connection: {:?}",
        r.load
    );
    assert!(
        r.second_output.contains(TAKEOVER_MARKER),
        "daemon B did not log {TAKEOVER_MARKER:?}; its output:\n{}",
        r.second_output
    );
    assert!(r.adopted, "daemon B does not report adoption");
    assert!(
        r.second_exit.success(),
        "daemon B exited with {} on SIGTERM; its output:\n{}",
        r.second_exit,
        r.second_output
    );
    assert!(
        r.pins_left.is_none(),
        "pins left after a plain stop: {:?}",
        r.pins_left
    );
    assert!(
        r.attached_left.is_empty(),
        "left attached after daemon B stopped:\n{}",
        r.attached_left.join("\n")
    );
}

/// Backend name (`b{i}`) to `"ip:port"` on the stream port.
fn stream_endpoint_of(topo: &Topology, name: &str) -> String {
    let i: usize = name
        .strip_prefix('b')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unexpected backend name {name:?}"));
    endpoint(topo, i, STREAM_PORT)
}

#[test]
fn drain_keeps_flows_and_takes_no_new_ones() {
    require_root();
    let topo = Topology::new("lbo5", 2);
    let _streams = stream_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = ops_files(&topo, &[stream_service(&topo)]);
    let _daemon = files.start(&[]);
    let lb = files.cli();
    let vip = SocketAddrV4::new(topo.vip(), STREAM_PORT);

    let mut held: Vec<StreamConn> = (0..4)
        .map(|i| {
            StreamConn::connect(&topo.client, vip)
                .unwrap_or_else(|e| panic!("long-lived connection {i}: {e}"))
        })
        .collect();
    let mut per_backend: BTreeMap<String, usize> = BTreeMap::new();
    for c in &held {
        *per_backend.entry(c.backend().to_owned()).or_default() += 1;
    }
    eprintln!("held connections per backend: {per_backend:?}");
    let (drained_name, drained_count) = per_backend
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(name, n)| (name.clone(), *n))
        .expect("4 connections are held");
    let other_name = if drained_name == "b0" { "b1" } else { "b0" };
    let drained = stream_endpoint_of(&topo, &drained_name);
    let other = stream_endpoint_of(&topo, other_name);

    lb.ok(&["backend", "drain", "stream", &drained]);

    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "stream", "--json"]);
    let d = find_backend(&backends, &drained);
    assert_eq!(d.state, BackendState::Draining, "{backends:#?}");
    assert!(
        d.active_flows >= drained_count as u64,
        "drained backend {drained} shows {} active flows, {drained_count} connections are held on it: {backends:#?}",
        d.active_flows
    );
    assert_eq!(
        find_backend(&backends, &other).state,
        BackendState::Active,
        "{backends:#?}"
    );
    let services: Vec<ServiceInfo> = lb.json(&["service", "ls", "--json"]);
    let s = find_service(&services, "stream");
    assert_eq!(
        (s.backends, s.active_backends),
        (2, 1),
        "one of two backends takes new flows: {s:#?}"
    );

    for (i, c) in held.iter_mut().enumerate() {
        let payload = format!("held {i} after the drain\n");
        c.echo(payload.as_bytes()).unwrap_or_else(|e| {
            panic!(
                "held connection {i} (on {}) broke after draining {drained}: {e}",
                c.backend()
            )
        });
    }

    let landed = spread(&topo, vip, 20);
    assert_eq!(
        landed.get(other_name).copied().unwrap_or(0),
        20,
        "new connections after draining {drained_name}: {landed:?}"
    );

    // Still alive after the new ones.
    for (i, c) in held.iter_mut().enumerate() {
        c.echo(b"bye\n")
            .unwrap_or_else(|e| panic!("held connection {i} on {}: {e}", c.backend()));
    }
    drop(held);
}

/// Opens `n` connections to `vip` and counts where each landed (each echoes
/// once, so it was really served).
fn spread(topo: &Topology, vip: SocketAddrV4, n: usize) -> BTreeMap<String, usize> {
    let mut landed: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..n {
        let mut c = StreamConn::connect(&topo.client, vip)
            .unwrap_or_else(|e| panic!("new connection {i}: {e}"));
        c.echo(b"new\n")
            .unwrap_or_else(|e| panic!("new connection {i} on {}: {e}", c.backend()));
        *landed.entry(c.backend().to_owned()).or_default() += 1;
    }
    landed
}

/// Opens connections to `vip` until `want` of them landed on `backend`
/// (at most 60 tries, so the chance of too few is negligible rather than a
/// coin toss) and keeps only those.
fn connections_on(
    topo: &Topology,
    vip: SocketAddrV4,
    backend: &str,
    want: usize,
) -> Vec<StreamConn> {
    let mut kept = Vec::new();
    for i in 0..60 {
        let c = StreamConn::connect(&topo.client, vip)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        if c.backend() == backend {
            kept.push(c);
            if kept.len() == want {
                return kept;
            }
        }
    }
    panic!("{} of 60 connections landed on {backend}", kept.len());
}

fn echo_all(held: &mut [StreamConn], when: &str) {
    for (i, c) in held.iter_mut().enumerate() {
        c.echo(format!("held {i} {when}\n").as_bytes())
            .unwrap_or_else(|e| {
                panic!("held connection {i} (on {}) broke {when}: {e}", c.backend())
            });
    }
}

/// The verbs an operator expects, against live traffic: a batch replaces
/// the set, a batch adds several, a weight changes in place and a drained
/// backend comes back, and no established connection moves through any of
/// them.
#[test]
fn batches_weights_and_undrain_keep_established_flows() {
    require_root();
    let topo = Topology::new("lbo8", 3);
    let _streams = stream_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = ops_files(&topo, &[stream_service(&topo)]);
    let _daemon = files.start(&[]);
    let lb = files.cli();
    let vip = SocketAddrV4::new(topo.vip(), STREAM_PORT);
    let ep = |i: usize| endpoint(&topo, i, STREAM_PORT);

    // One call replaces the set: b1 and b2 leave, b0 stays with its flows.
    let mut held = connections_on(&topo, vip, "b0", 3);
    lb.ok(&["backend", "set", "stream", &ep(0)]);
    echo_all(&mut held, "after backend set");
    let landed = spread(&topo, vip, 10);
    assert_eq!(landed.get("b0"), Some(&10), "only b0 is left: {landed:?}");

    // One call adds two.
    lb.ok(&["backend", "add", "stream", &ep(1), &ep(2)]);
    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "stream", "--json"]);
    assert_eq!(backends.len(), 3, "{backends:#?}");
    let landed = spread(&topo, vip, 60);
    for b in ["b0", "b1", "b2"] {
        assert!(
            landed.get(b).copied().unwrap_or(0) >= 5,
            "{b} after the batch add: {landed:?}"
        );
    }
    echo_all(&mut held, "after backend add");

    // A weight changed in place: listed, followed by new flows, and the
    // held connections stay where they are.
    lb.ok(&["backend", "weight", "stream", &ep(0), "6"]);
    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "stream", "--json"]);
    assert_eq!(find_backend(&backends, &ep(0)).weight, 6, "{backends:#?}");
    echo_all(&mut held, "after the weight change");
    let landed = spread(&topo, vip, 60);
    let b0 = landed.get("b0").copied().unwrap_or(0);
    assert!(b0 >= 30, "b0 at weight 6 of 8 took {b0} of 60: {landed:?}");

    // Drain b0, then put it back: its connections never move.
    lb.ok(&["backend", "drain", "stream", &ep(0)]);
    let landed = spread(&topo, vip, 10);
    assert_eq!(
        landed.get("b0"),
        None,
        "drained b0 took new flows: {landed:?}"
    );
    echo_all(&mut held, "while drained");
    lb.ok(&["backend", "undrain", "stream", &ep(0)]);
    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "stream", "--json"]);
    let b = find_backend(&backends, &ep(0));
    assert_eq!(
        (b.state, b.weight),
        (BackendState::Active, 6),
        "{backends:#?}"
    );
    let landed = spread(&topo, vip, 20);
    assert!(
        landed.get("b0").copied().unwrap_or(0) >= 5,
        "b0 after undrain: {landed:?}"
    );
    echo_all(&mut held, "after undrain");

    // All of it survives a restart of the daemon, from the state file.
    drop(_daemon);
    let _daemon = files.start(&[]);
    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "stream", "--json"]);
    let mut want = vec![(ep(0), 6), (ep(1), 1), (ep(2), 1)];
    want.sort();
    assert_eq!(addresses_and_weights(&backends), want, "{backends:#?}");
    drop(held);
}

/// Polls `backend ls SERVICE --json` every 100 ms for up to `limit` until
/// backend `address` has `health` and `state`; panics with the last answer
/// otherwise.
fn wait_for_backend(
    lb: &LbCli,
    service: &str,
    address: &str,
    health: Health,
    state: BackendState,
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    let deadline = start + limit;
    loop {
        let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", service, "--json"]);
        let b = find_backend(&backends, address);
        if b.health == health && b.state == state {
            return start.elapsed();
        }
        if Instant::now() >= deadline {
            panic!(
                "backend {address} of {service} is not {health:?}/{state:?} after {limit:?}: {backends:#?}"
            );
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_check_takes_out_and_puts_back() {
    require_root();
    let topo = Topology::new("lbo6", 2);
    let mut http: Vec<Option<HttpServer>> = http_servers(&topo).into_iter().map(Some).collect();
    let _forward = ForwardDrop::new();
    let files = ops_files(&topo, &[web_service(&topo, &[0, 1])]);
    let _daemon = files.start(&[]);
    let lb = files.cli();
    let (b0, b1) = (endpoint(&topo, 0, HTTP_PORT), endpoint(&topo, 1, HTTP_PORT));
    let vip = SocketAddrV4::new(HC_VIP, WEB_PORT);

    lb.ok(&[
        "service",
        "add",
        "hc",
        "--vip",
        &vip.to_string(),
        "--health",
        "tcp",
        "--health-interval",
        "200",
        "--health-timeout",
        "100",
        "--health-rise",
        "2",
        "--health-fall",
        "2",
    ]);
    lb.ok(&["backend", "add", "hc", &b0]);
    lb.ok(&["backend", "add", "hc", &b1]);
    let services: Vec<ServiceInfo> = lb.json(&["service", "ls", "--json"]);
    assert_eq!(
        find_service(&services, "hc").health,
        Some(HealthCheck {
            interval_ms: 200,
            timeout_ms: 100,
            rise: 2,
            fall: 2,
            ..HealthCheck::default()
        }),
        "{services:#?}"
    );
    let limit = Duration::from_secs(5);
    for b in [&b0, &b1] {
        wait_for_backend(&lb, "hc", b, Health::Healthy, BackendState::Active, limit);
    }
    let tally = http_tally(&topo.client, vip, 20, Duration::from_secs(60));
    assert_http_ok(&tally, "20 requests to hc with both backends up");

    // b1's port now refuses connections.
    http[1] = None;
    let took = wait_for_backend(&lb, "hc", &b1, Health::Unhealthy, BackendState::Down, limit);
    eprintln!("b1 taken out after {took:?}");
    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "hc", "--json"]);
    let first = find_backend(&backends, &b0);
    assert_eq!(
        (first.health, first.state),
        (Health::Healthy, BackendState::Active),
        "{backends:#?}"
    );
    let tally = http_tally(&topo.client, vip, 20, Duration::from_secs(60));
    assert_http_ok(&tally, "20 requests to hc with b1 down");
    assert_eq!(tally.count("b0"), 20, "all answers from b0: {tally:?}");

    http[1] = Some(HttpServer::start(&topo.backends[1], HTTP_PORT, "b1"));
    let took = wait_for_backend(&lb, "hc", &b1, Health::Healthy, BackendState::Active, limit);
    eprintln!("b1 back after {took:?}");
    let tally = http_tally(&topo.client, vip, 30, Duration::from_secs(60));
    assert_http_ok(&tally, "30 requests to hc with b1 back");
    assert!(
        tally.count("b1") > 0,
        "b1 is healthy again but took no request: {tally:?}"
    );
}

/// The samples of a text exposition: series (name with labels) to value.
fn parse_samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn metrics_are_scraped_over_http() {
    require_root();
    let topo = Topology::new("lbo7", 2);
    let _http = http_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = ops_files(&topo, &[web_service(&topo, &[0, 1])]);
    let port = free_loopback_port();
    let listen = format!("127.0.0.1:{port}");
    let _daemon = files.start(&["--metrics", &listen]);
    let vip = SocketAddrV4::new(topo.vip(), WEB_PORT);

    let tally = http_tally(&topo.client, vip, 20, Duration::from_secs(60));
    assert_http_ok(&tally, "20 requests to web");

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .proxy(None)
        .http_status_as_error(false)
        .build()
        .into();
    let url = format!("http://{listen}/metrics");
    let mut resp = agent
        .get(&url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status();
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = resp
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("reading the body of GET {url}: {e}"));
    assert_eq!(status.as_u16(), 200, "GET {url}: {status}\n{body}");
    assert!(
        content_type.starts_with("text/plain"),
        "GET {url}: content-type {content_type:?}"
    );
    let samples = parse_samples(&body);

    let b0 = endpoint(&topo, 0, HTTP_PORT);
    let series = format!("lb_packets_total{{service=\"web\",backend=\"{b0}\"}}");
    let packets = samples
        .get(&series)
        .unwrap_or_else(|| panic!("no {series} in:\n{body}"));
    assert!(*packets > 0.0, "{series} is {packets}:\n{body}");

    let mut flows = 0.0;
    for i in 0..topo.backend_count() {
        let addr = endpoint(&topo, i, HTTP_PORT);
        let series = format!("lb_new_flows_total{{service=\"web\",backend=\"{addr}\"}}");
        let n = *samples
            .get(&series)
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"));
        assert_eq!(
            n,
            tally.count(&format!("b{i}")) as f64,
            "{series} vs what the client saw: {tally:?}\n{body}"
        );
        flows += n;
    }
    assert_eq!(
        flows, 20.0,
        "lb_new_flows_total of web over backends:\n{body}"
    );
    assert_eq!(
        samples.get("lb_service_new_flows_total{service=\"web\"}"),
        Some(&20.0),
        "lb_service_new_flows_total of web:\n{body}"
    );
    let fwd = "lb_datapath_packets_total{outcome=\"fwd_skb\"}";
    let fwd_value = samples
        .get(fwd)
        .unwrap_or_else(|| panic!("no {fwd} in:\n{body}"));
    assert!(*fwd_value > 0.0, "{fwd} is {fwd_value}:\n{body}");
}

/// A change the daemon cannot save is refused and leaves no trace: not in
/// the list, not in the maps (it was applied while the state file was being
/// written, so the maps are put back). Once the file can be written again,
/// the same change goes through.
#[test]
fn a_change_that_cannot_be_saved_is_refused_and_not_applied() {
    require_root();
    let topo = Topology::new("lbo9", 3);
    let _streams = stream_servers(&topo);
    let _forward = ForwardDrop::new();
    let two = ServiceConfig::new(
        "stream",
        &format!("{}:{STREAM_PORT}", topo.vip()),
        "tcp",
        &[
            endpoint(&topo, 0, STREAM_PORT),
            endpoint(&topo, 1, STREAM_PORT),
        ],
    );
    let files = ops_files(&topo, &[two]);
    let _daemon = files.start(&[]);
    let lb = files.cli();
    let vip = SocketAddrV4::new(topo.vip(), STREAM_PORT);
    let third = endpoint(&topo, 2, STREAM_PORT);

    // A directory where the daemon appends its journal.
    let blocker = files.state.with_extension("journal");
    std::fs::create_dir(&blocker).expect("making the blocker");
    let out = lb.run(&["backend", "add", "stream", &third]);
    assert!(!out.status.success(), "{}", out.describe());
    assert!(
        out.stderr.contains("lb.state.journal") && out.stderr.contains("Is a directory"),
        "the error names the file and the cause: {}",
        out.describe()
    );
    let backends: Vec<BackendInfo> = lb.json(&["backend", "ls", "stream", "--json"]);
    assert_eq!(backends.len(), 2, "{backends:#?}");
    let landed = spread(&topo, vip, 30);
    assert_eq!(
        landed.get("b2"),
        None,
        "the refused backend took flows: {landed:?}"
    );

    std::fs::remove_dir(&blocker).expect("removing the blocker");
    lb.ok(&["backend", "add", "stream", &third]);
    let landed = spread(&topo, vip, 60);
    assert!(
        landed.get("b2").copied().unwrap_or(0) >= 5,
        "the saved backend: {landed:?}"
    );
}

/// Every thread of a running daemon holds only the capabilities the README
/// lists (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN,
/// CAP_SYS_PTRACE), in its effective, permitted and bounding sets, with
/// nothing inheritable or ambient; and it still serves and changes the maps.
#[test]
fn the_daemon_keeps_only_the_capabilities_it_needs() {
    require_root();
    let topo = Topology::new("lbo10", 2);
    let _servers = http_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = ops_files(&topo, &[web_service(&topo, &[0])]);
    let daemon = files.start(&[]);
    let lb = files.cli();
    let pid = daemon.pid().expect("running");
    // CAP_NET_ADMIN 12, CAP_SYS_PTRACE 19, CAP_SYS_ADMIN 21, CAP_PERFMON 38,
    // CAP_BPF 39.
    let kept: u64 = [12, 19, 21, 38, 39].iter().map(|b| 1u64 << b).sum();
    let tasks: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("the daemon's threads")
        .map(|e| e.expect("a thread").path())
        .collect();
    assert!(
        tasks.len() > 1,
        "the runtime's threads are there too: {tasks:?}"
    );
    for task in &tasks {
        let status = std::fs::read_to_string(task.join("status")).expect("status");
        let set = |name: &str| {
            let line = status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or_else(|| panic!("no {name} in {status}"));
            u64::from_str_radix(line.trim(), 16).expect("hex")
        };
        for name in ["CapEff:", "CapPrm:", "CapBnd:"] {
            assert_eq!(
                set(name),
                kept,
                "{} {name} {:#x}",
                task.display(),
                set(name)
            );
        }
        for name in ["CapInh:", "CapAmb:"] {
            assert_eq!(set(name), 0, "{} {name}", task.display());
        }
    }
    // With only those, it changes the maps and serves.
    lb.ok(&["backend", "add", "web", &endpoint(&topo, 1, HTTP_PORT)]);
    let vip = SocketAddrV4::new(topo.vip(), WEB_PORT);
    let tally = http_tally(&topo.client, vip, 40, Duration::from_secs(60));
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert!(tally.count("b1") > 0, "the added backend serves: {tally:?}");
}
