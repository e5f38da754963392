//! The `lb` data path programs: maps, and thin entry points over the packet
//! logic in the `lb_ebpf` library.
//!
//! The forward path is a sequence of named steps: [`lookup_service`],
//! [`select_backend`] (flow table, then Maglev), translate ([`xdp_xlate`] /
//! [`tc_xlate`]: DNAT, VLAN tag, MACs) and deliver ([`xdp_deliver`] /
//! [`tc_deliver`]). The reverse path: [`lookup_reply_flow`], then
//! [`tc_reverse`] (source back to the service, redirect to the client), or
//! for a reply no flow entry holds (another node forwarded its request)
//! [`tc_reverse_without_flow`] (the service found by its Maglev table, the
//! client by the kernel's FIB).
//!
//! - `lb_xdp_fwd` (XDP, external interfaces): the forward path with
//!   `XDP_REDIRECT` to the backend's interface, when that interface takes XDP
//!   frames. Otherwise it passes the packet untouched to
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
        bpf_fib_lookup as FibLookup, bpf_redir_neigh as RedirNeigh,
        bpf_redir_neigh__bindgen_ty_1 as RedirNeighAddr,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_REDIRECT},
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, TC_ACT_SHOT, TC_ACT_UNSPEC,
    },
    helpers::{
        bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_redirect_peer, bpf_skb_vlan_pop, bpf_skb_vlan_push, bpf_xdp_adjust_head,
    },
    macros::{classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};
use lb_common::{
    defaults, stat, Backend, Counters, Flow, FlowKey, RevNat, ServiceKey, ServiceValue,
    BACKEND_F_MAC, BACKEND_F_PEER, BACKEND_F_XDP, FLOW_F_VLAN, IFACE_F_REPLIES, IFACE_F_XDP,
    MAGLEV_MAP_FLAGS, REV_NAT_MAX, VIP_FILTER_WORDS,
};
use lb_ebpf::{
    flow::{self, FlowState, Selection},
    nat::{self, Rewrite, Side},
    parse::{self, load, Parsed, Skip, ETH_P_8021Q},
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

/// Step 1, service lookup: the service the packet is addressed to.
#[inline(always)]
fn lookup_service(p: &Parsed) -> Option<&'static ServiceValue> {
    // SAFETY: values are plain data, replaced whole by userspace.
    unsafe { SERVICES.get(flow::service_key(&p.key)) }
}

/// Step 2, backend selection: the flow table, then the service's Maglev
/// table. Marks an established flow as seen; records nothing.
#[inline(always)]
fn select_backend(p: &Parsed, svc: &ServiceValue) -> Selection {
    let key = &p.key;
    let entry = FLOWS.get_ptr_mut(key);
    // SAFETY: a valid map value pointer; `Flow` is plain data.
    let recorded = entry.map(|f| unsafe { (*f).backend_id });
    let sel = flow::select_backend(
        key,
        svc,
        recorded,
        p.opens,
        |id| BACKENDS.get(id),
        |slot| MAGLEV.get(slot).copied(),
    );
    if let (FlowState::Established, Some(f)) = (sel.state, entry) {
        touch(f);
    }
    sel
}

