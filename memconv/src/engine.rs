//! The conversion engine: validation, conversion of GPA ranges between the private and shared
//! stores, ACCEPT bookkeeping, and the guest-visible re-backing (view remaps, memslot layout,
//! punching the old side).
//!
//! A conversion of `[gpa, gpa + npages * 4K)` to side T (source side S = the other one):
//!
//! 1. Validate everything (attrs, alignment, size, RAM bounds, reserved areas, granularity)
//!    before changing anything. Pages already on T are a no-op (counted).
//! 2. Flip the runs of changing pages in the canonical bitmap (tentatively), and if a chunk
//!    enters or leaves the mixed state on a split (hugetlb) host, compute the new memslot
//!    layout; over the slot limit -> `ERR_NO_MEMORY`, bitmap reverted.
//! 3. Prepare T so the converted pages read zero: a 4 KiB store punches exactly those pages
//!    (they may hold stale data from an earlier conversion); a hugetlb chunk with no T page
//!    before is punched and then allocated whole (fallocate mode 0: ENOSPC/ENOMEM ->
//!    `ERR_NO_MEMORY`, everything undone, never a SIGBUS later); a hugetlb chunk that already
//!    holds T pages keeps its 2 MiB page, whose converted 4 KiB pieces still hold what T had
//!    there before they left T: those are zeroed through the store mapping before any slot
//!    exposes them.
//! 4. Re-back the guest view: 4 KiB hosts remap exactly the runs (one `mmap(MAP_FIXED)` per
//!    run); split hosts remap whole chunks that became uniform, then apply the memslot diff with
//!    all vCPUs paused (see `layout`).
//! 5. Release S: a 4 KiB store punches exactly the converted pages; hugetlb punches only the
//!    chunks with no S page left. A failed punch leaves the state consistent (counted).
//!
//! Failures in 3-4 roll back (view, memslots, fresh allocations, bitmap) and return
//! `ERR_NO_MEMORY` / `ERR_INTERNAL`; if a rollback step itself fails the bitmap is kept equal to
//! what is mapped and the failure is counted as unrecovered.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use crate::abi::{
    self, ATTR_ENCRYPTED, ATTR_KNOWN_MASK, ATTR_PAGE_SIZE_1G, ATTR_PAGE_SIZE_MASK, HUGE_PAGE_SIZE,
    MAILBOX_AREA_END, MMIO_BASE_GPA, MMIO_SIZE, PAGES_PER_CHUNK, PAGE_SIZE,
};
use crate::bitmap::{Attributes, PageBits, Side};
use crate::host_vm::HostVm;
use crate::layout::{compute_layout, Bases, LayoutError, SlotDesc, SlotTable, View, MAX_MEMSLOTS};
use crate::ram::Granularity;
use crate::stats::{Counters, SizeClass};
use crate::store::Store;

/// Errors of engine set-up (conversion errors are abi status codes).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Mapping the initial view failed.
    #[error("mapping the initial guest view failed: {0}")]
    View(io::Error),
    /// Installing the initial memslots failed.
    #[error("installing the initial memslots failed: {0}")]
    Slots(#[from] LayoutError),
}

#[derive(Clone, Copy, Debug)]
struct ChunkDelta {
    chunk: u64,
    before: u64,
    after: u64,
}

fn is_mixed(private: u64) -> bool {
    private != 0 && private != PAGES_PER_CHUNK
}

fn count_of(private: u64, side: Side) -> u64 {
    match side {
        Side::Private => private,
        Side::Shared => PAGES_PER_CHUNK - private,
    }
}

fn nomem_or_internal(e: &io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::ENOMEM) => abi::ERR_NO_MEMORY,
        _ => abi::ERR_INTERNAL,
    }
}

