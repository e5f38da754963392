//! The packet-rate benchmark's machinery, end to end and small (no timing
//! asserted): the live-frames generator sends what it says, the frames cross
//! the real path, and the backends receive every one of them intact; every
//! contender's setup is undone. Run as root:
//! `cargo test -p lb-bench --test bench_rate -- --test-threads=1`.
//!
//! The `lb` binary under test is `$LB_BIN`, else `target/release/lb`, else
//! `target/debug/lb` (see [`lb_harness::lb_binary`]).

use std::{collections::BTreeSet, net::SocketAddrV4};

use lb_bench::rate::{
    Contender, Measurement, Plan, RateRig, BACKENDS, CHAIN, FIRST_SRC_PORT, PIN_PATH,
};
use lb_harness::{attachments, forward_policy, require_root, run};

/// Socket buffers big enough to hold every datagram of these small runs
/// (a datagram built from a live frame is charged a whole page).
const RCVBUF: usize = 64 << 20;

fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .expect("reading ip_forward")
        .trim()
        .to_owned()
}

fn nat_chain_exists() -> bool {
    run("iptables", &["-t", "nat", "-S", CHAIN])
        .status
        .success()
}

/// Checks that every frame `m` says was sent crossed the host's external
/// veth and reached a backend socket, was read back with the generator's
/// payload, and came from the flows' source addresses.
fn assert_all_delivered(what: &str, rig: &RateRig, m: &Measurement, flows: u16) {
    assert!(
        m.host_rx >= m.sent && m.host_rx - m.sent < 64,
        "{what}: the generator said it sent {} frames, the host's external veth received {} \
         (a few more may be the client's own IPv6 chatter): {m:?}",
        m.sent,
        m.host_rx
    );
    assert_eq!(
        m.delivered, m.sent,
        "{what}: {} sent, {} reached a backend socket: {m:?}",
        m.sent, m.delivered
    );
    assert_eq!(
        m.drained.read, m.sent,
        "{what}: {} sent, {} read back from the backend sockets: {m:?}",
        m.sent, m.drained.read
    );
    assert_eq!(m.drained.bad_payloads, 0, "{what}: payloads changed: {m:?}");
    assert_eq!(m.csum_errors, 0, "{what}: UDP checksum errors: {m:?}");
    assert_eq!(m.no_ports, 0, "{what}: datagrams to closed ports: {m:?}");
    let client = rig.topo.client_addr();
    let want: BTreeSet<SocketAddrV4> = (0..flows)
        .map(|i| SocketAddrV4::new(client, FIRST_SRC_PORT + i))
        .collect();
    let got: BTreeSet<SocketAddrV4> = m.drained.sources.iter().copied().collect();
    assert_eq!(got, want, "{what}: sources of the datagrams read back");
}

#[test]
fn generated_frames_reach_the_backends_through_lb() {
    require_root();
    const FLOWS: u16 = 10;
    const PLAN: Plan = Plan {
        frames: 10_000,
        window: None,
    };
    let policy = forward_policy();
    let forwarding = ip_forward();
    {
        let rig = RateRig::new(FLOWS, Some(RCVBUF));
        let ext = rig.topo.client_host_if();
        let m = rig.measure(Contender::Lb, PLAN);
        eprintln!("lb: {m:?}");
        assert_eq!(m.sent, 10_000, "frames the generator ran");
        assert_all_delivered("lb", &rig, &m, FLOWS);
        let used = m.per_backend.iter().filter(|n| **n > 0).count();
        assert!(
            used >= 2,
            "lb sent all {FLOWS} flows to one backend: {:?}",
            m.per_backend
        );
        assert_eq!(m.per_backend.len(), BACKENDS);
        let attached = attachments(&ext);
        assert!(
            !attached.has_xdp(),
            "lb's XDP program is still on {ext} after its measurement:\n{attached}"
        );
        assert!(
            !std::path::Path::new(PIN_PATH).exists(),
            "{PIN_PATH} left behind"
        );
    }
    assert_eq!(forward_policy(), policy, "FORWARD policy not restored");
    assert_eq!(ip_forward(), forwarding, "ip_forward not restored");
}

#[test]
fn every_other_contender_delivers_and_cleans_up() {
    require_root();
    const FLOWS: u16 = 3;
    const PLAN: Plan = Plan {
        frames: 3_000,
        window: None,
    };
    let policy = forward_policy();
    let forwarding = ip_forward();
    {
        let rig = RateRig::new(FLOWS, Some(RCVBUF));
        let ext = rig.topo.client_host_if();

        let m = rig.measure(Contender::Iptables, PLAN);
        eprintln!("iptables: {m:?}");
        assert_all_delivered("iptables", &rig, &m, FLOWS);
        // No assertion on the spread: statistic nth counts every packet that
        // reaches the nat table, and a batch of frames goes through PREROUTING
        // before its new conntrack entries are confirmed, so a new flow's
        // second frame in the same batch advances the counter too.
        assert!(!nat_chain_exists(), "the nat chain {CHAIN} is left behind");

        let m = rig.measure(Contender::Kernel, PLAN);
        eprintln!("kernel: {m:?}");
        assert_all_delivered("kernel forwarding", &rig, &m, FLOWS);
        assert_eq!(
            m.per_backend[0], m.sent,
            "kernel forwarding goes to backend 0"
        );

        for c in [Contender::LbToXdp, Contender::IptablesToXdp] {
            let m = rig.measure(c, PLAN);
            eprintln!("{c:?}: {m:?}");
            assert!(
                m.delivered >= m.sent && m.delivered - m.sent < 64,
                "{c:?}: {} sent, {} reached the backends' eth0: {m:?}",
                m.sent,
                m.delivered
            );
            assert_eq!(
                m.drained.read, 0,
                "{c:?}: frames got past the backends' XDP"
            );
            for ns in &rig.topo.backends {
                let link = ns.ip(&["link", "show", "eth0"]);
                assert!(
                    !link.contains("xdp"),
                    "{c:?}: the drop program is still on {}'s eth0:\n{link}",
                    ns.name()
                );
            }
        }

        let m = rig.measure(Contender::Generator, PLAN);
        eprintln!("generator alone: {m:?}");
        assert!(
            m.host_rx >= m.sent && m.host_rx - m.sent < 64,
            "the host's external veth received {} of {} frames: {m:?}",
            m.host_rx,
            m.sent
        );
        assert_eq!(m.delivered, 0, "frames got past the drop program: {m:?}");
        let attached = attachments(&ext);
        assert!(
            !attached.has_xdp(),
            "the drop program is still on {ext}:\n{attached}"
        );
    }
    assert_eq!(forward_policy(), policy, "FORWARD policy not restored");
    assert_eq!(ip_forward(), forwarding, "ip_forward not restored");
}