/// Records a new flow: its backend for the client's next packets, and how
/// to send the backend's replies back the way the client came.
#[inline(always)]
fn record(p: &Parsed, backend_id: u32, ingress_ifindex: u32, macs: ([u8; 6], [u8; 6])) {
    let flow = Flow {
        backend_id,
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

/// Counts a packet the selection moved off a stale flow. Each packet is
/// counted by the one program that forwards or drops it.
#[inline(always)]
fn count_rebalanced(sel: &Selection) {
    if sel.state == FlowState::Rebalanced {
        count(stat::FLOW_REBALANCED);
    }
}

/// Reads (dst, src) MACs.
#[inline(always)]
fn macs(start: usize, end: usize) -> Option<([u8; 6], [u8; 6])> {
    Some((load(start, end, 0)?, load(start, end, 6)?))
}

/// Whether XDP can deliver to `b`: its egress takes XDP frames and its MACs
/// are known.
#[inline(always)]
fn xdp_delivers(b: &Backend) -> bool {
    b.flags & (BACKEND_F_XDP | BACKEND_F_MAC) == (BACKEND_F_XDP | BACKEND_F_MAC)
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

/// The forward path on XDP: early filter, parse, service lookup, backend
/// selection, then translate and deliver, or pass to the skb path.
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
    let Some(svc) = lookup_service(&p) else {
        count(stat::PASS_NO_SERVICE);
        return XDP_PASS;
    };
    let sel = select_backend(&p, svc);
    let Some((id, backend)) = sel.backend else {
        count_rebalanced(&sel);
        count(stat::DROP_NO_BACKEND);
        return XDP_DROP;
    };
    // Hand the packet, untouched, to the skb path where XDP cannot deliver:
    // the TC program selects again and counts the rebalance, if any.
    if !xdp_delivers(&backend) {
        count(stat::PASS_TO_SKB_PATH);
        return XDP_PASS;
    }
    let Some(m) = macs(start, end) else {
        count(stat::PASS_MALFORMED);
        return XDP_PASS;
    };
    // From here on XDP forwards or drops the packet: it is the one to count.
    count_rebalanced(&sel);
    let len = (end - start) as u64;
    if let Err(reason) = xdp_xlate(ctx, &p, &backend, flow::direct_return(svc)) {
        count(reason);
        return XDP_DROP;
    }
    if sel.new_flow() {
        // SAFETY: reading the context's ingress ifindex.
        let ifindex = unsafe { (*ctx.ctx).ingress_ifindex };
        record(&p, id, ifindex, m);
    }
    count_flow(&SVC_STATS, svc.id, len, sel.new_flow());
    count_flow(&BE_STATS, id, len, sel.new_flow());
    xdp_deliver(&backend)
}

/// Step 3 on XDP, translation: DNAT in place (not for direct server
/// return, `dsr`), the VLAN tag removed and the backend's MACs written.
/// `Err` holds the counter of the step that failed.
#[inline(always)]
fn xdp_xlate(ctx: &XdpContext, p: &Parsed, b: &Backend, dsr: bool) -> Result<(), u32> {
    let (start, end) = (ctx.data(), ctx.data_end());
    if !dsr && !nat::rewrite(start, end, &Rewrite::new(p, Side::Dst, b.addr, b.port)) {
        return Err(stat::DROP_REWRITE);
    }
    let (mut start, mut end) = (start, end);
    if p.vlan {
        // Backends sit on untagged links: drop the tag by moving the start of
        // the frame past it; the MACs are written fresh below.
        // SAFETY: the helper checks the new head against the buffer.
        if unsafe { bpf_xdp_adjust_head(ctx.ctx, 4) } != 0 {
            return Err(stat::DROP_ADJUST_HEAD);
        }
        (start, end) = (ctx.data(), ctx.data_end());
    }
    if !nat::set_macs(start, end, &b.dst_mac, &b.src_mac) {
        return Err(stat::DROP_MAC_WRITE);
    }
    Ok(())
}

/// Step 4 on XDP, delivery: redirect to the backend's interface.
#[inline(always)]
fn xdp_deliver(b: &Backend) -> u32 {
    // SAFETY: plain helper call.
    let action = unsafe { bpf_redirect(b.ifindex, 0) } as u32;
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

/// Counts a pass unless XDP on this interface already counted the packet,
/// and hands it on: `TC_ACT_UNSPEC` (TCX's "next"), not `TC_ACT_OK`, so a
/// later program on the same hook (another daemon's, a monitoring tool's)
/// still sees a packet this one does not handle.
#[inline(always)]
fn tc_pass(ctx: &TcContext, reason: u32) -> i32 {
    // SAFETY: reading the skb's ingress ifindex.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: plain data.
    let xdp = unsafe { IFACES.get(ifindex) }.is_some_and(|f| f & IFACE_F_XDP != 0);
    if !xdp {
        count(reason);
    }
    TC_ACT_UNSPEC
}

/// The skb path: the forward path for a packet to a service, else the
/// reverse path for a backend's reply, else pass.
#[inline(always)]
fn tc_main(ctx: &TcContext) -> i32 {
    let p = match tc_parse(ctx) {
        Ok(p) => p,
        Err(skip) => return tc_pass(ctx, skip.stat()),
    };
    if let Some(svc) = lookup_service(&p) {
        return tc_forward(ctx, p, svc);
    }
    // SAFETY: plain data, values replaced whole.
    let Some(rev) = (unsafe { REV_NAT.get(flow::rev_nat_key(&p.key)) }) else {
        return tc_dsr_reply(ctx, &p);
    };
    match lookup_reply_flow(&p, rev) {
        Some((key, flow)) => tc_reverse(ctx, &p, &key, &flow, false),
        None => tc_reverse_without_flow(ctx, &p, rev),
    }
}

/// Reverse step 1: the flow a backend's reply belongs to, found by its
/// client-side key (see [`flow::reply_flow_key`]), and only while the flow
/// is still given to this very backend. Marks the flow as seen.
#[inline(always)]
fn lookup_reply_flow(p: &Parsed, rev: &RevNat) -> Option<(FlowKey, Flow)> {
    for i in 0..REV_NAT_MAX {
        let key = flow::reply_flow_key(&p.key, rev, i)?;
        let Some(ptr) = FLOWS.get_ptr_mut(key) else {
            continue;
        };
        // SAFETY: a valid map value pointer; `Flow` is plain data.
        let flow = unsafe { *ptr };
        if BACKENDS
            .get(flow.backend_id)
            .is_some_and(|b| flow::is_reply_from(b, &p.key))
        {
            touch(ptr);
            return Some((key, flow));
        }
    }
    None
}

/// Carries out `rw` on the skb with the kernel's checksum helpers, which
/// keep `CHECKSUM_PARTIAL` skbs (from a local veth peer) right.
#[inline(always)]
fn skb_rewrite(ctx: &TcContext, rw: &Rewrite) -> Result<(), i64> {
    ctx.l4_csum_replace(
        rw.l4_check_off,
        u64::from(rw.old_addr),
        u64::from(rw.addr),
        rw.l4_addr_flags(),
    )?;
    ctx.l4_csum_replace(
        rw.l4_check_off,
        u64::from(rw.old_port),
        u64::from(rw.port),
        rw.l4_port_flags(),
    )?;
    ctx.l3_csum_replace(
        rw.ip_check_off,
        u64::from(rw.old_addr),
        u64::from(rw.addr),
        nat::L3_ADDR_FLAGS,
    )?;
    ctx.store(rw.addr_off, &rw.addr, 0)?;
    ctx.store(rw.port_off, &rw.port, 0)?;
    Ok(())
}

/// The forward path on the skb: backend selection, then translate and
/// deliver.
#[inline(always)]
fn tc_forward(ctx: &TcContext, p: Parsed, svc: &ServiceValue) -> i32 {
    let sel = select_backend(&p, svc);
    // Whatever happens next, this program is the packet's last: XDP, if it
    // saw the packet, passed it here without counting.
    count_rebalanced(&sel);
    let Some((id, backend)) = sel.backend else {
        count(stat::DROP_NO_BACKEND);
        return TC_ACT_SHOT;
    };
    let Some(m) = macs(ctx.data(), ctx.data_end()) else {
        return tc_pass(ctx, stat::PASS_MALFORMED);
    };
    let len = u64::from(ctx.len());
    // SAFETY: reading an skb field.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    let dsr = flow::direct_return(svc);
    let p = match tc_xlate(ctx, p, &backend, dsr) {
        Ok(p) => p,
        Err(reason) => {
            count(reason);
            return TC_ACT_SHOT;
        }
    };
    if sel.new_flow() {
        record(&p, id, ifindex, m);
    }
    count_flow(&SVC_STATS, svc.id, len, sel.new_flow());
    count_flow(&BE_STATS, id, len, sel.new_flow());
    tc_deliver(&backend, dsr)
}

/// Step 3 on the skb, translation: the VLAN tag (in the data or offloaded)
/// removed, DNAT (not for direct server return, `dsr`), the backend's MACs
/// written when known. Returns the packet as parsed, with the tag the flow
/// records; `Err` holds the counter of the step that failed.
#[inline(always)]
fn tc_xlate(ctx: &TcContext, p: Parsed, b: &Backend, dsr: bool) -> Result<Parsed, u32> {
    // SAFETY: reading skb fields.
    let (hw_vlan, hw_tci) = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.vlan_present != 0, skb.vlan_tci as u16)
    };
    let mut p = p;
    if hw_vlan && !p.vlan {
        p.vlan = true;
        p.vlan_tci = hw_tci;
    }
    if p.vlan {
        // SAFETY: plain helper call; removes the in-data or offloaded tag.
        if unsafe { bpf_skb_vlan_pop(ctx.skb.skb) } != 0 {
            return Err(stat::DROP_VLAN_POP);
        }
        if !hw_vlan {
            p = p.without_tag();
        }
    }
    if !dsr && skb_rewrite(ctx, &Rewrite::new(&p, Side::Dst, b.addr, b.port)).is_err() {
        return Err(stat::DROP_REWRITE);
    }
    if b.flags & BACKEND_F_MAC != 0
        && (ctx.store(0, &b.dst_mac, 0).is_err() || ctx.store(6, &b.src_mac, 0).is_err())
    {
        return Err(stat::DROP_MAC_WRITE);
    }
    Ok(p)
}

/// Step 4 on the skb, delivery. A direct-server-return packet (`dsr`)
/// still carries the VIP as destination: its next hop is the backend
/// itself, given to the kernel when it looks up the MAC.
#[inline(always)]
fn tc_deliver(b: &Backend, dsr: bool) -> i32 {
    let mut next_hop = RedirNeigh {
        nh_family: u32::from(AF_INET),
        __bindgen_anon_1: RedirNeighAddr { ipv4_nh: b.addr },
    };
    // SAFETY: plain helper calls; `next_hop` lives across the call.
    let action = unsafe {
        if b.flags & (BACKEND_F_MAC | BACKEND_F_PEER) == (BACKEND_F_MAC | BACKEND_F_PEER) {
            // Straight into the backend's namespace, past the host veth.
            bpf_redirect_peer(b.ifindex, 0)
        } else if dsr {
            bpf_redirect_neigh(
                b.ifindex,
                &mut next_hop,
                core::mem::size_of::<RedirNeigh>() as i32,
                0,
            )
        } else {
            // The kernel fills in the next hop's MAC from its neighbour table.
            bpf_redirect_neigh(b.ifindex, core::ptr::null_mut(), 0, 0)
        }
    } as i32;
    if action == TC_ACT_REDIRECT {
        count(stat::FWD_SKB);
    } else {
        count(stat::DROP_REDIRECT);
    }
    action
}

/// Reverse steps 2 and 3: the reply's source becomes the service again
/// (unless it already is: a direct-server-return reply, `dsr`), the
/// client's MACs and VLAN tag are restored, and the reply leaves through the
/// interface its client came in on. `key` is the client's flow key.
#[inline(always)]
fn tc_reverse(ctx: &TcContext, p: &Parsed, key: &FlowKey, flow: &Flow, dsr: bool) -> i32 {
    let rw = Rewrite::new(p, Side::Src, key.dst_addr, key.dst_port);
    if (!dsr && skb_rewrite(ctx, &rw).is_err())
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
    count(if dsr {
        stat::FWD_DSR_REPLY
    } else {
        stat::REVERSE_NAT
    });
    // SAFETY: plain helper call; egress of the client's interface.
    unsafe { bpf_redirect(flow.ifindex, 0) as i32 }
}

/// Where the kernel's FIB sends a packet to a client.
enum Route {
    /// Out of `ifindex` with these (destination, source) MACs.
    Resolved {
        ifindex: u32,
        macs: ([u8; 6], [u8; 6]),
    },
    /// Out of `ifindex`, whose neighbour entry for the next hop is not
    /// resolved yet: `bpf_redirect_neigh` resolves it.
    Unresolved { ifindex: u32 },
}

/// `AF_INET`, the FIB lookup's family.
const AF_INET: u8 = 2;

/// The route from this node to the client of `key` (the client's flow
/// key), with the VIP as source, looked up in the kernel's FIB as a packet
/// that came in on the skb's interface. `None` when there is none, or
/// forwarding is off on that interface.
#[inline(always)]
fn route_to_client(ctx: &TcContext, key: &FlowKey) -> Option<Route> {
    // SAFETY: a plain C struct, valid zeroed.
    let mut params: FibLookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = key.proto;
    params.sport = key.dst_port;
    params.dport = key.src_port;
    // SAFETY: reading an skb field.
    params.ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    params.__bindgen_anon_3.ipv4_src = key.dst_addr;
    params.__bindgen_anon_4.ipv4_dst = key.src_addr;
    // A zero `tot_len` has the helper check the skb itself against the
    // egress MTU.
    // SAFETY: the helper reads and writes `params`, of the size given.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            core::mem::size_of::<FibLookup>() as i32,
            0,
        )
    };
    match rc as u32 {
        BPF_FIB_LKUP_RET_SUCCESS => Some(Route::Resolved {
            ifindex: params.ifindex,
            macs: (params.dmac, params.smac),
        }),
        BPF_FIB_LKUP_RET_NO_NEIGH => Some(Route::Unresolved {
            ifindex: params.ifindex,
        }),
        _ => None,
    }
}

