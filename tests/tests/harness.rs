//! Tests of the harness itself (no `lb` daemon needed). Run as root:
//! `cargo test -p lb-tests --test harness -- --test-threads=1`.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream, UdpSocket},
    panic::{catch_unwind, AssertUnwindSafe},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use lb_harness::{
    cmd::{run, run_ok},
    forward_policy, http_get, http_get_here, http_tally,
    netns::list_netns,
    output_with_timeout, require_root,
    topology::LINK_ALIAS,
    udp_roundtrip, udp_roundtrip_here, udp_tally, Daemon, ForwardDrop, HttpServer, Netns, TempDir,
    Topology, UdpEcho,
};

fn host_links() -> String {
    String::from_utf8_lossy(&run("ip", &["-o", "link", "show"]).stdout).into_owned()
}

fn link_names() -> Vec<String> {
    host_links()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .map(|n| {
            n.trim_end_matches(':')
                .split('@')
                .next()
                .unwrap_or("")
                .to_owned()
        })
        .collect()
}

fn lo_addrs() -> String {
    String::from_utf8_lossy(&run("ip", &["-4", "addr", "show", "dev", "lo"]).stdout).into_owned()
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default()
}

#[test]
fn topology_is_built_as_documented_and_torn_down_completely() {
    require_root();
    let namespaces = ["lbh1-c", "lbh1-b0", "lbh1-b1"];
    // Someone else's VIP (not ours) may be there already: then it stays.
    let vip_before = lo_addrs().contains("198.18.101.1/32");
    let links = ["lbh1c0", "lbh1b0", "lbh1b1"];
    {
        let topo = Topology::new("lbh1", 2);
        let listed = list_netns();
        for ns in namespaces {
            assert!(
                listed.iter().any(|n| n == ns),
                "namespace {ns} missing: {listed:?}"
            );
        }
        let names = link_names();
        for link in links {
            assert!(
                names.iter().any(|n| n == link),
                "link {link} missing: {names:?}"
            );
        }
        assert_eq!(topo.client_host_if(), "lbh1c0");
        assert_eq!(topo.backend_host_if(1), "lbh1b1");
        assert_eq!(topo.backend_addr(1), Ipv4Addr::new(198, 18, 104, 2));
        assert_eq!(topo.backend_host_addr(0), Ipv4Addr::new(198, 18, 103, 1));
        assert_eq!(topo.client_addr(), Ipv4Addr::new(198, 18, 100, 2));
        assert_eq!(topo.vip(), Ipv4Addr::new(198, 18, 101, 1));
        assert_eq!(
            topo.backend_endpoints(80),
            ["198.18.103.2:80", "198.18.104.2:80"]
        );
        assert_eq!(topo.client.name(), "lbh1-c");
        assert_eq!(topo.backends[1].name(), "lbh1-b1");

        let host_c0 =
            String::from_utf8_lossy(&run("ip", &["-4", "addr", "show", "dev", "lbh1c0"]).stdout)
                .into_owned();
        assert!(
            host_c0.contains("198.18.100.1/24") && host_c0.contains("UP"),
            "{host_c0}"
        );
        assert!(
            lo_addrs().contains("198.18.101.1/32"),
            "VIP missing on lo:\n{}",
            lo_addrs()
        );

        let client_addr = topo.client.ip(&["-4", "addr", "show", "dev", "eth0"]);
        assert!(client_addr.contains("198.18.100.2/24"), "{client_addr}");
        let client_route = topo.client.ip(&["route", "show", "default"]);
        assert!(
            client_route.contains("via 198.18.100.1 dev eth0"),
            "{client_route}"
        );
        let b1_addr = topo.backends[1].ip(&["-4", "addr", "show"]);
        assert!(
            b1_addr.contains("198.18.104.2/24") && b1_addr.contains("127.0.0.1"),
            "{b1_addr}"
        );
        let b1_route = topo.backends[1].ip(&["route", "show", "default"]);
        assert!(b1_route.contains("via 198.18.104.1 dev eth0"), "{b1_route}");

        // A fresh veth: GRO off, nothing attached.
        topo.assert_client_side_pristine();
        let attached = lb_harness::attachments(&topo.client_host_if());
        assert!(attached.is_empty(), "{attached}");
    }
    let listed = list_netns();
    for ns in namespaces {
        assert!(
            !listed.iter().any(|n| n == ns),
            "namespace {ns} left behind: {listed:?}"
        );
    }
    let names = link_names();
    for link in links {
        assert!(
            !names.iter().any(|n| n == link),
            "link {link} left behind: {names:?}"
        );
    }
    assert_eq!(
        lo_addrs().contains("198.18.101.1/32"),
        vip_before,
        "VIP on lo not as before the topology:\n{}",
        lo_addrs()
    );
}

