//! The data path in the kernel itself: table-driven packet fixtures run
//! through `BPF_PROG_TEST_RUN`, with expected actions and expected output
//! bytes. Expected frames are built and checksummed by etherparse, an
//! implementation independent of the data path's incremental updates.
//!
//! Needs root (BPF). Each test loads its own copy of the programs and maps.

use std::net::Ipv4Addr;

use etherparse::PacketBuilder;
use lb_common::{
    FlowKey, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_F_MAC, BACKEND_F_PEER,
    BACKEND_F_XDP, IFACE_F_REPLIES, IPPROTO_TCP, IPPROTO_UDP, SERVICE_F_DSR,
};
use lb_ebpf::hash::flow_hash;
use lb_harness::{netns::Netns, packets::*};

/// Flow table size for these tests.
const FLOWS: u32 = 4096;

/// One row of the fixture table.
struct Fixture {
    name: &'static str,
    input: Vec<u8>,
    xdp_action: u32,
    /// `None`: the output must equal the input.
    xdp_output: Option<Vec<u8>>,
}

#[test]
fn xdp_fixtures() {
    let mut rig = Rig::web(1, BACKEND_F_XDP | BACKEND_F_MAC | BACKEND_F_PEER, FLOWS);
    rig.backend(1, 1, 0, 9000, BACKEND_F_XDP | BACKEND_F_MAC, BACKEND_ACTIVE);
    rig.service(1, 53, IPPROTO_UDP, &[1]);
    let opts = [1u8, 1, 1, 0]; // NOP, NOP, NOP, end of list
    let payload = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let fixtures = vec![
        Fixture {
            name: "SYN to the VIP is rewritten to the backend",
            input: syn(40000),
            xdp_action: XDP_REDIRECT,
            xdp_output: Some(syn_to_backend(40000, 0)),
        },
        Fixture {
            name: "the same flow again goes to the same backend",
            input: syn(40000),
            xdp_action: XDP_REDIRECT,
            xdp_output: Some(syn_to_backend(40000, 0)),
        },
        Fixture {
            name: "TCP with payload",
            input: frame(
                (LB_MAC, CLIENT_MAC),
                None,
                CLIENT,
                VIP,
                L4::Syn {
                    src: 40001,
                    dst: 80,
                },
                &[],
                payload,
            ),
            xdp_action: XDP_REDIRECT,
            xdp_output: Some(frame(
                (BACKEND_MACS[0], HOST_MAC),
                None,
                CLIENT,
                BACKENDS[0],
                L4::Syn {
                    src: 40001,
                    dst: 8080,
                },
                &[],
                payload,
            )),
        },
        Fixture {
            name: "UDP to the VIP",
            input: frame(
                (LB_MAC, CLIENT_MAC),
                None,
                CLIENT,
                VIP,
                L4::Udp { src: 5353, dst: 53 },
                &[],
                b"query",
            ),
            xdp_action: XDP_REDIRECT,
            xdp_output: Some(frame(
                (BACKEND_MACS[0], HOST_MAC),
                None,
                CLIENT,
                BACKENDS[0],
                L4::Udp {
                    src: 5353,
                    dst: 9000,
                },
                &[],
                b"query",
            )),
        },
        Fixture {
            name: "VLAN-tagged SYN: rewritten, tag removed for the untagged backend link",
            input: frame(
                (LB_MAC, CLIENT_MAC),
                Some(42),
                CLIENT,
                VIP,
                L4::Syn {
                    src: 40002,
                    dst: 80,
                },
                &[],
                &[],
            ),
            xdp_action: XDP_REDIRECT,
            xdp_output: Some(syn_to_backend(40002, 0)),
        },
        Fixture {
            name: "IP options are carried through",
            input: frame(
                (LB_MAC, CLIENT_MAC),
                None,
                CLIENT,
                VIP,
                L4::Syn {
                    src: 40003,
                    dst: 80,
                },
                &opts,
                &[],
            ),
            xdp_action: XDP_REDIRECT,
            xdp_output: Some(frame(
                (BACKEND_MACS[0], HOST_MAC),
                None,
                CLIENT,
                BACKENDS[0],
                L4::Syn {
                    src: 40003,
                    dst: 8080,
                },
                &opts,
                &[],
            )),
        },
        Fixture {
            name: "TCP to another port of the VIP is not a service",
            input: frame(
                (LB_MAC, CLIENT_MAC),
                None,
                CLIENT,
                VIP,
                L4::Syn {
                    src: 40004,
                    dst: 81,
                },
                &[],
                &[],
            ),
            xdp_action: XDP_PASS,
            xdp_output: None,
        },
        Fixture {
            name: "UDP to the TCP service's port is not a service",
            input: frame(
                (LB_MAC, CLIENT_MAC),
                None,
                CLIENT,
                VIP,
                L4::Udp {
                    src: 40005,
                    dst: 80,
                },
                &[],
                b"x",
            ),
            xdp_action: XDP_PASS,
            xdp_output: None,
        },
        Fixture {
            name: "another destination address is not a service",
            input: frame(
                (LB_MAC, CLIENT_MAC),
                None,
                CLIENT,
                [198, 18, 101, 9],
                L4::Syn {
                    src: 40006,
                    dst: 80,
                },
                &[],
                &[],
            ),
            xdp_action: XDP_PASS,
            xdp_output: None,
        },
    ];
    for f in &fixtures {
        let Run {
            action,
            output: out,
            ..
        } = rig
            .xdp(&f.input)
            .unwrap_or_else(|e| panic!("{}: test run failed: {e}", f.name));
        assert_eq!(action, f.xdp_action, "{}: action", f.name);
        match &f.xdp_output {
            Some(want) => {
                assert_checksums_valid(f.name, &out);
                assert_eq!(&out, want, "{}: output bytes", f.name);
            }
            None => assert_eq!(out, f.input, "{}: must be untouched", f.name),
        }
    }
    assert_eq!(rig.global("fwd_xdp"), 6);
    assert_eq!(rig.global("pass_no_service"), 3);
    let svc = rig.service_counters(0);
    assert_eq!(svc.packets, 5, "service packets");
    assert_eq!(svc.new_flows, 4, "the repeated SYN is not a new flow");
}

