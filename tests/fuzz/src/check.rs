//! The invariants, one packet and one program at a time: what the frame
//! must lead to ([`expect`], from the reference classifier and the
//! scenario), and whether the run did exactly that ([`check`]).
//!
//! The fields a path may change, from the programs' code:
//! - XDP forward (`xdp_xlate`): both MACs (to the backend's), the 802.1Q
//!   tag (removed), the IPv4 destination, the L4 destination port, the IPv4
//!   and L4 checksums;
//! - TC forward (`tc_xlate`): the same, the MACs only when the backend's
//!   are known (`BACKEND_F_MAC`);
//! - TC reverse (`tc_reverse`): both MACs (to the flow's), the IPv4
//!   source, the L4 source port, the IPv4 and L4 checksums (a restored
//!   VLAN tag goes into the skb's metadata, not the data).
//!
//! Nothing else, not even the TTL: the balancer is not a router hop. The
//! checksums must sum to what the input's did (so a right checksum stays
//! right and a wrong one stays wrong), and a UDP checksum of 0 ("none")
//! stays 0.

use std::fmt;

use lb_common::stat;
use lb_harness::packets::{
    Run, TC_ACT_REDIRECT, TC_ACT_SHOT, TC_ACT_UNSPEC, XDP_DROP, XDP_PASS, XDP_REDIRECT,
};

use crate::{
    scenario::{self, Key, Kind, Model},
    wire::{be16, classify, early_dst, Class, Ipv4Frame, ETH_IPV4, ETH_IPV6, UDP},
};

/// One of the two programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prog {
    /// `lb_xdp_fwd`.
    Xdp,
    /// `lb_tc`.
    Tc,
}

impl fmt::Display for Prog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Prog::Xdp => "xdp",
            Prog::Tc => "tc",
        })
    }
}

/// What a frame must lead to in one program.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The kernel refuses to run the program on it (too short for the
    /// headers `BPF_PROG_TEST_RUN` itself reads).
    Refused,
    /// Passed untouched, counted in this counter.
    Pass(u32),
    /// Dropped, counted in this counter.
    Drop(u32),
    /// Rewritten and redirected to a backend of this service.
    Forward(u32),
    /// A backend's reply, rewritten back to this service and redirected.
    Reverse(u32),
}

impl fmt::Display for Expect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = |c: u32| stat::NAMES[c as usize];
        match self {
            Expect::Refused => write!(f, "refused"),
            Expect::Pass(c) => write!(f, "pass {}", name(*c)),
            Expect::Drop(c) => write!(f, "drop {}", name(*c)),
            Expect::Forward(sid) => write!(f, "forward {sid}"),
            Expect::Reverse(sid) => write!(f, "reverse {sid}"),
        }
    }
}

impl std::str::FromStr for Expect {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let counter = |n: &str| {
            stat::NAMES
                .iter()
                .position(|c| *c == n)
                .map(|i| i as u32)
                .ok_or_else(|| format!("no counter {n:?}"))
        };
        let sid = |n: &str| {
            n.parse::<u32>()
                .map_err(|_| format!("{n:?} is not a service id"))
        };
        match s.split_once(' ').unwrap_or((s, "")) {
            ("refused", "") => Ok(Expect::Refused),
            ("pass", c) => Ok(Expect::Pass(counter(c)?)),
            ("drop", c) => Ok(Expect::Drop(counter(c)?)),
            ("forward", n) => Ok(Expect::Forward(sid(n)?)),
            ("reverse", n) => Ok(Expect::Reverse(sid(n)?)),
            _ => Err(format!("{s:?} is not an outcome")),
        }
    }
}

/// Whether `BPF_PROG_TEST_RUN` itself may refuse `f`: shorter than an
/// Ethernet header, or, for an skb (TC), shorter than the IPv4 or IPv6
/// header its EtherType announces.
pub fn kernel_may_refuse(prog: Prog, f: &[u8]) -> bool {
    if f.len() < 14 {
        return true;
    }
    prog == Prog::Tc
        && match be16(f, 12) {
            ETH_IPV4 => f.len() < 14 + 20,
            ETH_IPV6 => f.len() < 14 + 40,
            _ => false,
        }
}

