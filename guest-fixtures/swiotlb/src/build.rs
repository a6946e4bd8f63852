//! Building a policy by name: [`AnyPolicy`], one of the six built-in policies, chosen at
//! run time from a [`Config`] (its error, [`BuildError`], is in [`crate::error`]).

use crate::adaptive::Adaptive;
use crate::aligned2m::Aligned2m;
use crate::config::{Config, PolicyKind};
use crate::dynamic::Dynamic;
use crate::error::{BuildError, MapError};
use crate::legacy::Legacy;
use crate::platform::Platform;
use crate::policy::{Direction, MapOpts, Policy};
use crate::refill::Refill;
use crate::stats::ExtraStats;
use crate::throttle::Throttle;
use memconv::abi::PoolReport;

/// One of the six built-in policies, chosen at run time. (The variants differ by a couple of
/// KiB; without an allocator there is nothing to box them in.)
#[allow(clippy::large_enum_variant)]
pub enum AnyPolicy<'p> {
    /// `legacy`.
    Legacy(Legacy<'p>),
    /// `dynamic`.
    Dynamic(Dynamic<'p>),
    /// `refill`.
    Refill(Refill<'p>),
    /// `throttle`.
    Throttle(Throttle<'p>),
    /// `aligned-2m`.
    Aligned2m(Aligned2m<'p>),
    /// `adaptive`.
    Adaptive(Adaptive<'p>),
}

impl<'p> AnyPolicy<'p> {
    /// Build the policy `cfg.kind` on `plat`: allocates and converts its boot memory.
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        Ok(match cfg.kind {
            PolicyKind::Legacy => AnyPolicy::Legacy(Legacy::new(cfg, plat)?),
            PolicyKind::Dynamic => AnyPolicy::Dynamic(Dynamic::new(cfg, plat)?),
            PolicyKind::Refill => AnyPolicy::Refill(Refill::new(cfg, plat)?),
            PolicyKind::Throttle => AnyPolicy::Throttle(Throttle::new(cfg, plat)?),
            PolicyKind::Aligned2m => AnyPolicy::Aligned2m(Aligned2m::new(cfg, plat)?),
            PolicyKind::Adaptive => AnyPolicy::Adaptive(Adaptive::new(cfg, plat)?),
        })
    }

    /// The policy as a trait object.
    pub fn as_dyn(&self) -> &(dyn Policy + 'p) {
        match self {
            AnyPolicy::Legacy(p) => p,
            AnyPolicy::Dynamic(p) => p,
            AnyPolicy::Refill(p) => p,
            AnyPolicy::Throttle(p) => p,
            AnyPolicy::Aligned2m(p) => p,
            AnyPolicy::Adaptive(p) => p,
        }
    }
}

impl Policy for AnyPolicy<'_> {
    fn name(&self) -> &'static str {
        self.as_dyn().name()
    }
    unsafe fn map_with(
        &self,
        orig: u64,
        len: usize,
        dir: Direction,
        opts: MapOpts,
    ) -> Result<u64, MapError> {
        // SAFETY: forwarded contract.
        unsafe { self.as_dyn().map_with(orig, len, dir, opts) }
    }
    fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<(), MapError> {
        self.as_dyn().unmap(bounce, len, dir)
    }
    fn sync_for_device(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.as_dyn().sync_for_device(bounce, len)
    }
    fn sync_for_cpu(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.as_dyn().sync_for_cpu(bounce, len)
    }
    fn alloc_coherent(&self, len: usize) -> Result<u64, MapError> {
        self.as_dyn().alloc_coherent(len)
    }
    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        self.as_dyn().free_coherent(addr, len)
    }
    fn background_work(&self) -> bool {
        self.as_dyn().background_work()
    }
    fn report(&self) -> PoolReport {
        self.as_dyn().report()
    }
    fn extra_stats(&self) -> ExtraStats {
        self.as_dyn().extra_stats()
    }
    fn max_mapping_size(&self) -> usize {
        self.as_dyn().max_mapping_size()
    }
}
