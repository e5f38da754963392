//! Frames, read and written here independently of the data path's code:
//! a from-scratch Internet checksum (RFC 1071, whole headers summed, where
//! the data path updates incrementally), builders for the frames the
//! generator starts from, and a reference classifier that says, from the
//! data path's documented rules alone, what each frame is.

/// EtherType of IPv4.
pub const ETH_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_IPV6: u16 = 0x86dd;
/// EtherType of an 802.1Q tag.
pub const ETH_8021Q: u16 = 0x8100;
/// EtherType of an 802.1ad (QinQ outer) tag.
pub const ETH_8021AD: u16 = 0x88a8;
/// EtherType of ARP.
pub const ETH_ARP: u16 = 0x0806;
/// IP protocol of TCP.
pub const TCP: u8 = 6;
/// IP protocol of UDP.
pub const UDP: u8 = 17;

/// Reads a big-endian `u16` at `off`.
pub fn be16(f: &[u8], off: usize) -> u16 {
    u16::from_be_bytes([f[off], f[off + 1]])
}

/// Writes a big-endian `u16` at `off`.
pub fn put16(f: &mut [u8], off: usize, v: u16) {
    f[off..off + 2].copy_from_slice(&v.to_be_bytes());
}

/// The one's complement sum of `parts`, concatenated, as big-endian words
/// (an odd last byte padded with zero), folded to 16 bits, with `0xffff`
/// (one's complement minus zero) written as 0. A header or segment whose
/// checksum is right sums to 0.
pub fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut sum = 0u64;
    let mut odd: Option<u8> = None;
    for part in parts {
        for &b in *part {
            match odd.take() {
                Some(hi) => sum += u64::from(u16::from_be_bytes([hi, b])),
                None => odd = Some(b),
            }
        }
    }
    if let Some(hi) = odd {
        sum += u64::from(u16::from_be_bytes([hi, 0]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    if sum == 0xffff {
        0
    } else {
        sum as u16
    }
}

/// The checksum to store in `parts`, whose checksum field is still zero.
fn checksum_of(parts: &[&[u8]]) -> u16 {
    !ones_sum(parts)
}

/// An IPv4 TCP/UDP frame, as the reference reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Frame {
    /// Offset of the IPv4 header (14, or 18 behind one 802.1Q tag).
    pub l3: usize,
    /// IPv4 header length in bytes.
    pub ihl: usize,
    /// IPv4 total length.
    pub tot_len: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// [`TCP`] or [`UDP`].
    pub proto: u8,
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// Source port.
    pub sport: u16,
    /// Destination port.
    pub dport: u16,
}

impl Ipv4Frame {
    /// Whether the frame carries its 802.1Q tag in the data.
    pub fn tagged(&self) -> bool {
        self.l3 == 18
    }

    /// Offset of the L4 checksum.
    pub fn l4_check(&self) -> usize {
        self.l4 + if self.proto == TCP { 16 } else { 6 }
    }

    /// The sum of the IPv4 header of `f` (0 when its checksum is right).
    pub fn ip_sum(&self, f: &[u8]) -> u16 {
        ones_sum(&[&f[self.l3..self.l3 + self.ihl]])
    }

    /// The sum of the TCP/UDP pseudo-header and segment of `f` (0 when its
    /// checksum is right). The segment ends where the IPv4 total length
    /// says; Ethernet padding after it is not covered.
    pub fn l4_sum(&self, f: &[u8]) -> u16 {
        let len = (self.tot_len - self.ihl) as u16;
        let pseudo = [
            &f[self.l3 + 12..self.l3 + 20],
            &[0, self.proto],
            &len.to_be_bytes()[..],
        ]
        .concat();
        ones_sum(&[&pseudo, &f[self.l4..self.l3 + self.tot_len]])
    }
}

/// What a frame is, by the data path's documented parsing rules
/// (`lb-ebpf/src/parse.rs`), read here with plain slice indexing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Not IPv4 behind at most one 802.1Q tag.
    NotIpv4,
    /// IPv4, neither TCP nor UDP.
    NotL4,
    /// An IPv4 fragment.
    Fragment,
    /// Too short for a header it announces, or a header field out of range.
    Malformed,
    /// A whole TCP or UDP over IPv4 frame.
    Ipv4(Ipv4Frame),
}

