//! The `throttle` policy (the 2024 swiotlb throttling RFC): a small legacy-style pool where
//! a map that may block waits instead of failing. Above the high threshold (70% of the pool)
//! such a map must take a semaphore, which it holds until its unmap; between the low (65%)
//! and high thresholds it takes it only if somebody holds it (hysteresis); a blocking map
//! that finds no room waits for room. Every wait is bounded (`wait_ms`): past the bound the
//! map fails and a timeout is counted. Maps that may not block are served or fail exactly as
//! in `legacy`. Waits and wait time are counted per map.

use crate::common::FLAG_THROTTLED;
use crate::config::Config;
use crate::error::{BuildError, MapError};
use crate::legacy::Legacy;
use crate::platform::Platform;
use crate::policy::{Direction, MapOpts, Policy};
use crate::slots::SLOT_SIZE;
use crate::stats::ExtraStats;
use core::sync::atomic::{AtomicU32, Ordering};
use memconv::abi::PoolReport;

/// A counting semaphore that is only ever tried (the waiting is the caller's loop).
struct Semaphore {
    avail: AtomicU32,
    count: u32,
}

impl Semaphore {
    fn try_down(&self) -> bool {
        self.avail
            .fetch_update(Ordering::Acquire, Ordering::Relaxed, |a| a.checked_sub(1))
            .is_ok()
    }

    fn up(&self) {
        self.avail.fetch_add(1, Ordering::Release);
    }

    fn held(&self) -> bool {
        self.avail.load(Ordering::Relaxed) < self.count
    }
}

/// The throttle policy.
pub struct Throttle<'p> {
    inner: Legacy<'p>,
    sem: Semaphore,
    high_pct: u64,
    low_pct: u64,
    wait_ns: u64,
}

impl<'p> Throttle<'p> {
    /// Allocate and convert the pool (`cfg.throttle_pool_bytes()`).
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        Ok(Throttle {
            inner: Legacy::with_pool(cfg, plat, cfg.throttle_pool_bytes())?,
            sem: Semaphore {
                avail: AtomicU32::new(cfg.sem_count.max(1)),
                count: cfg.sem_count.max(1),
            },
            high_pct: cfg.high_pct.min(100) as u64,
            low_pct: cfg.low_pct.min(cfg.high_pct).min(100) as u64,
            wait_ns: cfg.wait_ms.saturating_mul(1_000_000),
        })
    }

    /// Whether a blocking map of `bytes` must go through the semaphore now.
    fn must_throttle(&self, bytes: u64) -> bool {
        let stats = &self.inner.pooled().c.stats;
        let used = (stats.used() + bytes).saturating_mul(100);
        let cap = stats.capacity();
        used > self.high_pct * cap || (used > self.low_pct * cap && self.sem.held())
    }
}

impl Policy for Throttle<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    unsafe fn map_with(
        &self,
        orig: u64,
        len: usize,
        dir: Direction,
        opts: MapOpts,
    ) -> Result<u64, MapError> {
        if !opts.may_block {
            // SAFETY: forwarded map contract.
            return unsafe { self.inner.map_with(orig, len, dir, opts) };
        }
        let p = self.inner.pooled();
        let c = &p.c;
        let plat = c.plat;
        let start = plat.now_ns();
        let deadline = start.saturating_add(self.wait_ns);
        let mut waited = false;
        let mut took = false;
        let bytes = len.div_ceil(SLOT_SIZE) as u64 * SLOT_SIZE as u64;
        let result = 'map: {
            if self.must_throttle(bytes) {
                while !self.sem.try_down() {
                    if plat.now_ns() >= deadline {
                        break 'map Err(MapError::TimedOut);
                    }
                    waited = true;
                    plat.relax();
                }
                took = true;
            }
            let flags = if took { FLAG_THROTTLED } else { 0 };
            loop {
                // SAFETY: forwarded map contract.
                match unsafe { p.pools.map(c, orig, len, dir, &opts, flags) } {
                    Ok(al) => break 'map Ok(al.bounce),
                    Err(MapError::NoSpace) => {
                        if plat.now_ns() >= deadline {
                            break 'map Err(MapError::TimedOut);
                        }
                        waited = true;
                        plat.relax();
                    }
                    Err(e) => break 'map Err(e),
                }
            }
        };
        if waited {
            c.stats.waited(plat.now_ns().saturating_sub(start));
        }
        if result.is_err() {
            if took {
                self.sem.up();
            }
            c.stats.map_failed();
            if result == Err(MapError::TimedOut) {
                c.stats.wait_timed_out();
            }
        }
        result
    }

    fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<(), MapError> {
        let al = self.inner.pooled().unmap(bounce, len, dir)?;
        if al.flags & FLAG_THROTTLED != 0 {
            self.sem.up();
        }
        Ok(())
    }

    fn sync_for_device(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.inner.sync_for_device(bounce, len)
    }

    fn sync_for_cpu(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.inner.sync_for_cpu(bounce, len)
    }

    fn alloc_coherent(&self, len: usize) -> Result<u64, MapError> {
        self.inner.alloc_coherent(len)
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        self.inner.free_coherent(addr, len)
    }

    fn background_work(&self) -> bool {
        false
    }

    fn report(&self) -> PoolReport {
        self.inner.report()
    }

    fn extra_stats(&self) -> ExtraStats {
        self.inner.extra_stats()
    }

    fn max_mapping_size(&self) -> usize {
        self.inner.max_mapping_size()
    }
}
