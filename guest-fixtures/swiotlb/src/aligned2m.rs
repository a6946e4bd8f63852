//! The `aligned-2m` policy (the 2024 RFC "align memory conversions to 2M"): the boot pool
//! (8% of RAM, at most 1.25 GiB, or `pool=`) and every growth step (`grow=`, default 2 MiB)
//! are 2 MiB aligned and a multiple of 2 MiB, so every conversion is 2M; coherent
//! allocations come from the pool too (larger ones take whole 2 MiB units). Every conversion
//! passes a 2M check first and is refused (and counted) otherwise. A map that finds no room
//! schedules growth for [`Policy::background_work`]; one that may block grows the pool inline
//! and retries. Idle grown pools can be freed (`shrink_ms=`).

use crate::build::BuildError;
use crate::coherent::CoherentTable;
use crate::common::Common;
use crate::config::Config;
use crate::dynamic::permanent;
use crate::legacy::build_error;
use crate::platform::Platform;
use crate::policy::{Direction, MapError, MapOpts, Policy};
use crate::pools::PoolSet;
use crate::slots::SEGMENT_BYTES;
use crate::stats::ExtraStats;
use core::sync::atomic::{AtomicBool, Ordering};
use memconv::abi::{PoolReport, HUGE_PAGE_SIZE, POOL_FLAG_CLAIMS_2M};

const HUGE: usize = HUGE_PAGE_SIZE as usize;

/// The aligned-2m policy.
pub struct Aligned2m<'p> {
    c: Common<'p>,
    pools: PoolSet,
    coherent: CoherentTable,
    grow_pending: AtomicBool,
    grow_bytes: usize,
    max_pools: usize,
    max_bytes: u64,
    shrink_ns: u64,
}

impl<'p> Aligned2m<'p> {
    /// Allocate and convert the boot pool (`cfg.aligned_pool_bytes()`, 2 MiB aligned).
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        let c = Common::new(cfg, plat, true);
        let max_pools = cfg.max_pools as usize;
        let mut pools = PoolSet::new(plat, max_pools, cfg.cpus as usize, permanent(cfg))?;
        let boot = usize::try_from(cfg.aligned_pool_bytes()).map_err(|_| BuildError::BadConfig)?;
        if let Err(e) = pools.add(&c, boot, HUGE, false, None) {
            pools.destroy(&c);
            return Err(build_error(e));
        }
        Ok(Aligned2m {
            c,
            pools,
            coherent: CoherentTable::new(),
            grow_pending: AtomicBool::new(false),
            grow_bytes: cfg.aligned_grow_bytes() as usize,
            max_pools,
            max_bytes: cfg.max_bytes,
            shrink_ns: cfg.shrink_idle_ms.saturating_mul(1_000_000),
        })
    }

    /// Number of pools now (boot pool included).
    pub fn pools(&self) -> usize {
        self.pools.pools()
    }

    fn may_grow(&self) -> bool {
        self.pools.pools() < self.max_pools
            && self.c.stats.capacity() + self.grow_bytes as u64 <= self.max_bytes
    }

    /// Grow now unless someone did since generation `seen`; whether there may be new room.
    fn grow_inline(&self, seen: u64) -> bool {
        self.may_grow()
            && self
                .pools
                .add(&self.c, self.grow_bytes, HUGE, true, Some(seen))
                .is_ok()
    }
}

impl Drop for Aligned2m<'_> {
    fn drop(&mut self) {
        self.coherent.destroy(&self.c);
        self.pools.destroy(&self.c);
    }
}

impl Policy for Aligned2m<'_> {
    fn name(&self) -> &'static str {
        self.c.name
    }

    unsafe fn map_with(
        &self,
        orig: u64,
        len: usize,
        dir: Direction,
        opts: MapOpts,
    ) -> Result<u64, MapError> {
        let mut retried = false;
        loop {
            let seen = self.pools.generation();
            // SAFETY: forwarded map contract.
            match unsafe { self.pools.map(&self.c, orig, len, dir, &opts, 0) } {
                Ok(al) => return Ok(al.bounce),
                Err(MapError::NoSpace) if !retried && opts.may_block && self.grow_inline(seen) => {
                    retried = true;
                }
                Err(e) => {
                    if e == MapError::NoSpace && self.may_grow() {
                        self.grow_pending.store(true, Ordering::Release);
                    }
                    self.c.stats.map_failed();
                    return Err(e);
                }
            }
        }
    }

    fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<(), MapError> {
        self.pools
            .unmap(&self.c, bounce, len, dir)
            .map(|_| ())
            .map_err(|e| self.c.bad_call(e))
    }

    fn sync_for_device(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.pools
            .sync(&self.c, bounce, len, true)
            .map_err(|e| self.c.bad_call(e))
    }

    fn sync_for_cpu(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.pools
            .sync(&self.c, bounce, len, false)
            .map_err(|e| self.c.bad_call(e))
    }

    fn alloc_coherent(&self, len: usize) -> Result<u64, MapError> {
        if len > SEGMENT_BYTES {
            return self.coherent.alloc(&self.c, len, HUGE);
        }
        let seen = self.pools.generation();
        match self.pools.alloc_coherent(&self.c, len) {
            // Coherent allocations are made where blocking is allowed: grow and retry once.
            Err(MapError::NoSpace) if self.grow_inline(seen) => {
                self.pools.alloc_coherent(&self.c, len)
            }
            r => r,
        }
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        let r = if self.pools.contains(addr) {
            self.pools.free_coherent(&self.c, addr, len)
        } else {
            self.coherent.free(&self.c, addr, len)
        };
        r.map_err(|e| self.c.bad_call(e))
    }

    fn background_work(&self) -> bool {
        let mut did = false;
        if self.grow_pending.swap(false, Ordering::AcqRel) && self.may_grow() {
            // A failure is counted (grow_failures); the next failed map schedules again.
            let _ = self.pools.add(&self.c, self.grow_bytes, HUGE, true, None);
            did = true;
        }
        if self.shrink_ns > 0 && self.pools.shrink_idle(&self.c, self.shrink_ns) {
            did = true;
        }
        did
    }

    fn report(&self) -> PoolReport {
        self.c.stats.report(self.c.name, POOL_FLAG_CLAIMS_2M)
    }

    fn extra_stats(&self) -> ExtraStats {
        self.c.stats.extra()
    }

    fn max_mapping_size(&self) -> usize {
        SEGMENT_BYTES
    }
}