#[test]
fn non_ipv4_and_non_l4_pass_untouched() {
    let mut rig = Rig::web(1, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    let mut ipv6 = syn(40000);
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    let mut arp = vec![0xffu8; 6];
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    arp.extend_from_slice(&CLIENT_MAC);
    arp.extend_from_slice(&CLIENT);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&VIP);
    let mut icmp = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LB_MAC)
        .ipv4(CLIENT, VIP, 64)
        .icmpv4_echo_request(7, 1)
        .write(&mut icmp, b"ping")
        .unwrap();
    for (name, f, counter) in [
        ("IPv6", ipv6, "pass_not_ipv4"),
        ("ARP", arp, "pass_not_ipv4"),
        ("ICMP", icmp, "pass_not_l4"),
    ] {
        let Run {
            action: a,
            output: out,
            ..
        } = rig.xdp(&f).unwrap();
        assert_eq!(a, XDP_PASS, "{name}");
        assert_eq!(out, f, "{name} untouched");
        let Run {
            action: a,
            output: out,
            ..
        } = rig.tc(&f).unwrap();
        assert_eq!(a, TC_ACT_UNSPEC, "{name} (tc)");
        assert_eq!(out, f, "{name} untouched (tc)");
        assert!(rig.global(counter) >= 1, "{name} counted in {counter}");
    }
}

