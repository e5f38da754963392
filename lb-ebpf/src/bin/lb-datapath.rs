//! The `lb` data path programs: maps, and thin entry points over the packet
//! logic in the `lb_ebpf` library.
//!
//! - `lb_xdp_fwd` (XDP, external interfaces): service lookup, flow table,
//!   Maglev pick, DNAT, MAC rewrite and `XDP_REDIRECT` to the backend's
//!   interface, when that interface takes XDP frames. Otherwise it passes the
//!   packet untouched to
//! - `lb_tc` (clsact ingress, external and backend-facing interfaces): the
//!   same forward path on the skb (`bpf_redirect_peer` / `bpf_redirect_neigh`),
//!   and the reverse path: a backend's reply gets the service address back as
//!   its source and is redirected out of the interface its client came in on.
//!
//! Neither returns a packet to netfilter once it has rewritten it.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT},
        BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer,
        bpf_skb_vlan_pop, bpf_skb_vlan_push, bpf_xdp_adjust_head,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    defaults, stat, Backend, Counters, Flow, FlowKey, RevNat, ServiceKey, ServiceValue,
    BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_F_MAC, BACKEND_F_PEER, BACKEND_F_XDP, FLOW_F_VLAN,
    IFACE_F_XDP, IPPROTO_UDP, MAGLEV_MAP_FLAGS, NO_BACKEND, REV_NAT_MAX, VIP_FILTER_WORDS,
};
use lb_ebpf::{
    hash::flow_hash,
    nat::{self, Side},
    parse::{self, load, Parsed, Skip, ETH_P_8021Q, IPV4_CHECK_OFF, IPV4_DST_OFF, IPV4_SRC_OFF},
};

// Sizes here are placeholders: userspace sets every map's size at load time.
#[map(name = "LB_SERVICES")]
static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(defaults::MAX_SERVICES, 0);
#[map(name = "LB_BACKENDS")]
static BACKENDS: Array<Backend> = Array::with_max_entries(defaults::MAX_BACKENDS, 0);
#[map(name = "LB_MAGLEV")]
static MAGLEV: Array<u32> = Array::with_max_entries(1, MAGLEV_MAP_FLAGS);
#[map(name = "LB_FLOWS")]
static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(1024, BPF_F_NO_COMMON_LRU);
#[map(name = "LB_REV_NAT")]
static REV_NAT: HashMap<ServiceKey, RevNat> = HashMap::with_max_entries(defaults::MAX_BACKENDS, 0);
#[map(name = "LB_SVC_STATS")]
static SVC_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(defaults::MAX_SERVICES, 0);
#[map(name = "LB_BE_STATS")]
static BE_STATS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(defaults::MAX_BACKENDS, 0);
#[map(name = "LB_GLOBAL_STATS")]
static GLOBAL_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);
#[map(name = "LB_IFACES")]
static IFACES: HashMap<u32, u32> = HashMap::with_max_entries(256, 0);
#[map(name = "LB_VIP_FILTER")]
static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists, no shared lock on insert.
const BPF_F_NO_COMMON_LRU: u32 = 1 << 1;
/// `TC_ACT_REDIRECT`, returned by the redirect helpers on success.
const TC_ACT_REDIRECT: i32 = 7;
/// `BPF_F_MARK_MANGLED_0`: keep a zero UDP checksum zero, send a computed
/// zero as all ones.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = GLOBAL_STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn count_flow(map: &PerCpuArray<Counters>, index: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot, only this CPU writes it.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// Seconds of the coarse monotonic clock: cheap, and enough to tell active
/// flows from idle ones.
#[inline(always)]
fn now_secs() -> u32 {
    // SAFETY: plain helper call.
    (unsafe { bpf_ktime_get_coarse_ns() } / 1_000_000_000) as u32
}

/// Marks a flow as having carried a packet now, writing only when the
/// second changed so busy flows do not dirty their entry on every packet.
#[inline(always)]
fn touch(flow: *mut Flow) {
    let now = now_secs();
    // SAFETY: a valid map value pointer; `Flow` is plain data.
    unsafe {
        if (*flow).last_seen != now {
            (*flow).last_seen = now;
        }
    }
}

/// The backend a packet goes to, and whether its flow is new to the table.
struct Choice {
    id: u32,
    backend: Backend,
    new_flow: bool,
}

