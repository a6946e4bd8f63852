//! [`ConversionService`]: the thread-safe front of memconv that the VMM holds. It creates the
//! stores and the guest view from a [`RamConfig`], installs the memslots through [`HostVm`],
//! hands out vm-memory views of both stores, services mailboxes and KVM_HC_MAP_GPA_RANGE
//! exits, answers device access checks and produces statistics (with the kernel-measured
//! figures). All state lives in one [`Engine`] behind a mutex.

use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::abi::{self, HUGE_PAGE_SIZE, MAILBOX_AREA_END, MAILBOX_BASE_GPA, PAGE_SIZE};
use crate::bitmap::Side;
use crate::engine::{Engine, EngineError};
use crate::fence::{DmaPin, Fence, FenceError, FenceStats, DEFAULT_WAIT_BOUND};
use crate::host_vm::HostVm;
use crate::layout::{LayoutError, View};
use crate::log_limit::LogLimiter;
use crate::mailbox::{self, Request, Snapshot};
use crate::measure;
use crate::ram::RamConfig;
use crate::stats::{PoolReportSnapshot, StatsSnapshot};
use crate::status::{self, ConversionError};
use crate::store::{
    huge_pages_available, huge_pages_error, Store, StoreError, StoreKind,
    GUEST_MEMFD_FLAG_INIT_SHARED, GUEST_MEMFD_FLAG_MMAP,
};

/// Result of servicing a mailbox doorbell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MailboxOutcome {
    /// Entries processed; resume the guest.
    Handled,
    /// The guest asked to end with this exit code.
    Exit(u64),
    /// The guest sent pool statistics (also kept in the stats).
    Report(PoolReportSnapshot),
    /// The mailbox was malformed (its code is also written to the header when possible).
    Rejected(ConversionError),
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
    fence: Arc<Fence>,
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

