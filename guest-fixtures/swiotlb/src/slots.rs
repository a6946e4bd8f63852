//! The slot allocator behind the legacy, throttle, dynamic and aligned-2m policies: one
//! contiguous region of bounce memory cut into 2 KiB slots ([`SLOT_SIZE`]), grouped in
//! 128-slot segments (a mapping never crosses a segment, so it is at most 256 KiB) and in
//! areas, each with its own lock, so vCPUs starting in different areas do not contend.
//!
//! Every slot records how many free slots follow it up to the end of its segment (0 when the
//! slot is in use): a run of `n` free slots starts at any slot whose count is at least `n`, and
//! the search skips whole free runs and whole mappings at a time. A mapping's first slot (its
//! head) records the original address, the length, the offset of the bounce address within
//! the slots (the min-align offset) and the caller's flags; its other slots point back to it.
//!
//! All metadata (area locks and slot records) lives in private pages from the platform, never
//! in the bounce memory itself, which is shared with the host.

use crate::platform::{Platform, PrivatePages, PAGE};
use core::fmt;
use rtcore::sync::SpinLock;

/// log2 of the slot size.
pub const SLOT_SHIFT: u32 = 11;
/// Bytes per slot.
pub const SLOT_SIZE: usize = 1 << SLOT_SHIFT;
/// Slots per segment (the longest mapping).
pub const SEGMENT_SLOTS: usize = 128;
/// Bytes per segment: the largest mapping, and the unit pools are sized in.
pub const SEGMENT_BYTES: usize = SEGMENT_SLOTS * SLOT_SIZE;
/// Most areas per pool.
pub const MAX_AREAS: usize = 64;
/// Flag bit marking a coherent allocation (never a streaming mapping); the other flag bits
/// are the caller's.
pub const FLAG_COHERENT: u8 = 0x80;

/// Why the slot allocator refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotError {
    /// No run of free slots fits (the pool is full or too fragmented).
    NoSpace,
    /// The request needs more than one segment (offset + length > 256 KiB) or is empty.
    TooLarge,
    /// An alignment mask is not of the form 2^k - 1 or not below [`SEGMENT_BYTES`].
    BadMask,
    /// The address is not the bounce address of a live allocation of this pool.
    NotMapped,
    /// The length does not match the allocation, or a sync range leaves it.
    Mismatch,
    /// No private memory for the metadata.
    NoMemory,
    /// The region is not 256 KiB aligned and sized, or is empty or too large.
    BadRegion,
}

impl fmt::Display for SlotError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SlotError::NoSpace => "no free slots",
            SlotError::TooLarge => "mapping too large for a segment",
            SlotError::BadMask => "bad alignment mask",
            SlotError::NotMapped => "address is not a live mapping",
            SlotError::Mismatch => "length does not match the mapping",
            SlotError::NoMemory => "no memory for slot metadata",
            SlotError::BadRegion => "region not 256 KiB aligned and sized",
        })
    }
}

const FREE: u8 = 0;
const HEAD: u8 = 1;
const BODY: u8 = 2;
const RELEASING: u8 = 3;

/// One slot's record (24 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
struct Slot {
    /// Head: the original (driver) address of the mapping.
    orig: u64,
    /// Head: the mapped length in bytes.
    len: u32,
    /// Head: bounce address minus the head slot's address.
    offset: u32,
    /// Free slots from here to the end of the segment; 0 when in use.
    free_run: u8,
    /// In use: distance back to the head slot.
    back: u8,
    /// `FREE`, `HEAD`, `BODY` or `RELEASING` (a head being unmapped).
    state: u8,
    /// Head: the caller's flags.
    flags: u8,
    /// Head: number of slots of the allocation.
    nslots: u8,
}

/// Per-area state under the area lock.
struct AreaState {
    /// Where the next search starts (area-local slot index).
    hint: u32,
    /// Slots in use.
    used: u32,
}

