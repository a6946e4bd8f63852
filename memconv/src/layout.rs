//! The guest's view of RAM: the `view` VA reservation the KVM memslots point at, and the
//! memslot layout (computed from the attribute bitmap, applied to KVM as a minimal diff).
//!
//! # The view
//!
//! `view` is one `size`-byte VA range (2 MiB aligned), first reserved `PROT_NONE`, then covered
//! by `MAP_FIXED | MAP_SHARED` pieces of the private or shared store file at the same offset
//! (offset = GPA). A replacement `mmap(MAP_FIXED)` is seen by the guest on its next access, so
//! re-backing a range needs no vCPU pause.
//!
//! # Memslots
//!
//! When both stores can be mapped 4 KiB at a time (memfd, gmem), even a mixed chunk is mapped
//! 4K-by-4K into the view and each run of mapped chunks is one memslot into the view.
//!
//! Chunks that are private with nothing accepted ("holes", see `acceptance`) get no memslot
//! on any host: a guest access there is an MMIO exit carrying its GPA, which the VMM reports
//! as an access to unaccepted memory. They change when the guest accepts or rescinds, and
//! when a chunk goes wholly shared or comes back wholly private.
//!
//! When either store is hugetlb, a mixed 2 MiB chunk cannot be built inside the view
//! (`MAP_FIXED` of 4 KiB inside a hugetlb mapping fails with EINVAL). Such a chunk is served by
//! separate memslots, one per run of same-attribute pages, each pointing into that store's own
//! whole mapping at the run's offset (a slot may point into a hugetlb mapping at any 4 KiB
//! offset). The layout is: each maximal run of non-mixed chunks is one slot into `view`, plus
//! the per-run slots of mixed chunks. On a change the new layout is computed and only the
//! difference is applied (delete, then create: KVM rejects overlapping slots); slot ids come
//! from a free list.
//!
//! All vCPUs are paused around any memslot change (`HostVm::pause_vcpus`): between deleting a
//! slot and creating its replacement, a running vCPU touching that GPA would take an MMIO exit
//! for what is RAM (code, stack, a DMA buffer). The alternative — letting such exits through and
//! emulating the access from the canonical state — needs an instruction decoder for arbitrary
//! guest accesses (including instruction fetch and page-table walks by the hardware) and would
//! still race with the slot edit; a pause costs about as much as the slot edits themselves
//! (~100 us) and only happens when a chunk enters or leaves the mixed state on a hugetlb host,
//! which 2 MiB-granular guests never do.

use std::io;

use serde::Serialize;

use crate::abi::{HUGE_PAGE_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};
use crate::bitmap::{Attributes, PageBits, Side};
use crate::host_vm::HostVm;
use crate::store::Store;

/// Most memslots memconv uses (ids `0..MAX_MEMSLOTS`); KVM allows up to 32764 and the VMM may
/// use ids from `MAX_MEMSLOTS` up for anything else.
pub const MAX_MEMSLOTS: u32 = 32_000;

/// Errors from the view or the memslots.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Reserving or mapping the view failed.
    #[error("mapping the guest view failed: {0}")]
    Map(#[from] io::Error),
    /// A layout needs more memslots than allowed.
    #[error("the memslot layout needs {needed} slots, more than the limit {limit}")]
    TooManySlots {
        /// Slots needed.
        needed: usize,
        /// The limit.
        limit: u32,
    },
    /// KVM refused a memslot edit; `restored` tells whether the previous layout is back.
    #[error("KVM memslot edit failed (previous layout restored: {restored}): {source}")]
    Memslot {
        /// The error from KVM.
        source: io::Error,
        /// The previous layout was fully restored.
        restored: bool,
    },
}

/// The guest-view VA range.
pub struct View {
    base: *mut u8,
    size: u64,
}

// SAFETY: the view is process-wide memory owned by this struct; it is only accessed through
// raw pointers by the guest (via KVM) and by volatile copies.
unsafe impl Send for View {}
// SAFETY: see `Send`.
unsafe impl Sync for View {}

impl View {
    /// Reserve `size` bytes (2 MiB aligned) `PROT_NONE`.
    pub fn reserve(size: u64) -> io::Result<View> {
        let total = size
            .checked_add(HUGE_PAGE_SIZE)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: a fresh anonymous reservation at a kernel-chosen address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                total as usize,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let start = p as u64;
        let aligned = start.div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE;
        let head = aligned - start;
        let tail = total - head - size;
        // SAFETY: trimming the unaligned head and the tail of the reservation we just made.
        unsafe {
            if head > 0 {
                libc::munmap(p, head as usize);
            }
            if tail > 0 {
                libc::munmap((aligned + size) as *mut libc::c_void, tail as usize);
            }
        }
        Ok(View {
            base: aligned as *mut u8,
            size,
        })
    }

