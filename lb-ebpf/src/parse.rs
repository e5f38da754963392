//! Ethernet (with at most one 802.1Q tag), IPv4, TCP and UDP parsing.
//!
//! Policy, for anything the balancer does not fully understand: leave it
//! untouched and let the kernel decide (`XDP_PASS` / `TC_ACT_UNSPEC`), counted by
//! [`Skip`] reason. The data path only rewrites packets it parsed completely:
//! - not IPv4 (ARP, IPv6, 802.1ad/QinQ, two VLAN tags): [`Skip::NotIpv4`];
//! - IPv4 that is neither TCP nor UDP: [`Skip::NotL4`];
//! - an IPv4 fragment, first or not (MF set or a fragment offset): the ports of
//!   later fragments are unknown, so no fragment is balanced:
//!   [`Skip::Fragment`];
//! - a frame too short for any header it announces, an IPv4 version other than
//!   4, a header length under 20 bytes, a total length shorter than the header
//!   or longer than the frame, an L4 header cut short: [`Skip::Malformed`].
//!
//! IP options are fine: the L4 header is found from the IHL field, and options
//! are carried through unchanged.

use lb_common::{stat, FlowKey, IPPROTO_TCP, IPPROTO_UDP};

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// 802.1Q tag length.
pub const VLAN_HLEN: usize = 4;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of an 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// Minimum IPv4 header length.
pub const IPV4_MIN_HLEN: usize = 20;
/// Minimum TCP header length.
pub const TCP_HLEN: usize = 20;
/// UDP header length.
pub const UDP_HLEN: usize = 8;
/// Offset of the checksum in the IPv4 header.
pub const IPV4_CHECK_OFF: usize = 10;
/// Offset of the source address in the IPv4 header.
pub const IPV4_SRC_OFF: usize = 12;
/// Offset of the destination address in the IPv4 header.
pub const IPV4_DST_OFF: usize = 16;
/// Offset of the checksum in the TCP header.
pub const TCP_CHECK_OFF: usize = 16;
/// Offset of the flags byte in the TCP header (CWR … FIN).
pub const TCP_FLAGS_OFF: usize = 13;
/// TCP flag bits.
pub const TCP_SYN: u8 = 0x02;
/// TCP flag bits.
pub const TCP_ACK: u8 = 0x10;
/// Offset of the checksum in the UDP header.
pub const UDP_CHECK_OFF: usize = 6;

/// Why a packet is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    /// Not IPv4 behind at most one VLAN tag.
    NotIpv4,
    /// IPv4, but neither TCP nor UDP.
    NotL4,
    /// An IPv4 fragment.
    Fragment,
    /// Too short for its headers, or a header field out of range.
    Malformed,
}

impl Skip {
    /// The global counter for this reason.
    #[inline(always)]
    pub fn stat(self) -> u32 {
        match self {
            Skip::NotIpv4 => stat::PASS_NOT_IPV4,
            Skip::NotL4 => stat::PASS_NOT_L4,
            Skip::Fragment => stat::PASS_FRAGMENT,
            Skip::Malformed => stat::PASS_MALFORMED,
        }
    }
}

/// A TCP or UDP over IPv4 packet, fully parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Offset of the IPv4 header: 14, or 18 behind a VLAN tag.
    pub l3_off: usize,
    /// Offset of the TCP/UDP header.
    pub l4_off: usize,
    /// Whether the frame carries an 802.1Q tag.
    pub vlan: bool,
    /// The tag's TCI, host order (0 when untagged).
    pub vlan_tci: u16,
    /// The 5-tuple, in packet byte order.
    pub key: FlowKey,
    /// A TCP SYN without ACK: a client opening a connection.
    pub opens: bool,
}

impl Parsed {
    /// Offset of the L4 checksum.
    #[inline(always)]
    pub fn l4_check_off(&self) -> usize {
        if self.key.proto == IPPROTO_TCP {
            self.l4_off + TCP_CHECK_OFF
        } else {
            self.l4_off + UDP_CHECK_OFF
        }
    }

    /// The same packet once its in-data 802.1Q tag is removed (the skb path
    /// pops it before the rewrite): the IPv4 and L4 headers sit
    /// [`VLAN_HLEN`] bytes nearer the start. Unchanged without such a tag.
    #[inline(always)]
    pub fn without_tag(self) -> Self {
        if self.l3_off != ETH_HLEN + VLAN_HLEN {
            return self;
        }
        Self {
            l3_off: ETH_HLEN,
            l4_off: self.l4_off - VLAN_HLEN,
            ..self
        }
    }
}