/// The client-side key of a parsed frame.
pub fn key_of(p: &Ipv4Frame) -> Key {
    (p.src, p.dst, p.sport, p.dport, p.proto)
}

/// The flow keys a backend's reply `p` may belong to, with the service of
/// each, in the order the reverse path tries them.
fn reply_keys(p: &Ipv4Frame) -> Vec<(u32, Key, u32)> {
    scenario::served_by(p.src, p.sport, p.proto)
        .into_iter()
        .map(|(s, b)| (s.sid, (p.dst, s.vip, p.dport, s.port, p.proto), b.id))
        .collect()
}

/// What `f` must lead to in `prog`, given the flows in `model`.
pub fn expect(prog: Prog, f: &[u8], model: &Model) -> Expect {
    if kernel_may_refuse(prog, f) {
        return Expect::Refused;
    }
    if prog == Prog::Xdp {
        if let Some(dst) = early_dst(f) {
            if !scenario::maybe_vip(dst) {
                return Expect::Pass(stat::PASS_NO_SERVICE);
            }
        }
    }
    let p = match classify(f) {
        Class::NotIpv4 => return Expect::Pass(stat::PASS_NOT_IPV4),
        Class::NotL4 => return Expect::Pass(stat::PASS_NOT_L4),
        Class::Fragment => return Expect::Pass(stat::PASS_FRAGMENT),
        Class::Malformed => return Expect::Pass(stat::PASS_MALFORMED),
        Class::Ipv4(p) => p,
    };
    if let Some(s) = scenario::service(p.dst, p.dport, p.proto) {
        return match (prog, scenario::kind(s)) {
            (_, Kind::NoBackend) => Expect::Drop(stat::DROP_NO_BACKEND),
            (Prog::Xdp, Kind::Skb) => Expect::Pass(stat::PASS_TO_SKB_PATH),
            _ => Expect::Forward(s.sid),
        };
    }
    if prog == Prog::Xdp {
        return Expect::Pass(stat::PASS_NO_SERVICE);
    }
    let keys = reply_keys(&p);
    if keys.is_empty() {
        return Expect::Pass(stat::PASS_NO_SERVICE);
    }
    keys.iter()
        .find(|(_, key, id)| model.flow(key).is_some_and(|r| r.backend == *id))
        .map_or(Expect::Pass(no_flow(&p)), |(sid, _, _)| {
            Expect::Reverse(*sid)
        })
}

/// The pass counter of a backend's reply that finds no flow entry. A reply
/// a service still claims (see [`scenario::claimed_without_flow`]) would be
/// routed to its client by the FIB, but `BPF_PROG_TEST_RUN`'s skb has no
/// ingress interface to look a route up from: it passes as of no route.
fn no_flow(p: &Ipv4Frame) -> u32 {
    if scenario::claimed_without_flow(p.src, p.sport, p.dst, p.dport, p.proto) {
        stat::PASS_NO_ROUTE
    } else {
        stat::PASS_NO_FLOW
    }
}

