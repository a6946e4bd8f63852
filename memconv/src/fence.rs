//! The DMA fence: device accesses to guest memory and conversions of the same pages exclude
//! each other, without the engine lock on the device's path.
//!
//! # Protocol
//!
//! State, all atomics owned by one [`Fence`]:
//! - per 4 KiB page (the pin unit, [`UNIT`]) a word: a pin count (bits 0..29), a CONVERTING
//!   bit (bit 31) and an UNBACKED bit (bit 30: the shared store is hugetlb and has no 2 MiB
//!   page allocated for the page's chunk, so a device access there would fault); 4 bytes per
//!   page of RAM (0.1%);
//! - a "shared" bitmap, one bit per 4 KiB page (1 = shared), a copy of the engine's canonical
//!   attributes that the engine updates while it holds CONVERTING on the pages (and UNBACKED
//!   for the chunks whose shared-store page it allocates or punches).
//!
//! Device side ([`Fence::pin`], reached through `ConversionService::pin_shared`): for every
//! unit a request touches (each unit once), one compare-and-swap raises the pin count if
//! CONVERTING is clear; a unit found CONVERTING makes the pin give back what it took and
//! fail with [`FenceError::Busy`] at once (the device requeues the request and retries: it
//! never waits for a vCPU while it holds a pin). With every unit pinned, the shared bits of
//! every range are checked; any private page fails the pin ([`FenceError::NotShared`]), and
//! so does an UNBACKED unit ([`FenceError::NotBacked`]: the device fails that request with an
//! I/O error instead of faulting; the engine never leaves a chunk with shared pages unbacked,
//! so this is the last line of defence, counted).
//! The returned [`DmaPin`] unpins on drop; the device moves the data while it holds it. One
//! pass, no lock: this is the one check per request on the fast path.
//!
//! Conversion side ([`Fence::begin_conversion`], called by the engine under its lock, so at
//! most one conversion runs at a time): set CONVERTING on every unit of the range (no new
//! pin succeeds on them from here), then wait for their pin counts to reach zero, yielding,
//! for at most the fence's bound; past it, clear the bits and return `Busy` (the guest gets
//! `ERR_BUSY` and retries). With the counts at zero no device access touches the pages;
//! the engine converts, updates the shared bits ([`Fence::set_shared`]) and drops the
//! [`Converting`] guard, which clears CONVERTING. A pin's compare-and-swap and the
//! converter's fetch-or act on the same word, so one of them sees the other: either the pin
//! came first and the conversion waits for it, or the pin sees CONVERTING and fails. A pin
//! that succeeds after the guard is dropped reads the updated bits (release/acquire on the
//! word): after a conversion to private returns, no pin succeeds on its pages.
//!
//! No deadlock with the pause-all around memslot edits: the converter waits only for pins,
//! with a bound; a pin holder never waits for a vCPU or for the engine lock.
//!
//! Granularity: pins are per 4 KiB page, so a conversion waits only for device accesses to
//! its own pages (per 2 MiB chunk, a pool's 4 KiB conversions waited for unrelated DMA in the
//! same chunk: the `dynamic` policy's transient buffers showed it). A 4 MiB request pins 1024
//! words, ~1% of its copy.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::abi::{HUGE_PAGE_SIZE, PAGE_SIZE};

const CONVERTING: u32 = 1 << 31;
const UNBACKED: u32 = 1 << 30;
const COUNT_MASK: u32 = UNBACKED - 1;

/// Bytes per pin unit: one word per 4 KiB page.
pub const UNIT: u64 = PAGE_SIZE;
const UNITS_PER_CHUNK: u64 = HUGE_PAGE_SIZE / UNIT;

/// Default bound of a conversion's wait for device accesses to drain.
pub const DEFAULT_WAIT_BOUND: Duration = Duration::from_millis(100);

