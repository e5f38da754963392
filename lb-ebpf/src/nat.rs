//! Address and port rewrite of one side of a packet, planned once by
//! [`Rewrite::new`] and carried out two ways:
//! - on XDP, in place with incremental checksum updates ([`rewrite`]);
//! - on the skb path, with the kernel's `bpf_l3_csum_replace` /
//!   `bpf_l4_csum_replace` (which also handle `CHECKSUM_PARTIAL` skbs) and
//!   stores, at the same offsets and with the flags given here.
//!
//! An incremental update keeps a wrong checksum wrong, so a corrupted packet
//! is still dropped by its receiver instead of being "repaired" here.

use lb_common::IPPROTO_UDP;

use crate::{
    csum,
    parse::{load, store, Parsed, IPV4_CHECK_OFF, IPV4_DST_OFF, IPV4_SRC_OFF},
};

/// `BPF_F_PSEUDO_HDR`: the changed field is part of the L4 pseudo-header.
pub const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `BPF_F_MARK_MANGLED_0`: keep a zero UDP checksum zero, send a computed
/// zero as all ones.
pub const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;
/// `bpf_l3_csum_replace` flags for an IPv4 address: a 4-byte field.
pub const L3_ADDR_FLAGS: u64 = 4;

/// Which end of the packet to rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    /// Destination address and port (DNAT, client to backend).
    Dst,
    /// Source address and port (reverse NAT, backend to client).
    Src,
}

/// One side's rewrite: the offsets of the fields and checksums it touches,
/// and their old and new values (addresses and ports in packet byte order).
/// The one offset table of both the XDP and the skb rewrite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// Offset of the address.
    pub addr_off: usize,
    /// Offset of the port.
    pub port_off: usize,
    /// Offset of the IPv4 header checksum.
    pub ip_check_off: usize,
    /// Offset of the TCP or UDP checksum.
    pub l4_check_off: usize,
    /// The address now in the packet.
    pub old_addr: u32,
    /// The port now in the packet.
    pub old_port: u16,
    /// The address to write.
    pub addr: u32,
    /// The port to write.
    pub port: u16,
    /// UDP, whose checksum 0 means "none" (RFC 768).
    pub udp: bool,
}

impl Rewrite {
    /// Plans the rewrite of `side` of the parsed packet `p` to `addr` and
    /// `port`.
    #[inline(always)]
    pub fn new(p: &Parsed, side: Side, addr: u32, port: u16) -> Self {
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
        Self {
            addr_off,
            port_off,
            ip_check_off: p.l3_off + IPV4_CHECK_OFF,
            l4_check_off: p.l4_check_off(),
            old_addr,
            old_port,
            addr,
            port,
            udp: p.key.proto == IPPROTO_UDP,
        }
    }

    /// `BPF_F_MARK_MANGLED_0` for UDP, so the helpers keep "no checksum".
    #[inline(always)]
    fn mangled_0(&self) -> u64 {
        if self.udp {
            BPF_F_MARK_MANGLED_0
        } else {
            0
        }
    }

    /// `bpf_l4_csum_replace` flags for the address: a 4-byte field of the
    /// pseudo-header.
    #[inline(always)]
    pub fn l4_addr_flags(&self) -> u64 {
        BPF_F_PSEUDO_HDR | self.mangled_0() | 4
    }

    /// `bpf_l4_csum_replace` flags for the port: a 2-byte field.
    #[inline(always)]
    pub fn l4_port_flags(&self) -> u64 {
        self.mangled_0() | 2
    }
}

