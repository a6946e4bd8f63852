//! [`HostPlatform`]: a [`Platform`] over a block of host memory standing in for guest RAM
//! (feature `host`, and the crate's own tests). Addresses are host pointers, as in the
//! identity-mapped guest. It is a strict model of the guest environment: a page allocator that
//! checks every free, a shared-page bitmap driven by `convert` (which zeroes converted pages,
//! as the real host does), a log of every conversion call, and a list of contract violations
//! (converting memory that is not allocated or already in the target state, unaligned ranges,
//! freeing shared or unknown memory) that tests assert to be empty. It can also emulate a host
//! that only honours 2 MiB conversions, and inject conversion failures.

extern crate std;

use crate::platform::{ConvertError, Platform, Range, PAGE};
use core::cell::Cell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use memconv::abi::{
    ERR_BAD_REQUEST, ERR_NO_MEMORY, ERR_REQUIRES_2M, ERR_UNALIGNED, HUGE_PAGE_SIZE,
};
use std::alloc::Layout;
use std::collections::BTreeMap;
use std::format;
use std::string::String;
use std::sync::Mutex;
use std::time::Instant;
use std::vec;
use std::vec::Vec;

std::thread_local! {
    static CPU: Cell<u32> = const { Cell::new(0) };
}

/// One `convert` call as the host saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConvRecord {
    /// Direction: private -> shared when true.
    pub to_shared: bool,
    /// The ranges, in order.
    pub ranges: Vec<Range>,
    /// Whether the call succeeded.
    pub ok: bool,
}

struct Inner {
    /// One bit per page: allocated.
    allocated: Vec<u64>,
    /// One bit per page: shared.
    shared: Vec<u64>,
    /// Live allocations: address -> bytes.
    allocs: BTreeMap<u64, usize>,
    log: Vec<ConvRecord>,
    violations: Vec<String>,
}

fn bit(v: &[u64], i: usize) -> bool {
    v[i / 64] & (1 << (i % 64)) != 0
}

fn set_bit(v: &mut [u64], i: usize, on: bool) {
    if on {
        v[i / 64] |= 1 << (i % 64);
    } else {
        v[i / 64] &= !(1 << (i % 64));
    }
}

/// Host memory posing as guest RAM.
pub struct HostPlatform {
    raw: *mut u8,
    layout: Layout,
    base: u64,
    size: usize,
    inner: Mutex<Inner>,
    require_2m: AtomicBool,
    fail_converts: AtomicU64,
    logging: AtomicBool,
    start: Instant,
}

// SAFETY: the raw block is only written through addresses the pool owns (or the test owns);
// all bookkeeping is behind the mutex.
unsafe impl Sync for HostPlatform {}
// SAFETY: as above.
unsafe impl Send for HostPlatform {}

impl HostPlatform {
    /// `size` bytes (rounded up to 2 MiB) of lazily zeroed memory, 2 MiB aligned.
    pub fn new(size: usize) -> Self {
        let huge = HUGE_PAGE_SIZE as usize;
        let size = size.div_ceil(huge) * huge;
        // A small alignment makes the allocator use calloc, which maps zero pages lazily.
        let layout = Layout::from_size_align(size + huge, 16).expect("layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!raw.is_null(), "host memory");
        let base = (raw as u64).div_ceil(huge as u64) * huge as u64;
        let pages = size / PAGE;
        HostPlatform {
            raw,
            layout,
            base,
            size,
            inner: Mutex::new(Inner {
                allocated: vec![0; pages.div_ceil(64)],
                shared: vec![0; pages.div_ceil(64)],
                allocs: BTreeMap::new(),
                log: Vec::new(),
                violations: Vec::new(),
            }),
            require_2m: AtomicBool::new(false),
            fail_converts: AtomicU64::new(0),
            logging: AtomicBool::new(true),
            start: Instant::now(),
        }
    }

    /// First byte of the "RAM".
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Set the vCPU index `cpu()` returns on the calling thread.
    pub fn set_cpu(cpu: u32) {
        CPU.with(|c| c.set(cpu));
    }

    /// Emulate a host with 2 MiB granularity: refuse other conversions with
    /// `ERR_REQUIRES_2M`.
    pub fn set_require_2m(&self, on: bool) {
        self.require_2m.store(on, Ordering::Relaxed);
    }

    /// Fail the next `n` conversion calls with `ERR_NO_MEMORY` (on their first range).
    pub fn fail_next_converts(&self, n: u64) {
        self.fail_converts.store(n, Ordering::Relaxed);
    }

    /// Keep (default) or stop keeping the conversion log (benchmarks).
    pub fn set_logging(&self, on: bool) {
        self.logging.store(on, Ordering::Relaxed);
    }

    /// Every conversion call so far.
    pub fn conversions(&self) -> Vec<ConvRecord> {
        self.inner.lock().unwrap().log.clone()
    }

    /// Contract violations seen so far (empty when the pool behaved).
    pub fn violations(&self) -> Vec<String> {
        self.inner.lock().unwrap().violations.clone()
    }

    /// Whether every page of `[addr, addr + len)` is shared.
    pub fn is_shared(&self, addr: u64, len: usize) -> bool {
        let Some((first, n)) = self.pages(addr, len as u64) else {
            return false;
        };
        let g = self.inner.lock().unwrap();
        (first..first + n).all(|p| bit(&g.shared, p))
    }

    /// Bytes currently shared.
    pub fn shared_bytes(&self) -> u64 {
        let g = self.inner.lock().unwrap();
        g.shared.iter().map(|w| w.count_ones() as u64).sum::<u64>() * PAGE as u64
    }

    /// Bytes currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        let g = self.inner.lock().unwrap();
        g.allocs.values().map(|&b| b as u64).sum()
    }

