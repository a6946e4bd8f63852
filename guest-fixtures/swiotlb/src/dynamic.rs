//! The `dynamic` policy (the kernel's SWIOTLB_DYNAMIC): a boot pool plus pools added later.
//! A map that finds no room in any pool (searched in order) schedules growth by one pool
//! (`grow=`, 1..4 MiB, default 4 MiB) and is served meanwhile by a transient buffer of
//! exactly its size (pages converted for it and converted back at unmap).
//! [`Policy::background_work`] performs the growth, and, with `shrink_ms=`, converts back and
//! frees grown pools that have had nothing mapped for that long.

use crate::build::BuildError;
use crate::coherent::CoherentTable;
use crate::common::Common;
use crate::config::Config;
use crate::legacy::build_error;
use crate::platform::Platform;
use crate::policy::{Direction, MapError, MapOpts, Policy};
use crate::pools::PoolSet;
use crate::slots::SEGMENT_BYTES;
use crate::stats::ExtraStats;
use crate::transient::TransientTable;
use core::sync::atomic::{AtomicBool, Ordering};
use memconv::abi::{PoolReport, HUGE_PAGE_SIZE};

/// Pools that never retire: the boot pool, or all when shrinking is off.
pub(crate) fn permanent(cfg: &Config) -> usize {
    if cfg.shrink_idle_ms > 0 {
        1
    } else {
        cfg.max_pools as usize
    }
}

/// The dynamic policy.
pub struct Dynamic<'p> {
    c: Common<'p>,
    pools: PoolSet,
    transient: TransientTable,
    coherent: CoherentTable,
    grow_pending: AtomicBool,
    grow_bytes: usize,
    max_pools: usize,
    max_bytes: u64,
    shrink_ns: u64,
}

impl<'p> Dynamic<'p> {
    /// Allocate and convert the boot pool (`cfg.dynamic_pool_bytes()`).
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        let c = Common::new(cfg, plat, false);
        let max_pools = cfg.max_pools as usize;
        let mut pools = PoolSet::new(plat, max_pools, cfg.cpus as usize, permanent(cfg))?;
        let boot = usize::try_from(cfg.dynamic_pool_bytes()).map_err(|_| BuildError::BadConfig)?;
        if let Err(e) = pools.add(&c, boot, HUGE_PAGE_SIZE as usize, false, None) {
            pools.destroy(&c);
            return Err(build_error(e));
        }
        let transient = match TransientTable::new(&c, cfg.transient_max as usize) {
            Ok(t) => t,
            Err(e) => {
                pools.destroy(&c);
                return Err(e);
            }
        };
        Ok(Dynamic {
            c,
            pools,
            transient,
            coherent: CoherentTable::new(),
            grow_pending: AtomicBool::new(false),
            grow_bytes: cfg.dynamic_grow_bytes() as usize,
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
}

impl Drop for Dynamic<'_> {
    fn drop(&mut self) {
        self.transient.destroy(&self.c);
        self.coherent.destroy(&self.c);
        self.pools.destroy(&self.c);
    }
}

impl Policy for Dynamic<'_> {
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
        // SAFETY: forwarded map contract.
        let r = match unsafe { self.pools.map(&self.c, orig, len, dir, &opts, 0) } {
            Ok(al) => Ok(al.bounce),
            Err(MapError::NoSpace) => {
                if self.may_grow() {
                    self.grow_pending.store(true, Ordering::Release);
                }
                // SAFETY: forwarded map contract.
                unsafe { self.transient.map(&self.c, orig, len, dir, &opts) }
            }
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.c.stats.map_failed();
        }
        r
    }

    fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<(), MapError> {
        let r = if self.pools.contains(bounce) {
            self.pools.unmap(&self.c, bounce, len, dir).map(|_| ())
        } else {
            self.transient.unmap(&self.c, bounce, len, dir)
        };
        r.map_err(|e| self.c.bad_call(e))
    }

    fn sync_for_device(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        let r = if self.pools.contains(bounce) {
            self.pools.sync(&self.c, bounce, len, true)
        } else {
            self.transient.sync(bounce, len, true)
        };
        r.map_err(|e| self.c.bad_call(e))
    }

    fn sync_for_cpu(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        let r = if self.pools.contains(bounce) {
            self.pools.sync(&self.c, bounce, len, false)
        } else {
            self.transient.sync(bounce, len, false)
        };
        r.map_err(|e| self.c.bad_call(e))
    }

    fn alloc_coherent(&self, len: usize) -> Result<u64, MapError> {
        self.coherent.alloc(&self.c, len, 4096)
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        self.coherent
            .free(&self.c, addr, len)
            .map_err(|e| self.c.bad_call(e))
    }

    fn background_work(&self) -> bool {
        let mut did = false;
        if self.grow_pending.swap(false, Ordering::AcqRel) && self.may_grow() {
            // A failure is counted (grow_failures); the next failed map schedules again.
            let _ = self.pools.add(
                &self.c,
                self.grow_bytes,
                HUGE_PAGE_SIZE as usize,
                true,
                None,
            );
            did = true;
        }
        if self.shrink_ns > 0 && self.pools.shrink_idle(&self.c, self.shrink_ns) {
            did = true;
        }
        did
    }

    fn report(&self) -> PoolReport {
        self.c.stats.report(self.c.name, 0)
    }

    fn extra_stats(&self) -> ExtraStats {
        self.c.stats.extra()
    }

    fn max_mapping_size(&self) -> usize {
        SEGMENT_BYTES
    }
}