/// Deletes the hand-made "stale" objects even if the test fails.
struct StaleCleanup;

impl Drop for StaleCleanup {
    fn drop(&mut self) {
        for link in ["lbh2b0", "lbh9c0", "lbh8x0"] {
            let _ = run("ip", &["link", "del", link]);
        }
        let _ = run("ip", &["netns", "del", "lbh2-c"]);
    }
}

#[test]
fn topology_replaces_stale_objects_of_a_crashed_run_but_nothing_else() {
    require_root();
    let _cleanup = StaleCleanup;
    // What a killed run could leave: its namespace, a host link, and a veth
    // of another prefix (marked as the harness's) holding the client subnet.
    run_ok("ip", &["netns", "add", "lbh2-c"]);
    run_ok(
        "ip",
        &[
            "link", "add", "lbh2b0", "type", "veth", "peer", "name", "lbh2x0",
        ],
    );
    run_ok(
        "ip",
        &[
            "link", "add", "lbh9c0", "type", "veth", "peer", "name", "lbh9x0",
        ],
    );
    run_ok("ip", &["link", "set", "dev", "lbh9c0", "alias", LINK_ALIAS]);
    run_ok("ip", &["addr", "add", "198.18.100.1/24", "dev", "lbh9c0"]);
    {
        let topo = Topology::new("lbh2", 1);
        let names = link_names();
        assert!(
            !names.iter().any(|n| n == "lbh9c0" || n == "lbh2x0"),
            "stale links kept: {names:?}"
        );
        let server = HttpServer::start(&topo.backends[0], 8081, "b0");
        assert_eq!(
            http_get_here(SocketAddrV4::new(topo.backend_addr(0), 8081)).as_deref(),
            Ok("b0")
        );
        drop(server);
    }

    // A link the harness did not make, holding a needed subnet: refuse, and
    // leave it alone.
    run_ok(
        "ip",
        &[
            "link", "add", "lbh8x0", "type", "veth", "peer", "name", "lbh8y0",
        ],
    );
    run_ok("ip", &["addr", "add", "198.18.103.1/24", "dev", "lbh8x0"]);
    let caught = catch_unwind(|| Topology::new("lbh2", 1));
    let message = panic_message(caught.expect_err("must refuse"));
    assert!(
        message.contains("lbh8x0") && message.contains("did not create"),
        "{message}"
    );
    assert!(
        link_names().iter().any(|n| n == "lbh8x0"),
        "someone else's link was deleted"
    );
    assert!(
        !list_netns().iter().any(|n| n == "lbh2-c"),
        "namespace left after refusal"
    );
}

