//! The `dynamic` policy (the kernel's SWIOTLB_DYNAMIC): a boot pool plus pools added later.
//! A map that finds no room in any pool (searched in order) schedules growth by one pool
//! (`grow=`, 1..4 MiB, default 4 MiB) and is served meanwhile by a transient buffer of
//! exactly its size (pages converted for it and converted back at unmap).
//! [`Policy::background_work`] performs the growth, and, with `shrink_ms=`, converts back and
//! frees grown pools that have had nothing mapped for that long.

use crate::config::Config;
use crate::error::{BuildError, MapError};
use crate::platform::Platform;
use crate::policy::{Direction, MapOpts, Policy};
use crate::pooled::{Growth, Pooled};
use crate::slots::SEGMENT_BYTES;
use crate::stats::ExtraStats;
use crate::transient::TransientTable;
use memconv::abi::PoolReport;

/// The dynamic policy.
pub struct Dynamic<'p> {
    p: Pooled<'p>,
    transient: TransientTable,
    growth: Growth,
}

impl<'p> Dynamic<'p> {
    /// Allocate and convert the boot pool (`cfg.dynamic_pool_bytes()`).
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        let boot = usize::try_from(cfg.dynamic_pool_bytes()).map_err(|_| BuildError::BadConfig)?;
        let max_pools = cfg.max_pools as usize;
        let p = Pooled::new(cfg, plat, false, max_pools, cfg.permanent_pools(), boot)?;
        let transient = TransientTable::new(&p.c, cfg.transient_max as usize)?;
        Ok(Dynamic {
            p,
            transient,
            growth: Growth::new(cfg, cfg.dynamic_grow_bytes() as usize),
        })
    }

    /// Number of pools now (boot pool included).
    pub fn pools(&self) -> usize {
        self.p.pools.pools()
    }
}

impl Drop for Dynamic<'_> {
    fn drop(&mut self) {
        // Before the pools and coherent memory (dropped with `p`).
        self.transient.destroy(&self.p.c);
    }
}

impl Policy for Dynamic<'_> {
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
        // SAFETY: forwarded map contract.
        let r = match unsafe { self.p.pools.map(&self.p.c, orig, len, dir, &opts, 0) } {
            Ok(al) => Ok(al.bounce),
            Err(MapError::NoSpace) => {
                self.growth.schedule(&self.p);
                // SAFETY: forwarded map contract.
                unsafe { self.transient.map(&self.p.c, orig, len, dir, &opts) }
            }
            Err(e) => Err(e),
        };
        self.p.c.map_result(r)
    }

    fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<(), MapError> {
        if self.p.pools.contains(bounce) {
            return self.p.unmap(bounce, len, dir).map(drop);
        }
        self.transient
            .unmap(&self.p.c, bounce, len, dir)
            .map_err(|e| self.p.c.bad_call(e))
    }

    fn sync_for_device(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.sync(bounce, len, true)
    }

    fn sync_for_cpu(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.sync(bounce, len, false)
    }

    fn alloc_coherent(&self, len: usize) -> Result<u64, MapError> {
        self.p.alloc_coherent(len, 4096)
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        self.p.free_coherent(addr, len, false)
    }

    fn background_work(&self) -> bool {
        self.growth.background_work(&self.p)
    }

    fn report(&self) -> PoolReport {
        self.p.report(0)
    }

    fn extra_stats(&self) -> ExtraStats {
        self.p.extra_stats()
    }

    fn max_mapping_size(&self) -> usize {
        SEGMENT_BYTES
    }
}

impl Dynamic<'_> {
    /// Sync a pool mapping or a transient buffer.
    fn sync(&self, bounce: u64, len: usize, for_device: bool) -> Result<(), MapError> {
        if self.p.pools.contains(bounce) {
            return self.p.sync(bounce, len, for_device);
        }
        self.transient
            .sync(bounce, len, for_device)
            .map_err(|e| self.p.c.bad_call(e))
    }
}
