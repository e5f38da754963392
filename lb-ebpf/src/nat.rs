//! In-place address and port rewrite with incremental checksum updates, for
//! the XDP path. (The TC path uses the kernel's `bpf_l3/l4_csum_replace`
//! instead, which also handle `CHECKSUM_PARTIAL` skbs.)
//!
//! An incremental update keeps a wrong checksum wrong, so a corrupted packet
//! is still dropped by its receiver instead of being "repaired" here.

use lb_common::IPPROTO_UDP;

use crate::{
    csum,
    parse::{load, store, Parsed, IPV4_CHECK_OFF, IPV4_DST_OFF, IPV4_SRC_OFF},
};

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Destination address and port (DNAT, client to backend).
    Dst,
    /// Source address and port (reverse NAT, backend to client).
    Src,
}

/// Rewrites one side's address and port (both in packet byte order) and
/// updates the IPv4 and L4 checksums. Returns `false`, with the packet
/// unchanged, if a field lies past `end` (which [`crate::parse::parse`]
/// already ruled out).
#[inline(always)]
pub fn rewrite(start: usize, end: usize, p: &Parsed, side: Side, addr: u32, port: u16) -> bool {
    let (addr_off, port_off) = match side {
        Side::Dst => (p.l3_off + IPV4_DST_OFF, p.l4_off + 2),
        Side::Src => (p.l3_off + IPV4_SRC_OFF, p.l4_off),
    };
    let ip_check_off = p.l3_off + IPV4_CHECK_OFF;
    let l4_check_off = p.l4_check_off();
    let (Some(old_addr), Some(old_port), Some(ip_check), Some(l4_check)) = (
        load::<u32>(start, end, addr_off),
        load::<u16>(start, end, port_off),
        load::<u16>(start, end, ip_check_off),
        load::<u16>(start, end, l4_check_off),
    ) else {
        return false;
    };

    // UDP checksum 0 means "none" (RFC 768): keep it so.
    let l4_check = if p.key.proto == IPPROTO_UDP && l4_check == 0 {
        0
    } else {
        let c = csum::replace16(csum::replace32(l4_check, old_addr, addr), old_port, port);
        // A computed UDP checksum of 0 is sent as all ones.
        if p.key.proto == IPPROTO_UDP && c == 0 {
            0xffff
        } else {
            c
        }
    };
    store(
        start,
        end,
        ip_check_off,
        csum::replace32(ip_check, old_addr, addr),
    ) && store(start, end, addr_off, addr)
        && store(start, end, port_off, port)
        && store(start, end, l4_check_off, l4_check)
}

/// Writes the Ethernet destination and source MACs.
#[inline(always)]
pub fn set_macs(start: usize, end: usize, dst: &[u8; 6], src: &[u8; 6]) -> bool {
    store(start, end, 0, *dst) && store(start, end, 6, *src)
}

#[cfg(test)]
mod tests {
    use etherparse::{Ipv4Header, SlicedPacket, TransportSlice};

    use super::*;
    use crate::parse::{
        parse,
        tests::{tcp_syn, udp},
    };

    const BACKEND: [u8; 4] = [198, 18, 103, 2];

    /// Recomputes both checksums from scratch with etherparse, an
    /// implementation independent of ours, and compares with the packet's.
    fn assert_checksums_valid(frame: &[u8]) {
        let sliced = SlicedPacket::from_ethernet(frame).expect("parses");
        let Some(etherparse::NetSlice::Ipv4(ip)) = sliced.net else {
            panic!("not IPv4")
        };
        let hdr: Ipv4Header = ip.header().to_header();
        assert_eq!(
            hdr.header_checksum,
            hdr.calc_header_checksum(),
            "IPv4 header checksum"
        );
        match sliced.transport {
            Some(TransportSlice::Tcp(t)) => {
                let want = t.to_header().calc_checksum_ipv4(&hdr, t.payload()).unwrap();
                assert_eq!(t.checksum(), want, "TCP checksum");
            }
            Some(TransportSlice::Udp(u)) => {
                if u.checksum() != 0 {
                    let want = u.to_header().calc_checksum_ipv4(&hdr, u.payload()).unwrap();
                    assert_eq!(u.checksum(), want, "UDP checksum");
                }
            }
            _ => panic!("no transport"),
        }
    }

    fn dnat(frame: &mut [u8], addr: [u8; 4], port: u16) {
        let start = frame.as_mut_ptr() as usize;
        let end = start + frame.len();
        let p = parse(start, end, end - start).unwrap();
        assert!(rewrite(
            start,
            end,
            &p,
            Side::Dst,
            u32::from_ne_bytes(addr),
            port.to_be()
        ));
    }

    #[test]
    fn dnat_tcp_keeps_checksums_valid() {
        for payload in [&b""[..], b"GET / HTTP/1.0\r\n\r\n", b"x"] {
            let mut f = tcp_syn(payload);
            assert_checksums_valid(&f);
            dnat(&mut f, BACKEND, 8080);
            assert_checksums_valid(&f);
            assert_eq!(&f[30..34], &BACKEND);
            assert_eq!(u16::from_be_bytes([f[36], f[37]]), 8080);
        }
    }

    #[test]
    fn dnat_then_snat_restores_the_original() {
        let orig = tcp_syn(b"data");
        let mut f = orig.clone();
        dnat(&mut f, BACKEND, 8080);
        dnat(&mut f, [198, 18, 101, 1], 80);
        assert_eq!(f, orig);
    }

    #[test]
    fn snat_rewrites_the_source() {
        let mut f = udp(b"pong");
        let start = f.as_mut_ptr() as usize;
        let end = start + f.len();
        let p = parse(start, end, end - start).unwrap();
        assert!(rewrite(
            start,
            end,
            &p,
            Side::Src,
            u32::from_ne_bytes(BACKEND),
            9999u16.to_be()
        ));
        assert_eq!(&f[26..30], &BACKEND);
        assert_eq!(u16::from_be_bytes([f[34], f[35]]), 9999);
        assert_checksums_valid(&f);
    }

    #[test]
    fn udp_without_checksum_stays_without() {
        let mut f = udp(b"hello");
        f[40] = 0;
        f[41] = 0;
        dnat(&mut f, BACKEND, 5353);
        assert_eq!(&f[40..42], &[0, 0]);
        assert_checksums_valid(&f);
    }

    #[test]
    fn udp_checksums_stay_valid_for_many_targets() {
        for last in 0..=255u8 {
            for port in [1u16, 53, 8080, 65535] {
                let mut f = udp(b"payload");
                dnat(&mut f, [198, 19, 7, last], port);
                assert_checksums_valid(&f);
                assert_ne!(&f[40..42], &[0, 0], "computed zero must be sent as 0xffff");
            }
        }
    }

    #[test]
    fn macs_are_written() {
        let mut f = tcp_syn(b"");
        let start = f.as_mut_ptr() as usize;
        assert!(set_macs(start, start + f.len(), &[1; 6], &[2; 6]));
        assert_eq!(&f[0..6], &[1; 6]);
        assert_eq!(&f[6..12], &[2; 6]);
        assert!(!set_macs(start, start + 11, &[1; 6], &[2; 6]));
    }
}