#[test]
fn netns_run_enters_the_namespace_and_sockets_stay_there() {
    require_root();
    let ns = Netns::new("lbh3-x");
    let host_ns = std::fs::read_link("/proc/thread-self/ns/net").expect("host netns");
    let (inside, spawned) = ns.run(|| {
        let me = std::fs::read_link("/proc/thread-self/ns/net").expect("netns link");
        let child = std::thread::spawn(|| {
            std::fs::read_link("/proc/thread-self/ns/net").expect("netns link")
        })
        .join()
        .expect("child thread");
        (me, child)
    });
    assert_ne!(inside, host_ns, "Netns::run did not change the namespace");
    assert_eq!(
        spawned, inside,
        "threads spawned inside run() start in the namespace"
    );
    let after = std::fs::read_link("/proc/thread-self/ns/net").expect("host netns");
    assert_eq!(
        after, host_ns,
        "the caller's thread must stay in the host namespace"
    );

    // A socket made inside stays inside: lo is down in a fresh namespace, so
    // a connect to 127.0.0.1 fails there, while the host's lo works.
    let udp = ns.run(|| UdpSocket::bind("0.0.0.0:0").expect("bind"));
    let err = udp
        .send_to(b"x", "127.0.0.1:9")
        .expect_err("lo is down in a fresh namespace");
    assert_eq!(err.raw_os_error(), Some(libc::ENETUNREACH), "{err}");

    // A panic inside is propagated with its message.
    let caught = catch_unwind(AssertUnwindSafe(|| ns.run(|| panic!("inside {}", 42))));
    assert_eq!(
        panic_message(caught.expect_err("must propagate")),
        "inside 42"
    );

    let out = ns.exec(&["ip", "-o", "link", "show"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("lo:") && !text.contains("eth0"),
        "{text}"
    );
    drop(ns);
    assert!(
        !list_netns().iter().any(|n| n == "lbh3-x"),
        "namespace not deleted"
    );
}

#[test]
fn http_server_answers_in_its_namespace_and_from_the_host() {
    require_root();
    let topo = Topology::new("lbh4", 1);
    let server = HttpServer::start(&topo.backends[0], 8080, "b0");
    let own = SocketAddrV4::new(topo.backend_addr(0), 8080);
    // From inside the backend namespace, to its own and its loopback address.
    assert_eq!(http_get(&topo.backends[0], own).as_deref(), Ok("b0"));
    assert_eq!(
        http_get(
            &topo.backends[0],
            SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080)
        )
        .as_deref(),
        Ok("b0")
    );
    // From the host, over the connected route through the veth.
    assert_eq!(http_get_here(own).as_deref(), Ok("b0"));

    let tally = http_tally(&topo.backends[0], own, 50, Duration::from_secs(30));
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(tally.count("b0"), 50, "{tally:?}");
    assert_eq!(tally.successes(), 50);
    // The server counts a request once the answer is written; give the last
    // connection thread a moment.
    let deadline = Instant::now() + Duration::from_secs(2);
    while server.served() < 53 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(server.served(), 53);

    // Nothing listens on 8081: a clear error, not a hang.
    let started = Instant::now();
    let err =
        http_get_here(SocketAddrV4::new(topo.backend_addr(0), 8081)).expect_err("no server there");
    assert!(
        err.contains("connect") && started.elapsed() < Duration::from_secs(3),
        "{err}"
    );

    // Dropping stops it promptly, and the port is closed afterwards.
    let started = Instant::now();
    drop(server);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        started.elapsed()
    );
    let refused = TcpStream::connect_timeout(&SocketAddr::V4(own), Duration::from_secs(2));
    assert!(refused.is_err(), "still accepting after drop");
}

#[test]
fn http_server_serves_concurrent_connections() {
    require_root();
    let topo = Topology::new("lbh5", 1);
    let _server = HttpServer::start(&topo.backends[0], 8080, "b0");
    let addr = SocketAddrV4::new(topo.backend_addr(0), 8080);
    // A client that connects and sends nothing must not block others.
    let idle =
        TcpStream::connect_timeout(&SocketAddr::V4(addr), Duration::from_secs(2)).expect("connect");
    let started = Instant::now();
    assert_eq!(http_get_here(addr).as_deref(), Ok("b0"));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "served behind an idle connection"
    );
    drop(idle);
}

