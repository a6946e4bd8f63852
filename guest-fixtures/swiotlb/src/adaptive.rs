//! The `adaptive` policy: a pool that sizes itself, converting only at 2 MiB.
//!
//! - Every chunk is 2 MiB aligned and sized (the boot chunk a multiple of 2 MiB, `pool=`,
//!   default 2 MiB), so every conversion is 2M: it runs on a `2m` host and leaves no double
//!   allocation on hugetlb. Coherent memory comes from the pool (larger than a segment: whole
//!   2 MiB units).
//! - It grows ahead of demand: the background worker adds a 2 MiB chunk whenever free space
//!   falls below the low watermark (`lowat=`, or an eighth of the capacity if more), so maps
//!   that cannot block find room without any conversion on their path.
//! - Blocking maps leave `reserve=` bytes for maps that cannot block. Below the soft cap
//!   (`soft=`) a blocking map that finds no room grows the pool inline; at the soft cap it
//!   waits (bounded by `wait_ms=`) for room instead of growing. A map that cannot block and
//!   finds no room fails and schedules growth up to the hard cap (`max=`).
//! - A grown chunk that has had nothing mapped for the hold time (`hold_ms=`) goes back to
//!   private, one chunk per step, and only while the free space left after it stays at least
//!   twice the low watermark, and no growth happened within the hold time (hysteresis: a
//!   burst does not make it flap).
//! - The boot chunk never retires, so its maps take the same lock-free path as `legacy`'s
//!   (per-vCPU areas, no per-pool user counting).

use crate::config::Config;
use crate::error::{BuildError, MapError};
use crate::platform::Platform;
use crate::policy::{Direction, MapOpts, Policy};
use crate::pooled::Pooled;
use crate::slots::{SEGMENT_BYTES, SLOT_SIZE};
use crate::stats::ExtraStats;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use memconv::abi::{PoolReport, HUGE_PAGE_SIZE, POOL_FLAG_CLAIMS_2M};

const HUGE: usize = HUGE_PAGE_SIZE as usize;
const CHUNK: u64 = HUGE_PAGE_SIZE;

/// The adaptive policy.
pub struct Adaptive<'p> {
    p: Pooled<'p>,
    /// A map found no room: background work grows even past the soft cap (up to `max`).
    pending: AtomicBool,
    /// Slot-backed coherent bytes (they take pool room like mappings).
    pool_coherent: AtomicU64,
    /// `now_ns` of the last growth (shrinking waits a hold time after it).
    last_grow_ns: AtomicU64,
    low_water: u64,
    reserve: u64,
    soft_cap: u64,
    max_bytes: u64,
    hold_ns: u64,
    wait_ns: u64,
}

impl<'p> Adaptive<'p> {
    /// Allocate and convert the boot chunk (`cfg.adaptive_pool_bytes()`).
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        let boot = usize::try_from(cfg.adaptive_pool_bytes()).map_err(|_| BuildError::BadConfig)?;
        let max_bytes = cfg.max_bytes.max(boot as u64);
        let p = Pooled::new(cfg, plat, true, crate::config::MAX_POOLS as usize, 1, boot)?;
        Ok(Adaptive {
            p,
            pending: AtomicBool::new(false),
            pool_coherent: AtomicU64::new(0),
            last_grow_ns: AtomicU64::new(plat.now_ns()),
            low_water: cfg.adaptive_low_water,
            reserve: cfg.adaptive_reserve,
            soft_cap: cfg.adaptive_soft_bytes().min(max_bytes),
            max_bytes,
            hold_ns: cfg.adaptive_hold_ms.saturating_mul(1_000_000),
            wait_ns: cfg.wait_ms.saturating_mul(1_000_000),
        })
    }

    /// Number of chunks now (the boot chunk counts as one).
    pub fn pools(&self) -> usize {
        self.p.pools.pools()
    }

    /// Pool bytes now.
    pub fn capacity(&self) -> u64 {
        self.p.c.stats.capacity()
    }

    /// Free pool bytes now (capacity less mappings and slot-backed coherent memory).
    pub fn free(&self) -> u64 {
        let s = &self.p.c.stats;
        s.capacity()
            .saturating_sub(s.used() + self.pool_coherent.load(Ordering::Relaxed))
    }

    /// The low watermark at the current capacity.
    fn low_water_now(&self) -> u64 {
        self.low_water.max(self.capacity() / 8)
    }

    /// Whether one more chunk fits under `cap` (and the pool table).
    fn may_grow_to(&self, cap: u64) -> bool {
        self.capacity() + CHUNK <= cap && self.p.pools.pools() < crate::config::MAX_POOLS as usize
    }

    /// Add one chunk now (unless someone grew since generation `seen`); whether there may be
    /// new room.
    fn grow(&self, seen: Option<u64>) -> bool {
        let ok = self
            .p
            .pools
            .add(&self.p.c, CHUNK as usize, HUGE, true, seen)
            .is_ok();
        if ok {
            self.last_grow_ns
                .store(self.p.c.plat.now_ns(), Ordering::Relaxed);
        }
        ok
    }

    /// A blocking map: room beyond the reserve, inline growth below the soft cap, else a
    /// bounded wait.
    ///
    /// # Safety
    /// The map contract of [`Policy::map_with`].
    unsafe fn map_blocking(
        &self,
        orig: u64,
        len: usize,
        dir: Direction,
        opts: &MapOpts,
    ) -> Result<u64, MapError> {
        let c = &self.p.c;
        let plat = c.plat;
        let bytes = len.div_ceil(SLOT_SIZE) as u64 * SLOT_SIZE as u64;
        let mut start = 0u64;
        let mut waited = false;
        let mut may_grow = true;
        let result = loop {
            let seen = self.p.pools.generation();
            let past_deadline = waited && plat.now_ns() >= start.saturating_add(self.wait_ns);
            // At the deadline the reserve is given up before failing.
            if past_deadline || self.free() >= bytes + self.reserve {
                // SAFETY: forwarded map contract.
                match unsafe { self.p.pools.map(c, orig, len, dir, opts, 0) } {
                    Ok(al) => break Ok(al.bounce),
                    Err(MapError::NoSpace) if !past_deadline => {}
                    Err(MapError::NoSpace) => {
                        c.stats.wait_timed_out();
                        self.pending.store(true, Ordering::Release);
                        break Err(MapError::TimedOut);
                    }
                    Err(e) => break Err(e),
                }
            }
            if may_grow && self.may_grow_to(self.soft_cap) {
                if self.grow(Some(seen)) {
                    continue;
                }
                // The host or the guest is out of memory: wait for room instead.
                may_grow = false;
            }
            if !waited {
                waited = true;
                start = plat.now_ns();
            }
            plat.relax();
        };
        if waited {
            c.stats.waited(plat.now_ns().saturating_sub(start));
        }
        c.map_result(result)
    }
}

