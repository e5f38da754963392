//! Internet checksum arithmetic (RFC 1071) and incremental updates (RFC 1624).
//!
//! One's complement sums do not depend on byte order as long as every word is
//! read and written the same way, so callers pass header words exactly as
//! loaded from the packet and store the result the same way.

/// Folds a 32-bit one's complement accumulator into 16 bits.
#[inline(always)]
pub fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Updates checksum `check` for one 16-bit word changing from `old` to `new`:
/// `HC' = ~(~HC + ~m + m')` (RFC 1624, eqn. 3), which never yields the
/// `0x0000`/`0xffff` ambiguity of eqn. 2.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = u32::from(!check) + u32::from(!old) + u32::from(new);
    !fold(sum)
}

/// Updates checksum `check` for one 32-bit field (e.g. an IPv4 address)
/// changing from `old` to `new`.
#[inline(always)]
pub fn replace32(check: u16, old: u32, new: u32) -> u16 {
    let sum = u32::from(!check)
        + u32::from(!(old as u16))
        + u32::from(!((old >> 16) as u16))
        + u32::from(new as u16)
        + u32::from((new >> 16) as u16);
    !fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plain RFC 1071 over big-endian words: deliberately not the code above.
    fn full(bytes: &[u8]) -> u16 {
        let mut sum = 0u64;
        for chunk in bytes.chunks(2) {
            let word = if chunk.len() == 2 {
                u16::from_be_bytes([chunk[0], chunk[1]])
            } else {
                u16::from_be_bytes([chunk[0], 0])
            };
            sum += u64::from(word);
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// Reads a word as the data path does: native order from packet bytes.
    fn ne16(b: &[u8], off: usize) -> u16 {
        u16::from_ne_bytes([b[off], b[off + 1]])
    }

    fn ne32(b: &[u8], off: usize) -> u32 {
        u32::from_ne_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
    }

    #[test]
    fn incremental_matches_full_recomputation() {
        // An IPv4 header with its checksum at bytes 10..12.
        let mut hdr = [
            0x45u8, 0, 0, 60, 0x1c, 0x46, 0x40, 0, 64, 6, 0, 0, 198, 18, 100, 2, 198, 18, 101, 1,
        ];
        let c = full(&hdr);
        hdr[10..12].copy_from_slice(&c.to_be_bytes());
        assert_eq!(full(&hdr), 0, "a correct header sums to zero");

        for new_dst in [
            [198u8, 18, 103, 2],
            [0, 0, 0, 0],
            [255, 255, 255, 255],
            [1, 2, 3, 4],
        ] {
            let mut h = hdr;
            let old = ne32(&h, 16);
            h[16..20].copy_from_slice(&new_dst);
            let new = ne32(&h, 16);
            let check = replace32(ne16(&h, 10), old, new);
            h[10..12].copy_from_slice(&check.to_ne_bytes());
            assert_eq!(
                full(&h),
                0,
                "header checksum wrong after rewrite to {new_dst:?}"
            );
        }
    }

    #[test]
    fn replace16_handles_all_words_for_one_header() {
        let mut buf = [0x12u8, 0x34, 0xab, 0xcd, 0xff, 0xff, 0, 0];
        let c = full(&buf);
        buf[6..8].copy_from_slice(&c.to_be_bytes());
        for w in (0u32..=0xffff).step_by(97) {
            let mut b = buf;
            let old = ne16(&b, 0);
            b[0..2].copy_from_slice(&(w as u16).to_be_bytes());
            let check = replace16(ne16(&b, 6), old, ne16(&b, 0));
            b[6..8].copy_from_slice(&check.to_ne_bytes());
            assert_eq!(full(&b), 0, "word {w:#06x}");
        }
    }

    #[test]
    fn fold_carries_twice() {
        assert_eq!(fold(0x0001_ffff), 0x0001);
        assert_eq!(fold(0xffff_ffff), 0xffff);
        assert_eq!(fold(0), 0);
    }
}
