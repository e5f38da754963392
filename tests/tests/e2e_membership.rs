//! End to end with a real Docker engine (never a mock): which container
//! serves which service, and how every view an operator has (the log,
//! `lb status`, `/metrics`, `bpftool`) shows it. Run as root, one at a
//! time: `cargo test -p lb-tests --test e2e_membership -- --test-threads=1`.
//!
//! The rule under test (README, "Containers"): a container with an
//! `lb.service` label serves that service alone; image rules take the
//! containers without one; a container with a malformed `lb.*` label serves
//! nothing, and one log line says so; `lb.weight` applies either way.
//!
//! Two services, as in `e2e_docker`: `web` (VIP port 80) for containers
//! labelled `lb.service=web`, `lb.port=8080`, and `echo` (VIP port 9000),
//! the image rule `image = IMAGE`, `target_port = 9000`. Every container
//! runs [`IMAGE`], so the image rule matches all of them, and sits on its
//! own network at a fixed address (so that a new container can be given a
//! dead one's address).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb::api::types::{BackendInfo, BackendState, Status};
use lb_harness::{
    docker_engine::{docker_ok, Container, Engine, Network, RunOpts, IMAGE},
    http_tally,
    ops::{free_loopback_port, with_pin_path, LbCli, PinDir},
    require_root, run_ok,
    stream::StreamConn,
    Daemon, TempDir, Topology, READY_MARKER,
};

/// How long the daemon may take to attach and write its maps.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a change in the engine may take to show (bounded polling).
const SETTLE: Duration = Duration::from_secs(10);
/// How long a scrape may take to show a change (the daemon serves a
/// scrape from the previous one for up to a second).
const SCRAPE_SETTLE: Duration = Duration::from_secs(10);
const WEB_PORT: u16 = 80;
const ECHO_PORT: u16 = 9000;

