//! End-to-end tests of the two delivery paths the default e2e topology does
//! not take: XDP forwarding of frames that arrive with complete checksums (as
//! from a NIC), and a backend that sits behind a router. Run as root, one at
//! a time: `cargo test -p lb-tests --test e2e_paths -- --test-threads=1`.
//!
//! The binary under test is `$LB_BIN`, else `target/release/lb`, else
//! `target/debug/lb` (see [`lb_harness::lb_binary`]).

use std::{
    collections::BTreeMap,
    ffi::CString,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{Map, MapData, PerCpuArray};
use lb_common::{maps, stat};
use lb_harness::{
    attachments, http_get_here, http_tally,
    packets::{assert_checksums_valid, frame, L4},
    render_config, require_root, run, run_ok,
    topology::LINK_ALIAS,
    Daemon, ForwardDrop, HttpServer, Netns, ServiceConfig, TempDir, Topology, UdpEcho,
    CLIENT_TIMEOUT, READY_MARKER,
};

/// How long the daemon may take to attach and write its maps.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// The UDP service's port on the VIP, and the backends' port.
const ECHO_PORT: u16 = 53;
const ECHO_BACKEND_PORT: u16 = 9000;
/// The HTTP service's port on the VIP, and the routed backend's port.
const WEB_PORT: u16 = 80;
const WEB_BACKEND_PORT: u16 = 8080;
/// What the daemon logs when it turned GRO on in a backend's namespace.
const GRO_MARKER: &str = "turned GRO on";

fn start_daemon(config: &Path) -> Daemon {
    let path = config.to_str().expect("UTF-8 config path");
    Daemon::start(&["run", "--config", path], READY_MARKER, READY_TIMEOUT)
}

/// `config` with `mode = "{mode}"` added to its `[datapath]` table.
fn with_mode(config: &str, mode: &str) -> String {
    let with = config.replacen(
        "[datapath]\n",
        &format!("[datapath]\nmode = \"{mode}\"\n"),
        1,
    );
    assert_ne!(with, config, "no [datapath] table in:\n{config}");
    with
}

/// A MAC address from `ip`/sysfs text; the daemon's own parser, panicking
/// with the text on failure.
fn parse_mac(text: &str) -> [u8; 6] {
    lb::host::parse_mac(text.trim()).unwrap_or_else(|e| panic!("{e}"))
}

/// The MAC of host interface `ifname`.
fn host_mac(ifname: &str) -> [u8; 6] {
    let path = format!("/sys/class/net/{ifname}/address");
    parse_mac(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}")))
}

/// The MAC of `ifname` inside `ns` (read with `ip`, nothing is changed).
fn netns_mac(ns: &Netns, ifname: &str) -> [u8; 6] {
    let json = ns.ip(&["-j", "link", "show", "dev", ifname]);
    let links: serde_json::Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("`ip -j link show {ifname}` in {}: {e}: {json}", ns.name()));
    let addr = links[0]["address"]
        .as_str()
        .unwrap_or_else(|| panic!("no MAC for {ifname} in {}: {json}", ns.name()));
    parse_mac(addr)
}

/// The global outcome counters of the running daemon `pid`, by name, read
/// from its own `LB_GLOBAL_STATS` map (found through its open descriptors,
/// so another `lb` on the host cannot be confused with it).
fn daemon_counters(pid: u32) -> Result<BTreeMap<&'static str, u64>, String> {
    let dir = format!("/proc/{pid}/fdinfo");
    let entries = std::fs::read_dir(&dir).map_err(|e| format!("reading {dir}: {e}"))?;
    let mut ids = Vec::new();
    // Bounded by the daemon's open descriptors.
    for entry in entries.flatten() {
        let Ok(info) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        ids.extend(
            info.lines()
                .filter_map(|l| l.strip_prefix("map_id:"))
                .filter_map(|id| id.trim().parse::<u32>().ok()),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let Ok(data) = MapData::from_id(id) else {
            continue;
        };
        let named = data
            .info()
            .is_ok_and(|i| i.name_as_str() == Some(maps::GLOBAL_STATS));
        if !named {
            continue;
        }
        let map = Map::from_map_data(data).map_err(|e| format!("map {id}: {e}"))?;
        let array =
            PerCpuArray::<MapData, u64>::try_from(map).map_err(|e| format!("map {id}: {e}"))?;
        let mut out = BTreeMap::new();
        for (i, name) in stat::NAMES.iter().enumerate() {
            let index = i as u32;
            let values = array
                .get(&index, 0)
                .map_err(|e| format!("map {id} index {index}: {e}"))?;
            out.insert(*name, values.iter().sum());
        }
        return Ok(out);
    }
    Err(format!("daemon {pid} holds no {} map", maps::GLOBAL_STATS))
}

