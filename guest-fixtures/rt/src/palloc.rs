//! Physical memory allocator over `[BootInfo::free_start, BootInfo::ram_size)`: 2 MiB-aligned
//! runs of 2 MiB chunks, and 4 KiB pages carved out of chunks.
//!
//! All bookkeeping lives in this structure (bitmaps, never inside the managed memory), so a
//! page the guest has converted to shared, which the host may write, never carries allocator
//! metadata. [`PhysAlloc`] is pure logic (host-tested); the global instance behind a spinlock is
//! [`global`]. Chunks come first-fit from the lowest address, so freed (and, later, already
//! accepted) memory is reused first.
//!
//! # Lazy acceptance
//! Guest RAM starts unaccepted. Chunks enter use only in `take_run`, which accepts every chunk
//! of the run that is not yet accepted, through the acceptor the runtime installs
//! ([`PhysAlloc::set_acceptor`]: `OP_ACCEPT` in the guest, a fake in host tests), one request
//! per contiguous unaccepted stretch. The `accepted` bitmap is the canonical record: a chunk is
//! accepted at most once, ever (freeing keeps it accepted; it is reused first). A chunk whose
//! acceptance fails is quarantined ("bad": never handed out) rather than retried, since its
//! state is then unknown. Callers that accept memory themselves (the `convert` fixture's
//! double-accept check) take never-accepted chunks with
//! [`PhysAlloc::alloc_chunks_unaccepted`] and record their accept with
//! [`PhysAlloc::note_accepted`].

use memconv::abi::{HUGE_PAGE_SIZE, MAX_RAM, PAGES_PER_CHUNK, PAGE_SIZE, STATUS_OK};

/// Most 2 MiB chunks of RAM (the whole of `MAX_RAM`).
pub const MAX_CHUNKS: usize = (MAX_RAM / HUGE_PAGE_SIZE) as usize;
const WORDS: usize = MAX_CHUNKS / 64;
/// Most chunks carved into 4 KiB pages at once (256 x 2 MiB = 512 MiB of 4 KiB pages).
pub const PAGE_CHUNK_SLOTS: usize = 256;
const PAGE_WORDS: usize = (PAGES_PER_CHUNK / 64) as usize;

/// Why a free was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllocError {
    /// The address is not aligned to the unit freed (4 KiB page, 2 MiB chunk) or `n` is 0.
    Unaligned,
    /// The address is outside the managed range.
    OutOfRange,
    /// The page or chunk is not allocated (double free), or was allocated as the other kind.
    NotAllocated,
}

impl AllocError {
    /// A short name for messages.
    pub const fn name(self) -> &'static str {
        match self {
            AllocError::Unaligned => "unaligned",
            AllocError::OutOfRange => "out of range",
            AllocError::NotAllocated => "not allocated",
        }
    }
}

/// Occupancy figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocStats {
    /// Chunks managed.
    pub total_chunks: u64,
    /// Chunks neither handed out nor carved into pages.
    pub free_chunks: u64,
    /// Chunks carved into 4 KiB pages.
    pub page_chunks: u64,
    /// 4 KiB pages handed out.
    pub pages_in_use: u64,
    /// Chunks accepted (lazily, or recorded with `note_accepted`).
    pub accepted_chunks: u64,
    /// Accept requests sent by the allocator.
    pub accept_calls: u64,
    /// Accept requests the host refused (their chunks are quarantined).
    pub accept_failures: u64,
    /// Quarantined chunks.
    pub bad_chunks: u64,
}

/// Accepts `npages` 4 KiB pages at `gpa` (2 MiB aligned and sized); returns an abi status.
pub type Acceptor = fn(gpa: u64, npages: u64) -> u32;

#[derive(Clone, Copy)]
struct PageChunk {
    /// Chunk index + 1; 0 = empty slot (keeps the whole allocator zero-initialised, in .bss).
    chunk_plus1: u32,
    free: u32,
    used: [u64; PAGE_WORDS],
}

impl PageChunk {
    fn reset(&mut self, chunk_plus1: u32, free: u32) {
        self.chunk_plus1 = chunk_plus1;
        self.free = free;
        for w in self.used.iter_mut() {
            // SAFETY: `w` is a valid, aligned reference. Volatile because a plain loop (or
            // struct assignment) becomes a 64-byte memset inlined as SSE stores, which fail in
            // emulated mode.
            unsafe { core::ptr::write_volatile(w, 0) };
        }
    }
}