impl Policy for Adaptive<'_> {
    fn name(&self) -> &'static str {
        self.p.c.name
    }

    unsafe fn map_with(
        &self,
        orig: u64,
        len: usize,
        dir: Direction,
        opts: MapOpts,
    ) -> Result<u64, MapError> {
        if opts.may_block {
            // SAFETY: forwarded map contract.
            return unsafe { self.map_blocking(orig, len, dir, &opts) };
        }
        // SAFETY: forwarded map contract.
        match unsafe { self.p.pools.map(&self.p.c, orig, len, dir, &opts, 0) } {
            Ok(al) => Ok(al.bounce),
            Err(e) => {
                if e == MapError::NoSpace {
                    self.pending.store(true, Ordering::Release);
                }
                self.p.c.map_result(Err(e))
            }
        }
    }

    fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<(), MapError> {
        self.p.unmap(bounce, len, dir).map(drop)
    }

    fn sync_for_device(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.p.sync(bounce, len, true)
    }

    fn sync_for_cpu(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.p.sync(bounce, len, false)
    }

    fn alloc_coherent(&self, len: usize) -> Result<u64, MapError> {
        if len > SEGMENT_BYTES {
            return self.p.alloc_coherent(len, HUGE);
        }
        let mut r = self.p.pools.alloc_coherent(&self.p.c, len);
        if r == Err(MapError::NoSpace) {
            // Coherent allocations are made where blocking is allowed: grow and retry once.
            let seen = self.p.pools.generation();
            if self.may_grow_to(self.max_bytes) && self.grow(Some(seen)) {
                r = self.p.pools.alloc_coherent(&self.p.c, len);
            }
        }
        if r.is_ok() {
            let bytes = len.div_ceil(SLOT_SIZE) as u64 * SLOT_SIZE as u64;
            self.pool_coherent.fetch_add(bytes, Ordering::Relaxed);
        }
        r
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        let in_pools = self.p.pools.contains(addr);
        self.p.free_coherent(addr, len, true)?;
        if in_pools {
            let bytes = len.div_ceil(SLOT_SIZE) as u64 * SLOT_SIZE as u64;
            let _ = self
                .pool_coherent
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(bytes))
                });
        }
        Ok(())
    }

    fn background_work(&self) -> bool {
        // Read before looking at the free space: a blocking map growing inline meanwhile makes
        // this growth a no-op instead of a second chunk.
        let seen = self.p.pools.generation();
        let low = self.low_water_now();
        let failed = self.pending.swap(false, Ordering::AcqRel);
        let cap = if failed {
            self.max_bytes
        } else {
            self.soft_cap
        };
        if (failed || self.free() < low) && self.may_grow_to(cap) {
            // A failure is counted (grow_failures); the next map below the mark asks again.
            let _ = self.grow(Some(seen));
            return true;
        }
        let now = self.p.c.plat.now_ns();
        let quiet = now.saturating_sub(self.last_grow_ns.load(Ordering::Relaxed)) >= self.hold_ns;
        // Hysteresis: the free space left after returning a chunk is at least twice the low
        // watermark there, so the next maps do not make the worker grow it straight back.
        let cap_after = self.capacity().saturating_sub(CHUNK);
        let low_after = self.low_water.max(cap_after / 8);
        if self.hold_ns > 0
            && quiet
            && self.free().saturating_sub(CHUNK) >= 2 * low_after
            && self.p.pools.shrink_idle(&self.p.c, self.hold_ns, 1)
        {
            return true;
        }
        false
    }

    fn report(&self) -> PoolReport {
        self.p.report(POOL_FLAG_CLAIMS_2M)
    }

    fn extra_stats(&self) -> ExtraStats {
        self.p.extra_stats()
    }

    fn max_mapping_size(&self) -> usize {
        SEGMENT_BYTES
    }
}