/// Checks one run of `prog` on `input` against `want`. `exact`: the model
/// holds exactly the data path's flows (a replay); otherwise the flow
/// table may have evicted some, and a reply the model would reverse may
/// pass as of no flow. Returns the counter the run must have moved (none
/// for a refused run), and records forwarded flows in `model`.
pub fn check(
    prog: Prog,
    input: &[u8],
    want: Expect,
    run: Result<Run, String>,
    model: &mut Model,
    exact: bool,
) -> Result<Option<u32>, String> {
    let run = match (run, want) {
        (Err(_), Expect::Refused) => return Ok(None),
        (Err(e), _) => return Err(format!("{prog}: the test run failed: {e}")),
        (Ok(run), _) => run,
    };
    let (pass, drop, redirect) = match prog {
        Prog::Xdp => (XDP_PASS, XDP_DROP, XDP_REDIRECT),
        Prog::Tc => (TC_ACT_UNSPEC, TC_ACT_SHOT, TC_ACT_REDIRECT),
    };
    let action = |want: u32, what: &str| {
        if run.action == want {
            Ok(())
        } else {
            Err(format!(
                "{prog}: expected {what} (action {want}), got action {}",
                run.action
            ))
        }
    };
    let untouched = |counter: u32| {
        action(pass, &format!("a pass ({})", stat::NAMES[counter as usize]))?;
        if let Some(i) = first_difference(&run.output, input) {
            return Err(format!(
                "{prog}: a passed frame changed ({} bytes in, {} out, first difference at byte {i})",
                input.len(),
                run.output.len()
            ));
        }
        Ok(Some(counter))
    };
    match want {
        // The kernel may refuse; when it runs the program, the frame is too
        // short for any header and must pass as malformed.
        Expect::Refused => untouched(stat::PASS_MALFORMED),
        Expect::Pass(c) => untouched(c),
        Expect::Drop(c) => {
            action(drop, &format!("a drop ({})", stat::NAMES[c as usize]))?;
            Ok(Some(c))
        }
        Expect::Forward(sid) => {
            action(redirect, &format!("a forward to service {sid}"))?;
            forwarded(prog, input, &run.output, sid, model)?;
            Ok(Some(match prog {
                Prog::Xdp => stat::FWD_XDP,
                Prog::Tc => stat::FWD_SKB,
            }))
        }
        Expect::Reverse(_) if !exact && run.action == pass => untouched(no_flow(&parsed(input))),
        Expect::Reverse(sid) => {
            action(redirect, &format!("a reply of service {sid}"))?;
            reversed(input, &run.output, model)?;
            Ok(Some(stat::REVERSE_NAT))
        }
    }
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a == b {
        return None;
    }
    Some(
        a.iter()
            .zip(b)
            .position(|(x, y)| x != y)
            .unwrap_or(a.len().min(b.len())),
    )
}

/// The parsed input, which [`expect`] found whole.
fn parsed(input: &[u8]) -> Ipv4Frame {
    match classify(input) {
        Class::Ipv4(p) => p,
        other => panic!("expected a whole IPv4 frame, the reference says {other:?}"),
    }
}

/// Checks that every byte of `out` other than those in `allowed` equals
/// `base`'s.
fn only_changed(
    prog: Prog,
    base: &[u8],
    out: &[u8],
    allowed: &[(usize, usize, &str)],
) -> Result<(), String> {
    if base.len() != out.len() {
        return Err(format!(
            "{prog}: {} bytes out, {} expected",
            out.len(),
            base.len()
        ));
    }
    for (i, (a, b)) in base.iter().zip(out).enumerate() {
        if a != b
            && !allowed
                .iter()
                .any(|(from, len, _)| (*from..from + len).contains(&i))
        {
            return Err(format!(
                "{prog}: byte {i} changed ({a:#04x} to {b:#04x}), outside the fields the path may change ({})",
                allowed.iter().map(|a| a.2).collect::<Vec<_>>().join(", ")
            ));
        }
    }
    Ok(())
}

/// Checks the checksums of a rewritten frame `out` (parsed as `q`)
/// against those of its input (parsed as `p`).
fn checksums(
    prog: Prog,
    input: &[u8],
    p: &Ipv4Frame,
    out: &[u8],
    q: &Ipv4Frame,
) -> Result<(), String> {
    let (before, after) = (p.ip_sum(input), q.ip_sum(out));
    if before != after {
        return Err(format!(
            "{prog}: IPv4 header checksum: the input's sums to {before:#06x}, the output's to {after:#06x} (0 is right)"
        ));
    }
    if p.proto == UDP && be16(input, p.l4_check()) == 0 {
        let c = be16(out, q.l4_check());
        if c != 0 {
            return Err(format!(
                "{prog}: a UDP datagram without checksum got one ({c:#06x})"
            ));
        }
        return Ok(());
    }
    let (before, after) = (p.l4_sum(input), q.l4_sum(out));
    if before != after {
        return Err(format!(
            "{prog}: L4 checksum: the input's sums to {before:#06x}, the output's to {after:#06x} (0 is right)"
        ));
    }
    Ok(())
}