/// Finds the flow's backend: the recorded one while it is up and still in the
/// service, else a fresh pick from the service's Maglev table.
#[inline(always)]
fn choose(key: &FlowKey, svc: &ServiceValue) -> Option<Choice> {
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a valid map value pointer; `Flow` is plain data.
        let id = unsafe { (*flow).backend_id };
        if let Some(b) = BACKENDS.get(id) {
            if b.service_id == svc.id && b.state != BACKEND_DOWN {
                touch(flow);
                return Some(Choice {
                    id,
                    backend: *b,
                    new_flow: false,
                });
            }
        }
        count(stat::FLOW_REBALANCED);
    }
    if svc.table_size == 0 {
        return None;
    }
    let slot = svc.table_base + flow_hash(key) % svc.table_size;
    let id = *MAGLEV.get(slot)?;
    if id == NO_BACKEND {
        return None;
    }
    let b = BACKENDS.get(id)?;
    if b.service_id != svc.id || b.state != BACKEND_ACTIVE {
        return None;
    }
    Some(Choice {
        id,
        backend: *b,
        new_flow: true,
    })
}

/// Records a new flow: its backend for the client's next packets, and how
/// to send the backend's replies back the way the client came.
#[inline(always)]
fn record(p: &Parsed, c: &Choice, ingress_ifindex: u32, macs: ([u8; 6], [u8; 6])) {
    let flow = Flow {
        backend_id: c.id,
        ifindex: ingress_ifindex,
        client_mac: macs.1,
        lb_mac: macs.0,
        vlan_tci: p.vlan_tci,
        flags: if p.vlan { FLOW_F_VLAN } else { 0 },
        last_seen: now_secs(),
    };
    // A full table evicts its least recently used flow; an insert cannot
    // otherwise fail for a valid key, and a lost record only means the next
    // packet picks again from the same table.
    let _ = FLOWS.insert(p.key, flow, 0);
}

#[inline(always)]
fn service_of(p: &Parsed) -> Option<&'static ServiceValue> {
    let key = ServiceKey {
        addr: p.key.dst_addr,
        port: p.key.dst_port,
        proto: p.key.proto,
        _pad: 0,
    };
    // SAFETY: values are plain data, replaced whole by userspace.
    unsafe { SERVICES.get(key) }
}

/// Reads (dst, src) MACs.
#[inline(always)]
fn macs(start: usize, end: usize) -> Option<([u8; 6], [u8; 6])> {
    Some((load(start, end, 0)?, load(start, end, 6)?))
}

#[xdp]
pub fn lb_xdp_fwd(ctx: XdpContext) -> u32 {
    xdp_forward(&ctx)
}

/// Whether `addr` may be a VIP: its bit is set in the filter. A clear bit
/// means certainly not; a set one means "look it up".
#[inline(always)]
fn maybe_vip(addr: u32) -> bool {
    let bit = lb_common::vip_filter_bit(addr);
    VIP_FILTER
        .get(bit / 64)
        .is_some_and(|w| w & (1u64 << (bit % 64)) != 0)
}

#[inline(always)]
fn xdp_forward(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    // Traffic to no VIP leaves after one array read, before a full parse.
    if let Some(dst) = parse::ipv4_dst(start, end) {
        if !maybe_vip(dst) {
            count(stat::PASS_NO_SERVICE);
            return XDP_PASS;
        }
    }
    let p = match parse::parse(start, end, end - start) {
        Ok(p) => p,
        Err(skip) => {
            count(skip.stat());
            return XDP_PASS;
        }
    };
    let Some(svc) = service_of(&p) else {
        count(stat::PASS_NO_SERVICE);
        return XDP_PASS;
    };
    let Some(c) = choose(&p.key, svc) else {
        count(stat::DROP_NO_BACKEND);
        return XDP_DROP;
    };
    // Hand the packet, untouched, to the skb path where XDP cannot deliver.
    if c.backend.flags & (BACKEND_F_XDP | BACKEND_F_MAC) != (BACKEND_F_XDP | BACKEND_F_MAC) {
        count(stat::PASS_TO_SKB_PATH);
        return XDP_PASS;
    }
    let Some(m) = macs(start, end) else {
        count(stat::PASS_MALFORMED);
        return XDP_PASS;
    };
    let len = (end - start) as u64;
    if !nat::rewrite(start, end, &p, Side::Dst, c.backend.addr, c.backend.port) {
        count(stat::DROP_REWRITE);
        return XDP_DROP;
    }
    let (mut start, mut end) = (start, end);
    if p.vlan {
        // Backends sit on untagged links: drop the tag by moving the start of
        // the frame past it; the MACs are written fresh below.
        // SAFETY: the helper checks the new head against the buffer.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, 4) } != 0 {
            count(stat::DROP_ADJUST_HEAD);
            return XDP_DROP;
        }
        (start, end) = (ctx.data(), ctx.data_end());
    }
    if !nat::set_macs(start, end, &c.backend.dst_mac, &c.backend.src_mac) {
        count(stat::DROP_MAC_WRITE);
        return XDP_DROP;
    }
    if c.new_flow {
        // SAFETY: reading the context's ingress ifindex.
        let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
        record(&p, &c, ifindex, m);
    }
    count_flow(&SVC_STATS, svc.id, len, c.new_flow);
    count_flow(&BE_STATS, c.id, len, c.new_flow);
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(c.backend.ifindex, 0) } as u32;
    if action == XDP_REDIRECT {
        count(stat::FWD_XDP);
    } else {
        count(stat::DROP_REDIRECT);
    }
    action
}