/// An area: a run of whole segments with its own lock (one cache line).
#[repr(C, align(64))]
struct Area {
    /// First slot (pool index), a multiple of `SEGMENT_SLOTS`.
    start: u32,
    /// Number of slots, a multiple of `SEGMENT_SLOTS`.
    len: u32,
    lock: SpinLock<AreaState>,
}

/// What to allocate.
#[derive(Clone, Copy, Debug)]
pub struct Request {
    /// The original address; its bits under `min_align_mask` are kept in the bounce address.
    pub orig: u64,
    /// Bytes to map (1..).
    pub len: usize,
    /// Keep `orig & min_align_mask` as the low bits of the bounce address (2^k - 1, or 0).
    pub min_align_mask: usize,
    /// Align the start of the allocated slots to `alloc_align_mask + 1` (2^k - 1, or 0).
    pub alloc_align_mask: usize,
    /// Opaque to the allocator, returned with the allocation.
    pub flags: u8,
}

/// A live allocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Alloc {
    /// The bounce address handed to the driver.
    pub bounce: u64,
    /// The original address.
    pub orig: u64,
    /// The mapped length.
    pub len: usize,
    /// Pool index of the head slot.
    pub head: usize,
    /// Slots held.
    pub nslots: usize,
    /// The caller's flags.
    pub flags: u8,
}

impl Alloc {
    /// Pool bytes held.
    pub fn bytes(&self) -> u64 {
        (self.nslots * SLOT_SIZE) as u64
    }
}

/// A pool of slots over `[base, base + bytes)`.
pub struct SlotPool {
    base: u64,
    nslots: usize,
    nareas: usize,
    area_span: usize,
    areas: *const Area,
    slots: *mut Slot,
    meta_addr: u64,
    meta_bytes: usize,
}

// SAFETY: the metadata behind the raw pointers is private memory owned by the pool; the area
// headers are immutable but for their locks, and each area's slot records are only touched
// while holding that area's lock.
unsafe impl Sync for SlotPool {}
// SAFETY: as above; the pool owns its metadata and can move between vCPUs.
unsafe impl Send for SlotPool {}

/// Number of slots `offset + len` bytes occupy.
fn slots_for(bytes: usize) -> usize {
    bytes.div_ceil(SLOT_SIZE)
}

fn valid_mask(m: usize) -> bool {
    m < SEGMENT_BYTES && (m & (m + 1)) == 0
}

fn round_up(x: usize, stride: usize) -> usize {
    (x + stride - 1) & !(stride - 1)
}

impl SlotPool {
    /// Metadata bytes a pool of `bytes` with `nareas` areas needs.
    pub fn meta_bytes(bytes: usize, nareas: usize) -> usize {
        nareas * core::mem::size_of::<Area>() + (bytes / SLOT_SIZE) * core::mem::size_of::<Slot>()
    }

