//! ACCEPT and rescind under the platform's rules (`crate::acceptance`), the host side of
//! acceptance: backing a private hugetlb chunk at ACCEPT (lazy), releasing chunks that become
//! unaccepted, and keeping unaccepted chunks out of the memslots (applied with all vCPUs
//! paused). Also the engine's hooks into a conversion (the SNP rescind check, dropping
//! acceptance, the holes a conversion changes) and the unaccepted-access report.

use super::{Engine, Scratch};
use crate::abi::{
    ACCEPT_FLAG_RESCIND, HUGE_PAGE_SIZE, MAILBOX_AREA_END, PAGES_PER_CHUNK, PAGE_SIZE,
};
use crate::bitmap::Side;
use crate::layout::compute_layout;
use crate::stats::LifecycleInputs;
use crate::status::{ConversionError, Status};

/// Chunks `[c0, c1)` that pages `[p0, p1)` touch.
fn chunks_of(p0: u64, p1: u64) -> (u64, u64) {
    (p0 / PAGES_PER_CHUNK, p1.div_ceil(PAGES_PER_CHUNK))
}

impl Engine {
    /// ACCEPT entry: accept `[gpa, gpa + npages*4K)` (`attrs` 0) or rescind it
    /// (`ACCEPT_FLAG_RESCIND`).
    pub fn accept(&mut self, gpa: u64, npages: u64, attrs: u64) -> Status {
        let r = self.accept_inner(gpa, npages, attrs);
        if let Err(e) = r {
            if e == ConversionError::DoubleAccept {
                crate::guest_warn!(
                    "security violation: double {} of gpa {gpa:#x} npages {npages}",
                    match self.acc.platform() {
                        crate::ram::Platform::Tdx => "accept",
                        crate::ram::Platform::Snp => "validation",
                    }
                );
            }
            self.counters.reject(e);
        }
        r
    }

