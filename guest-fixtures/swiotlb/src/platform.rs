//! The environment the pool runs in: the [`Platform`] trait (page provider, private<->shared
//! conversion, time, waiting, current vCPU) that the guest runtime implements, and
//! `PrivatePages`, the private memory the policies keep their metadata in.
//!
//! # Memory model
//! The guest is identity mapped: a physical address is also a valid pointer. Memory handed out
//! by [`Platform::alloc_pages`] is private (and accepted). The pool converts some of it to
//! shared for bounce buffers; everything that describes the pool (slot metadata, free lists,
//! tables) stays in private pages, so the host, which can write shared memory, can never
//! corrupt the allocator.

/// A physical address range, `len` bytes from `addr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl Range {
    /// `[addr, addr + len)`.
    pub const fn new(addr: u64, len: u64) -> Self {
        Range { addr, len }
    }

    /// One past the last byte (saturating).
    pub const fn end(&self) -> u64 {
        self.addr.saturating_add(self.len)
    }
}

/// A conversion request that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvertError {
    /// How many leading ranges of the request were converted before the failure (the host
    /// processes entries in order; `ranges[..done]` are in the new state, the rest unchanged).
    pub done: usize,
    /// The `memconv::abi::ERR_*` code of the failing range.
    pub code: u32,
}

/// What the pool needs from the guest runtime. All methods may be called from any vCPU
/// concurrently; none is called with a pool lock held except [`Platform::cpu`] and
/// [`Platform::now_ns`].
///
/// The guest runtime implements it over its page allocator, its hypercall transport and
/// `rdtsc`; host tests implement it over a block of host memory (`host::HostPlatform`).
pub trait Platform: Sync {
    /// Contiguous private memory: `bytes` long (a multiple of 4096), its address aligned to
    /// `align` (a power of two, at least 4096). `None` when exhausted. The contents are
    /// unspecified; the pool never relies on them.
    fn alloc_pages(&self, bytes: usize, align: usize) -> Option<u64>;

    /// Give back memory from [`Platform::alloc_pages`] (same address and length). The pool
    /// converts memory back to private before freeing it; it never frees shared memory.
    fn free_pages(&self, addr: u64, bytes: usize);

    /// Convert every range (4 KiB aligned and sized) private->shared (`to_shared`) or
    /// shared->private, in order, as few host exits as possible (many ranges per doorbell;
    /// one exit costs ~76 us). Afterwards the ranges read as zeros. On failure returns how many
    /// leading ranges were converted and the `abi::ERR_*` code of the first that was not.
    /// The page-size hint is the implementation's choice (2M where a range is 2 MiB aligned
    /// and sized).
    fn convert(&self, ranges: &[Range], to_shared: bool) -> Result<(), ConvertError>;

    /// Monotonic time in nanoseconds (the guest: `rdtsc` scaled by `BootInfo::tsc_khz`).
    fn now_ns(&self) -> u64;

    /// Called on every iteration of a wait loop (a blocked map, a retiring pool). The guest
    /// executes `pause`; a single-vCPU guest may also poll its device completions here and
    /// call `unmap` from inside: the pool holds no lock while it calls `relax`.
    fn relax(&self);

    /// Index of the calling vCPU (selects the allocation area to start in). Any value is
    /// accepted; it is reduced modulo the number of areas.
    fn cpu(&self) -> u32;
}

/// Size of a small page (the smallest unit of allocation and conversion).
pub const PAGE: usize = 4096;

/// Round `x` up to a multiple of `to` (a power of two); `None` on overflow.
pub(crate) const fn align_up(x: usize, to: usize) -> Option<usize> {
    match x.checked_add(to - 1) {
        Some(v) => Some(v & !(to - 1)),
        None => None,
    }
}

/// Private pages holding metadata; freed with [`PrivatePages::free`] (not on drop: freeing
/// needs the platform).
#[derive(Debug)]
pub(crate) struct PrivatePages {
    pub(crate) addr: u64,
    pub(crate) bytes: usize,
}

impl PrivatePages {
    /// At least `bytes` of private memory, 4 KiB aligned (or `align`).
    pub(crate) fn alloc(plat: &dyn Platform, bytes: usize, align: usize) -> Option<Self> {
        let bytes = align_up(bytes.max(1), PAGE)?;
        let addr = plat.alloc_pages(bytes, align.max(PAGE))?;
        Some(PrivatePages { addr, bytes })
    }

    /// The memory as a pointer to `T` (which must fit the page alignment).
    pub(crate) fn ptr<T>(&self) -> *mut T {
        self.addr as usize as *mut T
    }

    /// Give the pages back.
    pub(crate) fn free(self, plat: &dyn Platform) {
        plat.free_pages(self.addr, self.bytes);
    }
}
