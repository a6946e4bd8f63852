//! Steps 2-5 of a conversion (see the engine's module doc) and their rollback. Every step
//! reads and extends the conversion's `Scratch`, passed explicitly.

use std::io;

use super::{ChunkDelta, Engine, Scratch};
use crate::abi::{HUGE_PAGE_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};
use crate::bitmap::Side;
use crate::layout::{compute_layout, LayoutError};
use crate::status::{ConversionError, Status};

fn is_mixed(private: u64) -> bool {
    private != 0 && private != PAGES_PER_CHUNK
}

/// Pages of `side` in a chunk with `private` private pages.
fn count_of(private: u64, side: Side) -> u64 {
    match side {
        Side::Private => private,
        Side::Shared => PAGES_PER_CHUNK - private,
    }
}

fn nomem_or_internal(e: &io::Error) -> ConversionError {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::ENOMEM) => ConversionError::NoMemory,
        _ => ConversionError::Internal,
    }
}

/// Computed double-allocated pages of a chunk with `private` private pages.
fn dbl_pages(private: u64, private_huge: bool, shared_huge: bool) -> u64 {
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

impl Engine {
    /// Convert the validated pages `[p0, p1)` to `target`.
    pub(super) fn convert_valid(
        &mut self,
        sc: &mut Scratch,
        p0: u64,
        p1: u64,
        target: Side,
    ) -> Status {
        let source = target.other();
        // Pages currently on the source side (bit == (source == private)).
        self.attrs
            .bits()
            .runs(p0, p1, source == Side::Private, &mut sc.runs);
        let changed = sc.changed_pages();
        self.counters.noop_pages += (p1 - p0) - changed;
        if changed == 0 {
            return Ok(());
        }
        // Chunk deltas (chunks touched by the runs, ascending).
        for &(a, b) in &sc.runs {
            for c in a / PAGES_PER_CHUNK..=(b - 1) / PAGES_PER_CHUNK {
                if sc.deltas.last().is_none_or(|d| d.chunk != c) {
                    let before = self.attrs.private_in_chunk(c);
                    sc.deltas.push(ChunkDelta {
                        chunk: c,
                        before,
                        after: before,
                    });
                }
            }
        }
        // 2. Tentative bitmap flip and layout.
        for &(a, b) in &sc.runs {
            self.attrs.flip_run(a, b, target);
        }
        let mut layout_change = false;
        for d in sc.deltas.iter_mut() {
            d.after = self.attrs.private_in_chunk(d.chunk);
            layout_change |= self.split && (is_mixed(d.before) || is_mixed(d.after));
        }
        layout_change |= self.update_holes(sc);
        if layout_change {
            compute_layout(
                &self.attrs,
                self.acc.holes(),
                self.bases(),
                self.split,
                &mut sc.layout,
            );
            if sc.layout.len() > self.slot_limit {
                self.revert_bits(sc, source);
                return Err(ConversionError::NoMemory);
            }
        }
        // 3. Prepare the target side.
        if let Err(e) = self.prepare_target(sc, target) {
            self.undo_fresh(sc, target);
            self.revert_bits(sc, source);
            return Err(e);
        }
        // 4. Re-back the view.
        if let Err(e) = self.remap_view(sc, target) {
            let err = nomem_or_internal(&e);
            if self.undo_remaps(sc) {
                self.undo_fresh(sc, target);
                self.revert_bits(sc, source);
                return Err(err);
            }
            return self.unrecovered_after_remap(sc, target);
        }
        if layout_change && self.slots.differs(&sc.layout) {
            let host = self.host.clone();
            host.pause_vcpus();
            self.counters.vcpu_pauses += 1;
            let r = self.slots.apply(&sc.layout, host.as_ref());
            host.resume_vcpus();
            if let Err(e) = r {
                crate::guest_warn!("memslot update failed: {e}");
                if matches!(e, LayoutError::Memslot { restored: true, .. }) && self.undo_remaps(sc)
                {
                    self.undo_fresh(sc, target);
                    self.revert_bits(sc, source);
                    return Err(ConversionError::Internal);
                }
                self.counters.unrecovered += 1;
                self.finish(sc, target);
                return Err(ConversionError::Internal);
            }
        }
        // 5. Release the old side, account.
        self.finish(sc, target);
        Ok(())
    }

    /// Flip the runs back to `source` (and the holes they changed).
    fn revert_bits(&mut self, sc: &Scratch, source: Side) {
        for &(a, b) in &sc.runs {
            self.attrs.flip_run(a, b, source);
        }
        self.acc.flip_holes(&sc.holes_changed);
    }

    /// Punch the chunks this conversion allocated whole on `target`.
    fn undo_fresh(&mut self, sc: &mut Scratch, target: Side) {
        let t = target.index();
        for &c in &sc.fresh {
            if self.stores[t]
                .punch(c * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE)
                .is_ok()
            {
                self.ensured[t].set(c, false);
            }
        }
        sc.fresh.clear();
    }

    /// Undo the view remaps recorded in `sc.remapped` (each maps back from its old side).
    /// Returns false if some could not be undone (those stay recorded).
    fn undo_remaps(&mut self, sc: &mut Scratch) -> bool {
        let mut ok = true;
        let mut keep = Vec::new();
        for &(off, len, old) in sc.remapped.iter().rev() {
            if self.view.map(off, len, &self.stores[old.index()]).is_err() {
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
        sc.remapped = keep;
        ok
    }

    /// View remaps could not all be undone: keep the bitmap equal to what is mapped where we
    /// can tell (the runs stay converted), count it, report an internal error.
    fn unrecovered_after_remap(&mut self, sc: &mut Scratch, target: Side) -> Status {
        self.counters.unrecovered += 1;
        // The view pieces still recorded in `remapped` map the target; everything else was
        // restored. Revert the bits of runs fully restored; keep those still remapped.
        let source = target.other();
        for &(a, b) in &sc.runs {
            let (ga, gb) = (a * PAGE_SIZE, b * PAGE_SIZE);
            let still = sc
                .remapped
                .iter()
                .any(|&(off, len, _)| off < gb && off + len > ga);
            if !still {
                self.attrs.flip_run(a, b, source);
            }
        }
        sc.fresh.clear();
        Err(ConversionError::Internal)
    }

    /// Step 3: make the converted pages of `target` read zero, allocating hugetlb chunks.
    fn prepare_target(&mut self, sc: &mut Scratch, target: Side) -> Status {
        let t = target.index();
        let store = &self.stores[t];
        if !store.kind().is_huge() {
            for &(a, b) in &sc.runs {
                if let Err(e) = store.punch(a * PAGE_SIZE, (b - a) * PAGE_SIZE) {
                    crate::guest_warn!("punching target {} pages failed: {e}", target.name());
                    return Err(ConversionError::Internal);
                }
            }
            return Ok(());
        }
        for d in &sc.deltas {
            let c = d.chunk;
            let off = c * HUGE_PAGE_SIZE;
            let had = count_of(d.before, target) > 0;
            if !had && self.stays_unbacked(d.after, target) {
                // Wholly private and unaccepted: backed at ACCEPT, not now.
                if store.punch(off, HUGE_PAGE_SIZE).is_ok() {
                    self.ensured[t].set(c, false);
                }
                continue;
            }
            if !had {
                // Entirely new on this side: clear anything stale, then allocate whole.
                if store.punch(off, HUGE_PAGE_SIZE).is_ok() {
                    self.ensured[t].set(c, false);
                }
            }
            if !had || !self.ensured[t].get(c) {
                store
                    .allocate(off, HUGE_PAGE_SIZE)
                    .map_err(|e| nomem_or_internal(&e))?;
                if !had {
                    // Undone on failure; a chunk that already held target pages never is.
                    sc.fresh.push(c);
                }
                self.ensured[t].set(c, true);
                // Map it into the store mapping so mincore sees it (no allocation).
                let _ = store.populate_read(off, HUGE_PAGE_SIZE);
            }
        }
        // Chunks that already held target pages: zero the converted pieces' stale backing.
        for d in &sc.deltas {
            if count_of(d.before, target) == 0 {
                continue;
            }
            let c0 = d.chunk * PAGES_PER_CHUNK;
            let c1 = c0 + PAGES_PER_CHUNK;
            for &(a, b) in &sc.runs {
                let (s, e) = (a.max(c0), b.min(c1));
                if s < e {
                    store.zero(s * PAGE_SIZE, (e - s) * PAGE_SIZE);
                }
            }
        }
        Ok(())
    }

    /// Step 4: re-back the guest view (exact runs, or whole chunks that became uniform).
    fn remap_view(&mut self, sc: &mut Scratch, target: Side) -> io::Result<()> {
        let source = target.other();
        if !self.split {
            let store = &self.stores[target.index()];
            for &(a, b) in &sc.runs {
                let (off, len) = (a * PAGE_SIZE, (b - a) * PAGE_SIZE);
                self.view.map(off, len, store)?;
                sc.remapped.push((off, len, source));
            }
            return Ok(());
        }
        // Split host: whole chunks that became uniform and are viewed from the wrong store.
        let needs_remap = |e: &Engine, chunk: u64| {
            e.attrs
                .uniform(chunk)
                .filter(|&side| e.view_private.get(chunk) != (side == Side::Private))
        };
        let mut i = 0;
        while i < sc.deltas.len() {
            let d = sc.deltas[i];
            let Some(side) = needs_remap(self, d.chunk) else {
                i += 1;
                continue;
            };
            // Merge following chunks needing the same remap.
            let mut j = i + 1;
            while j < sc.deltas.len()
                && sc.deltas[j].chunk == sc.deltas[j - 1].chunk + 1
                && needs_remap(self, sc.deltas[j].chunk) == Some(side)
            {
                j += 1;
            }
            let c0 = d.chunk;
            let c1 = sc.deltas[j - 1].chunk + 1;
            let (off, len) = (c0 * HUGE_PAGE_SIZE, (c1 - c0) * HUGE_PAGE_SIZE);
            self.view.map(off, len, &self.stores[side.index()])?;
            sc.remapped.push((off, len, side.other()));
            self.view_private.set_range(c0, c1, side == Side::Private);
            i = j;
        }
        Ok(())
    }

    /// Step 5: release the source side and update accounting after a conversion.
    fn finish(&mut self, sc: &Scratch, target: Side) {
        let source = target.other();
        let s = source.index();
        let store = &self.stores[s];
        if store.kind().is_huge() {
            for d in &sc.deltas {
                if count_of(d.after, source) == 0 {
                    match store.punch(d.chunk * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE) {
                        Ok(()) => self.ensured[s].set(d.chunk, false),
                        Err(e) => {
                            crate::guest_warn!("punching {} chunk failed: {e}", source.name());
                            self.counters.punch_failures += 1;
                        }
                    }
                }
            }
        } else {
            for &(a, b) in &sc.runs {
                if let Err(e) = store.punch(a * PAGE_SIZE, (b - a) * PAGE_SIZE) {
                    crate::guest_warn!("punching {} pages failed: {e}", source.name());
                    self.counters.punch_failures += 1;
                }
            }
        }
        self.counters.pages_converted += sc.changed_pages();
        let ph = self.store(Side::Private).kind().is_huge();
        let sh = self.store(Side::Shared).kind().is_huge();
        let mut dbl = self.counters.dbl_pages as i128;
        for d in &sc.deltas {
            dbl += dbl_pages(d.after, ph, sh) as i128 - dbl_pages(d.before, ph, sh) as i128;
        }
        self.counters.set_dbl_pages(dbl.max(0) as u64);
        self.counters.mixed_peak = self.counters.mixed_peak.max(self.attrs.mixed_chunks());
    }
}
