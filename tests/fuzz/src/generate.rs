//! The frames: structured ones built like the fixtures (IPv4 TCP/UDP to
//! the services and next to them, backends' replies to recorded flows,
//! IPv6 with extension headers, other EtherTypes), with no, one or two
//! VLAN tags, IPv4 and TCP options, then mutated (any header field set to
//! an edge or random value, bits flipped, bytes inserted, removed or
//! appended, cut short), every prefix of some of them, and raw random
//! frames. All from one ChaCha8 stream: the same seed gives the same
//! frames.
//!
//! Every address a frame carries is kept in 198.18.0.0/15 (IPv4) or
//! 2001:2::/48 (IPv6), whatever a mutation wrote: [`confine`].

use std::collections::VecDeque;

use lb_harness::packets::{CLIENT_MAC, LB_MAC};
use rand::{seq::IndexedRandom, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{
    scenario::{self, Model, SERVICE_DEFS, VIP_B},
    wire::{
        be16, ethernet, push_ipv4, push_ipv6, tcp, udp, Ipv4Spec, ETH_8021AD, ETH_8021Q, ETH_ARP,
        ETH_IPV4, ETH_IPV6, TCP, UDP,
    },
};

/// A header field: offset and width in bytes.
type Field = (usize, usize);

/// A frame as built, with the fields a mutation may pick.
struct Built {
    frame: Vec<u8>,
    fields: Vec<Field>,
}

/// The frame generator.
pub struct Gen {
    rng: ChaCha8Rng,
    /// Frames of a truncation sweep still to be handed out.
    pending: VecDeque<Vec<u8>>,
}

/// Source ports reused across frames, so flows see more than one packet.
const PORT_POOL: u16 = 64;

impl Gen {
    /// A generator whose frames depend only on `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            pending: VecDeque::new(),
        }
    }

    /// The next frame.
    pub fn next(&mut self, model: &Model) -> Vec<u8> {
        if let Some(f) = self.pending.pop_front() {
            return f;
        }
        // Shares of every thousand cases; a sweep is rare, as it gives a
        // frame per byte.
        let roll = self.rng.random_range(0..1000);
        let mut f = match roll {
            0..=499 => {
                let b = self.forward();
                self.mutated(b)
            }
            500..=649 => {
                let b = self.reply(model);
                self.mutated(b)
            }
            650..=749 => {
                let b = self.ipv6();
                self.mutated(b)
            }
            750..=799 => {
                let b = self.other();
                self.mutated(b)
            }
            800..=995 => self.raw(),
            _ => {
                // Every prefix of one frame, the whole frame last.
                let b = if self.rng.random_bool(0.7) {
                    self.forward()
                } else {
                    self.ipv6()
                };
                let mut f = self.mutated(b);
                confine(&mut f);
                for len in 0..f.len() {
                    self.pending.push_back(f[..len].to_vec());
                }
                f
            }
        };
        confine(&mut f);
        if let Some(first) = self.pending.pop_front() {
            self.pending.push_back(f);
            return first;
        }
        f
    }

    fn macs(&mut self) -> ([u8; 6], [u8; 6]) {
        if self.rng.random_bool(0.8) {
            (LB_MAC, CLIENT_MAC)
        } else {
            let mut a = [0u8; 6];
            let mut b = [0u8; 6];
            self.rng.fill(&mut a[..]);
            self.rng.fill(&mut b[..]);
            // Unicast, locally administered.
            a[0] = (a[0] & 0xfc) | 0x02;
            b[0] = (b[0] & 0xfc) | 0x02;
            (a, b)
        }
    }

    /// No tag (most frames), one 802.1Q tag, or two (802.1Q or 802.1ad
    /// outside).
    fn tags(&mut self) -> Vec<(u16, u16)> {
        let tci = |g: &mut Self| g.rng.random::<u16>();
        match self.rng.random_range(0..10) {
            0..=6 => Vec::new(),
            7 | 8 => vec![(ETH_8021Q, tci(self))],
            _ => {
                let outer = *[ETH_8021Q, ETH_8021AD].choose(&mut self.rng).expect("two");
                vec![(outer, tci(self)), (ETH_8021Q, tci(self))]
            }
        }
    }

    fn client(&mut self) -> ([u8; 4], u16) {
        let addr = if self.rng.random_bool(0.7) {
            [198, 18, 100, self.rng.random_range(1..=16)]
        } else {
            [198, 19, self.rng.random(), self.rng.random()]
        };
        let port = if self.rng.random_bool(0.4) {
            40000 + self.rng.random_range(0..PORT_POOL)
        } else {
            self.rng.random_range(1..=u16::MAX)
        };
        (addr, port)
    }

    fn ip_options(&mut self) -> Vec<u8> {
        if self.rng.random_bool(0.75) {
            return Vec::new();
        }
        let len = 4 * self.rng.random_range(1..=10);
        let mut o = Vec::with_capacity(len);
        while o.len() < len {
            let room = len - o.len();
            match self.rng.random_range(0..5) {
                0 => o.push(1),
                1 => o.push(0),
                2 if room >= 3 => {
                    // Record route with room for addresses.
                    let n = 3 + 4 * ((room - 3) / 4).min(2);
                    o.extend_from_slice(&[7, n as u8, 4]);
                    o.resize(o.len() + n - 3, 0);
                }
                _ => o.push(self.rng.random()),
            }
        }
        o.truncate(len);
        o
    }

    fn tcp_options(&mut self) -> Vec<u8> {
        if self.rng.random_bool(0.5) {
            return Vec::new();
        }
        let mut o = Vec::new();
        for _ in 0..self.rng.random_range(1..=6) {
            let opt: Vec<u8> = match self.rng.random_range(0..8) {
                0 => vec![2, 4, 0x05, 0xb4],
                1 => vec![3, 3, self.rng.random_range(0..15)],
                2 => vec![4, 2],
                3 => {
                    let mut t = vec![8, 10];
                    t.extend_from_slice(&self.rng.random::<u64>().to_be_bytes());
                    t
                }
                4 => vec![1],
                5 => {
                    let mut s = vec![5, 10];
                    s.extend_from_slice(&self.rng.random::<u64>().to_be_bytes());
                    s
                }
                6 => vec![0],
                // An option of any kind and length, true or not.
                _ => {
                    let n = self.rng.random_range(0..6);
                    let mut r = vec![self.rng.random(), self.rng.random()];
                    r.extend((0..n).map(|_| self.rng.random::<u8>()));
                    r
                }
            };
            if o.len() + opt.len() > 40 {
                break;
            }
            o.extend_from_slice(&opt);
        }
        o
    }

    fn payload(&mut self) -> Vec<u8> {
        let n = if self.rng.random_bool(0.5) {
            0
        } else {
            self.rng.random_range(1..=300)
        };
        (0..n).map(|_| self.rng.random::<u8>()).collect()
    }

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.random_range(0..20) {
            0..=5 => 0x02,
            6..=11 => 0x10,
            12 | 13 => 0x18,
            14 => 0x12,
            15 => 0x11,
            16 => 0x04,
            _ => self.rng.random(),
        }
    }

    /// An IPv4 frame, fields recorded for mutation.
    fn ipv4(
        &mut self,
        macs: ([u8; 6], [u8; 6]),
        src: ([u8; 4], u16),
        dst: ([u8; 4], u16),
        proto: u8,
        flags: u8,
    ) -> Built {
        let tags = self.tags();
        let mut f = ethernet(macs.0, macs.1, &tags, ETH_IPV4);
        let l3 = f.len();
        let frag = match self.rng.random_range(0..20) {
            0..=16 => 0x4000,
            17 => 0,
            18 => 0x2000,
            _ => self.rng.random_range(1..0x2000),
        };
        let ip = Ipv4Spec {
            tos: self.rng.random(),
            id: self.rng.random(),
            frag,
            ttl: self.rng.random_range(1..=255),
            proto,
            src: src.0,
            dst: dst.0,
            options: self.ip_options(),
        };
        let payload = self.payload();
        let (l4, l4_fields): (Vec<u8>, Vec<Field>) = match proto {
            TCP => {
                let opts = self.tcp_options();
                let t = tcp(
                    src.1,
                    dst.1,
                    self.rng.random(),
                    self.rng.random(),
                    flags,
                    &opts,
                    &payload,
                );
                let doff = usize::from(t[12] >> 4) * 4;
                let mut fields = vec![
                    (0, 2),
                    (2, 2),
                    (4, 4),
                    (8, 4),
                    (12, 1),
                    (13, 1),
                    (14, 2),
                    (16, 2),
                    (18, 2),
                ];
                fields.extend((20..doff).map(|i| (i, 1)));
                (t, fields)
            }
            UDP => (
                udp(src.1, dst.1, &payload),
                vec![(0, 2), (2, 2), (4, 2), (6, 2)],
            ),
            _ => (payload, Vec::new()),
        };
        let udp_check = proto != UDP || self.rng.random_bool(0.9);
        push_ipv4(&mut f, &ip, &l4, udp_check);
        let l4_off = l3 + 20 + ip.options.len();
        let mut fields: Vec<Field> = vec![(0, 6), (6, 6)];
        for i in 0..tags.len() {
            fields.extend_from_slice(&[(12 + 4 * i, 2), (14 + 4 * i, 2)]);
        }
        fields.push((l3 - 2, 2));
        fields.extend_from_slice(&[
            (l3, 1),
            (l3 + 1, 1),
            (l3 + 2, 2),
            (l3 + 4, 2),
            (l3 + 6, 2),
            (l3 + 8, 1),
            (l3 + 9, 1),
            (l3 + 10, 2),
            (l3 + 12, 4),
            (l3 + 16, 4),
        ]);
        fields.extend((l3 + 20..l4_off).map(|i| (i, 1)));
        fields.extend(l4_fields.into_iter().map(|(o, w)| (l4_off + o, w)));
        if self.rng.random_bool(0.03) {
            // A wrong checksum, which the data path must keep wrong.
            let (off, _) = *[
                (l3 + 10, 2),
                (l4_off + if proto == TCP { 16 } else { 6 }, 2),
            ]
            .choose(&mut self.rng)
            .expect("two");
            if off + 1 < f.len() {
                f[off] ^= self.rng.random_range(1..=255);
            }
        }
        Built { frame: f, fields }
    }

    /// A client's packet: mostly to a service, else to a VIP's other
    /// port, another protocol, or an address next to the VIPs.
    fn forward(&mut self) -> Built {
        let s = *SERVICE_DEFS.choose(&mut self.rng).expect("services");
        let (mut dst, mut port, mut proto) = (s.vip, s.port, s.proto);
        match self.rng.random_range(0..20) {
            0 => port = self.rng.random(),
            1 => dst = [198, 18, 101, self.rng.random()],
            2 => {
                dst = if dst == VIP_B {
                    scenario::SERVICE_DEFS[0].vip
                } else {
                    VIP_B
                }
            }
            3 => proto = if proto == TCP { UDP } else { TCP },
            4 => {
                proto = *[1u8, 47, 132, self.rng.random()]
                    .choose(&mut self.rng)
                    .expect("four")
            }
            _ => {}
        }
        let macs = self.macs();
        let src = self.client();
        let flags = self.tcp_flags();
        self.ipv4(macs, src, (dst, port), proto, flags)
    }

    /// A backend's reply: to a flow the data path recorded, or from a
    /// backend to anyone.
    fn reply(&mut self, model: &Model) -> Built {
        let rng = &mut self.rng;
        let recent = if rng.random_bool(0.7) {
            model.recent(|n| rng.random_range(0..n))
        } else {
            None
        };
        let (backend, client, proto) = match recent {
            Some((key, flow)) => (scenario::backend(flow.backend), (key.0, key.2), key.4),
            None => {
                let b =
                    &scenario::BACKEND_DEFS[self.rng.random_range(0..scenario::BACKEND_DEFS.len())];
                let proto = SERVICE_DEFS[b.service as usize].proto;
                (b, self.client(), proto)
            }
        };
        let (dmac, smac) = backend.macs();
        let macs = if self.rng.random_bool(0.8) {
            (smac, dmac)
        } else {
            self.macs()
        };
        let flags = if self.rng.random_bool(0.5) {
            0x12
        } else {
            0x10
        };
        self.ipv4(macs, (backend.addr(), backend.port), client, proto, flags)
    }

    /// An IPv6 frame with up to three extension headers.
    fn ipv6(&mut self) -> Built {
        let macs = self.macs();
        let tags = if self.rng.random_bool(0.2) {
            vec![(ETH_8021Q, self.rng.random())]
        } else {
            Vec::new()
        };
        let mut f = ethernet(macs.0, macs.1, &tags, ETH_IPV6);
        let l3 = f.len();
        let addr = |g: &mut Self| {
            let mut a = [0u8; 16];
            a[..6].copy_from_slice(&[0x20, 0x01, 0, 2, 0, 0]);
            g.rng.fill(&mut a[6..]);
            a
        };
        let (src, dst) = (addr(self), addr(self));
        let mut ext = Vec::new();
        for _ in 0..self.rng.random_range(0..=3) {
            let kind = *[0u8, 43, 44, 60].choose(&mut self.rng).expect("four");
            let n = self.rng.random_range(0..=22);
            let body: Vec<u8> = match kind {
                // PadN filling the header.
                0 | 60 => {
                    let mut b = vec![1, n as u8];
                    b.resize(2 + n, 0);
                    b
                }
                44 => (0..6).map(|_| self.rng.random::<u8>()).collect(),
                _ => (0..n + 2).map(|_| self.rng.random::<u8>()).collect(),
            };
            ext.push((kind, body));
        }
        let payload = self.payload();
        let (proto, upper) = match self.rng.random_range(0..4) {
            0 => (TCP, tcp(self.rng.random(), 80, 1, 0, 0x02, &[], &payload)),
            1 => (UDP, udp(self.rng.random(), 53, &payload)),
            2 => (58, payload),
            _ => (59, Vec::new()),
        };
        push_ipv6(&mut f, src, dst, &ext, proto, &upper);
        let fields = vec![
            (0, 6),
            (6, 6),
            (l3 - 2, 2),
            (l3, 1),
            (l3 + 4, 2),
            (l3 + 6, 1),
            (l3 + 7, 1),
        ];
        let mut fields = fields;
        fields.extend((l3 + 40..f.len().min(l3 + 80)).map(|i| (i, 1)));
        Built { frame: f, fields }
    }

    /// ARP, or a frame of another EtherType.
    fn other(&mut self) -> Built {
        let macs = self.macs();
        let tags = self.tags();
        let et = *[ETH_ARP, 0x88cc, 0x8847, self.rng.random()]
            .choose(&mut self.rng)
            .expect("four");
        let mut f = ethernet(macs.0, macs.1, &tags, et);
        let l3 = f.len();
        if et == ETH_ARP {
            f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
            f.extend_from_slice(&macs.1);
            f.extend_from_slice(&[198, 18, 100, 2]);
            f.extend_from_slice(&[0; 6]);
            f.extend_from_slice(&[198, 18, 101, 1]);
        } else {
            let p = self.payload();
            f.extend_from_slice(&p);
        }
        Built {
            frame: f,
            fields: vec![(0, 6), (6, 6), (l3 - 2, 2)],
        }
    }

    /// Random bytes, often under an EtherType the data path looks at.
    fn raw(&mut self) -> Vec<u8> {
        let len = match self.rng.random_range(0..10) {
            0..=4 => self.rng.random_range(0..=64),
            5..=8 => self.rng.random_range(64..=600),
            _ => self.rng.random_range(600..=1600),
        };
        let mut f = vec![0u8; len];
        self.rng.fill(&mut f[..]);
        if len >= 14 && self.rng.random_bool(0.6) {
            let et = *[ETH_IPV4, ETH_8021Q, ETH_IPV6, ETH_ARP]
                .choose(&mut self.rng)
                .expect("four");
            f[12..14].copy_from_slice(&et.to_be_bytes());
            let l3 = if et == ETH_8021Q && len >= 18 {
                f[16..18].copy_from_slice(&ETH_IPV4.to_be_bytes());
                18
            } else {
                14
            };
            if len > l3 && self.rng.random_bool(0.5) {
                f[l3] = 0x45;
            }
        }
        f
    }

    /// `b`, unchanged or with up to four mutations.
    fn mutated(&mut self, b: Built) -> Vec<u8> {
        let Built { mut frame, fields } = b;
        let n = match self.rng.random_range(0..10) {
            0..=4 => 0,
            5..=7 => 1,
            _ => self.rng.random_range(2..=4),
        };
        for _ in 0..n {
            match self.rng.random_range(0..20) {
                0..=9 => {
                    if let Some(&(off, width)) = fields.choose(&mut self.rng) {
                        if off + width <= frame.len() {
                            self.set_field(&mut frame, off, width);
                        }
                    }
                }
                10..=12 if !frame.is_empty() => {
                    let i = self.rng.random_range(0..frame.len());
                    frame[i] ^= 1 << self.rng.random_range(0..8);
                }
                13 if !frame.is_empty() => {
                    let i = self.rng.random_range(0..frame.len());
                    frame[i] = self.rng.random();
                }
                14 | 15 => {
                    let len = self.rng.random_range(0..=frame.len());
                    frame.truncate(len);
                }
                16 => {
                    let n = self.rng.random_range(1..=64);
                    frame.extend((0..n).map(|_| self.rng.random::<u8>()));
                }
                17 => {
                    let at = self.rng.random_range(0..=frame.len());
                    let n = self.rng.random_range(1..=8);
                    let bytes: Vec<u8> = (0..n).map(|_| self.rng.random()).collect();
                    frame.splice(at..at, bytes);
                }
                _ if !frame.is_empty() => {
                    let at = self.rng.random_range(0..frame.len());
                    let n = self.rng.random_range(1..=8).min(frame.len() - at);
                    frame.drain(at..at + n);
                }
                _ => {}
            }
        }
        frame
    }

    /// Sets the `width`-byte field at `off` to an edge or random value.
    fn set_field(&mut self, f: &mut [u8], off: usize, width: usize) {
        let cur = f[off..off + width]
            .iter()
            .fold(0u64, |v, b| v << 8 | u64::from(*b));
        let max = if width >= 8 {
            u64::MAX
        } else {
            (1u64 << (8 * width)) - 1
        };
        let v = match self.rng.random_range(0..7) {
            0 => 0,
            1 => max,
            2 => cur.wrapping_add(1) & max,
            3 => cur.wrapping_sub(1) & max,
            4 => cur ^ (1 << self.rng.random_range(0..8 * width as u32)),
            5 if width == 1 => u64::from(self.rng.random_range(0..16u8)) << 4 | (cur & 0x0f),
            _ => self.rng.random::<u64>() & max,
        };
        for (i, byte) in f[off..off + width].iter_mut().enumerate() {
            *byte = (v >> (8 * (width - 1 - i))) as u8;
        }
    }
}