/// The reference classifier. Checks in the documented order: the
/// Ethernet header and tag, the whole fixed IPv4 header, version and IHL,
/// total length (at least the header, at most the frame), protocol,
/// fragment bits, then the L4 header within the total length.
pub fn classify(f: &[u8]) -> Class {
    if f.len() < 14 {
        return Class::Malformed;
    }
    let l3 = match be16(f, 12) {
        ETH_IPV4 => 14,
        ETH_8021Q => {
            if f.len() < 18 {
                return Class::Malformed;
            }
            if be16(f, 16) != ETH_IPV4 {
                return Class::NotIpv4;
            }
            18
        }
        _ => return Class::NotIpv4,
    };
    if f.len() < l3 + 20 {
        return Class::Malformed;
    }
    let version = f[l3] >> 4;
    let ihl = usize::from(f[l3] & 0x0f) * 4;
    if version != 4 || ihl < 20 {
        return Class::Malformed;
    }
    let tot_len = usize::from(be16(f, l3 + 2));
    if tot_len < ihl || l3 + tot_len > f.len() {
        return Class::Malformed;
    }
    let proto = f[l3 + 9];
    if proto != TCP && proto != UDP {
        return Class::NotL4;
    }
    if be16(f, l3 + 6) & 0x3fff != 0 {
        return Class::Fragment;
    }
    let l4_min = if proto == TCP { 20 } else { 8 };
    if ihl + l4_min > tot_len {
        return Class::Malformed;
    }
    let l4 = l3 + ihl;
    Class::Ipv4(Ipv4Frame {
        l3,
        ihl,
        tot_len,
        l4,
        proto,
        src: f[l3 + 12..l3 + 16].try_into().expect("4 bytes"),
        dst: f[l3 + 16..l3 + 20].try_into().expect("4 bytes"),
        sport: be16(f, l4),
        dport: be16(f, l4 + 2),
    })
}

/// The IPv4 destination the XDP program's early filter reads before any
/// other check: behind an IPv4 EtherType, or one 802.1Q tag over IPv4,
/// when the frame reaches that far.
pub fn early_dst(f: &[u8]) -> Option<[u8; 4]> {
    if f.len() < 14 {
        return None;
    }
    let l3 = match be16(f, 12) {
        ETH_IPV4 => 14,
        ETH_8021Q if f.len() >= 18 && be16(f, 16) == ETH_IPV4 => 18,
        _ => return None,
    };
    f.get(l3 + 16..l3 + 20)
        .map(|a| a.try_into().expect("4 bytes"))
}

