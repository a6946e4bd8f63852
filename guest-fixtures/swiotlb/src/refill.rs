//! The `refill` policy (the 2023 cc-swiotlb RFC): free lists of ready buffers per size class
//! (512 B, 2 KiB, 4 KiB, 16 KiB, 512 KiB), each with a watermark (the RFC's 256, 16384,
//! 8192, 1024 and 32 buffers, ~96 MiB when full, scaled down to `pool=` or the legacy default
//! size when that is smaller, or set with `wm=`). A map takes a buffer of the smallest class
//! that fits (or a bigger one when that class is empty) and fails, counted, when none has one.
//! When a class falls below half its watermark, [`Policy::background_work`] (a worker vCPU)
//! refills it up to the watermark in batches (`batch=`, 4 MiB; smaller when the watermark
//! needs less), one conversion per batch. The boot fill converts all batches in one call.
//!
//! Per-vCPU shards: each class's free list is split into up to [`MAX_SHARDS`] shards (one per
//! vCPU, `cpus=`), each with its own lock on its own cache line; a batch belongs to one shard
//! (the emptiest when it is published) and its buffers always return there, so a vCPU that
//! maps and unmaps touches only its shard's lock; a map tries its own shard first, then the
//! others. (With one shared list, two vCPUs mapping at once ran at 0.4x one vCPU's rate.)
//!
//! Buffers are carved from batches aligned to their class size, so a class can serve a
//! min-align mask below its size. Free lists and per-buffer records live in private pages;
//! a free-list entry names (batch, buffer), so a map needs no search. Batches are never
//! given back while the policy lives (a class owns at most 4x its watermark).
//!
//! Over 600 lines (~700) on purpose: the batch table, the free lists and the map / unmap /
//! sync paths and the shards share one set of unsafe metadata invariants, kept in one file to be
//! read together.

use crate::coherent::CoherentTable;
use crate::common::{copy, sync_copy, Common};
use crate::config::{Config, REFILL_CLASSES};
use crate::convert::ConvError;
use crate::error::BuildError;
use crate::error::MapError;
use crate::platform::{align_up, Platform, PrivatePages, Range, PAGE};
use crate::policy::{Direction, MapOpts, Policy};
use crate::stats::ExtraStats;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::*};
use memconv::abi::{PoolReport, HUGE_PAGE_SIZE};
use rtcore::sync::SpinLock;

const NCLASS: usize = REFILL_CLASSES.len();
/// Largest buffer.
const MAX_CLASS: usize = REFILL_CLASSES[NCLASS - 1];
/// Most batches converted in one call (boot fill, teardown).
const CONVERT_CHUNK: usize = 32;
/// Most free-list shards per class (vCPUs beyond share).
pub const MAX_SHARDS: usize = 4;

const FREE: u8 = 0;
const LIVE: u8 = 1;
const RELEASING: u8 = 2;

/// Per-buffer record (guarded by its batch's shard lock).
#[repr(C)]
#[derive(Clone, Copy)]
struct BufMeta {
    orig: u64,
    len: u32,
    offset: u32,
    state: u8,
    dir: u8,
}

/// A converted batch, immutable once published.
#[repr(C)]
#[derive(Clone, Copy)]
struct Batch {
    base: u64,
    bytes: u64,
    class: u32,
    nbuf: u32,
    meta: u64,
    meta_bytes: u64,
    /// The shard whose free list holds this batch's free buffers.
    shard: u32,
}

/// A class's free list: a stack of (batch << 32 | buffer).
struct FreeList {
    stack: *mut u64,
    top: u32,
    cap: u32,
}

// SAFETY: the stack is private memory owned by the shard, reached only under its lock.
unsafe impl Send for FreeList {}

impl FreeList {
    /// Push buffer `k` of batch `bi` (dropped if the stack is full: the stack pages are sized
    /// for the class's most buffers, so it never is).
    fn push(&mut self, bi: usize, k: usize) {
        if self.top < self.cap {
            // SAFETY: `top < cap` entries fit the stack pages.
            unsafe {
                self.stack
                    .add(self.top as usize)
                    .write((bi as u64) << 32 | k as u64)
            };
            self.top += 1;
        }
    }
}

