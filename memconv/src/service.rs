//! [`ConversionService`]: the thread-safe front of memconv that the VMM holds. It creates the
//! stores and the guest view from a [`RamConfig`], installs the memslots through [`HostVm`],
//! hands out vm-memory views of both stores, services mailboxes and KVM_HC_MAP_GPA_RANGE
//! exits, answers device access checks and produces statistics (with the kernel-measured
//! figures). All state lives in one [`Engine`] behind a mutex.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::abi::{
    self, HUGE_PAGE_SIZE, MAILBOX_AREA_END, MAILBOX_BASE_GPA, PAGES_PER_CHUNK, PAGE_SIZE,
};
use crate::bitmap::{PageBits, Side};
use crate::engine::{Engine, EngineError};
use crate::host_vm::HostVm;
use crate::layout::{LayoutError, View};
use crate::mailbox::{self, Request, Snapshot};
use crate::ram::RamConfig;
use crate::stats::{SnapshotInputs, StatsSnapshot, StoreUsage};
use crate::store::{
    huge_pages_available, huge_pages_error, Store, StoreError, StoreKind,
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
};

/// Result of servicing a mailbox doorbell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxOutcome {
    /// Entries processed; resume the guest.
    Handled,
    /// The guest asked to end with this exit code.
    Exit(u64),
    /// The guest sent pool statistics (also kept in the stats).
    Report(abi::PoolReport),
    /// The mailbox was malformed (abi error code, also written to the header when possible).
    Rejected(u32),
}

/// A device access that is not allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AccessError {
    /// The range is not inside guest RAM (or overflows).
    #[error("range {gpa:#x}+{len:#x} is not inside guest RAM")]
    OutOfRam {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The page at `gpa` is private.
    #[error("page at {gpa:#x} is private")]
    NotShared {
        /// First private byte of the range.
        gpa: u64,
    },
}

/// Errors creating the service.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Size not acceptable.
    #[error(
        "RAM size {size:#x} must be a multiple of 2 MiB between {min} MiB and {max} MiB",
        min = abi::MIN_RAM >> 20,
        max = abi::MAX_RAM >> 20
    )]
    BadSize {
        /// Requested size.
        size: u64,
    },
    /// vCPU count not acceptable.
    #[error("vCPU count {cpus} must be between 1 and {}", abi::MAX_CPUS)]
    BadCpus {
        /// Requested count.
        cpus: u32,
    },
    /// A store could not be created.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The view could not be reserved.
    #[error("reserving the guest view failed: {0}")]
    View(#[from] LayoutError),
    /// The engine could not be set up.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// vm-memory refused the store mapping.
    #[error("building the vm-memory view of the {what} store failed: {msg}")]
    GuestMemory {
        /// Which store.
        what: &'static str,
        /// vm-memory's error.
        msg: String,
    },
}

/// The conversion service (Send + Sync, internally locked).
pub struct ConversionService {
    private_mem: GuestMemoryMmap<()>,
    shared_mem: GuestMemoryMmap<()>,
    engine: Mutex<Engine>,
    cfg: RamConfig,
    shared_base: usize,
}

fn guest_memory(store: &Store) -> Result<GuestMemoryMmap<()>, Error> {
    let err = |msg: String| Error::GuestMemory {
        what: store.what(),
        msg,
    };
    // SAFETY: the store mapping is `size` bytes, mapped for the store's lifetime, and the
    // service drops these views before the stores (field order); build_raw does not own it.
    let region = unsafe {
        MmapRegion::<()>::build_raw(
            store.base(),
            store.size() as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
        )
    }
    .map_err(|e| err(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| err("region overflows".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| err(e.to_string()))
}

fn create_store(
    kind: StoreKind,
    what: &'static str,
    size: u64,
    host: &dyn HostVm,
) -> Result<Store, StoreError> {
    let gmem = if kind == StoreKind::Gmem {
        Some(
            host.create_guest_memfd(size, GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED)
                .map_err(|source| StoreError::GmemUnavailable { size, source })?,
        )
    } else {
        None
    };
    Store::create(kind, what, size, gmem)
}

/// Allocate the hugetlb chunks `side` owns at start (private: all but the mailbox chunk;
/// shared: the mailbox chunk) so no guest or VMM access can SIGBUS later.
fn prealloc_huge(
    store: &Store,
    side: Side,
    size: u64,
    needed_total: u64,
) -> Result<(), StoreError> {
    let ranges: &[(u64, u64)] = match side {
        Side::Private => &[(0, MAILBOX_BASE_GPA), (MAILBOX_AREA_END, size)],
        Side::Shared => &[(MAILBOX_BASE_GPA, MAILBOX_AREA_END)],
    };
    for &(a, b) in ranges {
        if b <= a {
            continue;
        }
        store
            .allocate(a, b - a)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::ENOMEM) => huge_pages_error(needed_total),
                _ => StoreError::Prealloc {
                    what: store.what(),
                    source: e,
                },
            })?;
        let _ = store.populate_read(a, b - a);
    }
    Ok(())
}

