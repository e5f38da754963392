//! Types shared byte for byte by the `lb` eBPF data path and its userspace.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding fields, so the
//! layout is the same for `bpfel-unknown-none` and the host; the tests at the
//! bottom pin size, alignment and every field offset.
//!
//! Byte order: addresses and ports are stored exactly as they appear on the
//! wire (network order), so the data path compares raw header words without
//! swapping. Build keys with the constructors here rather than by hand.
#![cfg_attr(not(test), no_std)]

/// Names of the maps in the eBPF object. Userspace looks maps up by these
/// names; the kernel truncates names to 15 bytes, which all of these fit.
pub mod maps {
    /// `HASH` [`ServiceKey`](crate::ServiceKey) -> [`ServiceValue`](crate::ServiceValue).
    pub const SERVICES: &str = "LB_SERVICES";
    /// `ARRAY` backend id -> [`Backend`](crate::Backend).
    pub const BACKENDS: &str = "LB_BACKENDS";
    /// `ARRAY` of backend ids: every service's two Maglev tables, back to back.
    pub const MAGLEV: &str = "LB_MAGLEV";
    /// `LRU_HASH` client-side [`FlowKey`](crate::FlowKey) -> [`Flow`](crate::Flow).
    pub const FLOWS: &str = "LB_FLOWS";
    /// `HASH` a backend's [`ServiceKey`](crate::ServiceKey)-shaped (address,
    /// port, protocol) -> [`RevNat`](crate::RevNat): the services it serves.
    pub const REV_NAT: &str = "LB_REV_NAT";
    /// `PERCPU_ARRAY` service id -> [`Counters`](crate::Counters).
    pub const SERVICE_STATS: &str = "LB_SVC_STATS";
    /// `PERCPU_ARRAY` backend id -> [`Counters`](crate::Counters).
    pub const BACKEND_STATS: &str = "LB_BE_STATS";
    /// `PERCPU_ARRAY` [`stat`](crate::stat) index -> `u64` packet count.
    pub const GLOBAL_STATS: &str = "LB_GLOBAL_STATS";
    /// `HASH` ifindex -> `IFACE_F_*` flags of the interfaces `lb` attached to.
    pub const IFACES: &str = "LB_IFACES";
    /// `ARRAY` of `u64` words: a bitmap with a bit set for every VIP address
    /// ([`vip_filter_bit`](crate::vip_filter_bit)), so a packet to any other
    /// address is passed after one array read.
    pub const VIP_FILTER: &str = "LB_VIP_FILTER";
}

/// Words of [`maps::VIP_FILTER`]: 65,536 bits, so with a few hundred VIPs a
/// packet to another address almost never takes the full service lookup.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// The 32-bit finaliser of MurmurHash3: cheap, and every input bit affects
/// every output bit.
#[inline(always)]
pub fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^= h >> 16;
    h
}

/// The bit of [`maps::VIP_FILTER`] that VIP address `addr` (network order,
/// as read from the packet) sets: word `bit / 64`, bit `bit % 64`. The two
/// 16-bit halves folded together: two instructions on the hot path, and
/// addresses within one /16 never share a bit.
#[inline(always)]
pub fn vip_filter_bit(addr: u32) -> u32 {
    (addr ^ (addr >> 16)) & (VIP_FILTER_WORDS * 64 - 1)
}

/// Map flags of [`maps::MAGLEV`]: `BPF_F_MMAPABLE`, so userspace writes a
/// whole table with memory stores instead of a syscall per slot.
pub const MAGLEV_MAP_FLAGS: u32 = 1 << 10;

/// Bytes from one [`maps::MAGLEV`] slot to the next in its memory mapping:
/// the kernel rounds an array's values up to 8 bytes.
pub const MAGLEV_SLOT_STRIDE: usize = 8;

/// [`maps::IFACES`] flag: the XDP forward program runs on this interface, so
/// the TC program there sees only what XDP passed (and XDP counted).
pub const IFACE_F_XDP: u32 = 1 << 0;
/// [`maps::IFACES`] flag: backends' replies come in on this interface (the
/// reverse path runs here); only here is a packet from a direct-server-
/// return VIP a local backend's reply to send on.
pub const IFACE_F_REPLIES: u32 = 1 << 1;

/// Names of the programs in the eBPF object.
pub mod programs {
    /// XDP forward path, attached to external interfaces.
    pub const XDP_FORWARD: &str = "lb_xdp_fwd";
    /// TC (clsact ingress) program: the skb-path twin of the forward path on
    /// external interfaces, and the reverse path on backend-facing interfaces.
    pub const TC: &str = "lb_tc";
}

