//! End-to-end tests of the `lb` daemon: real namespaces, real kernel servers
//! and clients, the daemon binary attached to a veth. Run as root, one at a
//! time: `cargo test -p lb-tests --test e2e -- --test-threads=1`.
//!
//! The binary under test is `$LB_BIN`, else `target/release/lb`, else
//! `target/debug/lb` (see [`lb_harness::lb_binary`]).

use std::{
    collections::BTreeSet,
    net::{SocketAddr, SocketAddrV4},
    path::Path,
    process::Command,
    time::Duration,
};

use lb_harness::{
    attachments, http_tally, lb_binary, output_with_timeout, render_config, require_root,
    udp_tally, Daemon, ForwardDrop, HttpServer, ServiceConfig, TempDir, Topology, UdpEcho,
    READY_MARKER,
};

/// How long the daemon may take to attach and write its maps.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The HTTP service's port on the VIP, and the backends' port.
const WEB_PORT: u16 = 80;
const WEB_BACKEND_PORT: u16 = 8080;
/// The UDP service's port on the VIP, and the backends' port.
const ECHO_PORT: u16 = 53;
const ECHO_BACKEND_PORT: u16 = 9000;

/// The config of the two services, balanced over the backends `use_backends`.
fn config(topo: &Topology, use_backends: &[usize]) -> String {
    let endpoints = |port: u16| -> Vec<String> {
        use_backends
            .iter()
            .map(|&i| format!("{}:{port}", topo.backend_addr(i)))
            .collect()
    };
    render_config(
        &[&topo.client_host_if()],
        &[
            ServiceConfig::new(
                "web",
                &format!("{}:{WEB_PORT}", topo.vip()),
                "tcp",
                &endpoints(WEB_BACKEND_PORT),
            ),
            ServiceConfig::new(
                "echo",
                &format!("{}:{ECHO_PORT}", topo.vip()),
                "udp",
                &endpoints(ECHO_BACKEND_PORT),
            ),
        ],
    )
}

fn start_daemon(config: &Path) -> Daemon {
    let path = config.to_str().expect("UTF-8 config path");
    Daemon::start(&["run", "--config", path], READY_MARKER, READY_TIMEOUT)
}

fn http_servers(topo: &Topology) -> Vec<HttpServer> {
    (0..topo.backend_count())
        .map(|i| HttpServer::start(&topo.backends[i], WEB_BACKEND_PORT, &format!("b{i}")))
        .collect()
}

#[test]
fn balances_http_and_udp_past_a_drop_forward_policy() {
    require_root();
    let topo = Topology::new("lbe1", 3);
    let _http = http_servers(&topo);
    let _udp: Vec<UdpEcho> = (0..3)
        .map(|i| UdpEcho::start(&topo.backends[i], ECHO_BACKEND_PORT, &format!("b{i}")))
        .collect();
    // Anything the kernel forwards is dropped: the balanced path must not be
    // the kernel's forwarding.
    let _forward = ForwardDrop::new();
    let dir = TempDir::new("e2e-balance");
    let cfg = dir.write("lb.toml", &config(&topo, &[0, 1, 2]));
    let daemon = start_daemon(&cfg);

    let web = SocketAddrV4::new(topo.vip(), WEB_PORT);
    let tally = http_tally(&topo.client, web, 300, Duration::from_secs(120));
    assert_eq!(
        tally.failures, 0,
        "HTTP failures through the VIP: {tally:?}"
    );
    for name in ["b0", "b1", "b2"] {
        assert!(
            tally.count(name) >= 60,
            "backend {name} answered {} of 300 requests (want >= 20%): {tally:?}",
            tally.count(name)
        );
    }
    assert_eq!(tally.successes(), 300, "unexpected bodies: {tally:?}");

    let echo = SocketAddrV4::new(topo.vip(), ECHO_PORT);
    let udp = udp_tally(&topo.client, echo, 30, Duration::from_secs(90));
    assert_eq!(udp.failures, 0, "UDP round trips without a reply: {udp:?}");
    let ports: BTreeSet<u16> = udp.replies.iter().map(|r| r.local.port()).collect();
    assert_eq!(ports.len(), 30, "source ports not distinct: {ports:?}");
    for reply in &udp.replies {
        assert_eq!(
            reply.from,
            SocketAddr::V4(echo),
            "reply {reply:?} does not come from the VIP"
        );
    }
    assert!(
        udp.counts.len() >= 2,
        "UDP flows all went to one backend: {:?}",
        udp.counts
    );

    // The client side is still exactly as a fresh veth comes up.
    topo.assert_client_side_pristine();

    let status = daemon.stop();
    assert!(status.success(), "lb exited with {status} on SIGTERM");
}

