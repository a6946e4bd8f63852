//! The `legacy` policy: the kernel's swiotlb. One pool fixed at boot (6% of RAM clamped to
//! [64 MiB, 1 GiB], or `pool=`), converted to shared in one call, 2 KiB slots, areas per vCPU;
//! coherent memory is allocated and converted per allocation, as a confidential guest's
//! `dma_alloc_coherent` does. A map that finds no room fails.

use crate::config::Config;
use crate::error::{BuildError, MapError};
use crate::platform::Platform;
use crate::policy::{Direction, MapOpts, Policy};
use crate::pooled::Pooled;
use crate::slots::SEGMENT_BYTES;
use crate::stats::ExtraStats;
use memconv::abi::PoolReport;

/// The legacy policy.
pub struct Legacy<'p> {
    p: Pooled<'p>,
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
        let bytes = usize::try_from(bytes.div_ceil(SEGMENT_BYTES as u64) * SEGMENT_BYTES as u64)
            .map_err(|_| BuildError::BadConfig)?;
        Ok(Legacy {
            p: Pooled::new(cfg, plat, false, 1, 1, bytes)?,
        })
    }

    /// The state and pool (for the throttle policy, which wraps this one).
    pub(crate) fn pooled(&self) -> &Pooled<'p> {
        &self.p
    }
}

impl Policy for Legacy<'_> {
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
        let r = unsafe { self.p.pools.map(&self.p.c, orig, len, dir, &opts, 0) };
        self.p.c.map_result(r.map(|al| al.bounce))
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
        self.p.alloc_coherent(len, 4096)
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        self.p.free_coherent(addr, len, false)
    }

    fn background_work(&self) -> bool {
        false
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