/// Default sizes. Each can be changed in the config file; the data path reads
/// them from the map definitions, never from these constants.
pub mod defaults {
    /// Maglev lookup table size of a service that sets none (prime, as the
    /// paper requires). 100 slots a backend up to 163 backends keep their
    /// shares of new flows within 1% of each other, and a rebuild takes
    /// about a quarter of a millisecond (about 1.5 ms at 65,537), which
    /// every change of the service's backends pays.
    pub const TABLE_SIZE: u32 = 16_381;
    /// Largest Maglev table a service may ask for: the Maglev map holds two
    /// tables of this size per service.
    pub const MAX_TABLE_SIZE: u32 = 65_537;
    /// Services the maps can hold.
    pub const MAX_SERVICES: u32 = 64;
    /// Backends the maps can hold, over all services.
    pub const MAX_BACKENDS: u32 = 4_096;
    /// Entries in the flow table ([`maps::FLOWS`](crate::maps::FLOWS)).
    pub const FLOW_TABLE_SIZE: u32 = 1 << 20;
}

/// IANA protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IANA protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Slot value of a Maglev table with no backend to pick.
pub const NO_BACKEND: u32 = u32::MAX;

/// Key of [`maps::SERVICES`]: a virtual IP, port and protocol. Also the key of
/// [`maps::REV_NAT`], where it names a backend's address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServiceKey {
    /// Virtual IPv4 address, network order.
    pub addr: u32,
    /// Virtual port, network order.
    pub port: u16,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub proto: u8,
    /// Always zero.
    pub _pad: u8,
}

impl ServiceKey {
    /// Builds a key from host-order values.
    pub const fn new(addr: [u8; 4], port: u16, proto: u8) -> Self {
        Self {
            addr: u32::from_ne_bytes(addr),
            port: u16::from_ne_bytes(port.to_be_bytes()),
            proto,
            _pad: 0,
        }
    }
}

/// Value of [`maps::SERVICES`].
///
/// Replaced as a whole by userspace: switching `table_base` from one of the
/// service's two Maglev copies to the other is the atomic flip.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceValue {
    /// Service id: index into [`maps::SERVICE_STATS`].
    pub id: u32,
    /// Index in [`maps::MAGLEV`] of slot 0 of the active table.
    pub table_base: u32,
    /// Slots in the active table (prime).
    pub table_size: u32,
    /// `SERVICE_F_*` bits.
    pub flags: u32,
}

/// [`ServiceValue::flags`]: direct server return. The forward path changes
/// only the frame's MACs (the backend holds the VIP itself and answers the
/// client directly); no reply comes back through the balancer.
pub const SERVICE_F_DSR: u32 = 1;

/// [`Backend::state`]: no flow may use it (also the state of an unused slot).
pub const BACKEND_DOWN: u32 = 0;
/// [`Backend::state`]: takes new flows and keeps its existing ones.
pub const BACKEND_ACTIVE: u32 = 1;
/// [`Backend::state`]: keeps its existing flows, gets no new ones.
pub const BACKEND_DRAINING: u32 = 2;

/// [`Backend::flags`]: `dst_mac`/`src_mac` hold the next hop and egress MACs.
pub const BACKEND_F_MAC: u32 = 1 << 0;
/// [`Backend::flags`]: the egress interface takes XDP frames (e.g. a veth whose
/// peer has GRO on), so XDP may redirect straight to it.
pub const BACKEND_F_XDP: u32 = 1 << 1;
/// [`Backend::flags`]: the egress is a veth whose peer holds the backend, so the
/// skb path may hand the packet to the peer directly (`bpf_redirect_peer`).
pub const BACKEND_F_PEER: u32 = 1 << 2;

/// Value of [`maps::BACKENDS`], indexed by backend id.
///
/// Userspace rewrites a live entry only with the same address, port and
/// service, so a reader racing an update sees old or new delivery data, never
/// another backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend IPv4 address, network order.
    pub addr: u32,
    /// Backend port, network order.
    pub port: u16,
    /// Always zero.
    pub _pad: u16,
    /// Interface that leads to the backend.
    pub ifindex: u32,
    /// Id of the service this backend belongs to; a flow whose backend now
    /// belongs to another service is treated as a miss.
    pub service_id: u32,
    /// [`BACKEND_DOWN`], [`BACKEND_ACTIVE`] or [`BACKEND_DRAINING`].
    pub state: u32,
    /// `BACKEND_F_*` bits.
    pub flags: u32,
    /// Destination MAC: the backend's, or the router's towards it.
    pub dst_mac: [u8; 6],
    /// Source MAC: the egress interface's own.
    pub src_mac: [u8; 6],
}