/// Reads a `T` at `offset`, or `None` past `end`.
///
/// Packet data is only 2-byte aligned (a 14-byte Ethernet header). On the
/// host (unit tests) reads are unaligned reads. In BPF they are plain loads:
/// BPF loads have no alignment requirement on packet memory (the verifier
/// enforces none without `BPF_F_STRICT_ALIGNMENT`, and the JITs of x86-64 and
/// arm64 emit ordinary loads), exactly as C programs read `iph->saddr`; an
/// unaligned read would make LLVM split every field into byte loads.
#[inline(always)]
pub fn load<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    let p = crate::ptr_at::<T>(start, end, offset)?;
    // SAFETY: `ptr_at` checked that `size_of::<T>()` bytes at `p` are in the
    // packet; on BPF, packet loads need no alignment (see above).
    #[cfg(target_arch = "bpf")]
    let v = unsafe { p.read() };
    // SAFETY: as above, without any alignment assumption.
    #[cfg(not(target_arch = "bpf"))]
    let v = unsafe { p.read_unaligned() };
    Some(v)
}

/// Writes `v` at `offset`; `false` (and nothing written) past `end`. The
/// same alignment reasoning as [`load`] applies.
#[inline(always)]
pub fn store<T: Copy>(start: usize, end: usize, offset: usize, v: T) -> bool {
    match crate::ptr_at::<T>(start, end, offset) {
        Some(p) => {
            // SAFETY: as in `load`.
            #[cfg(target_arch = "bpf")]
            unsafe {
                p.write(v)
            };
            // SAFETY: as in `load`.
            #[cfg(not(target_arch = "bpf"))]
            unsafe {
                p.write_unaligned(v)
            };
            true
        }
        None => false,
    }
}

/// The IPv4 destination address of an Ethernet (+ one 802.1Q tag) frame,
/// read with as little work as possible: the early filter that lets a
/// packet to no VIP pass without a full parse. `None` when the frame is not
/// IPv4 or too short to tell; [`parse`] then decides and counts why.
#[inline(always)]
pub fn ipv4_dst(start: usize, end: usize) -> Option<u32> {
    let ethertype = u16::from_be(load::<u16>(start, end, 12)?);
    let l3 = if ethertype == ETH_P_IP {
        ETH_HLEN
    } else if ethertype == ETH_P_8021Q
        && u16::from_be(load::<u16>(start, end, ETH_HLEN + 2)?) == ETH_P_IP
    {
        ETH_HLEN + VLAN_HLEN
    } else {
        return None;
    };
    load::<u32>(start, end, l3 + IPV4_DST_OFF)
}