    /// Set up the allocator for `[base, base + bytes)` (256 KiB aligned and sized, at most
    /// 2^31 slots) with up to `areas` areas (rounded up to a power of two, reduced so that every
    /// area has at least one segment). The metadata comes from `plat`; the region itself is
    /// neither touched nor converted.
    pub fn create(
        plat: &dyn Platform,
        base: u64,
        bytes: usize,
        areas: usize,
    ) -> Result<Self, SlotError> {
        if bytes == 0
            || !bytes.is_multiple_of(SEGMENT_BYTES)
            || !base.is_multiple_of(SEGMENT_BYTES as u64)
            || bytes / SLOT_SIZE > u32::MAX as usize / 2
            || base.checked_add(bytes as u64).is_none()
        {
            return Err(SlotError::BadRegion);
        }
        let nslots = bytes / SLOT_SIZE;
        let nseg = nslots / SEGMENT_SLOTS;
        let mut nareas = areas.clamp(1, MAX_AREAS).next_power_of_two();
        while nareas > nseg {
            nareas /= 2;
        }
        let area_span = (nseg / nareas) * SEGMENT_SLOTS;
        let meta = PrivatePages::alloc(plat, Self::meta_bytes(bytes, nareas), PAGE)
            .ok_or(SlotError::NoMemory)?;
        let areas_ptr = meta.ptr::<Area>();
        // SAFETY: the areas come first in the metadata pages (page aligned, so 64-byte aligned)
        // and the slot records right after them (a multiple of 64 bytes in, so 8-byte aligned).
        let slots_ptr = unsafe { areas_ptr.add(nareas) } as *mut Slot;
        for k in 0..nareas {
            let start = k * area_span;
            let len = if k + 1 == nareas {
                nslots - start
            } else {
                area_span
            };
            let area = Area {
                start: start as u32,
                len: len as u32,
                lock: SpinLock::new(AreaState { hint: 0, used: 0 }),
            };
            // SAFETY: `k < nareas` and the pages hold `nareas` areas; nothing else refers to
            // them yet.
            unsafe { areas_ptr.add(k).write(area) };
        }
        for i in 0..nslots {
            let s = Slot {
                orig: 0,
                len: 0,
                offset: 0,
                free_run: (SEGMENT_SLOTS - i % SEGMENT_SLOTS) as u8,
                back: 0,
                state: FREE,
                flags: 0,
                nslots: 0,
            };
            // SAFETY: `i < nslots` and the pages hold `nslots` records after the areas.
            unsafe { slots_ptr.add(i).write(s) };
        }
        Ok(SlotPool {
            base,
            nslots,
            nareas,
            area_span,
            areas: areas_ptr,
            slots: slots_ptr,
            meta_addr: meta.addr,
            meta_bytes: meta.bytes,
        })
    }

    /// Free the metadata. The region itself is the caller's.
    pub fn destroy(self, plat: &dyn Platform) {
        PrivatePages {
            addr: self.meta_addr,
            bytes: self.meta_bytes,
        }
        .free(plat);
    }

    /// First byte of the region.
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Size of the region.
    pub fn bytes(&self) -> usize {
        self.nslots * SLOT_SIZE
    }

    /// Number of areas.
    pub fn areas(&self) -> usize {
        self.nareas
    }