/// A flow's 5-tuple as the client sends it (client to VIP): the key of
/// [`maps::FLOWS`]. A backend's reply is matched by building this key back
/// from the reply and a VIP from [`maps::REV_NAT`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network order.
    pub src_addr: u32,
    /// Destination address, network order.
    pub dst_addr: u32,
    /// Source port, network order.
    pub src_port: u16,
    /// Destination port, network order.
    pub dst_port: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero. (Two fields rather than `[u8; 3]`, which the BPF backend
    /// zeroes with a call to `memset`.)
    pub _pad1: u8,
    /// Always zero.
    pub _pad2: u16,
}

/// [`Flow::flags`]: the client's frames carried an 802.1Q tag, `vlan_tci`.
pub const FLOW_F_VLAN: u16 = 1 << 0;

/// Value of [`maps::FLOWS`]: the flow's backend, and what the reverse path
/// needs to send the backend's replies back the way the client came.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// Backend id the flow was given.
    pub backend_id: u32,
    /// Interface the client's packets arrived on; replies leave through it.
    pub ifindex: u32,
    /// Source MAC of the client's frames (the client or its router).
    pub client_mac: [u8; 6],
    /// Destination MAC of the client's frames (this host's interface).
    pub lb_mac: [u8; 6],
    /// 802.1Q TCI of the client's frames, host order, when `FLOW_F_VLAN` is set.
    pub vlan_tci: u16,
    /// `FLOW_F_*` bits.
    pub flags: u16,
    /// When the flow last carried a packet, in seconds of the kernel's
    /// coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`).
    pub last_seen: u32,
}

/// A flow that carried no packet for this long no longer counts as active
/// (its entry stays until the LRU needs the room).
pub const FLOW_IDLE_SECS: u32 = 60;

/// How many services one backend address:port can serve at once.
pub const REV_NAT_MAX: usize = 4;

/// Value of [`maps::REV_NAT`]: the services (VIP and port) a backend serves,
/// the candidates a reply's flow is looked up with.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RevNat {
    /// Service addresses, network order; the first `count` are valid.
    pub vip: [u32; REV_NAT_MAX],
    /// Service ports, network order.
    pub vport: [u16; REV_NAT_MAX],
    /// Valid entries.
    pub count: u32,
}

/// Per-CPU counters of one service or one backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets forwarded.
    pub packets: u64,
    /// Bytes forwarded (whole frames as received).
    pub bytes: u64,
    /// Flows started.
    pub new_flows: u64,
}

/// Indexes of [`maps::GLOBAL_STATS`]: what happened to each packet the data
/// path saw, one counter per outcome.
pub mod stat {
    /// Passed: not IPv4 (ARP, IPv6, LLDP, QinQ, …).
    pub const PASS_NOT_IPV4: u32 = 0;
    /// Passed: IPv4 but neither TCP nor UDP.
    pub const PASS_NOT_L4: u32 = 1;
    /// Passed: not to a service (to no VIP address, which XDP tells before
    /// parsing anything else, or to no service of that VIP).
    pub const PASS_NO_SERVICE: u32 = 2;
    /// Passed: an IPv4 fragment (ports unknown or incomplete).
    pub const PASS_FRAGMENT: u32 = 3;
    /// Passed: too short for its headers or with an invalid header field.
    pub const PASS_MALFORMED: u32 = 4;
    /// Passed by XDP to the TC program, because the backend's egress cannot take
    /// XDP frames yet (the skb path delivers it).
    pub const PASS_TO_SKB_PATH: u32 = 5;
    /// Dropped: the service has no backend to take a new flow.
    pub const DROP_NO_BACKEND: u32 = 6;
    /// Forwarded to a backend by XDP redirect.
    pub const FWD_XDP: u32 = 7;
    /// Forwarded to a backend by the TC program (skb path).
    pub const FWD_SKB: u32 = 8;
    /// Dropped: the redirect to the backend's interface failed (XDP
    /// `bpf_redirect`, TC `bpf_redirect_peer` / `bpf_redirect_neigh`).
    pub const DROP_REDIRECT: u32 = 9;
    /// Replies from a backend rewritten back to the service and sent on.
    pub const REVERSE_NAT: u32 = 10;
    /// Passed by the TC program: from a backend's address and port, but of no
    /// flow in the table (e.g. evicted, or the backend's own connections).
    pub const PASS_NO_FLOW: u32 = 11;
    /// Flows moved because their backend went down or left the service,
    /// counted once per packet: by XDP only when XDP itself forwards or drops
    /// the packet, else by the TC program that forwards it.
    pub const FLOW_REBALANCED: u32 = 12;
    /// Dropped: the DNAT rewrite (address, port, checksums) failed.
    pub const DROP_REWRITE: u32 = 13;
    /// Dropped: XDP could not move the frame's start past its VLAN tag
    /// (`bpf_xdp_adjust_head`).
    pub const DROP_ADJUST_HEAD: u32 = 14;
    /// Dropped: the TC program could not remove the VLAN tag
    /// (`bpf_skb_vlan_pop`).
    pub const DROP_VLAN_POP: u32 = 15;
    /// Dropped: writing the backend's MACs into the frame failed.
    pub const DROP_MAC_WRITE: u32 = 16;
    /// Dropped: a reply's rewrite back to the service (source address, port,
    /// checksums, the client's MACs) failed.
    pub const DROP_REVERSE_REWRITE: u32 = 17;
    /// Dropped: a reply's VLAN tag could not be restored (`bpf_skb_vlan_push`).
    pub const DROP_VLAN_PUSH: u32 = 18;
    /// Replies from a backend rewritten back to the service without a flow
    /// entry: another balancer node forwarded the request, or the entry was
    /// evicted (see `lb_ebpf::flow::stateless_reply_key`), and routed to the
    /// client by the kernel's FIB.
    pub const REVERSE_NAT_NO_FLOW: u32 = 19;
    /// Passed by the TC program: a reply a service claims without a flow
    /// entry, but with no route to its client from this node (or forwarding
    /// disabled on the interface it came in on).
    pub const PASS_NO_ROUTE: u32 = 20;
    /// Replies of a direct-server-return backend on this host (a
    /// container, from the VIP) sent on to the client where the FIB routes
    /// it, unchanged.
    pub const FWD_DSR_REPLY: u32 = 21;
    /// Number of counters.
    pub const COUNT: u32 = 22;