/// Parses the frame whose first bytes are readable in `[start, end)` and
/// whose whole length is `frame_len`. They differ on the skb path, where the
/// payload may sit in page fragments past the linear part (`frame_len` is
/// then `skb->len`); in XDP both are the same.
#[inline(always)]
pub fn parse(start: usize, end: usize, frame_len: usize) -> Result<Parsed, Skip> {
    let ethertype = u16::from_be(load::<u16>(start, end, 12).ok_or(Skip::Malformed)?);
    let (l3_off, vlan, vlan_tci) = if ethertype == ETH_P_IP {
        (ETH_HLEN, false, 0)
    } else if ethertype == ETH_P_8021Q {
        let tci = u16::from_be(load::<u16>(start, end, ETH_HLEN).ok_or(Skip::Malformed)?);
        let inner = u16::from_be(load::<u16>(start, end, ETH_HLEN + 2).ok_or(Skip::Malformed)?);
        if inner != ETH_P_IP {
            return Err(Skip::NotIpv4);
        }
        (ETH_HLEN + VLAN_HLEN, true, tci)
    } else {
        return Err(Skip::NotIpv4);
    };

    // The whole fixed header must be there before any field is trusted.
    load::<[u8; IPV4_MIN_HLEN]>(start, end, l3_off).ok_or(Skip::Malformed)?;
    let vihl = load::<u8>(start, end, l3_off).ok_or(Skip::Malformed)?;
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < IPV4_MIN_HLEN {
        return Err(Skip::Malformed);
    }
    let tot_len = usize::from(u16::from_be(
        load::<u16>(start, end, l3_off + 2).ok_or(Skip::Malformed)?,
    ));
    if tot_len < ihl || l3_off + tot_len > frame_len {
        return Err(Skip::Malformed);
    }
    let proto = load::<u8>(start, end, l3_off + 9).ok_or(Skip::Malformed)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Err(Skip::NotL4);
    }
    let frag = u16::from_be(load::<u16>(start, end, l3_off + 6).ok_or(Skip::Malformed)?);
    if frag & 0x3fff != 0 {
        return Err(Skip::Fragment);
    }

    let l4_off = l3_off + ihl;
    let l4_len = if proto == IPPROTO_TCP {
        TCP_HLEN
    } else {
        UDP_HLEN
    };
    if ihl + l4_len > tot_len {
        return Err(Skip::Malformed);
    }
    let src_port = load::<u16>(start, end, l4_off).ok_or(Skip::Malformed)?;
    let dst_port = load::<u16>(start, end, l4_off + 2).ok_or(Skip::Malformed)?;
    // The checksum is the last field the rewrite touches.
    let check_off = if proto == IPPROTO_TCP {
        TCP_CHECK_OFF
    } else {
        UDP_CHECK_OFF
    };
    load::<u16>(start, end, l4_off + check_off).ok_or(Skip::Malformed)?;
    let opens = proto == IPPROTO_TCP && {
        let flags = load::<u8>(start, end, l4_off + TCP_FLAGS_OFF).ok_or(Skip::Malformed)?;
        flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    };

    Ok(Parsed {
        l3_off,
        l4_off,
        vlan,
        vlan_tci,
        key: FlowKey {
            src_addr: load::<u32>(start, end, l3_off + IPV4_SRC_OFF).ok_or(Skip::Malformed)?,
            dst_addr: load::<u32>(start, end, l3_off + IPV4_DST_OFF).ok_or(Skip::Malformed)?,
            src_port,
            dst_port,
            proto,
            _pad1: 0,
            _pad2: 0,
        },
        opens,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use etherparse::PacketBuilder;

    use super::*;

    pub const CLIENT: [u8; 4] = [198, 18, 100, 2];
    pub const VIP: [u8; 4] = [198, 18, 101, 1];
    pub const MAC_A: [u8; 6] = [2, 0, 0, 0, 0, 0xa];
    pub const MAC_B: [u8; 6] = [2, 0, 0, 0, 0, 0xb];

    pub fn tcp_syn(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(CLIENT, VIP, 64)
            .tcp(40000, 80, 1, 65535)
            .syn();
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    pub fn udp(payload: &[u8]) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(CLIENT, VIP, 64)
            .udp(40000, 53);
        let mut v = Vec::new();
        b.write(&mut v, payload).unwrap();
        v
    }

    pub fn run(buf: &[u8]) -> Result<Parsed, Skip> {
        let start = buf.as_ptr() as usize;
        parse(start, start + buf.len(), buf.len())
    }

    #[test]
    fn tcp_five_tuple() {
        let p = run(&tcp_syn(b"")).unwrap();
        assert_eq!(p.l3_off, 14);
        assert_eq!(p.l4_off, 34);
        assert!(!p.vlan);
        assert_eq!(p.key.src_addr.to_ne_bytes(), CLIENT);
        assert_eq!(p.key.dst_addr.to_ne_bytes(), VIP);
        assert_eq!(u16::from_be(p.key.src_port), 40000);
        assert_eq!(u16::from_be(p.key.dst_port), 80);
        assert_eq!(p.key.proto, IPPROTO_TCP);
        assert_eq!(p.l4_check_off(), 34 + 16);
    }

    #[test]
    fn udp_five_tuple() {
        let p = run(&udp(b"hello")).unwrap();
        assert_eq!(p.key.proto, IPPROTO_UDP);
        assert_eq!(u16::from_be(p.key.dst_port), 53);
        assert_eq!(p.l4_check_off(), 34 + 6);
        assert!(!p.opens, "UDP opens nothing");
    }

    #[test]
    fn only_a_syn_without_ack_opens_a_connection() {
        assert!(run(&tcp_syn(b"")).unwrap().opens);
        for (syn, ack, rst) in [
            (true, true, false),
            (false, true, false),
            (false, false, true),
        ] {
            let mut b = PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(CLIENT, VIP, 64)
                .tcp(40000, 80, 1, 65535);
            if syn {
                b = b.syn();
            }
            if ack {
                b = b.ack(7);
            }
            if rst {
                b = b.rst();
            }
            let mut v = Vec::new();
            b.write(&mut v, b"").unwrap();
            assert!(!run(&v).unwrap().opens, "syn {syn} ack {ack} rst {rst}");
        }
    }

    #[test]
    fn one_vlan_tag() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .single_vlan(etherparse::VlanId::try_new(42).unwrap())
            .ipv4(CLIENT, VIP, 64)
            .tcp(40000, 80, 1, 65535);
        let mut v = Vec::new();
        b.write(&mut v, b"").unwrap();
        let p = run(&v).unwrap();
        assert!(p.vlan);
        assert_eq!(p.vlan_tci & 0x0fff, 42);
        assert_eq!(p.l3_off, 18);
        assert_eq!(p.l4_off, 38);

        // Without the tag, the offsets are those of the untagged frame.
        let mut untagged = v.clone();
        untagged.drain(12..16);
        let q = run(&untagged).unwrap();
        let moved = p.without_tag();
        assert_eq!((moved.l3_off, moved.l4_off), (q.l3_off, q.l4_off));
        assert_eq!(moved.l4_check_off(), q.l4_check_off());
        assert_eq!(
            (moved.key, moved.vlan, moved.vlan_tci),
            (p.key, true, p.vlan_tci)
        );
        assert_eq!(q.without_tag(), q, "no tag, nothing moves");
    }

    #[test]
    fn two_vlan_tags_are_not_ours() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .double_vlan(
                etherparse::VlanId::try_new(1).unwrap(),
                etherparse::VlanId::try_new(2).unwrap(),
            )
            .ipv4(CLIENT, VIP, 64)
            .tcp(40000, 80, 1, 65535);
        let mut v = Vec::new();
        b.write(&mut v, b"").unwrap();
        assert_eq!(run(&v), Err(Skip::NotIpv4));
    }

    #[test]
    fn ipv6_and_arp_are_not_ours() {
        let mut v = tcp_syn(b"");
        v[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
        assert_eq!(run(&v), Err(Skip::NotIpv4));
        v[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(run(&v), Err(Skip::NotIpv4));
    }

    #[test]
    fn icmp_is_not_l4() {
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .ipv4(CLIENT, VIP, 64)
            .icmpv4_echo_request(1, 1);
        let mut v = Vec::new();
        b.write(&mut v, b"ping").unwrap();
        assert_eq!(run(&v), Err(Skip::NotL4));
    }

    #[test]
    fn fragments_are_skipped() {
        // MF set (first fragment) and an offset (later fragment).
        for frag in [0x2000u16, 0x0010, 0x2010] {
            let mut v = udp(b"hello");
            v[20..22].copy_from_slice(&frag.to_be_bytes());
            assert_eq!(run(&v), Err(Skip::Fragment), "frag field {frag:#x}");
        }
        // DF alone is not a fragment.
        let mut v = udp(b"hello");
        v[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
        assert!(run(&v).is_ok());
    }

    #[test]
    fn ip_options_move_the_l4_header() {
        let mut v = tcp_syn(b"");
        // Insert 8 bytes of options (two NOPs, then end-of-list padding).
        let opts = [1u8, 1, 0, 0, 0, 0, 0, 0];
        v.splice(34..34, opts);
        v[14] = 0x47;
        let tot = u16::from_be_bytes([v[16], v[17]]) + 8;
        v[16..18].copy_from_slice(&tot.to_be_bytes());
        let p = run(&v).unwrap();
        assert_eq!(p.l4_off, 42);
        assert_eq!(u16::from_be(p.key.dst_port), 80);
    }

    #[test]
    fn bad_header_fields_are_malformed() {
        let good = tcp_syn(b"");
        let cases: [(usize, u8); 4] = [
            (14, 0x44), // IHL 4
            (14, 0x65), // version 6 under an IPv4 ethertype
            (16, 0xff), // total length past the frame
            (17, 0x10), // total length 16 < IHL*4 (with byte 16 = 0)
        ];
        for (off, val) in cases {
            let mut v = good.clone();
            if off == 17 {
                v[16] = 0;
            }
            v[off] = val;
            assert_eq!(run(&v), Err(Skip::Malformed), "byte {off} = {val:#x}");
        }
    }

    #[test]
    fn ipv4_dst_reads_just_the_address() {
        let f = tcp_syn(b"");
        let start = f.as_ptr() as usize;
        assert_eq!(
            ipv4_dst(start, start + f.len()),
            Some(u32::from_ne_bytes(VIP))
        );
        assert_eq!(
            ipv4_dst(start, start + 33),
            None,
            "cut before the address ends"
        );
        let mut arp = f.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(ipv4_dst(start_of(&arp), start_of(&arp) + arp.len()), None);
        let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
            .single_vlan(etherparse::VlanId::try_new(5).unwrap())
            .ipv4(CLIENT, VIP, 64)
            .udp(1, 2);
        let mut v = Vec::new();
        b.write(&mut v, b"").unwrap();
        assert_eq!(
            ipv4_dst(start_of(&v), start_of(&v) + v.len()),
            Some(u32::from_ne_bytes(VIP))
        );
    }

    fn start_of(v: &[u8]) -> usize {
        v.as_ptr() as usize
    }

    #[test]
    fn every_truncation_is_defined() {
        let full = tcp_syn(b"");
        for len in 0..full.len() {
            let r = run(&full[..len]);
            assert_eq!(r, Err(Skip::Malformed), "length {len}");
        }
        assert!(run(&full).is_ok());
        // On the skb path only the headers may be readable: fine, as long
        // as the whole frame is long enough.
        let start = full.as_ptr() as usize;
        assert!(parse(start, start + 54, full.len()).is_ok());
        assert_eq!(parse(start, start + 54, 53), Err(Skip::Malformed));
        assert_eq!(parse(start, start + 40, full.len()), Err(Skip::Malformed));
        // Ethernet padding after the IP packet is fine.
        let mut padded = udp(b"");
        padded.resize(60, 0);
        assert!(run(&padded).is_ok());
    }
}