    /// Whether `addr` lies in the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.bytes() as u64
    }

    fn area(&self, k: usize) -> &Area {
        debug_assert!(k < self.nareas);
        // SAFETY: `k < nareas`; the areas were initialised in `create` and live as long as the
        // pool.
        unsafe { &*self.areas.add(k) }
    }

    fn area_of(&self, slot: usize) -> usize {
        (slot / self.area_span).min(self.nareas - 1)
    }

    /// The slot records of area `a`.
    ///
    /// # Safety
    /// The caller holds `a`'s lock for as long as it uses the slice.
    #[allow(clippy::mut_from_ref)]
    unsafe fn records(&self, a: &Area) -> &mut [Slot] {
        // SAFETY: the area's records are `[start, start + len)` of the initialised array, and
        // the caller's lock makes this the only reference to them.
        unsafe { core::slice::from_raw_parts_mut(self.slots.add(a.start as usize), a.len as usize) }
    }

    /// Slots in use, all areas (locks each area in turn).
    pub fn used_slots(&self) -> usize {
        (0..self.nareas)
            .map(|k| self.area(k).lock.lock().used as usize)
            .sum()
    }

    /// Allocate for `req`, starting in area `cpu mod areas` and trying the others in turn.
    pub fn alloc(&self, cpu: usize, req: &Request) -> Result<Alloc, SlotError> {
        if !valid_mask(req.min_align_mask) || !valid_mask(req.alloc_align_mask) {
            return Err(SlotError::BadMask);
        }
        let offset = (req.orig as usize) & req.min_align_mask;
        let total = match offset.checked_add(req.len) {
            Some(t) if req.len > 0 && req.len <= u32::MAX as usize && t <= SEGMENT_BYTES => t,
            _ => return Err(SlotError::TooLarge),
        };
        let need = slots_for(total);
        let mut align = (req.min_align_mask | req.alloc_align_mask) + 1;
        if total >= PAGE {
            // Like the kernel: page-sized buffers start on a page.
            align = align.max(PAGE);
        }
        let stride = (align / SLOT_SIZE).max(1);
        let first = cpu & (self.nareas - 1);
        for t in 0..self.nareas {
            let a = self.area((first + t) & (self.nareas - 1));
            let mut st = a.lock.lock();
            if st.used as usize + need > a.len as usize {
                continue;
            }
            // SAFETY: `st` holds the area lock until the end of this iteration.
            let recs = unsafe { self.records(a) };
            let hint = st.hint as usize;
            let found = search(recs, hint, recs.len(), need, stride)
                .or_else(|| search(recs, 0, hint, need, stride));
            let Some(i) = found else { continue };
            take(recs, i, need);
            let head = &mut recs[i];
            head.state = HEAD;
            head.orig = req.orig;
            head.len = req.len as u32;
            head.offset = offset as u32;
            head.flags = req.flags;
            head.nslots = need as u8;
            st.used += need as u32;
            st.hint = ((i + need) % recs.len()) as u32;
            let slot = a.start as usize + i;
            return Ok(Alloc {
                bounce: self.base + (slot * SLOT_SIZE + offset) as u64,
                orig: req.orig,
                len: req.len,
                head: slot,
                nslots: need,
                flags: req.flags,
            });
        }
        Err(SlotError::NoSpace)
    }

    /// Find the live allocation (coherent or not, as asked) whose bounce range contains
    /// `[addr, addr + len)`; with `exact` the range must begin at its bounce address and have
    /// its length. With `release` the allocation is marked as being released (see
    /// [`SlotPool::finish_release`]).
    fn find(
        &self,
        addr: u64,
        len: usize,
        exact: bool,
        release: bool,
        coherent: bool,
    ) -> Result<Alloc, SlotError> {
        if !self.contains(addr) {
            return Err(SlotError::NotMapped);
        }
        let slot = ((addr - self.base) / SLOT_SIZE as u64) as usize;
        let a = self.area(self.area_of(slot));
        let _st = a.lock.lock();
        // SAFETY: `_st` holds the area lock for the rest of the function.
        let recs = unsafe { self.records(a) };
        let i = slot - a.start as usize;
        let s = recs[i];
        if s.state == FREE {
            return Err(SlotError::NotMapped);
        }
        let h = match i.checked_sub(s.back as usize) {
            Some(h) => h,
            None => return Err(SlotError::NotMapped),
        };
        let head = &mut recs[h];
        if head.state != HEAD || (head.flags & FLAG_COHERENT != 0) != coherent {
            return Err(SlotError::NotMapped);
        }
        let bounce = self.base + ((a.start as usize + h) * SLOT_SIZE) as u64 + head.offset as u64;
        let hlen = head.len as usize;
        if exact {
            if addr != bounce {
                return Err(SlotError::NotMapped);
            }
            if len != hlen {
                return Err(SlotError::Mismatch);
            }
        } else {
            let end = match addr.checked_add(len as u64) {
                Some(e) => e,
                None => return Err(SlotError::Mismatch),
            };
            if addr < bounce || end > bounce + hlen as u64 {
                return Err(SlotError::Mismatch);
            }
        }
        if release {
            head.state = RELEASING;
        }
        Ok(Alloc {
            bounce,
            orig: head.orig,
            len: hlen,
            head: a.start as usize + h,
            nslots: head.nslots as usize,
            flags: head.flags,
        })
    }

    /// The live allocation containing `[addr, addr + len)` (for syncs of part of a mapping).
    pub fn lookup(&self, addr: u64, len: usize) -> Result<Alloc, SlotError> {
        self.find(addr, len, false, false, false)
    }

    /// Start releasing the allocation whose bounce address is `bounce` and length `len`:
    /// validated and marked, so a second release of it fails; its slots stay taken until
    /// [`SlotPool::finish_release`] (the caller copies data back in between).
    pub fn begin_release(
        &self,
        bounce: u64,
        len: usize,
        coherent: bool,
    ) -> Result<Alloc, SlotError> {
        self.find(bounce, len, true, true, coherent)
    }

    /// Give back the slots of an allocation marked by [`SlotPool::begin_release`].
    pub fn finish_release(&self, al: &Alloc) {
        let a = self.area(self.area_of(al.head));
        let mut st = a.lock.lock();
        // SAFETY: `st` holds the area lock for the rest of the function.
        let recs = unsafe { self.records(a) };
        let h = al.head - a.start as usize;
        if recs[h].state != RELEASING || recs[h].nslots as usize != al.nslots {
            debug_assert!(false, "finish_release of an allocation not being released");
            return;
        }
        give(recs, h, al.nslots);
        st.used -= al.nslots as u32;
    }

    /// Validate and release in one step (coherent allocations: nothing to copy).
    pub fn release(&self, bounce: u64, len: usize, coherent: bool) -> Result<Alloc, SlotError> {
        let al = self.begin_release(bounce, len, coherent)?;
        self.finish_release(&al);
        Ok(al)
    }
}

