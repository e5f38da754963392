//! `lb-demo`, run by `cargo xtask demo`: a client namespace, three backend
//! namespaces with real HTTP servers, `lb` balancing a VIP over them, a few
//! hundred requests, and how they were spread. Everything it creates is
//! removed when it ends, also on failure.

use std::{net::SocketAddrV4, time::Duration};

use lb_harness::{
    http_tally, render_config, require_root, udp_tally, Daemon, ForwardDrop, HttpServer,
    ServiceConfig, TempDir, Topology, UdpEcho, READY_MARKER,
};

const REQUESTS: usize = 300;

fn bar(n: usize, total: usize) -> String {
    "#".repeat((n * 40).checked_div(total).unwrap_or(0))
}

fn main() {
    require_root();
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
        &[("RUST_LOG", "warn,lb::daemon=info")],
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
        REQUESTS,
        Duration::from_secs(120),
    );
    println!("\n{REQUESTS} HTTP requests to {vip}:80:");
    for name in &names {
        let n = tally.count(name);
        println!(
            "  {name}  {n:>4}  {:>5.1}%  {}",
            100.0 * n as f64 / REQUESTS as f64,
            bar(n, REQUESTS)
        );
    }
    println!("  failed     {:>4}", tally.failures);

    let udp = udp_tally(
        &topo.client,
        SocketAddrV4::new(vip, 53),
        30,
        Duration::from_secs(60),
    );
    println!("\n30 UDP datagrams to {vip}:53 (answers come from the VIP):");
    for name in &names {
        println!(
            "  {name}  {:>4}",
            udp.counts.get(name).copied().unwrap_or(0)
        );
    }
    println!("  unanswered {:>4}", udp.failures);

    let status = daemon.stop();
    println!("\nlb stopped ({status}); removing namespaces and links");
    let even = names.iter().all(|n| tally.count(n) * 100 >= REQUESTS * 20);
    if tally.failures > 0 || udp.failures > 0 || !even || !status.success() {
        eprintln!("demo FAILED: see the counts above");
        std::process::exit(1);
    }
    println!("demo ok");
}