const EMPTY_SLOT: PageChunk = PageChunk {
    chunk_plus1: 0,
    free: 0,
    used: [0; PAGE_WORDS],
};

/// The allocator state. Chunk `i` is GPA `i * 2 MiB`.
pub struct PhysAlloc {
    first: u32,
    end: u32,
    /// Lowest chunk index that may be free.
    low: u32,
    /// Slot to try first for a page.
    slot_hint: u32,
    in_use: [u64; WORDS],
    page_chunk: [u64; WORDS],
    /// Canonical acceptance record, one bit per chunk.
    accepted: [u64; WORDS],
    /// Quarantined chunks (acceptance failed): in use forever.
    bad: [u64; WORDS],
    slots: [PageChunk; PAGE_CHUNK_SLOTS],
    pages_in_use: u64,
    acceptor: Option<Acceptor>,
    accept_calls: u64,
    accept_failures: u64,
}

impl Default for PhysAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl PhysAlloc {
    /// An allocator managing nothing (until [`PhysAlloc::init`]).
    pub const fn new() -> Self {
        PhysAlloc {
            first: 0,
            end: 0,
            low: 0,
            slot_hint: 0,
            in_use: [0; WORDS],
            page_chunk: [0; WORDS],
            accepted: [0; WORDS],
            bad: [0; WORDS],
            slots: [EMPTY_SLOT; PAGE_CHUNK_SLOTS],
            pages_in_use: 0,
            acceptor: None,
            accept_calls: 0,
            accept_failures: 0,
        }
    }

    /// Accept chunks lazily through `acceptor` from now on (`None`: treat memory as accepted,
    /// as before lazy acceptance; host tests of the plain allocator).
    pub fn set_acceptor(&mut self, acceptor: Option<Acceptor>) {
        self.acceptor = acceptor;
    }

    /// Whether chunk-aligned `gpa` is recorded as accepted.
    pub fn is_accepted(&self, gpa: u64) -> bool {
        let c = gpa / HUGE_PAGE_SIZE;
        c < MAX_CHUNKS as u64 && Self::bit(&self.accepted, c as u32)
    }

    /// Manage the whole 2 MiB chunks inside `[free_start, ram_end)`, all free. Forgets any
    /// previous state.
    pub fn init(&mut self, free_start: u64, ram_end: u64) {
        *self = Self::new();
        let first = free_start.div_ceil(HUGE_PAGE_SIZE).min(MAX_CHUNKS as u64);
        let end = (ram_end / HUGE_PAGE_SIZE).min(MAX_CHUNKS as u64).max(first);
        self.first = first as u32;
        self.end = end as u32;
        self.low = self.first;
    }

    /// Managed range `[start, end)` in bytes.
    pub fn range(&self) -> (u64, u64) {
        (
            self.first as u64 * HUGE_PAGE_SIZE,
            self.end as u64 * HUGE_PAGE_SIZE,
        )
    }

