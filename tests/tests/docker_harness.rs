//! Tests of the Docker part of the harness (`lb_harness::docker_engine`)
//! against a real engine (no `lb` daemon needed). Run as root:
//! `cargo test --release -p lb-tests --test docker_harness -- --test-threads=1`.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    time::Duration,
};

use lb_harness::{
    docker_engine::{
        docker_ok, echo_cmd, wait_for, Container, Engine, RunOpts, HTTP_PORT, OTHER_IMAGE,
    },
    http_get_here, require_root, CLIENT_TIMEOUT,
};

/// Waits (10 s) until `c` answers `GET /` on its address and port
/// [`HTTP_PORT`], and checks that it answers with its own name.
fn assert_answers_with_name(c: &Container) {
    let addr = SocketAddrV4::new(c.ip(), HTTP_PORT);
    let mut last = Err(String::new());
    wait_for(
        Duration::from_secs(10),
        &format!("container {} to answer HTTP on {addr}", c.name()),
        || {
            last = http_get_here(addr);
            last.is_ok()
        },
    );
    let body = last.expect("answered");
    assert_eq!(body.trim(), c.name(), "{addr} answered with another name");
}

fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .expect("reading ip_forward")
        .trim()
        .to_owned()
}

fn container_names() -> Vec<String> {
    docker_ok(&["ps", "-a", "--format", "{{.Names}}"])
        .lines()
        .map(str::to_owned)
        .collect()
}

#[test]
fn containers_answer_with_their_names_and_are_removed() {
    require_root();
    let forwarding = ip_forward();
    let names = ["lbdh-a", "lbdh-b"];
    {
        let engine = Engine::ensure();
        {
            let a = engine.run(names[0], RunOpts::default().label("lb.test", "a"));
            let b = engine.run(names[1], RunOpts::default());
            assert_eq!(a.inspect("{{index .Config.Labels \"lb.test\"}}"), "a");
            for c in [&a, &b] {
                let ip = c.ip();
                assert_eq!(
                    ip.octets()[..3],
                    [198, 18, 0],
                    "{} is not on docker0",
                    c.name()
                );
                assert_answers_with_name(c);
            }

            b.kill_process();
            wait_for(
                Duration::from_secs(10),
                "the engine to see lbdh-b's main process killed",
                || !b.is_running(),
            );
            assert!(a.is_running(), "killing lbdh-b stopped lbdh-a too");
            assert_answers_with_name(&a);
        }
        let left: Vec<String> = container_names()
            .into_iter()
            .filter(|n| names.contains(&n.as_str()))
            .collect();
        assert!(
            left.is_empty(),
            "containers left after their guards dropped: {left:?}"
        );
    }
    assert_eq!(ip_forward(), forwarding, "the engine changed ip_forward");
}

#[test]
fn engine_stops_and_starts_again_and_still_knows_its_containers() {
    require_root();
    let mut engine = Engine::ensure();
    let c = engine.run("lbdh-s", RunOpts::default());
    assert_answers_with_name(&c);

    engine.stop();
    assert!(!engine.is_up(), "the engine still answers after stop()");
    engine.start();
    assert!(engine.is_up(), "the engine does not answer after start()");

    assert_eq!(c.inspect("{{.Name}}"), "/lbdh-s");
    assert!(
        !c.is_running(),
        "lbdh-s runs although the engine was stopped"
    );
    docker_ok(&["start", c.id()]);
    assert_answers_with_name(&c);
}

#[test]
fn networks_health_checks_echo_servers_and_the_other_image() {
    require_root();
    let engine = Engine::ensure();
    let port = 7000;
    let image = engine.image();
    let other = engine.other_image();
    assert_eq!(other, OTHER_IMAGE);
    let id = |tag: &str| docker_ok(&["image", "inspect", "--format", "{{.Id}}", tag]);
    assert_ne!(id(&image), id(&other), "the two images have the same id");

    let net = engine.network("lbdh-net", 250);
    assert_eq!(net.subnet(), "198.19.250.0/24");
    let c = engine.run(
        "lbdh-e",
        RunOpts::default()
            .image(&other)
            .network(net.name())
            .cmd(echo_cmd(port))
            .health("ls /", Duration::from_secs(1)),
    );
    assert_eq!(c.inspect("{{.Config.Image}}"), OTHER_IMAGE);
    let ip = c.ip();
    assert_eq!(ip.octets()[..3], [198, 19, 250], "{ip} is not on lbdh-net");
    wait_for(Duration::from_secs(15), "lbdh-e to be healthy", || {
        c.inspect("{{.State.Health.Status}}") == "healthy"
    });

    // Two connections held open at once, each echoed.
    let addr = SocketAddrV4::new(ip, port);
    let mut conns: Vec<TcpStream> = Vec::new();
    wait_for(
        Duration::from_secs(10),
        &format!("{addr} to accept"),
        || match TcpStream::connect_timeout(&addr.into(), CLIENT_TIMEOUT) {
            Ok(s) => {
                conns.push(s);
                true
            }
            Err(_) => false,
        },
    );
    conns
        .push(TcpStream::connect_timeout(&addr.into(), CLIENT_TIMEOUT).expect("second connection"));
    for round in 0..2 {
        for (i, conn) in conns.iter_mut().enumerate() {
            conn.set_read_timeout(Some(CLIENT_TIMEOUT))
                .expect("timeout");
            let line = format!("conn {i} round {round}\n");
            conn.write_all(line.as_bytes()).expect("send");
            let mut buf = vec![0u8; line.len()];
            conn.read_exact(&mut buf)
                .unwrap_or_else(|e| panic!("echo of {line:?} on {addr}: {e}"));
            assert_eq!(String::from_utf8_lossy(&buf), line);
        }
    }
}