/// First index in `[from, to)` that is a multiple of `stride` and starts `need` free slots.
fn search(recs: &[Slot], from: usize, to: usize, need: usize, stride: usize) -> Option<usize> {
    let mut i = round_up(from, stride);
    while i < to {
        let s = &recs[i];
        let run = s.free_run as usize;
        if run >= need {
            return Some(i);
        }
        let skip = if run > 0 {
            // Every slot of this free run has a shorter run: go to its end.
            run
        } else {
            // In use: go past the allocation that holds it.
            let h = i - s.back as usize;
            (h + (recs[h].nslots as usize).max(1))
                .saturating_sub(i)
                .max(1)
        };
        i = round_up(i + skip, stride);
    }
    None
}

/// Mark `[i, i + n)` used and shorten the free runs before it in the segment.
fn take(recs: &mut [Slot], i: usize, n: usize) {
    for (j, r) in recs[i..i + n].iter_mut().enumerate() {
        r.free_run = 0;
        r.back = j as u8;
        r.state = BODY;
    }
    let seg0 = i & !(SEGMENT_SLOTS - 1);
    let mut j = i;
    while j > seg0 {
        j -= 1;
        if recs[j].free_run == 0 {
            break;
        }
        recs[j].free_run = (i - j) as u8;
    }
}