/// One shard of a class: its free list and lock, alone on its cache line(s).
#[repr(align(64))]
struct Shard {
    list: SpinLock<FreeList>,
    /// Free buffers (mirror of the stack top, for lock-free checks).
    free: AtomicU32,
    stack_mem: (u64, usize),
}

struct Class {
    size: usize,
    wm: u32,
    /// Bytes and buffers per batch.
    batch_bytes: usize,
    per_batch: u32,
    /// Most buffers the class may own.
    cap: u32,
    shards: [Shard; MAX_SHARDS],
    /// Buffers owned.
    total: AtomicU32,
    /// Below half the watermark and not yet back to it.
    refilling: AtomicBool,
}

impl Class {
    /// Free buffers over the first `n` shards.
    fn free(&self, n: usize) -> u32 {
        self.shards[..n].iter().map(|s| s.free.load(Relaxed)).sum()
    }
}

/// The refill policy.
pub struct Refill<'p> {
    c: Common<'p>,
    classes: [Class; NCLASS],
    batches: *mut Batch,
    batch_cap: usize,
    batch_count: AtomicUsize,
    table_mem: (u64, usize),
    coherent: CoherentTable,
    max_bytes: u64,
    /// Serialises refills and batch publication.
    grow_lock: SpinLock<()>,
    /// Shards in use per class (1..=MAX_SHARDS).
    nshards: usize,
}

// SAFETY: published batches are immutable (written before `batch_count` is released);
// buffer records and free lists are only touched under their shard's lock.
unsafe impl Sync for Refill<'_> {}
// SAFETY: as above; the policy owns all its private memory.
unsafe impl Send for Refill<'_> {}

/// A batch allocated but not yet converted / published.
#[derive(Clone, Copy, Default)]
struct Pending {
    class: usize,
    base: u64,
    bytes: usize,
    meta: u64,
    meta_bytes: usize,
}

impl<'p> Refill<'p> {
    /// Set up the classes and fill them to their watermarks.
    pub fn new(cfg: &Config, plat: &'p dyn Platform) -> Result<Self, BuildError> {
        let c = Common::new(cfg, plat, false);
        let wm = cfg.refill_watermarks();
        let batch = cfg.batch_bytes as usize;
        let nshards = (cfg.cpus as usize).clamp(1, MAX_SHARDS);
        let mut batch_cap = 1;
        let mut fail = None;
        let classes: [Class; NCLASS] = core::array::from_fn(|i| {
            let size = REFILL_CLASSES[i];
            let unit = size.max(PAGE);
            let want = (wm[i] as usize).saturating_mul(size);
            let batch_bytes = align_up(want.min(batch), unit).unwrap_or(unit).max(unit);
            let per_batch = (batch_bytes / size) as u32;
            let cap =
                (wm[i].saturating_mul(4)).max(wm[i].saturating_add(per_batch.saturating_mul(2)));
            batch_cap += (cap as usize).div_ceil(per_batch as usize);
            // Every shard's stack can hold all the class's buffers (a shard may end up with
            // every batch); unused shards get none.
            let shards = core::array::from_fn(|k| {
                let mem = if k < nshards {
                    match PrivatePages::alloc(plat, cap as usize * 8, PAGE) {
                        Some(m) => (m.addr, m.bytes),
                        None => {
                            fail = Some(BuildError::NoMemory);
                            (0, 0)
                        }
                    }
                } else {
                    (0, 0)
                };
                Shard {
                    list: SpinLock::new(FreeList {
                        stack: mem.0 as usize as *mut u64,
                        top: 0,
                        cap: if mem.1 == 0 { 0 } else { cap },
                    }),
                    free: AtomicU32::new(0),
                    stack_mem: mem,
                }
            });
            Class {
                size,
                wm: wm[i],
                batch_bytes,
                per_batch,
                cap,
                shards,
                total: AtomicU32::new(0),
                refilling: AtomicBool::new(false),
            }
        });
        let table = PrivatePages::alloc(plat, batch_cap * core::mem::size_of::<Batch>(), PAGE);
        let (batches, table_mem) = match table {
            Some(t) => (t.ptr::<Batch>(), (t.addr, t.bytes)),
            None => (core::ptr::null_mut(), (0, 0)),
        };
        let mut me = Refill {
            c,
            classes,
            batches,
            batch_cap: if batches.is_null() { 0 } else { batch_cap },
            batch_count: AtomicUsize::new(0),
            table_mem,
            coherent: CoherentTable::new(),
            max_bytes: cfg.max_bytes,
            grow_lock: SpinLock::new(()),
            nshards,
        };
        if batches.is_null() {
            fail = Some(BuildError::NoMemory);
        }
        if let Some(e) = fail {
            return Err(e);
        }
        me.boot_fill()?;
        Ok(me)
    }