/// Ethernet header with `tags` (TPID, TCI) between the MACs and `ethertype`.
pub fn ethernet(dst: [u8; 6], src: [u8; 6], tags: &[(u16, u16)], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(128);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    for (tpid, tci) in tags {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&tci.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// The IPv4 header fields a builder sets.
#[derive(Clone, Debug)]
pub struct Ipv4Spec {
    /// Type of service.
    pub tos: u8,
    /// Identification.
    pub id: u16,
    /// Flags and fragment offset (the whole 16-bit word).
    pub frag: u16,
    /// Time to live.
    pub ttl: u8,
    /// Protocol.
    pub proto: u8,
    /// Source address.
    pub src: [u8; 4],
    /// Destination address.
    pub dst: [u8; 4],
    /// Options, a multiple of 4 bytes, at most 40.
    pub options: Vec<u8>,
}

/// Appends an IPv4 header for `l4` (TCP/UDP header and payload, checksum
/// field zero) and `l4` itself to `f`, then fills in both checksums. A UDP
/// `l4` whose checksum is meant to be absent is passed with `udp_check`
/// false.
pub fn push_ipv4(f: &mut Vec<u8>, ip: &Ipv4Spec, l4: &[u8], udp_check: bool) {
    assert!(ip.options.len().is_multiple_of(4) && ip.options.len() <= 40);
    let l3 = f.len();
    let ihl = 20 + ip.options.len();
    let tot = (ihl + l4.len()) as u16;
    f.push(0x40 | (ihl / 4) as u8);
    f.push(ip.tos);
    f.extend_from_slice(&tot.to_be_bytes());
    f.extend_from_slice(&ip.id.to_be_bytes());
    f.extend_from_slice(&ip.frag.to_be_bytes());
    f.push(ip.ttl);
    f.push(ip.proto);
    f.extend_from_slice(&[0, 0]);
    f.extend_from_slice(&ip.src);
    f.extend_from_slice(&ip.dst);
    f.extend_from_slice(&ip.options);
    let check = checksum_of(&[&f[l3..l3 + ihl]]);
    put16(f, l3 + 10, check);
    let l4_off = f.len();
    f.extend_from_slice(l4);
    let check_off = match ip.proto {
        TCP if l4.len() >= 20 => l4_off + 16,
        UDP if l4.len() >= 8 && udp_check => l4_off + 6,
        _ => return,
    };
    let pseudo = [
        &ip.src[..],
        &ip.dst[..],
        &[0, ip.proto],
        &(l4.len() as u16).to_be_bytes()[..],
    ]
    .concat();
    let mut c = checksum_of(&[&pseudo, &f[l4_off..]]);
    if ip.proto == UDP && c == 0 {
        c = 0xffff;
    }
    put16(f, check_off, c);
}

/// A TCP header (checksum zero) with `options` (padded to 4 bytes with
/// end-of-list) and `payload`.
pub fn tcp(
    sport: u16,
    dport: u16,
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut opts = options.to_vec();
    while !opts.len().is_multiple_of(4) {
        opts.push(0);
    }
    assert!(opts.len() <= 40);
    let mut t = Vec::with_capacity(20 + opts.len() + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&ack.to_be_bytes());
    t.push((((20 + opts.len()) / 4) as u8) << 4);
    t.push(flags);
    t.extend_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(&opts);
    t.extend_from_slice(payload);
    t
}

/// A UDP header (checksum zero) and `payload`.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// Appends an IPv6 header, the extension headers `ext` (each given as its
/// type and its body after the next-header and length bytes, padded here
/// to a multiple of 8 bytes; a fragment header's body is used as it is),
/// and `upper` of protocol `proto`, with the TCP/UDP checksum filled in.
pub fn push_ipv6(
    f: &mut Vec<u8>,
    src: [u8; 16],
    dst: [u8; 16],
    ext: &[(u8, Vec<u8>)],
    proto: u8,
    upper: &[u8],
) {
    let mut chain = Vec::new();
    for (i, (_, body)) in ext.iter().enumerate() {
        let next = ext.get(i + 1).map_or(proto, |(t, _)| *t);
        let is_fragment = ext[i].0 == 44;
        let mut h = vec![next, 0];
        h.extend_from_slice(body);
        if is_fragment {
            h.resize(8, 0);
        } else {
            while !h.len().is_multiple_of(8) {
                h.push(0);
            }
            h[1] = (h.len() / 8 - 1) as u8;
        }
        chain.extend_from_slice(&h);
    }
    let first = ext.first().map_or(proto, |(t, _)| *t);
    let payload_len = (chain.len() + upper.len()) as u16;
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&payload_len.to_be_bytes());
    f.push(first);
    f.push(64);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&chain);
    let l4 = f.len();
    f.extend_from_slice(upper);
    let check_off = match proto {
        TCP if upper.len() >= 20 => l4 + 16,
        UDP if upper.len() >= 8 => l4 + 6,
        _ => return,
    };
    let pseudo = [
        &src[..],
        &dst[..],
        &(upper.len() as u32).to_be_bytes()[..],
        &[0, 0, 0, proto],
    ]
    .concat();
    let c = checksum_of(&[&pseudo, &f[l4..]]);
    put16(f, check_off, if c == 0 { 0xffff } else { c });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn_frame(tags: &[(u16, u16)], options: &[u8]) -> Vec<u8> {
        let mut f = ethernet([2; 6], [4; 6], tags, ETH_IPV4);
        let ip = Ipv4Spec {
            tos: 0,
            id: 7,
            frag: 0x4000,
            ttl: 64,
            proto: TCP,
            src: [198, 18, 100, 2],
            dst: [198, 18, 101, 1],
            options: options.to_vec(),
        };
        push_ipv4(
            &mut f,
            &ip,
            &tcp(40000, 80, 1, 0, 0x02, &[2, 4, 5, 0xb4], b"x"),
            true,
        );
        f
    }

    #[test]
    fn built_frames_sum_to_zero_and_classify() {
        for (tags, opts) in [
            (&[][..], &[][..]),
            (&[(ETH_8021Q, 42)][..], &[1, 1, 1, 0][..]),
        ] {
            let f = syn_frame(tags, opts);
            let Class::Ipv4(p) = classify(&f) else {
                panic!("not parsed: {f:?}")
            };
            assert_eq!(p.ip_sum(&f), 0);
            assert_eq!(p.l4_sum(&f), 0);
            assert_eq!((p.sport, p.dport, p.proto), (40000, 80, TCP));
            assert_eq!(p.tagged(), !tags.is_empty());
            assert_eq!(p.l4, p.l3 + 20 + opts.len());
        }
    }

    #[test]
    fn a_changed_byte_shows_in_the_sum() {
        let mut f = syn_frame(&[], &[]);
        f[14 + 8] = 1; // TTL
        let Class::Ipv4(p) = classify(&f) else {
            panic!()
        };
        assert_ne!(p.ip_sum(&f), 0);
        assert_eq!(p.l4_sum(&f), 0, "TTL is not in the pseudo-header");
    }

    #[test]
    fn the_reference_follows_the_documented_rules() {
        let good = syn_frame(&[], &[]);
        assert_eq!(classify(&good[..13]), Class::Malformed);
        assert_eq!(classify(&good[..33]), Class::Malformed);
        let mut v = good.clone();
        v[14] = 0x65;
        assert_eq!(classify(&v), Class::Malformed, "version 6");
        let mut v = good.clone();
        v[23] = 1;
        assert_eq!(classify(&v), Class::NotL4, "ICMP");
        let mut v = good.clone();
        v[20] = 0x20;
        assert_eq!(classify(&v), Class::Fragment, "MF");
        let mut v = good.clone();
        put16(&mut v, 12, ETH_IPV6);
        assert_eq!(classify(&v), Class::NotIpv4);
        let qinq = syn_frame(&[(ETH_8021AD, 1), (ETH_8021Q, 2)], &[]);
        assert_eq!(classify(&qinq), Class::NotIpv4);
        let two = syn_frame(&[(ETH_8021Q, 1), (ETH_8021Q, 2)], &[]);
        assert_eq!(classify(&two), Class::NotIpv4);
        assert_eq!(early_dst(&good), Some([198, 18, 101, 1]));
        assert_eq!(early_dst(&good[..33]), None);
    }

    #[test]
    fn ipv6_udp_checksum_covers_the_pseudo_header() {
        let src = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let dst = [0x20, 0x01, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
        let mut f = ethernet([2; 6], [4; 6], &[], ETH_IPV6);
        push_ipv6(
            &mut f,
            src,
            dst,
            &[(0, vec![1, 4, 0, 0, 0, 0])],
            UDP,
            &udp(1, 2, b"hi"),
        );
        let l4 = 14 + 40 + 8;
        let pseudo = [
            &src[..],
            &dst[..],
            &10u32.to_be_bytes()[..],
            &[0, 0, 0, UDP],
        ]
        .concat();
        assert_eq!(ones_sum(&[&pseudo, &f[l4..]]), 0);
        assert_eq!(f[14 + 6], 0, "hop-by-hop first");
        assert_eq!(f[14 + 40], UDP, "then UDP");
    }
}
