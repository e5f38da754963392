//! End to end with a real Docker engine (never a mock): containers join and
//! leave services by themselves while `lb run` follows the engine. Run as
//! root, one at a time: `cargo test -p lb-tests --test e2e_docker --
//! --test-threads=1`.
//!
//! Every container runs two servers (`reliability::http_and_echo_cmd`): HTTP on 8080 answering
//! its own name, and on 9000 a stream server that greets each connection
//! with its name and then echoes, to hold connections and see where they
//! went. Two services use them:
//! - `web` (VIP port 80): containers labelled `lb.service=web`, `lb.port=8080`;
//! - `echo` (VIP port 9000): the image rule `image = IMAGE`, `target_port = 9000`,
//!   which takes the containers without an `lb.service` label (a labelled
//!   container serves its label's service alone: see `e2e_membership`).

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb::api::types::{BackendInfo, BackendState, Stats, Status};
use lb_harness::{
    docker_engine::{Container, Engine, RunOpts, IMAGE},
    http_tally,
    ops::{stop_with_output, with_pin_path, LbCli, PinDir},
    reliability::{http_and_echo_cmd, labelled, rolling_update, ROLLING_CONTAINERS},
    require_root, run_ok,
    stream::StreamConn,
    Daemon, HttpTally, TempDir, Topology, READY_MARKER,
};

/// How long the daemon may take to attach and write its maps.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a change in the engine may take to show in `lb backend ls`
/// (bounded polling: the figure itself is measured by `cargo xtask bench`).
const SETTLE: Duration = Duration::from_secs(10);
const WEB_PORT: u16 = 80;
const ECHO_PORT: u16 = 9000;

/// One test's daemon files: config, socket, pins.
struct Files {
    _pins: PinDir,
    config: PathBuf,
    socket: PathBuf,
    _dir: TempDir,
}

impl Files {
    fn new(topo: &Topology) -> Files {
        Files::with_mode(topo, "auto")
    }

    /// With `datapath.mode = mode`.
    fn with_mode(topo: &Topology, mode: &str) -> Files {
        Files::with(topo, mode, "nat")
    }

    /// With `datapath.mode = mode` and `echo` forwarded by `echo_forwarding`.
    fn with(topo: &Topology, mode: &str, echo_forwarding: &str) -> Files {
        let pins = PinDir::new(&format!("/sys/fs/bpf/lb-e2e-{}", topo.prefix()));
        let dir = TempDir::new(&format!("docker-{}", topo.prefix()));
        let vip = topo.vip();
        let text = format!(
            "[datapath]\nexternal = [\"{ext}\"]\nmode = \"{mode}\"\n\n[docker]\nenabled = true\n\n\
             [[service]]\nname = \"web\"\nvip = \"{vip}:{WEB_PORT}\"\n\n\
             [[service]]\nname = \"echo\"\nvip = \"{vip}:{ECHO_PORT}\"\n\
             image = \"{IMAGE}\"\ntarget_port = 9000\nforwarding = \"{echo_forwarding}\"\n",
            ext = topo.client_host_if()
        );
        let config = dir.write("lb.toml", &with_pin_path(&text, pins.as_str()));
        Files {
            _pins: pins,
            config,
            socket: dir.path().join("lb.sock"),
            _dir: dir,
        }
    }

    fn start(&self) -> Daemon {
        self.start_with(&[])
    }

    fn start_with(&self, extra: &[&str]) -> Daemon {
        let s = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
        let (config, socket) = (s(&self.config), s(&self.socket));
        let mut args = vec!["run", "--config", &config, "--socket", &socket];
        args.extend_from_slice(extra);
        Daemon::start(&args, READY_MARKER, READY_TIMEOUT)
    }

    fn cli(&self) -> LbCli {
        LbCli::new(&self.socket)
    }
}

fn backends(cli: &LbCli, service: &str) -> Vec<BackendInfo> {
    cli.json(&["backend", "ls", service, "--json"])
}

/// Names of `service`'s containers in `state`.
fn containers_in(cli: &LbCli, service: &str, state: BackendState) -> BTreeSet<String> {
    backends(cli, service)
        .into_iter()
        .filter(|b| b.state == state)
        .filter_map(|b| b.container)
        .collect()
}

fn names(cs: &[&Container]) -> BTreeSet<String> {
    cs.iter().map(|c| c.name().to_owned()).collect()
}