#[classifier]
pub fn lb_tc(ctx: TcContext) -> i32 {
    tc_main(&ctx)
}

#[inline(always)]
fn tc_parse(ctx: &TcContext) -> Result<Parsed, Skip> {
    let len = ctx.len() as usize;
    match parse::parse(ctx.data(), ctx.data_end(), len) {
        // Headers may sit past the linear part of the skb: pull them in
        // (Ethernet + VLAN + IPv4 with options + TCP fit in 128 bytes) and
        // retry once.
        Err(Skip::Malformed) if len > ctx.data_end() - ctx.data() => {
            if ctx.pull_data(ctx.len().min(128)).is_err() {
                return Err(Skip::Malformed);
            }
            parse::parse(ctx.data(), ctx.data_end(), len)
        }
        r => r,
    }
}

/// Counts a pass unless XDP on this interface already counted the packet.
#[inline(always)]
fn tc_pass(ctx: &TcContext, reason: u32) -> i32 {
    // SAFETY: reading the skb's ingress ifindex.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: plain data.
    let xdp = unsafe { IFACES.get(ifindex) }.is_some_and(|f| f & IFACE_F_XDP != 0);
    if !xdp {
        count(reason);
    }
    TC_ACT_OK
}

#[inline(always)]
fn tc_main(ctx: &TcContext) -> i32 {
    let p = match tc_parse(ctx) {
        Ok(p) => p,
        Err(skip) => return tc_pass(ctx, skip.stat()),
    };
    if let Some(svc) = service_of(&p) {
        return tc_forward(ctx, p, svc);
    }
    let from = ServiceKey {
        addr: p.key.src_addr,
        port: p.key.src_port,
        proto: p.key.proto,
        _pad: 0,
    };
    // SAFETY: plain data, values replaced whole.
    let Some(rev) = (unsafe { REV_NAT.get(from) }) else {
        return tc_pass(ctx, stat::PASS_NO_SERVICE);
    };
    match reply_flow(&p, rev) {
        Some((vip, vport, flow)) => tc_reverse(ctx, p, vip, vport, flow),
        None => tc_pass(ctx, stat::PASS_NO_FLOW),
    }
}

/// Finds the flow a backend's reply belongs to: the client's flow to one of
/// the services this backend serves, still given to this very backend.
#[inline(always)]
fn reply_flow(p: &Parsed, rev: &RevNat) -> Option<(u32, u16, Flow)> {
    for i in 0..REV_NAT_MAX {
        if i as u32 >= rev.count {
            break;
        }
        let key = FlowKey {
            src_addr: p.key.dst_addr,
            dst_addr: rev.vip[i],
            src_port: p.key.dst_port,
            dst_port: rev.vport[i],
            proto: p.key.proto,
            _pad1: 0,
            _pad2: 0,
        };
        let Some(ptr) = FLOWS.get_ptr_mut(key) else {
            continue;
        };
        // SAFETY: a valid map value pointer; `Flow` is plain data.
        let flow = unsafe { *ptr };
        let Some(b) = BACKENDS.get(flow.backend_id) else {
            continue;
        };
        if b.addr == p.key.src_addr && b.port == p.key.src_port {
            touch(ptr);
            return Some((rev.vip[i], rev.vport[i], flow));
        }
    }
    None
}

/// Rewrites one side's address and port of the skb with the kernel's checksum
/// helpers, which keep `CHECKSUM_PARTIAL` skbs (from a local veth peer) right.
#[inline(always)]
fn tc_rewrite(ctx: &TcContext, p: &Parsed, side: Side, addr: u32, port: u16) -> Result<(), i64> {
    let (addr_off, port_off, old_addr, old_port) = match side {
        Side::Dst => (
            p.l3_off + IPV4_DST_OFF,
            p.l4_off + 2,
            p.key.dst_addr,
            p.key.dst_port,
        ),
        Side::Src => (
            p.l3_off + IPV4_SRC_OFF,
            p.l4_off,
            p.key.src_addr,
            p.key.src_port,
        ),
    };
    let l4_check = p.l4_check_off();
    let udp = if p.key.proto == IPPROTO_UDP {
        BPF_F_MARK_MANGLED_0
    } else {
        0
    };
    ctx.l4_csum_replace(
        l4_check,
        old_addr as u64,
        addr as u64,
        BPF_F_PSEUDO_HDR as u64 | udp | 4,
    )?;
    ctx.l4_csum_replace(l4_check, old_port as u64, port as u64, udp | 2)?;
    ctx.l3_csum_replace(p.l3_off + IPV4_CHECK_OFF, old_addr as u64, addr as u64, 4)?;
    ctx.store(addr_off, &addr, 0)?;
    ctx.store(port_off, &port, 0)?;
    Ok(())
}

