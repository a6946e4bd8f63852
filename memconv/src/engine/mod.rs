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
//!    layout; over the slot limit -> `NoMemory`, bitmap reverted.
//! 3. Prepare T so the converted pages read zero: a 4 KiB store punches exactly those pages
//!    (they may hold stale data from an earlier conversion); a hugetlb chunk with no T page
//!    before is punched and then allocated whole (fallocate mode 0: ENOSPC/ENOMEM ->
//!    `NoMemory`, everything undone, never a SIGBUS later); a hugetlb chunk that already
//!    holds T pages keeps its 2 MiB page, whose converted 4 KiB pieces still hold what T had
//!    there before they left T: those are zeroed through the store mapping before any slot
//!    exposes them.
//! 4. Re-back the guest view: 4 KiB hosts remap exactly the runs (one `mmap(MAP_FIXED)` per
//!    run); split hosts remap whole chunks that became uniform, then apply the memslot diff with
//!    all vCPUs paused (see `layout`).
//! 5. Release S: a 4 KiB store punches exactly the converted pages; hugetlb punches only the
//!    chunks with no S page left. A failed punch leaves the state consistent (counted).
//!
//! Between 1 and 2 the engine holds the range's pages in the DMA fence
//! ([`crate::fence`]): it waits (bounded) for device accesses already pinned there, no new one
//! starts, and the fence's shared bits are set from the bitmap before the pages are released
//! (`Busy` if the accesses do not drain in time; nothing changed).
//!
//! Failures in 3-4 roll back (view, memslots, fresh allocations, bitmap) and return
//! `NoMemory` / `Internal`; if a rollback step itself fails the bitmap is kept equal to
//! what is mapped and the failure is counted as unrecovered.
//!
//! Submodules: `convert` (steps 2-5 and their rollback, over one explicit per-call
//! `Scratch`), `validate` (step 1 and the device-access check) and `accept` (ACCEPT and
//! rescind under the platform's rules from `crate::acceptance`, backing at ACCEPT, the
//! memslot holes of unaccepted chunks). The engine
//! owns its [`Counters`]: the service reports doorbells, exits and guest reports through
//! methods here and never changes a counter itself.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use crate::abi::{self, HUGE_PAGE_SIZE, MAILBOX_AREA_END, PAGES_PER_CHUNK, PAGE_SIZE};
use crate::acceptance::Acceptance;
use crate::bitmap::{Attributes, PageBits, Side};
use crate::fence::Fence;
use crate::host_vm::HostVm;
use crate::layout::{compute_layout, Bases, LayoutError, SlotDesc, SlotTable, View, MAX_MEMSLOTS};
use crate::ram::{Granularity, RamConfig};
use crate::stats::{Counters, PoolReportSnapshot, SizeClass, SnapshotInputs, StatsSnapshot};
use crate::status::{ConversionError, Status};
use crate::store::Store;

mod accept;
mod convert;
mod validate;

/// Errors of engine set-up (conversion results are [`Status`]).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Mapping the initial view failed.
    #[error("mapping the initial guest view failed: {0}")]
    View(io::Error),
    /// Installing the initial memslots failed.
    #[error("installing the initial memslots failed: {0}")]
    Slots(#[from] LayoutError),
}

/// How one chunk touched by a conversion changes.
#[derive(Clone, Copy, Debug)]
struct ChunkDelta {
    chunk: u64,
    /// Private pages before the conversion.
    before: u64,
    /// Private pages after it.
    after: u64,
}

/// The working state of one conversion, built by its steps and passed explicitly to each
/// (cleared after every conversion; kept in the engine only to reuse the allocations).
#[derive(Default)]
struct Scratch {
    /// Runs of pages that change side, `[a, b)` in 4 KiB pages.
    runs: Vec<(u64, u64)>,
    /// Chunks the runs touch, ascending.
    deltas: Vec<ChunkDelta>,
    /// The new memslot layout, when it changes.
    layout: Vec<SlotDesc>,
    /// Target chunks allocated whole by this conversion (undone on failure).
    fresh: Vec<u64>,
    /// View pieces remapped by this conversion: (offset, length, side mapped before).
    remapped: Vec<(u64, u64, Side)>,
    /// Private runs of the converted range, to copy into the fence's shared bits.
    fence_runs: Vec<(u64, u64)>,
    /// Chunks whose hole bit (see `crate::acceptance`) this conversion flipped.
    holes_changed: Vec<u64>,
}

impl Scratch {
    fn clear(&mut self) {
        self.runs.clear();
        self.deltas.clear();
        self.layout.clear();
        self.fresh.clear();
        self.remapped.clear();
        self.fence_runs.clear();
        self.holes_changed.clear();
    }

    /// Pages the runs cover.
    fn changed_pages(&self) -> u64 {
        self.runs.iter().map(|(a, b)| b - a).sum()
    }
}