/// Why a pin or a conversion's fence did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The range is not inside guest RAM (or overflows).
    #[error("range {gpa:#x}+{len:#x} is not inside guest RAM")]
    OutOfRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The page at `gpa` is private.
    #[error("page at {gpa:#x} is private")]
    NotShared {
        /// First private byte of the range.
        gpa: u64,
    },
    /// The shared store has no page allocated under `gpa` (hugetlb): an access would fault.
    #[error("no shared-store page is allocated at {gpa:#x}")]
    NotBacked {
        /// First unbacked byte of the range.
        gpa: u64,
    },
    /// A conversion holds a page (device side), or device accesses did not drain within the
    /// bound (conversion side): try again.
    #[error("busy: a conversion and a device access overlap; retry")]
    Busy,
}

/// Counters of the fence (relaxed atomics).
#[derive(Debug, Default)]
struct FenceCounters {
    pins: AtomicU64,
    pins_busy: AtomicU64,
    pins_unbacked: AtomicU64,
    conversion_waits: AtomicU64,
    conversions_busy: AtomicU64,
    wait_max_ns: AtomicU64,
}

/// A copy of the fence counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct FenceStats {
    /// Successful pins (device requests and ring rounds).
    pub pins: u64,
    /// Pins refused because a conversion held a page (the device retried).
    pub pins_busy: u64,
    /// Pins refused because a chunk had no shared-store page (never expected; an I/O error).
    pub pins_unbacked: u64,
    /// Conversions that found pins and waited for them.
    pub conversion_waits: u64,
    /// Conversions refused with `busy` after the bound.
    pub conversions_busy: u64,
    /// Longest wait of a conversion for pins to drain, nanoseconds.
    pub wait_max_ns: u64,
}

/// The fence over a guest RAM of `size` bytes.
pub struct Fence {
    size: u64,
    units: Box<[AtomicU32]>,
    /// What the UNBACKED bit of a unit means: with 0 a set bit is unbacked (the default is
    /// backed); with UNBACKED a clear bit is unbacked (the default is unbacked). So every unit
    /// starts at 0 whatever the store, and the array comes zeroed from the allocator.
    unbacked_flip: u32,
    shared: Box<[AtomicU64]>,
    bound: Duration,
    counters: FenceCounters,
}

/// Unit spans `[u0, u1)` a pin holds, merged (each unit at most once).
type Spans = Vec<(u64, u64)>;

/// A device's pin on shared pages: while it lives no conversion of them runs.
#[must_use = "the pages are pinned only while the DmaPin lives"]
pub struct DmaPin<'a> {
    fence: &'a Fence,
    spans: Spans,
}

impl Drop for DmaPin<'_> {
    fn drop(&mut self) {
        for &(c0, c1) in &self.spans {
            for c in c0..c1 {
                self.fence.units[c as usize].fetch_sub(1, Ordering::Release);
            }
        }
    }
}

/// A running conversion's hold on its pages: CONVERTING is cleared on drop.
#[must_use = "the pages are held only while the guard lives"]
pub struct Converting<'a> {
    fence: &'a Fence,
    c0: u64,
    c1: u64,
}

impl Drop for Converting<'_> {
    fn drop(&mut self) {
        self.fence.clear_converting(self.c0, self.c1);
    }
}

/// `n` unit words, all 0, from zeroed memory (calloc: the kernel's zero pages until touched,
/// so a large guest's fence costs nothing at creation).
fn zeroed_units(n: usize) -> Box<[AtomicU32]> {
    let zeroed: Box<[u32]> = vec![0u32; n].into_boxed_slice();
    // SAFETY: AtomicU32 has the same size, alignment and bit validity as u32 (std docs), so a
    // boxed slice of u32 is a valid boxed slice of AtomicU32 of the same length, allocated
    // with the same layout; ownership moves from `zeroed` to the new box.
    unsafe { Box::from_raw(Box::into_raw(zeroed) as *mut [AtomicU32]) }
}

impl Fence {
    /// A fence over `size` bytes of RAM, every page private and backed, waiting at most
    /// `bound`.
    pub fn new(size: u64, bound: Duration) -> Fence {
        Fence::with_backing(size, bound, true)
    }