    fn accept_inner(&mut self, gpa: u64, npages: u64, attrs: u64) -> Status {
        if attrs & !(ACCEPT_FLAG_RESCIND as u64) != 0 {
            return Err(ConversionError::InvalidAttrs);
        }
        if npages == 0 {
            return Err(ConversionError::BadRequest);
        }
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(ConversionError::Unaligned);
        }
        let len = npages
            .checked_mul(PAGE_SIZE)
            .ok_or(ConversionError::OutOfRam)?;
        let end = self.check_range(gpa, len)?;
        let (p0, p1) = (gpa / PAGE_SIZE, end / PAGE_SIZE);
        if attrs & ACCEPT_FLAG_RESCIND as u64 != 0 {
            let n = self.acc.drop_range(p0, p1);
            self.counters.lifecycle.rescind_entries += 1;
            self.counters.lifecycle.rescinded_pages += n;
            return self.holes_changed_by(p0, p1);
        }
        self.acc.check_accept(&self.attrs, p0, p1)?;
        self.accept_pages(p0, p1)?;
        self.counters.accept_entries += 1;
        self.counters.lifecycle.accepted_pages += p1 - p0;
        self.counters.accepted_units = self.counters.lifecycle.accepted_pages / PAGES_PER_CHUNK;
        Ok(())
    }

    /// Back (lazy hugetlb) and accept the checked pages `[p0, p1)`, then map their chunks.
    /// Undone whole on failure.
    fn accept_pages(&mut self, p0: u64, p1: u64) -> Status {
        let (c0, c1) = chunks_of(p0, p1);
        let mut fresh = Vec::new();
        let p = Side::Private.index();
        if self.stores[p].kind().is_huge() {
            for c in c0..c1 {
                if self.ensured[p].get(c) {
                    continue;
                }
                let off = c * HUGE_PAGE_SIZE;
                if let Err(e) = self.stores[p].allocate(off, HUGE_PAGE_SIZE) {
                    tracing::debug!("backing chunk {c} at ACCEPT failed: {e}");
                    self.unback(&fresh);
                    return Err(ConversionError::NoMemory);
                }
                self.ensured[p].set(c, true);
                let _ = self.stores[p].populate_read(off, HUGE_PAGE_SIZE);
                fresh.push(c);
            }
        }
        self.acc.accept(p0, p1);
        if let Err(e) = self.holes_changed_by(p0, p1) {
            self.acc.drop_range(p0, p1);
            let mut undo = Vec::new();
            self.acc.update_holes(&self.attrs, c0, c1, &mut undo);
            self.unback(&fresh);
            return Err(e);
        }
        self.counters.lifecycle.backed_chunks += fresh.len() as u64;
        Ok(())
    }

    /// Punch the private hugetlb chunks `chunks` again (undo of a backing).
    fn unback(&mut self, chunks: &[u64]) {
        let p = Side::Private.index();
        for &c in chunks {
            if self.stores[p]
                .punch(c * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE)
                .is_ok()
            {
                self.ensured[p].set(c, false);
            }
        }
    }

    /// Recompute the holes of the chunks `[p0, p1)` touches; when some changed, release the
    /// new holes' backing (lazy) and apply the new memslot layout with all vCPUs paused. On a
    /// memslot failure the holes are restored and `Internal` returned.
    fn holes_changed_by(&mut self, p0: u64, p1: u64) -> Status {
        let (c0, c1) = chunks_of(p0, p1);
        let mut changed = Vec::new();
        self.acc.update_holes(&self.attrs, c0, c1, &mut changed);
        if changed.is_empty() {
            return Ok(());
        }
        let mut layout = Vec::new();
        compute_layout(
            &self.attrs,
            self.acc.holes(),
            self.bases(),
            self.split,
            &mut layout,
        );
        if layout.len() > self.slot_limit {
            self.acc.flip_holes(&changed);
            return Err(ConversionError::NoMemory);
        }
        let host = self.host.clone();
        host.pause_vcpus();
        self.counters.vcpu_pauses += 1;
        let r = self.slots.apply(&layout, host.as_ref());
        host.resume_vcpus();
        if let Err(e) = r {
            tracing::warn!("memslot update for acceptance failed: {e}");
            self.acc.flip_holes(&changed);
            return Err(ConversionError::Internal);
        }
        self.release_holes(&changed);
        Ok(())
    }

    /// Lazy: release the private backing of the chunks in `chunks` that are now holes
    /// (private, nothing accepted: their contents are undefined until accepted, when they
    /// read zero).
    fn release_holes(&mut self, chunks: &[u64]) {
        if !self.lazy {
            return;
        }
        let p = Side::Private.index();
        for &c in chunks {
            if !self.acc.holes().get(c) {
                continue;
            }
            let huge = self.stores[p].kind().is_huge();
            if huge && !self.ensured[p].get(c) {
                continue;
            }
            match self.stores[p].punch(c * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE) {
                Ok(()) => {
                    if huge {
                        self.ensured[p].set(c, false);
                        self.counters.lifecycle.released_chunks += 1;
                    }
                }
                Err(e) => {
                    tracing::warn!("releasing unaccepted chunk {c} failed: {e}");
                    self.counters.punch_failures += 1;
                }
            }
        }
    }

    /// Accept the boot image `[MAILBOX_AREA_END, end)` (rounded up to 2 MiB) for the guest,
    /// as the platform's initial measured memory: backed and mapped before the first
    /// instruction. Not counted as a guest ACCEPT.
    pub fn accept_boot(&mut self, end: u64) -> Status {
        let end = end.next_multiple_of(HUGE_PAGE_SIZE).min(self.size);
        if end <= MAILBOX_AREA_END {
            return Ok(());
        }
        let (p0, p1) = (MAILBOX_AREA_END / PAGE_SIZE, end / PAGE_SIZE);
        let already = self.acc.accepted().count_range(p0, p1);
        if already == p1 - p0 {
            return Ok(());
        }
        self.acc.check_accept(&self.attrs, p0, p1)?;
        self.accept_pages(p0, p1)
    }

    /// Step 1 hook of a conversion: SNP refuses to share a page still validated.
    pub(super) fn check_lifecycle(
        &self,
        v: (u64, u64, Side),
    ) -> Result<(u64, u64, Side), ConversionError> {
        if v.2 == Side::Shared {
            self.acc.check_share(v.0, v.1)?;
        }
        Ok(v)
    }

    /// Step 2 hook of a conversion: recompute the holes of the chunks it touches (recorded in
    /// `sc.holes_changed`, undone by `revert_bits`); true if any changed.
    pub(super) fn update_holes(&mut self, sc: &mut Scratch) -> bool {
        for i in 0..sc.deltas.len() {
            let c = sc.deltas[i].chunk;
            self.acc
                .update_holes(&self.attrs, c, c + 1, &mut sc.holes_changed);
        }
        !sc.holes_changed.is_empty()
    }

    /// Step 3 hook: a target chunk that stays unbacked (lazy, wholly private after the
    /// conversion and had no private page before, so nothing in it is accepted).
    pub(super) fn stays_unbacked(&self, private_after: u64, target: Side) -> bool {
        self.lazy && target == Side::Private && private_after == PAGES_PER_CHUNK
    }

    /// After a successful conversion of `[p0, p1)`: to shared drops acceptance (TDX; on SNP
    /// nothing there is accepted any more); chunks that became holes are released (lazy).
    pub(super) fn after_conversion(&mut self, sc: &Scratch, p0: u64, p1: u64, target: Side) {
        if target == Side::Shared {
            self.counters.lifecycle.dropped_pages += self.acc.drop_range(p0, p1);
        }
        self.release_holes(&sc.holes_changed);
    }

    /// The guest touched `gpa`, inside RAM but in a chunk cut out as unaccepted: count it (the
    /// VMM stops the VM). Returns false if `gpa` is not in such a chunk (an MMIO access).
    pub fn unaccepted_access(&mut self, gpa: u64) -> bool {
        if gpa >= self.size || !self.acc.holes().get(gpa / HUGE_PAGE_SIZE) {
            return false;
        }
        let l = &mut self.counters.lifecycle;
        l.unaccepted_accesses += 1;
        l.unaccepted_access_gpa.get_or_insert(gpa);
        crate::guest_warn!("security violation: guest access to unaccepted memory at gpa {gpa:#x}");
        true
    }

    /// The acceptance figures for a snapshot.
    pub fn lifecycle_inputs(&self) -> LifecycleInputs {
        let private = self.store(Side::Private);
        let holes = self.acc.holes();
        let bound = if !self.lazy {
            self.size
        } else if private.kind().is_huge() {
            (0..self.attrs.nchunks())
                .filter(|&c| !holes.get(c) && self.attrs.private_in_chunk(c) > 0)
                .count() as u64
                * HUGE_PAGE_SIZE
        } else {
            (0..self.attrs.nchunks())
                .filter(|&c| !holes.get(c))
                .map(|c| self.attrs.private_in_chunk(c))
                .sum::<u64>()
                * PAGE_SIZE
        };
        LifecycleInputs {
            private_backing_bound_bytes: bound,
            platform: self.acc.platform(),
            prealloc: !self.lazy,
            accepted_bytes: self.acc.accepted_pages() * PAGE_SIZE,
            unaccepted_chunks: self.acc.holes().count_ones(),
        }
    }
}