/// Checks a forwarded frame and records its flow.
fn forwarded(
    prog: Prog,
    input: &[u8],
    out: &[u8],
    sid: u32,
    model: &mut Model,
) -> Result<(), String> {
    let p = parsed(input);
    // Backends sit on untagged links: the tag goes, the rest moves up.
    let mut base = input.to_vec();
    let mut q = p;
    if p.tagged() {
        base.drain(12..16);
        q.l3 -= 4;
        q.l4 -= 4;
    }
    if out.len() != base.len() {
        return Err(format!(
            "{prog}: forwarded {} bytes, {} expected",
            out.len(),
            base.len()
        ));
    }
    let s = &scenario::SERVICE_DEFS[sid as usize];
    let dst: [u8; 4] = out[q.l3 + 16..q.l3 + 20].try_into().expect("4 bytes");
    let dport = be16(out, q.l4 + 2);
    let b = s
        .members
        .iter()
        .map(|&id| scenario::backend(id))
        .find(|b| b.addr() == dst && b.port == dport)
        .ok_or_else(|| {
            format!(
                "{prog}: forwarded to {}:{dport}, not a backend of service {sid}",
                std::net::Ipv4Addr::from(dst)
            )
        })?;
    let key = key_of(&p);
    let recorded = model.flow(&key).map(|r| r.backend);
    if let Some(r) = recorded.filter(|r| *r != b.id) {
        return Err(format!(
            "{prog}: the flow moved from backend {r} to backend {}",
            b.id
        ));
    }
    if b.state != lb_common::BACKEND_ACTIVE {
        return Err(format!(
            "{prog}: a new flow went to backend {} in state {}",
            b.id, b.state
        ));
    }
    let writes_macs = prog == Prog::Xdp || b.flags & lb_common::BACKEND_F_MAC != 0;
    let xdp_frames = lb_common::BACKEND_F_XDP | lb_common::BACKEND_F_MAC;
    if prog == Prog::Xdp && b.flags & xdp_frames != xdp_frames {
        return Err(format!(
            "{prog}: redirected to backend {} that takes no XDP frames",
            b.id
        ));
    }
    let mut allowed = vec![
        (q.l3 + 16, 4, "IPv4 destination"),
        (q.l3 + 10, 2, "IPv4 checksum"),
        (q.l4 + 2, 2, "L4 destination port"),
        (q.l4_check(), 2, "L4 checksum"),
    ];
    if writes_macs {
        let (d, s) = b.macs();
        if out[0..6] != d || out[6..12] != s {
            return Err(format!(
                "{prog}: MACs {:02x?} {:02x?}, not backend {}'s",
                &out[0..6],
                &out[6..12],
                b.id
            ));
        }
        allowed.push((0, 12, "MACs"));
    }
    only_changed(prog, &base, out, &allowed)?;
    checksums(prog, input, &p, out, &q)?;
    model.forwarded(key, b.id, input);
    Ok(())
}

