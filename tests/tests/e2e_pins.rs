//! End-to-end tests of what a stopped daemon leaves in bpffs going stale:
//! every kind of leftover (a pinned link whose interface was deleted, a new
//! interface under the same name, a backend namespace removed, a pin
//! directory of another map layout), each followed by a plain `lb run` that
//! must start and serve through the VIP. Real namespaces, real kernel
//! servers and clients, the daemon binary. Run as root, one at a time:
//! `cargo test -p lb-tests --test e2e_pins -- --test-threads=1`.
//!
//! The binary under test is `$LB_BIN`, else `target/release/lb`, else
//! `target/debug/lb` (see [`lb_harness::lb_binary`]). Every test has its own
//! topology prefix, socket, state file and bpffs pin path, and removes its
//! pins even when it fails.

use std::{net::SocketAddrV4, path::PathBuf, time::Duration};

use lb_harness::{
    attachments, http_tally,
    ops::{stop_with_output, DaemonFiles},
    render_config, require_root, Daemon, ForwardDrop, HttpServer, HttpTally, ServiceConfig,
    Topology,
};
/// The service's port on the VIP, and the backends' HTTP port.
const WEB_PORT: u16 = 80;
const HTTP_PORT: u16 = 8080;
/// Requests made through the VIP after each start.
const REQUESTS: usize = 40;
/// What the daemon logs when it leaves the data path running.
const KEEP_MARKER: &str = "the data path keeps forwarding";
/// What a daemon logs when it adopts a running data path.
const TAKEOVER_MARKER: &str = "taking over the running data path";
/// The one warning about a pinned link that cannot be taken over.
const DROPPED_MARKER: &str = "dropping a pinned attachment left by an earlier daemon";
/// The warning about a data path pinned with another layout.
const LAYOUT_MARKER: &str = "another map layout or sizes";

/// Writes the config of `files`: service `web` on the VIP over `backends`,
/// the client's veth as external, `extra` lines in `[datapath]`.
fn write_config(files: &DaemonFiles, topo: &Topology, backends: &[usize], extra: &str) {
    let eps: Vec<String> = backends
        .iter()
        .map(|&i| format!("{}:{HTTP_PORT}", topo.backend_addr(i)))
        .collect();
    let web = ServiceConfig::new("web", &format!("{}:{WEB_PORT}", topo.vip()), "tcp", &eps);
    let text = render_config(&[&topo.client_host_if()], &[web]).replacen(
        "[datapath]\n",
        &format!("[datapath]\n{extra}"),
        1,
    );
    files.write_config(&text);
}

fn http_servers(topo: &Topology) -> Vec<HttpServer> {
    (0..topo.backend_count())
        .map(|i| HttpServer::start(&topo.backends[i], HTTP_PORT, &format!("b{i}")))
        .collect()
}

/// [`REQUESTS`] requests through the VIP from the client; panics unless
/// every one was answered, and only by `answering` backends (`b{i}`), each
/// of them at least once.
fn assert_serves(topo: &Topology, answering: &[usize], when: &str) -> HttpTally {
    let vip = SocketAddrV4::new(topo.vip(), WEB_PORT);
    let tally = http_tally(&topo.client, vip, REQUESTS, Duration::from_secs(30));
    assert_eq!(tally.failures, 0, "{when}: failed requests: {tally:?}");
    assert_eq!(tally.successes(), REQUESTS, "{when}: {tally:?}");
    for i in 0..topo.backend_count() {
        let n = tally.count(&format!("b{i}"));
        if answering.contains(&i) {
            assert!(n > 0, "{when}: backend b{i} answered nothing: {tally:?}");
        } else {
            assert_eq!(n, 0, "{when}: backend b{i} should not answer: {tally:?}");
        }
    }
    tally
}

/// Runs daemon A with `--keep-datapath`, checks it serves `answering`, and
/// stops it leaving the data path pinned.
fn run_and_keep(files: &DaemonFiles, topo: &Topology, answering: &[usize]) {
    let daemon_a = files.start(&["--keep-datapath"]);
    assert_serves(topo, answering, "daemon A");
    let (status, out) = stop_with_output(daemon_a);
    assert!(
        status.success() && out.contains(KEEP_MARKER),
        "daemon A (--keep-datapath) exited with {status}; its output:\n{out}"
    );
    assert!(files.pins.exists(), "daemon A left no pins");
}

/// The lines of `output` containing `marker`.
fn lines_with<'a>(output: &'a str, marker: &str) -> Vec<&'a str> {
    output.lines().filter(|l| l.contains(marker)).collect()
}

/// Checks that daemon B took over, warned exactly once about a pinned
/// link, for `iface`, and never printed an error with an empty interface
/// name or a severed link.
fn assert_one_warning_for(output: &str, iface: &str) {
    assert!(
        output.contains(TAKEOVER_MARKER),
        "daemon B did not take over the pinned data path; its output:\n{output}"
    );
    let dropped = lines_with(output, DROPPED_MARKER);
    assert_eq!(
        dropped.len(),
        1,
        "want one warning about a stale pinned link; its output:\n{output}"
    );
    assert!(
        dropped[0].contains(iface),
        "the warning does not name {iface}: {}",
        dropped[0]
    );
    assert!(
        !output.contains("severed (os error") && !output.contains(" to : "),
        "daemon B printed an error about the stale link; its output:\n{output}"
    );
}

