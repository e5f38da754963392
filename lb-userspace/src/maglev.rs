//! Maglev consistent hashing (Eisenbud et al., NSDI 2016): the lookup table
//! is built here in userspace; the eBPF data path only reads `table[hash % M]`.
//!
//! # Algorithm
//!
//! Backends are sorted by key, so the table depends only on the set of
//! backends, never on the order of the input slice. Each backend walks its own
//! permutation of the `M` slots (`M` prime) and the backends take turns: on its
//! turn a backend claims the next slot of its permutation that is still free,
//! until every slot is taken.
//!
//! # Permutations
//!
//! As in the paper, `offset = h1(key) % M` and `skip = h2(key) % (M - 1) + 1`,
//! where `h1` (splitmix64 finalizer) and `h2` (MurmurHash3 fmix64) are two
//! unrelated 64-bit mixers. The paper's permutation is the walk
//! `x_j = (offset + j * skip) % M` itself. Here slot `j` is instead
//! `(S[x_j] + shift) % M`, with `S` a fixed pseudorandom bijection of `0..M`
//! (a seeded Fisher-Yates shuffle, the same for every backend) and
//! `shift = h3(key) % M`.
//!
//! Why: with the paper's linear walks, two backends' positions in each
//! other's walks are related by an affine map, `j_b = (skip_a / skip_b) * j_a + c`
//! (mod M). When that ratio equals `p / q` (mod M) for small `p` and `q`, the
//! two backends walk in near lockstep. Removing one of them then hands
//! most of its slots to the other, and the refill cascades. Measured with
//! `M = 65537`, removing one of `N <= 100` equal-weight backends changed up to
//! 2.1 percentage points more than the ideal `1/N` (for example N = 5, where
//! two skips had the ratio 4/3 mod M). With `S` between the two per-backend
//! affine maps, the walks of two backends look unrelated. The extra
//! disruption then grows smoothly with `N`. Over about 40 000 random removals
//! for N = 2..=100, it was at most 0.65 points, with a mean of 0.57 at N = 100.
//!
//! # Weights
//!
//! This is the weighted variant used by Katran and Cilium. In every round each
//! backend earns `weight` credit. When its credit reaches `max_weight`, it
//! takes a turn and pays `max_weight`. A backend therefore takes
//! `weight / max_weight` turns per round. Each turn claims exactly one slot,
//! so backend `i` ends up with `M * w_i / W` slots (`W` = sum of weights),
//! off by less than `N * w_i / W + 1` slots. With equal weights every backend
//! takes a turn every round, which is plain Maglev.
//!
//! A backend whose weight is tiny next to the others may get no slot at all.
//! Weight 0 always means "not in the table".
//!
//! # Cost
//!
//! Each turn probes until it finds a free slot: about `M * ln M` probes in all
//! (0.7 million for `M = 65537`). A probe reads `S` and tests a bitmap of
//! taken slots (8 KiB for `M = 65537`, so it stays in L1 cache). Probing for
//! the last few slots is the dearest part (`M / k` probes a claim with `k`
//! free), so once fewer than `√M / 2` are free each claim picks from the list
//! of free slots instead, with `S⁻¹` and a modular inverse of the skip: the
//! same slot, found in `k` steps. `S` and `S⁻¹` depend only on `M` and are
//! kept for the few table sizes in use, so a rebuild does not reshuffle
//! them. No per-backend permutation is stored: memory is the table, `S` and
//! `S⁻¹`, 4 bytes per slot each, plus a few words per backend. Turns are
//! handed out by visiting every backend every round when weights are close.
//! When a few heavy backends make for many rounds, turns come from a heap
//! instead, so skewed weights cost `O(M log N)` and not `O(M * N)`. The
//! scale section of `cargo xtask bench` measures the build time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex, PoisonError};

use lb_common::NO_BACKEND;

/// Largest accepted table size: the smallest prime above 2^24. A table is one
/// `u32` per slot, so this caps one table at 64 MiB. It also keeps every
/// `slot + step` sum below `u32::MAX`.
pub const MAX_TABLE_SIZE: u32 = 16_777_259;

/// One backend as Maglev sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaglevBackend {
    /// Stable identity of the backend. The caller derives it from the
    /// backend's IP and port. Only the key feeds the permutation, so a
    /// backend keeps its slots when ids or the input order change.
    pub key: u64,
    /// Value written into the slots this backend owns.
    pub id: u32,
    /// Relative share of the table; 0 means "not in the table".
    pub weight: u32,
}