/// The conversion engine (kept behind the service's lock).
pub struct Engine {
    size: u64,
    granularity: Granularity,
    private: Store,
    shared: Store,
    view: View,
    attrs: Attributes,
    /// Per chunk: the view maps it from the private store (1) or the shared store (0).
    view_private: PageBits,
    /// Per chunk, per hugetlb store: the engine allocated its 2 MiB page (cleared on punch).
    ensured: [PageBits; 2],
    accepted: PageBits,
    slots: SlotTable,
    split: bool,
    slot_limit: usize,
    host: Arc<dyn HostVm>,
    /// Counters.
    pub counters: Counters,
    runs: Vec<(u64, u64)>,
    deltas: Vec<ChunkDelta>,
    layout: Vec<SlotDesc>,
    fresh: Vec<u64>,
    remapped: Vec<(u64, u64, Side)>,
}

fn side_idx(s: Side) -> usize {
    match s {
        Side::Private => 0,
        Side::Shared => 1,
    }
}

impl Engine {
    /// Build the engine over created stores and a reserved view: sets the initial attributes
    /// (all private but the mailbox chunk), maps the view and installs the initial memslots.
    /// Hugetlb stores must already be allocated for the chunks their side owns.
    pub fn new(
        size: u64,
        granularity: Granularity,
        private: Store,
        shared: Store,
        view: View,
        host: Arc<dyn HostVm>,
    ) -> Result<Engine, EngineError> {
        let npages = size / PAGE_SIZE;
        let nchunks = size / HUGE_PAGE_SIZE;
        let mut attrs = Attributes::new_private(npages);
        let mb0 = abi::MAILBOX_BASE_GPA / PAGE_SIZE;
        let mb1 = MAILBOX_AREA_END / PAGE_SIZE;
        attrs.flip_run(mb0, mb1, Side::Shared);
        let split = private.kind().is_huge() || shared.kind().is_huge();
        let mut view_private = PageBits::new(nchunks, true);
        view_private.set_range(mb0 / PAGES_PER_CHUNK, mb1 / PAGES_PER_CHUNK, false);
        // Map the view: [0, mailbox) private, mailbox chunk shared, rest private.
        view.map(0, abi::MAILBOX_BASE_GPA, &private)
            .and_then(|_| {
                view.map(
                    abi::MAILBOX_BASE_GPA,
                    MAILBOX_AREA_END - abi::MAILBOX_BASE_GPA,
                    &shared,
                )
            })
            .and_then(|_| view.map(MAILBOX_AREA_END, size - MAILBOX_AREA_END, &private))
            .map_err(EngineError::View)?;
        let mut ensured = [PageBits::new(nchunks, false), PageBits::new(nchunks, false)];
        if private.kind().is_huge() {
            ensured[0] = PageBits::new(nchunks, true);
            ensured[0].set(1, false);
        }
        if shared.kind().is_huge() {
            ensured[1].set(1, true);
        }
        let mut e = Engine {
            size,
            granularity,
            private,
            shared,
            view,
            attrs,
            view_private,
            ensured,
            accepted: PageBits::new(nchunks, false),
            slots: SlotTable::default(),
            split,
            slot_limit: MAX_MEMSLOTS as usize,
            host,
            counters: Counters::default(),
            runs: Vec::new(),
            deltas: Vec::new(),
            layout: Vec::new(),
            fresh: Vec::new(),
            remapped: Vec::new(),
        };
        let mut layout = Vec::new();
        compute_layout(&e.attrs, e.bases(), e.split, &mut layout);
        e.slots.apply(&layout, e.host.as_ref())?;
        e.layout = layout;
        Ok(e)
    }

    /// Lower the memslot limit below `MAX_MEMSLOTS` (tests, or a KVM with fewer slots).
    pub fn set_slot_limit(&mut self, n: usize) {
        self.slot_limit = n.min(MAX_MEMSLOTS as usize);
    }

    /// Host addresses of the view and the store mappings.
    pub fn bases(&self) -> Bases {
        Bases {
            view: self.view.base() as u64,
            private: self.private.base() as u64,
            shared: self.shared.base() as u64,
        }
    }

