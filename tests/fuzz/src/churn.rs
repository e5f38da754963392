//! Backends changing state under traffic: one TCP service of three
//! XDP-deliverable backends, whose states (active, draining, down) change
//! at random between packets, its Maglev table rebuilt over the active ones
//! each time, as the reconciler does. Packets come from 32 client ports,
//! SYNs and ACKs, each through XDP then TC, with the counters read around
//! every run. The model of the flow table is exact here (32 flows, no
//! eviction), so every run's outcome is known:
//!
//! - a recorded flow stays on its backend while that backend is active or
//!   draining, except that a SYN leaves a draining backend;
//! - otherwise the flow is picked afresh, only ever onto an active backend,
//!   and `flow_rebalanced` counts the run if the flow was recorded;
//! - with no active backend left, the run drops (`drop_no_backend`) and
//!   records nothing.
//!
//! Forwarded frames must equal the input as the chosen backend must get
//! it, built whole by etherparse (checksums included).

use std::collections::HashMap;

use lb_common::{
    stat, BACKEND_ACTIVE, BACKEND_DOWN, BACKEND_DRAINING, BACKEND_F_MAC, BACKEND_F_XDP, IPPROTO_TCP,
};
use lb_harness::packets::{
    frame, Rig, BACKENDS, BACKEND_MACS, CLIENT, HOST_MAC, L4, TC_ACT_REDIRECT, TC_ACT_SHOT,
    XDP_DROP, XDP_REDIRECT,
};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::check::Prog;

/// Client ports the packets come from.
const PORTS: u16 = 32;
/// Backends of the service.
const N: usize = 3;

/// What a churn run did.
#[derive(Debug, Default)]
pub struct ChurnReport {
    /// Packets sent (each through both programs).
    pub packets: u64,
    /// Backend state changes.
    pub changes: u64,
    /// Runs that moved a recorded flow to another backend.
    pub rebalanced: u64,
    /// Runs dropped for want of an active backend.
    pub dropped: u64,
}

/// The frame from client port `port` (a SYN or an ACK) to VIP:80, or
/// (`to`) as backend `to` must receive it.
fn segment(port: u16, syn: bool, to: Option<usize>) -> Vec<u8> {
    let (macs, dst, dport) = match to {
        Some(b) => ((BACKEND_MACS[b], HOST_MAC), BACKENDS[b], 8080),
        None => (
            (lb_harness::packets::LB_MAC, lb_harness::packets::CLIENT_MAC),
            lb_harness::packets::VIP,
            80,
        ),
    };
    let l4 = if syn {
        L4::Syn {
            src: port,
            dst: dport,
        }
    } else {
        L4::Ack {
            src: port,
            dst: dport,
        }
    };
    frame(macs, None, CLIENT, dst, l4, &[], &[])
}

fn counters(rig: &Rig) -> Vec<u64> {
    rig.dp
        .maps
        .global_counters()
        .expect("counters readable")
        .into_iter()
        .map(|(_, v)| v)
        .collect()
}

/// Runs `steps` steps (a packet, or now and then a state change) from
/// `seed`; the first broken rule is the error.
pub fn churn(seed: u64, steps: u64) -> Result<ChurnReport, String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let flags = BACKEND_F_XDP | BACKEND_F_MAC;
    let mut rig = Rig::new(4096);
    let mut states = [BACKEND_ACTIVE; N];
    for (id, state) in states.iter().enumerate() {
        rig.backend(id as u32, 0, id, 8080, flags, *state);
    }
    rig.service(0, 80, IPPROTO_TCP, &[0, 1, 2]);
    let mut flows: HashMap<u16, usize> = HashMap::new();
    let mut report = ChurnReport::default();
    for step in 0..steps {
        if rng.random_bool(0.05) {
            let id = rng.random_range(0..N);
            // Active half the time, so flows are often kept and moved.
            states[id] = [
                BACKEND_ACTIVE,
                BACKEND_ACTIVE,
                BACKEND_DRAINING,
                BACKEND_DOWN,
            ][rng.random_range(0..4)];
            rig.backend(id as u32, 0, id, 8080, flags, states[id]);
            let active: Vec<u32> = (0..N)
                .filter(|&b| states[b] == BACKEND_ACTIVE)
                .map(|b| b as u32)
                .collect();
            rig.table(0, &active);
            report.changes += 1;
            continue;
        }
        let port = 40000 + rng.random_range(0..PORTS);
        let syn = rng.random_bool(0.3);
        let input = segment(port, syn, None);
        report.packets += 1;
        for prog in [Prog::Xdp, Prog::Tc] {
            let at = |e: String| {
                format!("step {step}, port {port}, syn {syn}, states {states:?}, {prog}: {e}")
            };
            let recorded = flows.get(&port).copied();
            let stays = recorded
                .filter(|&b| states[b] != BACKEND_DOWN && (!syn || states[b] == BACKEND_ACTIVE));
            let rebalance = recorded.is_some() && stays.is_none();
            let before = counters(&rig);
            let run = match prog {
                Prog::Xdp => rig.xdp(&input),
                Prog::Tc => rig.tc(&input),
            }
            .map_err(|e| at(format!("the test run failed: {e}")))?;
            let after = counters(&rig);
            let (fwd, drop, fwd_counter) = match prog {
                Prog::Xdp => (XDP_REDIRECT, XDP_DROP, stat::FWD_XDP),
                Prog::Tc => (TC_ACT_REDIRECT, TC_ACT_SHOT, stat::FWD_SKB),
            };
            let mut want = vec![0u64; after.len()];
            if rebalance {
                want[stat::FLOW_REBALANCED as usize] = 1;
                report.rebalanced += 1;
            }
            if stays.is_none() && !states.contains(&BACKEND_ACTIVE) {
                if run.action != drop {
                    return Err(at(format!("no active backend, yet action {}", run.action)));
                }
                want[stat::DROP_NO_BACKEND as usize] += 1;
                report.dropped += 1;
            } else {
                if run.action != fwd {
                    return Err(at(format!("expected a forward, got action {}", run.action)));
                }
                let to = (0..N)
                    .find(|&b| run.output == segment(port, syn, Some(b)))
                    .ok_or_else(|| at("the output is no backend's right frame".into()))?;
                match stays {
                    Some(b) if b != to => {
                        return Err(at(format!("the flow moved from backend {b} to {to}")))
                    }
                    None if states[to] != BACKEND_ACTIVE => {
                        return Err(at(format!("picked backend {to}, which takes no new flows")))
                    }
                    _ => {}
                }
                flows.insert(port, to);
                want[fwd_counter as usize] += 1;
            }
            let moved: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
            if moved != want {
                return Err(at(format!("counters moved {moved:?}, expected {want:?}")));
            }
        }
    }
    Ok(report)
}