/// Why [`build`] refused its input.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaglevError {
    /// The table size is below 2 (no skip exists) or above [`MAX_TABLE_SIZE`].
    #[error("Maglev table size {0} is out of range: it must be in 2..={MAX_TABLE_SIZE}")]
    TableSizeOutOfRange(u32),
    /// The table size is not prime, so some permutations would not visit
    /// every slot.
    #[error("Maglev table size {0} is not prime")]
    TableSizeNotPrime(u32),
    /// More backends with weight > 0 than slots, so some could never get one.
    #[error(
        "{backends} backends with weight > 0 do not fit in a Maglev table of {table_size} slots"
    )]
    TooManyBackends {
        /// Backends with weight > 0.
        backends: usize,
        /// Slots in the table.
        table_size: u32,
    },
    /// Two backends have the same key, so they would have the same
    /// permutation. Keys are checked whatever the weights.
    #[error("two Maglev backends have the same key {0:#018x}")]
    DuplicateKey(u64),
    /// A backend with weight > 0 has the id [`NO_BACKEND`]. The data path
    /// would read its slots as "no backend".
    #[error("Maglev backend with key {0:#018x} has the reserved id {NO_BACKEND} (NO_BACKEND)")]
    ReservedId(u64),
}

/// Whether `n` is prime. Uses trial division by 6k ± 1: at most about 22 000
/// divisions for any `u32`, which is trivial next to a build.
pub fn is_prime(n: u32) -> bool {
    if n < 4 {
        return n >= 2;
    }
    // Every prime above 3 is 6k ± 1.
    if !matches!(n % 6, 1 | 5) {
        return false;
    }
    // u64 so that d * d cannot overflow near u32::MAX.
    let n = u64::from(n);
    let mut d = 5u64;
    while d * d <= n {
        if n % d == 0 || n % (d + 2) == 0 {
            return false;
        }
        d += 6;
    }
    true
}

/// splitmix64 (Steele, Lea, Flood 2014): add the golden gamma, then finalize.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// MurmurHash3's 64-bit finalizer (fmix64).
fn fmix64(x: u64) -> u64 {
    let mut z = x;
    z ^= z >> 33;
    z = z.wrapping_mul(0xff51_afd7_ed55_8ccd);
    z ^= z >> 33;
    z = z.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    z ^ (z >> 33)
}

/// Hash for `offset`.
fn h1(key: u64) -> u64 {
    splitmix64(key)
}

/// Hash for `skip`. It uses a different mixer and seed than [`h1`], so
/// `skip` is independent of `offset`.
fn h2(key: u64) -> u64 {
    fmix64(key ^ 0xc2b2_ae3d_27d4_eb4f)
}

/// Hash for `shift`. It is seeded apart from [`h1`] and [`h2`].
fn h3(key: u64) -> u64 {
    splitmix64(fmix64(key ^ 0x1656_67b1_9e37_79f9))
}

/// The shared bijection `S` of `0..m` and its inverse.
struct Scramble {
    /// `S` itself: a Fisher-Yates shuffle driven by a fixed-seed splitmix64
    /// stream, so it is a pure function of `m`.
    s: Vec<u32>,
    /// `S⁻¹`: where each value sits in `s`, for the end of a build (see
    /// [`Walker::claim_listed`]).
    inverse: Vec<u32>,
}

/// Largest table size whose [`Scramble`] is kept between builds (8 MiB for
/// both arrays): a service of the default size must not pay for the shuffle
/// at every change, and a rare huge table must not hold its memory forever.
const KEEP_SCRAMBLE_UP_TO: u32 = 1_048_573;

/// How many table sizes keep their [`Scramble`]: services mostly share the
/// default size, and a handful of sizes cost at most 32 MiB.
const KEPT_SCRAMBLES: usize = 4;

impl Scramble {
    fn new(m: u32) -> Scramble {
        let mut s: Vec<u32> = (0..m).collect();
        let mut state = 0x243f_6a88_85a3_08d3 ^ u64::from(m);
        for i in (1..s.len()).rev() {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            // Lemire's multiply-high maps the random word onto 0..=i. Its bias
            // of at most 2^-40 does not matter: the shuffle only has to be fixed
            // and look random.
            let j = ((u128::from(splitmix64(state)) * (i as u128 + 1)) >> 64) as usize;
            s.swap(i, j);
        }
        let mut inverse = vec![0u32; s.len()];
        for (i, &v) in s.iter().enumerate() {
            inverse[v as usize] = i as u32;
        }
        Scramble { s, inverse }
    }

    /// The scramble of size `m`, from the small cache of recent sizes when
    /// it is there.
    fn of(m: u32) -> Arc<Scramble> {
        static KEPT: Mutex<Vec<Arc<Scramble>>> = Mutex::new(Vec::new());
        if m > KEEP_SCRAMBLE_UP_TO {
            return Arc::new(Scramble::new(m));
        }
        // A poisoned lock only means another build panicked while holding
        // it; the cached scrambles are immutable and still right.
        let mut kept = KEPT.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(i) = kept.iter().position(|k| k.s.len() == m as usize) {
            // Most recently used last.
            let hit = kept.remove(i);
            kept.push(Arc::clone(&hit));
            return hit;
        }
        let made = Arc::new(Scramble::new(m));
        if kept.len() == KEPT_SCRAMBLES {
            kept.remove(0);
        }
        kept.push(Arc::clone(&made));
        made
    }
}