/// Allocate the hugetlb chunks `side` owns at start so no guest or VMM access can SIGBUS
/// later: shared, the mailbox chunk; private, the boot area, and with `prealloc` all the rest
/// (otherwise each chunk is backed when the guest accepts it).
fn prealloc_huge(
    store: &Store,
    side: Side,
    cfg: &RamConfig,
    needed_total: u64,
) -> Result<(), StoreError> {
    let size = cfg.size;
    let ranges: &[(u64, u64)] = match side {
        Side::Private if cfg.prealloc => &[(0, MAILBOX_BASE_GPA), (MAILBOX_AREA_END, size)],
        Side::Private => &[(0, MAILBOX_BASE_GPA)],
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

/// 2 MiB pages the hugetlb stores need at start: the boot area and the mailbox chunk (the
/// image is backed when the VMM accepts it for the guest, the rest at the guest's ACCEPT),
/// or with `prealloc` all of RAM.
fn huge_pages_needed(cfg: &RamConfig) -> u64 {
    let nchunks = cfg.size / HUGE_PAGE_SIZE;
    let mut needed = 0;
    if cfg.private.is_huge() {
        needed += if cfg.prealloc { nchunks - 1 } else { 1 };
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
    pub(crate) fn with_stores(
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
            prealloc_huge(&private, Side::Private, &cfg, needed)?;
        }
        if shared.kind().is_huge() {
            prealloc_huge(&shared, Side::Shared, &cfg, needed)?;
        }
        let view = View::reserve(size).map_err(LayoutError::Map)?;
        let private_mem = guest_memory(&private)?;
        let shared_mem = guest_memory(&shared)?;
        let shared_base = shared.base() as usize;
        // A hugetlb shared store holds no page yet but the mailbox chunk's: the engine marks
        // that one backed.
        let fence = Arc::new(Fence::with_backing(
            size,
            DEFAULT_WAIT_BOUND,
            !shared.kind().is_huge(),
        ));
        let engine = Engine::new(&cfg, private, shared, view, host, fence.clone())?;
        Ok(ConversionService {
            private_mem,
            shared_mem,
            engine: Mutex::new(engine),
            fence,
            cfg,
            shared_base,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Engine> {
        self.engine.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Limit memconv to `n` memslots (at most `layout::MAX_MEMSLOTS`): the VMM passes KVM's
    /// limit (KVM_CAP_NR_MEMSLOTS) at VM setup; tests pass less.
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

    /// vm-memory view of the SHARED store, GPA 0..size (devices: access it only under a
    /// [`ConversionService::pin_shared`] pin).
    pub fn shared_memory(&self) -> &GuestMemoryMmap<()> {
        &self.shared_mem
    }

    /// Service vCPU `cpu`'s mailbox (it rang the doorbell).
    pub fn service_mailbox(&self, cpu: u32) -> MailboxOutcome {
        if cpu >= self.cfg.cpus {
            let err = ConversionError::BadRequest;
            self.lock().doorbell(Some(err));
            return MailboxOutcome::Rejected(err);
        }
        let off = MAILBOX_BASE_GPA + cpu as u64 * PAGE_SIZE;
        let ptr = (self.shared_base + off as usize) as *mut u8;
        // Copy the untrusted page before taking the engine lock: other vCPUs' conversions do
        // not wait for this vCPU's 4 KiB copy.
        // SAFETY: the mailbox chunk lies inside the shared store mapping (size >= MIN_RAM), is
        // page aligned and stays mapped while the service lives.
        let snap = unsafe { Snapshot::read(ptr) };
        let mut e = self.lock();
        let req = match snap.decode() {
            Ok(r) => r,
            Err(err) => {
                tracing::debug!("cpu {cpu}: rejected mailbox: {err}");
                let error = err.error();
                e.doorbell(Some(error));
                // SAFETY: as above; writable shared page.
                unsafe { mailbox::write_header(ptr, None, error.to_abi()) };
                return MailboxOutcome::Rejected(error);
            }
        };
        e.doorbell(None);
        match req {
            Request::Convert { cur, end } | Request::Accept { cur, end } => {
                let convert = matches!(req, Request::Convert { .. });
                let mut first = Ok(());
                let mut refused = 0u32;
                for i in cur..end {
                    let en = snap.entry(i);
                    let st = e.mailbox_entry(convert, en.gpa, en.npages, en.attrs as u64);
                    refused += u32::from(st.is_err());
                    first = first.and(st);
                    // SAFETY: as above.
                    unsafe { mailbox::write_entry_status(ptr, i, status::to_abi(st)) };
                }
                if tracing::enabled!(tracing::Level::DEBUG) && cur < end {
                    // Debug diagnostics at a readable rate, whatever the batch rate.
                    static BATCHES: LogLimiter = LogLimiter::new(10);
                    if BATCHES.allow() {
                        let en = snap.entry(cur);
                        tracing::debug!(
                            "{} batch: vCPU {cpu} {} entries ({refused} refused), first {:#x} +{} pages attrs {:#x} ({} batches not shown so far)",
                            if convert { "conversion" } else { "accept" },
                            end - cur,
                            en.gpa,
                            en.npages,
                            en.attrs,
                            BATCHES.suppressed()
                        );
                    }
                }
                // SAFETY: as above.
                unsafe { mailbox::write_header(ptr, Some(end), status::to_abi(first)) };
                MailboxOutcome::Handled
            }
            Request::Exit(code) => {
                e.exit_request();
                // SAFETY: as above.
                unsafe { mailbox::write_header(ptr, None, abi::STATUS_OK) };
                MailboxOutcome::Exit(code)
            }
            Request::Report(r) => {
                let report = PoolReportSnapshot::from(&r);
                e.pool_report(report.clone());
                // SAFETY: as above.
                unsafe { mailbox::write_header(ptr, None, abi::STATUS_OK) };
                MailboxOutcome::Report(report)
            }
        }
    }

    /// KVM_HC_MAP_GPA_RANGE: convert one range; returns the abi status code the VMM hands
    /// back to the guest (the hypercall is a guest boundary like the mailbox).
    pub fn map_gpa_range(&self, gpa: u64, npages: u64, attrs: u64) -> u32 {
        status::to_abi(self.lock().hypercall(gpa, npages, attrs))
    }

    /// ACCEPT one entry outside the mailbox path (same rules); returns an abi status code.
    #[cfg(test)]
    pub(crate) fn accept(&self, gpa: u64, npages: u64) -> u32 {
        self.accept_with(gpa, npages, 0)
    }

    /// ACCEPT one entry with `attrs` (e.g. `ACCEPT_FLAG_RESCIND`) outside the mailbox path.
    #[cfg(test)]
    pub(crate) fn accept_with(&self, gpa: u64, npages: u64, attrs: u64) -> u32 {
        status::to_abi(self.lock().accept(gpa, npages, attrs))
    }

    /// Accept the loaded image, `[IMAGE_BASE_GPA, end)` rounded up to 2 MiB, for the guest
    /// before its first instruction (the platform's initial memory): backs and maps it. Call
    /// before writing the image. `NoMemory` when a hugetlb chunk cannot be had.
    pub fn accept_boot(&self, end: u64) -> Result<(), ConversionError> {
        self.lock().accept_boot(end)
    }

    /// A guest access at `gpa` came back from KVM_RUN as MMIO: true (and counted as an
    /// `unaccepted_access` violation) if `gpa` is RAM cut out as unaccepted, so the VMM must
    /// stop the VM; false for a real MMIO access.
    pub fn unaccepted_access(&self, gpa: u64) -> bool {
        self.lock().unaccepted_access(gpa)
    }

    /// The device-side fence (see [`crate::fence`]): pin the chunks of every range `(gpa,
    /// len)` and check every range is RAM and shared, in one pass without the engine lock.
    /// No conversion of those chunks runs while the pin lives; `Busy` means a conversion
    /// holds one of them now (retry; never wait while holding another pin).
    pub fn pin_shared(&self, ranges: &[(u64, u64)]) -> Result<DmaPin<'_>, FenceError> {
        self.fence.pin(ranges)
    }

    /// Ok only if every page of `[gpa, gpa+len)` is in RAM and shared now (a snapshot, no
    /// pin: devices use [`ConversionService::pin_shared`]).
    pub fn check_shared(&self, gpa: u64, len: u64) -> Result<(), FenceError> {
        self.fence.check_shared(gpa, len)
    }

    /// The fence's counters.
    pub fn fence_stats(&self) -> FenceStats {
        self.fence.stats()
    }

    /// Is the page at `gpa` private (false outside RAM)?
    #[cfg(test)]
    pub(crate) fn is_private(&self, gpa: u64) -> bool {
        let e = self.lock();
        gpa < e.size() && e.attrs().is_private(gpa / PAGE_SIZE)
    }

    /// Statistics snapshot, including the kernel-measured allocation figures.
    pub fn stats(&self) -> StatsSnapshot {
        let mut e = self.lock();
        let inputs = measure::snapshot_inputs(&e);
        let mut snap = e.snapshot(inputs);
        snap.fence = self.fence.stats();
        snap
    }
}

impl Drop for ConversionService {
    fn drop(&mut self) {
        // Delete the memslots before the view and stores are unmapped.
        self.lock().clear_slots();
    }
}
