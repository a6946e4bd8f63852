//! What every built-in policy carries: the platform, the counted [`Converter`], the
//! [`Stats`], the pool-wide map options, and the bounce copies (the only place this crate
//! dereferences addresses it was handed).

use crate::config::Config;
use crate::convert::Converter;
use crate::error::MapError;
use crate::platform::Platform;
use crate::policy::{Direction, MapOpts};
use crate::slots::{Request, SEGMENT_BYTES};
use crate::stats::Stats;

/// Slot / buffer flag: the mapping took the throttle semaphore.
pub(crate) const FLAG_THROTTLED: u8 = 0x04;

/// Shared state of a built-in policy.
pub(crate) struct Common<'p> {
    pub plat: &'p dyn Platform,
    pub conv: Converter<'p>,
    pub stats: Stats,
    min_align_mask: u32,
    prefill: bool,
    pub name: &'static str,
}

impl<'p> Common<'p> {
    pub fn new(cfg: &Config, plat: &'p dyn Platform, only_2m: bool) -> Self {
        Common {
            plat,
            conv: Converter::new(plat, only_2m),
            stats: Stats::new(),
            min_align_mask: cfg.min_align_mask,
            prefill: cfg.prefill,
            name: cfg.kind.name(),
        }
    }

    /// The slot request for a map, after checking the arguments.
    pub fn request(
        &self,
        orig: u64,
        len: usize,
        dir: Direction,
        opts: &MapOpts,
        flags: u8,
    ) -> Result<Request, MapError> {
        let min = (opts.min_align_mask | self.min_align_mask) as usize;
        let alloc = opts.alloc_align_mask as usize;
        let mask_ok = |m: usize| m < SEGMENT_BYTES && m & (m + 1) == 0;
        if len == 0 || orig.checked_add(len as u64).is_none() || !mask_ok(min) || !mask_ok(alloc) {
            return Err(MapError::InvalidArgument);
        }
        Ok(Request {
            orig,
            len,
            min_align_mask: min,
            alloc_align_mask: alloc,
            flags: flags | dir.bits(),
        })
    }

    /// Fill a new bounce buffer: copy the original for `ToDevice` / `Bidirectional`, and for
    /// `FromDevice` too with `prefill`.
    ///
    /// # Safety
    /// `[orig, orig + len)` is readable (the map contract) and `[bounce, bounce + len)` is a
    /// bounce buffer this pool just allocated.
    pub unsafe fn fill(&self, bounce: u64, orig: u64, len: usize, dir: Direction) {
        if dir.to_device() || self.prefill {
            // SAFETY: per the function contract.
            unsafe { copy(bounce, orig, len) };
        }
    }

    /// A map's result, its failure counted.
    pub fn map_result(&self, r: Result<u64, MapError>) -> Result<u64, MapError> {
        if r.is_err() {
            self.stats.map_failed();
        }
        r
    }

    /// Count a refused unmap / sync / free and pass the error on.
    pub fn bad_call(&self, e: MapError) -> MapError {
        if matches!(e, MapError::NotMapped | MapError::Mismatch) {
            self.stats.bad_call();
        }
        e
    }
}

/// The copy of a sync of `[addr, addr + len)`, part of a mapping in direction `dir` whose
/// original part is at `orig`: original -> bounce before the device reads (`for_device`),
/// bounce -> original before the CPU reads.
///
/// # Safety
/// `[addr, addr + len)` lies in a live bounce buffer this pool validated, and
/// `[orig, orig + len)` in its original (the map contract).
pub(crate) unsafe fn sync_copy(addr: u64, orig: u64, len: usize, dir: Direction, for_device: bool) {
    if for_device && dir.to_device() {
        // SAFETY: per the function contract.
        unsafe { copy(addr, orig, len) };
    } else if !for_device && dir.from_device() {
        // SAFETY: per the function contract.
        unsafe { copy(orig, addr, len) };
    }
}

/// Copy `len` bytes from `src` to `dst` (physical addresses, identity mapped).
///
/// # Safety
/// Both ranges are valid for `len` bytes and do not overlap.
pub(crate) unsafe fn copy(dst: u64, src: u64, len: usize) {
    // SAFETY: per the function contract.
    unsafe {
        core::ptr::copy_nonoverlapping(src as usize as *const u8, dst as usize as *mut u8, len)
    };
}

/// Zero `len` bytes at `addr`.
///
/// # Safety
/// The range is valid for writes.
pub(crate) unsafe fn zero(addr: u64, len: usize) {
    // SAFETY: per the function contract.
    unsafe { core::ptr::write_bytes(addr as usize as *mut u8, 0, len) };
}