/// Waits (bounded) until `service`'s active containers are exactly `want`.
fn wait_active(cli: &LbCli, daemon: &Daemon, service: &str, want: &BTreeSet<String>) {
    let end = Instant::now() + SETTLE;
    loop {
        let now = containers_in(cli, service, BackendState::Active);
        if &now == want {
            return;
        }
        assert!(
            Instant::now() < end,
            "{service}'s active containers are {now:?}, not {want:?}, after {SETTLE:?}; \
             backends: {:#?}\ndaemon output:\n{}",
            backends(cli, service),
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn web_tally(topo: &Topology, n: usize) -> HttpTally {
    http_tally(
        &topo.client,
        SocketAddrV4::new(topo.vip(), WEB_PORT),
        n,
        Duration::from_secs(60),
    )
}

fn echo_addr(topo: &Topology) -> SocketAddrV4 {
    SocketAddrV4::new(topo.vip(), ECHO_PORT)
}

/// Holds `n` connections to the echo service and checks each greeting came
/// from one of `among`.
fn hold(topo: &Topology, n: usize, among: &BTreeSet<String>) -> Vec<StreamConn> {
    (0..n)
        .map(|i| {
            let c = StreamConn::connect(&topo.client, echo_addr(topo))
                .unwrap_or_else(|e| panic!("held connection {i}: {e}"));
            assert!(
                among.contains(c.backend()),
                "held connection {i} greeted by {:?}, not one of {among:?}",
                c.backend()
            );
            c
        })
        .collect()
}

#[test]
fn containers_join_and_leave_the_service_by_themselves() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbd1", 0);
    let files = Files::new(&topo);
    let w: Vec<Container> = (1..=3)
        .map(|i| engine.run(&format!("lbd1-w{i}"), labelled()))
        .collect();
    let daemon = files.start();
    let cli = files.cli();
    let three = names(&[&w[0], &w[1], &w[2]]);
    wait_active(&cli, &daemon, "web", &three);

    // Each backend entry is the container's address on its network.
    for b in backends(&cli, "web") {
        let c = w
            .iter()
            .find(|c| Some(c.name()) == b.container.as_deref())
            .unwrap();
        assert_eq!(b.address, format!("{}:8080", c.ip()));
    }
    let tally = web_tally(&topo, 90);
    assert_eq!(tally.failures, 0, "{tally:?}");
    for c in &w {
        assert!(
            tally.count(c.name()) >= 10,
            "{} answered {} of 90: {tally:?}",
            c.name(),
            tally.count(c.name())
        );
    }

    // A fourth container: traffic with no other action.
    let w4 = engine.run("lbd1-w4", labelled());
    let four: BTreeSet<String> = three.iter().cloned().chain([w4.name().into()]).collect();
    wait_active(&cli, &daemon, "web", &four);
    let tally = web_tally(&topo, 120);
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert!(tally.count(w4.name()) >= 10, "the new container: {tally:?}");

    // A container killed leaves at once. (Labelled containers serve web
    // alone, whose HTTP connections do not stay open: connections held on
    // survivors while others die are tested through echo, below.)
    let victim = w[0].name().to_owned();
    w[0].kill();
    let rest: BTreeSet<String> = four.iter().filter(|n| **n != victim).cloned().collect();
    wait_active(&cli, &daemon, "web", &rest);
    let tally = web_tally(&topo, 90);
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(
        tally.count(&victim),
        0,
        "the killed container answered: {tally:?}"
    );
    let status: Status = cli.json(&["status", "--json"]);
    assert!(status.docker.starts_with("connected"), "{}", status.docker);
    drop(daemon);
}

#[test]
fn an_image_rule_takes_its_image_and_no_other() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbd2", 0);
    let files = Files::new(&topo);
    let mine: Vec<Container> = (1..=2)
        .map(|i| {
            engine.run(
                &format!("lbd2-m{i}"),
                RunOpts::default().cmd(http_and_echo_cmd()),
            )
        })
        .collect();
    let other_image = engine.other_image();
    let other = engine.run(
        "lbd2-o1",
        RunOpts::default()
            .cmd(http_and_echo_cmd())
            .image(&other_image),
    );
    let daemon = files.start();
    let cli = files.cli();
    let want = names(&[&mine[0], &mine[1]]);
    wait_active(&cli, &daemon, "echo", &want);
    // Started after the daemon: joins by its image too.
    let m3 = engine.run("lbd2-m3", RunOpts::default().cmd(http_and_echo_cmd()));
    let want = names(&[&mine[0], &mine[1], &m3]);
    wait_active(&cli, &daemon, "echo", &want);
    assert!(
        backends(&cli, "echo")
            .iter()
            .all(|b| b.address.ends_with(":9000")),
        "target_port not used: {:#?}",
        backends(&cli, "echo")
    );
    let held = hold(&topo, 24, &want);
    let seen: BTreeSet<&str> = held.iter().map(StreamConn::backend).collect();
    assert!(!seen.contains(other.name()));
    assert!(seen.len() >= 2, "24 connections all went to {seen:?}");
    // Unlabelled containers are not web backends.
    assert!(backends(&cli, "web").is_empty());
}

#[test]
fn after_the_engine_restarts_the_maps_match_it_exactly() {
    require_root();
    let mut engine = Engine::ensure();
    let topo = Topology::new("lbd3", 0);
    let files = Files::new(&topo);
    let keep = engine.run("lbd3-keep", labelled().restart_always());
    let gone = engine.run("lbd3-gone", labelled());
    let daemon = files.start();
    let cli = files.cli();
    wait_active(&cli, &daemon, "web", &names(&[&keep, &gone]));

    // The engine goes away: its shutdown stops every container, and only
    // `keep` (restart policy "always") comes back with it.
    engine.stop();
    std::thread::sleep(Duration::from_millis(500));
    let status: Status = cli.json(&["status", "--json"]);
    assert!(
        status.docker.starts_with("disconnected"),
        "docker status while the engine is down: {}",
        status.docker
    );
    engine.start();
    // Changed as soon as the engine is back, racing the watcher's reconnect.
    let late = engine.run("lbd3-late", labelled());
    let want = names(&[&keep, &late]);
    wait_active(&cli, &daemon, "web", &want);
    assert!(!keep.ip().is_unspecified());
    let addrs: BTreeSet<String> = backends(&cli, "web")
        .into_iter()
        .map(|b| b.address)
        .collect();
    let engine_addrs: BTreeSet<String> = [&keep, &late]
        .iter()
        .map(|c| format!("{}:8080", c.ip()))
        .collect();
    assert_eq!(addrs, engine_addrs, "the maps do not match the engine");
    let tally = web_tally(&topo, 40);
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(tally.count(gone.name()), 0);
    assert_eq!(
        tally.successes(),
        tally.count(keep.name()) + tally.count(late.name())
    );
    let status: Status = cli.json(&["status", "--json"]);
    assert!(status.docker.starts_with("connected"), "{}", status.docker);
}

#[test]
fn a_held_connection_survives_other_containers_coming_and_going() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbd4", 0);
    let files = Files::new(&topo);
    let first: Vec<Container> = (1..=3)
        .map(|i| {
            engine.run(
                &format!("lbd4-a{i}"),
                RunOpts::default().cmd(http_and_echo_cmd()),
            )
        })
        .collect();
    let daemon = files.start();
    let cli = files.cli();
    let all = names(&[&first[0], &first[1], &first[2]]);
    wait_active(&cli, &daemon, "echo", &all);
    let mut held = hold(&topo, 1, &all).pop().unwrap();
    let owner = held.backend().to_owned();
    let mut seq = 0u32;
    let mut echo = |held: &mut StreamConn, what: &str| {
        for _ in 0..20 {
            seq += 1;
            held.echo(format!("{seq}\n").as_bytes())
                .unwrap_or_else(|e| panic!("held connection to {owner} after {what}: {e}"));
        }
    };
    echo(&mut held, "connecting");
    let more: Vec<Container> = (1..=2)
        .map(|i| {
            engine.run(
                &format!("lbd4-b{i}"),
                RunOpts::default().cmd(http_and_echo_cmd()),
            )
        })
        .collect();
    let mut now = all.clone();
    now.extend(names(&[&more[0], &more[1]]));
    wait_active(&cli, &daemon, "echo", &now);
    echo(&mut held, "two containers started");
    for c in first.iter().filter(|c| c.name() != owner) {
        c.kill_process();
        now.remove(c.name());
    }
    wait_active(&cli, &daemon, "echo", &now);
    echo(&mut held, "two containers died");
    assert_eq!(held.backend(), owner);
}