fn counters_of(daemon: &Daemon) -> BTreeMap<&'static str, u64> {
    let pid = daemon.pid().expect("the daemon is running");
    daemon_counters(pid).unwrap_or_else(|e| panic!("reading the daemon's counters: {e}"))
}

/// A raw `AF_PACKET` socket that sends complete Ethernet frames out of one
/// interface of the namespace it was opened in (it receives nothing: its
/// protocol is 0).
struct FrameSender {
    fd: OwnedFd,
    addr: libc::sockaddr_ll,
}

impl FrameSender {
    /// Opens the socket for `ifname` of the calling thread's namespace;
    /// frames go to `dst_mac`.
    fn open(ifname: &str, dst_mac: [u8; 6]) -> Result<FrameSender, String> {
        let name = CString::new(ifname).expect("interface name without NUL");
        // SAFETY: a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            return Err(format!(
                "if_nametoindex({ifname}): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: plain syscall; the descriptor is owned right below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(format!(
                "socket(AF_PACKET, SOCK_RAW): {}",
                std::io::Error::last_os_error()
            ));
        }
        // SAFETY: `raw` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `sockaddr_ll` is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = (libc::ETH_P_IP as u16).to_be();
        addr.sll_ifindex = i32::try_from(ifindex).expect("ifindex fits i32");
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&dst_mac);
        Ok(FrameSender { fd, addr })
    }

    fn send(&self, frame: &[u8]) -> Result<(), String> {
        // SAFETY: the buffer and the address are valid for the given lengths.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&self.addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if n < 0 {
            return Err(format!("sendto: {}", std::io::Error::last_os_error()));
        }
        if n as usize != frame.len() {
            return Err(format!("sendto sent {n} of {} bytes", frame.len()));
        }
        Ok(())
    }
}

/// One datagram's outcome in the XDP test.
#[derive(Debug)]
struct Exchange {
    port: u16,
    payload: String,
    reply: Result<(String, SocketAddr), String>,
}