/// 2 MiB pages the hugetlb stores need at start.
fn huge_pages_needed(cfg: &RamConfig) -> u64 {
    let nchunks = cfg.size / HUGE_PAGE_SIZE;
    let mut needed = 0;
    if cfg.private.is_huge() {
        needed += nchunks - 1;
    }
    if cfg.shared.is_huge() {
        needed += 1;
    }
    needed
}

impl ConversionService {
    /// Create the stores, the view and the initial memslots for `cfg`.
    pub fn new(cfg: RamConfig, host: Arc<dyn HostVm>) -> Result<Self, Error> {
        let size = cfg.size;
        if !size.is_multiple_of(HUGE_PAGE_SIZE) || !(abi::MIN_RAM..=abi::MAX_RAM).contains(&size) {
            return Err(Error::BadSize { size });
        }
        if cfg.cpus == 0 || cfg.cpus > abi::MAX_CPUS {
            return Err(Error::BadCpus { cpus: cfg.cpus });
        }
        if cfg.shared == StoreKind::Gmem {
            return Err(StoreError::GmemShared.into());
        }
        let needed = huge_pages_needed(&cfg);
        if needed > 0 && huge_pages_available().0 < needed {
            return Err(huge_pages_error(needed).into());
        }
        let private = create_store(cfg.private, "private", size, host.as_ref())?;
        let shared = create_store(cfg.shared, "shared", size, host.as_ref())?;
        Self::with_stores(cfg, private, shared, host)
    }