#[test]
fn a_malformed_label_skips_that_container_with_one_log_line() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbd5", 0);
    let files = Files::new(&topo);
    let good = engine.run("lbd5-good", labelled());
    let bad = engine.run(
        "lbd5-bad",
        RunOpts::default()
            .cmd(http_and_echo_cmd())
            .label("lb.service", "web")
            .label("lb.port", "http"),
    );
    let daemon = files.start();
    let cli = files.cli();
    wait_active(&cli, &daemon, "web", &names(&[&good]));
    // Another change makes the daemon work membership out again: the
    // problem is still only logged once.
    let good2 = engine.run("lbd5-good2", labelled());
    wait_active(&cli, &daemon, "web", &names(&[&good, &good2]));
    let tally = web_tally(&topo, 40);
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(tally.count(bad.name()), 0);
    let out = daemon.output();
    let lines: Vec<&str> = out.lines().filter(|l| l.contains(bad.name())).collect();
    assert_eq!(
        lines.len(),
        1,
        "want one line about {}: {lines:#?}",
        bad.name()
    );
    assert!(
        lines[0].contains("lb.port=\\\"http\\\"") || lines[0].contains("lb.port=\"http\""),
        "the line does not name the label: {}",
        lines[0]
    );
    assert!(!out.contains("panicked"));
}