    fn bit(map: &[u64; WORDS], i: u32) -> bool {
        map[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    fn set(map: &mut [u64; WORDS], i: u32, v: bool) {
        let w = &mut map[(i / 64) as usize];
        if v {
            *w |= 1 << (i % 64);
        } else {
            *w &= !(1 << (i % 64));
        }
    }

    /// First-fit search for `n` free consecutive chunks, accepted as needed; marks them in use.
    fn take_run(&mut self, n: u32) -> Option<u32> {
        loop {
            let start = self.find_run(n, false)?;
            if self.accept_run(start, n) {
                return Some(start);
            }
            // Some chunks were quarantined; the rest went back. Search again.
        }
    }

    /// Accepts the unaccepted chunks of the in-use run `[start, start + n)`. On a refusal the
    /// refused stretch is quarantined, the rest of the run released, and false returned.
    fn accept_run(&mut self, start: u32, n: u32) -> bool {
        let Some(acceptor) = self.acceptor else {
            return true;
        };
        let end = start + n;
        let mut c = start;
        while c < end {
            if Self::bit(&self.accepted, c) {
                c += 1;
                continue;
            }
            let mut e = c + 1;
            while e < end && !Self::bit(&self.accepted, e) {
                e += 1;
            }
            self.accept_calls += 1;
            let status = acceptor(c as u64 * HUGE_PAGE_SIZE, (e - c) as u64 * PAGES_PER_CHUNK);
            if status != STATUS_OK {
                self.accept_failures += 1;
                for b in c..e {
                    Self::set(&mut self.bad, b, true);
                }
                for k in start..end {
                    if !Self::bit(&self.bad, k) {
                        self.release_run(k, 1);
                    }
                }
                return false;
            }
            for a in c..e {
                Self::set(&mut self.accepted, a, true);
            }
            c = e;
        }
        true
    }

    /// First-fit search for `n` free consecutive chunks (never accepted ones only, if
    /// `unaccepted`); marks them in use.
    fn find_run(&mut self, n: u32, unaccepted: bool) -> Option<u32> {
        if n == 0 {
            return None;
        }
        let mut i = self.low;
        let mut run = 0u32;
        while i < self.end {
            if run == 0 && i.is_multiple_of(64) && self.in_use[(i / 64) as usize] == u64::MAX {
                i += 64;
                continue;
            }
            if Self::bit(&self.in_use, i) || (unaccepted && Self::bit(&self.accepted, i)) {
                run = 0;
            } else {
                run += 1;
                if run == n {
                    let start = i + 1 - n;
                    for c in start..=i {
                        Self::set(&mut self.in_use, c, true);
                    }
                    if start == self.low {
                        self.low = i + 1;
                    }
                    return Some(start);
                }
            }
            i += 1;
        }
        None
    }

    fn release_run(&mut self, start: u32, n: u32) {
        for c in start..start + n {
            Self::set(&mut self.in_use, c, false);
        }
        self.low = self.low.min(start);
    }

    /// `n` contiguous 2 MiB chunks (2 MiB aligned): their first GPA, or `None` if no such run
    /// is free (or `n` is 0).
    pub fn alloc_chunks(&mut self, n: usize) -> Option<u64> {
        let n = u32::try_from(n).ok()?;
        self.take_run(n).map(|c| c as u64 * HUGE_PAGE_SIZE)
    }

    /// `n` contiguous chunks that have never been accepted, marked in use but not accepted:
    /// the caller accepts them itself and then records it with [`PhysAlloc::note_accepted`]
    /// (else the allocator would accept them again once they are freed and reused).
    pub fn alloc_chunks_unaccepted(&mut self, n: usize) -> Option<u64> {
        let n = u32::try_from(n).ok()?;
        self.find_run(n, true).map(|c| c as u64 * HUGE_PAGE_SIZE)
    }

    /// Record that the caller accepted the `n` allocated chunks at `gpa` itself.
    pub fn note_accepted(&mut self, gpa: u64, n: usize) -> Result<(), AllocError> {
        let (start, end) = self.chunk_range(gpa, n)?;
        for c in start..end {
            if !Self::bit(&self.in_use, c) {
                return Err(AllocError::NotAllocated);
            }
        }
        for c in start..end {
            Self::set(&mut self.accepted, c, true);
        }
        Ok(())
    }

    fn chunk_range(&self, gpa: u64, n: usize) -> Result<(u32, u32), AllocError> {
        if !gpa.is_multiple_of(HUGE_PAGE_SIZE) || n == 0 {
            return Err(AllocError::Unaligned);
        }
        let start = gpa / HUGE_PAGE_SIZE;
        let end = start.checked_add(n as u64).ok_or(AllocError::OutOfRange)?;
        if start < self.first as u64 || end > self.end as u64 {
            return Err(AllocError::OutOfRange);
        }
        Ok((start as u32, end as u32))
    }

    /// Return `n` chunks from [`PhysAlloc::alloc_chunks`] (any sub-run of an allocation may be
    /// freed separately). Nothing changes on error.
    pub fn free_chunks(&mut self, gpa: u64, n: usize) -> Result<(), AllocError> {
        if !gpa.is_multiple_of(HUGE_PAGE_SIZE) || n == 0 {
            return Err(AllocError::Unaligned);
        }
        let start = gpa / HUGE_PAGE_SIZE;
        let end = start.checked_add(n as u64).ok_or(AllocError::OutOfRange)?;
        if start < self.first as u64 || end > self.end as u64 {
            return Err(AllocError::OutOfRange);
        }
        let (start, end) = (start as u32, end as u32);
        for c in start..end {
            if !Self::bit(&self.in_use, c)
                || Self::bit(&self.page_chunk, c)
                || Self::bit(&self.bad, c)
            {
                return Err(AllocError::NotAllocated);
            }
        }
        self.release_run(start, end - start);
        Ok(())
    }

    /// One 4 KiB page, or `None` when RAM (or the page-chunk slots) is exhausted.
    pub fn alloc_page(&mut self) -> Option<u64> {
        let hint = self.slot_hint as usize;
        for k in 0..PAGE_CHUNK_SLOTS {
            let s = (hint + k) % PAGE_CHUNK_SLOTS;
            if self.slots[s].chunk_plus1 != 0 && self.slots[s].free > 0 {
                self.slot_hint = s as u32;
                return Some(self.take_page_in(s));
            }
        }
        let s = (0..PAGE_CHUNK_SLOTS).find(|&s| self.slots[s].chunk_plus1 == 0)?;
        let chunk = self.take_run(1)?;
        Self::set(&mut self.page_chunk, chunk, true);
        self.slots[s].reset(chunk + 1, PAGES_PER_CHUNK as u32);
        self.slot_hint = s as u32;
        Some(self.take_page_in(s))
    }

    fn take_page_in(&mut self, s: usize) -> u64 {
        let slot = &mut self.slots[s];
        let mut page = 0u64;
        for (w, word) in slot.used.iter_mut().enumerate() {
            if *word != u64::MAX {
                let b = (!*word).trailing_zeros();
                *word |= 1 << b;
                page = w as u64 * 64 + b as u64;
                break;
            }
        }
        slot.free -= 1;
        self.pages_in_use += 1;
        (slot.chunk_plus1 - 1) as u64 * HUGE_PAGE_SIZE + page * PAGE_SIZE
    }

    /// Return a page from [`PhysAlloc::alloc_page`]. A chunk whose pages are all free again is
    /// released. Nothing changes on error.
    pub fn free_page(&mut self, gpa: u64) -> Result<(), AllocError> {
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(AllocError::Unaligned);
        }
        let chunk = gpa / HUGE_PAGE_SIZE;
        if chunk < self.first as u64 || chunk >= self.end as u64 {
            return Err(AllocError::OutOfRange);
        }
        let chunk = chunk as u32;
        if !Self::bit(&self.page_chunk, chunk) {
            return Err(AllocError::NotAllocated);
        }
        let s = (0..PAGE_CHUNK_SLOTS)
            .find(|&s| self.slots[s].chunk_plus1 == chunk + 1)
            .ok_or(AllocError::NotAllocated)?;
        let page = (gpa % HUGE_PAGE_SIZE) / PAGE_SIZE;
        let (w, b) = ((page / 64) as usize, page % 64);
        let slot = &mut self.slots[s];
        if slot.used[w] & (1 << b) == 0 {
            return Err(AllocError::NotAllocated);
        }
        slot.used[w] &= !(1 << b);
        slot.free += 1;
        self.pages_in_use -= 1;
        if slot.free == PAGES_PER_CHUNK as u32 {
            self.slots[s].reset(0, 0);
            Self::set(&mut self.page_chunk, chunk, false);
            self.release_run(chunk, 1);
        }
        Ok(())
    }

    /// Current occupancy.
    pub fn stats(&self) -> AllocStats {
        let mut st = AllocStats {
            total_chunks: (self.end - self.first) as u64,
            pages_in_use: self.pages_in_use,
            accept_calls: self.accept_calls,
            accept_failures: self.accept_failures,
            ..AllocStats::default()
        };
        for c in self.first..self.end {
            if Self::bit(&self.accepted, c) {
                st.accepted_chunks += 1;
            }
            if Self::bit(&self.bad, c) {
                st.bad_chunks += 1;
            }
            if !Self::bit(&self.in_use, c) {
                st.free_chunks += 1;
            }
            if Self::bit(&self.page_chunk, c) {
                st.page_chunks += 1;
            }
        }
        st
    }
}

/// The guest-wide allocator, initialised by the runtime on vCPU 0 before `main` runs.
#[cfg(all(feature = "bare-metal", not(test)))]
pub mod global {
    use super::{AllocError, AllocStats, PhysAlloc};
    use crate::sync::SpinLock;