/// Carries out `rw` in place on `[start, end)`, updating the IPv4 and L4
/// checksums incrementally. Returns `false`, with the packet unchanged, if a
/// field lies past `end` (which [`crate::parse::parse`] already ruled out).
#[inline(always)]
pub fn rewrite(start: usize, end: usize, rw: &Rewrite) -> bool {
    let (Some(ip_check), Some(l4_check)) = (
        load::<u16>(start, end, rw.ip_check_off),
        load::<u16>(start, end, rw.l4_check_off),
    ) else {
        return false;
    };
    // Every field must be in the packet before any is written.
    if crate::ptr_at::<u32>(start, end, rw.addr_off).is_none()
        || crate::ptr_at::<u16>(start, end, rw.port_off).is_none()
    {
        return false;
    }

    // UDP checksum 0 means "none" (RFC 768): keep it so.
    let l4_check = if rw.udp && l4_check == 0 {
        0
    } else {
        let c = csum::replace16(
            csum::replace32(l4_check, rw.old_addr, rw.addr),
            rw.old_port,
            rw.port,
        );
        // A computed UDP checksum of 0 is sent as all ones.
        if rw.udp && c == 0 {
            0xffff
        } else {
            c
        }
    };
    store(
        start,
        end,
        rw.ip_check_off,
        csum::replace32(ip_check, rw.old_addr, rw.addr),
    ) && store(start, end, rw.addr_off, rw.addr)
        && store(start, end, rw.port_off, rw.port)
        && store(start, end, rw.l4_check_off, l4_check)
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
        let rw = Rewrite::new(&p, Side::Dst, u32::from_ne_bytes(addr), port.to_be());
        assert!(rewrite(start, end, &rw));
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
        let rw = Rewrite::new(&p, Side::Src, u32::from_ne_bytes(BACKEND), 9999u16.to_be());
        assert!(rewrite(start, end, &rw));
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
    fn the_plan_names_each_sides_fields() {
        let f = tcp_syn(b"");
        let start = f.as_ptr() as usize;
        let p = parse(start, start + f.len(), f.len()).unwrap();
        let dst = Rewrite::new(&p, Side::Dst, 1, 2);
        assert_eq!((dst.addr_off, dst.port_off), (30, 36));
        assert_eq!(
            (dst.old_addr, dst.old_port),
            (p.key.dst_addr, p.key.dst_port)
        );
        let src = Rewrite::new(&p, Side::Src, 1, 2);
        assert_eq!((src.addr_off, src.port_off), (26, 34));
        assert_eq!(
            (src.old_addr, src.old_port),
            (p.key.src_addr, p.key.src_port)
        );
        for rw in [dst, src] {
            assert_eq!((rw.ip_check_off, rw.l4_check_off), (24, 50));
            assert!(!rw.udp);
            assert_eq!(rw.l4_addr_flags(), BPF_F_PSEUDO_HDR | 4);
            assert_eq!(rw.l4_port_flags(), 2);
        }
        let u = udp(b"");
        let p = parse(start_of(&u), start_of(&u) + u.len(), u.len()).unwrap();
        let rw = Rewrite::new(&p, Side::Dst, 1, 2);
        assert_eq!(rw.l4_check_off, 40);
        assert!(rw.udp);
        assert_eq!(
            rw.l4_addr_flags(),
            BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0 | 4
        );
        assert_eq!(rw.l4_port_flags(), BPF_F_MARK_MANGLED_0 | 2);
    }

    fn start_of(v: &[u8]) -> usize {
        v.as_ptr() as usize
    }

    fn ne16(f: &[u8], off: usize) -> u16 {
        u16::from_ne_bytes([f[off], f[off + 1]])
    }

    /// What the kernel's `bpf_l4_csum_replace` does to a complete checksum
    /// (`inet_proto_csum_replace4/2`, with `BPF_F_MARK_MANGLED_0`); a
    /// `bpf_l3_csum_replace` is the same without the UDP rule.
    fn csum_replace(f: &mut [u8], off: usize, from: u32, to: u32, flags: u64) {
        let check = ne16(f, off);
        let mangled_0 = flags & BPF_F_MARK_MANGLED_0 != 0;
        if mangled_0 && check == 0 {
            return;
        }
        let mut c = match flags & 0xf {
            4 => csum::replace32(check, from, to),
            2 => csum::replace16(check, from as u16, to as u16),
            size => panic!("field size {size}"),
        };
        if mangled_0 && c == 0 {
            c = 0xffff;
        }
        f[off..off + 2].copy_from_slice(&c.to_ne_bytes());
    }

    /// The skb path's rewrite as `lb_tc` makes it: the kernel's checksum
    /// helpers, then stores, all from the plan.
    fn skb_rewrite(f: &mut [u8], rw: &Rewrite) {
        csum_replace(f, rw.l4_check_off, rw.old_addr, rw.addr, rw.l4_addr_flags());
        csum_replace(
            f,
            rw.l4_check_off,
            u32::from(rw.old_port),
            u32::from(rw.port),
            rw.l4_port_flags(),
        );
        csum_replace(f, rw.ip_check_off, rw.old_addr, rw.addr, L3_ADDR_FLAGS);
        f[rw.addr_off..rw.addr_off + 4].copy_from_slice(&rw.addr.to_ne_bytes());
        f[rw.port_off..rw.port_off + 2].copy_from_slice(&rw.port.to_ne_bytes());
    }

    #[test]
    fn skb_and_xdp_rewrites_of_one_plan_agree() {
        let mut no_udp_check = udp(b"x");
        no_udp_check[40..42].copy_from_slice(&[0, 0]);
        let mut frames = vec![tcp_syn(b""), tcp_syn(b"data"), udp(b"q"), no_udp_check];
        // A VLAN-tagged frame: every offset moves by the tag.
        let mut tagged = Vec::new();
        etherparse::PacketBuilder::ethernet2([1; 6], [2; 6])
            .single_vlan(etherparse::VlanId::try_new(42).unwrap())
            .ipv4([198, 18, 100, 2], [198, 18, 101, 1], 64)
            .udp(40000, 53)
            .write(&mut tagged, b"q")
            .unwrap();
        frames.push(tagged);
        for f in frames {
            for side in [Side::Dst, Side::Src] {
                for last in 0..=255u8 {
                    let mut xdp = f.clone();
                    let start = xdp.as_mut_ptr() as usize;
                    let p = parse(start, start + xdp.len(), xdp.len()).unwrap();
                    let rw = Rewrite::new(
                        &p,
                        side,
                        u32::from_ne_bytes([198, 19, 7, last]),
                        (u16::from(last) * 257).to_be(),
                    );
                    assert!(rewrite(start, start + xdp.len(), &rw));
                    let mut skb = f.clone();
                    skb_rewrite(&mut skb, &rw);
                    assert_eq!(skb, xdp, "{side:?} to .{last}");
                    assert_checksums_valid(&skb);
                }
            }
        }
    }

    #[test]
    fn rewrite_checks_every_field_against_the_end() {
        let f = tcp_syn(b"");
        let start = start_of(&f);
        let p = parse(start, start + f.len(), f.len()).unwrap();
        let rw = Rewrite::new(&p, Side::Dst, 1, 2);
        let mut cut = f.clone();
        let start = cut.as_mut_ptr() as usize;
        for end in [rw.addr_off + 3, rw.port_off + 1, rw.l4_check_off + 1] {
            assert!(!rewrite(start, start + end, &rw), "end {end}");
        }
        assert_eq!(cut, f, "nothing written");
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
