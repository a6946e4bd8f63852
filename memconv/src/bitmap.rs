//! The canonical per-4K attribute bitmap (1 = private) with per-2M-chunk counts, and the
//! bitmap of accepted 2 MiB units.
//!
//! [`PageBits`] is a plain fixed-size bitset with word-at-a-time range operations;
//! [`Attributes`] keeps the per-page attribute bits plus, per chunk, the number of private
//! pages (so "mixed", "uniform" and the double-allocation figure are O(1) per chunk) and the
//! running count of mixed chunks.

use crate::abi::PAGES_PER_CHUNK;

/// A fixed-size bitset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageBits {
    words: Vec<u64>,
    len: u64,
}

impl PageBits {
    /// `len` bits, all `value`.
    pub fn new(len: u64, value: bool) -> Self {
        let nwords = len.div_ceil(64) as usize;
        let mut b = PageBits {
            words: vec![if value { u64::MAX } else { 0 }; nwords],
            len,
        };
        b.clear_tail();
        b
    }

    fn clear_tail(&mut self) {
        let rem = self.len % 64;
        if rem != 0 {
            if let Some(w) = self.words.last_mut() {
                *w &= (1u64 << rem) - 1;
            }
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// No bits at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bit `i` (false when out of range).
    pub fn get(&self, i: u64) -> bool {
        if i >= self.len {
            return false;
        }
        self.words[(i / 64) as usize] >> (i % 64) & 1 != 0
    }

    /// Set bit `i` (ignored when out of range).
    pub fn set(&mut self, i: u64, v: bool) {
        if i >= self.len {
            return;
        }
        let w = &mut self.words[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    fn mask(lo: u64, hi: u64) -> u64 {
        // bits [lo, hi) within one word, 0 <= lo < hi <= 64
        let upper = if hi == 64 { u64::MAX } else { (1u64 << hi) - 1 };
        upper & !((1u64 << lo) - 1)
    }

    /// The pieces of `[a, b)` (clamped to `len`) that lie within one word each: (word index,
    /// index of that word's bit 0, mask of the piece).
    fn pieces(len: u64, a: u64, b: u64) -> impl Iterator<Item = (usize, u64, u64)> {
        let b = b.min(len);
        let mut i = a;
        std::iter::from_fn(move || {
            (i < b).then(|| {
                let lo = i % 64;
                let base = i - lo;
                let hi = (b - base).min(64);
                i = base + hi;
                ((base / 64) as usize, base, Self::mask(lo, hi))
            })
        })
    }

    /// Set bits `[a, b)` to `v` (clamped to the length).
    pub fn set_range(&mut self, a: u64, b: u64, v: bool) {
        for (w, _, m) in Self::pieces(self.len, a, b) {
            if v {
                self.words[w] |= m;
            } else {
                self.words[w] &= !m;
            }
        }
    }

    /// Number of set bits in `[a, b)`.
    pub fn count_range(&self, a: u64, b: u64) -> u64 {
        Self::pieces(self.len, a, b)
            .map(|(w, _, m)| (self.words[w] & m).count_ones() as u64)
            .sum()
    }

    /// Number of set bits.
    pub fn count_ones(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }

    /// Number of bits set in both.
    pub fn count_and(&self, other: &PageBits) -> u64 {
        self.words
            .iter()
            .zip(other.words.iter())
            .map(|(a, b)| (a & b).count_ones() as u64)
            .sum()
    }

    /// First index in `[a, b)` whose bit equals `v`, or `b`.
    pub fn find(&self, a: u64, b: u64, v: bool) -> u64 {
        for (w, base, m) in Self::pieces(self.len, a, b) {
            let word = if v { self.words[w] } else { !self.words[w] };
            let hit = word & m;
            if hit != 0 {
                return base + hit.trailing_zeros() as u64;
            }
        }
        b.min(self.len)
    }

    /// Push onto `out` the maximal runs `[s, e)` inside `[a, b)` whose bits equal `v`.
    pub fn runs(&self, a: u64, b: u64, v: bool, out: &mut Vec<(u64, u64)>) {
        let b = b.min(self.len);
        let mut i = a;
        while i < b {
            let s = self.find(i, b, v);
            if s >= b {
                break;
            }
            let e = self.find(s, b, !v);
            out.push((s, e));
            i = e;
        }
    }
}

/// Which side owns a page.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    /// The private store.
    Private,
    /// The shared store.
    Shared,
}

impl Side {
    /// The side for a bitmap value (true = private).
    pub fn from_private(p: bool) -> Side {
        if p {
            Side::Private
        } else {
            Side::Shared
        }
    }

    /// The other side.
    pub fn other(self) -> Side {
        match self {
            Side::Private => Side::Shared,
            Side::Shared => Side::Private,
        }
    }

    /// Index of this side in per-side arrays (`[private, shared]`).
    pub fn index(self) -> usize {
        match self {
            Side::Private => 0,
            Side::Shared => 1,
        }
    }

    /// "private" or "shared".
    pub fn name(self) -> &'static str {
        match self {
            Side::Private => "private",
            Side::Shared => "shared",
        }
    }
}

/// Per-4K attributes plus per-chunk private-page counts.
#[derive(Clone, Debug)]
pub struct Attributes {
    bits: PageBits,
    private_count: Vec<u16>,
    mixed: u64,
}

impl Attributes {
    /// `npages` pages, all private. `npages` is a multiple of 512.
    pub fn new_private(npages: u64) -> Self {
        let chunks = npages / PAGES_PER_CHUNK;
        Attributes {
            bits: PageBits::new(npages, true),
            private_count: vec![PAGES_PER_CHUNK as u16; chunks as usize],
            mixed: 0,
        }
    }

    /// The page bits (1 = private).
    pub fn bits(&self) -> &PageBits {
        &self.bits
    }

    /// Number of pages.
    pub fn npages(&self) -> u64 {
        self.bits.len()
    }

    /// Number of 2 MiB chunks.
    pub fn nchunks(&self) -> u64 {
        self.private_count.len() as u64
    }

    /// Is page `p` private?
    pub fn is_private(&self, p: u64) -> bool {
        self.bits.get(p)
    }

    /// Private pages in chunk `c`.
    pub fn private_in_chunk(&self, c: u64) -> u64 {
        self.private_count.get(c as usize).copied().unwrap_or(0) as u64
    }

    /// Pages of `side` in chunk `c`.
    pub fn in_chunk(&self, c: u64, side: Side) -> u64 {
        match side {
            Side::Private => self.private_in_chunk(c),
            Side::Shared => PAGES_PER_CHUNK - self.private_in_chunk(c),
        }
    }

    /// Chunk `c` has pages of both sides.
    pub fn is_mixed(&self, c: u64) -> bool {
        let p = self.private_in_chunk(c);
        p != 0 && p != PAGES_PER_CHUNK
    }

    /// The side owning all of chunk `c`, if it is uniform.
    pub fn uniform(&self, c: u64) -> Option<Side> {
        match self.private_in_chunk(c) {
            0 => Some(Side::Shared),
            PAGES_PER_CHUNK => Some(Side::Private),
            _ => None,
        }
    }

    /// Number of mixed chunks.
    pub fn mixed_chunks(&self) -> u64 {
        self.mixed
    }

    /// Set pages `[a, b)` to `side`, keeping counts. The caller guarantees every page in the
    /// range currently has the other side (it passes runs found by [`PageBits::runs`]).
    pub fn flip_run(&mut self, a: u64, b: u64, side: Side) {
        let b = b.min(self.npages());
        if a >= b {
            return;
        }
        let to_private = side == Side::Private;
        self.bits.set_range(a, b, to_private);
        let mut p = a;
        while p < b {
            let c = p / PAGES_PER_CHUNK;
            let end = ((c + 1) * PAGES_PER_CHUNK).min(b);
            let n = (end - p) as u16;
            let was_mixed = self.is_mixed(c);
            if let Some(cnt) = self.private_count.get_mut(c as usize) {
                if to_private {
                    *cnt = cnt.saturating_add(n);
                } else {
                    *cnt = cnt.saturating_sub(n);
                }
            }
            let now_mixed = self.is_mixed(c);
            if was_mixed && !now_mixed {
                self.mixed -= 1;
            } else if !was_mixed && now_mixed {
                self.mixed += 1;
            }
            p = end;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn bits_match_model(len in 1u64..700, ops in proptest::collection::vec((0u64..800, 0u64..800, any::<bool>()), 0..40)) {
            let mut b = PageBits::new(len, false);
            let mut m = vec![false; len as usize];
            for (x, y, v) in ops {
                let (a, e) = (x.min(y), x.max(y));
                b.set_range(a, e, v);
                for i in a..e.min(len) { m[i as usize] = v; }
                let a2 = a.min(len);
                let e2 = e.min(len);
                prop_assert_eq!(b.count_range(a2, e2), m[a2 as usize..e2 as usize].iter().filter(|x| **x).count() as u64);
                let mut runs = Vec::new();
                b.runs(0, len, true, &mut runs);
                let mut m2 = vec![false; len as usize];
                for (s, e) in &runs { for i in *s..*e { m2[i as usize] = true; } }
                prop_assert_eq!(&m2, &m);
                for w in runs.windows(2) { prop_assert!(w[0].1 < w[1].0); }
            }
            for i in 0..len { prop_assert_eq!(b.get(i), m[i as usize]); }
            prop_assert_eq!(b.count_ones(), m.iter().filter(|x| **x).count() as u64);
        }
    }

    #[test]
    fn attributes_counts_and_mixed() {
        let mut a = Attributes::new_private(4 * PAGES_PER_CHUNK);
        a.flip_run(510, 515, Side::Shared);
        assert_eq!(a.mixed_chunks(), 2);
        assert_eq!(a.private_in_chunk(0), 510);
        assert_eq!(a.private_in_chunk(1), 509);
        a.flip_run(0, 510, Side::Shared);
        a.flip_run(512, 515, Side::Private);
        assert_eq!(a.mixed_chunks(), 0);
        assert_eq!(a.uniform(0), Some(Side::Shared));
        assert_eq!(a.uniform(1), Some(Side::Private));
        a.flip_run(1000, 1030, Side::Shared);
        assert_eq!(a.mixed_chunks(), 2);
    }
}