    static ALLOC: SpinLock<PhysAlloc> = SpinLock::new(PhysAlloc::new());

    pub(crate) fn init(free_start: u64, ram_end: u64, acceptor: Option<super::Acceptor>) {
        let mut a = ALLOC.lock();
        a.init(free_start, ram_end);
        a.set_acceptor(acceptor);
    }

    /// See [`PhysAlloc::alloc_chunks_unaccepted`].
    pub fn alloc_chunks_unaccepted(n: usize) -> Option<u64> {
        ALLOC.lock().alloc_chunks_unaccepted(n)
    }

    /// See [`PhysAlloc::note_accepted`].
    pub fn note_accepted(gpa: u64, n: usize) -> Result<(), AllocError> {
        ALLOC.lock().note_accepted(gpa, n)
    }

    /// See [`PhysAlloc::is_accepted`].
    pub fn is_accepted(gpa: u64) -> bool {
        ALLOC.lock().is_accepted(gpa)
    }

    /// See [`PhysAlloc::alloc_page`].
    pub fn alloc_page() -> Option<u64> {
        ALLOC.lock().alloc_page()
    }

    /// See [`PhysAlloc::free_page`].
    pub fn free_page(gpa: u64) -> Result<(), AllocError> {
        ALLOC.lock().free_page(gpa)
    }

