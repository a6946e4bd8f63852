//! The `aligned-2m` policy (the 2024 RFC "align memory conversions to 2M"): the boot pool
//! (8% of RAM, at most 1.25 GiB, or `pool=`) and every growth step (`grow=`, default 2 MiB)
//! are 2 MiB aligned and a multiple of 2 MiB, so every conversion is 2M; coherent
//! allocations come from the pool too (larger ones take whole 2 MiB units). Every conversion
//! passes a 2M check first and is refused (and counted) otherwise. A map that finds no room
//! schedules growth for [`Policy::background_work`]; one that may block grows the pool inline
//! and retries. Idle grown pools can be freed (`shrink_ms=`).

use crate::config::Config;
use crate::error::{BuildError, MapError};
use crate::platform::Platform;
use crate::policy::{Direction, MapOpts, Policy};
use crate::pooled::{Growth, Pooled};
use crate::slots::SEGMENT_BYTES;
use crate::stats::ExtraStats;
use memconv::abi::{PoolReport, HUGE_PAGE_SIZE, POOL_FLAG_CLAIMS_2M};

const HUGE: usize = HUGE_PAGE_SIZE as usize;

/// The aligned-2m policy.
pub struct Aligned2m<'p> {
    p: Pooled<'p>,
    growth: Growth,
}

impl<'p> Aligned2m<'p> {
    /// Allocate and convert the boot pool (`cfg.aligned_pool_bytes()`, 2 MiB aligned).
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        let boot = usize::try_from(cfg.aligned_pool_bytes()).map_err(|_| BuildError::BadConfig)?;
        let max_pools = cfg.max_pools as usize;
        Ok(Aligned2m {
            p: Pooled::new(cfg, plat, true, max_pools, cfg.permanent_pools(), boot)?,
            growth: Growth::new(cfg, cfg.aligned_grow_bytes() as usize),
        })
    }

    /// Number of pools now (boot pool included).
    pub fn pools(&self) -> usize {
        self.p.pools.pools()
    }
}

impl Policy for Aligned2m<'_> {
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
        let mut retried = false;
        loop {
            let seen = self.p.pools.generation();
            // SAFETY: forwarded map contract.
            match unsafe { self.p.pools.map(&self.p.c, orig, len, dir, &opts, 0) } {
                Ok(al) => return Ok(al.bounce),
                Err(MapError::NoSpace)
                    if !retried && opts.may_block && self.growth.grow_inline(&self.p, seen) =>
                {
                    retried = true;
                }
                Err(e) => {
                    if e == MapError::NoSpace {
                        self.growth.schedule(&self.p);
                    }
                    return self.p.c.map_result(Err(e));
                }
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
        let seen = self.p.pools.generation();
        match self.p.pools.alloc_coherent(&self.p.c, len) {
            // Coherent allocations are made where blocking is allowed: grow and retry once.
            Err(MapError::NoSpace) if self.growth.grow_inline(&self.p, seen) => {
                self.p.pools.alloc_coherent(&self.p.c, len)
            }
            r => r,
        }
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        self.p.free_coherent(addr, len, true)
    }

    fn background_work(&self) -> bool {
        self.growth.background_work(&self.p)
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