    /// Fill every class to its watermark, converting up to [`CONVERT_CHUNK`] batches per call.
    fn boot_fill(&mut self) -> Result<(), BuildError> {
        let mut pending = [Pending::default(); CONVERT_CHUNK];
        let mut n = 0;
        let mut bytes = 0u64;
        for ci in 0..NCLASS {
            let cls = &self.classes[ci];
            let mut planned = 0u32;
            while planned < cls.wm {
                if self.batch_count.load(Relaxed) + n >= self.batch_cap
                    || bytes + cls.batch_bytes as u64 > self.max_bytes
                {
                    break;
                }
                let Some(p) = self.alloc_batch(ci) else {
                    self.free_unconverted(&pending[..n]);
                    return Err(BuildError::NoMemory);
                };
                pending[n] = p;
                planned += cls.per_batch;
                bytes += cls.batch_bytes as u64;
                n += 1;
                if n == CONVERT_CHUNK {
                    self.convert_publish(&pending[..n], false)?;
                    n = 0;
                }
            }
        }
        self.convert_publish(&pending[..n], false)
    }

    /// Give back batches that were allocated but never converted.
    fn free_unconverted(&self, batches: &[Pending]) {
        for b in batches {
            PrivatePages {
                addr: b.meta,
                bytes: b.meta_bytes,
            }
            .free(self.c.plat);
            self.c.plat.free_pages(b.base, b.bytes);
        }
    }

    /// Pages and buffer records for one batch of class `ci` (not converted).
    fn alloc_batch(&self, ci: usize) -> Option<Pending> {
        let cls = &self.classes[ci];
        let plat = self.c.plat;
        let huge = HUGE_PAGE_SIZE as usize;
        let align = if cls.batch_bytes.is_multiple_of(huge) {
            huge
        } else {
            cls.size.max(PAGE)
        };
        let base = plat.alloc_pages(cls.batch_bytes, align)?;
        let meta_bytes = cls.per_batch as usize * core::mem::size_of::<BufMeta>();
        let Some(meta) = PrivatePages::alloc(plat, meta_bytes, PAGE) else {
            plat.free_pages(base, cls.batch_bytes);
            return None;
        };
        Some(Pending {
            class: ci,
            base,
            bytes: cls.batch_bytes,
            meta: meta.addr,
            meta_bytes: meta.bytes,
        })
    }

    /// Convert `batches` to shared in one call and publish them; on failure free them.
    fn convert_publish(&self, batches: &[Pending], growth: bool) -> Result<(), BuildError> {
        if batches.is_empty() {
            return Ok(());
        }
        let mut ranges = [Range::default(); CONVERT_CHUNK];
        for (r, b) in ranges.iter_mut().zip(batches) {
            *r = Range::new(b.base, b.bytes as u64);
        }
        if let Err(e) = self
            .c
            .conv
            .convert(&self.c.stats, &ranges[..batches.len()], true)
        {
            for b in batches {
                PrivatePages {
                    addr: b.meta,
                    bytes: b.meta_bytes,
                }
                .free(self.c.plat);
                if let ConvError::Stuck(_) = e {
                    self.c.stats.leaked(b.bytes as u64);
                } else {
                    self.c.plat.free_pages(b.base, b.bytes);
                }
            }
            self.c.stats.grow_failed();
            return Err(BuildError::Conversion(e));
        }
        for b in batches {
            self.publish(b);
            if growth {
                self.c.stats.grew();
            }
        }
        Ok(())
    }

