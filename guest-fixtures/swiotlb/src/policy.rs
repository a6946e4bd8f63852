//! The kernel-shaped interface every pool policy offers: the [`Policy`] trait (public, so a
//! fixture can plug in a policy of its own, e.g. a deliberately broken one for the
//! conformance suite) and its argument types. Its error type is [`crate::error::MapError`];
//! construction by name is in [`crate::build`].

use crate::error::MapError;
use crate::stats::ExtraStats;
use memconv::abi::PoolReport;

/// DMA direction of a streaming mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Direction {
    /// The device reads: data is copied into the bounce buffer at map (and on
    /// `sync_for_device`).
    ToDevice = 1,
    /// The device writes: data is copied back at unmap (and on `sync_for_cpu`).
    FromDevice = 2,
    /// Both.
    Bidirectional = 3,
}

impl Direction {
    /// Whether data flows to the device.
    pub const fn to_device(self) -> bool {
        self as u8 & 1 != 0
    }

    /// Whether data flows from the device.
    pub const fn from_device(self) -> bool {
        self as u8 & 2 != 0
    }

    /// Two bits for metadata.
    pub(crate) const fn bits(self) -> u8 {
        self as u8
    }

    /// From [`Direction::bits`] (anything else reads as bidirectional).
    pub(crate) const fn from_bits(b: u8) -> Self {
        match b & 3 {
            1 => Direction::ToDevice,
            2 => Direction::FromDevice,
            _ => Direction::Bidirectional,
        }
    }
}

/// Per-map options (the kernel's DMA attributes and device masks).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapOpts {
    /// The caller may wait (a blocking context): the throttle policy may make it wait for
    /// room, the aligned-2m policy may grow the pool inline.
    pub may_block: bool,
    /// Keep `orig & min_align_mask` as the low bits of the bounce address (2^k - 1; OR-ed with
    /// the pool's configured mask). Like the kernel's `dma_get_min_align_mask()`.
    pub min_align_mask: u32,
    /// Align the start of the bounce allocation to `alloc_align_mask + 1` (2^k - 1).
    pub alloc_align_mask: u32,
}

impl MapOpts {
    /// No masks; `may_block` as given.
    pub const fn new(may_block: bool) -> Self {
        MapOpts {
            may_block,
            min_align_mask: 0,
            alloc_align_mask: 0,
        }
    }

    /// With a min-align mask.
    pub const fn min_align(mut self, mask: u32) -> Self {
        self.min_align_mask = mask;
        self
    }

    /// With an alloc-align mask.
    pub const fn alloc_align(mut self, mask: u32) -> Self {
        self.alloc_align_mask = mask;
        self
    }
}

/// A bounce-buffer pool policy. All methods may be called from any vCPU concurrently.
///
/// Addresses are guest physical addresses, which are also pointers (identity map). A bounce
/// address is valid from `map` until `unmap`; the device may access exactly
/// `[bounce, bounce + len)`, which is shared memory.
///
/// Implementations outside this crate can reuse [`crate::Stats`] for `report` and
/// [`crate::Converter`] to issue counted conversions.
pub trait Policy: Sync {
    /// The policy's name (as in `policy=` and in reports).
    fn name(&self) -> &'static str;

    /// Map `[orig, orig + len)` for a DMA in direction `dir` and return the bounce address.
    /// Copies the data into the bounce buffer for `ToDevice` and `Bidirectional` (and, with
    /// the `prefill` option, for `FromDevice` too).
    ///
    /// # Safety
    /// `[orig, orig + len)` must be memory the caller may read and write, and stays so (and is
    /// not otherwise accessed by the CPU for the DMA's purposes) until the matching
    /// [`Policy::unmap`]; the pool copies from it here and on `sync_for_device`, and into it
    /// on `sync_for_cpu` and `unmap`.
    unsafe fn map_with(
        &self,
        orig: u64,
        len: usize,
        dir: Direction,
        opts: MapOpts,
    ) -> Result<u64, MapError>;

    /// [`Policy::map_with`] with no per-map masks.
    ///
    /// # Safety
    /// As for [`Policy::map_with`].
    unsafe fn map(
        &self,
        orig: u64,
        len: usize,
        dir: Direction,
        may_block: bool,
    ) -> Result<u64, MapError> {
        // SAFETY: the caller upholds `map_with`'s contract.
        unsafe { self.map_with(orig, len, dir, MapOpts::new(may_block)) }
    }

    /// End the mapping at `bounce` (the address `map` returned) of `len` bytes (as mapped):
    /// copies the data back for `dir` = `FromDevice` / `Bidirectional`, then frees. A bad
    /// address or length is refused (and counted); the mapping is then left as it was.
    fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<(), MapError>;

    /// Before the device accesses `[bounce, bounce + len)` (inside a mapping) again: copy the
    /// original to the bounce buffer if the mapping is `ToDevice` / `Bidirectional`.
    fn sync_for_device(&self, bounce: u64, len: usize) -> Result<(), MapError>;

    /// Before the CPU reads the result: copy `[bounce, bounce + len)` back to the original if
    /// the mapping is `FromDevice` / `Bidirectional`.
    fn sync_for_cpu(&self, bounce: u64, len: usize) -> Result<(), MapError>;

    /// `len` bytes of zeroed shared memory for rings and descriptors, page aligned.
    fn alloc_coherent(&self, len: usize) -> Result<u64, MapError>;

    /// Give back [`Policy::alloc_coherent`] memory (same address and length).
    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError>;

    /// One step of deferred work: growing (dynamic, aligned-2m), refilling (refill),
    /// shrinking idle pools. Returns whether it did something, so a worker can loop
    /// `while pool.background_work() {}` and otherwise idle. Call it from a dedicated vCPU's
    /// loop, or from the mapping vCPU between requests (it takes no lock a map holds while
    /// waiting, and is cheap when there is nothing to do).
    fn background_work(&self) -> bool;

    /// The statistics record (`io_requests` / `io_errors` are left 0 for the driver).
    fn report(&self) -> PoolReport;

    /// Figures the wire record has no field for.
    fn extra_stats(&self) -> ExtraStats {
        ExtraStats::default()
    }

    /// The largest `len` a map can succeed with (without a min-align offset).
    fn max_mapping_size(&self) -> usize;
}