/// Stops daemon B (plain stop): it must exit 0 and remove its pins.
fn stop_plain(files: &DaemonFiles, daemon_b: Daemon) {
    let (status, out) = stop_with_output(daemon_b);
    assert!(
        status.success(),
        "daemon B exited with {status}; its output:\n{out}"
    );
    assert!(
        !files.pins.exists(),
        "pins left after a plain stop: {:?}",
        files.pins.listing()
    );
}

#[test]
fn backend_veth_replaced_while_stopped() {
    require_root();
    let topo = Topology::new("lbp1", 2);
    let _http = http_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = DaemonFiles::new(&topo, "pins");
    write_config(&files, &topo, &[0, 1], "");
    run_and_keep(&files, &topo, &[0, 1]);

    // b1's veth goes (its link on the host side is severed) and a new one
    // comes under the same name, with a new interface index.
    topo.replace_backend_link(1);
    let daemon_b = files.start(&[]);
    assert_one_warning_for(&daemon_b.output(), &topo.backend_host_if(1));
    // Replies from b1 only come back if the reverse path was attached to
    // the new veth: every request answered, by both backends.
    assert_serves(&topo, &[0, 1], "daemon B after b1's veth was replaced");
    let a = attachments(&topo.backend_host_if(1));
    assert!(
        a.tcx_ingress.as_ref().is_ok_and(|p| p.len() == 1),
        "the new veth should carry the reverse path once:\n{a}"
    );
    stop_plain(&files, daemon_b);
}

#[test]
fn external_veth_replaced_while_stopped() {
    require_root();
    let topo = Topology::new("lbp2", 2);
    let _http = http_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = DaemonFiles::new(&topo, "pins");
    write_config(&files, &topo, &[0, 1], "");
    run_and_keep(&files, &topo, &[0, 1]);

    topo.replace_client_link();
    let daemon_b = files.start(&[]);
    assert_one_warning_for(&daemon_b.output(), &topo.client_host_if());
    assert_serves(
        &topo,
        &[0, 1],
        "daemon B after the client's veth was replaced",
    );
    let a = attachments(&topo.client_host_if());
    assert!(
        a.tcx_ingress.as_ref().is_ok_and(|p| p.len() == 1),
        "the new external veth should carry the data path once:\n{a}"
    );
    stop_plain(&files, daemon_b);
}

#[test]
fn backend_namespace_removed_while_stopped() {
    require_root();
    let topo = Topology::new("lbp3", 2);
    let mut http = http_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = DaemonFiles::new(&topo, "pins");
    write_config(&files, &topo, &[0, 1], "");
    run_and_keep(&files, &topo, &[0, 1]);

    // b1 is decommissioned while no daemon runs: its server stops, its
    // namespace (and with it its veth) goes, the config no longer lists
    // it. The pins still hold its backend entry and a link on its veth.
    drop(http.pop());
    topo.remove_backend_netns(1);
    write_config(&files, &topo, &[0], "");
    let daemon_b = files.start(&[]);
    assert_one_warning_for(&daemon_b.output(), &topo.backend_host_if(1));
    assert_serves(&topo, &[0], "daemon B after b1's namespace was removed");
    stop_plain(&files, daemon_b);
}

#[test]
fn pin_directory_of_another_layout() {
    require_root();
    let topo = Topology::new("lbp4", 2);
    let _http = http_servers(&topo);
    let _forward = ForwardDrop::new();
    let files = DaemonFiles::new(&topo, "pins");
    // Daemon A pins its data path with other map sizes (so another pin
    // directory) and leaves it attached.
    write_config(&files, &topo, &[0, 1], "max_services = 32\n");
    run_and_keep(&files, &topo, &[0, 1]);
    let old_layout: Vec<PathBuf> = std::fs::read_dir(files.pins.path())
        .expect("reading the pin path")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(old_layout.len(), 1, "{old_layout:?}");
    // An older layout version's directory, and something that is not lb's.
    let older = files.pins.path().join("abi1-s64-b4096-t65537-f1048576");
    std::fs::create_dir_all(older.join("links")).expect("creating an old layout directory");
    let foreign = files.pins.path().join("not-lb");
    std::fs::create_dir(&foreign).expect("creating a foreign directory");

    write_config(&files, &topo, &[0, 1], "");
    let daemon_b = files.start(&[]);
    let out = daemon_b.output();
    assert_eq!(
        lines_with(&out, LAYOUT_MARKER).len(),
        2,
        "want one warning per other layout; its output:\n{out}"
    );
    assert!(
        !out.contains(TAKEOVER_MARKER),
        "a data path of another layout must not be adopted; its output:\n{out}"
    );
    assert!(
        !old_layout[0].exists() && !older.exists(),
        "other layouts' pins left: {:?}",
        files.pins.listing()
    );
    assert!(foreign.exists(), "a directory lb did not make was removed");
    assert_serves(&topo, &[0, 1], "daemon B after another layout");
    // Daemon A's programs were detached: one data path on the interface.
    let a = attachments(&topo.client_host_if());
    assert!(
        a.tcx_ingress.as_ref().is_ok_and(|p| p.len() == 1),
        "the external veth should carry one data path:\n{a}"
    );
    let (status, out) = stop_with_output(daemon_b);
    assert!(
        status.success(),
        "daemon B exited with {status}; its output:\n{out}"
    );
    std::fs::remove_dir(&foreign).expect("removing the foreign directory");
}
