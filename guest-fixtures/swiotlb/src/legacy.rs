//! The `legacy` policy: the kernel's swiotlb. One pool fixed at boot (6% of RAM clamped to
//! [64 MiB, 1 GiB], or `pool=`), converted to shared in one call, 2 KiB slots, areas per vCPU;
//! coherent memory is allocated and converted per allocation, as a confidential guest's
//! `dma_alloc_coherent` does. A map that finds no room fails.

use crate::build::BuildError;
use crate::coherent::CoherentTable;
use crate::common::Common;
use crate::config::Config;
use crate::platform::Platform;
use crate::policy::{Direction, MapError, MapOpts, Policy};
use crate::pools::PoolSet;
use crate::slots::SEGMENT_BYTES;
use crate::stats::ExtraStats;
use memconv::abi::{PoolReport, HUGE_PAGE_SIZE};

/// Turn a growth failure at build time into a build error.
pub(crate) fn build_error(e: MapError) -> BuildError {
    match e {
        MapError::NoMemory => BuildError::NoMemory,
        MapError::Conversion(c) => BuildError::Conversion(c),
        _ => BuildError::BadConfig,
    }
}

/// The legacy policy.
pub struct Legacy<'p> {
    c: Common<'p>,
    pools: PoolSet,
    coherent: CoherentTable,
}

impl<'p> Legacy<'p> {
    /// Allocate and convert the pool (`cfg.legacy_pool_bytes()`, 2 MiB aligned).
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        Self::with_pool(cfg, plat, cfg.legacy_pool_bytes())
    }

    /// A legacy pool of `bytes` (rounded up to 256 KiB).
    pub(crate) fn with_pool(
        cfg: &Config,
        plat: &'p dyn Platform,
        bytes: u64,
    ) -> Result<Self, BuildError> {
        let c = Common::new(cfg, plat, false);
        let mut pools = PoolSet::new(plat, 1, cfg.cpus as usize, 1)?;
        let bytes = usize::try_from(bytes.div_ceil(SEGMENT_BYTES as u64) * SEGMENT_BYTES as u64)
            .map_err(|_| BuildError::BadConfig)?;
        if let Err(e) = pools.add(&c, bytes, HUGE_PAGE_SIZE as usize, false, None) {
            pools.destroy(&c);
            return Err(build_error(e));
        }
        Ok(Legacy {
            c,
            pools,
            coherent: CoherentTable::new(),
        })
    }

    /// The shared state (for the throttle policy, which wraps this one).
    pub(crate) fn common(&self) -> &Common<'p> {
        &self.c
    }

    /// The pool (for the throttle policy).
    pub(crate) fn pools(&self) -> &PoolSet {
        &self.pools
    }
}

impl Drop for Legacy<'_> {
    fn drop(&mut self) {
        self.coherent.destroy(&self.c);
        self.pools.destroy(&self.c);
    }
}

impl Policy for Legacy<'_> {
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
        match unsafe { self.pools.map(&self.c, orig, len, dir, &opts, 0) } {
            Ok(al) => Ok(al.bounce),
            Err(e) => {
                self.c.stats.map_failed();
                Err(e)
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
        self.coherent.alloc(&self.c, len, 4096)
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        self.coherent
            .free(&self.c, addr, len)
            .map_err(|e| self.c.bad_call(e))
    }

    fn background_work(&self) -> bool {
        false
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