/// Free `[h, h + n)` and lengthen the free runs before it in the segment.
fn give(recs: &mut [Slot], h: usize, n: usize) {
    let seg0 = h & !(SEGMENT_SLOTS - 1);
    let seg_end = seg0 + SEGMENT_SLOTS;
    let mut count = if h + n < seg_end {
        recs[h + n].free_run as usize
    } else {
        0
    };
    for j in (h..h + n).rev() {
        count += 1;
        let r = &mut recs[j];
        r.free_run = count as u8;
        r.state = FREE;
        r.back = 0;
        r.nslots = 0;
    }
    let mut j = h;
    while j > seg0 {
        j -= 1;
        if recs[j].free_run == 0 {
            break;
        }
        count += 1;
        recs[j].free_run = count as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::HostPlatform;
    use crate::platform::Platform;
    use std::vec::Vec;

    fn req(orig: u64, len: usize) -> Request {
        Request {
            orig,
            len,
            min_align_mask: 0,
            alloc_align_mask: 0,
            flags: 0,
        }
    }

    /// Free-run counts agree with a recount from scratch.
    fn check_runs(p: &SlotPool) {
        for k in 0..p.nareas {
            let a = p.area(k);
            let st = a.lock.lock();
            // SAFETY: the area lock is held.
            let recs = unsafe { p.records(a) };
            let mut used = 0;
            for i in 0..recs.len() {
                let seg_end = (i & !(SEGMENT_SLOTS - 1)) + SEGMENT_SLOTS;
                let mut n = 0;
                while i + n < seg_end && recs[i + n].state == FREE {
                    n += 1;
                }
                assert_eq!(recs[i].free_run as usize, n, "slot {i}");
                if recs[i].state != FREE {
                    used += 1;
                }
            }
            assert_eq!(used, st.used as usize);
        }
    }

    #[test]
    fn fill_and_drain() {
        let plat = HostPlatform::new(64 << 20);
        let base = plat.alloc_pages(1 << 20, 1 << 21).unwrap();
        let p = SlotPool::create(&plat, base, 1 << 20, 4).unwrap();
        assert_eq!(p.areas(), 4);
        let mut live = Vec::new();
        loop {
            match p.alloc(live.len(), &req(0x1000, 3000)) {
                Ok(a) => live.push(a),
                Err(e) => {
                    assert_eq!(e, SlotError::NoSpace);
                    break;
                }
            }
        }
        // 3000 bytes = 2 slots: 512 slots / 2.
        assert_eq!(live.len(), 256);
        check_runs(&p);
        for a in live.iter().step_by(2) {
            p.release(a.bounce, a.len, false).unwrap();
        }
        check_runs(&p);
        assert_eq!(
            p.release(live[0].bounce, live[0].len, false),
            Err(SlotError::NotMapped)
        );
        for a in live.iter().skip(1).step_by(2) {
            assert_eq!(
                p.release(a.bounce, a.len + 1, false),
                Err(SlotError::Mismatch)
            );
            p.release(a.bounce, a.len, false).unwrap();
        }
        check_runs(&p);
        assert_eq!(p.used_slots(), 0);
        p.destroy(&plat);
        plat.free_pages(base, 1 << 20);
    }

    #[test]
    fn masks_and_limits() {
        let plat = HostPlatform::new(64 << 20);
        let base = plat.alloc_pages(1 << 20, 1 << 21).unwrap();
        let p = SlotPool::create(&plat, base, 1 << 20, 1).unwrap();
        let mut r = req(0x1234_5e67, 100);
        r.min_align_mask = 0xfff;
        let a = p.alloc(0, &r).unwrap();
        assert_eq!(a.bounce & 0xfff, 0xe67);
        assert_eq!(a.nslots, 2);
        let mut r = req(0x1234_5e67, 10);
        r.alloc_align_mask = 0xffff;
        let b = p.alloc(0, &r).unwrap();
        assert_eq!(b.bounce % 0x10000, 0);
        assert_eq!(p.alloc(0, &req(0, SEGMENT_BYTES)).unwrap().nslots, 128);
        assert_eq!(
            p.alloc(0, &req(1, SEGMENT_BYTES + 1)),
            Err(SlotError::TooLarge)
        );
        assert_eq!(p.alloc(0, &req(1, 0)), Err(SlotError::TooLarge));
        let mut r = req(0x800, SEGMENT_BYTES);
        r.min_align_mask = 0xfff;
        assert_eq!(p.alloc(0, &r), Err(SlotError::TooLarge));
        r.min_align_mask = 0x1001;
        assert_eq!(p.alloc(0, &r), Err(SlotError::BadMask));
        // Syncs of part of a mapping.
        assert_eq!(p.lookup(a.bounce + 10, 50).unwrap().head, a.head);
        assert_eq!(p.lookup(a.bounce + 10, 100), Err(SlotError::Mismatch));
        assert_eq!(
            p.release(a.bounce + 1, 99, false),
            Err(SlotError::NotMapped)
        );
        assert_eq!(
            p.release(base + (2 << 20), 1, false),
            Err(SlotError::NotMapped)
        );
        check_runs(&p);
        p.destroy(&plat);
        plat.free_pages(base, 1 << 20);
    }

    #[test]
    fn areas_reduced_for_small_pools() {
        let plat = HostPlatform::new(64 << 20);
        let base = plat.alloc_pages(3 * SEGMENT_BYTES, 1 << 21).unwrap();
        let p = SlotPool::create(&plat, base, 3 * SEGMENT_BYTES, 64).unwrap();
        assert_eq!(p.areas(), 2);
        assert_eq!(p.area(1).len as usize, 2 * SEGMENT_SLOTS);
        assert!(SlotPool::create(&plat, base + 4096, SEGMENT_BYTES, 1).is_err());
        p.destroy(&plat);
        plat.free_pages(base, 3 * SEGMENT_BYTES);
    }
}