/// The reverse path of a reply no flow entry holds (see
/// [`flow::stateless_reply_key`]): another node forwarded its request, or
/// the entry was evicted. The reply gets the service back as its source and
/// goes where the kernel's FIB routes its client: with no flow entry, the
/// client's MACs, interface and VLAN tag are unknown here. Checked whole
/// before anything is written, so a reply that cannot be sent on passes
/// untouched.
#[inline(always)]
fn tc_reverse_without_flow(ctx: &TcContext, p: &Parsed, rev: &RevNat) -> i32 {
    let key = flow::stateless_reply_key(
        &p.key,
        rev,
        // SAFETY: plain data, values replaced whole.
        |k| unsafe { SERVICES.get(k) },
        |id| BACKENDS.get(id),
        |slot| MAGLEV.get(slot).copied(),
    );
    let Some(key) = key else {
        return tc_pass(ctx, stat::PASS_NO_FLOW);
    };
    let Some(route) = route_to_client(ctx, &key) else {
        return tc_pass(ctx, stat::PASS_NO_ROUTE);
    };
    let rw = Rewrite::new(p, Side::Src, key.dst_addr, key.dst_port);
    if skb_rewrite(ctx, &rw).is_err() {
        count(stat::DROP_REVERSE_REWRITE);
        return TC_ACT_SHOT;
    }
    send_on(ctx, &route, stat::REVERSE_NAT_NO_FLOW)
}

