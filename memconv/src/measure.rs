//! Kernel measurement of the stores' allocation for the statistics: per store the kernel's
//! allocated bytes (fstat st_blocks, or mincore for guest_memfd) and per-page residency
//! (SEEK_DATA/SEEK_HOLE, or mincore of the mappings for guest_memfd and hugetlb), next to the
//! engine's own figures, and the measured double allocation.

use std::borrow::Cow;

use crate::abi::{HUGE_PAGE_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};
use crate::bitmap::{PageBits, Side};
use crate::engine::Engine;
use crate::stats::{SnapshotInputs, StoreUsage};
use crate::store::{Store, StoreKind};

/// Everything [`crate::stats::StatsSnapshot::build`] needs besides the counters, measured now.
pub fn snapshot_inputs(e: &Engine) -> SnapshotInputs {
    let mut errors = Vec::new();
    let (private_store, private_res) = measure(e, Side::Private, &mut errors);
    let (shared_store, shared_res) = measure(e, Side::Shared, &mut errors);
    let kernel_dbl = private_res.count_and(&shared_res) * PAGE_SIZE;
    SnapshotInputs {
        ram_bytes: e.size(),
        granularity: e.granularity(),
        private_store,
        shared_store,
        kernel_dbl_bytes: kernel_dbl,
        mixed_chunks: e.attrs().mixed_chunks(),
        memslots: e.slots().slots().len() as u64,
        memslot_edits: e.slots().edits(),
        kernel_query_errors: errors,
        lifecycle: e.lifecycle_inputs(),
    }
}

/// Kernel and engine figures for one store.
fn measure(e: &Engine, side: Side, errors: &mut Vec<String>) -> (StoreUsage, PageBits) {
    let store = e.store(side);
    let mut resident = PageBits::new(e.size() / PAGE_SIZE, false);
    let kernel_bytes = store.allocated_bytes().unwrap_or_else(|err| {
        errors.push(format!("{} fstat: {err}", side.name()));
        0
    });
    let method = match kernel_resident(e, side, &mut resident) {
        Ok(m) => m,
        Err(err) => {
            errors.push(format!("{} residency: {err}", side.name()));
            "error"
        }
    };
    let resident_bytes = resident.count_ones() * PAGE_SIZE;
    // guest_memfd does not account st_blocks: its allocation is what mincore finds.
    let (kernel_bytes, kernel_bytes_source) = if store.kind() == StoreKind::Gmem {
        (resident_bytes, "mincore")
    } else {
        (kernel_bytes, "st_blocks")
    };
    let (owned, bound) = e.side_bytes(side);
    let usage = StoreUsage {
        kind: store.kind(),
        owned_bytes: owned,
        engine_bound_bytes: bound,
        kernel_bytes,
        kernel_bytes_source: Cow::Borrowed(kernel_bytes_source),
        kernel_resident_bytes: resident_bytes,
        kernel_resident_method: Cow::Borrowed(method),
    };
    (usage, resident)
}

/// Kernel residency of `side`'s store, one bit per 4 KiB page.
fn kernel_resident(e: &Engine, side: Side, out: &mut PageBits) -> std::io::Result<&'static str> {
    let store = e.store(side);
    if !store.kind().is_huge() {
        return store.resident_pages(out);
    }
    // hugetlb: a 2 MiB page is allocated iff it is mapped in the store mapping or in a view
    // chunk mapped from this store (the engine populates the store mapping after every
    // allocation it makes, and only a punch frees a page, which also unmaps it everywhere).
    let nchunks = e.size() / HUGE_PAGE_SIZE;
    let mut chunks = PageBits::new(nchunks, false);
    // SAFETY: the whole store mapping is mapped while the engine lives.
    unsafe { Store::mincore_chunks(store.base(), 0, e.size(), &mut chunks)? };
    let want_private = side == Side::Private;
    let vp = e.view_private();
    let mut c = 0;
    while c < nchunks {
        let s = vp.find(c, nchunks, want_private);
        if s >= nchunks {
            break;
        }
        let end = vp.find(s, nchunks, !want_private);
        // SAFETY: chunks [s, end) lie inside the view, which stays mapped while the engine
        // lives (the lock is held).
        unsafe {
            let addr = e.view().base().add((s * HUGE_PAGE_SIZE) as usize);
            Store::mincore_chunks(
                addr,
                s * HUGE_PAGE_SIZE,
                (end - s) * HUGE_PAGE_SIZE,
                &mut chunks,
            )?;
        }
        c = end;
    }
    for c in 0..nchunks {
        if chunks.get(c) {
            out.set_range(c * PAGES_PER_CHUNK, (c + 1) * PAGES_PER_CHUNK, true);
        }
    }
    Ok("mincore")
}