#[test]
fn an_unhealthy_container_is_drained_and_comes_back_when_healthy() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbd6", 0);
    let files = Files::new(&topo);
    // Unlabelled: both serve echo by the image rule, whose connections
    // stay open.
    let plain = engine.run("lbd6-plain", RunOpts::default().cmd(http_and_echo_cmd()));
    let checked = engine.run(
        "lbd6-checked",
        RunOpts::default()
            .cmd(http_and_echo_cmd())
            .health("test ! -e /tmp/sick", Duration::from_millis(300)),
    );
    let daemon = files.start();
    let cli = files.cli();
    wait_active(&cli, &daemon, "echo", &names(&[&plain, &checked]));

    // Held connections to the checked container.
    let both = names(&[&plain, &checked]);
    let mut held: Vec<StreamConn> = hold(&topo, 12, &both)
        .into_iter()
        .filter(|h| h.backend() == checked.name())
        .collect();
    assert!(
        !held.is_empty(),
        "no held connection reached {}",
        checked.name()
    );

    checked.exec(&["sh", "-c", ": > /tmp/sick"]);
    wait_active(&cli, &daemon, "echo", &names(&[&plain]));
    assert_eq!(
        containers_in(&cli, "echo", BackendState::Draining),
        names(&[&checked])
    );
    // Drained: existing flows finish, new ones go elsewhere.
    for h in &mut held {
        h.echo(b"still here\n")
            .expect("a drained container's flow broke");
    }
    hold(&topo, 12, &names(&[&plain]));

    checked.exec(&["rm", "/tmp/sick"]);
    wait_active(&cli, &daemon, "echo", &both);
}

#[test]
fn a_restart_keeps_container_backends_and_their_connections() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbd7", 0);
    let files = Files::new(&topo);
    let cs: Vec<Container> = (1..=3)
        .map(|i| {
            engine.run(
                &format!("lbd7-c{i}"),
                RunOpts::default().cmd(http_and_echo_cmd()),
            )
        })
        .collect();
    let all = names(&[&cs[0], &cs[1], &cs[2]]);
    let first = files.start_with(&["--keep-datapath"]);
    let cli = files.cli();
    wait_active(&cli, &first, "echo", &all);
    let mut held = hold(&topo, 6, &all);
    let before: Vec<String> = backends(&cli, "echo")
        .into_iter()
        .map(|b| b.address)
        .collect();

    let (status, out) = stop_with_output(first);
    assert!(status.success(), "first daemon: {status}\n{out}");
    for (i, h) in held.iter_mut().enumerate() {
        h.echo(format!("no daemon {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i} with no daemon: {e}"));
    }
    let second = files.start();
    let status: Status = cli.json(&["status", "--json"]);
    assert!(status.adopted, "the second daemon did not take over");
    let after: Vec<String> = backends(&cli, "echo")
        .into_iter()
        .map(|b| b.address)
        .collect();
    assert_eq!(before, after);
    for (i, h) in held.iter_mut().enumerate() {
        h.echo(format!("taken over {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i} after the takeover: {e}"));
    }
    // Containers still come and go under the second daemon.
    let victim = held[0].backend().to_owned();
    cs.iter().find(|c| c.name() == victim).unwrap().kill();
    let rest: BTreeSet<String> = all.iter().filter(|n| **n != victim).cloned().collect();
    wait_active(&cli, &second, "echo", &rest);
    for (i, h) in held
        .iter_mut()
        .enumerate()
        .filter(|(_, h)| h.backend() != victim)
    {
        h.echo(format!("after a death {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i} after {victim} died: {e}"));
    }
    let late = engine.run("lbd7-late", RunOpts::default().cmd(http_and_echo_cmd()));
    let mut now = rest.clone();
    now.insert(late.name().to_owned());
    wait_active(&cli, &second, "echo", &now);
    let fresh = hold(&topo, 12, &now);
    assert!(fresh.iter().all(|h| h.backend() != victim));
}

