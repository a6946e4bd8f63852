//! What the slot-pool policies (legacy, throttle, dynamic, aligned-2m) share, in one place
//! instead of repeated in each: [`Pooled`] (the [`Common`] state, the [`PoolSet`] and the
//! table of per-allocation coherent memory, with the unmap / sync / coherent / report calls
//! on them, refused calls counted) and [`Growth`] (growing the set by one pool when a map
//! found no room, and freeing idle grown pools, for dynamic and aligned-2m).

use crate::coherent::CoherentTable;
use crate::common::Common;
use crate::config::Config;
use crate::error::{BuildError, MapError};
use crate::platform::Platform;
use crate::policy::Direction;
use crate::pools::PoolSet;
use crate::slots::Alloc;
use crate::stats::ExtraStats;
use core::sync::atomic::{AtomicBool, Ordering};
use memconv::abi::{PoolReport, HUGE_PAGE_SIZE};

const HUGE: usize = HUGE_PAGE_SIZE as usize;

/// A policy's state and pools.
pub(crate) struct Pooled<'p> {
    pub c: Common<'p>,
    pub pools: PoolSet,
    pub coherent: CoherentTable,
}

impl<'p> Pooled<'p> {
    /// Room for `max_pools` pools (`permanent` of them never retired) with a boot pool of
    /// `boot_bytes`, 2 MiB aligned, allocated and converted now; 2M-only conversions with
    /// `only_2m`.
    pub fn new(
        cfg: &Config,
        plat: &'p dyn Platform,
        only_2m: bool,
        max_pools: usize,
        permanent: usize,
        boot_bytes: usize,
    ) -> Result<Self, BuildError> {
        let c = Common::new(cfg, plat, only_2m);
        let mut pools = PoolSet::new(plat, max_pools, cfg.cpus as usize, permanent)?;
        if let Err(e) = pools.add(&c, boot_bytes, HUGE, false, None) {
            pools.destroy(&c);
            return Err(BuildError::from_growth(e));
        }
        Ok(Pooled {
            c,
            pools,
            coherent: CoherentTable::new(),
        })
    }

    /// Unmap a pool mapping; a refused call is counted.
    pub fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<Alloc, MapError> {
        self.pools
            .unmap(&self.c, bounce, len, dir)
            .map_err(|e| self.c.bad_call(e))
    }

    /// Sync part of a pool mapping; a refused call is counted.
    pub fn sync(&self, bounce: u64, len: usize, for_device: bool) -> Result<(), MapError> {
        self.pools
            .sync(&self.c, bounce, len, for_device)
            .map_err(|e| self.c.bad_call(e))
    }

    /// Coherent memory straight from the platform, in units of `unit`.
    pub fn alloc_coherent(&self, len: usize, unit: usize) -> Result<u64, MapError> {
        self.coherent.alloc(&self.c, len, unit)
    }

    /// Free coherent memory: from the pools if `in_pools` and it lies there, else from the
    /// platform; a refused call is counted.
    pub fn free_coherent(&self, addr: u64, len: usize, in_pools: bool) -> Result<(), MapError> {
        let r = if in_pools && self.pools.contains(addr) {
            self.pools.free_coherent(&self.c, addr, len)
        } else {
            self.coherent.free(&self.c, addr, len)
        };
        r.map_err(|e| self.c.bad_call(e))
    }

    /// The statistics record, with `flags`.
    pub fn report(&self, flags: u64) -> PoolReport {
        self.c.stats.report(self.c.name, flags)
    }

    /// The figures beyond the record.
    pub fn extra_stats(&self) -> ExtraStats {
        self.c.stats.extra()
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        self.coherent.destroy(&self.c);
        self.pools.destroy(&self.c);
    }
}

/// Growth by one pool at a time (scheduled by a failed map, done by background work or
/// inline), bounded by `max_pools=` and `max=`, and the freeing of idle grown pools.
pub(crate) struct Growth {
    pending: AtomicBool,
    bytes: usize,
    max_pools: usize,
    max_bytes: u64,
    shrink_ns: u64,
}

impl Growth {
    /// Steps of `bytes`, limits from `cfg`.
    pub fn new(cfg: &Config, bytes: usize) -> Self {
        Growth {
            pending: AtomicBool::new(false),
            bytes,
            max_pools: cfg.max_pools as usize,
            max_bytes: cfg.max_bytes,
            shrink_ns: cfg.shrink_idle_ms.saturating_mul(1_000_000),
        }
    }

    /// Whether one more pool fits the limits.
    pub fn may_grow(&self, p: &Pooled) -> bool {
        p.pools.pools() < self.max_pools
            && p.c.stats.capacity() + self.bytes as u64 <= self.max_bytes
    }

    /// A map found no room: have background work grow the set, if it may.
    pub fn schedule(&self, p: &Pooled) {
        if self.may_grow(p) {
            self.pending.store(true, Ordering::Release);
        }
    }

    /// Grow now unless someone did since generation `seen`; whether there may be new room.
    pub fn grow_inline(&self, p: &Pooled, seen: u64) -> bool {
        self.may_grow(p)
            && p.pools
                .add(&p.c, self.bytes, HUGE, true, Some(seen))
                .is_ok()
    }

    /// Scheduled growth, then idle shrinking; whether it did something.
    pub fn background_work(&self, p: &Pooled) -> bool {
        let mut did = false;
        if self.pending.swap(false, Ordering::AcqRel) && self.may_grow(p) {
            // A failure is counted (grow_failures); the next failed map schedules again.
            let _ = p.pools.add(&p.c, self.bytes, HUGE, true, None);
            did = true;
        }
        if self.shrink_ns > 0 && p.pools.shrink_idle(&p.c, self.shrink_ns, usize::MAX) {
            did = true;
        }
        did
    }
}
