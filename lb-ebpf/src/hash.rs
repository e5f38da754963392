//! The flow hash that picks a Maglev slot for a new flow.

use lb_common::{fmix32, FlowKey};

/// Hashes a flow's 5-tuple. Deterministic across CPUs and restarts, so a
/// flow that lost its table entry lands on the same backend while the
/// Maglev table is unchanged.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let ports = (u32::from(key.src_port) << 16) | u32::from(key.dst_port);
    let mut h = fmix32(key.src_addr ^ 0x9e37_79b9);
    h = fmix32(h ^ key.dst_addr);
    h = fmix32(h ^ ports);
    fmix32(h ^ u32::from(key.proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src_port: u16) -> FlowKey {
        FlowKey {
            src_addr: u32::from_ne_bytes([198, 18, 100, 2]),
            dst_addr: u32::from_ne_bytes([198, 18, 101, 1]),
            src_port: src_port.to_be(),
            dst_port: 80u16.to_be(),
            proto: 6,
            _pad1: 0,
            _pad2: 0,
        }
    }

    #[test]
    fn deterministic() {
        assert_eq!(flow_hash(&key(40000)), flow_hash(&key(40000)));
        assert_ne!(flow_hash(&key(40000)), flow_hash(&key(40001)));
    }

    #[test]
    fn source_ports_spread_evenly_over_slots() {
        // 30,000 consecutive client ports over 3 buckets: each within 3% of a third.
        let mut buckets = [0u32; 3];
        for p in 20_000..50_000u16 {
            buckets[(flow_hash(&key(p)) % 65_537 % 3) as usize] += 1;
        }
        for b in buckets {
            assert!((9_700..=10_300).contains(&b), "uneven spread {buckets:?}");
        }
    }
}