/// Checks a reply rewritten back to its service.
fn reversed(input: &[u8], out: &[u8], model: &Model) -> Result<(), String> {
    let prog = Prog::Tc;
    let p = parsed(input);
    let src: [u8; 4] = out[p.l3 + 12..p.l3 + 16].try_into().expect("4 bytes");
    let sport = be16(out, p.l4);
    let (sid, key, id) = reply_keys(&p)
        .into_iter()
        .find(|(sid, _, _)| {
            let s = &scenario::SERVICE_DEFS[*sid as usize];
            s.vip == src && s.port == sport
        })
        .ok_or_else(|| {
            format!(
                "{prog}: a reply rewritten to {}:{sport}, not a service of its backend",
                std::net::Ipv4Addr::from(src)
            )
        })?;
    let flow = model
        .flow(&key)
        .filter(|r| r.backend == id)
        .ok_or_else(|| format!("{prog}: a reply rewritten as service {sid}'s, but no flow of it went to that backend"))?;
    // The reply goes back as the client's frames came: MACs swapped.
    let macs: ([u8; 6], [u8; 6]) = (
        out[6..12].try_into().expect("6"),
        out[0..6].try_into().expect("6"),
    );
    if !flow.macs.contains(&macs) {
        return Err(format!(
            "{prog}: reply MACs {:02x?} {:02x?} are not the flow's",
            &out[0..6],
            &out[6..12]
        ));
    }
    only_changed(
        prog,
        input,
        out,
        &[
            (0, 12, "MACs"),
            (p.l3 + 12, 4, "IPv4 source"),
            (p.l3 + 10, 2, "IPv4 checksum"),
            (p.l4, 2, "L4 source port"),
            (p.l4_check(), 2, "L4 checksum"),
        ],
    )?;
    checksums(prog, input, &p, out, &p)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use lb_harness::packets::{BACKENDS, BACKEND_MACS, CLIENT_MAC, HOST_MAC, LB_MAC, VIP};

    use super::*;
    use crate::wire::{ethernet, push_ipv4, tcp, Ipv4Spec, TCP};

    /// A SYN from the client's port 40000, built whole (checksums from
    /// scratch) with these MACs, destination and TTL.
    fn syn(macs: ([u8; 6], [u8; 6]), dst: ([u8; 4], u16), ttl: u8) -> Vec<u8> {
        segment(macs, ([198, 18, 100, 2], 40000), dst, ttl)
    }

    /// A TCP segment built whole, from `src` to `dst`.
    fn segment(
        macs: ([u8; 6], [u8; 6]),
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        ttl: u8,
    ) -> Vec<u8> {
        let mut f = ethernet(macs.0, macs.1, &[], ETH_IPV4);
        let ip = Ipv4Spec {
            tos: 0,
            id: 1,
            frag: 0x4000,
            ttl,
            proto: TCP,
            src: src.0,
            dst: dst.0,
            options: vec![1, 1, 1, 0],
        };
        push_ipv4(
            &mut f,
            &ip,
            &tcp(src.1, dst.1, 7, 0, 0x02, &[2, 4, 5, 0xb4], b"hi"),
            true,
        );
        f
    }

    fn run(action: u32, output: Vec<u8>) -> Result<Run, String> {
        Ok(Run {
            action,
            output,
            duration: Duration::ZERO,
        })
    }

    /// The client's SYN to service 0, and that SYN as backend `i` must get it.
    fn forward_pair(i: usize) -> (Vec<u8>, Vec<u8>) {
        (
            syn((LB_MAC, CLIENT_MAC), (VIP, 80), 64),
            syn((BACKEND_MACS[i], HOST_MAC), (BACKENDS[i], 8080), 64),
        )
    }

    fn forward(input: &[u8], output: Vec<u8>, model: &mut Model) -> Result<Option<u32>, String> {
        let want = expect(Prog::Xdp, input, model);
        assert_eq!(want, Expect::Forward(0));
        check(
            Prog::Xdp,
            input,
            want,
            run(XDP_REDIRECT, output),
            model,
            true,
        )
    }

    #[test]
    fn a_right_rewrite_passes_and_records_its_flow() {
        let (input, output) = forward_pair(1);
        let mut model = Model::default();
        assert_eq!(forward(&input, output, &mut model), Ok(Some(stat::FWD_XDP)));
        let Class::Ipv4(p) = classify(&input) else {
            panic!()
        };
        assert_eq!(model.flow(&key_of(&p)).map(|r| r.backend), Some(1));
    }

    #[test]
    fn each_wrong_rewrite_is_caught() {
        let (input, good) = forward_pair(0);
        let l3 = 14;
        let l4 = l3 + 24;
        let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
        // The TTL decremented, with the header checksum made right again.
        cases.push((
            "ttl",
            syn((BACKEND_MACS[0], HOST_MAC), (BACKENDS[0], 8080), 63),
            "byte 22 changed",
        ));
        let mut c = good.clone();
        c[l3 + 10] ^= 1;
        cases.push(("ip checksum", c, "IPv4 header checksum"));
        let mut c = good.clone();
        c[l4 + 17] = c[l4 + 17].wrapping_add(1);
        cases.push(("tcp checksum", c, "L4 checksum"));
        cases.push((
            "port",
            syn((BACKEND_MACS[0], HOST_MAC), (BACKENDS[0], 8081), 64),
            "not a backend of service 0",
        ));
        cases.push((
            "macs",
            syn((BACKEND_MACS[1], HOST_MAC), (BACKENDS[0], 8080), 64),
            "not backend 0's",
        ));
        let mut c = good.clone();
        c.push(0);
        cases.push(("length", c, "64 expected"));
        for (name, out, says) in cases {
            let e = forward(&input, out, &mut Model::default()).expect_err(name);
            assert!(e.contains(says), "{name}: {e}");
        }
    }

    #[test]
    fn a_flow_that_moves_is_caught() {
        let mut model = Model::default();
        let (input, on_0) = forward_pair(0);
        forward(&input, on_0, &mut model).unwrap();
        let (_, on_1) = forward_pair(1);
        let e = forward(&input, on_1, &mut model).unwrap_err();
        assert!(e.contains("moved from backend 0 to backend 1"), "{e}");
    }

    #[test]
    fn a_changed_pass_and_a_wrong_action_are_caught() {
        let input = syn((LB_MAC, CLIENT_MAC), ([198, 18, 101, 9], 80), 64);
        let want = expect(Prog::Tc, &input, &Model::default());
        assert_eq!(want, Expect::Pass(stat::PASS_NO_SERVICE));
        let mut model = Model::default();
        assert_eq!(
            check(
                Prog::Tc,
                &input,
                want,
                run(TC_ACT_UNSPEC, input.clone()),
                &mut model,
                true
            ),
            Ok(Some(stat::PASS_NO_SERVICE))
        );
        let mut changed = input.clone();
        changed[0] ^= 1;
        let e = check(
            Prog::Tc,
            &input,
            want,
            run(TC_ACT_UNSPEC, changed),
            &mut model,
            true,
        )
        .unwrap_err();
        assert!(e.contains("a passed frame changed"), "{e}");
        let e = check(
            Prog::Tc,
            &input,
            want,
            run(TC_ACT_SHOT, input.clone()),
            &mut model,
            true,
        )
        .unwrap_err();
        assert!(e.contains("got action 2"), "{e}");
        let e = check(
            Prog::Tc,
            &input,
            want,
            Err("EINVAL".into()),
            &mut model,
            true,
        )
        .unwrap_err();
        assert!(e.contains("the test run failed"), "{e}");
    }

    #[test]
    fn a_reply_reversed_without_its_flow_is_caught() {
        // Backend 0's SYN-ACK to the client, rewritten as service 0's.
        let reply = segment(
            (HOST_MAC, BACKEND_MACS[0]),
            (BACKENDS[0], 8080),
            ([198, 18, 100, 2], 40000),
            64,
        );
        let mut model = Model::default();
        // Without its flow, service 5 (whose one backend has the same
        // address and port) still claims it, and finds no route in a test
        // run.
        assert_eq!(
            expect(Prog::Tc, &reply, &model),
            Expect::Pass(stat::PASS_NO_ROUTE)
        );
        let e = check(
            Prog::Tc,
            &reply,
            Expect::Reverse(0),
            run(TC_ACT_REDIRECT, reply.clone()),
            &mut model,
            true,
        )
        .unwrap_err();
        assert!(
            e.contains("not a service of its backend") || e.contains("no flow"),
            "{e}"
        );
    }

    #[test]
    fn outcomes_read_back_as_written() {
        for e in [
            Expect::Refused,
            Expect::Pass(stat::PASS_MALFORMED),
            Expect::Drop(stat::DROP_NO_BACKEND),
            Expect::Forward(3),
            Expect::Reverse(5),
        ] {
            assert_eq!(e.to_string().parse::<Expect>(), Ok(e));
        }
        assert!("pass nothing".parse::<Expect>().is_err());
        assert!("forward x".parse::<Expect>().is_err());
    }

    #[test]
    fn short_frames_may_be_refused() {
        assert!(kernel_may_refuse(Prog::Xdp, &[0; 13]));
        assert!(!kernel_may_refuse(Prog::Xdp, &[0; 14]));
        let mut f = vec![0u8; 33];
        f[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        assert!(kernel_may_refuse(Prog::Tc, &f));
        assert!(!kernel_may_refuse(Prog::Xdp, &f));
        f.push(0);
        assert!(!kernel_may_refuse(Prog::Tc, &f));
    }
}