    /// Host address of GPA 0 in the view.
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Map `[off, off+len)` of the view from `store` at the same offset (MAP_FIXED).
    pub fn map(&self, off: u64, len: u64, store: &Store) -> io::Result<()> {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        let mut flags = libc::MAP_SHARED | libc::MAP_FIXED;
        if store.kind().is_huge() {
            flags |= libc::MAP_NORESERVE;
        }
        // SAFETY: the target range lies inside our own view reservation (checked above), which
        // no Rust reference points into; MAP_FIXED replaces only that range.
        let p = unsafe {
            libc::mmap(
                self.base.add(off as usize).cast(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                store.fd(),
                off as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: the whole view is ours; memslots into it are deleted before (service drop).
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
    }
}

/// One KVM memslot: `[gpa, gpa+size)` -> `host_addr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SlotDesc {
    /// First GPA.
    pub gpa: u64,
    /// Bytes.
    pub size: u64,
    /// Host userspace address of `gpa`.
    pub host_addr: u64,
}

/// Host addresses the layout points into.
#[derive(Clone, Copy, Debug)]
pub struct Bases {
    /// The view.
    pub view: u64,
    /// The private store mapping.
    pub private: u64,
    /// The shared store mapping.
    pub shared: u64,
}

/// Compute the memslot layout for `attrs` into `out` (sorted by GPA). `split` is true when a
/// mixed chunk must be served by per-run slots (either store is hugetlb); otherwise each run
/// of mapped chunks is one slot into the view. Chunks set in `holes` (private, nothing
/// accepted) get no slot: a guest access there exits to the VMM with its GPA.
pub fn compute_layout(
    attrs: &Attributes,
    holes: &PageBits,
    bases: Bases,
    split: bool,
    out: &mut Vec<SlotDesc>,
) {
    out.clear();
    let nchunks = attrs.nchunks();
    let mut c = 0;
    while c < nchunks {
        if holes.get(c) {
            c += 1;
        } else if split && attrs.is_mixed(c) {
            let p0 = c * PAGES_PER_CHUNK;
            let p1 = p0 + PAGES_PER_CHUNK;
            let mut p = p0;
            while p < p1 {
                let private = attrs.is_private(p);
                let e = attrs.bits().find(p, p1, !private);
                let gpa = p * PAGE_SIZE;
                let base = match Side::from_private(private) {
                    Side::Private => bases.private,
                    Side::Shared => bases.shared,
                };
                out.push(SlotDesc {
                    gpa,
                    size: (e - p) * PAGE_SIZE,
                    host_addr: base + gpa,
                });
                p = e;
            }
            c += 1;
        } else {
            let start = c;
            while c < nchunks && !holes.get(c) && !(split && attrs.is_mixed(c)) {
                c += 1;
            }
            let gpa = start * HUGE_PAGE_SIZE;
            out.push(SlotDesc {
                gpa,
                size: (c - start) * HUGE_PAGE_SIZE,
                host_addr: bases.view + gpa,
            });
        }
    }
}

/// The memslots memconv has installed, and their ids.
#[derive(Debug, Default)]
pub struct SlotTable {
    slots: Vec<(SlotDesc, u32)>,
    free: Vec<u32>,
    next: u32,
    edits: u64,
    del: Vec<usize>,
    add: Vec<usize>,
}

impl SlotTable {
    /// Installed slots, sorted by GPA.
    pub fn slots(&self) -> &[(SlotDesc, u32)] {
        &self.slots
    }

    /// Total `set_memslot` calls made.
    pub fn edits(&self) -> u64 {
        self.edits
    }

    /// Does `new` differ from what is installed?
    pub fn differs(&self, new: &[SlotDesc]) -> bool {
        self.slots.len() != new.len() || self.slots.iter().zip(new).any(|((a, _), b)| a != b)
    }

    fn alloc_id(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop() {
            return Some(id);
        }
        if self.next < MAX_MEMSLOTS {
            self.next += 1;
            return Some(self.next - 1);
        }
        None
    }

    /// Make KVM's slots equal `new` (sorted, non-overlapping) by deleting the slots not in
    /// `new` and creating the missing ones. On failure, tries to restore the previous layout.
    pub fn apply(&mut self, new: &[SlotDesc], host: &dyn HostVm) -> Result<(), LayoutError> {
        if new.len() > MAX_MEMSLOTS as usize {
            return Err(LayoutError::TooManySlots {
                needed: new.len(),
                limit: MAX_MEMSLOTS,
            });
        }
        // Merge walk: both sorted by gpa.
        let mut del = std::mem::take(&mut self.del);
        let mut add = std::mem::take(&mut self.add);
        del.clear();
        add.clear();
        let (mut i, mut j) = (0, 0);
        while i < self.slots.len() || j < new.len() {
            match (self.slots.get(i), new.get(j)) {
                (Some((o, _)), Some(n)) if o == n => {
                    i += 1;
                    j += 1;
                }
                (Some((o, _)), Some(n)) if o.gpa <= n.gpa => {
                    del.push(i);
                    i += 1;
                }
                (Some(_), Some(_)) | (None, Some(_)) => {
                    add.push(j);
                    j += 1;
                }
                (Some(_), None) => {
                    del.push(i);
                    i += 1;
                }
                (None, None) => break,
            }
        }
        let result = self.apply_diff(&del, &add, new, host);
        self.del = del;
        self.add = add;
        result
    }

    fn apply_diff(
        &mut self,
        del: &[usize],
        add: &[usize],
        new: &[SlotDesc],
        host: &dyn HostVm,
    ) -> Result<(), LayoutError> {
        if del.is_empty() && add.is_empty() {
            return Ok(());
        }
        let old = self.slots.clone();
        let mut deleted: Vec<(SlotDesc, u32)> = Vec::with_capacity(del.len());
        let mut failure: Option<io::Error> = None;
        for &k in del {
            let (d, id) = old[k];
            self.edits += 1;
            match host.set_memslot(id, d.gpa, 0, d.host_addr) {
                Ok(()) => deleted.push((d, id)),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        let mut created: Vec<(SlotDesc, u32)> = Vec::with_capacity(add.len());
        if failure.is_none() {
            for &k in add {
                let d = new[k];
                let Some(id) = self.alloc_id() else {
                    failure = Some(io::Error::from_raw_os_error(libc::ENOSPC));
                    break;
                };
                self.edits += 1;
                match host.set_memslot(id, d.gpa, d.size, d.host_addr) {
                    Ok(()) => created.push((d, id)),
                    Err(e) => {
                        self.free.push(id);
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        match failure {
            None => {
                for (_, id) in &deleted {
                    self.free.push(*id);
                }
                let mut slots: Vec<(SlotDesc, u32)> = old
                    .iter()
                    .enumerate()
                    .filter(|(k, _)| del.binary_search(k).is_err())
                    .map(|(_, s)| *s)
                    .collect();
                slots.extend(created);
                slots.sort_by_key(|(d, _)| d.gpa);
                self.slots = slots;
                Ok(())
            }
            Some(source) => {
                // Undo: delete what we created, re-create what we deleted.
                let mut restored = true;
                for (d, id) in created.iter().rev() {
                    self.edits += 1;
                    if host.set_memslot(*id, d.gpa, 0, d.host_addr).is_ok() {
                        self.free.push(*id);
                    } else {
                        restored = false;
                    }
                }
                let mut lost: Vec<u32> = Vec::new();
                for (d, id) in deleted.iter() {
                    self.edits += 1;
                    if host.set_memslot(*id, d.gpa, d.size, d.host_addr).is_err() {
                        restored = false;
                        lost.push(*id);
                    }
                }
                if restored {
                    self.slots = old;
                } else {
                    // Record what KVM really has, as far as we know.
                    let mut slots: Vec<(SlotDesc, u32)> = old
                        .into_iter()
                        .filter(|(_, id)| !lost.contains(id))
                        .collect();
                    for id in &lost {
                        self.free.push(*id);
                    }
                    slots.sort_by_key(|(d, _)| d.gpa);
                    self.slots = slots;
                }
                Err(LayoutError::Memslot { source, restored })
            }
        }
    }

    /// Delete every slot (teardown); errors are ignored.
    pub fn clear(&mut self, host: &dyn HostVm) {
        for (d, id) in self.slots.drain(..) {
            let _ = host.set_memslot(id, d.gpa, 0, d.host_addr);
            self.free.push(id);
        }
    }
}
