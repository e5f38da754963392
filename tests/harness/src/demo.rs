//! The quick start's demo (`cargo xtask demo`, the `lb-demo` binary), also
//! run by the tests in a short mode.
//!
//! By default, with the real Docker engine (started as the tests start it
//! when none answers): three containers join a service by their labels,
//! requests are spread over them, two more containers start and take new
//! flows, one is stopped under load and no request fails; the daemon's
//! events are printed as they happen. The namespace demo: a client
//! namespace, three backend namespaces with real servers, and the spread
//! of HTTP and UDP requests. Everything either creates is removed when it
//! ends, also on failure.

use std::{
    collections::BTreeSet,
    io::{BufRead, BufReader},
    net::SocketAddrV4,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use lb::api::types::{BackendInfo, BackendState};

use crate::{
    clients::{http_tally, udp_tally, HttpTally},
    config_files::{render_config, ServiceConfig},
    docker_engine::{http_name_cmd_draining, Container, Engine, RunOpts},
    forward::ForwardDrop,
    lb_process::{lb_binary, Daemon, READY_MARKER},
    ops::{DaemonFiles, LbCli},
    servers::{HttpServer, UdpEcho},
    tempdir::TempDir,
    topology::Topology,
};

/// How long a container may take to show in (or leave) the service.
const SETTLE: Duration = Duration::from_secs(15);

fn bar(n: usize, total: usize) -> String {
    "#".repeat((n * 40).checked_div(total).unwrap_or(0))
}

/// A container that joins `web` by its labels.
fn labelled() -> RunOpts {
    RunOpts::default()
        .cmd(http_name_cmd_draining())
        .label("lb.service", "web")
        .label("lb.port", "8080")
}

/// `lb events` following the daemon from its first event, its lines
/// printed as they come.
struct Events(Child);

impl Events {
    fn follow(socket: &std::path::Path) -> Events {
        let mut child = Command::new(lb_binary())
            .arg("--socket")
            .arg(socket)
            .args(["events", "--since", "0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting lb events: {e}"));
        let out = child.stdout.take().expect("piped");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                println!("  event: {line}");
            }
        });
        Events(child)
    }
}

