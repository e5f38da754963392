//! Packet fixtures and a test rig for `BPF_PROG_TEST_RUN`, shared by the
//! in-kernel tests and the per-packet benchmark.
//!
//! Frames are built and checksummed by etherparse, an implementation
//! independent of the data path's incremental checksum updates, so comparing
//! output bytes with a frame built here checks the checksums too.

use aya::programs::{ProgramError, TestRun, TestRunOptions, TestRunResult};
use etherparse::{
    IpHeaders, IpNumber, Ipv4Extensions, Ipv4Header, Ipv4Options, PacketBuilder, SlicedPacket,
    TransportSlice, VlanId,
};
use lb::{
    datapath::{Datapath, MapSizes, Maps},
    maglev::{self, MaglevBackend},
};
use lb_common::{Backend, Counters, RevNat, ServiceKey, ServiceValue, BACKEND_ACTIVE};

/// `XDP_DROP`.
pub const XDP_DROP: u32 = 1;
/// `XDP_PASS`.
pub const XDP_PASS: u32 = 2;
/// `XDP_REDIRECT`.
pub const XDP_REDIRECT: u32 = 4;
/// `TC_ACT_UNSPEC` (-1), TCX's "next": what the TC program returns for a packet it
/// does not handle, so a later program on the same hook still sees it.
pub const TC_ACT_UNSPEC: u32 = u32::MAX;
/// `TC_ACT_SHOT`.
pub const TC_ACT_SHOT: u32 = 2;
/// `TC_ACT_REDIRECT`.
pub const TC_ACT_REDIRECT: u32 = 7;

/// The client's address in fixtures.
pub const CLIENT: [u8; 4] = [198, 18, 100, 2];
/// The service address in fixtures.
pub const VIP: [u8; 4] = [198, 18, 101, 1];
/// Backend addresses in fixtures.
pub const BACKENDS: [[u8; 4]; 3] = [[198, 18, 103, 2], [198, 18, 104, 2], [198, 18, 105, 2]];
/// The client's MAC.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x02];
/// The balancer's MAC on the client side.
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x10, 0x01];
/// The balancer's MAC on the backend side.
pub const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x20, 0x01];
/// Backend MACs.
pub const BACKEND_MACS: [[u8; 6]; 3] = [
    [0x02, 0, 0, 0, 0x30, 0x00],
    [0x02, 0, 0, 0, 0x30, 0x01],
    [0x02, 0, 0, 0, 0x30, 0x02],
];
/// Maglev table size of fixture services (prime).
pub const TABLE: u32 = 251;

/// The Maglev table (backend id per slot, [`TABLE`] slots) [`Rig::table`]
/// writes for a service of backends `members`: each keyed by its id.
pub fn rig_table(members: &[u32]) -> Vec<u32> {
    let members: Vec<MaglevBackend> = members
        .iter()
        .map(|&id| MaglevBackend {
            key: u64::from(id) + 1,
            id,
            weight: 1,
        })
        .collect();
    maglev::build(&members, TABLE).expect("table builds")
}
/// `ifindex` of `lo` in every namespace: a real device for the redirect helpers.
pub const LO: u32 = 1;

/// A transport header for [`frame`].
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    /// A TCP SYN.
    Syn {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
    /// A TCP segment of an established connection (ACK only).
    Ack {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
    /// A TCP SYN-ACK.
    SynAck {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
    /// A UDP datagram.
    Udp {
        /// Source port.
        src: u16,
        /// Destination port.
        dst: u16,
    },
}

/// Builds an Ethernet frame, `macs` being (destination, source).
pub fn frame(
    macs: ([u8; 6], [u8; 6]),
    vlan: Option<u16>,
    src: [u8; 4],
    dst: [u8; 4],
    l4: L4,
    ip_options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let proto = match l4 {
        L4::Udp { .. } => IpNumber::UDP,
        _ => IpNumber::TCP,
    };
    let mut ip = Ipv4Header::new(0, 64, proto, src, dst).expect("valid IPv4 header");
    ip.identification = 0x1c46;
    ip.dont_fragment = true;
    ip.options = Ipv4Options::try_from(ip_options).expect("IPv4 options fit");
    let eth = PacketBuilder::ethernet2(macs.1, macs.0);
    let ipb = match vlan {
        Some(v) => eth
            .single_vlan(VlanId::try_new(v).expect("VLAN id"))
            .ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default())),
        None => eth.ip(IpHeaders::Ipv4(ip, Ipv4Extensions::default())),
    };
    let mut out = Vec::new();
    match l4 {
        L4::Syn { src, dst } => ipb
            .tcp(src, dst, 1000, 64240)
            .syn()
            .write(&mut out, payload),
        L4::Ack { src, dst } => ipb
            .tcp(src, dst, 1001, 64240)
            .ack(5001)
            .write(&mut out, payload),
        L4::SynAck { src, dst } => ipb
            .tcp(src, dst, 5000, 65160)
            .syn()
            .ack(1001)
            .write(&mut out, payload),
        L4::Udp { src, dst } => ipb.udp(src, dst).write(&mut out, payload),
    }
    .expect("frame serialises");
    out
}