    /// Counter names, by index, as userspace reports them.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_ipv4",
        "pass_not_l4",
        "pass_no_service",
        "pass_fragment",
        "pass_malformed",
        "pass_to_skb_path",
        "drop_no_backend",
        "fwd_xdp",
        "fwd_skb",
        "drop_redirect",
        "reverse_nat",
        "pass_no_flow",
        "flow_rebalanced",
        "drop_rewrite",
        "drop_adjust_head",
        "drop_vlan_pop",
        "drop_mac_write",
        "drop_reverse_rewrite",
        "drop_vlan_push",
        "reverse_nat_no_flow",
        "pass_no_route",
        "fwd_dsr_reply",
    ];
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, made only of integers and
    // byte arrays, and have no implicit padding (see the layout tests).
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::RevNat {}
    unsafe impl aya::Pod for super::Counters {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    #[test]
    fn service_key_layout() {
        assert_eq!(size_of::<ServiceKey>(), 8);
        assert_eq!(align_of::<ServiceKey>(), 4);
        assert_eq!(offset_of!(ServiceKey, addr), 0);
        assert_eq!(offset_of!(ServiceKey, port), 4);
        assert_eq!(offset_of!(ServiceKey, proto), 6);
        assert_eq!(offset_of!(ServiceKey, _pad), 7);
    }

    #[test]
    fn service_key_is_network_order() {
        let k = ServiceKey::new([198, 18, 101, 1], 80, IPPROTO_TCP);
        assert_eq!(k.addr.to_ne_bytes(), [198, 18, 101, 1]);
        assert_eq!(k.port.to_ne_bytes(), [0, 80]);
    }

    #[test]
    fn service_value_layout() {
        assert_eq!(size_of::<ServiceValue>(), 16);
        assert_eq!(align_of::<ServiceValue>(), 4);
        assert_eq!(offset_of!(ServiceValue, id), 0);
        assert_eq!(offset_of!(ServiceValue, table_base), 4);
        assert_eq!(offset_of!(ServiceValue, table_size), 8);
        assert_eq!(offset_of!(ServiceValue, flags), 12);
    }

    #[test]
    fn backend_layout() {
        assert_eq!(size_of::<Backend>(), 36);
        assert_eq!(align_of::<Backend>(), 4);
        assert_eq!(offset_of!(Backend, addr), 0);
        assert_eq!(offset_of!(Backend, port), 4);
        assert_eq!(offset_of!(Backend, _pad), 6);
        assert_eq!(offset_of!(Backend, ifindex), 8);
        assert_eq!(offset_of!(Backend, service_id), 12);
        assert_eq!(offset_of!(Backend, state), 16);
        assert_eq!(offset_of!(Backend, flags), 20);
        assert_eq!(offset_of!(Backend, dst_mac), 24);
        assert_eq!(offset_of!(Backend, src_mac), 30);
    }

    #[test]
    fn flow_key_layout() {
        assert_eq!(size_of::<FlowKey>(), 16);
        assert_eq!(align_of::<FlowKey>(), 4);
        assert_eq!(offset_of!(FlowKey, src_addr), 0);
        assert_eq!(offset_of!(FlowKey, dst_addr), 4);
        assert_eq!(offset_of!(FlowKey, src_port), 8);
        assert_eq!(offset_of!(FlowKey, dst_port), 10);
        assert_eq!(offset_of!(FlowKey, proto), 12);
        assert_eq!(offset_of!(FlowKey, _pad1), 13);
        assert_eq!(offset_of!(FlowKey, _pad2), 14);
    }

    #[test]
    fn flow_layout() {
        assert_eq!(size_of::<Flow>(), 28);
        assert_eq!(align_of::<Flow>(), 4);
        assert_eq!(offset_of!(Flow, backend_id), 0);
        assert_eq!(offset_of!(Flow, ifindex), 4);
        assert_eq!(offset_of!(Flow, client_mac), 8);
        assert_eq!(offset_of!(Flow, lb_mac), 14);
        assert_eq!(offset_of!(Flow, vlan_tci), 20);
        assert_eq!(offset_of!(Flow, flags), 22);
        assert_eq!(offset_of!(Flow, last_seen), 24);
    }

    #[test]
    fn rev_nat_layout() {
        assert_eq!(size_of::<RevNat>(), 28);
        assert_eq!(align_of::<RevNat>(), 4);
        assert_eq!(offset_of!(RevNat, vip), 0);
        assert_eq!(offset_of!(RevNat, vport), 16);
        assert_eq!(offset_of!(RevNat, count), 24);
    }

    #[test]
    fn counters_layout() {
        assert_eq!(size_of::<Counters>(), 24);
        assert_eq!(align_of::<Counters>(), 8);
        assert_eq!(offset_of!(Counters, packets), 0);
        assert_eq!(offset_of!(Counters, bytes), 8);
        assert_eq!(offset_of!(Counters, new_flows), 16);
    }

    #[test]
    fn vip_filter_bits_are_in_range_and_spread() {
        let mut seen = std::collections::HashSet::new();
        for last in 0..=255u8 {
            let b = vip_filter_bit(u32::from_ne_bytes([198, 18, 101, last]));
            assert!(b < VIP_FILTER_WORDS * 64);
            seen.insert(b);
        }
        assert_eq!(
            seen.len(),
            256,
            "addresses within a /16 must not share a bit"
        );
    }

    #[test]
    fn stat_names_follow_their_indexes() {
        for (index, name) in [
            (stat::PASS_NOT_IPV4, "pass_not_ipv4"),
            (stat::PASS_NOT_L4, "pass_not_l4"),
            (stat::PASS_NO_SERVICE, "pass_no_service"),
            (stat::PASS_FRAGMENT, "pass_fragment"),
            (stat::PASS_MALFORMED, "pass_malformed"),
            (stat::PASS_TO_SKB_PATH, "pass_to_skb_path"),
            (stat::DROP_NO_BACKEND, "drop_no_backend"),
            (stat::FWD_XDP, "fwd_xdp"),
            (stat::FWD_SKB, "fwd_skb"),
            (stat::DROP_REDIRECT, "drop_redirect"),
            (stat::REVERSE_NAT, "reverse_nat"),
            (stat::PASS_NO_FLOW, "pass_no_flow"),
            (stat::FLOW_REBALANCED, "flow_rebalanced"),
            (stat::DROP_REWRITE, "drop_rewrite"),
            (stat::DROP_ADJUST_HEAD, "drop_adjust_head"),
            (stat::DROP_VLAN_POP, "drop_vlan_pop"),
            (stat::DROP_MAC_WRITE, "drop_mac_write"),
            (stat::DROP_REVERSE_REWRITE, "drop_reverse_rewrite"),
            (stat::DROP_VLAN_PUSH, "drop_vlan_push"),
            (stat::REVERSE_NAT_NO_FLOW, "reverse_nat_no_flow"),
            (stat::PASS_NO_ROUTE, "pass_no_route"),
            (stat::FWD_DSR_REPLY, "fwd_dsr_reply"),
        ] {
            assert_eq!(stat::NAMES[index as usize], name);
        }
    }

    #[test]
    fn every_stat_has_a_unique_name() {
        let mut names = stat::NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), stat::COUNT as usize);
    }
}