#[inline(always)]
fn tc_forward(ctx: &TcContext, p: Parsed, svc: &ServiceValue) -> i32 {
    let Some(c) = choose(&p.key, svc) else {
        count(stat::DROP_NO_BACKEND);
        return TC_ACT_SHOT;
    };
    let Some(m) = macs(ctx.data(), ctx.data_end()) else {
        return tc_pass(ctx, stat::PASS_MALFORMED);
    };
    let len = u64::from(ctx.len());
    // SAFETY: reading skb fields.
    let (ifindex, hw_vlan, hw_tci) = unsafe {
        let skb = &*ctx.skb.skb;
        (
            skb.ingress_ifindex,
            skb.vlan_present != 0,
            skb.vlan_tci as u16,
        )
    };
    let mut p = p;
    if hw_vlan && !p.vlan {
        p.vlan = true;
        p.vlan_tci = hw_tci;
    }
    if p.vlan {
        // SAFETY: plain helper call; removes the in-data or offloaded tag.
        if unsafe { bpf_skb_vlan_pop(ctx.skb.skb) } != 0 {
            count(stat::DROP_VLAN_POP);
            return TC_ACT_SHOT;
        }
        if !hw_vlan {
            p.l3_off -= parse::VLAN_HLEN;
            p.l4_off -= parse::VLAN_HLEN;
        }
    }
    if tc_rewrite(ctx, &p, Side::Dst, c.backend.addr, c.backend.port).is_err() {
        count(stat::DROP_REWRITE);
        return TC_ACT_SHOT;
    }
    let has_mac = c.backend.flags & BACKEND_F_MAC != 0;
    if has_mac
        && (ctx.store(0, &c.backend.dst_mac, 0).is_err()
            || ctx.store(6, &c.backend.src_mac, 0).is_err())
    {
        count(stat::DROP_MAC_WRITE);
        return TC_ACT_SHOT;
    }
    if c.new_flow {
        record(&p, &c, ifindex, m);
    }
    count_flow(&SVC_STATS, svc.id, len, c.new_flow);
    count_flow(&BE_STATS, c.id, len, c.new_flow);
    // SAFETY: plain helper calls.
    let action = unsafe {
        if has_mac && c.backend.flags & BACKEND_F_PEER != 0 {
            // Straight into the backend's namespace, past the host veth.
            bpf_redirect_peer(c.backend.ifindex, 0)
        } else {
            // The kernel fills in the next hop's MAC from its neighbour table.
            bpf_redirect_neigh(c.backend.ifindex, core::ptr::null_mut(), 0, 0)
        }
    } as i32;
    if action == TC_ACT_REDIRECT {
        count(stat::FWD_SKB);
    } else {
        count(stat::DROP_REDIRECT);
    }
    action
}

#[inline(always)]
fn tc_reverse(ctx: &TcContext, p: Parsed, vip: u32, vport: u16, flow: Flow) -> i32 {
    if tc_rewrite(ctx, &p, Side::Src, vip, vport).is_err()
        || ctx.store(0, &flow.client_mac, 0).is_err()
        || ctx.store(6, &flow.lb_mac, 0).is_err()
    {
        count(stat::DROP_REVERSE_REWRITE);
        return TC_ACT_SHOT;
    }
    if flow.flags & FLOW_F_VLAN != 0 {
        // SAFETY: plain helper call.
        let r = unsafe { bpf_skb_vlan_push(ctx.skb.skb, ETH_P_8021Q.to_be(), flow.vlan_tci) };
        if r != 0 {
            count(stat::DROP_VLAN_PUSH);
            return TC_ACT_SHOT;
        }
    }
    count(stat::REVERSE_NAT);
    // SAFETY: plain helper call; egress of the client's interface.
    unsafe { bpf_redirect(flow.ifindex, 0) as i32 }
}

/// Does nothing: the floor that `cargo xtask bench` subtracts from the cost
/// of the real XDP program. Never attached.
#[xdp]
pub fn lb_xdp_noop(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// Does nothing: the floor for the TC program. Never attached.
#[classifier]
pub fn lb_tc_noop(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