/// `base^exp mod m`, for a modular inverse by Fermat (`m` prime).
fn pow_mod(base: u32, mut exp: u32, m: u32) -> u32 {
    let m = u64::from(m);
    let (mut result, mut b) = (1u64, u64::from(base) % m);
    while exp > 0 {
        if exp & 1 == 1 {
            result = result * b % m;
        }
        b = b * b % m;
        exp >>= 1;
    }
    result as u32
}

/// A backend's walk through its permutation, and the id it writes.
struct Walker {
    /// Current point `x_j` of the linear walk `offset + j * skip (mod M)`.
    x: u32,
    /// Step of the linear walk, in `1..M`.
    skip: u32,
    /// Added to `S[x]` to give the slot.
    shift: u32,
    /// Id written into the slots this backend claims.
    id: u32,
    /// `skip⁻¹ mod M`, worked out at this walker's first listed claim (0
    /// until then: no inverse is 0).
    skip_inverse: u32,
}

impl Walker {
    /// Marks the next free slot of the permutation as taken and returns it.
    /// At least one slot must be free.
    ///
    /// Each walk is a bijection onto `0..M`, because `M` is prime and
    /// `0 < skip < M`. Every slot a walker has passed was already taken and
    /// stays taken, so the slots it has not visited include every free slot.
    /// The loop therefore ends, and a walker probes at most `M` times over a
    /// whole build.
    fn claim(&mut self, s: &[u32], taken: &mut [u64], m: u32) -> usize {
        loop {
            let slot = s[self.x as usize] + self.shift;
            let slot = if slot >= m { slot - m } else { slot } as usize;
            let next = self.x + self.skip;
            self.x = if next >= m { next - m } else { next };
            let word = &mut taken[slot / 64];
            let bit = 1u64 << (slot % 64);
            if *word & bit == 0 {
                *word |= bit;
                return slot;
            }
        }
    }

    /// The same slot as [`Walker::claim`], found from the list of free slots
    /// instead of by probing: the one whose point of the walk comes first.
    /// `free` must not be empty; the claimed slot leaves it.
    ///
    /// A free slot `f` is point `x = S⁻¹[f - shift]` of the linear walk, which
    /// reaches it `(x - self.x) * skip⁻¹ (mod M)` steps from here. With `k`
    /// slots free a probe hits one with chance `k / M`, so probing costs
    /// `M / k` steps a claim; going through the list costs `k`. The list wins
    /// once `k` drops below about `√M`; a list step costs more than a probe
    /// (a multiplication modulo `M`), so builds switch at `√M / 2`, which
    /// measured fastest for `M = 65537`.
    fn claim_listed(&mut self, scramble: &Scramble, free: &mut Vec<u32>, m: u32) -> usize {
        if self.skip_inverse == 0 {
            self.skip_inverse = pow_mod(self.skip, m - 2, m);
        }
        let (m64, inverse) = (u64::from(m), u64::from(self.skip_inverse));
        let mut best = (u64::MAX, 0usize, 0u32);
        for (i, &slot) in free.iter().enumerate() {
            let y = if slot >= self.shift {
                slot - self.shift
            } else {
                slot + m - self.shift
            };
            let x = scramble.inverse[y as usize];
            let dx = if x >= self.x {
                x - self.x
            } else {
                x + m - self.x
            };
            let steps = u64::from(dx) * inverse % m64;
            if steps < best.0 {
                best = (steps, i, x);
            }
        }
        let (_, i, x) = best;
        let next = x + self.skip;
        self.x = if next >= m { next - m } else { next };
        free.swap_remove(i) as usize
    }
}

/// How [`build`] hands out turns. Both follow the credit rule of the module
/// doc exactly, so they give the same table; they differ only in cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Schedule {
    /// Visit every backend every round: O(rounds * N). Best when weights are
    /// close, so there are few rounds (M / N of them for equal weights).
    Dense,
    /// Keep backends that sit out rounds in a heap: O(M log N). Best when a
    /// few heavy backends make for many rounds, where Dense would cost up to
    /// O(M * N).
    Sparse,
}

/// Builds the table. Every slot holds the id of a backend with weight > 0, or
/// [`NO_BACKEND`] in every slot if there is none.
///
/// `table_size` must be prime and in `2..=MAX_TABLE_SIZE`. The result depends
/// only on the set of backends (key, id, weight), not on their order in
/// `backends`.
pub fn build(backends: &[MaglevBackend], table_size: u32) -> Result<Vec<u32>, MaglevError> {
    build_with(backends, table_size, None, None)
}