/// Sends the packet out where `route` says, counting `sent` (or a failed
/// redirect); a frame whose MACs cannot be written is dropped as a failed
/// reverse rewrite.
#[inline(always)]
fn send_on(ctx: &TcContext, route: &Route, sent: u32) -> i32 {
    let action = match *route {
        Route::Resolved { ifindex, macs } => {
            if ctx.store(0, &macs.0, 0).is_err() || ctx.store(6, &macs.1, 0).is_err() {
                count(stat::DROP_REVERSE_REWRITE);
                return TC_ACT_SHOT;
            }
            // SAFETY: plain helper call.
            unsafe { bpf_redirect(ifindex, 0) }
        }
        // SAFETY: plain helper call; no next-hop parameters.
        Route::Unresolved { ifindex } => unsafe {
            bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0)
        },
    } as i32;
    if action == TC_ACT_REDIRECT {
        count(sent);
    } else {
        count(stat::DROP_REDIRECT);
    }
    action
}

/// A packet from a direct-server-return service's own VIP and port, come in
/// where backends' replies do: a backend on this host (a container) answering
/// its client directly. Sent on unchanged the way its client came, as the
/// flow recorded it (MACs, interface, VLAN tag), else where the FIB routes
/// the client: the host's stack would drop it as a martian when the VIP is
/// one of the host's own addresses, or not route it with forwarding off.
/// Anything else passes.
#[inline(always)]
fn tc_dsr_reply(ctx: &TcContext, p: &Parsed) -> i32 {
    // SAFETY: reading an skb field.
    let ifindex = unsafe { (*ctx.skb.skb).ingress_ifindex };
    // SAFETY: plain data.
    let replies_here = unsafe { IFACES.get(ifindex) }.is_some_and(|f| f & IFACE_F_REPLIES != 0);
    // The reply's source is the service's key.
    // SAFETY: plain data, values replaced whole.
    let dsr = replies_here
        && unsafe { SERVICES.get(flow::rev_nat_key(&p.key)) }.is_some_and(flow::direct_return);
    if !dsr {
        return tc_pass(ctx, stat::PASS_NO_SERVICE);
    }
    let client = flow::client_key_of(&p.key);
    if let Some(ptr) = FLOWS.get_ptr_mut(client) {
        touch(ptr);
        // SAFETY: a valid map value pointer; `Flow` is plain data.
        let flow = unsafe { *ptr };
        return tc_reverse(ctx, p, &client, &flow, true);
    }
    match route_to_client(ctx, &client) {
        Some(route) => send_on(ctx, &route, stat::FWD_DSR_REPLY),
        None => tc_pass(ctx, stat::PASS_NO_ROUTE),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