    /// RAM size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Granularity policy.
    pub fn granularity(&self) -> Granularity {
        self.granularity
    }

    /// Mixed chunks are served by per-run memslots (a hugetlb store is in use).
    pub fn split(&self) -> bool {
        self.split
    }

    /// The canonical attributes.
    pub fn attrs(&self) -> &Attributes {
        &self.attrs
    }

    /// Accepted 2 MiB units.
    pub fn accepted(&self) -> &PageBits {
        &self.accepted
    }

    /// Installed memslots.
    pub fn slots(&self) -> &SlotTable {
        &self.slots
    }

    /// The store of `side`.
    pub fn store(&self, side: Side) -> &Store {
        match side {
            Side::Private => &self.private,
            Side::Shared => &self.shared,
        }
    }

    /// The guest view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Per chunk: the view maps it from the private store.
    pub fn view_private(&self) -> &PageBits {
        &self.view_private
    }

    /// The memslot host currently in use.
    pub fn host(&self) -> &dyn HostVm {
        self.host.as_ref()
    }

    /// Delete all memslots (teardown).
    pub fn clear_slots(&mut self) {
        let host = self.host.clone();
        self.slots.clear(host.as_ref());
    }

    /// Check `[gpa, gpa+len)` (len > 0) against RAM bounds, the MMIO window and the
    /// non-convertible chunks.
    fn check_range(&self, gpa: u64, len: u64) -> Result<u64, u32> {
        let end = gpa.checked_add(len).ok_or(abi::ERR_OUT_OF_RAM)?;
        if gpa < MMIO_BASE_GPA + MMIO_SIZE && end > MMIO_BASE_GPA {
            return Err(abi::ERR_RESERVED);
        }
        if end > self.size {
            return Err(abi::ERR_OUT_OF_RAM);
        }
        if gpa < MAILBOX_AREA_END {
            return Err(abi::ERR_RESERVED);
        }
        Ok(end)
    }