/// [`build`], with the schedule and the switch to listed claims forced (for
/// tests) or picked by cost (`None`).
fn build_with(
    backends: &[MaglevBackend],
    table_size: u32,
    schedule: Option<Schedule>,
    list_below: Option<u32>,
) -> Result<Vec<u32>, MaglevError> {
    if !(2..=MAX_TABLE_SIZE).contains(&table_size) {
        return Err(MaglevError::TableSizeOutOfRange(table_size));
    }
    if !is_prime(table_size) {
        return Err(MaglevError::TableSizeNotPrime(table_size));
    }

    // Sort by key: turn order is key order, which makes the table
    // independent of input order.
    let mut sorted: Vec<&MaglevBackend> = backends.iter().collect();
    sorted.sort_unstable_by_key(|b| b.key);
    if let Some(pair) = sorted.windows(2).find(|p| p[0].key == p[1].key) {
        return Err(MaglevError::DuplicateKey(pair[0].key));
    }
    sorted.retain(|b| b.weight > 0);
    if let Some(b) = sorted.iter().find(|b| b.id == NO_BACKEND) {
        return Err(MaglevError::ReservedId(b.key));
    }
    if sorted.len() > table_size as usize {
        return Err(MaglevError::TooManyBackends {
            backends: sorted.len(),
            table_size,
        });
    }

    let m = table_size;
    let mut table = vec![NO_BACKEND; m as usize];
    if sorted.is_empty() {
        return Ok(table);
    }
    let weights: Vec<u64> = sorted.iter().map(|b| u64::from(b.weight)).collect();
    let mut fill = Fill {
        m,
        scramble: Scramble::of(m),
        walkers: sorted
            .iter()
            .map(|b| Walker {
                x: (h1(b.key) % u64::from(m)) as u32,
                skip: (h2(b.key) % u64::from(m - 1)) as u32 + 1,
                shift: (h3(b.key) % u64::from(m)) as u32,
                id: b.id,
                skip_inverse: 0,
            })
            .collect(),
        taken: vec![0u64; (m as usize).div_ceil(64)],
        table: &mut table,
        free: m,
        listed: None,
        list_below: list_below.unwrap_or_else(|| m.isqrt() / 2),
    };
    let schedule = schedule.unwrap_or_else(|| {
        // Dense makes about M * max_weight / W rounds (W = sum of weights)
        // of N visits each: M * N * max_weight / W cheap visits. Sparse costs
        // about M heap operations of log N steps each. Measured with
        // N = 1000, Sparse only pays off from N * max_weight / W of about 20
        // up. The products are below 2^24 * 2^32 * 16 and cannot overflow.
        let max_weight = *weights.iter().max().expect("non-empty");
        let total: u64 = weights.iter().sum();
        if weights.len() as u64 * max_weight <= 16 * total {
            Schedule::Dense
        } else {
            Schedule::Sparse
        }
    });
    match schedule {
        Schedule::Dense => fill.dense(&weights),
        Schedule::Sparse => fill.sparse(&weights),
    }
    Ok(table)
}

/// The state of one build while slots are handed out.
struct Fill<'t> {
    /// Table size (prime).
    m: u32,
    /// The shared bijection `S` of the module doc, and its inverse.
    scramble: Arc<Scramble>,
    /// One per backend with weight > 0, in key order.
    walkers: Vec<Walker>,
    /// Taken slots, one bit each. This is 8 KiB for M = 65537, so probes hit
    /// L1 instead of the 256 KiB table.
    taken: Vec<u64>,
    /// The table being filled.
    table: &'t mut [u32],
    /// Slots not taken yet.
    free: u32,
    /// The free slots, listed once fewer than `list_below` are left.
    listed: Option<Vec<u32>>,
    /// When claims switch from probing to the list of free slots.
    list_below: u32,
}