/// The conversion engine (kept behind the service's lock).
pub struct Engine {
    size: u64,
    granularity: Granularity,
    /// The stores, indexed by [`Side::index`].
    stores: [Store; 2],
    view: View,
    attrs: Attributes,
    /// Per chunk: the view maps it from the private store (1) or the shared store (0).
    view_private: PageBits,
    /// Per side, per chunk of a hugetlb store: the engine allocated its 2 MiB page (cleared on
    /// punch).
    ensured: [PageBits; 2],
    /// Acceptance under the platform's rules, and the chunks cut out of the view.
    acc: Acceptance,
    /// Private hugetlb chunks are backed at ACCEPT and released when unaccepted (not
    /// `--prealloc`).
    lazy: bool,
    slots: SlotTable,
    /// Mixed chunks are served by per-run memslots (a hugetlb store is in use).
    split: bool,
    slot_limit: usize,
    host: Arc<dyn HostVm>,
    /// The DMA fence: held over every conversion, its shared bits kept equal to `attrs`.
    fence: Arc<Fence>,
    counters: Counters,
    scratch: Scratch,
}

impl Engine {
    /// Build the engine over created stores and a reserved view: sets the initial attributes
    /// (all private but the mailbox chunk), maps the view and installs the initial memslots
    /// (none over unaccepted chunks). Hugetlb stores must already be allocated for the chunks
    /// their side owns (private: only the boot area unless `cfg.prealloc`). `fence` (over
    /// `size` bytes, no device running yet, made with no chunk backed when the shared store is
    /// hugetlb) gets the initial shared bits.
    pub fn new(
        cfg: &RamConfig,
        private: Store,
        shared: Store,
        view: View,
        host: Arc<dyn HostVm>,
        fence: Arc<Fence>,
    ) -> Result<Engine, EngineError> {
        let (size, granularity) = (cfg.size, cfg.granularity);
        let npages = size / PAGE_SIZE;
        let nchunks = size / HUGE_PAGE_SIZE;
        let mut attrs = Attributes::new_private(npages);
        let mb0 = abi::MAILBOX_BASE_GPA / PAGE_SIZE;
        let mb1 = MAILBOX_AREA_END / PAGE_SIZE;
        attrs.flip_run(mb0, mb1, Side::Shared);
        fence.set_shared(0, npages, false);
        fence.set_shared(mb0, mb1, true);
        if shared.kind().is_huge() {
            // The fence was made with no chunk backed (`Fence::with_backing`): only the
            // mailbox chunk has its huge page in the shared store.
            fence.set_backed(mb0 / PAGES_PER_CHUNK, true);
        }
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
            if cfg.prealloc {
                ensured[Side::Private.index()] = PageBits::new(nchunks, true);
                ensured[Side::Private.index()].set(1, false);
            } else {
                ensured[Side::Private.index()].set(0, true);
            }
        }
        if shared.kind().is_huge() {
            ensured[Side::Shared.index()].set(1, true);
        }
        let mut e = Engine {
            size,
            granularity,
            stores: [private, shared],
            view,
            attrs,
            view_private,
            ensured,
            acc: Acceptance::new(cfg.platform, npages),
            lazy: !cfg.prealloc,
            slots: SlotTable::default(),
            split,
            slot_limit: MAX_MEMSLOTS as usize,
            host,
            fence,
            counters: Counters::default(),
            scratch: Scratch::default(),
        };
        let mut layout = Vec::new();
        compute_layout(&e.attrs, e.acc.holes(), e.bases(), e.split, &mut layout);
        e.slots.apply(&layout, e.host.as_ref())?;
        Ok(e)
    }

    /// Lower the memslot limit below `MAX_MEMSLOTS` (tests, or a KVM with fewer slots).
    pub fn set_slot_limit(&mut self, n: usize) {
        self.slot_limit = n.min(MAX_MEMSLOTS as usize);
    }

    /// Host addresses of the view and the store mappings.
    fn bases(&self) -> Bases {
        Bases {
            view: self.view.base() as u64,
            private: self.store(Side::Private).base() as u64,
            shared: self.store(Side::Shared).base() as u64,
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

    /// The canonical attributes.
    pub fn attrs(&self) -> &Attributes {
        &self.attrs
    }

    /// Installed memslots.
    pub fn slots(&self) -> &SlotTable {
        &self.slots
    }

    /// The store of `side`.
    pub fn store(&self, side: Side) -> &Store {
        &self.stores[side.index()]
    }

    /// The guest view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Per chunk: the view maps it from the private store.
    pub fn view_private(&self) -> &PageBits {
        &self.view_private
    }

    /// Delete all memslots (teardown).
    pub fn clear_slots(&mut self) {
        let host = self.host.clone();
        self.slots.clear(host.as_ref());
    }

    /// Convert `[gpa, gpa + npages*4K)` (KVM_HC_MAP_GPA_RANGE semantics).
    pub fn convert(&mut self, gpa: u64, npages: u64, attrs: u64) -> Status {
        let t0 = Instant::now();
        let (p0, p1, target) = self
            .validate_convert(gpa, npages, attrs)
            .and_then(|v| self.check_lifecycle(v))
            .inspect_err(|&e| self.counters.reject(e))?;
        // Only a range with pages that change side waits for the device accesses in it.
        let source_private = target == Side::Shared;
        let status = if self.attrs.bits().find(p0, p1, source_private) == p1 {
            self.counters.noop_pages += p1 - p0;
            Ok(())
        } else {
            self.fenced_convert(p0, p1, target)
        };
        match status {
            Ok(()) => {
                let class = SizeClass::of(gpa, npages) as usize;
                match target {
                    Side::Shared => self.counters.to_shared[class] += 1,
                    Side::Private => self.counters.to_private[class] += 1,
                }
                self.counters.latency.record(t0.elapsed().as_nanos() as u64);
            }
            Err(e) => self.counters.reject(e),
        }
        status
    }

    /// Steps 2-5 for validated pages `[p0, p1)` with some page changing side, inside the DMA
    /// fence: `Busy` if device accesses there do not drain within its bound.
    fn fenced_convert(&mut self, p0: u64, p1: u64, target: Side) -> Status {
        let fence = self.fence.clone();
        let hold = fence
            .begin_conversion(p0, p1)
            .map_err(|_| ConversionError::Busy)?;
        let mut sc = std::mem::take(&mut self.scratch);
        let status = self.convert_valid(&mut sc, p0, p1, target);
        if status.is_ok() {
            self.after_conversion(&sc, p0, p1, target);
        }
        // Whatever happened, the fence's bits become what the bitmap says, then the pages
        // are released.
        self.attrs.bits().runs(p0, p1, true, &mut sc.fence_runs);
        fence.set_shared(p0, p1, true);
        for &(a, b) in &sc.fence_runs {
            fence.set_shared(a, b, false);
        }
        if self.store(Side::Shared).kind().is_huge() {
            let ensured = &self.ensured[Side::Shared.index()];
            for c in p0 / PAGES_PER_CHUNK..p1.div_ceil(PAGES_PER_CHUNK) {
                fence.set_backed(c, ensured.get(c));
            }
        }
        drop(hold);
        sc.clear();
        self.scratch = sc;
        status
    }

    /// A mailbox convert (`convert`) or accept entry carried by a doorbell.
    pub fn mailbox_entry(&mut self, convert: bool, gpa: u64, npages: u64, attrs: u64) -> Status {
        self.counters.mailbox_ranges += 1;
        if convert {
            self.convert(gpa, npages, attrs)
        } else {
            self.accept(gpa, npages, attrs)
        }
    }

    /// A KVM_HC_MAP_GPA_RANGE conversion.
    pub fn hypercall(&mut self, gpa: u64, npages: u64, attrs: u64) -> Status {
        self.counters.hypercalls += 1;
        self.convert(gpa, npages, attrs)
    }

    /// Count a doorbell; `rejected` when its mailbox was malformed as a whole.
    pub fn doorbell(&mut self, rejected: Option<ConversionError>) {
        self.counters.doorbells += 1;
        if let Some(e) = rejected {
            self.counters.bad_mailboxes += 1;
            self.counters.reject(e);
        }
    }

    /// Count an OP_EXIT request.
    pub fn exit_request(&mut self) {
        self.counters.exits += 1;
    }

    /// Keep the guest's latest pool report.
    pub fn pool_report(&mut self, report: PoolReportSnapshot) {
        self.counters.reports += 1;
        self.counters.pool_report = Some(report);
    }

    /// The statistics snapshot from the counters and `inputs` (measured outside the engine).
    pub fn snapshot(&mut self, inputs: SnapshotInputs) -> StatsSnapshot {
        StatsSnapshot::build(&mut self.counters, inputs)
    }

    /// Engine's upper bound of what `side`'s store has allocated, and the bytes it owns.
    pub fn side_bytes(&self, side: Side) -> (u64, u64) {
        let owned_pages = match side {
            Side::Private => self.attrs.bits().count_ones(),
            Side::Shared => self.attrs.npages() - self.attrs.bits().count_ones(),
        };
        let bound = if self.store(side).kind().is_huge() {
            (0..self.attrs.nchunks())
                .filter(|&c| self.attrs.in_chunk(c, side) > 0 || self.ensured[side.index()].get(c))
                .count() as u64
                * HUGE_PAGE_SIZE
        } else {
            owned_pages * PAGE_SIZE
        };
        (owned_pages * PAGE_SIZE, bound)
    }
}