    /// Make a converted batch usable: record it and push its buffers.
    fn publish(&self, b: &Pending) {
        let cls = &self.classes[b.class];
        let bi = self.batch_count.load(Acquire);
        let nbuf = cls.per_batch;
        // The emptiest shard gets the batch.
        let shard = (0..self.nshards)
            .min_by_key(|&k| cls.shards[k].free.load(Relaxed))
            .unwrap_or(0);
        let meta = b.meta as usize as *mut BufMeta;
        for k in 0..nbuf as usize {
            let m = BufMeta {
                orig: 0,
                len: 0,
                offset: 0,
                state: FREE,
                dir: 0,
            };
            // SAFETY: the record pages hold `per_batch` records and are not yet published.
            unsafe { meta.add(k).write(m) };
        }
        let batch = Batch {
            base: b.base,
            bytes: b.bytes as u64,
            class: b.class as u32,
            nbuf,
            meta: b.meta,
            meta_bytes: b.meta_bytes as u64,
            shard: shard as u32,
        };
        // SAFETY: callers hold `grow_lock` or `&mut self` (so `bi` is ours) and checked
        // `bi < batch_cap`; readers only look below `batch_count`.
        unsafe { self.batches.add(bi).write(batch) };
        self.batch_count.store(bi + 1, Release);
        {
            let sh = &cls.shards[shard];
            let mut l = sh.list.lock();
            for k in 0..nbuf {
                l.push(bi, k as usize);
            }
            sh.free.store(l.top, Relaxed);
        }
        cls.total.fetch_add(nbuf, Relaxed);
        self.c.stats.capacity_add(b.bytes as u64);
    }

    fn batch(&self, bi: usize) -> &Batch {
        // SAFETY: `bi < batch_count`: written and published before the count was released.
        unsafe { &*self.batches.add(bi) }
    }

    /// The record of buffer `k` of batch `b`.
    ///
    /// # Safety
    /// The caller holds the lock of the batch's shard.
    #[allow(clippy::mut_from_ref)]
    unsafe fn meta(&self, b: &Batch, k: usize) -> &mut BufMeta {
        debug_assert!(k < b.nbuf as usize);
        // SAFETY: `k < nbuf` records were initialised at publication; the shard lock makes
        // this the only reference.
        unsafe { &mut *(b.meta as usize as *mut BufMeta).add(k) }
    }

    /// The batch and buffer index of a bounce address.
    fn locate(&self, addr: u64) -> Option<(&Batch, usize)> {
        (0..self.batch_count.load(Acquire))
            .map(|i| self.batch(i))
            .find_map(|b| {
                (addr >= b.base && addr - b.base < b.bytes).then(|| {
                    (
                        b,
                        ((addr - b.base) / self.classes[b.class as usize].size as u64) as usize,
                    )
                })
            })
    }

    /// Free buffers per class now.
    pub fn free_buffers(&self) -> [u32; NCLASS] {
        core::array::from_fn(|i| self.classes[i].free(self.nshards))
    }

    /// Watermarks per class.
    pub fn watermarks(&self) -> [u32; NCLASS] {
        core::array::from_fn(|i| self.classes[i].wm)
    }
}