#[test]
fn udp_echo_answers_in_its_namespace_and_from_the_host() {
    require_root();
    let topo = Topology::new("lbh6", 2);
    let echo0 = UdpEcho::start(&topo.backends[0], 9000, "b0");
    let _echo1 = UdpEcho::start(&topo.backends[1], 9000, "b1");
    let own = SocketAddrV4::new(topo.backend_addr(0), 9000);
    assert_eq!(
        udp_roundtrip(&topo.backends[0], own, "hello").as_deref(),
        Ok("b0:hello")
    );

    let reply =
        udp_roundtrip_here(SocketAddrV4::new(topo.backend_addr(1), 9000), "hi").expect("from host");
    assert_eq!(reply.body, "b1:hi");
    assert_eq!(
        reply.from,
        SocketAddr::V4(SocketAddrV4::new(topo.backend_addr(1), 9000))
    );

    let tally = udp_tally(&topo.backends[0], own, 20, Duration::from_secs(20));
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(tally.counts.get("b0"), Some(&20), "{tally:?}");
    let mut ports: Vec<u16> = tally.replies.iter().map(|r| r.local.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 20, "source ports must be distinct: {ports:?}");
    assert!(tally.replies.iter().all(|r| r.from == SocketAddr::V4(own)));
    assert_eq!(echo0.served(), 21);

    // No server: an error after the timeout, not a hang.
    let started = Instant::now();
    let err = udp_roundtrip(
        &topo.backends[0],
        SocketAddrV4::new(topo.backend_addr(0), 9001),
        "x",
    )
    .expect_err("nobody listens");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}: {err}",
        started.elapsed()
    );

    let started = Instant::now();
    drop(echo0);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        started.elapsed()
    );
    assert!(
        udp_roundtrip(&topo.backends[0], own, "again").is_err(),
        "still echoing after drop"
    );
}

#[test]
fn forward_drop_sets_drop_and_restores_the_policy() {
    require_root();
    let before = forward_policy();
    {
        let outer = ForwardDrop::new();
        assert_eq!(outer.saved_policy(), before);
        assert_eq!(forward_policy(), "DROP");
        {
            let inner = ForwardDrop::new();
            assert_eq!(inner.saved_policy(), "DROP");
        }
        assert_eq!(forward_policy(), "DROP");
    }
    assert_eq!(forward_policy(), before);
    // Restored on panic too.
    let caught = catch_unwind(|| {
        let _guard = ForwardDrop::new();
        panic!("boom");
    });
    assert!(caught.is_err());
    assert_eq!(forward_policy(), before);
}

#[test]
fn daemon_guard_waits_for_ready_collects_output_and_stops() {
    let dir = TempDir::new("harness");
    let script = dir.write(
        "fake-lb.sh",
        "echo \"args: $*\"\necho 'INFO data path ready' >&2\ntrap 'echo terminated; exit 0' TERM\n\
         i=0; while [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\nexit 7\n",
    );
    let sh = Path::new("/bin/sh");
    let script = script.to_str().expect("utf-8 path");
    let mut daemon = Daemon::start_program(
        sh,
        &[script, "run", "--config", "x"],
        &[],
        "data path ready",
        Duration::from_secs(10),
    );
    assert!(daemon.is_running());
    assert!(
        daemon.wait_for_output("args: run --config x", Duration::from_secs(2)),
        "{}",
        daemon.output()
    );
    let status = daemon.stop();
    assert!(status.success(), "{status}");

    // Exiting before the marker: a panic carrying the output.
    let caught = catch_unwind(|| {
        Daemon::start_program(
            sh,
            &["-c", "echo 'bad config: vip'; exit 3"],
            &[],
            "ready",
            Duration::from_secs(10),
        )
    });
    let message = panic_message(caught.expect_err("must panic"));
    assert!(
        message.contains("bad config: vip") && message.contains("exited"),
        "{message}"
    );

    // Never ready: a panic after the timeout, and the process is stopped.
    let started = Instant::now();
    let caught = catch_unwind(|| {
        Daemon::start_program(
            sh,
            &["-c", "echo waiting; exec sleep 20"],
            &[],
            "ready",
            Duration::from_millis(500),
        )
    });
    let message = panic_message(caught.expect_err("must panic"));
    assert!(
        message.contains("did not log") && message.contains("waiting"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );

    let path = dir.path().to_owned();
    drop(dir);
    assert!(!path.exists(), "TempDir not removed");
}

#[test]
fn output_with_timeout_returns_output_or_kills() {
    let out = output_with_timeout(
        Command::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 4"]),
        Duration::from_secs(5),
    );
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");

    let started = Instant::now();
    let caught = catch_unwind(|| {
        output_with_timeout(
            Command::new("/bin/sh").args(["-c", "echo partial; exec sleep 30"]),
            Duration::from_millis(300),
        )
    });
    let message = panic_message(caught.expect_err("must time out"));
    assert!(
        message.contains("partial") && message.contains("killed"),
        "{message}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}