/// Keeps the addresses of `f` in the benchmarking ranges: the first 15
/// bits of each IPv4 address become 198.18.0.0/15's, the first 48 of each
/// IPv6 address 2001:2::/48's, as far as the frame reaches.
pub fn confine(f: &mut [u8]) {
    if f.len() < 14 {
        return;
    }
    let (et, l3) = match be16(f, 12) {
        ETH_8021Q if f.len() >= 18 => (be16(f, 16), 18),
        et => (et, 14),
    };
    match et {
        ETH_IPV4 => {
            for at in [l3 + 12, l3 + 16] {
                let second = f.get(at + 1).map_or(18, |b| 18 | (b & 1));
                set_prefix(f, at, &[198, second]);
            }
        }
        ETH_IPV6 => {
            for at in [l3 + 8, l3 + 24] {
                set_prefix(f, at, &[0x20, 0x01, 0, 2, 0, 0]);
            }
        }
        _ => {}
    }
}

/// Writes `prefix` at `at`, as far as `f` reaches.
fn set_prefix(f: &mut [u8], at: usize, prefix: &[u8]) {
    for (i, p) in prefix.iter().enumerate() {
        if let Some(b) = f.get_mut(at + i) {
            *b = *p;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{classify, Class};

    #[test]
    fn the_same_seed_gives_the_same_frames() {
        let model = Model::default();
        let (mut a, mut b) = (Gen::new(7), Gen::new(7));
        for _ in 0..2000 {
            assert_eq!(a.next(&model), b.next(&model));
        }
        let mut c = Gen::new(8);
        let same = (0..100)
            .filter(|_| a.next(&model) == c.next(&model))
            .count();
        assert!(same < 50, "another seed, other frames");
    }

    #[test]
    fn frames_cover_every_class_and_stay_in_range() {
        let model = Model::default();
        let mut g = Gen::new(1);
        let mut seen = [0usize; 5];
        for _ in 0..20_000 {
            let f = g.next(&model);
            let i = match classify(&f) {
                Class::NotIpv4 => 0,
                Class::NotL4 => 1,
                Class::Fragment => 2,
                Class::Malformed => 3,
                Class::Ipv4(p) => {
                    assert_eq!(p.src[0..1], [198], "{f:02x?}");
                    assert!(matches!(p.src[1], 18 | 19) && matches!(p.dst[1], 18 | 19));
                    4
                }
            };
            seen[i] += 1;
        }
        assert!(seen.iter().all(|&n| n > 100), "{seen:?}");
    }

    #[test]
    fn confine_rewrites_only_address_prefixes() {
        let mut f = vec![0u8; 60];
        f[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        f[26..30].copy_from_slice(&[10, 1, 2, 3]);
        f[30..34].copy_from_slice(&[192, 169, 5, 6]);
        confine(&mut f);
        assert_eq!(
            &f[26..34],
            &[198, 19, 2, 3, 198, 19, 5, 6],
            "the /15's bit kept"
        );
        let mut short = vec![0u8; 27];
        short[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        confine(&mut short);
        assert_eq!(short[26], 198);
    }
}
