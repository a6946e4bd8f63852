//! [`StatsSnapshot`]: the serializable statistics (the control socket, the run summary and
//! `--stats-json` read them; field names are a contract), and how it is built from the
//! [`Counters`] and the figures measured outside them ([`SnapshotInputs`]).

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

use super::counters::Counters;
use super::histogram::LatencySnapshot;
use super::lifecycle::{LifecycleInputs, LifecycleSnapshot};
use super::pool_report::PoolReportSnapshot;
use crate::abi::PAGE_SIZE;
use crate::fence::FenceStats;
use crate::ram::Granularity;
use crate::status::ConversionError;
use crate::store::StoreKind;

/// Conversions per size class.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct SizeCounts {
    /// Exactly 4 KiB.
    #[serde(rename = "4k")]
    pub k4: u64,
    /// Neither 4 KiB nor 2 MiB aligned multiples.
    pub sub2m: u64,
    /// 2 MiB aligned multiples of 2 MiB.
    #[serde(rename = "2m")]
    pub m2: u64,
}

impl SizeCounts {
    fn from(a: [u64; 3]) -> Self {
        SizeCounts {
            k4: a[0],
            sub2m: a[1],
            m2: a[2],
        }
    }
    /// Sum of the classes.
    pub fn total(&self) -> u64 {
        self.k4 + self.sub2m + self.m2
    }
}

/// Rejections of one status code.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct RejectCount {
    /// abi status code.
    pub code: u32,
    /// abi::status_name(code) (borrowed when built, owned when deserialized).
    pub name: Cow<'static, str>,
    /// How many.
    pub count: u64,
}

/// One store's allocation. `Default` (for absent fields) says memfd, with no bytes.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct StoreUsage {
    /// The store kind.
    pub kind: StoreKind,
    /// Pages (4 KiB) the bitmap gives this side.
    pub owned_bytes: u64,
    /// What the engine may have left allocated (an upper bound of the kernel figure): owned
    /// pages for a 4 KiB store, owned chunks x 2 MiB for hugetlb.
    pub engine_bound_bytes: u64,
    /// Bytes the kernel has allocated to the file: fstat st_blocks * 512 (guest_memfd, which
    /// does not account st_blocks: the mincore residency).
    pub kernel_bytes: u64,
    /// "st_blocks" or "mincore".
    pub kernel_bytes_source: Cow<'static, str>,
    /// Sum of the per-page residency the kernel reports.
    pub kernel_resident_bytes: u64,
    /// How residency was measured: "seek_data" (shmem) or "mincore" (guest_memfd; hugetlb:
    /// the store mapping and the view chunks mapped from it).
    pub kernel_resident_method: Cow<'static, str>,
}

impl Default for StoreUsage {
    fn default() -> Self {
        StoreUsage {
            kind: StoreKind::Memfd,
            owned_bytes: 0,
            engine_bound_bytes: 0,
            kernel_bytes: 0,
            kernel_bytes_source: Cow::Borrowed(""),
            kernel_resident_bytes: 0,
            kernel_resident_method: Cow::Borrowed(""),
        }
    }
}

/// Double allocation, computed and measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DoubleAlloc {
    /// Engine's figure now (upper bound, see module doc).
    pub computed_bytes: u64,
    /// Peak of `computed_bytes`.
    pub computed_peak_bytes: u64,
    /// Integral of `computed_bytes` over time.
    pub computed_byte_seconds: f64,
    /// Kernel's figure now: pages allocated in both store files.
    pub kernel_bytes: u64,
    /// `kernel_bytes == computed_bytes`.
    pub agree: bool,
    /// `kernel_bytes <= computed_bytes` (must always hold).
    pub kernel_within_bound: bool,
}