#[test]
fn restart_without_a_backend_avoids_it() {
    require_root();
    let topo = Topology::new("lbe2", 3);
    let _http = http_servers(&topo);
    let dir = TempDir::new("e2e-restart");
    let web = SocketAddrV4::new(topo.vip(), WEB_PORT);

    let cfg = dir.write("lb.toml", &config(&topo, &[0, 1, 2]));
    let daemon = start_daemon(&cfg);
    let tally = http_tally(&topo.client, web, 60, Duration::from_secs(60));
    assert_eq!(tally.failures, 0, "with 3 backends: {tally:?}");
    for name in ["b0", "b1", "b2"] {
        assert!(
            tally.count(name) > 0,
            "backend {name} never answered: {tally:?}"
        );
    }
    let status = daemon.stop();
    assert!(status.success(), "lb exited with {status} on SIGTERM");

    let cfg = dir.write("lb.toml", &config(&topo, &[0, 1]));
    let daemon = start_daemon(&cfg);
    let tally = http_tally(&topo.client, web, 150, Duration::from_secs(90));
    assert_eq!(
        tally.count("b2"),
        0,
        "removed backend b2 still answered: {tally:?}"
    );
    assert_eq!(tally.failures, 0, "with 2 backends: {tally:?}");
    for name in ["b0", "b1"] {
        assert!(
            tally.count(name) >= 30,
            "backend {name} answered {} of 150 requests (want >= 20%): {tally:?}",
            tally.count(name)
        );
    }
    let status = daemon.stop();
    assert!(status.success(), "lb exited with {status} on SIGTERM");
}

#[test]
fn bad_config_is_one_clear_line_and_attaches_nothing() {
    require_root();
    let topo = Topology::new("lbe3", 1);
    let ext = topo.client_host_if();
    let before = attachments(&ext);
    assert!(before.is_empty(), "attached before the test: {before}");
    let backend = format!("{}:{WEB_BACKEND_PORT}", topo.backend_addr(0));
    let web = |vip: &str, backends: &[String]| ServiceConfig::new("web", vip, "tcp", backends);
    let one = std::slice::from_ref(&backend);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            // A real interface first: a half-done attach must be undone.
            "unknown interface",
            render_config(&[&ext, "nosuchif0"], &[web("198.18.101.1:80", one)]),
            "external",
        ),
        (
            "bad port",
            render_config(&[&ext], &[web("198.18.101.1:99999", one)]),
            "vip",
        ),
        (
            "duplicate service name",
            render_config(
                &[&ext],
                &[web("198.18.101.1:80", one), web("198.18.101.1:81", one)],
            ),
            "name",
        ),
        (
            "weight 0",
            render_config(
                &[&ext],
                &[web("198.18.101.1:80", &[format!("{backend}@0")])],
            ),
            "backends",
        ),
    ];

    let binary = lb_binary();
    let dir = TempDir::new("e2e-bad");
    for (what, text, field) in cases {
        let path = dir.write("bad.toml", &text);
        let out = output_with_timeout(
            Command::new(&binary).arg("run").arg("--config").arg(&path),
            Duration::from_secs(10),
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{what}: lb said: {}", stderr.trim());
        let context = format!(
            "config with {what}:\n{text}\nexit: {}\nstdout:\n{}\nstderr:\n{stderr}",
            out.status,
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(!out.status.success(), "lb accepted a {context}");
        assert!(
            out.status.code().is_some(),
            "lb died of a signal on a {context}"
        );
        assert!(
            stderr.contains(field),
            "stderr does not name the field `{field}` for a {context}"
        );
        assert!(!stderr.contains("panicked"), "lb panicked on a {context}");
        let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
        assert!(
            lines <= 5,
            "{lines} lines is not a short, clear error for a {context}"
        );
        let after = attachments(&ext);
        assert!(
            after.is_empty(),
            "something left attached after a {context}\n{after}"
        );
    }
}