    /// Page range of `[addr, addr + len)` when it lies inside the RAM (any alignment).
    fn pages(&self, addr: u64, len: u64) -> Option<(usize, usize)> {
        let end = addr.checked_add(len)?;
        if len == 0 || addr < self.base || end > self.base + self.size as u64 {
            return None;
        }
        let first = ((addr - self.base) / PAGE as u64) as usize;
        let last = ((end - 1 - self.base) / PAGE as u64) as usize;
        Some((first, last - first + 1))
    }

    fn check_range(&self, g: &Inner, r: &Range, to_shared: bool) -> Result<(), (u32, String)> {
        if r.len == 0 || !r.addr.is_multiple_of(PAGE as u64) || !r.len.is_multiple_of(PAGE as u64) {
            return Err((
                ERR_UNALIGNED,
                format!("unaligned conversion {:#x}+{:#x}", r.addr, r.len),
            ));
        }
        let Some((first, n)) = self.pages(r.addr, r.len) else {
            return Err((
                ERR_BAD_REQUEST,
                format!("conversion outside RAM {:#x}+{:#x}", r.addr, r.len),
            ));
        };
        for p in first..first + n {
            if !bit(&g.allocated, p) {
                return Err((
                    ERR_BAD_REQUEST,
                    format!(
                        "conversion of unallocated page {p} in {:#x}+{:#x}",
                        r.addr, r.len
                    ),
                ));
            }
            if bit(&g.shared, p) == to_shared {
                return Err((
                    ERR_BAD_REQUEST,
                    format!(
                        "page {p} in {:#x}+{:#x} already {}",
                        r.addr,
                        r.len,
                        if to_shared { "shared" } else { "private" }
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl Drop for HostPlatform {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `alloc_zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.raw, self.layout) };
    }
}

impl Platform for HostPlatform {
    fn alloc_pages(&self, bytes: usize, align: usize) -> Option<u64> {
        if bytes == 0 || !bytes.is_multiple_of(PAGE) || !align.is_power_of_two() || align < PAGE {
            self.inner
                .lock()
                .unwrap()
                .violations
                .push(format!("bad alloc_pages({bytes:#x}, {align:#x})"));
            return None;
        }
        let n = bytes / PAGE;
        let step = align / PAGE;
        let total = self.size / PAGE;
        let mut g = self.inner.lock().unwrap();
        let mut p = 0;
        while p + n <= total {
            match (p..p + n).find(|&q| bit(&g.allocated, q)) {
                None => {
                    for q in p..p + n {
                        set_bit(&mut g.allocated, q, true);
                    }
                    let addr = self.base + (p * PAGE) as u64;
                    g.allocs.insert(addr, bytes);
                    return Some(addr);
                }
                Some(q) => p = (q + 1).div_ceil(step) * step,
            }
        }
        None
    }

    fn free_pages(&self, addr: u64, bytes: usize) {
        let mut g = self.inner.lock().unwrap();
        if g.allocs.get(&addr) != Some(&bytes) {
            g.violations.push(format!(
                "free_pages({addr:#x}, {bytes:#x}) of no such allocation"
            ));
            return;
        }
        let (first, n) = self
            .pages(addr, bytes as u64)
            .expect("allocation inside RAM");
        if (first..first + n).any(|p| bit(&g.shared, p)) {
            g.violations.push(format!(
                "free_pages({addr:#x}, {bytes:#x}) of shared memory"
            ));
            return;
        }
        g.allocs.remove(&addr);
        for p in first..first + n {
            set_bit(&mut g.allocated, p, false);
        }
    }

    fn convert(&self, ranges: &[Range], to_shared: bool) -> Result<(), ConvertError> {
        let mut g = self.inner.lock().unwrap();
        let mut result = Ok(());
        for (i, r) in ranges.iter().enumerate() {
            if self.fail_converts.load(Ordering::Relaxed) > 0 {
                self.fail_converts.fetch_sub(1, Ordering::Relaxed);
                result = Err(ConvertError {
                    done: i,
                    code: ERR_NO_MEMORY,
                });
                break;
            }
            if self.require_2m.load(Ordering::Relaxed)
                && (r.addr % HUGE_PAGE_SIZE != 0 || r.len % HUGE_PAGE_SIZE != 0)
            {
                result = Err(ConvertError {
                    done: i,
                    code: ERR_REQUIRES_2M,
                });
                break;
            }
            if let Err((code, msg)) = self.check_range(&g, r, to_shared) {
                g.violations.push(msg);
                result = Err(ConvertError { done: i, code });
                break;
            }
            let (first, n) = self.pages(r.addr, r.len).expect("checked");
            for p in first..first + n {
                set_bit(&mut g.shared, p, to_shared);
            }
            // SAFETY: the range is inside the RAM block (checked) and allocated to the pool;
            // a conversion discards the contents, as on the real host.
            unsafe { core::ptr::write_bytes(r.addr as usize as *mut u8, 0, r.len as usize) };
        }
        if self.logging.load(Ordering::Relaxed) {
            g.log.push(ConvRecord {
                to_shared,
                ranges: ranges.to_vec(),
                ok: result.is_ok(),
            });
        }
        result
    }

    fn now_ns(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    fn relax(&self) {
        std::thread::yield_now();
    }

    fn cpu(&self) -> u32 {
        CPU.with(|c| c.get())
    }
}