/// A statistics snapshot (`ConversionService::stats`). `Default` (for absent fields) is an
/// empty snapshot of no RAM at 4k granularity.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StatsSnapshot {
    /// Since the service was created.
    pub uptime_ms: u64,
    /// Guest RAM bytes.
    pub ram_bytes: u64,
    /// Host granularity policy.
    pub granularity: Granularity,
    /// Conversions to shared by size.
    pub to_shared: SizeCounts,
    /// Conversions to private by size.
    pub to_private: SizeCounts,
    /// Pages whose attribute changed.
    pub pages_converted: u64,
    /// Pages already in the requested state.
    pub noop_pages: u64,
    /// Rejections per code (codes 1.., all listed).
    pub rejects: Vec<RejectCount>,
    /// Total rejections.
    pub rejects_total: u64,
    /// Successful ACCEPT entries.
    pub accept_entries: u64,
    /// 2 MiB units accepted (pages accepted / 512).
    pub accepted_units: u64,
    /// Double-accept attempts (security violations).
    pub double_accept_violations: u64,
    /// Doorbell exits serviced.
    pub doorbells: u64,
    /// Ranges (entries) carried by doorbells.
    pub mailbox_ranges: u64,
    /// Ranges per doorbell exit.
    pub ranges_per_exit: f64,
    /// Mailboxes rejected whole.
    pub bad_mailboxes: u64,
    /// KVM_HC_MAP_GPA_RANGE conversions (one range per exit).
    pub hypercalls: u64,
    /// Private store usage.
    pub private_store: StoreUsage,
    /// Shared store usage.
    pub shared_store: StoreUsage,
    /// Double allocation.
    pub double_alloc: DoubleAlloc,
    /// Mixed 2 MiB chunks now.
    pub mixed_chunks: u64,
    /// Peak mixed chunks.
    pub mixed_chunks_peak: u64,
    /// Memslots installed now.
    pub memslots: u64,
    /// set_memslot calls so far.
    pub memslot_edits: u64,
    /// vCPU pauses.
    pub vcpu_pauses: u64,
    /// Failed punches of the old side.
    pub punch_failures: u64,
    /// Failures that could not be rolled back.
    pub unrecovered_failures: u64,
    /// Conversion latency.
    pub latency: LatencySnapshot,
    /// Latest guest pool report.
    pub pool_report: Option<PoolReportSnapshot>,
    /// The acceptance lifecycle (platform, accepted memory, refusals, unaccepted accesses).
    pub lifecycle: LifecycleSnapshot,
    /// Kernel query errors, if any (figures may be incomplete).
    pub kernel_query_errors: Vec<String>,
    /// The DMA fence: device pins and conversions that waited for them.
    pub fence: FenceStats,
}

impl Default for StatsSnapshot {
    fn default() -> Self {
        StatsSnapshot {
            uptime_ms: 0,
            ram_bytes: 0,
            granularity: Granularity::Page4K,
            to_shared: SizeCounts::default(),
            to_private: SizeCounts::default(),
            pages_converted: 0,
            noop_pages: 0,
            rejects: Vec::new(),
            rejects_total: 0,
            accept_entries: 0,
            accepted_units: 0,
            double_accept_violations: 0,
            doorbells: 0,
            mailbox_ranges: 0,
            ranges_per_exit: 0.0,
            bad_mailboxes: 0,
            hypercalls: 0,
            private_store: StoreUsage::default(),
            shared_store: StoreUsage::default(),
            double_alloc: DoubleAlloc::default(),
            mixed_chunks: 0,
            mixed_chunks_peak: 0,
            memslots: 0,
            memslot_edits: 0,
            vcpu_pauses: 0,
            punch_failures: 0,
            unrecovered_failures: 0,
            latency: LatencySnapshot::default(),
            pool_report: None,
            lifecycle: LifecycleSnapshot::default(),
            kernel_query_errors: Vec::new(),
            fence: FenceStats::default(),
        }
    }
}