    fn validate_convert(&self, gpa: u64, npages: u64, attrs: u64) -> Result<(u64, u64, Side), u32> {
        if attrs & !(ATTR_KNOWN_MASK as u64) != 0
            || (attrs & ATTR_PAGE_SIZE_MASK as u64) > ATTR_PAGE_SIZE_1G as u64
        {
            return Err(abi::ERR_INVALID_ATTRS);
        }
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(abi::ERR_UNALIGNED);
        }
        if npages == 0 {
            return Err(abi::ERR_BAD_REQUEST);
        }
        let len = npages.checked_mul(PAGE_SIZE).ok_or(abi::ERR_OUT_OF_RAM)?;
        let end = self.check_range(gpa, len)?;
        if self.granularity == Granularity::Huge2M
            && (!gpa.is_multiple_of(HUGE_PAGE_SIZE) || !len.is_multiple_of(HUGE_PAGE_SIZE))
        {
            return Err(abi::ERR_REQUIRES_2M);
        }
        let target = if attrs & ATTR_ENCRYPTED as u64 != 0 {
            Side::Private
        } else {
            Side::Shared
        };
        Ok((gpa / PAGE_SIZE, end / PAGE_SIZE, target))
    }

    /// Convert `[gpa, gpa + npages*4K)` (KVM_HC_MAP_GPA_RANGE semantics). Returns an abi status.
    pub fn convert(&mut self, gpa: u64, npages: u64, attrs: u64) -> u32 {
        let t0 = Instant::now();
        let (p0, p1, target) = match self.validate_convert(gpa, npages, attrs) {
            Ok(v) => v,
            Err(code) => {
                self.counters.reject(code);
                return code;
            }
        };
        let status = self.convert_valid(p0, p1, target);
        if status == abi::STATUS_OK {
            let class = SizeClass::of(gpa, npages) as usize;
            match target {
                Side::Shared => self.counters.to_shared[class] += 1,
                Side::Private => self.counters.to_private[class] += 1,
            }
            self.counters.latency.record(t0.elapsed().as_nanos() as u64);
        } else {
            self.counters.reject(status);
        }
        status
    }

    fn revert_bits(&mut self, source: Side) {
        for &(a, b) in &self.runs {
            self.attrs.flip_run(a, b, source);
        }
    }

    fn undo_fresh(&mut self, target: Side) {
        let t = side_idx(target);
        for &c in &self.fresh {
            let store = match target {
                Side::Private => &self.private,
                Side::Shared => &self.shared,
            };
            if store.punch(c * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE).is_ok() {
                self.ensured[t].set(c, false);
            }
        }
        self.fresh.clear();
    }

    /// Undo view remaps recorded in `remapped` (each maps back from its old side). Returns
    /// false if some could not be undone (those stay recorded).
    fn undo_remaps(&mut self) -> bool {
        let mut ok = true;
        let mut keep = Vec::new();
        for &(off, len, old) in self.remapped.iter().rev() {
            let store = match old {
                Side::Private => &self.private,
                Side::Shared => &self.shared,
            };
            if self.view.map(off, len, store).is_err() {
                ok = false;
                keep.push((off, len, old));
            } else if self.split {
                self.view_private.set_range(
                    off / HUGE_PAGE_SIZE,
                    (off + len) / HUGE_PAGE_SIZE,
                    old == Side::Private,
                );
            }
        }
        self.remapped = keep;
        ok
    }

    fn convert_valid(&mut self, p0: u64, p1: u64, target: Side) -> u32 {
        let source = target.other();
        self.runs.clear();
        // Pages currently on the source side (bit == (source == private)).
        self.attrs
            .bits()
            .runs(p0, p1, source == Side::Private, &mut self.runs);
        let changed: u64 = self.runs.iter().map(|(a, b)| b - a).sum();
        self.counters.noop_pages += (p1 - p0) - changed;
        if changed == 0 {
            return abi::STATUS_OK;
        }
        // Chunk deltas (chunks touched by the runs, ascending).
        self.deltas.clear();
        for &(a, b) in &self.runs {
            let mut c = a / PAGES_PER_CHUNK;
            let last = (b - 1) / PAGES_PER_CHUNK;
            while c <= last {
                if self.deltas.last().is_none_or(|d| d.chunk != c) {
                    let before = self.attrs.private_in_chunk(c);
                    self.deltas.push(ChunkDelta {
                        chunk: c,
                        before,
                        after: before,
                    });
                }
                c += 1;
            }
        }
        // 2. Tentative bitmap flip and layout.
        for i in 0..self.runs.len() {
            let (a, b) = self.runs[i];
            self.attrs.flip_run(a, b, target);
        }
        let mut layout_change = false;
        for d in self.deltas.iter_mut() {
            d.after = self.attrs.private_in_chunk(d.chunk);
            layout_change |= self.split && (is_mixed(d.before) || is_mixed(d.after));
        }
        if layout_change {
            let mut layout = std::mem::take(&mut self.layout);
            compute_layout(&self.attrs, self.bases(), true, &mut layout);
            self.layout = layout;
            if self.layout.len() > self.slot_limit {
                self.revert_bits(source);
                return abi::ERR_NO_MEMORY;
            }
        }
        // 3. Prepare the target side.
        self.fresh.clear();
        if let Err(code) = self.prepare_target(target) {
            self.undo_fresh(target);
            self.revert_bits(source);
            return code;
        }
        // 4. Re-back the view.
        self.remapped.clear();
        if let Err(e) = self.remap_view(target) {
            let code = nomem_or_internal(&e);
            if self.undo_remaps() {
                self.undo_fresh(target);
                self.revert_bits(source);
                return code;
            }
            return self.unrecovered_after_remap(target);
        }
        if layout_change && self.slots.differs(&self.layout) {
            let host = self.host.clone();
            host.pause_vcpus();
            self.counters.vcpu_pauses += 1;
            let r = self.slots.apply(&self.layout, host.as_ref());
            host.resume_vcpus();
            if let Err(e) = r {
                tracing::warn!("memslot update failed: {e}");
                if matches!(e, LayoutError::Memslot { restored: true, .. }) && self.undo_remaps() {
                    self.undo_fresh(target);
                    self.revert_bits(source);
                    return abi::ERR_INTERNAL;
                }
                self.counters.unrecovered += 1;
                self.finish(target);
                return abi::ERR_INTERNAL;
            }
        }
        // 5. Release the old side, account.
        self.finish(target);
        abi::STATUS_OK
    }

    /// View remaps could not all be undone: keep the bitmap equal to what is mapped where we
    /// can tell (the runs stay converted), count it, report ERR_INTERNAL.
    fn unrecovered_after_remap(&mut self, target: Side) -> u32 {
        self.counters.unrecovered += 1;
        // The view pieces still recorded in `remapped` map the target; everything else was
        // restored. Revert the bits of runs fully restored; keep those still remapped.
        let source = target.other();
        let remapped = std::mem::take(&mut self.remapped);
        let runs = std::mem::take(&mut self.runs);
        for &(a, b) in &runs {
            let (ga, gb) = (a * PAGE_SIZE, b * PAGE_SIZE);
            let still = remapped
                .iter()
                .any(|&(off, len, _)| off < gb && off + len > ga);
            if !still {
                self.attrs.flip_run(a, b, source);
            }
        }
        self.runs = runs;
        self.fresh.clear();
        abi::ERR_INTERNAL
    }

    fn prepare_target(&mut self, target: Side) -> Result<(), u32> {
        let t = side_idx(target);
        let store = match target {
            Side::Private => &self.private,
            Side::Shared => &self.shared,
        };
        if !store.kind().is_huge() {
            for &(a, b) in &self.runs {
                if let Err(e) = store.punch(a * PAGE_SIZE, (b - a) * PAGE_SIZE) {
                    tracing::warn!("punching target {} pages failed: {e}", target.name());
                    return Err(abi::ERR_INTERNAL);
                }
            }
            return Ok(());
        }
        for d in &self.deltas {
            let c = d.chunk;
            let off = c * HUGE_PAGE_SIZE;
            let had = count_of(d.before, target) > 0;
            if !had {
                // Entirely new on this side: clear anything stale, then allocate whole.
                if store.punch(off, HUGE_PAGE_SIZE).is_ok() {
                    self.ensured[t].set(c, false);
                }
            }
            if !had || !self.ensured[t].get(c) {
                if let Err(e) = store.allocate(off, HUGE_PAGE_SIZE) {
                    return Err(nomem_or_internal(&e));
                }
                if !had {
                    // Undone on failure; a chunk that already held target pages never is.
                    self.fresh.push(c);
                }
                self.ensured[t].set(c, true);
                // Map it into the store mapping so mincore sees it (no allocation).
                let _ = store.populate_read(off, HUGE_PAGE_SIZE);
            }
        }
        // Chunks that already held target pages: zero the converted pieces' stale backing.
        for d in &self.deltas {
            if count_of(d.before, target) == 0 {
                continue;
            }
            let c0 = d.chunk * PAGES_PER_CHUNK;
            let c1 = c0 + PAGES_PER_CHUNK;
            for &(a, b) in &self.runs {
                let (s, e) = (a.max(c0), b.min(c1));
                if s < e {
                    store.zero(s * PAGE_SIZE, (e - s) * PAGE_SIZE);
                }
            }
        }
        Ok(())
    }

    fn remap_view(&mut self, target: Side) -> io::Result<()> {
        let source = target.other();
        if !self.split {
            let store = match target {
                Side::Private => &self.private,
                Side::Shared => &self.shared,
            };
            for &(a, b) in &self.runs {
                let (off, len) = (a * PAGE_SIZE, (b - a) * PAGE_SIZE);
                self.view.map(off, len, store)?;
                self.remapped.push((off, len, source));
            }
            return Ok(());
        }
        // Split host: whole chunks that became uniform and are viewed from the wrong store.
        let mut i = 0;
        while i < self.deltas.len() {
            let d = self.deltas[i];
            let Some(side) = self.attrs.uniform(d.chunk) else {
                i += 1;
                continue;
            };
            if self.view_private.get(d.chunk) == (side == Side::Private) {
                i += 1;
                continue;
            }
            // Merge following chunks needing the same remap.
            let mut j = i + 1;
            while j < self.deltas.len() {
                let n = self.deltas[j];
                if n.chunk != self.deltas[j - 1].chunk + 1
                    || self.attrs.uniform(n.chunk) != Some(side)
                    || self.view_private.get(n.chunk) == (side == Side::Private)
                {
                    break;
                }
                j += 1;
            }
            let c0 = d.chunk;
            let c1 = self.deltas[j - 1].chunk + 1;
            let store = match side {
                Side::Private => &self.private,
                Side::Shared => &self.shared,
            };
            let (off, len) = (c0 * HUGE_PAGE_SIZE, (c1 - c0) * HUGE_PAGE_SIZE);
            self.view.map(off, len, store)?;
            self.remapped.push((off, len, side.other()));
            self.view_private.set_range(c0, c1, side == Side::Private);
            i = j;
        }
        Ok(())
    }

    /// Release the source side and update accounting after a conversion.
    fn finish(&mut self, target: Side) {
        let source = target.other();
        let s = side_idx(source);
        let store = match source {
            Side::Private => &self.private,
            Side::Shared => &self.shared,
        };
        if store.kind().is_huge() {
            for d in &self.deltas {
                if count_of(d.after, source) == 0 {
                    match store.punch(d.chunk * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE) {
                        Ok(()) => self.ensured[s].set(d.chunk, false),
                        Err(e) => {
                            tracing::warn!("punching {} chunk failed: {e}", source.name());
                            self.counters.punch_failures += 1;
                        }
                    }
                }
            }
        } else {
            for &(a, b) in &self.runs {
                if let Err(e) = store.punch(a * PAGE_SIZE, (b - a) * PAGE_SIZE) {
                    tracing::warn!("punching {} pages failed: {e}", source.name());
                    self.counters.punch_failures += 1;
                }
            }
        }
        let changed: u64 = self.runs.iter().map(|(a, b)| b - a).sum();
        self.counters.pages_converted += changed;
        let (ph, sh) = (self.private.kind().is_huge(), self.shared.kind().is_huge());
        let mut dbl = self.counters.dbl_pages as i128;
        for d in &self.deltas {
            dbl += dbl_pages(d.after, ph, sh) as i128 - dbl_pages(d.before, ph, sh) as i128;
        }
        self.counters.set_dbl_pages(dbl.max(0) as u64);
        self.counters.mixed_peak = self.counters.mixed_peak.max(self.attrs.mixed_chunks());
        self.remapped.clear();
        self.fresh.clear();
    }

    /// Accept `[gpa, gpa + npages*4K)`: 2 MiB aligned and sized; refuses (whole entry) if any
    /// unit is already accepted. Returns an abi status.
    pub fn accept(&mut self, gpa: u64, npages: u64, attrs: u64) -> u32 {
        let r = self.accept_inner(gpa, npages, attrs);
        match r {
            Ok(units) => {
                self.counters.accept_entries += 1;
                self.counters.accepted_units += units;
                abi::STATUS_OK
            }
            Err(code) => {
                if code == abi::ERR_DOUBLE_ACCEPT {
                    tracing::warn!(
                        "security violation: double accept of gpa {gpa:#x} npages {npages}"
                    );
                }
                self.counters.reject(code);
                code
            }
        }
    }

    fn accept_inner(&mut self, gpa: u64, npages: u64, attrs: u64) -> Result<u64, u32> {
        if attrs != 0 {
            return Err(abi::ERR_INVALID_ATTRS);
        }
        if npages == 0 {
            return Err(abi::ERR_BAD_REQUEST);
        }
        if !gpa.is_multiple_of(HUGE_PAGE_SIZE) || !npages.is_multiple_of(PAGES_PER_CHUNK) {
            return Err(abi::ERR_UNALIGNED);
        }
        let len = npages.checked_mul(PAGE_SIZE).ok_or(abi::ERR_OUT_OF_RAM)?;
        let end = self.check_range(gpa, len)?;
        let (u0, u1) = (gpa / HUGE_PAGE_SIZE, end / HUGE_PAGE_SIZE);
        if self.accepted.count_range(u0, u1) != 0 {
            return Err(abi::ERR_DOUBLE_ACCEPT);
        }
        self.accepted.set_range(u0, u1, true);
        Ok(u1 - u0)
    }

    /// Ok if every page of `[gpa, gpa+len)` is RAM and shared: Err((first bad gpa, is_ram)).
    pub fn check_shared(&self, gpa: u64, len: u64) -> Result<(), (u64, bool)> {
        let end = match gpa.checked_add(len) {
            Some(e) if e <= self.size => e,
            _ => return Err((gpa, false)),
        };
        if len == 0 {
            return Ok(());
        }
        let (p0, p1) = (gpa / PAGE_SIZE, end.div_ceil(PAGE_SIZE));
        let first_private = self.attrs.bits().find(p0, p1, true);
        if first_private < p1 {
            return Err(((first_private * PAGE_SIZE).max(gpa), true));
        }
        Ok(())
    }

    /// Engine's upper bound of what `side`'s store has allocated, and the bytes it owns.
    pub fn side_bytes(&self, side: Side) -> (u64, u64) {
        let owned_pages = match side {
            Side::Private => self.attrs.bits().count_ones(),
            Side::Shared => self.attrs.npages() - self.attrs.bits().count_ones(),
        };
        let bound = if self.store(side).kind().is_huge() {
            (0..self.attrs.nchunks())
                .filter(|&c| {
                    self.attrs.in_chunk(c, side) > 0 || self.ensured[side_idx(side)].get(c)
                })
                .count() as u64
                * HUGE_PAGE_SIZE
        } else {
            owned_pages * PAGE_SIZE
        };
        (owned_pages * PAGE_SIZE, bound)
    }

    /// Read guest memory as KVM sees it (through the installed memslots) into `buf`.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), u64> {
        let mut done = 0usize;
        while done < buf.len() {
            let g = gpa + done as u64;
            let slots = self.slots.slots();
            let idx = slots.partition_point(|(d, _)| d.gpa + d.size <= g);
            let Some((d, _)) = slots.get(idx) else {
                return Err(g);
            };
            if d.gpa > g {
                return Err(g);
            }
            let n = ((d.gpa + d.size - g) as usize).min(buf.len() - done);
            let src = (d.host_addr + (g - d.gpa)) as *const u8;
            for (i, out) in buf[done..done + n].iter_mut().enumerate() {
                // SAFETY: `src + i` lies inside a slot's host range, which is memory memconv
                // keeps mapped (the view or a store mapping) for as long as the slot exists.
                *out = unsafe { std::ptr::read_volatile(src.add(i)) };
            }
            done += n;
        }
        Ok(())
    }
}

/// Computed double-allocated pages of a chunk with `private` private pages.
pub fn dbl_pages(private: u64, private_huge: bool, shared_huge: bool) -> u64 {
    let shared = PAGES_PER_CHUNK - private;
    let mut n = 0;
    if private_huge && private > 0 {
        n += shared;
    }
    if shared_huge && shared > 0 {
        n += private;
    }
    n
}