#[test]
fn xdp_forward_path_delivers_frames_with_complete_checksums() {
    require_root();
    const N: usize = 30;
    let topo = Topology::new("lbx1", 3);
    let _udp: Vec<UdpEcho> = (0..3)
        .map(|i| UdpEcho::start(&topo.backends[i], ECHO_BACKEND_PORT, &format!("b{i}")))
        .collect();
    let _forward = ForwardDrop::new();
    let ext = topo.client_host_if();
    let vip = SocketAddrV4::new(topo.vip(), ECHO_PORT);
    let dir = TempDir::new("e2e-xdp");
    let cfg = with_mode(
        &render_config(
            &[&ext],
            &[ServiceConfig::new(
                "echo",
                &vip.to_string(),
                "udp",
                &topo.backend_endpoints(ECHO_BACKEND_PORT),
            )],
        ),
        "xdp",
    );
    let cfg = dir.write("lb.toml", &cfg);
    let daemon = start_daemon(&cfg);

    let log = daemon.output();
    let gro_lines: Vec<&str> = log.lines().filter(|l| l.contains(GRO_MARKER)).collect();
    assert!(
        !gro_lines.is_empty(),
        "the daemon did not log {GRO_MARKER:?}; its output:\n{log}"
    );
    for i in 0..3 {
        let host_if = topo.backend_host_if(i);
        assert!(
            gro_lines.iter().any(|l| l.contains(&host_if)),
            "no {GRO_MARKER:?} line for {host_if}: {gro_lines:#?}"
        );
        // The daemon has no ethtool (see `Daemon::start`): it set GRO through
        // the ethtool netlink family; the harness checks with the tool.
        let features = topo.backends[i].exec_ok(&["ethtool", "-k", "eth0"]);
        assert!(
            features
                .lines()
                .any(|l| l.trim() == "generic-receive-offload: on"),
            "GRO is still off in {}'s eth0:\n{features}",
            topo.backends[i].name()
        );
    }
    let attached = attachments(&ext);
    assert!(
        attached.has_xdp(),
        "mode = \"xdp\" but no XDP program on {ext}:\n{attached}"
    );
    eprintln!("{attached}");

    let lb_mac = host_mac(&ext);
    let client_mac = netns_mac(&topo.client, "eth0");
    let client = topo.client_addr();
    let before = counters_of(&daemon);
    let exchanges: Vec<Exchange> = topo.client.run(|| {
        let sender = FrameSender::open("eth0", lb_mac)
            .unwrap_or_else(|e| panic!("opening a packet socket on the client's eth0: {e}"));
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut sockets = Vec::with_capacity(N);
        let mut out = Vec::with_capacity(N);
        for i in 0..N {
            let socket = UdpSocket::bind(SocketAddrV4::new(client, 0))
                .unwrap_or_else(|e| panic!("binding {client}:0 in the client namespace: {e}"));
            socket
                .set_read_timeout(Some(CLIENT_TIMEOUT))
                .expect("UDP read timeout");
            let port = socket.local_addr().expect("local address").port();
            let payload = format!("xdp-{i}");
            if Instant::now() >= deadline {
                out.push(Exchange {
                    port,
                    payload,
                    reply: Err("deadline passed before sending".into()),
                });
                sockets.push(socket);
                continue;
            }
            let f = frame(
                (lb_mac, client_mac),
                None,
                client.octets(),
                vip.ip().octets(),
                L4::Udp {
                    src: port,
                    dst: ECHO_PORT,
                },
                &[],
                payload.as_bytes(),
            );
            // Complete checksums, as a NIC would deliver them.
            assert_checksums_valid("client frame", &f);
            assert_ne!(f[40..42], [0, 0], "UDP checksum must be present");
            let reply = sender.send(&f).and_then(|()| {
                let mut buf = [0u8; 2048];
                socket
                    .recv_from(&mut buf)
                    .map(|(n, from)| (String::from_utf8_lossy(&buf[..n]).into_owned(), from))
                    .map_err(|e| format!("no reply to port {port}: {e}"))
            });
            out.push(Exchange {
                port,
                payload,
                reply,
            });
            // Every socket stays open to the end: distinct source ports.
            sockets.push(socket);
        }
        out
    });
    let after = counters_of(&daemon);

    let failures: Vec<&Exchange> = exchanges
        .iter()
        .filter(|x| match &x.reply {
            Ok((body, from)) => {
                *from != SocketAddr::V4(vip)
                    || body
                        .split_once(':')
                        .is_none_or(|(_, echoed)| echoed != x.payload)
            }
            Err(_) => true,
        })
        .collect();
    let delta = |name: &str| after[name] - before[name];
    let deltas: BTreeMap<&str, u64> = after.keys().map(|k| (*k, delta(k))).collect();
    assert!(
        failures.is_empty(),
        "{} of {N} datagrams sent as complete frames were not answered by `{{backend}}:{{payload}}` \
         from {vip}: {failures:#?}\ncounters during the test: {deltas:?}",
        failures.len()
    );
    let ports: std::collections::BTreeSet<u16> = exchanges.iter().map(|x| x.port).collect();
    assert_eq!(ports.len(), N, "source ports not distinct: {ports:?}");
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for x in &exchanges {
        let (body, _) = x.reply.as_ref().expect("checked above");
        let (name, _) = body.split_once(':').expect("checked above");
        *counts.entry(name.to_owned()).or_insert(0) += 1;
    }
    assert!(
        counts.len() >= 2,
        "all {N} flows went to one backend: {counts:?}"
    );
    assert!(
        counts
            .keys()
            .all(|k| ["b0", "b1", "b2"].contains(&k.as_str())),
        "unknown backends answered: {counts:?}"
    );
    // XDP itself forwarded them: not passed to the skb path.
    assert!(
        delta("fwd_xdp") >= N as u64,
        "XDP redirected {} of {N} datagrams; counters during the test: {deltas:?}",
        delta("fwd_xdp")
    );
    assert_eq!(
        delta("pass_to_skb_path"),
        0,
        "XDP passed datagrams to the skb path: {deltas:?}"
    );
    assert_eq!(delta("fwd_skb"), 0, "TC forwarded datagrams: {deltas:?}");
    assert!(
        delta("reverse_nat") >= N as u64,
        "replies not reverse-translated by TC: {deltas:?}"
    );
    eprintln!("replies by backend: {counts:?}; counters during the test: {deltas:?}");

    let attached = attachments(&ext);
    assert!(
        attached.has_xdp(),
        "XDP no longer attached to {ext} after the traffic:\n{attached}"
    );
    for (i, ns) in topo.backends.iter().enumerate() {
        let features = ns.exec_ok(&["ethtool", "-k", "eth0"]);
        assert!(
            features
                .lines()
                .any(|l| l.trim() == "generic-receive-offload: on"),
            "GRO is not on in backend {i}'s eth0:\n{features}"
        );
    }

    let status = daemon.stop();
    assert!(status.success(), "lb exited with {status} on SIGTERM");
    let attached = attachments(&ext);
    assert!(
        !attached.has_xdp(),
        "XDP still attached to {ext} after lb stopped:\n{attached}"
    );
}