/// A client's SYN to VIP:80.
pub fn syn(src_port: u16) -> Vec<u8> {
    frame(
        (LB_MAC, CLIENT_MAC),
        None,
        CLIENT,
        VIP,
        L4::Syn {
            src: src_port,
            dst: 80,
        },
        &[],
        &[],
    )
}

/// A client's ACK to VIP:80, as every segment after the handshake is.
pub fn ack(src_port: u16) -> Vec<u8> {
    frame(
        (LB_MAC, CLIENT_MAC),
        None,
        CLIENT,
        VIP,
        L4::Ack {
            src: src_port,
            dst: 80,
        },
        &[],
        &[],
    )
}

/// That SYN as backend `i` must receive it.
pub fn syn_to_backend(src_port: u16, i: usize) -> Vec<u8> {
    frame(
        (BACKEND_MACS[i], HOST_MAC),
        None,
        CLIENT,
        BACKENDS[i],
        L4::Syn {
            src: src_port,
            dst: 8080,
        },
        &[],
        &[],
    )
}

/// Backend `i`'s SYN-ACK to the client, as it leaves the backend.
pub fn reply_from_backend(dst_port: u16, i: usize) -> Vec<u8> {
    frame(
        (HOST_MAC, BACKEND_MACS[i]),
        None,
        BACKENDS[i],
        CLIENT,
        L4::SynAck {
            src: 8080,
            dst: dst_port,
        },
        &[],
        &[],
    )
}

/// That SYN-ACK as the client must receive it.
pub fn reply_to_client(dst_port: u16) -> Vec<u8> {
    frame(
        (CLIENT_MAC, LB_MAC),
        None,
        VIP,
        CLIENT,
        L4::SynAck {
            src: 80,
            dst: dst_port,
        },
        &[],
        &[],
    )
}

/// Which fixture backend a rewritten frame is addressed to.
pub fn backend_of(out: &[u8]) -> usize {
    BACKENDS
        .iter()
        .position(|b| out.get(30..34) == Some(&b[..]))
        .unwrap_or_else(|| panic!("not sent to a backend: {out:?}"))
}

/// Recomputes the IPv4 and L4 checksums of `f` with etherparse and panics,
/// naming `what`, if the frame's differ.
pub fn assert_checksums_valid(what: &str, f: &[u8]) {
    let s = SlicedPacket::from_ethernet(f).unwrap_or_else(|e| panic!("{what}: unparsable: {e}"));
    let Some(etherparse::NetSlice::Ipv4(ip)) = s.net else {
        panic!("{what}: not IPv4")
    };
    let hdr = ip.header().to_header();
    assert_eq!(
        hdr.header_checksum,
        hdr.calc_header_checksum(),
        "{what}: IPv4 checksum"
    );
    match s.transport {
        Some(TransportSlice::Tcp(t)) => assert_eq!(
            t.checksum(),
            t.to_header()
                .calc_checksum_ipv4(&hdr, t.payload())
                .expect("TCP checksum computes"),
            "{what}: TCP checksum"
        ),
        Some(TransportSlice::Udp(u)) if u.checksum() != 0 => assert_eq!(
            u.checksum(),
            u.to_header()
                .calc_checksum_ipv4(&hdr, u.payload())
                .expect("UDP checksum computes"),
            "{what}: UDP checksum"
        ),
        Some(TransportSlice::Udp(_)) => {}
        _ => panic!("{what}: no TCP/UDP"),
    }
}