    /// See [`PhysAlloc::alloc_chunks`].
    pub fn alloc_chunks(n: usize) -> Option<u64> {
        ALLOC.lock().alloc_chunks(n)
    }

    /// See [`PhysAlloc::free_chunks`].
    pub fn free_chunks(gpa: u64, n: usize) -> Result<(), AllocError> {
        ALLOC.lock().free_chunks(gpa, n)
    }

    /// See [`PhysAlloc::stats`].
    pub fn stats() -> AllocStats {
        ALLOC.lock().stats()
    }

    /// See [`PhysAlloc::range`].
    pub fn range() -> (u64, u64) {
        ALLOC.lock().range()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    const M: u64 = 1 << 20;

    fn new(free_start: u64, ram: u64) -> Box<PhysAlloc> {
        let mut a = Box::new(PhysAlloc::new());
        a.init(free_start, ram);
        a
    }

    #[test]
    fn range_rounds_inwards() {
        let a = new(9 * M, 65 * M);
        assert_eq!(a.range(), (10 * M, 64 * M));
        assert_eq!(a.stats().total_chunks, 27);
        let e = new(64 * M, 32 * M);
        assert_eq!(e.stats().total_chunks, 0);
        let huge = new(0, u64::MAX);
        assert_eq!(huge.stats().total_chunks, MAX_CHUNKS as u64);
    }

    #[test]
    fn chunks_exhaust_and_reuse() {
        let mut a = new(10 * M, 20 * M);
        let got: Vec<u64> = (0..5).map(|_| a.alloc_chunks(1).unwrap()).collect();
        assert_eq!(got, [10 * M, 12 * M, 14 * M, 16 * M, 18 * M]);
        assert_eq!(a.alloc_chunks(1), None);
        assert_eq!(a.alloc_chunks(0), None);
        a.free_chunks(14 * M, 1).unwrap();
        assert_eq!(a.free_chunks(14 * M, 1), Err(AllocError::NotAllocated));
        assert_eq!(a.free_chunks(15 * M, 1), Err(AllocError::Unaligned));
        assert_eq!(a.free_chunks(14 * M, 0), Err(AllocError::Unaligned));
        assert_eq!(a.free_chunks(8 * M, 1), Err(AllocError::OutOfRange));
        assert_eq!(a.free_chunks(18 * M, 2), Err(AllocError::OutOfRange));
        assert_eq!(a.alloc_chunks(1), Some(14 * M));
        assert_eq!(a.stats().free_chunks, 0);
    }

    #[test]
    fn runs_are_contiguous_first_fit() {
        let mut a = new(0, 64 * M); // 32 chunks
        let x = a.alloc_chunks(3).unwrap();
        let y = a.alloc_chunks(2).unwrap();
        assert_eq!((x, y), (0, 6 * M));
        a.free_chunks(2 * M, 1).unwrap(); // a one-chunk hole at chunk 1
        assert_eq!(a.alloc_chunks(2), Some(10 * M));
        assert_eq!(a.alloc_chunks(1), Some(2 * M));
        assert_eq!(a.alloc_chunks(26), None);
        assert_eq!(a.alloc_chunks(25), Some(14 * M));
        assert_eq!(a.alloc_chunks(1), None);
        // Free the middle of a run, then all of the rest of it.
        a.free_chunks(16 * M, 2).unwrap();
        assert_eq!(a.free_chunks(14 * M, 3), Err(AllocError::NotAllocated));
        a.free_chunks(14 * M, 1).unwrap();
        assert_eq!(a.alloc_chunks(3), Some(14 * M));
    }

    #[test]
    fn runs_cross_bitmap_words() {
        let mut a = new(0, 512 * M); // 256 chunks, 4 bitmap words
        for i in 0..70 {
            assert_eq!(a.alloc_chunks(1), Some(i * 2 * M));
        }
        assert_eq!(a.alloc_chunks(100), Some(140 * M));
        a.free_chunks(0, 64).unwrap();
        assert_eq!(a.alloc_chunks(65), Some(340 * M));
        assert_eq!(a.alloc_chunks(64), Some(0));
        assert_eq!(a.stats().free_chunks, 256 - 170 - 65);
    }

    #[test]
    fn pages_share_a_chunk_and_release_it() {
        let mut a = new(4 * M, 16 * M); // chunks 2..8
        let mut pages = Vec::new();
        for i in 0..PAGES_PER_CHUNK {
            let p = a.alloc_page().unwrap();
            assert_eq!(p, 4 * M + i * PAGE_SIZE);
            pages.push(p);
        }
        let next = a.alloc_page().unwrap();
        assert_eq!(next, 6 * M);
        assert_eq!(a.stats().page_chunks, 2);
        assert_eq!(a.stats().pages_in_use, 513);
        // A page chunk cannot be freed as a chunk, nor a chunk as a page.
        assert_eq!(a.free_chunks(4 * M, 1), Err(AllocError::NotAllocated));
        let c = a.alloc_chunks(1).unwrap();
        assert_eq!(a.free_page(c), Err(AllocError::NotAllocated));
        assert_eq!(a.free_page(4 * M + 1), Err(AllocError::Unaligned));
        assert_eq!(a.free_page(0), Err(AllocError::OutOfRange));
        for p in &pages {
            a.free_page(*p).unwrap();
        }
        assert_eq!(a.free_page(pages[3]), Err(AllocError::NotAllocated));
        let st = a.stats();
        assert_eq!((st.page_chunks, st.pages_in_use), (1, 1));
        assert_eq!(st.free_chunks, 6 - 2);
        // The released chunk is the lowest free one again.
        assert_eq!(a.alloc_chunks(1), Some(4 * M));
    }

    #[test]
    fn random_against_a_model() {
        let mut a = new(10 * M, 74 * M); // 32 chunks
        let (lo, hi) = a.range();
        let mut pages = BTreeSet::new();
        let mut runs: Vec<(u64, usize)> = Vec::new();
        let mut x = 0x1234_5678_9abc_def1u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            match rnd() % 4 {
                0 | 1 => {
                    if let Some(p) = a.alloc_page() {
                        assert!(p >= lo && p < hi && p % PAGE_SIZE == 0);
                        assert!(pages.insert(p), "page handed out twice");
                    }
                }
                2 => {
                    let n = (rnd() % 3 + 1) as usize;
                    if let Some(g) = a.alloc_chunks(n) {
                        assert!(g % HUGE_PAGE_SIZE == 0 && g >= lo);
                        assert!(g + n as u64 * HUGE_PAGE_SIZE <= hi);
                        runs.push((g, n));
                    }
                }
                _ => {
                    if rnd() % 2 == 0 && !pages.is_empty() {
                        let k = (rnd() % pages.len() as u64) as usize;
                        let p = *pages.iter().nth(k).unwrap();
                        pages.remove(&p);
                        a.free_page(p).unwrap();
                    } else if !runs.is_empty() {
                        let k = (rnd() % runs.len() as u64) as usize;
                        let (g, n) = runs.swap_remove(k);
                        a.free_chunks(g, n).unwrap();
                    }
                }
            }
            // No page lies in a chunk run, no two runs overlap.
            for &(g, n) in &runs {
                let end = g + n as u64 * HUGE_PAGE_SIZE;
                assert!(pages.range(g..end).next().is_none());
            }
            assert_eq!(a.stats().pages_in_use, pages.len() as u64);
        }
        let mut sorted = runs.clone();
        sorted.sort();
        for w in sorted.windows(2) {
            assert!(w[0].0 + w[0].1 as u64 * HUGE_PAGE_SIZE <= w[1].0);
        }
        for p in pages {
            a.free_page(p).unwrap();
        }
        for (g, n) in runs {
            a.free_chunks(g, n).unwrap();
        }
        let st = a.stats();
        assert_eq!(
            (st.free_chunks, st.page_chunks, st.pages_in_use),
            (32, 0, 0)
        );
    }