impl Drop for Refill<'_> {
    fn drop(&mut self) {
        self.coherent.destroy(&self.c);
        let n = self.batch_count.load(Acquire);
        let mut i = 0;
        while i < n {
            let end = (i + CONVERT_CHUNK).min(n);
            let mut ranges = [Range::default(); CONVERT_CHUNK];
            for (r, bi) in ranges.iter_mut().zip(i..end) {
                let b = self.batch(bi);
                *r = Range::new(b.base, b.bytes);
            }
            let ok = self
                .c
                .conv
                .convert(&self.c.stats, &ranges[..end - i], false)
                .is_ok();
            for bi in i..end {
                let b = *self.batch(bi);
                if ok {
                    self.c.plat.free_pages(b.base, b.bytes as usize);
                } else {
                    self.c.stats.leaked(b.bytes);
                }
                PrivatePages {
                    addr: b.meta,
                    bytes: b.meta_bytes as usize,
                }
                .free(self.c.plat);
            }
            i = end;
        }
        for sh in self.classes.iter().flat_map(|c| c.shards.iter()) {
            if sh.stack_mem.1 != 0 {
                PrivatePages {
                    addr: sh.stack_mem.0,
                    bytes: sh.stack_mem.1,
                }
                .free(self.c.plat);
            }
        }
        if self.table_mem.1 != 0 {
            PrivatePages {
                addr: self.table_mem.0,
                bytes: self.table_mem.1,
            }
            .free(self.c.plat);
        }
    }
}