/// One `BPF_PROG_TEST_RUN` call's result.
#[derive(Debug)]
pub struct Run {
    /// The program's return value.
    pub action: u32,
    /// The packet as the program left it.
    pub output: Vec<u8>,
    /// The kernel's measured run time.
    pub duration: std::time::Duration,
}

fn test_run(
    input: &[u8],
    run: impl for<'a> FnOnce(TestRunOptions<'a>) -> Result<TestRunResult, ProgramError>,
) -> Result<Run, ProgramError> {
    let mut out = vec![0u8; input.len() + 256];
    let r = run(TestRunOptions {
        data_in: Some(input),
        data_out: Some(&mut out),
        ..TestRunOptions::new()
    })?;
    out.truncate(r.data_size_out as usize);
    Ok(Run {
        action: r.return_value,
        output: out,
        duration: r.duration,
    })
}

/// Offset of `ingress_ifindex` in `struct __sk_buff` (the tenth `__u32`).
const SKB_INGRESS_IFINDEX: usize = 36;
/// The part of `struct __sk_buff` [`skb_ctx`] fills: up to and including
/// `ifindex`; the kernel takes the rest as zero.
const SKB_CTX_LEN: usize = 44;

/// A `BPF_PROG_TEST_RUN` context for a TC program: a `struct __sk_buff`
/// whose only field set is `ingress_ifindex` (one of the few the kernel
/// lets a test run set).
fn skb_ctx(ingress_ifindex: u32) -> [u8; SKB_CTX_LEN] {
    let mut ctx = [0u8; SKB_CTX_LEN];
    ctx[SKB_INGRESS_IFINDEX..SKB_INGRESS_IFINDEX + 4]
        .copy_from_slice(&ingress_ifindex.to_ne_bytes());
    ctx
}

/// A loaded data path whose maps are written directly, as the reconcile
/// loop would write them.
pub struct Rig {
    /// The data path under test.
    pub dp: Datapath,
}