/// Inputs to [`StatsSnapshot::build`] that come from outside the counters.
pub struct SnapshotInputs {
    /// RAM size.
    pub ram_bytes: u64,
    /// Granularity.
    pub granularity: Granularity,
    /// Private store usage.
    pub private_store: StoreUsage,
    /// Shared store usage.
    pub shared_store: StoreUsage,
    /// Kernel double allocation in bytes.
    pub kernel_dbl_bytes: u64,
    /// Current mixed chunks.
    pub mixed_chunks: u64,
    /// Installed memslots.
    pub memslots: u64,
    /// Memslot edits.
    pub memslot_edits: u64,
    /// Kernel query errors.
    pub kernel_query_errors: Vec<String>,
    /// Acceptance figures.
    pub lifecycle: LifecycleInputs,
}

impl StatsSnapshot {
    /// The non-zero rejects by reason, as ` (name=count, ...)`, or empty when there are none.
    pub fn rejects_by_reason(&self) -> String {
        let rejects: Vec<String> = self
            .rejects
            .iter()
            .filter(|r| r.count > 0)
            .map(|r| format!("{}={}", r.name, r.count))
            .collect();
        if rejects.is_empty() {
            String::new()
        } else {
            format!(" ({})", rejects.join(", "))
        }
    }

    /// Assemble a snapshot.
    pub fn build(c: &mut Counters, inp: SnapshotInputs) -> StatsSnapshot {
        let rejects: Vec<RejectCount> = ConversionError::ALL
            .into_iter()
            .map(|e| RejectCount {
                code: e.to_abi(),
                name: Cow::Borrowed(e.name()),
                count: c.rejects[e.to_abi() as usize],
            })
            .collect();
        let computed = c.dbl_pages * PAGE_SIZE;
        StatsSnapshot {
            uptime_ms: c.started.elapsed().as_millis() as u64,
            ram_bytes: inp.ram_bytes,
            granularity: inp.granularity,
            to_shared: SizeCounts::from(c.to_shared),
            to_private: SizeCounts::from(c.to_private),
            pages_converted: c.pages_converted,
            noop_pages: c.noop_pages,
            rejects_total: rejects.iter().map(|r| r.count).sum(),
            rejects,
            accept_entries: c.accept_entries,
            accepted_units: c.accepted_units,
            double_accept_violations: c.rejects[ConversionError::DoubleAccept.to_abi() as usize],
            doorbells: c.doorbells,
            mailbox_ranges: c.mailbox_ranges,
            ranges_per_exit: if c.doorbells == 0 {
                0.0
            } else {
                c.mailbox_ranges as f64 / c.doorbells as f64
            },
            bad_mailboxes: c.bad_mailboxes,
            hypercalls: c.hypercalls,
            private_store: inp.private_store,
            shared_store: inp.shared_store,
            double_alloc: DoubleAlloc {
                computed_bytes: computed,
                computed_peak_bytes: c.dbl_peak_pages * PAGE_SIZE,
                computed_byte_seconds: c.dbl_byte_seconds(),
                kernel_bytes: inp.kernel_dbl_bytes,
                agree: inp.kernel_dbl_bytes == computed,
                kernel_within_bound: inp.kernel_dbl_bytes <= computed,
            },
            mixed_chunks: inp.mixed_chunks,
            mixed_chunks_peak: c.mixed_peak,
            memslots: inp.memslots,
            memslot_edits: inp.memslot_edits,
            vcpu_pauses: c.vcpu_pauses,
            punch_failures: c.punch_failures,
            unrecovered_failures: c.unrecovered,
            latency: c.latency.snapshot(),
            pool_report: c.pool_report.clone(),
            lifecycle: LifecycleSnapshot::build(
                &c.lifecycle,
                [
                    c.rejects[ConversionError::AcceptShared.to_abi() as usize],
                    c.rejects[ConversionError::MustRescind.to_abi() as usize],
                    c.rejects[ConversionError::DoubleAccept.to_abi() as usize],
                ],
                inp.lifecycle,
            ),
            kernel_query_errors: inp.kernel_query_errors,
            fence: FenceStats::default(),
        }
    }
}