impl Drop for Events {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits (bounded) until `web`'s active containers are exactly `want`.
fn wait_active(cli: &LbCli, want: &BTreeSet<String>) -> bool {
    let end = Instant::now() + SETTLE;
    loop {
        let backends: Vec<BackendInfo> = cli.json(&["backend", "ls", "web", "--json"]);
        let active: BTreeSet<String> = backends
            .into_iter()
            .filter(|b| b.state == BackendState::Active)
            .filter_map(|b| b.container)
            .collect();
        if &active == want {
            return true;
        }
        if Instant::now() > end {
            eprintln!("web's active containers are {active:?}, not {want:?}, after {SETTLE:?}");
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn print_spread(what: &str, tally: &HttpTally, names: &[&str]) {
    println!("\n{what}:");
    for name in names {
        let n = tally.count(name);
        println!(
            "  {name:<12} {n:>4}  {:>5.1}%  {}",
            100.0 * n as f64 / tally.requested.max(1) as f64,
            bar(n, tally.requested)
        );
    }
    println!("  {:<12} {:>4}", "failed", tally.failures);
}

/// The Docker demo with `requests` requests a round; whether everything
/// went as it should (every container served, no request failed).
pub fn docker(requests: usize) -> bool {
    println!(
        "lb demo with Docker: the engine, a client namespace, containers (198.18.0.0/15 only)"
    );
    let engine = Engine::ensure();
    println!(
        "Docker engine {} (image {})",
        if engine.is_owned() {
            "started for the demo"
        } else {
            "already running"
        },
        engine.image()
    );
    let topo = Topology::new("lbdk", 0);
    let files = DaemonFiles::new(&topo, "demo");
    let vip = topo.vip();
    let config = format!(
        "[datapath]\nexternal = [\"{}\"]\n\n[docker]\nenabled = true\n\n\
         [[service]]\nname = \"web\"\nvip = \"{vip}:80\"\n",
        topo.client_host_if()
    );
    files.write_config(&config);
    println!("\nconfig: one service, no backends; containers join it by their labels\n{config}");

    let names = |cs: &[&Container]| -> BTreeSet<String> {
        cs.iter().map(|c| c.name().to_owned()).collect()
    };
    let first: Vec<Container> = (1..=3)
        .map(|i| engine.run(&format!("lbdk-web-{i}"), labelled()))
        .collect();
    println!(
        "docker run -d --label lb.service=web --label lb.port=8080 … × 3: {}",
        first
            .iter()
            .map(Container::name)
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (config_s, state, socket) = (
        files.config.display().to_string(),
        files.state.display().to_string(),
        files.socket.display().to_string(),
    );
    let daemon = Daemon::start_with_env(
        &[
            "run", "--config", &config_s, "--state", &state, "--socket", &socket,
        ],
        &[(
            "RUST_LOG",
            "warn,lb::daemon=info,netlink_packet_route=error",
        )],
        READY_MARKER,
        Duration::from_secs(30),
    );
    let _events = Events::follow(&files.socket);
    let cli = files.cli();
    println!("lb is running; client {} -> {vip}:80", topo.client_addr());
    let mut live = names(&first.iter().collect::<Vec<_>>());
    if !wait_active(&cli, &live) {
        return false;
    }
    let addr = SocketAddrV4::new(vip, 80);
    let tally = http_tally(&topo.client, addr, requests, Duration::from_secs(120));
    let shown: Vec<String> = live.iter().cloned().collect();
    let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
    print_spread(&format!("{requests} requests to {vip}:80"), &tally, &shown);
    let mut ok = tally.failures == 0 && first.iter().all(|c| tally.count(c.name()) > 0);

    println!("\ndocker run two more; nothing else is done:");
    let more: Vec<Container> = (4..=5)
        .map(|i| engine.run(&format!("lbdk-web-{i}"), labelled()))
        .collect();
    live.extend(more.iter().map(|c| c.name().to_owned()));
    ok &= wait_active(&cli, &live);
    let tally = http_tally(&topo.client, addr, requests, Duration::from_secs(120));
    let shown: Vec<String> = live.iter().cloned().collect();
    let shown: Vec<&str> = shown.iter().map(String::as_str).collect();
    print_spread(&format!("{requests} requests to {vip}:80"), &tally, &shown);
    ok &= tally.failures == 0 && more.iter().all(|c| tally.count(c.name()) > 0);

    let victim = &first[0];
    println!(
        "\ndocker stop {} while requests keep coming (lb drains it at SIGTERM):",
        victim.name()
    );
    let done = AtomicBool::new(false);
    let tally = std::thread::scope(|scope| {
        let client = scope.spawn(|| {
            let mut all = HttpTally::default();
            // Bounded: the stop takes about a second; 60 s at most.
            let end = Instant::now() + Duration::from_secs(60);
            while !done.load(Ordering::Relaxed) && Instant::now() < end {
                let t = http_tally(&topo.client, addr, 10, Duration::from_secs(10));
                all.requested += t.requested;
                all.failures += t.failures;
                for (name, n) in t.counts {
                    *all.counts.entry(name).or_default() += n;
                }
            }
            all
        });
        std::thread::sleep(Duration::from_millis(300));
        victim.stop(10);
        live.remove(victim.name());
        ok &= wait_active(&cli, &live);
        std::thread::sleep(Duration::from_millis(300));
        done.store(true, Ordering::Relaxed);
        client.join().expect("the client thread")
    });
    let mut all: Vec<String> = live.iter().cloned().collect();
    all.push(victim.name().to_owned());
    let shown: Vec<&str> = all.iter().map(String::as_str).collect();
    print_spread(
        &format!("{} requests during the stop", tally.requested),
        &tally,
        &shown,
    );
    ok &= tally.failures == 0;

    let status = daemon.stop();
    println!("\nlb stopped ({status}); removing the containers, the namespace and the pins");
    ok && status.success()
}

/// The namespace demo with `requests` HTTP requests; whether everything
/// went as it should (an even spread, nothing failed).
pub fn netns(requests: usize) -> bool {
    println!("lb demo: building a client namespace and three backends (198.18.0.0/15 only)");
    let topo = Topology::new("lbdm", 3);
    let names: Vec<String> = (0..3).map(|i| format!("backend-{i}")).collect();
    let _http: Vec<HttpServer> = (0..3)
        .map(|i| HttpServer::start(&topo.backends[i], 8080, &names[i]))
        .collect();
    let _udp: Vec<UdpEcho> = (0..3)
        .map(|i| UdpEcho::start(&topo.backends[i], 9000, &names[i]))
        .collect();

    let vip = topo.vip();
    let client_if = topo.client_host_if();
    let config = render_config(
        &[client_if.as_str()],
        &[
            ServiceConfig::new(
                "web",
                &format!("{vip}:80"),
                "tcp",
                &topo.backend_endpoints(8080),
            ),
            ServiceConfig::new(
                "echo",
                &format!("{vip}:53"),
                "udp",
                &topo.backend_endpoints(9000),
            ),
        ],
    );
    let dir = TempDir::new("lb-demo");
    let path = dir.path().join("lb.toml");
    std::fs::write(&path, &config).expect("write the demo config");
    println!("\nconfig ({}):\n{config}", path.display());

    // With the host's FORWARD policy at DROP, every answer below proves the
    // balanced path bypasses netfilter.
    let _forward = ForwardDrop::new();
    let path_s = path.display().to_string();
    let daemon = Daemon::start_with_env(
        &["run", "--config", &path_s],
        &[(
            "RUST_LOG",
            "warn,lb::daemon=info,netlink_packet_route=error",
        )],
        READY_MARKER,
        Duration::from_secs(30),
    );
    println!(
        "lb is running (FORWARD policy DROP); client {} -> {vip}:80",
        topo.client_addr()
    );

    let tally = http_tally(
        &topo.client,
        SocketAddrV4::new(vip, 80),
        requests,
        Duration::from_secs(120),
    );
    let shown: Vec<&str> = names.iter().map(String::as_str).collect();
    print_spread(
        &format!("{requests} HTTP requests to {vip}:80"),
        &tally,
        &shown,
    );

    let udp = udp_tally(
        &topo.client,
        SocketAddrV4::new(vip, 53),
        30,
        Duration::from_secs(60),
    );
    println!("\n30 UDP datagrams to {vip}:53 (answers come from the VIP):");
    for name in &names {
        println!(
            "  {name:<12} {:>4}",
            udp.counts.get(name).copied().unwrap_or(0)
        );
    }
    println!("  {:<12} {:>4}", "unanswered", udp.failures);

    let status = daemon.stop();
    println!("\nlb stopped ({status}); removing namespaces and links");
    let even = names.iter().all(|n| tally.count(n) * 100 >= requests * 20);
    tally.failures == 0 && udp.failures == 0 && even && status.success()
}