impl Rig {
    /// Loads the data path with small maps (and `flow_table_size` flows).
    pub fn new(flow_table_size: u32) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "loading BPF programs needs root (cargo xtask test runs as root)"
        );
        let dp = Datapath::load(&MapSizes {
            max_services: 8,
            max_backends: 64,
            max_table_size: TABLE,
            flow_table_size,
        })
        .expect("the data path loads and passes the verifier");
        Self { dp }
    }

    /// Writes backend `id` = fixture backend `i` on `port`, in service `service_id`.
    pub fn backend(
        &mut self,
        id: u32,
        service_id: u32,
        i: usize,
        port: u16,
        flags: u32,
        state: u32,
    ) {
        let b = Backend {
            addr: u32::from_ne_bytes(BACKENDS[i]),
            port: port.to_be(),
            _pad: 0,
            ifindex: LO,
            service_id,
            state,
            flags,
            dst_mac: BACKEND_MACS[i],
            src_mac: HOST_MAC,
        };
        self.dp
            .maps
            .backends
            .set(id, b, 0)
            .expect("backend written");
    }

    /// Writes service `sid` = VIP:`port`/`proto` whose table holds `members`,
    /// and records it as the one service of each member for the reverse path.
    pub fn service(&mut self, sid: u32, port: u16, proto: u8, members: &[u32]) {
        self.service_at(sid, VIP, port, proto, members);
    }

    /// Writes service `sid` = `vip`:`port`/`proto` whose table holds
    /// `members`, and adds it to each member's services for the reverse
    /// path.
    pub fn service_at(&mut self, sid: u32, vip: [u8; 4], port: u16, proto: u8, members: &[u32]) {
        for &id in members {
            let b = self
                .dp
                .maps
                .backends
                .get(&id, 0)
                .expect("member written first");
            let key = ServiceKey {
                addr: b.addr,
                port: b.port,
                proto,
                _pad: 0,
            };
            // Add this service to the backend's list, as the reconcile loop does.
            let mut rev: RevNat = self.dp.maps.rev_nat.get(&key, 0).unwrap_or_default();
            let i = rev.count as usize;
            rev.vip[i] = u32::from_ne_bytes(vip);
            rev.vport[i] = port.to_be();
            rev.count += 1;
            self.dp
                .maps
                .rev_nat
                .insert(key, rev, 0)
                .expect("rev nat written");
        }
        let base = self.table(sid, members);
        let value = ServiceValue {
            id: sid,
            table_base: base,
            table_size: TABLE,
            flags: 0,
        };
        // Let the VIP's packets past the early filter, as the reconciler does.
        let bit = lb_common::vip_filter_bit(u32::from_ne_bytes(vip));
        let word = self
            .dp
            .maps
            .vip_filter
            .get(&(bit / 64), 0)
            .expect("filter word");
        self.dp
            .maps
            .vip_filter
            .set(bit / 64, word | (1 << (bit % 64)), 0)
            .expect("filter written");
        self.dp
            .maps
            .services
            .insert(ServiceKey::new(vip, port, proto), value, 0)
            .expect("service written");
    }

    /// Writes service `sid`'s Maglev table (its first copy) over
    /// `members`, as the reconciler does when they change; returns the
    /// table's first slot.
    pub fn table(&mut self, sid: u32, members: &[u32]) -> u32 {
        let table = rig_table(members);
        let base = sid * 2 * TABLE;
        for (i, slot) in table.iter().enumerate() {
            self.dp
                .maps
                .maglev
                .set(base + i as u32, slot, 0)
                .expect("slot written");
        }
        base
    }

    /// Service 0 = TCP VIP:80 with fixture backends `0..n` on :8080.
    pub fn web(n: usize, flags: u32, flow_table_size: u32) -> Self {
        let mut r = Self::new(flow_table_size);
        for i in 0..n {
            r.backend(i as u32, 0, i, 8080, flags, BACKEND_ACTIVE);
        }
        r.service(
            0,
            80,
            lb_common::IPPROTO_TCP,
            &(0..n as u32).collect::<Vec<_>>(),
        );
        r
    }

    /// Sets the `SERVICE_F_*` bits of the service at VIP:`port`/`proto`.
    pub fn service_flags(&mut self, port: u16, proto: u8, flags: u32) {
        let key = ServiceKey::new(VIP, port, proto);
        let mut value = self
            .dp
            .maps
            .services
            .get(&key, 0)
            .expect("the service is written first");
        value.flags = flags;
        self.dp
            .maps
            .services
            .insert(key, value, 0)
            .expect("service written");
    }

    /// Runs the XDP forward program once on `input`.
    pub fn xdp(&mut self, input: &[u8]) -> Result<Run, ProgramError> {
        test_run(input, |o| self.dp.xdp_program().test_run(o))
    }

    /// Runs the TC program once on `input`.
    pub fn tc(&mut self, input: &[u8]) -> Result<Run, ProgramError> {
        test_run(input, |o| self.dp.tc_program().test_run(o))
    }

    /// Runs the TC program once on `input` as if it came in on interface
    /// `ingress_ifindex` of the calling thread's network namespace (where
    /// the kernel then looks routes up).
    pub fn tc_from(&mut self, input: &[u8], ingress_ifindex: u32) -> Result<Run, ProgramError> {
        let ctx = skb_ctx(ingress_ifindex);
        test_run(input, |o| {
            self.dp.tc_program().test_run(TestRunOptions {
                ctx_in: Some(&ctx),
                ..o
            })
        })
    }

    /// A global counter by name, summed over CPUs.
    pub fn global(&self, name: &str) -> u64 {
        self.dp
            .maps
            .global_counters()
            .expect("counters readable")
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no counter {name}"))
            .1
    }

    /// A service's counters, summed over CPUs.
    pub fn service_counters(&self, sid: u32) -> Counters {
        Maps::sum_counters(&self.dp.maps.service_stats.get(&sid, 0).expect("readable"))
    }

    /// A backend's counters, summed over CPUs.
    pub fn backend_counters(&self, id: u32) -> Counters {
        Maps::sum_counters(&self.dp.maps.backend_stats.get(&id, 0).expect("readable"))
    }
}