    /// A fence over `size` bytes of RAM, every page private, every chunk backed in the shared
    /// store (`backed`) or none (a hugetlb shared store with no page yet). Setting the state
    /// here keeps creation cheap and independent of RAM size: the units come zeroed from the
    /// allocator (untouched until used), where marking 2 MiB chunks one by one with
    /// [`Fence::set_backed`] costs a read-modify-write per 4 KiB page.
    pub fn with_backing(size: u64, bound: Duration, backed: bool) -> Fence {
        let nunits = size.div_ceil(UNIT) as usize;
        let words = (size / PAGE_SIZE).div_ceil(64) as usize;
        Fence {
            size,
            units: zeroed_units(nunits),
            unbacked_flip: if backed { 0 } else { UNBACKED },
            shared: (0..words).map(|_| AtomicU64::new(0)).collect(),
            bound,
            counters: FenceCounters::default(),
        }
    }

    /// Set pages `[p0, p1)` shared (`true`) or private. Callers: the engine, with the pages
    /// held by [`Fence::begin_conversion`] or before any device runs.
    pub fn set_shared(&self, p0: u64, p1: u64, shared: bool) {
        let p1 = p1.min(self.size / PAGE_SIZE);
        let mut p = p0;
        while p < p1 {
            let w = (p / 64) as usize;
            let lo = p % 64;
            let hi = (p1 - (p - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            if shared {
                self.shared[w].fetch_or(mask, Ordering::Relaxed);
            } else {
                self.shared[w].fetch_and(!mask, Ordering::Relaxed);
            }
            p = p - lo + hi;
        }
    }

    /// First private page in `[p0, p1)`, if any.
    fn first_private(&self, p0: u64, p1: u64) -> Option<u64> {
        let mut p = p0;
        while p < p1 {
            let w = (p / 64) as usize;
            let lo = p % 64;
            let hi = (p1 - (p - lo)).min(64);
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let private = !self.shared[w].load(Ordering::Relaxed) & mask;
            if private != 0 {
                return Some(p - lo + u64::from(private.trailing_zeros()));
            }
            p = p - lo + hi;
        }
        None
    }

    /// Ok only if every byte of `[gpa, gpa + len)` is RAM and shared now (no pin: a snapshot
    /// for reports and tests; devices use [`Fence::pin`]).
    pub fn check_shared(&self, gpa: u64, len: u64) -> Result<(), FenceError> {
        let (p0, p1) = self.pages(gpa, len)?;
        match self.first_private(p0, p1) {
            Some(p) => Err(FenceError::NotShared {
                gpa: (p * PAGE_SIZE).max(gpa),
            }),
            None => Ok(()),
        }
    }

    /// The pages `[p0, p1)` of a range inside RAM.
    fn pages(&self, gpa: u64, len: u64) -> Result<(u64, u64), FenceError> {
        match gpa.checked_add(len) {
            Some(end) if end <= self.size => Ok((gpa / PAGE_SIZE, end.div_ceil(PAGE_SIZE))),
            _ => Err(FenceError::OutOfRam { gpa, len }),
        }
    }

    /// Pin every unit the ranges `(gpa, len)` touch and check every range shared; the pin
    /// lasts as long as the returned guard. Zero-length ranges are only bounds-checked.
    pub fn pin(&self, ranges: &[(u64, u64)]) -> Result<DmaPin<'_>, FenceError> {
        let mut spans: Spans = Vec::with_capacity(ranges.len());
        for &(gpa, len) in ranges {
            self.pages(gpa, len)?;
            if len > 0 {
                spans.push((gpa / UNIT, (gpa + len).div_ceil(UNIT)));
            }
        }
        spans.sort_unstable();
        let mut merged: Spans = Vec::with_capacity(spans.len());
        for (a, b) in spans {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let mut pin = DmaPin {
            fence: self,
            spans: Vec::with_capacity(merged.len()),
        };
        for &(c0, c1) in &merged {
            for c in c0..c1 {
                if !self.pin_unit(c) {
                    // Give back what this pin holds: the finished spans and [c0, c).
                    pin.spans.push((c0, c));
                    self.counters.pins_busy.fetch_add(1, Ordering::Relaxed);
                    return Err(FenceError::Busy);
                }
            }
            pin.spans.push((c0, c1));
        }
        for &(gpa, len) in ranges {
            if len == 0 {
                continue;
            }
            let (p0, p1) = self.pages(gpa, len)?;
            if let Some(p) = self.first_private(p0, p1) {
                return Err(FenceError::NotShared {
                    gpa: (p * PAGE_SIZE).max(gpa),
                });
            }
            let (u0, u1) = (gpa / UNIT, (gpa + len).div_ceil(UNIT));
            if let Some(u) =
                (u0..u1).find(|&u| self.unbacked(self.units[u as usize].load(Ordering::Acquire)))
            {
                self.counters.pins_unbacked.fetch_add(1, Ordering::Relaxed);
                return Err(FenceError::NotBacked {
                    gpa: (u * UNIT).max(gpa),
                });
            }
        }
        self.counters.pins.fetch_add(1, Ordering::Relaxed);
        Ok(pin)
    }

    /// Raise unit `c`'s pin count unless a conversion holds it.
    fn pin_unit(&self, c: u64) -> bool {
        let word = &self.units[c as usize];
        let mut v = word.load(Ordering::Acquire);
        loop {
            if v & CONVERTING != 0 || v & COUNT_MASK == COUNT_MASK {
                return false;
            }
            match word.compare_exchange_weak(v, v + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return true,
                Err(now) => v = now,
            }
        }
    }

    /// Hold pages `[p0, p1)` for a conversion: no new pin succeeds on them, and
    /// this returns once the pins already taken are gone (or `Busy` after the bound, holding
    /// nothing). One conversion at a time (the engine's lock).
    pub fn begin_conversion(&self, p0: u64, p1: u64) -> Result<Converting<'_>, FenceError> {
        let c0 = p0 * PAGE_SIZE / UNIT;
        let c1 = (p1 * PAGE_SIZE).div_ceil(UNIT).min(self.units.len() as u64);
        let mut pinned = false;
        for c in c0..c1 {
            let v = self.units[c as usize].fetch_or(CONVERTING, Ordering::AcqRel);
            pinned |= v & COUNT_MASK != 0;
        }
        let guard = Converting {
            fence: self,
            c0,
            c1,
        };
        if !pinned {
            return Ok(guard);
        }
        self.counters
            .conversion_waits
            .fetch_add(1, Ordering::Relaxed);
        let t0 = Instant::now();
        let mut spins = 0u32;
        let mut next = c0;
        loop {
            while next < c1 && self.units[next as usize].load(Ordering::Acquire) & COUNT_MASK == 0 {
                next += 1;
            }
            let waited = t0.elapsed();
            if next == c1 {
                self.counters
                    .wait_max_ns
                    .fetch_max(waited.as_nanos() as u64, Ordering::Relaxed);
                return Ok(guard);
            }
            if waited >= self.bound {
                self.counters
                    .conversions_busy
                    .fetch_add(1, Ordering::Relaxed);
                return Err(FenceError::Busy);
            }
            spins += 1;
            if spins < 64 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }

    /// Mark 2 MiB chunk `c` backed in the shared store or not. Callers: the engine, holding
    /// the chunk's pages with [`Fence::begin_conversion`] or before any device runs.
    pub fn set_backed(&self, c: u64, backed: bool) {
        let u0 = c * UNITS_PER_CHUNK;
        for u in u0..(u0 + UNITS_PER_CHUNK).min(self.units.len() as u64) {
            let w = &self.units[u as usize];
            // The bit is set when the state differs from the default (see `unbacked_flip`).
            if backed == (self.unbacked_flip != 0) {
                w.fetch_or(UNBACKED, Ordering::Release);
            } else {
                w.fetch_and(!UNBACKED, Ordering::Release);
            }
        }
    }

    /// Whether a unit word says its page has no shared-store backing.
    fn unbacked(&self, word: u32) -> bool {
        (word & UNBACKED) ^ self.unbacked_flip != 0
    }

    fn clear_converting(&self, c0: u64, c1: u64) {
        for c in c0..c1 {
            self.units[c as usize].fetch_and(!CONVERTING, Ordering::Release);
        }
    }

    /// A copy of the counters.
    pub fn stats(&self) -> FenceStats {
        let c = &self.counters;
        FenceStats {
            pins: c.pins.load(Ordering::Relaxed),
            pins_busy: c.pins_busy.load(Ordering::Relaxed),
            pins_unbacked: c.pins_unbacked.load(Ordering::Relaxed),
            conversion_waits: c.conversion_waits.load(Ordering::Relaxed),
            conversions_busy: c.conversions_busy.load(Ordering::Relaxed),
            wait_max_ns: c.wait_max_ns.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    const MB2: u64 = HUGE_PAGE_SIZE;

    fn fence() -> Fence {
        let f = Fence::new(8 * MB2, Duration::from_millis(200));
        f.set_shared(0, 8 * MB2 / PAGE_SIZE, true);
        f
    }

    #[test]
    fn bits_set_and_checked_across_words() {
        let f = Fence::new(4 * MB2, DEFAULT_WAIT_BOUND);
        assert_eq!(
            f.check_shared(0, PAGE_SIZE),
            Err(FenceError::NotShared { gpa: 0 })
        );
        f.set_shared(3, 200, true);
        assert!(f.check_shared(3 * PAGE_SIZE, 197 * PAGE_SIZE).is_ok());
        assert_eq!(
            f.check_shared(3 * PAGE_SIZE, 198 * PAGE_SIZE),
            Err(FenceError::NotShared {
                gpa: 200 * PAGE_SIZE
            })
        );
        f.set_shared(64, 65, false);
        assert_eq!(
            f.check_shared(10 * PAGE_SIZE + 5, 100 * PAGE_SIZE),
            Err(FenceError::NotShared {
                gpa: 64 * PAGE_SIZE
            })
        );
        assert_eq!(
            f.check_shared(4 * MB2 - 1, 2),
            Err(FenceError::OutOfRam {
                gpa: 4 * MB2 - 1,
                len: 2
            })
        );
        assert!(matches!(
            f.pin(&[(u64::MAX, 2)]),
            Err(FenceError::OutOfRam { .. })
        ));
    }

    #[test]
    fn pin_refuses_private_and_gives_back_its_counts() {
        let f = fence();
        f.set_shared(MB2 / PAGE_SIZE, MB2 / PAGE_SIZE + 1, false);
        let r = f.pin(&[(0, 16), (MB2, 4096)]);
        assert_eq!(r.err(), Some(FenceError::NotShared { gpa: MB2 }));
        assert!(f.units.iter().all(|u| u.load(Ordering::SeqCst) == 0));
    }

    #[test]
    fn unbacked_chunks_refuse_pins() {
        let f = fence();
        f.set_backed(2, false);
        assert_eq!(
            f.pin(&[(0, 1), (2 * MB2 + 100, 8)]).err(),
            Some(FenceError::NotBacked { gpa: 2 * MB2 + 100 })
        );
        assert!(f
            .units
            .iter()
            .all(|c| c.load(Ordering::SeqCst) & COUNT_MASK == 0));
        f.set_backed(2, true);
        assert!(f.pin(&[(2 * MB2, 8)]).is_ok());
        assert_eq!(f.stats().pins_unbacked, 1);
    }

    #[test]
    fn pins_merge_units_and_unpin_on_drop() {
        let f = fence();
        let count = |u: u64| f.units[u as usize].load(Ordering::SeqCst);
        {
            let _p = f
                .pin(&[(0, 16), (100, 1), (MB2 - 8, 16), (5 * MB2, 3 * MB2)])
                .expect("pin");
            let u = |gpa: u64| gpa / UNIT;
            assert_eq!((count(0), count(1)), (1, 0), "one pin per unit");
            assert_eq!(
                (count(u(MB2) - 1), count(u(MB2)), count(u(MB2) + 1)),
                (1, 1, 0)
            );
            assert_eq!((count(u(5 * MB2)), count(u(8 * MB2) - 1)), (1, 1));
            let total: u64 = (0..f.units.len() as u64).map(|u| u64::from(count(u))).sum();
            assert_eq!(total, 1 + 2 + 3 * MB2 / UNIT);
        }
        assert!(f.units.iter().all(|c| c.load(Ordering::SeqCst) == 0));
        assert_eq!(f.stats().pins, 1);
    }

    #[test]
    fn conversion_blocks_new_pins_and_waits_for_old_ones() {
        let f = fence();
        let released = AtomicBool::new(false);
        std::thread::scope(|s| {
            // A pin held across the conversion start: the conversion waits for its drop.
            let pin = f.pin(&[(MB2, 4096)]).expect("pin");
            s.spawn(|| {
                // Drop the pin only once the conversion has begun (new pins there are busy).
                while f.pin(&[(MB2, 1)]).err() != Some(FenceError::Busy) {
                    std::thread::yield_now();
                }
                std::thread::sleep(Duration::from_millis(2));
                released.store(true, Ordering::SeqCst);
                drop(pin);
            });
            let g = f.begin_conversion(MB2 / PAGE_SIZE, MB2 / PAGE_SIZE + 1);
            assert!(g.is_ok());
            assert!(
                released.load(Ordering::SeqCst),
                "returned before the pin dropped"
            );
            // While converting: no new pin on that page, other pages fine.
            assert_eq!(f.pin(&[(MB2 + 100, 1)]).err(), Some(FenceError::Busy));
            assert!(f.pin(&[(MB2 + 8192, 1)]).is_ok());
            assert!(f.pin(&[(0, 1)]).is_ok());
            f.set_shared(MB2 / PAGE_SIZE, MB2 / PAGE_SIZE + 1, false);
            drop(g);
        });
        assert_eq!(
            f.pin(&[(MB2, 1)]).err(),
            Some(FenceError::NotShared { gpa: MB2 })
        );
        assert!(f.pin(&[(MB2 + 4096, 1)]).is_ok());
        let s = f.stats();
        assert_eq!(s.conversion_waits, 1);
        assert!(s.pins_busy >= 2, "{s:?}");
    }

    #[test]
    fn conversion_gives_up_after_the_bound() {
        let f = fence();
        let pin = f.pin(&[(2 * MB2, 1)]).expect("pin");
        let t0 = Instant::now();
        assert_eq!(
            f.begin_conversion(0, 3 * MB2 / PAGE_SIZE).err(),
            Some(FenceError::Busy)
        );
        assert!(t0.elapsed() >= Duration::from_millis(200));
        // Nothing left held: pins succeed again, and the next conversion after the drop does.
        assert!(f.pin(&[(0, 1)]).is_ok());
        drop(pin);
        assert!(f.begin_conversion(0, 3 * MB2 / PAGE_SIZE).is_ok());
        assert_eq!(f.stats().conversions_busy, 1);
    }

    #[test]
    fn racing_pins_never_see_a_page_mid_conversion() {
        // A device thread pins and checks a page while this thread flips it back and forth
        // under the fence: a pin that succeeds always sees the page shared and the "converted"
        // flag clear for its whole lifetime.
        let f = fence();
        let converting = AtomicBool::new(false);
        let stop = AtomicBool::new(false);
        let ok = AtomicU64::new(0);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    if let Ok(p) = f.pin(&[(MB2, 4096)]) {
                        assert!(!converting.load(Ordering::SeqCst));
                        std::hint::spin_loop();
                        assert!(!converting.load(Ordering::SeqCst));
                        drop(p);
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                }
            });
            let p = MB2 / PAGE_SIZE;
            let t0 = Instant::now();
            let mut i = 0u64;
            while ok.load(Ordering::SeqCst) < 1000 && t0.elapsed() < Duration::from_secs(5) {
                let g = f.begin_conversion(p, p + 1).expect("bounded wait");
                converting.store(true, Ordering::SeqCst);
                f.set_shared(p, p + 1, i % 2 == 1);
                converting.store(false, Ordering::SeqCst);
                drop(g);
                i += 1;
                if i.is_multiple_of(64) {
                    std::thread::yield_now();
                }
            }
            stop.store(true, Ordering::SeqCst);
        });
        let ok = ok.load(Ordering::SeqCst);
        assert!(ok > 0);
    }
}