#[test]
fn fragments_pass_untouched() {
    let mut rig = Rig::web(1, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    for (name, frag) in [
        ("first fragment", 0x2000u16),
        ("later fragment", 0x00b9),
        ("last fragment", 0x00ba),
    ] {
        let mut f = frame(
            (LB_MAC, CLIENT_MAC),
            None,
            CLIENT,
            VIP,
            L4::Syn {
                src: 40000,
                dst: 80,
            },
            &[],
            &[],
        );
        f[20..22].copy_from_slice(&frag.to_be_bytes());
        let Run {
            action: a,
            output: out,
            ..
        } = rig.xdp(&f).unwrap();
        assert_eq!(a, XDP_PASS, "{name}");
        assert_eq!(out, f, "{name} untouched");
    }
    assert_eq!(rig.global("pass_fragment"), 3);
}

#[test]
fn every_truncation_has_a_defined_action() {
    let mut rig = Rig::web(1, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    let full = frame(
        (LB_MAC, CLIENT_MAC),
        None,
        CLIENT,
        VIP,
        L4::Syn {
            src: 40000,
            dst: 80,
        },
        &[1, 1, 1, 0],
        b"data",
    );
    let (mut ran, mut ran_tc) = (0, 0);
    for len in 0..full.len() {
        let cut = &full[..len];
        match rig.xdp(cut) {
            Ok(Run {
                action: a,
                output: out,
                ..
            }) => {
                assert_eq!(a, XDP_PASS, "XDP, {len} bytes");
                assert_eq!(out, cut, "XDP, {len} bytes untouched");
                ran += 1;
            }
            // The kernel itself refuses frames shorter than an Ethernet header.
            Err(e) => assert!(len < 14, "XDP, {len} bytes: the kernel refused: {e}"),
        }
        match rig.tc(cut) {
            Ok(Run {
                action: a,
                output: out,
                ..
            }) => {
                assert_eq!(a, TC_ACT_UNSPEC, "TC, {len} bytes");
                assert_eq!(out, cut, "TC, {len} bytes untouched");
                ran_tc += 1;
            }
            // The skb test run refuses an IPv4 ethertype without a whole
            // IPv4 header: those lengths are covered by XDP above.
            Err(e) => assert!(len < 14 + 20, "TC, {len} bytes: the kernel refused: {e}"),
        }
    }
    assert_eq!(
        ran,
        full.len() - 14,
        "XDP runs every length from an Ethernet header up"
    );
    assert_eq!(
        ran_tc,
        full.len() - 34,
        "TC runs every length from an IPv4 header up"
    );
    assert_eq!(
        rig.global("pass_malformed"),
        (ran + ran_tc) as u64,
        "every cut is counted as malformed"
    );
    // Whole, it is balanced.
    assert_eq!(rig.xdp(&full).unwrap().action, XDP_REDIRECT);
}

#[test]
fn flows_stick_and_spread_over_backends() {
    let mut rig = Rig::web(3, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    let mut seen = [0usize; 3];
    for port in 30000..30090u16 {
        let Run {
            action: a,
            output: out,
            ..
        } = rig.xdp(&syn(port)).unwrap();
        assert_eq!(a, XDP_REDIRECT);
        let b = backend_of(&out);
        assert_eq!(out, syn_to_backend(port, b), "port {port}");
        seen[b] += 1;
        for _ in 0..3 {
            let Run {
                action: _,
                output: again,
                ..
            } = rig.xdp(&syn(port)).unwrap();
            assert_eq!(backend_of(&again), b, "port {port} moved");
        }
    }
    assert!(seen.iter().all(|&n| n >= 15), "uneven spread {seen:?}");
}

#[test]
fn down_backend_flows_move_draining_backend_flows_stay() {
    let mut rig = Rig::web(3, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    let mut on: [Vec<u16>; 3] = Default::default();
    for port in 31000..31060u16 {
        let Run {
            action: _,
            output: out,
            ..
        } = rig.xdp(&syn(port)).unwrap();
        on[backend_of(&out)].push(port);
    }
    // Backend 1 drains: its flows stay. Backend 2 goes down: its flows move.
    rig.backend(
        1,
        0,
        1,
        8080,
        BACKEND_F_XDP | BACKEND_F_MAC,
        BACKEND_DRAINING,
    );
    rig.backend(2, 0, 2, 8080, BACKEND_F_XDP | BACKEND_F_MAC, BACKEND_DOWN);
    rig.service(0, 80, IPPROTO_TCP, &[0]);
    for &p in &on[1] {
        assert_eq!(
            backend_of(&rig.xdp(&ack(p)).unwrap().output),
            1,
            "draining keeps port {p}"
        );
    }
    for &p in &on[2] {
        assert_eq!(
            backend_of(&rig.xdp(&syn(p)).unwrap().output),
            0,
            "down moves port {p}"
        );
    }
    assert_eq!(rig.global("flow_rebalanced"), on[2].len() as u64);
    for &p in &on[0] {
        assert_eq!(
            backend_of(&rig.xdp(&syn(p)).unwrap().output),
            0,
            "healthy keeps port {p}"
        );
    }
}

/// A client reuses a source port whose old connection is still recorded on
/// a draining backend: the new connection's SYN is balanced afresh and
/// recorded, so the rest of it follows; the old connection's segments would
/// have stayed.
#[test]
fn a_syn_reusing_a_draining_flows_ports_is_balanced_afresh() {
    let mut rig = Rig::web(2, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    let port = (33000..33100u16)
        .find(|&p| backend_of(&rig.xdp(&syn(p)).unwrap().output) == 0)
        .expect("some flow lands on backend 0");
    rig.backend(
        0,
        0,
        0,
        8080,
        BACKEND_F_XDP | BACKEND_F_MAC,
        BACKEND_DRAINING,
    );
    rig.service(0, 80, IPPROTO_TCP, &[1]);
    assert_eq!(
        backend_of(&rig.xdp(&ack(port)).unwrap().output),
        0,
        "old connection stays"
    );
    let rebalanced = rig.global("flow_rebalanced");
    let run = rig.xdp(&syn(port)).unwrap();
    assert_eq!(run.action, XDP_REDIRECT);
    assert_eq!(run.output, syn_to_backend(port, 1), "a new connection");
    assert_eq!(rig.global("flow_rebalanced"), rebalanced + 1);
    assert_eq!(
        backend_of(&rig.xdp(&ack(port)).unwrap().output),
        1,
        "and its segments follow"
    );
    assert_eq!(rig.global("flow_rebalanced"), rebalanced + 1);
}

#[test]
fn a_flow_moved_to_the_skb_path_is_rebalanced_once() {
    // Both backends take XDP frames: the flow starts on backend 0 in XDP.
    let mut rig = Rig::web(2, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    let port = (32000..32100u16)
        .find(|&p| {
            let run = rig.xdp(&syn(p)).unwrap();
            run.action == XDP_REDIRECT && backend_of(&run.output) == 0
        })
        .expect("some flow lands on backend 0");
    // Backend 0 goes down; the flow's new backend takes no XDP frames.
    rig.backend(0, 0, 0, 8080, BACKEND_F_XDP | BACKEND_F_MAC, BACKEND_DOWN);
    rig.backend(
        1,
        0,
        1,
        8080,
        BACKEND_F_MAC | BACKEND_F_PEER,
        BACKEND_ACTIVE,
    );
    rig.service(0, 80, IPPROTO_TCP, &[1]);

    // XDP passes the stale flow's packet to the skb path, where TC moves it.
    let input = syn(port);
    let xdp = rig.xdp(&input).unwrap();
    assert_eq!(xdp.action, XDP_PASS);
    assert_eq!(xdp.output, input, "passed untouched");
    let tc = rig.tc(&input).unwrap();
    assert_eq!(tc.action, TC_ACT_REDIRECT);
    assert_eq!(tc.output, syn_to_backend(port, 1));
    assert_eq!(
        rig.global("flow_rebalanced"),
        1,
        "one packet moved once, not once by each program"
    );

    // The flow is now recorded on backend 1: no further rebalance.
    assert_eq!(rig.xdp(&input).unwrap().action, XDP_PASS);
    assert_eq!(rig.tc(&input).unwrap().action, TC_ACT_REDIRECT);
    assert_eq!(rig.global("flow_rebalanced"), 1);
    assert_eq!(rig.global("pass_to_skb_path"), 2);
    assert_eq!(rig.global("fwd_skb"), 2);
}

#[test]
fn no_backend_is_a_counted_drop() {
    let mut rig = Rig::new(FLOWS);
    rig.service(0, 80, IPPROTO_TCP, &[]);
    let Run {
        action: a,
        output: _,
        ..
    } = rig.xdp(&syn(40000)).unwrap();
    assert_eq!(a, XDP_DROP);
    let Run {
        action: a,
        output: _,
        ..
    } = rig.tc(&syn(40000)).unwrap();
    assert_eq!(a, TC_ACT_SHOT);
    assert_eq!(rig.global("drop_no_backend"), 2);
}

#[test]
fn reply_is_rewritten_back_to_the_vip() {
    let mut rig = Rig::web(1, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    assert_eq!(rig.xdp(&syn(40000)).unwrap().action, XDP_REDIRECT);
    let Run {
        action: a,
        output: out,
        ..
    } = rig.tc(&reply_from_backend(40000, 0)).unwrap();
    assert_eq!(a, TC_ACT_REDIRECT, "sent on to the client's interface");
    assert_checksums_valid("reply", &out);
    assert_eq!(out, reply_to_client(40000), "reply bytes");
    assert_eq!(rig.global("reverse_nat"), 1);

    // A packet from the backend that belongs to no flow is left alone.
    let other = reply_from_backend(40001, 0);
    let Run {
        action: a,
        output: out,
        ..
    } = rig.tc(&other).unwrap();
    assert_eq!(a, TC_ACT_UNSPEC);
    assert_eq!(out, other);
    // Its only service claims it, but a test run has no interface to route
    // it from (see the FIB tests below).
    assert_eq!(rig.global("pass_no_route"), 1);
}

/// A namespace where a reply can be routed to the client: `c0` (with
/// [`LB_MAC`]) leads to the client, whose MAC is a permanent neighbour
/// entry; replies come in on `b0`. Returns it with `b0`'s ifindex.
fn fib_namespace(name: &str, forwarding: bool) -> (Netns, u32) {
    let ns = Netns::new(name);
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    ns.ip(&[
        "link",
        "add",
        "c0",
        "address",
        &mac(LB_MAC),
        "type",
        "veth",
        "peer",
        "name",
        "c1",
    ]);
    ns.ip(&["link", "add", "b0", "type", "veth", "peer", "name", "b1"]);
    for link in ["c0", "c1", "b0", "b1"] {
        ns.ip(&["link", "set", link, "up"]);
    }
    ns.ip(&["addr", "add", "198.18.100.1/24", "dev", "c0"]);
    let client = Ipv4Addr::from(CLIENT).to_string();
    ns.ip(&[
        "neigh",
        "add",
        &client,
        "lladdr",
        &mac(CLIENT_MAC),
        "dev",
        "c0",
        "nud",
        "permanent",
    ]);
    let value = if forwarding { "1" } else { "0" };
    ns.exec_ok(&[
        "sysctl",
        "-w",
        &format!("net.ipv4.conf.all.forwarding={value}"),
    ]);
    // SAFETY: a NUL-terminated name.
    let b0 = ns.run(|| unsafe { libc::if_nametoindex(c"b0".as_ptr()) });
    assert_ne!(b0, 0, "b0 exists in {name}");
    (ns, b0)
}

#[test]
fn a_reply_without_its_flow_is_restored_and_routed_by_the_fib() {
    // Another node forwarded the client's SYN: this one holds no flow.
    let mut rig = Rig::web(1, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    let reply = reply_from_backend(40000, 0);
    let (ns, b0) = fib_namespace("lbdpfib1", true);
    let run = ns.run(|| rig.tc_from(&reply, b0)).unwrap();
    assert_eq!(
        run.action, TC_ACT_REDIRECT,
        "sent where the FIB routes the client"
    );
    assert_checksums_valid("reply", &run.output);
    assert_eq!(
        run.output,
        reply_to_client(40000),
        "the VIP as source, the route's MACs"
    );
    assert_eq!(rig.global("reverse_nat_no_flow"), 1);
    assert_eq!(rig.global("reverse_nat"), 0);
    drop(ns);

    // With forwarding off on the interface it came in on, no route: the
    // reply passes untouched.
    let (ns, b0) = fib_namespace("lbdpfib2", false);
    let run = ns.run(|| rig.tc_from(&reply, b0)).unwrap();
    assert_eq!(run.action, TC_ACT_UNSPEC);
    assert_eq!(run.output, reply);
    assert_eq!(rig.global("pass_no_route"), 1);
}

/// The backend id service `members`' table names for the client's flow
/// from `client_port` to VIP:`port`, computed apart from the data path.
fn named_by_table(members: &[u32], port: u16, client_port: u16) -> u32 {
    let key = FlowKey {
        src_addr: u32::from_ne_bytes(CLIENT),
        dst_addr: u32::from_ne_bytes(VIP),
        src_port: client_port.to_be(),
        dst_port: port.to_be(),
        proto: IPPROTO_TCP,
        _pad1: 0,
        _pad2: 0,
    };
    rig_table(members)[(flow_hash(&key) % TABLE) as usize]
}

#[test]
fn a_reply_without_its_flow_goes_to_the_service_whose_table_names_its_backend() {
    // Fixture backends 0 and 1, both on :8080, serve VIP:80 (service 0,
    // ids 0 and 1) and VIP:81 (service 1, ids 2 and 3).
    let mut rig = Rig::web(2, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    rig.backend(2, 1, 0, 8080, BACKEND_F_XDP | BACKEND_F_MAC, BACKEND_ACTIVE);
    rig.backend(3, 1, 1, 8080, BACKEND_F_XDP | BACKEND_F_MAC, BACKEND_ACTIVE);
    rig.service(1, 81, IPPROTO_TCP, &[2, 3]);
    let ports = 40000..41000u16;
    let to_81 = ports
        .clone()
        .find(|&p| named_by_table(&[0, 1], 80, p) != 0 && named_by_table(&[2, 3], 81, p) == 2)
        .expect("a flow service 1's table gives fixture 0");
    let unclaimed = ports
        .clone()
        .find(|&p| named_by_table(&[0, 1], 80, p) != 0 && named_by_table(&[2, 3], 81, p) != 2)
        .expect("a flow neither table gives fixture 0");

    let (ns, b0) = fib_namespace("lbdpfib3", true);
    let run = ns
        .run(|| rig.tc_from(&reply_from_backend(to_81, 0), b0))
        .unwrap();
    assert_eq!(run.action, TC_ACT_REDIRECT);
    let want = frame(
        (CLIENT_MAC, LB_MAC),
        None,
        VIP,
        CLIENT,
        L4::SynAck {
            src: 81,
            dst: to_81,
        },
        &[],
        &[],
    );
    assert_eq!(run.output, want, "answers from :81, whose table named it");

    let reply = reply_from_backend(unclaimed, 0);
    let run = ns.run(|| rig.tc_from(&reply, b0)).unwrap();
    assert_eq!(run.action, TC_ACT_UNSPEC, "no service claims it");
    assert_eq!(run.output, reply);
    assert_eq!(rig.global("pass_no_flow"), 1);
    assert_eq!(rig.global("reverse_nat_no_flow"), 1);
}

#[test]
fn a_backend_shared_by_two_services_answers_as_the_right_one() {
    // Backend 0 on :8080 serves VIP:80 (service 0, backend id 0) and VIP:81
    // (service 1, backend id 1).
    let mut rig = Rig::web(1, BACKEND_F_XDP | BACKEND_F_MAC, FLOWS);
    rig.backend(1, 1, 0, 8080, BACKEND_F_XDP | BACKEND_F_MAC, BACKEND_ACTIVE);
    rig.service(1, 81, IPPROTO_TCP, &[1]);
    let to_81 = frame(
        (LB_MAC, CLIENT_MAC),
        None,
        CLIENT,
        VIP,
        L4::Syn {
            src: 40000,
            dst: 81,
        },
        &[],
        &[],
    );
    assert_eq!(rig.xdp(&to_81).unwrap().action, XDP_REDIRECT);
    assert_eq!(rig.xdp(&syn(40001)).unwrap().action, XDP_REDIRECT);

    let from_81 = rig.tc(&reply_from_backend(40000, 0)).unwrap();
    assert_eq!(from_81.action, TC_ACT_REDIRECT);
    let want_81 = frame(
        (CLIENT_MAC, LB_MAC),
        None,
        VIP,
        CLIENT,
        L4::SynAck {
            src: 81,
            dst: 40000,
        },
        &[],
        &[],
    );
    assert_eq!(from_81.output, want_81, "the flow to :81 answers from :81");
    let from_80 = rig.tc(&reply_from_backend(40001, 0)).unwrap();
    assert_eq!(
        from_80.output,
        reply_to_client(40001),
        "the flow to :80 answers from :80"
    );
}

#[test]
fn udp_reply_is_rewritten_back() {
    let mut rig = Rig::new(FLOWS);
    rig.backend(0, 0, 1, 9000, BACKEND_F_XDP | BACKEND_F_MAC, BACKEND_ACTIVE);
    rig.service(0, 53, IPPROTO_UDP, &[0]);
    let q = frame(
        (LB_MAC, CLIENT_MAC),
        None,
        CLIENT,
        VIP,
        L4::Udp { src: 5353, dst: 53 },
        &[],
        b"q",
    );
    assert_eq!(rig.xdp(&q).unwrap().action, XDP_REDIRECT);
    let reply = frame(
        (HOST_MAC, BACKEND_MACS[1]),
        None,
        BACKENDS[1],
        CLIENT,
        L4::Udp {
            src: 9000,
            dst: 5353,
        },
        &[],
        b"answer",
    );
    let Run {
        action: a,
        output: out,
        ..
    } = rig.tc(&reply).unwrap();
    assert_eq!(a, TC_ACT_REDIRECT);
    let want = frame(
        (CLIENT_MAC, LB_MAC),
        None,
        VIP,
        CLIENT,
        L4::Udp { src: 53, dst: 5353 },
        &[],
        b"answer",
    );
    assert_eq!(out, want);
}

#[test]
fn skb_path_takes_what_xdp_cannot_deliver() {
    // MACs known, but the egress takes no XDP frames: XDP passes the packet
    // untouched and the TC program forwards it.
    let mut rig = Rig::web(1, BACKEND_F_MAC | BACKEND_F_PEER, FLOWS);
    let input = syn(40000);
    let Run {
        action: a,
        output: out,
        ..
    } = rig.xdp(&input).unwrap();
    assert_eq!(a, XDP_PASS);
    assert_eq!(out, input);
    assert_eq!(rig.global("pass_to_skb_path"), 1);
    let Run {
        action: a,
        output: out,
        ..
    } = rig.tc(&input).unwrap();
    assert_eq!(a, TC_ACT_REDIRECT);
    assert_checksums_valid("skb path", &out);
    assert_eq!(out, syn_to_backend(40000, 0));
    assert_eq!(rig.global("fwd_skb"), 1);
    let be = rig.backend_counters(0);
    assert_eq!((be.packets, be.new_flows), (1, 1), "counted once, by TC");

    // VLAN-tagged on the skb path: the tag is removed too.
    let tagged = frame(
        (LB_MAC, CLIENT_MAC),
        Some(7),
        CLIENT,
        VIP,
        L4::Syn {
            src: 40001,
            dst: 80,
        },
        &[],
        &[],
    );
    let Run {
        action: a,
        output: out,
        ..
    } = rig.tc(&tagged).unwrap();
    assert_eq!(a, TC_ACT_REDIRECT);
    assert_eq!(out, syn_to_backend(40001, 0));

    // UDP without a checksum keeps none.
    rig.backend(1, 1, 0, 9000, BACKEND_F_MAC, BACKEND_ACTIVE);
    rig.service(1, 53, IPPROTO_UDP, &[1]);
    let mut q = frame(
        (LB_MAC, CLIENT_MAC),
        None,
        CLIENT,
        VIP,
        L4::Udp { src: 5353, dst: 53 },
        &[],
        b"q",
    );
    q[40..42].copy_from_slice(&[0, 0]);
    let Run {
        action: a,
        output: out,
        ..
    } = rig.tc(&q).unwrap();
    assert_eq!(a, TC_ACT_REDIRECT);
    assert_eq!(&out[40..42], &[0, 0]);
    assert_eq!(&out[30..34], &BACKENDS[0]);
    assert_checksums_valid("udp without checksum", &out);
}

#[test]
fn backend_without_mac_uses_the_neighbour_table() {
    let mut rig = Rig::web(1, 0, FLOWS);
    let input = syn(40000);
    assert_eq!(rig.xdp(&input).unwrap().action, XDP_PASS);
    let Run {
        action: a,
        output: out,
        ..
    } = rig.tc(&input).unwrap();
    assert_eq!(a, TC_ACT_REDIRECT);
    // Addresses rewritten; MACs left for bpf_redirect_neigh to fill in.
    assert_eq!(&out[30..34], &BACKENDS[0]);
    assert_eq!(&out[0..12], &input[0..12]);
    assert_checksums_valid("neigh path", &out);
}

#[test]
fn addresses_are_ipv4() {
    // Keeps the constants honest: everything lives in 198.18.0.0/15.
    for a in [CLIENT, VIP, BACKENDS[0], BACKENDS[1], BACKENDS[2]] {
        let ip = Ipv4Addr::from(a);
        assert_eq!(ip.octets()[0], 198);
        assert!(matches!(ip.octets()[1], 18 | 19));
    }
}

/// A client's segment to VIP:80 with `payload`, optionally VLAN-tagged,
/// with the MACs given.
fn to_vip(macs: ([u8; 6], [u8; 6]), vlan: Option<u16>, src_port: u16, payload: &[u8]) -> Vec<u8> {
    frame(
        macs,
        vlan,
        CLIENT,
        VIP,
        L4::Syn {
            src: src_port,
            dst: 80,
        },
        &[],
        payload,
    )
}

#[test]
fn direct_server_return_changes_only_the_macs() {
    let payload = b"GET / HTTP/1.1\r\n\r\n";
    // As the backend must receive it: addresses, ports and checksums as
    // the client sent them, the backend's MAC, no tag.
    let delivered = |port| to_vip((BACKEND_MACS[0], HOST_MAC), None, port, payload);
    for (name, flags, vlan) in [
        ("XDP", BACKEND_F_XDP | BACKEND_F_MAC, None),
        ("XDP, VLAN-tagged", BACKEND_F_XDP | BACKEND_F_MAC, Some(42)),
        ("TC into a peer", BACKEND_F_MAC | BACKEND_F_PEER, None),
        ("TC, VLAN-tagged", BACKEND_F_MAC | BACKEND_F_PEER, Some(42)),
    ] {
        let mut rig = Rig::web(1, flags, FLOWS);
        rig.service_flags(80, IPPROTO_TCP, SERVICE_F_DSR);
        let input = to_vip((LB_MAC, CLIENT_MAC), vlan, 40000, payload);
        let run = if flags & BACKEND_F_XDP != 0 {
            let r = rig.xdp(&input).unwrap();
            assert_eq!(r.action, XDP_REDIRECT, "{name}");
            r
        } else {
            assert_eq!(rig.xdp(&input).unwrap().action, XDP_PASS, "{name}");
            let r = rig.tc(&input).unwrap();
            assert_eq!(r.action, TC_ACT_REDIRECT, "{name}");
            r
        };
        assert_checksums_valid(name, &run.output);
        assert_eq!(run.output, delivered(40000), "{name}: output bytes");
        assert_eq!(rig.global("fwd_xdp") + rig.global("fwd_skb"), 1, "{name}");
    }

    // Without the backend's MAC the kernel resolves it, with the backend
    // as next hop (the destination is still the VIP): the frame keeps the
    // client's MACs until then.
    let mut rig = Rig::web(1, 0, FLOWS);
    rig.service_flags(80, IPPROTO_TCP, SERVICE_F_DSR);
    let input = to_vip((LB_MAC, CLIENT_MAC), None, 40001, payload);
    let run = rig.tc(&input).unwrap();
    assert_eq!(run.action, TC_ACT_REDIRECT);
    assert_eq!(run.output, input, "nothing rewritten");
}

#[test]
fn a_local_dsr_backends_reply_is_sent_on_unchanged_where_replies_come_in() {
    // A container answering from the VIP, as direct server return has it.
    let from_vip = |dst_mac, src_mac| {
        frame(
            (dst_mac, src_mac),
            None,
            VIP,
            CLIENT,
            L4::SynAck {
                src: 80,
                dst: 40000,
            },
            &[],
            &[],
        )
    };
    let reply = from_vip(HOST_MAC, BACKEND_MACS[0]);
    let mut rig = Rig::web(1, BACKEND_F_MAC | BACKEND_F_PEER, FLOWS);
    rig.service_flags(80, IPPROTO_TCP, SERVICE_F_DSR);
    let (ns, b0) = fib_namespace("lbdpfib4", true);

    // Not an interface replies come in on: left to the kernel.
    let run = ns.run(|| rig.tc_from(&reply, b0)).unwrap();
    assert_eq!((run.action, &run.output), (TC_ACT_UNSPEC, &reply));
    assert_eq!(rig.global("pass_no_service"), 1);

    rig.dp.add_iface_flags(b0, IFACE_F_REPLIES).unwrap();
    let run = ns.run(|| rig.tc_from(&reply, b0)).unwrap();
    assert_eq!(
        run.action, TC_ACT_REDIRECT,
        "sent where the FIB routes the client"
    );
    assert_eq!(
        run.output,
        from_vip(CLIENT_MAC, LB_MAC),
        "only the MACs change"
    );
    assert_eq!(rig.global("fwd_dsr_reply"), 1);

    // Once the client's flow is recorded, the reply goes back the way the
    // client came, whatever the routes (here: none, outside the namespace).
    let syn = to_vip((LB_MAC, CLIENT_MAC), None, 40000, &[]);
    assert_eq!(rig.tc(&syn).unwrap().action, TC_ACT_REDIRECT);
    let run = rig.tc_from(&reply, b0).unwrap();
    assert_eq!(run.action, TC_ACT_REDIRECT, "sent back the client's way");
    assert_eq!(run.output, from_vip(CLIENT_MAC, LB_MAC));
    assert_eq!(rig.global("fwd_dsr_reply"), 2);
    assert_eq!(rig.global("reverse_nat"), 0);

    // A NAT service's VIP is no DSR backend's source: left alone.
    rig.service_flags(80, IPPROTO_TCP, 0);
    let run = ns.run(|| rig.tc_from(&reply, b0)).unwrap();
    assert_eq!(run.action, TC_ACT_UNSPEC);
    assert_eq!(rig.global("pass_no_service"), 2);
}