impl Policy for Refill<'_> {
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
        let req = match self.c.request(orig, len, dir, &opts, 0) {
            Ok(r) => r,
            Err(e) => {
                self.c.stats.map_failed();
                return Err(e);
            }
        };
        let offset = (orig as usize) & req.min_align_mask;
        let total = offset + len;
        let align = (req.min_align_mask | req.alloc_align_mask) + 1;
        if total > MAX_CLASS {
            self.c.stats.map_failed();
            return Err(MapError::TooLarge);
        }
        let n = self.nshards;
        let home = self.c.plat.cpu() as usize % n;
        for cls in &self.classes {
            if cls.size < total || cls.size < align {
                continue;
            }
            // This vCPU's shard first, then the others.
            let taken = (0..n).find_map(|i| {
                let sh = &cls.shards[(home + i) % n];
                if sh.free.load(Relaxed) == 0 {
                    return None;
                }
                let mut l = sh.list.lock();
                if l.top == 0 {
                    return None;
                }
                l.top -= 1;
                sh.free.store(l.top, Relaxed);
                // SAFETY: `top` was below the stack's initialised entries.
                let e = unsafe { l.stack.add(l.top as usize).read() };
                let b = self.batch((e >> 32) as usize);
                let k = (e & 0xffff_ffff) as usize;
                // SAFETY: we hold the lock of the batch's shard (its buffers are only here).
                let m = unsafe { self.meta(b, k) };
                *m = BufMeta {
                    orig,
                    len: len as u32,
                    offset: offset as u32,
                    state: LIVE,
                    dir: dir.bits(),
                };
                Some(b.base + (k * cls.size + offset) as u64)
            });
            // Below half the watermark (this shard's share of it: no walk over the others).
            if (cls.shards[home].free.load(Relaxed) as u64) * 2 * (n as u64) < cls.wm as u64 {
                cls.refilling.store(true, Relaxed);
            }
            if let Some(bounce) = taken {
                // SAFETY: the buffer is ours; `orig` per the map contract.
                unsafe { self.c.fill(bounce, orig, len, dir) };
                self.c.stats.map_ok(cls.size as u64);
                return Ok(bounce);
            }
        }
        self.c.stats.map_failed();
        Err(MapError::NoSpace)
    }

    fn unmap(&self, bounce: u64, len: usize, dir: Direction) -> Result<(), MapError> {
        let Some((b, k)) = self.locate(bounce) else {
            return Err(self.c.bad_call(MapError::NotMapped));
        };
        let cls = &self.classes[b.class as usize];
        let sh = &cls.shards[b.shard as usize];
        let (orig, blen) = {
            let _l = sh.list.lock();
            // SAFETY: we hold the batch's shard lock.
            let m = unsafe { self.meta(b, k) };
            if m.state != LIVE || b.base + (k * cls.size) as u64 + m.offset as u64 != bounce {
                return Err(self.c.bad_call(MapError::NotMapped));
            }
            if m.len as usize != len {
                return Err(self.c.bad_call(MapError::Mismatch));
            }
            m.state = RELEASING;
            (m.orig, m.len as usize)
        };
        if dir.from_device() {
            // SAFETY: the original is writable until this unmap (the map contract); the
            // buffer is the live one we validated.
            unsafe { copy(orig, bounce, blen) };
        }
        {
            let mut l = sh.list.lock();
            // SAFETY: we hold the batch's shard lock.
            unsafe { self.meta(b, k) }.state = FREE;
            let bi = (b as *const Batch as usize - self.batches as usize)
                / core::mem::size_of::<Batch>();
            l.push(bi, k);
            sh.free.store(l.top, Relaxed);
        }
        self.c.stats.unmapped(cls.size as u64);
        Ok(())
    }

    fn sync_for_device(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.sync(bounce, len, true).map_err(|e| self.c.bad_call(e))
    }

    fn sync_for_cpu(&self, bounce: u64, len: usize) -> Result<(), MapError> {
        self.sync(bounce, len, false)
            .map_err(|e| self.c.bad_call(e))
    }

    fn alloc_coherent(&self, len: usize) -> Result<u64, MapError> {
        self.coherent.alloc(&self.c, len, PAGE)
    }

    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), MapError> {
        self.coherent
            .free(&self.c, addr, len)
            .map_err(|e| self.c.bad_call(e))
    }

    fn background_work(&self) -> bool {
        let Some(_g) = self.grow_lock.try_lock() else {
            return false;
        };
        // The class furthest below its watermark, among those refilling.
        let mut best: Option<(usize, u64)> = None;
        for (ci, cls) in self.classes.iter().enumerate() {
            let free = cls.free(self.nshards);
            if free.saturating_mul(2) < cls.wm {
                cls.refilling.store(true, Relaxed);
            }
            if !cls.refilling.load(Relaxed) {
                continue;
            }
            if free >= cls.wm
                || cls.total.load(Relaxed) + cls.per_batch > cls.cap
                || self.batch_count.load(Relaxed) >= self.batch_cap
                || self.c.stats.capacity() + cls.batch_bytes as u64 > self.max_bytes
            {
                cls.refilling.store(false, Relaxed);
                continue;
            }
            let fill = free as u64 * 1000 / cls.wm.max(1) as u64;
            if best.is_none_or(|(_, f)| fill < f) {
                best = Some((ci, fill));
            }
        }
        let Some((ci, _)) = best else {
            return false;
        };
        match self.alloc_batch(ci) {
            Some(p) => {
                let _ = self.convert_publish(&[p], true);
            }
            None => self.c.stats.grow_failed(),
        }
        let cls = &self.classes[ci];
        if cls.free(self.nshards) >= cls.wm {
            cls.refilling.store(false, Relaxed);
        }
        true
    }

    fn report(&self) -> PoolReport {
        self.c.stats.report(self.c.name, 0)
    }

    fn extra_stats(&self) -> ExtraStats {
        self.c.stats.extra()
    }

    fn max_mapping_size(&self) -> usize {
        MAX_CLASS
    }
}

impl Refill<'_> {
    fn sync(&self, addr: u64, len: usize, for_device: bool) -> Result<(), MapError> {
        let (b, k) = self.locate(addr).ok_or(MapError::NotMapped)?;
        let cls = &self.classes[b.class as usize];
        let (bounce, orig, mlen, dir) = {
            let _l = cls.shards[b.shard as usize].list.lock();
            // SAFETY: we hold the batch's shard lock.
            let m = unsafe { self.meta(b, k) };
            if m.state != LIVE {
                return Err(MapError::NotMapped);
            }
            (
                b.base + (k * cls.size) as u64 + m.offset as u64,
                m.orig,
                m.len as u64,
                Direction::from_bits(m.dir),
            )
        };
        let end = addr.checked_add(len as u64).ok_or(MapError::Mismatch)?;
        if addr < bounce || end > bounce + mlen {
            return Err(MapError::Mismatch);
        }
        let o = orig + (addr - bounce);
        // SAFETY: inside a live, validated bounce buffer and its original (the map contract).
        unsafe { sync_copy(addr, o, len, dir, for_device) };
        Ok(())
    }
}