/// The routed backend's network: a router namespace joined to the host by
/// veth `{prefix}r0` (198.18.110.1/24 here, 198.18.110.2/24 in the router)
/// and to the backend namespace by a second veth (198.18.111.1/24 in the
/// router, 198.18.111.2/24 in the backend), and a host route to
/// 198.18.111.0/24 via the router. Dropping it removes the route, the veth
/// and both namespaces.
struct RoutedBackend {
    host_if: String,
    route_added: bool,
    link_added: bool,
    /// The backend namespace, `{prefix}-rb` (dropped before the router's).
    backend: Netns,
    /// The router namespace, `{prefix}-r`.
    router: Netns,
}

const ROUTER_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 110, 1);
const ROUTER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 110, 2);
const ROUTER_INNER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 111, 1);
const ROUTED_BACKEND_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 111, 2);
const ROUTED_NET: &str = "198.18.111.0/24";

impl RoutedBackend {
    fn new(prefix: &str) -> RoutedBackend {
        let host_if = format!("{prefix}r0");
        // A crashed run's link (marked with the harness alias) goes first;
        // anything else with the name is someone else's.
        if Path::new(&format!("/sys/class/net/{host_if}")).exists() {
            let alias = std::fs::read_to_string(format!("/sys/class/net/{host_if}/ifalias"))
                .unwrap_or_default();
            assert_eq!(
                alias.trim(),
                LINK_ALIAS,
                "{host_if} exists and was not made by this harness"
            );
            eprintln!("removing stale link {host_if}");
            let _ = run("ip", &["link", "del", &host_if]);
        }
        let addrs =
            String::from_utf8_lossy(&run("ip", &["-o", "-4", "addr", "show"]).stdout).into_owned();
        assert!(
            !addrs.contains(" 198.18.110.") && !addrs.contains(" 198.18.111."),
            "198.18.110.0/24 or 198.18.111.0/24 is in use on this host:\n{addrs}"
        );
        let router = Netns::new(&format!("{prefix}-r"));
        let backend = Netns::new(&format!("{prefix}-rb"));
        let mut me = RoutedBackend {
            host_if,
            route_added: false,
            link_added: false,
            backend,
            router,
        };
        let (r, b, h) = (
            me.router.name().to_owned(),
            me.backend.name().to_owned(),
            me.host_if.clone(),
        );

        run_ok(
            "ip",
            &[
                "link", "add", &h, "type", "veth", "peer", "name", "eth0", "netns", &r,
            ],
        );
        me.link_added = true;
        run_ok("ip", &["link", "set", "dev", &h, "alias", LINK_ALIAS]);
        run_ok(
            "ip",
            &["addr", "add", &format!("{ROUTER_HOST_ADDR}/24"), "dev", &h],
        );
        run_ok("ip", &["link", "set", &h, "up"]);

        me.router.ip(&["link", "set", "lo", "up"]);
        me.router
            .ip(&["addr", "add", &format!("{ROUTER_ADDR}/24"), "dev", "eth0"]);
        me.router.ip(&["link", "set", "eth0", "up"]);
        me.router.ip(&[
            "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ]);
        me.router.ip(&[
            "addr",
            "add",
            &format!("{ROUTER_INNER_ADDR}/24"),
            "dev",
            "eth1",
        ]);
        me.router.ip(&["link", "set", "eth1", "up"]);
        me.router.ip(&[
            "route",
            "add",
            "default",
            "via",
            &ROUTER_HOST_ADDR.to_string(),
        ]);
        me.router
            .exec_ok(&["sysctl", "-w", "net.ipv4.ip_forward=1"]);

        me.backend.ip(&["link", "set", "lo", "up"]);
        me.backend.ip(&[
            "addr",
            "add",
            &format!("{ROUTED_BACKEND_ADDR}/24"),
            "dev",
            "eth0",
        ]);
        me.backend.ip(&["link", "set", "eth0", "up"]);
        me.backend.ip(&[
            "route",
            "add",
            "default",
            "via",
            &ROUTER_INNER_ADDR.to_string(),
        ]);

        run_ok(
            "ip",
            &["route", "add", ROUTED_NET, "via", &ROUTER_ADDR.to_string()],
        );
        me.route_added = true;
        me
    }
}

impl Drop for RoutedBackend {
    fn drop(&mut self) {
        if self.route_added {
            let out = run(
                "ip",
                &["route", "del", ROUTED_NET, "via", &ROUTER_ADDR.to_string()],
            );
            if !out.status.success() {
                eprintln!(
                    "warning: `ip route del {ROUTED_NET}`: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        if self.link_added {
            let out = run("ip", &["link", "del", &self.host_if]);
            let err = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() && !err.contains("Cannot find device") {
                eprintln!("warning: `ip link del {}`: {}", self.host_if, err.trim());
            }
        }
        // Fields drop next: the backend's namespace, then the router's.
    }
}

#[test]
fn backend_behind_a_router() {
    require_root();
    const N: usize = 50;
    let topo = Topology::new("lbx2", 0);
    let routed = RoutedBackend::new("lbx2");
    let server = HttpServer::start(&routed.backend, WEB_BACKEND_PORT, "routed");
    let backend = SocketAddrV4::new(ROUTED_BACKEND_ADDR, WEB_BACKEND_PORT);
    let vip = SocketAddrV4::new(topo.vip(), WEB_PORT);

    // The plumbing works on its own: the host reaches the backend through
    // the router (the host's own traffic, not forwarded by it).
    let direct = http_get_here(backend);
    assert_eq!(
        direct.as_deref(),
        Ok("routed"),
        "the host cannot reach the routed backend {backend} through the router"
    );

    let _forward = ForwardDrop::new();
    let dir = TempDir::new("e2e-routed");
    let cfg = dir.write(
        "lb.toml",
        &render_config(
            &[&topo.client_host_if()],
            &[ServiceConfig::new(
                "web",
                &vip.to_string(),
                "tcp",
                &[backend.to_string()],
            )],
        ),
    );
    let daemon = start_daemon(&cfg);
    let before = counters_of(&daemon);
    let served_before = server.served();
    let tally = http_tally(&topo.client, vip, N, Duration::from_secs(120));
    let after = counters_of(&daemon);
    let deltas: BTreeMap<&str, u64> = after.keys().map(|k| (*k, after[k] - before[k])).collect();
    let served = server.served() - served_before;
    assert!(
        tally.failures == 0 && tally.count("routed") == N,
        "HTTP through {vip} to a backend behind a router: {tally:?}\n\
         the backend answered {served} requests; counters during the test: {deltas:?}"
    );
    assert_eq!(tally.successes(), N, "unexpected bodies: {tally:?}");
    eprintln!("counters during the test: {deltas:?}");
    // The router is another host's: its devices are not the daemon's to change.
    assert!(
        !daemon.output().contains(GRO_MARKER),
        "lb changed a device in the router's namespace:\n{}",
        daemon.output()
    );

    let status = daemon.stop();
    assert!(status.success(), "lb exited with {status} on SIGTERM");
}