    thread_local! {
        /// (gpa, npages) of every accept the fake acceptor saw, and GPAs it refuses.
        static ACCEPTS: std::cell::RefCell<Vec<(u64, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
        static REFUSE: std::cell::Cell<u64> = const { std::cell::Cell::new(u64::MAX) };
    }

    /// A host that refuses a second accept of a unit, like memconv.
    fn fake_accept(gpa: u64, npages: u64) -> u32 {
        let refuse = REFUSE.with(|r| r.get());
        ACCEPTS.with(|a| {
            let mut a = a.borrow_mut();
            let end = gpa + npages * PAGE_SIZE;
            if refuse >= gpa && refuse < end {
                return memconv::abi::ERR_NO_MEMORY;
            }
            if a.iter().any(|&(g, n)| g < end && gpa < g + n * PAGE_SIZE) {
                return memconv::abi::ERR_DOUBLE_ACCEPT;
            }
            a.push((gpa, npages));
            STATUS_OK
        })
    }

    fn accepts() -> Vec<(u64, u64)> {
        ACCEPTS.with(|a| a.borrow().clone())
    }

    #[test]
    fn chunks_are_accepted_once_on_first_use() {
        let mut a = new(4 * M, 64 * M);
        a.set_acceptor(Some(fake_accept));
        assert!(accepts().is_empty(), "nothing is accepted up front");
        let x = a.alloc_chunks(3).unwrap();
        assert_eq!(accepts(), [(x, 3 * PAGES_PER_CHUNK)]);
        let p = a.alloc_page().unwrap();
        assert_eq!(accepts().len(), 2);
        assert_eq!(accepts()[1], (p, PAGES_PER_CHUNK));
        // Freed chunks stay accepted and are reused without a new accept.
        a.free_chunks(x, 3).unwrap();
        assert_eq!(a.alloc_chunks(1), Some(x));
        // A run that is partly accepted: only the fresh stretch is accepted.
        a.free_page(p).unwrap();
        let y = a.alloc_chunks(5).unwrap();
        assert_eq!(y, x + 2 * M);
        let last = *accepts().last().unwrap();
        assert_eq!(last, (x + 8 * M, 2 * PAGES_PER_CHUNK));
        assert!(a.is_accepted(y) && !a.is_accepted(60 * M));
        let st = a.stats();
        assert_eq!(
            (st.accepted_chunks, st.accept_calls, st.accept_failures),
            (6, 3, 0)
        );
    }

    #[test]
    fn callers_can_accept_fresh_chunks_themselves() {
        let mut a = new(4 * M, 32 * M);
        a.set_acceptor(Some(fake_accept));
        let used = a.alloc_chunks(1).unwrap();
        a.free_chunks(used, 1).unwrap();
        // The unaccepted allocation skips the accepted (free) chunk.
        let u = a.alloc_chunks_unaccepted(1).unwrap();
        assert_ne!(u, used);
        assert!(!a.is_accepted(u));
        assert_eq!(fake_accept(u, PAGES_PER_CHUNK), STATUS_OK);
        a.note_accepted(u, 1).unwrap();
        a.free_chunks(u, 1).unwrap();
        // Reusing both never accepts twice (the fake host would refuse).
        let both = a.alloc_chunks(2);
        assert!(both.is_some());
        assert_eq!(a.stats().accept_failures, 0);
        assert_eq!(a.note_accepted(30 * M, 1), Err(AllocError::NotAllocated));
    }

    #[test]
    fn refused_accepts_quarantine_the_chunk() {
        let mut a = new(4 * M, 16 * M);
        a.set_acceptor(Some(fake_accept));
        REFUSE.with(|r| r.set(4 * M));
        // The host refuses the request for chunks 2..4 as a whole: both are quarantined.
        let x = a.alloc_chunks(2).unwrap();
        assert_eq!(x, 8 * M, "the refused chunks are skipped");
        let st = a.stats();
        assert_eq!((st.bad_chunks, st.accept_failures), (2, 1));
        assert_eq!(a.free_chunks(4 * M, 1), Err(AllocError::NotAllocated));
        // The rest of RAM remains usable.
        let mut n = 0;
        while a.alloc_chunks(1).is_some() {
            n += 1;
        }
        assert_eq!(n, 6 - 2 - 2);
    }
}