#[test]
fn with_xdp_forwarding_the_daemon_turns_gro_on_inside_the_container() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbd8", 0);
    let files = Files::with_mode(&topo, "xdp");
    let c = engine.run("lbd8-c1", RunOpts::default().cmd(http_and_echo_cmd()));
    let gro = || {
        let ns = format!("--net=/proc/{}/ns/net", c.pid());
        let out = lb_harness::run_ok("nsenter", &[&ns, "ethtool", "-k", "eth0"]);
        out.lines()
            .any(|l| l.trim() == "generic-receive-offload: on")
    };
    assert!(
        !gro(),
        "a fresh container already has GRO on: nothing to test"
    );
    let daemon = files.start();
    let cli = files.cli();
    wait_active(&cli, &daemon, "echo", &names(&[&c]));
    assert!(gro(), "GRO is still off in {}'s eth0", c.name());
    assert!(
        daemon.output().contains("turned GRO on"),
        "{}",
        daemon.output()
    );
}

/// `docker stop` sends SIGTERM first (the engine's `kill` event): the
/// container is drained at that moment and leaves at `die`, so a server
/// that finishes its requests on SIGTERM loses none, and replacing every
/// container of a service one by one (a rolling update, containers with a
/// health check: [`rolling_update`]) under a steady stream of requests
/// fails none of them.
#[test]
fn docker_stop_and_a_rolling_update_fail_no_request() {
    require_root();
    let r = rolling_update("lbd9");
    assert_eq!(
        r.load.failed, 0,
        "requests failed during the rolling update: {:?}",
        r.load
    );
    assert!(!r.load.timed_out, "{:?}", r.load);
    assert!(
        r.load.answered() >= 30,
        "too few requests to show anything: {:?}",
        r.load
    );
    assert_eq!(r.new.len(), ROLLING_CONTAINERS);
    for n in &r.new {
        assert!(r.load.count(n) > 0, "{n} served nothing: {:?}", r.load);
    }
    for c in &r.old {
        assert!(
            r.daemon_output
                .lines()
                .any(|l| l.contains("container drained")
                    && l.contains(c.as_str())
                    && l.contains("stopping")),
            "{c} was not drained when asked to stop:\n{}",
            r.daemon_output
        );
    }
}

#[test]
fn a_container_serves_by_direct_server_return_with_nothing_set_by_hand() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbd8", 0);
    // `echo` (VIP port 9000, its containers' port 9000) by direct server
    // return.
    let files = Files::with(&topo, "auto", "dsr");
    let c: Vec<Container> = (1..=2)
        .map(|i| {
            engine.run(
                &format!("lbd8-e{i}"),
                RunOpts::default().cmd(http_and_echo_cmd()),
            )
        })
        .collect();
    let daemon = files.start();
    let cli = files.cli();
    let both = names(&[&c[0], &c[1]]);
    wait_active(&cli, &daemon, "echo", &both);

    // The daemon set each container up: the VIP on its lo, ARP for it off.
    for x in &c {
        let pid = x.pid().to_string();
        let lo = run_ok(
            "nsenter",
            &["-t", &pid, "-n", "ip", "-o", "-4", "addr", "show", "lo"],
        );
        assert!(
            lo.contains(&format!("{}/32", topo.vip())),
            "{}: lo holds no VIP: {lo}",
            x.name()
        );
        for (key, want) in [("arp_ignore", "1"), ("arp_announce", "2")] {
            let path = format!("/proc/sys/net/ipv4/conf/all/{key}");
            let got = run_ok("nsenter", &["-t", &pid, "-n", "cat", &path]);
            assert_eq!(got.trim(), want, "{}: {key}", x.name());
        }
    }

    let before: Stats = cli.json(&["stats", "--json"]);
    let mut held = hold(&topo, 8, &both);
    let mut served = BTreeSet::new();
    for (i, conn) in held.iter_mut().enumerate() {
        conn.echo(format!("dsr {i}\n").as_bytes())
            .unwrap_or_else(|e| panic!("connection {i} ({}): {e}", conn.backend()));
        served.insert(conn.backend().to_owned());
    }
    assert_eq!(served, both, "both containers answered");
    let after: Stats = cli.json(&["stats", "--json"]);
    let delta = |name: &str| after.global[name] - before.global[name];
    // The replies left the containers from the VIP: nothing was translated
    // back, the data path only sent them on.
    assert_eq!(delta("reverse_nat") + delta("reverse_nat_no_flow"), 0);
    assert!(delta("fwd_dsr_reply") > 0, "no reply went the DSR way");
    drop(held);
    drop(daemon);
}