impl Fill<'_> {
    /// Gives backend `i` one turn. Returns false once the table is full.
    fn turn(&mut self, i: usize) -> bool {
        if self.listed.is_none() && self.free < self.list_below {
            self.listed = Some(self.free_slots());
        }
        let w = &mut self.walkers[i];
        let slot = match &mut self.listed {
            None => w.claim(&self.scramble.s, &mut self.taken, self.m),
            Some(free) => w.claim_listed(&self.scramble, free, self.m),
        };
        self.table[slot] = w.id;
        self.free -= 1;
        self.free > 0
    }

    /// The slots not taken yet, from the bitmap.
    fn free_slots(&self) -> Vec<u32> {
        let mut free = Vec::with_capacity(self.free as usize);
        for (w, &word) in self.taken.iter().enumerate() {
            let mut open = !word;
            while open != 0 {
                let slot = w as u32 * 64 + open.trailing_zeros();
                if slot < self.m {
                    free.push(slot);
                }
                open &= open - 1;
            }
        }
        free
    }

    /// The credit rule as written in the module doc. At least one backend
    /// (one with max_weight) turns every round, so this ends within M rounds.
    fn dense(&mut self, weights: &[u64]) {
        let max_weight = *weights.iter().max().expect("non-empty");
        let mut credit = vec![0u64; weights.len()];
        loop {
            for (i, (c, &w)) in credit.iter_mut().zip(weights).enumerate() {
                *c += w;
                if *c >= max_weight {
                    *c -= max_weight;
                    if !self.turn(i) {
                        return;
                    }
                }
            }
        }
    }

    /// The same turns as [`Fill::dense`], without visiting every backend every
    /// round.
    ///
    /// In round r (from 0), a backend of weight w with credit starting at 0
    /// and k turns so far holds (r + 1) * w - k * max_weight. It takes one
    /// more turn iff that reaches max_weight. Backends at max_weight turn
    /// every round. The others wait in a min-heap on (round of next turn,
    /// index), which yields them in the same round-then-key order.
    fn sparse(&mut self, weights: &[u64]) {
        let max_weight = *weights.iter().max().expect("non-empty");
        // First round r with (r + 1) * w >= (k + 1) * max_weight. The product
        // is below 2^24 * 2^32, so it cannot overflow.
        let next_round = |w: u64, k: u64| ((k + 1) * max_weight).div_ceil(w) - 1;
        let every_round: Vec<usize> = (0..weights.len())
            .filter(|&i| weights[i] == max_weight)
            .collect();
        let mut waiting: BinaryHeap<Reverse<(u64, usize)>> = (0..weights.len())
            .filter(|&i| weights[i] < max_weight)
            .map(|i| Reverse((next_round(weights[i], 0), i)))
            .collect();
        let mut turns = vec![0u64; weights.len()];
        let mut due: Vec<usize> = Vec::new();
        for round in 0u64.. {
            due.clear();
            while let Some(&Reverse((r, i))) = waiting.peek() {
                if r != round {
                    break;
                }
                waiting.pop();
                due.push(i);
            }
            // Both lists are sorted by index: merge them to keep key order.
            let (mut a, mut b) = (0, 0);
            loop {
                let i = match (every_round.get(a), due.get(b)) {
                    (Some(&x), Some(&y)) if x < y => {
                        a += 1;
                        x
                    }
                    (_, Some(&y)) => {
                        b += 1;
                        y
                    }
                    (Some(&x), None) => {
                        a += 1;
                        x
                    }
                    (None, None) => break,
                };
                if !self.turn(i) {
                    return;
                }
            }
            for &i in &due {
                turns[i] += 1;
                waiting.push(Reverse((next_round(weights[i], turns[i]), i)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::{BTreeSet, HashMap};

    /// The largest table size by default (the digests of
    /// `tables_are_pinned_across_versions` were taken with it).
    const M: u32 = 65_537;

    fn backend(key: u64, id: u32, weight: u32) -> MaglevBackend {
        MaglevBackend { key, id, weight }
    }

    /// Equal-weight backends with ids 0.. in key order.
    fn equal(keys: &BTreeSet<u64>) -> Vec<MaglevBackend> {
        keys.iter()
            .enumerate()
            .map(|(i, &k)| backend(k, i as u32, 1))
            .collect()
    }

    fn changed(a: &[u32], b: &[u32]) -> usize {
        assert_eq!(a.len(), b.len(), "tables of different sizes");
        a.iter().zip(b).filter(|(x, y)| x != y).count()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_insert(0) += 1;
        }
        c
    }

    /// Asserts that removing `backends[removed]` changes at most
    /// 1/N + 1% of the slots. Returns the changed fraction.
    fn check_removal(backends: &[MaglevBackend], removed: usize) -> f64 {
        let n = backends.len();
        let full = build(backends, M).expect("valid input");
        let mut less = backends.to_vec();
        less.remove(removed);
        let after = build(&less, M).expect("valid input");
        assert!(
            after.iter().all(|&id| id != backends[removed].id),
            "removed backend still in the table"
        );
        let frac = changed(&full, &after) as f64 / f64::from(M);
        let bound = 1.0 / n as f64 + 0.01;
        assert!(
            frac <= bound,
            "removing 1 of {n} backends changed {:.3}% of slots, bound {:.3}%",
            frac * 100.0,
            bound * 100.0
        );
        frac
    }

    #[test]
    fn is_prime_known_values() {
        for p in [
            2,
            3,
            5,
            7,
            11,
            13,
            251,
            7919,
            65_521,
            65_537,
            MAX_TABLE_SIZE,
            4_294_967_291,
        ] {
            assert!(is_prime(p), "{p} is prime");
        }
        // 4_294_967_295 = 3 * 5 * 17 * 257 * 65537; 4_294_836_225 = 65535^2.
        for c in [
            0, 1, 4, 6, 9, 25, 49, 91, 121, 256, 65_535, 65_536, 16_777_216,
        ] {
            assert!(!is_prime(c), "{c} is not prime");
        }
        for c in [4_294_967_295, 4_294_836_225, 65_537 * 65_521] {
            assert!(!is_prime(c), "{c} is not prime");
        }
        // Cross-check against a naive sieve below 10 000.
        let mut sieve = vec![true; 10_000];
        sieve[0] = false;
        sieve[1] = false;
        for i in 2..100 {
            if sieve[i] {
                for j in (i * i..10_000).step_by(i) {
                    sieve[j] = false;
                }
            }
        }
        for (n, &p) in sieve.iter().enumerate() {
            assert_eq!(is_prime(n as u32), p, "is_prime({n})");
        }
    }

    #[test]
    fn max_table_size_is_smallest_prime_above_2_pow_24() {
        assert!(is_prime(MAX_TABLE_SIZE), "MAX_TABLE_SIZE must be prime");
        assert!(
            ((1 << 24)..MAX_TABLE_SIZE).all(|n| !is_prime(n)),
            "a smaller prime above 2^24 exists"
        );
    }

    #[test]
    fn rejects_bad_table_sizes() {
        let b = [backend(1, 1, 1)];
        for size in [0, 1, MAX_TABLE_SIZE + 2, 4_294_967_291, u32::MAX] {
            assert_eq!(
                build(&b, size),
                Err(MaglevError::TableSizeOutOfRange(size)),
                "size {size}"
            );
        }
        for size in [4, 9, 65_536, 65_535, 1_000_000] {
            assert_eq!(
                build(&b, size),
                Err(MaglevError::TableSizeNotPrime(size)),
                "size {size}"
            );
        }
        // Bad sizes are refused even without backends.
        assert_eq!(build(&[], 4), Err(MaglevError::TableSizeNotPrime(4)));
    }

    #[test]
    fn rejects_duplicate_key() {
        let b = [backend(7, 1, 1), backend(3, 2, 1), backend(7, 3, 5)];
        assert_eq!(build(&b, 13), Err(MaglevError::DuplicateKey(7)));
        // Also when one of them is out of the table: it is still a caller bug.
        let b = [backend(7, 1, 1), backend(7, 2, 0)];
        assert_eq!(build(&b, 13), Err(MaglevError::DuplicateKey(7)));
    }

    #[test]
    fn rejects_more_backends_than_slots() {
        let b: Vec<_> = (0..8).map(|i| backend(i, i as u32, 1)).collect();
        assert_eq!(
            build(&b, 7),
            Err(MaglevError::TooManyBackends {
                backends: 8,
                table_size: 7
            })
        );
        // Weight 0 backends do not count.
        let mut b = b;
        b[3].weight = 0;
        let t = build(&b, 7).expect("7 weighted backends fit in 7 slots");
        let ids: BTreeSet<u32> = t.iter().copied().collect();
        assert_eq!(ids.len(), 7, "each backend gets exactly one slot: {t:?}");
        assert!(!ids.contains(&3), "weight 0 backend in the table: {t:?}");
    }

    #[test]
    fn rejects_reserved_id() {
        let b = [backend(1, 1, 1), backend(2, NO_BACKEND, 1)];
        assert_eq!(build(&b, 13), Err(MaglevError::ReservedId(2)));
        // Fine when it is not in the table.
        let b = [backend(1, 1, 1), backend(2, NO_BACKEND, 0)];
        assert_eq!(build(&b, 13), Ok(vec![1; 13]));
    }

    #[test]
    fn errors_have_clear_messages() {
        let msg = MaglevError::TableSizeNotPrime(65_536).to_string();
        assert_eq!(msg, "Maglev table size 65536 is not prime");
        let msg = MaglevError::TableSizeOutOfRange(1).to_string();
        assert!(msg.contains("1") && msg.contains("16777259"), "{msg}");
        let msg = MaglevError::TooManyBackends {
            backends: 8,
            table_size: 7,
        }
        .to_string();
        assert!(msg.contains('8') && msg.contains('7'), "{msg}");
        let msg = MaglevError::DuplicateKey(0xab).to_string();
        assert!(msg.contains("0x00000000000000ab"), "{msg}");
    }

    #[test]
    fn no_backends_gives_all_no_backend() {
        let t = build(&[], M).expect("empty input is valid");
        assert_eq!(t.len(), M as usize);
        assert!(t.iter().all(|&id| id == NO_BACKEND), "non-empty slot");
        // Only weight 0 backends: the same.
        let b = [backend(1, 1, 0), backend(2, 2, 0)];
        let t = build(&b, 13).expect("valid input");
        assert_eq!(t, vec![NO_BACKEND; 13]);
    }

    #[test]
    fn single_backend_fills_every_slot() {
        for size in [2, 3, 13, M] {
            let t = build(&[backend(42, 9, 3)], size).expect("valid input");
            assert_eq!(t, vec![9; size as usize], "size {size}");
        }
    }

    #[test]
    fn weight_zero_backends_are_absent() {
        let b: Vec<_> = (0..10u32)
            .map(|i| backend(u64::from(i) * 0x1234_5678_9abc, i, i % 3))
            .collect();
        let t = build(&b, M).expect("valid input");
        let c = counts(&t);
        for b in &b {
            assert_eq!(
                c.contains_key(&b.id),
                b.weight > 0,
                "backend {} with weight {}",
                b.id,
                b.weight
            );
        }
    }

    #[test]
    fn tiny_tables() {
        let t = build(&[backend(1, 10, 1), backend(2, 20, 1)], 2).expect("valid input");
        let mut sorted = t.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, [10, 20], "one slot each: {t:?}");
    }

    #[test]
    fn equal_weights_split_evenly() {
        // Every backend takes one turn per round, so counts differ by at most one.
        let keys: BTreeSet<u64> = (0..37u64).map(|i| i.wrapping_mul(0x9e37_79b9)).collect();
        let t = build(&equal(&keys), M).expect("valid input");
        let c = counts(&t);
        assert_eq!(c.len(), 37);
        let (lo, hi) = (c.values().min().unwrap(), c.values().max().unwrap());
        assert!(hi - lo <= 1, "counts from {lo} to {hi}");
    }

    #[test]
    fn ids_only_label_slots() {
        // Changing ids relabels slots; it never moves them.
        let keys: BTreeSet<u64> = (1..=20u64).map(|i| i * 1_000_003).collect();
        let a = equal(&keys);
        let b: Vec<_> = a
            .iter()
            .map(|x| backend(x.key, x.id * 7 + 100, 1))
            .collect();
        let ta = build(&a, M).expect("valid input");
        let tb = build(&b, M).expect("valid input");
        assert!(
            ta.iter().zip(&tb).all(|(&x, &y)| y == x * 7 + 100),
            "changing ids moved slots"
        );
    }

    #[test]
    fn huge_weights_do_not_overflow() {
        let b = [
            backend(1, 1, u32::MAX),
            backend(2, 2, u32::MAX),
            backend(3, 3, u32::MAX / 2),
            backend(4, 4, 1),
        ];
        let t = build(&b, M).expect("valid input");
        let c = counts(&t);
        // Shares 2/5, 2/5, 1/5 and about 1e-10: the last gets at most one slot.
        for (id, want) in [(1, 0.4), (2, 0.4), (3, 0.2)] {
            let got = c[&id] as f64 / f64::from(M);
            assert!((got - want).abs() < 1e-4, "backend {id}: {got} vs {want}");
        }
        assert!(c.get(&4).copied().unwrap_or(0) <= 1, "{c:?}");
    }

    #[test]
    fn removal_disruption_sweep() {
        // One removal for every N from 2 to 100: the bound is for every N,
        // not just on average. Keys as the daemon derives them (IPv4 << 16 |
        // port) for 10.0.0.1:8080 and up: structured, unlike the random keys
        // of the properties below.
        let mut worst: f64 = 0.0;
        for n in 2..=100u64 {
            let keys: BTreeSet<u64> = (1..=n).map(|i| (0x0a00_0000 + i) << 16 | 8080).collect();
            let frac = check_removal(&equal(&keys), (splitmix64(n) % n) as usize);
            worst = worst.max(frac - 1.0 / n as f64);
        }
        assert!(worst < 0.01, "worst excess {worst}");
    }

    /// The tables themselves are pinned: two builds of `lb` must give the
    /// same table for the same backends (nodes behind ECMP, an upgrade that
    /// adopts the maps), so a change to the algorithm's output shows here.
    #[test]
    fn tables_are_pinned_across_versions() {
        let digest = |t: &[u32]| t.iter().fold(0u64, |h, &id| splitmix64(h ^ u64::from(id)));
        let keys = |n: u64| (1..=n).map(|i| (0xc612_0000 + i) << 16 | 8080);
        let equal: Vec<_> = keys(1_000)
            .enumerate()
            .map(|(i, k)| backend(k, i as u32, 1))
            .collect();
        let weighted: Vec<_> = keys(100)
            .enumerate()
            .map(|(i, k)| backend(k, i as u32, 1 + (i as u32 % 7)))
            .collect();
        let got = [
            digest(&build(&equal, M).expect("valid input")),
            digest(&build(&weighted, M).expect("valid input")),
            digest(&build(&equal[..10], 251).expect("valid input")),
        ];
        assert_eq!(
            got,
            [
                0xb4ca_cad0_683b_c148,
                0x2f5c_485d_dcd5_cc7c,
                0x90f9_4321_aa5d_768c
            ],
            "{got:#x?}"
        );
    }

    /// `n` distinct keys.
    fn keys(n: impl Strategy<Value = usize>) -> impl Strategy<Value = BTreeSet<u64>> {
        n.prop_flat_map(|n| prop::collection::btree_set(any::<u64>(), n))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Every slot holds an id of an input backend with weight > 0.
        #[test]
        fn every_slot_filled_with_weighted_id(
            keys in keys(1usize..=50),
            weights in prop::collection::vec(0u32..=4, 50),
        ) {
            let b: Vec<_> = keys
                .iter()
                .zip(&weights)
                .enumerate()
                .map(|(i, (&k, &w))| backend(k, i as u32 * 3 + 1, w))
                .collect();
            let t = build(&b, M).expect("valid input");
            assert_eq!(t.len(), M as usize, "table length");
            let weighted: BTreeSet<u32> =
                b.iter().filter(|b| b.weight > 0).map(|b| b.id).collect();
            if weighted.is_empty() {
                assert!(t.iter().all(|&id| id == NO_BACKEND), "slot filled without backends");
            } else {
                for (slot, id) in t.iter().enumerate() {
                    assert!(weighted.contains(id), "slot {slot} holds {id}, not a weighted id");
                }
            }
        }

        /// The same set in any order gives the same table.
        #[test]
        fn deterministic_and_order_independent(
            (b, shuffled) in keys(1usize..=60).prop_flat_map(|keys| {
                let b: Vec<_> = keys
                    .iter()
                    .enumerate()
                    .map(|(i, &k)| backend(k, i as u32, (k % 5) as u32 + 1))
                    .collect();
                (Just(b.clone()), Just(b).prop_shuffle())
            }),
        ) {
            let t1 = build(&b, M).expect("valid input");
            let t2 = build(&b, M).expect("valid input");
            let t3 = build(&shuffled, M).expect("valid input");
            assert!(t1 == t2, "two builds of the same input differ");
            assert!(t1 == t3, "input order changed {} slots", changed(&t1, &t3));
        }

        /// Backend i gets M * w_i / W slots, off by less than N * w_i / W + 1
        /// (see the module doc). For these inputs that is at most 0.08% of
        /// the table, far inside 1 percentage point.
        #[test]
        fn weights_honoured(
            (keys, weights) in keys(1usize..=50).prop_flat_map(|keys| {
                let n = keys.len();
                let weight = prop_oneof![1u32..=10, 1u32..=1000, 1u32..=u32::MAX];
                (Just(keys), prop::collection::vec(weight, n))
            }),
        ) {
            let b: Vec<_> = keys
                .iter()
                .zip(&weights)
                .enumerate()
                .map(|(i, (&k, &w))| backend(k, i as u32, w))
                .collect();
            let t = build(&b, M).expect("valid input");
            let c = counts(&t);
            let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
            let n = b.len() as f64;
            for b in &b {
                let share = f64::from(b.weight) / total;
                let got = c.get(&b.id).copied().unwrap_or(0) as f64;
                let want = f64::from(M) * share;
                let tolerance = n * share + 1.0;
                assert!(
                    (got - want).abs() <= tolerance,
                    "backend {} (weight {}): {got} slots, want {want:.1} ± {tolerance:.1}",
                    b.id,
                    b.weight
                );
                assert!(
                    (got / f64::from(M) - share).abs() <= 0.01,
                    "backend {} off by more than 1 percentage point",
                    b.id
                );
            }
        }

        /// The two schedules hand out the same turns, so the same table.
        #[test]
        fn schedules_agree(
            (keys, weights) in keys(1usize..=40).prop_flat_map(|keys| {
                let n = keys.len();
                let weight = prop_oneof![Just(7u32), 1u32..=3, 1u32..=1000, 1u32..=u32::MAX];
                (Just(keys), prop::collection::vec(weight, n))
            }),
            m in prop::sample::select(vec![41u32, 1009, 65_537]),
        ) {
            let b: Vec<_> = keys
                .iter()
                .zip(&weights)
                .enumerate()
                .map(|(i, (&k, &w))| backend(k, i as u32, w))
                .collect();
            let dense = build_with(&b, m, Some(Schedule::Dense), None).expect("valid input");
            let sparse = build_with(&b, m, Some(Schedule::Sparse), None).expect("valid input");
            assert!(dense == sparse, "schedules differ in {} slots", changed(&dense, &sparse));
        }

        /// Claims from the list of free slots take the slot probing takes,
        /// whenever the build switches to them (never, at the default
        /// point, or from the first claim).
        #[test]
        fn listed_claims_agree_with_probing(
            (keys, weights) in keys(1usize..=60).prop_flat_map(|keys| {
                let n = keys.len();
                let weight = prop_oneof![Just(1u32), 1u32..=5, 1u32..=1000];
                (Just(keys), prop::collection::vec(weight, n))
            }),
            m in prop::sample::select(vec![2u32, 41, 1009, 65_537]),
        ) {
            let b: Vec<_> = keys
                .iter()
                .zip(&weights)
                .enumerate()
                .filter(|(i, _)| *i < m as usize)
                .map(|(i, (&k, &w))| backend(k, i as u32, w))
                .collect();
            let probed = build_with(&b, m, None, Some(0)).expect("valid input");
            for list_below in [None, Some(m.min(5_000))] {
                let listed = build_with(&b, m, None, list_below).expect("valid input");
                assert!(
                    probed == listed,
                    "listing below {list_below:?} changed {} slots",
                    changed(&probed, &listed)
                );
            }
        }

        /// Removing one of N equal-weight backends changes at most 1/N + 1%
        /// of the slots (its own slots included).
        #[test]
        fn removal_is_minimally_disruptive(
            keys in keys(2usize..=100),
            removed in any::<prop::sample::Index>(),
        ) {
            let b = equal(&keys);
            check_removal(&b, removed.index(b.len()));
        }

        /// Adding a backend to N equal-weight ones changes at most 1/(N+1) + 1%
        /// of the slots.
        #[test]
        fn addition_is_minimally_disruptive(keys in keys(2usize..=101), added in any::<prop::sample::Index>()) {
            let all = equal(&keys);
            let added = added.index(all.len());
            let mut before = all.clone();
            before.remove(added);
            let t_before = build(&before, M).expect("valid input");
            let t_after = build(&all, M).expect("valid input");
            let frac = changed(&t_before, &t_after) as f64 / f64::from(M);
            let bound = 1.0 / all.len() as f64 + 0.01;
            assert!(
                frac <= bound,
                "adding a backend to {} changed {:.3}% of slots, bound {:.3}%",
                before.len(),
                frac * 100.0,
                bound * 100.0
            );
        }
    }
}