    /// Like [`ConversionService::new`] over stores created by the caller (e.g. a hugetlb file
    /// on a size-limited hugetlbfs mount); `cfg.private`/`cfg.shared` are taken from the stores.
    #[doc(hidden)]
    pub fn with_stores(
        mut cfg: RamConfig,
        private: Store,
        shared: Store,
        host: Arc<dyn HostVm>,
    ) -> Result<Self, Error> {
        let size = cfg.size;
        if private.size() != size || shared.size() != size {
            return Err(Error::BadSize { size });
        }
        cfg.private = private.kind();
        cfg.shared = shared.kind();
        if cfg.shared == StoreKind::Gmem {
            return Err(StoreError::GmemShared.into());
        }
        let needed = huge_pages_needed(&cfg);
        if private.kind().is_huge() {
            prealloc_huge(&private, Side::Private, size, needed)?;
        }
        if shared.kind().is_huge() {
            prealloc_huge(&shared, Side::Shared, size, needed)?;
        }
        let view = View::reserve(size).map_err(LayoutError::Map)?;
        let private_mem = guest_memory(&private)?;
        let shared_mem = guest_memory(&shared)?;
        let shared_base = shared.base() as usize;
        let engine = Engine::new(size, cfg.granularity, private, shared, view, host)?;
        Ok(ConversionService {
            private_mem,
            shared_mem,
            engine: Mutex::new(engine),
            cfg,
            shared_base,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Limit memconv to `n` memslots (at most `layout::MAX_MEMSLOTS`), e.g. when KVM reports
    /// fewer (KVM_CAP_NR_MEMSLOTS) or the VMM needs more for itself.
    pub fn set_memslot_limit(&self, n: usize) {
        self.lock().set_slot_limit(n);
    }

    /// The configuration.
    pub fn config(&self) -> RamConfig {
        self.cfg
    }

    /// vm-memory view of the PRIVATE store, GPA 0..size.
    pub fn private_memory(&self) -> &GuestMemoryMmap<()> {
        &self.private_mem
    }

    /// vm-memory view of the SHARED store, GPA 0..size (devices: call check_shared first).
    pub fn shared_memory(&self) -> &GuestMemoryMmap<()> {
        &self.shared_mem
    }

    /// Service vCPU `cpu`'s mailbox (it rang the doorbell).
    pub fn service_mailbox(&self, cpu: u32) -> MailboxOutcome {
        if cpu >= self.cfg.cpus {
            let mut e = self.lock();
            e.counters.doorbells += 1;
            e.counters.bad_mailboxes += 1;
            e.counters.reject(abi::ERR_BAD_REQUEST);
            return MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST);
        }
        let off = MAILBOX_BASE_GPA + cpu as u64 * PAGE_SIZE;
        let ptr = (self.shared_base + off as usize) as *mut u8;
        // Copy the untrusted page before taking the engine lock: other vCPUs' conversions do
        // not wait for this vCPU's 4 KiB copy.
        // SAFETY: the mailbox chunk lies inside the shared store mapping (size >= MIN_RAM), is
        // page aligned and stays mapped while the service lives.
        let snap = unsafe { Snapshot::read(ptr) };
        let mut e = self.lock();
        e.counters.doorbells += 1;
        let req = match snap.decode() {
            Ok(r) => r,
            Err(err) => {
                tracing::debug!("cpu {cpu}: rejected mailbox: {err}");
                e.counters.bad_mailboxes += 1;
                e.counters.reject(err.code());
                // SAFETY: as above; writable shared page.
                unsafe { mailbox::write_header(ptr, None, err.code()) };
                return MailboxOutcome::Rejected(err.code());
            }
        };
        match req {
            Request::Convert { cur, end } | Request::Accept { cur, end } => {
                let convert = matches!(req, Request::Convert { .. });
                let mut first = abi::STATUS_OK;
                for i in cur..end {
                    let en = snap.entry(i);
                    let st = if convert {
                        e.convert(en.gpa, en.npages, en.attrs as u64)
                    } else {
                        e.accept(en.gpa, en.npages, en.attrs as u64)
                    };
                    e.counters.mailbox_ranges += 1;
                    if first == abi::STATUS_OK {
                        first = st;
                    }
                    // SAFETY: as above.
                    unsafe { mailbox::write_entry_status(ptr, i, st) };
                }
                // SAFETY: as above.
                unsafe { mailbox::write_header(ptr, Some(end), first) };
                MailboxOutcome::Handled
            }
            Request::Exit(code) => {
                e.counters.exits += 1;
                // SAFETY: as above.
                unsafe { mailbox::write_header(ptr, None, abi::STATUS_OK) };
                MailboxOutcome::Exit(code)
            }
            Request::Report(r) => {
                e.counters.reports += 1;
                e.counters.pool_report = Some(r);
                // SAFETY: as above.
                unsafe { mailbox::write_header(ptr, None, abi::STATUS_OK) };
                MailboxOutcome::Report(r)
            }
        }
    }

    /// KVM_HC_MAP_GPA_RANGE: convert one range; returns an abi status code.
    pub fn map_gpa_range(&self, gpa: u64, npages: u64, attrs: u64) -> u32 {
        let mut e = self.lock();
        e.counters.hypercalls += 1;
        e.convert(gpa, npages, attrs)
    }

    /// ACCEPT one entry outside the mailbox path (same rules); returns an abi status code.
    pub fn accept(&self, gpa: u64, npages: u64) -> u32 {
        self.lock().accept(gpa, npages, 0)
    }

    /// Ok only if every page of `[gpa, gpa+len)` is in RAM and shared.
    pub fn check_shared(&self, gpa: u64, len: u64) -> Result<(), AccessError> {
        self.lock().check_shared(gpa, len).map_err(|(g, ram)| {
            if ram {
                AccessError::NotShared { gpa: g }
            } else {
                AccessError::OutOfRam { gpa, len }
            }
        })
    }

    /// Is the page at `gpa` private (false outside RAM)?
    pub fn is_private(&self, gpa: u64) -> bool {
        let e = self.lock();
        gpa < e.size() && e.attrs().is_private(gpa / PAGE_SIZE)
    }

    /// Read guest memory as the guest sees it (through memconv's memslots), e.g. for tests and
    /// debugging. Err(gpa) at the first GPA no memslot covers.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), u64> {
        self.lock().read_guest(gpa, buf)
    }

    /// Statistics snapshot, including the kernel-measured allocation figures.
    pub fn stats(&self) -> StatsSnapshot {
        let mut e = self.lock();
        let mut errors = Vec::new();
        let (private_store, private_res) = measure(&e, Side::Private, &mut errors);
        let (shared_store, shared_res) = measure(&e, Side::Shared, &mut errors);
        let kernel_dbl = private_res.count_and(&shared_res) * PAGE_SIZE;
        let inputs = SnapshotInputs {
            ram_bytes: e.size(),
            granularity: e.granularity(),
            private_store,
            shared_store,
            kernel_dbl_bytes: kernel_dbl,
            mixed_chunks: e.attrs().mixed_chunks(),
            memslots: e.slots().slots().len() as u64,
            memslot_edits: e.slots().edits(),
            kernel_query_errors: errors,
        };
        StatsSnapshot::build(&mut e.counters, inputs)
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

impl Drop for ConversionService {
    fn drop(&mut self) {
        // Delete the memslots before the view and stores are unmapped.
        self.lock().clear_slots();
    }
}