/// HTTP on 8080 answering the container's name, and on 9000 a stream
/// server that greets each connection with the name, then echoes.
fn serve() -> Vec<String> {
    [
        "sh",
        "-c",
        "echo -n $(hostname) > /www/index.html; \
         nc -ll -p 9000 -e sh -c 'hostname; exec cat' & \
         exec httpd -f -p 8080 -h /www",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// The containers' network, `198.19.{NET_OCTET}.0/24`.
const NET_OCTET: u8 = 151;

/// Address `.host` on the containers' network.
fn at(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, NET_OCTET, host)
}

/// Options of a container on `net` at `.host`.
fn on(net: &Network, host: u8) -> RunOpts {
    RunOpts::default()
        .cmd(serve())
        .network(net.name())
        .ip(at(host))
}

/// One test's daemon files: config, socket, pins.
struct Files {
    pins: PinDir,
    config: PathBuf,
    socket: PathBuf,
    _dir: TempDir,
}

impl Files {
    /// `datapath` holds extra lines of the `[datapath]` table.
    fn new(topo: &Topology, datapath: &str) -> Files {
        let pins = PinDir::new(&format!("/sys/fs/bpf/lb-e2e-{}", topo.prefix()));
        let dir = TempDir::new(&format!("membership-{}", topo.prefix()));
        let vip = topo.vip();
        let text = format!(
            "[datapath]\nexternal = [\"{ext}\"]\n{datapath}\n\n[docker]\nenabled = true\n\n\
             [[service]]\nname = \"web\"\nvip = \"{vip}:{WEB_PORT}\"\n\n\
             [[service]]\nname = \"echo\"\nvip = \"{vip}:{ECHO_PORT}\"\n\
             image = \"{IMAGE}\"\ntarget_port = 9000\n",
            ext = topo.client_host_if()
        );
        let config = dir.write("lb.toml", &with_pin_path(&text, pins.as_str()));
        Files {
            pins,
            config,
            socket: dir.path().join("lb.sock"),
            _dir: dir,
        }
    }

    fn start(&self, extra: &[&str]) -> Daemon {
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

/// `service`'s container backends: name to (address, weight, state).
fn members(cli: &LbCli, service: &str) -> BTreeMap<String, (String, u32, BackendState)> {
    backends(cli, service)
        .into_iter()
        .map(|b| {
            let name = b
                .container
                .unwrap_or_else(|| panic!("{service}: {} is no container", b.address));
            (name, (b.address, b.weight, b.state))
        })
        .collect()
}

fn names(cs: &[&Container]) -> BTreeSet<String> {
    cs.iter().map(|c| c.name().to_owned()).collect()
}

/// Waits (bounded) until `service`'s containers in `state` are exactly `want`.
fn wait_in(cli: &LbCli, daemon: &Daemon, service: &str, state: BackendState, want: &[&Container]) {
    let want = names(want);
    let end = Instant::now() + SETTLE;
    loop {
        let now: BTreeSet<String> = members(cli, service)
            .into_iter()
            .filter(|(_, (_, _, s))| *s == state)
            .map(|(n, _)| n)
            .collect();
        if now == want {
            return;
        }
        assert!(
            Instant::now() < end,
            "{service}'s {state:?} containers are {now:?}, not {want:?}, after {SETTLE:?}; \
             backends: {:#?}\ndaemon output:\n{}",
            backends(cli, service),
            daemon.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `service` is served by exactly `want`, all active.
fn wait_active(cli: &LbCli, daemon: &Daemon, service: &str, want: &[&Container]) {
    wait_in(cli, daemon, service, BackendState::Active, want);
}

/// The daemon's log lines that mention `what`.
fn log_lines(daemon: &Daemon, what: &str) -> Vec<String> {
    daemon
        .output()
        .lines()
        .filter(|l| l.contains(what))
        .map(str::to_owned)
        .collect()
}

/// The daemon's log lines that say `event` about container `c`.
fn events(daemon: &Daemon, event: &str, c: &Container) -> Vec<String> {
    log_lines(daemon, event)
        .into_iter()
        .filter(|l| l.contains(&format!("\"{}\"", c.name())))
        .collect()
}

/// Opens connections to `echo` (each greeted by its container) until one
/// reaches `c`, at most 60; returns how many were opened.
fn reach(topo: &Topology, c: &Container) -> usize {
    let vip = SocketAddrV4::new(topo.vip(), ECHO_PORT);
    for i in 1..=60 {
        let conn = StreamConn::connect(&topo.client, vip)
            .unwrap_or_else(|e| panic!("connection {i} to echo: {e}"));
        if conn.backend() == c.name() {
            return i;
        }
    }
    panic!("60 connections to echo, none reached {}", c.name());
}

#[test]
fn a_label_beats_an_image_rule_and_a_malformed_label_serves_nothing() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbm1", 0);
    let net = engine.network("lbm1-net", NET_OCTET);
    let files = Files::new(&topo, "");
    let labelled = engine.run(
        "lbm1-label",
        on(&net, 11)
            .label("lb.service", "web")
            .label("lb.port", "8080")
            .label("lb.weight", "3"),
    );
    let bad = engine.run(
        "lbm1-bad",
        on(&net, 12)
            .label("lb.service", "web")
            .label("lb.port", "abc"),
    );
    let plain = engine.run("lbm1-plain", on(&net, 13));
    let heavy = engine.run("lbm1-heavy", on(&net, 14).label("lb.weight", "2"));
    let daemon = files.start(&[]);
    let cli = files.cli();

    // The labelled container serves web alone, with its weight; the image
    // rule takes the two without lb.service, lb.weight applying to it too;
    // the malformed one serves nothing.
    wait_active(&cli, &daemon, "web", &[&labelled]);
    wait_active(&cli, &daemon, "echo", &[&plain, &heavy]);
    let web = members(&cli, "web");
    assert_eq!(web[labelled.name()].0, format!("{}:8080", at(11)));
    assert_eq!(
        web[labelled.name()].1,
        3,
        "lb.weight of a labelled container"
    );
    let echo = members(&cli, "echo");
    assert_eq!(echo[plain.name()].0, format!("{}:9000", at(13)));
    assert_eq!(echo[plain.name()].1, 1);
    assert_eq!(echo[heavy.name()].1, 2, "lb.weight under an image rule");

    // Traffic agrees: web answers from the labelled one only, echo from
    // the image rule's containers only.
    let tally = http_tally(
        &topo.client,
        SocketAddrV4::new(topo.vip(), WEB_PORT),
        20,
        Duration::from_secs(60),
    );
    assert_eq!(tally.failures, 0, "{tally:?}");
    assert_eq!(tally.count(labelled.name()), 20, "{tally:?}");
    let allowed = names(&[&plain, &heavy]);
    for i in 0..12 {
        let c = StreamConn::connect(&topo.client, SocketAddrV4::new(topo.vip(), ECHO_PORT))
            .unwrap_or_else(|e| panic!("connection {i} to echo: {e}"));
        assert!(
            allowed.contains(c.backend()),
            "echo connection {i} greeted by {}",
            c.backend()
        );
    }

    // Another container makes the daemon work membership out again: the
    // malformed one is still named once, with its label.
    let more = engine.run(
        "lbm1-more",
        on(&net, 15)
            .label("lb.service", "web")
            .label("lb.port", "8080"),
    );
    wait_active(&cli, &daemon, "web", &[&labelled, &more]);
    let about_bad = log_lines(&daemon, bad.name());
    assert_eq!(
        about_bad.len(),
        1,
        "want one line about {}: {about_bad:#?}",
        bad.name()
    );
    assert!(
        about_bad[0].contains("lb.port=\"abc\"") && about_bad[0].contains("serves no service"),
        "{}",
        about_bad[0]
    );
    for c in [&labelled, &plain, &heavy, &more] {
        let joined = events(&daemon, "container joined", c);
        assert_eq!(joined.len(), 1, "{}: {joined:#?}", c.name());
    }

    // lb status counts who serves now, by service.
    let status: Status = cli.json(&["status", "--json"]);
    assert!(status.docker.starts_with("connected"), "{}", status.docker);
    let c = &status.containers;
    assert_eq!(c.serving, 4, "{c:#?}");
    assert!(c.running >= 5, "{c:#?}");
    assert_eq!(
        c.services,
        BTreeMap::from([
            (
                "echo".to_owned(),
                vec![heavy.name().to_owned(), plain.name().to_owned()]
            ),
            (
                "web".to_owned(),
                vec![labelled.name().to_owned(), more.name().to_owned()]
            ),
        ])
    );
    assert_eq!(c.skipped, [bad.name()]);
    assert!(c.last_list_unix_secs.is_some(), "{c:#?}");
    assert!(c.last_list_age_secs.is_some_and(|a| a < 600), "{c:#?}");
    let text = cli.ok(&["status"]);
    assert!(
        text.contains("containers  4 serving of") && text.contains("(echo: 2, web: 2)"),
        "{text}"
    );

    // The attachments, with link ids bpftool knows too.
    assert!(!status.attachments.is_empty(), "{status:#?}");
    assert!(
        status
            .attachments
            .iter()
            .any(|a| a.interface == topo.client_host_if() && a.hook == "tc"),
        "no tc link on the external interface: {:#?}",
        status.attachments
    );
    let listed = run_ok("bpftool", &["link", "show"]);
    for a in &status.attachments {
        let id = a.link_id.unwrap_or_else(|| panic!("no link id for {a:?}"));
        let prog = a.program_id.expect("a program id");
        let line = listed
            .lines()
            .find(|l| l.starts_with(&format!("{id}: ")))
            .unwrap_or_else(|| panic!("link {id} ({a:?}) not in `bpftool link show`:\n{listed}"));
        assert!(line.contains(&format!("prog {prog}")), "{line}");
        let shown: serde_json::Value = serde_json::from_str(&run_ok(
            "bpftool",
            &["link", "show", "id", &id.to_string(), "--json"],
        ))
        .expect("bpftool --json");
        assert_eq!(shown["prog_id"], prog, "{shown}");
        assert!(
            a.pin
                .as_deref()
                .is_some_and(|p| p.starts_with(files.pins.as_str())),
            "{a:?}"
        );
    }

    // Paused: drained, then back; killed: left. Each said once.
    docker_ok(&["pause", plain.id()]);
    wait_in(&cli, &daemon, "echo", BackendState::Draining, &[&plain]);
    docker_ok(&["unpause", plain.id()]);
    wait_active(&cli, &daemon, "echo", &[&plain, &heavy]);
    heavy.kill();
    wait_active(&cli, &daemon, "echo", &[&plain]);
    let drained = events(&daemon, "container drained", &plain);
    assert_eq!(drained.len(), 1, "{drained:#?}");
    assert!(drained[0].contains("paused"), "{}", drained[0]);
    assert_eq!(events(&daemon, "container back", &plain).len(), 1);
    let left = events(&daemon, "container left", &heavy);
    assert_eq!(left.len(), 1, "{left:#?}");
    assert!(left[0].contains("die"), "{}", left[0]);
    assert!(!daemon.output().contains("panicked"));
}

/// A scrape of `/metrics` at `listen`: series (name with labels) to value.
fn scrape(listen: &str) -> (BTreeMap<String, f64>, String) {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .proxy(None)
        .build()
        .into();
    let url = format!("http://{listen}/metrics");
    let body = agent
        .get(&url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("reading GET {url}: {e}"));
    let samples = body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.trim().parse().ok()?))
        })
        .collect();
    (samples, body)
}

/// Scrapes until `done` holds for the samples (bounded); returns them.
fn scrape_until(
    listen: &str,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let end = Instant::now() + SCRAPE_SETTLE;
    loop {
        let (samples, body) = scrape(listen);
        if done(&samples) {
            return samples;
        }
        assert!(
            Instant::now() < end,
            "{what} after {SCRAPE_SETTLE:?}:\n{body}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Series `name` of `service`'s backend `addr`, container `c`.
fn series(name: &str, service: &str, addr: &str, c: &Container) -> String {
    format!(
        "{name}{{service=\"{service}\",backend=\"{addr}\",container=\"{}\"}}",
        c.name()
    )
}

/// The backend id the daemon logged for `addr` each time it was added.
fn added_ids(daemon: &Daemon, addr: &str) -> Vec<u32> {
    log_lines(daemon, "backend added")
        .iter()
        .filter(|l| l.contains(&format!("backend={addr} ")))
        .map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("id="))
                .and_then(|id| id.parse().ok())
                .unwrap_or_else(|| panic!("no id in {l}"))
        })
        .collect()
}

#[test]
fn a_new_container_at_a_dead_ones_address_starts_its_own_series_at_zero() {
    require_root();
    let engine = Engine::ensure();
    let topo = Topology::new("lbm2", 0);
    let net = engine.network("lbm2-net", NET_OCTET);
    // Three backend ids in all: the new container below can only get the
    // dead one's id (the one that cooled longest), so its counters are
    // the ones that id had, unless they are zeroed.
    let files = Files::new(&topo, "max_backends = 3");
    let labelled = engine.run(
        "lbm2-label",
        on(&net, 11)
            .label("lb.service", "web")
            .label("lb.port", "8080"),
    );
    let first = engine.run("lbm2-first", on(&net, 13));
    let other = engine.run("lbm2-other", on(&net, 14));
    let listen = format!("127.0.0.1:{}", free_loopback_port());
    let daemon = files.start(&["--metrics", &listen]);
    let cli = files.cli();
    wait_active(&cli, &daemon, "web", &[&labelled]);
    wait_active(&cli, &daemon, "echo", &[&first, &other]);

    let addr = format!("{}:9000", at(13));
    let web_addr = format!("{}:8080", at(11));
    let tally = http_tally(
        &topo.client,
        SocketAddrV4::new(topo.vip(), WEB_PORT),
        5,
        Duration::from_secs(60),
    );
    assert_eq!(tally.failures, 0, "{tally:?}");
    reach(&topo, &first);
    let old_packets = series("lb_packets_total", "echo", &addr, &first);
    let old_flows = series("lb_new_flows_total", "echo", &addr, &first);
    let web_packets = series("lb_packets_total", "web", &web_addr, &labelled);
    let samples = scrape_until(&listen, "first's and the labelled one's traffic", |s| {
        s.get(&old_flows).is_some_and(|v| *v > 0.0) && s.get(&web_packets).is_some_and(|v| *v > 0.0)
    });
    assert!(samples[&old_packets] > 0.0);
    // The connections are closed (by `reach`); their last packets are
    // long gone before the container is.
    std::thread::sleep(Duration::from_secs(1));

    first.kill();
    wait_active(&cli, &daemon, "echo", &[&other]);
    let second = engine.run("lbm2-second", on(&net, 13));
    wait_active(&cli, &daemon, "echo", &[&other, &second]);
    assert_eq!(members(&cli, "echo")[second.name()].0, addr);
    let ids = added_ids(&daemon, &addr);
    assert_eq!(ids.len(), 2, "{ids:?}\n{}", daemon.output());
    assert_eq!(
        ids[0], ids[1],
        "the second container did not get the first one's id: nothing was tested"
    );

    let new = |name: &str| series(name, "echo", &addr, &second);
    let samples = scrape_until(&listen, "a series for the second container", |s| {
        s.contains_key(&new("lb_packets_total"))
    });
    for name in ["lb_packets_total", "lb_bytes_total", "lb_new_flows_total"] {
        assert_eq!(samples[&new(name)], 0.0, "{}", new(name));
    }
    assert!(
        !samples
            .keys()
            .any(|k| k.contains(&format!("container=\"{}\"", first.name()))),
        "the dead container's series are still there: {samples:#?}"
    );

    // Its own traffic counts from there.
    reach(&topo, &second);
    scrape_until(&listen, "the second container's traffic", |s| {
        s.get(&new("lb_new_flows_total")).is_some_and(|v| *v >= 1.0)
    });
}
