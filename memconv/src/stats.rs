//! Counters, the latency histogram, the double-allocation integrator and the serializable
//! statistics snapshot (with its human-readable table).
//!
//! The snapshot types are also `Deserialize` so readers of the JSON (`vmm ctl`, the
//! `--stats-json` consumers) use them directly: every field defaults when absent, so replies
//! of older or newer writers (fields are only ever added) still parse.
//!
//! # Double allocation
//!
//! "Double allocated" = guest pages whose backing is allocated in both stores. The engine
//! cannot know which pages the guest has touched, so its *computed* figure is what the engine
//! has left allocated on a side that no longer owns those pages: for every 2 MiB chunk whose
//! hugetlb page on side S could not be punched because S still owns a page there, the pages of
//! that chunk owned by the other side. 4 KiB stores are always punched exactly, so they never
//! contribute. This is an upper bound of the kernel's figure, and equals it once the guest has
//! touched every page it owns (then the other side's pages of such a chunk are allocated too).
//! The *kernel* figure is measured in [`crate::ConversionService::stats`] per page from the
//! files themselves (shmem: SEEK_DATA/SEEK_HOLE; guest_memfd: mincore of its mapping; hugetlb:
//! mincore of the mappings of the file, since SEEK_DATA does not see hugetlbfs holes).

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::abi::{self, PoolReport, HUGE_PAGE_SIZE, PAGES_PER_CHUNK, PAGE_SIZE, STATUS_COUNT};
use crate::ram::Granularity;
use crate::store::StoreKind;

/// Size class of a conversion request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeClass {
    /// Exactly one 4 KiB page.
    Page4K = 0,
    /// Anything that is not one page and not 2 MiB aligned and sized.
    Sub2M = 1,
    /// 2 MiB aligned, a multiple of 2 MiB.
    Huge2M = 2,
}

impl SizeClass {
    /// Classify `(gpa, npages)`.
    pub fn of(gpa: u64, npages: u64) -> SizeClass {
        if npages == 1 {
            SizeClass::Page4K
        } else if gpa.is_multiple_of(HUGE_PAGE_SIZE) && npages.is_multiple_of(PAGES_PER_CHUNK) {
            SizeClass::Huge2M
        } else {
            SizeClass::Sub2M
        }
    }
}

/// Log2 histogram of nanoseconds: bucket `b` counts values in `[2^(b-1), 2^b)` (bucket 0: 0).
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: [u64; 65],
    count: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; 65],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
}

impl Histogram {
    /// Record one value.
    pub fn record(&mut self, ns: u64) {
        let b = (64 - ns.leading_zeros()) as usize;
        self.buckets[b] += 1;
        self.count += 1;
        self.sum += ns as u128;
        self.max = self.max.max(ns);
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            acc += n;
            if acc >= target {
                return if b == 0 {
                    0
                } else {
                    (1u64 << (b - 1)).saturating_mul(2)
                };
            }
        }
        self.max
    }

    fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            count: self.count,
            mean_ns: if self.count == 0 {
                0
            } else {
                (self.sum / self.count as u128) as u64
            },
            max_ns: self.max,
            p50_ns_le: self.quantile(0.5),
            p99_ns_le: self.quantile(0.99),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, n)| **n != 0)
                .map(|(b, n)| LatencyBucket {
                    lt_ns: if b == 0 {
                        1
                    } else {
                        1u64.checked_shl(b as u32).unwrap_or(u64::MAX)
                    },
                    count: *n,
                })
                .collect(),
        }
    }
}

/// The engine's counters (kept under the engine lock).
#[derive(Clone, Debug)]
pub struct Counters {
    /// Successful conversions to shared by size class.
    pub to_shared: [u64; 3],
    /// Successful conversions to private by size class.
    pub to_private: [u64; 3],
    /// Pages whose attribute changed.
    pub pages_converted: u64,
    /// Pages already in the requested state.
    pub noop_pages: u64,
    /// Rejected requests per status code.
    pub rejects: [u64; STATUS_COUNT],
    /// Successful ACCEPT entries.
    pub accept_entries: u64,
    /// 2 MiB units accepted.
    pub accepted_units: u64,
    /// Mailbox doorbells serviced.
    pub doorbells: u64,
    /// Ranges (convert/accept entries) carried by doorbells.
    pub mailbox_ranges: u64,
    /// Conversions through the KVM_HC_MAP_GPA_RANGE path.
    pub hypercalls: u64,
    /// Mailboxes rejected whole (bad header).
    pub bad_mailboxes: u64,
    /// OP_EXIT requests.
    pub exits: u64,
    /// OP_REPORT requests accepted.
    pub reports: u64,
    /// pause_vcpus calls.
    pub vcpu_pauses: u64,
    /// Punches of the old side that failed (memory not released, state consistent).
    pub punch_failures: u64,
    /// Operations that failed midway and could not be fully rolled back.
    pub unrecovered: u64,
    /// Conversion latency.
    pub latency: Histogram,
    /// Peak mixed chunks.
    pub mixed_peak: u64,
    /// Computed double-allocated pages now.
    pub dbl_pages: u64,
    /// Peak of `dbl_pages`.
    pub dbl_peak_pages: u64,
    dbl_page_ns: u128,
    dbl_since: Instant,
    /// Latest guest pool report.
    pub pool_report: Option<PoolReport>,
    /// Service start.
    pub started: Instant,
}

impl Default for Counters {
    fn default() -> Self {
        let now = Instant::now();
        Counters {
            to_shared: [0; 3],
            to_private: [0; 3],
            pages_converted: 0,
            noop_pages: 0,
            rejects: [0; STATUS_COUNT],
            accept_entries: 0,
            accepted_units: 0,
            doorbells: 0,
            mailbox_ranges: 0,
            hypercalls: 0,
            bad_mailboxes: 0,
            exits: 0,
            reports: 0,
            vcpu_pauses: 0,
            punch_failures: 0,
            unrecovered: 0,
            latency: Histogram::default(),
            mixed_peak: 0,
            dbl_pages: 0,
            dbl_peak_pages: 0,
            dbl_page_ns: 0,
            dbl_since: now,
            pool_report: None,
            started: now,
        }
    }
}

impl Counters {
    /// Count a rejected request.
    pub fn reject(&mut self, code: u32) {
        if let Some(n) = self.rejects.get_mut(code as usize) {
            *n += 1;
        }
    }

    /// Set the computed double-allocated page count, integrating the previous value.
    pub fn set_dbl_pages(&mut self, pages: u64) {
        if pages == self.dbl_pages {
            return;
        }
        let now = Instant::now();
        self.integrate(now);
        self.dbl_pages = pages;
        self.dbl_peak_pages = self.dbl_peak_pages.max(pages);
    }

    fn integrate(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.dbl_since).as_nanos();
        self.dbl_page_ns += dt * self.dbl_pages as u128;
        self.dbl_since = now;
    }

    /// Byte-seconds of computed double allocation up to now.
    pub fn dbl_byte_seconds(&mut self) -> f64 {
        self.integrate(Instant::now());
        self.dbl_page_ns as f64 * PAGE_SIZE as f64 / 1e9
    }
}

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

/// One histogram bucket.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LatencyBucket {
    /// Values below this (and at least half of it).
    pub lt_ns: u64,
    /// How many.
    pub count: u64,
}

/// Conversion latency summary.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LatencySnapshot {
    /// Conversions timed.
    pub count: u64,
    /// Mean.
    pub mean_ns: u64,
    /// Max.
    pub max_ns: u64,
    /// Upper bound of the median's bucket.
    pub p50_ns_le: u64,
    /// Upper bound of the 99th percentile's bucket.
    pub p99_ns_le: u64,
    /// Non-empty log2 buckets.
    pub buckets: Vec<LatencyBucket>,
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

/// The guest's latest pool report, decoded.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PoolReportSnapshot {
    /// Policy name.
    pub policy: String,
    /// Bytes mapped now.
    pub used_bytes: u64,
    /// Peak used.
    pub high_water_bytes: u64,
    /// Pool capacity.
    pub capacity_bytes: u64,
    /// Successful maps.
    pub maps: u64,
    /// Failed maps.
    pub map_failures: u64,
    /// Throttle waits.
    pub throttle_waits: u64,
    /// Throttle wait time.
    pub throttle_wait_ns: u64,
    /// 4K conversions issued.
    pub conversions_4k: u64,
    /// 2M conversions issued.
    pub conversions_2m: u64,
    /// Other conversions issued.
    pub conversions_other: u64,
    /// Bytes shared now.
    pub shared_bytes: u64,
    /// Peak bytes shared.
    pub shared_peak_bytes: u64,
    /// Transient buffers.
    pub transient_maps: u64,
    /// Growth steps.
    pub grow_events: u64,
    /// Shrink steps.
    pub shrink_events: u64,
    /// I/O requests completed.
    pub io_requests: u64,
    /// I/O errors.
    pub io_errors: u64,
    /// The policy claims every conversion it issues is 2 MiB aligned and sized.
    pub claims_2m: bool,
}

impl From<&PoolReport> for PoolReportSnapshot {
    fn from(r: &PoolReport) -> Self {
        let n = (r.policy_len as usize).min(abi::POLICY_NAME_MAX);
        let policy: String = r.policy[..n]
            .iter()
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    *b as char
                } else {
                    '?'
                }
            })
            .collect();
        PoolReportSnapshot {
            policy,
            used_bytes: r.used_bytes,
            high_water_bytes: r.high_water_bytes,
            capacity_bytes: r.capacity_bytes,
            maps: r.maps,
            map_failures: r.map_failures,
            throttle_waits: r.throttle_waits,
            throttle_wait_ns: r.throttle_wait_ns,
            conversions_4k: r.conversions_4k,
            conversions_2m: r.conversions_2m,
            conversions_other: r.conversions_other,
            shared_bytes: r.shared_bytes,
            shared_peak_bytes: r.shared_peak_bytes,
            transient_maps: r.transient_maps,
            grow_events: r.grow_events,
            shrink_events: r.shrink_events,
            io_requests: r.io_requests,
            io_errors: r.io_errors,
            claims_2m: r.flags & abi::POOL_FLAG_CLAIMS_2M != 0,
        }
    }
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
    /// 2 MiB units accepted.
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
    /// Kernel query errors, if any (figures may be incomplete).
    pub kernel_query_errors: Vec<String>,
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
            kernel_query_errors: Vec::new(),
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
        let rejects: Vec<RejectCount> = (1..STATUS_COUNT as u32)
            .map(|code| RejectCount {
                code,
                name: Cow::Borrowed(abi::status_name(code)),
                count: c.rejects[code as usize],
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
            double_accept_violations: c.rejects[abi::ERR_DOUBLE_ACCEPT as usize],
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
            pool_report: c.pool_report.as_ref().map(PoolReportSnapshot::from),
            kernel_query_errors: inp.kernel_query_errors,
        }
    }

    /// A readable multi-line table.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        let _ = writeln!(
            s,
            "memconv: {} MiB RAM, private={} shared={} granularity={}, up {:.1} s",
            self.ram_bytes >> 20,
            self.private_store.kind,
            self.shared_store.kind,
            self.granularity,
            self.uptime_ms as f64 / 1000.0
        );
        let _ = writeln!(
            s,
            "  conversions        {:>10} {:>10} {:>10} {:>10}",
            "4k", "sub2m", "2m", "total"
        );
        for (name, c) in [
            ("to_shared", &self.to_shared),
            ("to_private", &self.to_private),
        ] {
            let _ = writeln!(
                s,
                "    {:<16} {:>10} {:>10} {:>10} {:>10}",
                name,
                c.k4,
                c.sub2m,
                c.m2,
                c.total()
            );
        }
        let _ = writeln!(
            s,
            "  pages converted {} (no-op {}), accepts {} entries / {} units, double-accept violations {}",
            self.pages_converted,
            self.noop_pages,
            self.accept_entries,
            self.accepted_units,
            self.double_accept_violations
        );
        let _ = writeln!(
            s,
            "  doorbells {} carrying {} ranges ({:.2} ranges/exit), hypercalls {}, bad mailboxes {}",
            self.doorbells, self.mailbox_ranges, self.ranges_per_exit, self.hypercalls, self.bad_mailboxes
        );
        let _ = writeln!(
            s,
            "  rejects {}{}",
            self.rejects_total,
            self.rejects_by_reason()
        );
        let _ = writeln!(
            s,
            "  store      {:>8} {:>12} {:>12} {:>12} {:>12}",
            "kind", "owned MiB", "bound MiB", "kernel MiB", "resident MiB"
        );
        for (name, u) in [
            ("private", &self.private_store),
            ("shared", &self.shared_store),
        ] {
            let _ = writeln!(
                s,
                "    {:<8} {:>8} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
                name,
                u.kind.as_str(),
                mib(u.owned_bytes),
                mib(u.engine_bound_bytes),
                mib(u.kernel_bytes),
                mib(u.kernel_resident_bytes)
            );
        }
        let d = &self.double_alloc;
        let _ = writeln!(
            s,
            "  double allocation: computed {:.1} MiB (peak {:.1} MiB, {:.1} MiB*s), kernel {:.1} MiB, agree={} within_bound={}",
            mib(d.computed_bytes),
            mib(d.computed_peak_bytes),
            d.computed_byte_seconds / (1u64 << 20) as f64,
            mib(d.kernel_bytes),
            d.agree,
            d.kernel_within_bound
        );
        let _ = writeln!(
            s,
            "  mixed chunks {} (peak {}), memslots {} ({} edits), vcpu pauses {}, punch failures {}, unrecovered {}",
            self.mixed_chunks,
            self.mixed_chunks_peak,
            self.memslots,
            self.memslot_edits,
            self.vcpu_pauses,
            self.punch_failures,
            self.unrecovered_failures
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "  latency: n={} mean={} ns p50<={} ns p99<={} ns max={} ns",
            l.count, l.mean_ns, l.p50_ns_le, l.p99_ns_le, l.max_ns
        );
        if let Some(p) = &self.pool_report {
            let _ = writeln!(
                s,
                "  guest pool '{}': used {} / cap {} (hw {}), maps {} failures {}, waits {}, shared {} (peak {})",
                p.policy,
                p.used_bytes,
                p.capacity_bytes,
                p.high_water_bytes,
                p.maps,
                p.map_failures,
                p.throttle_waits,
                p.shared_bytes,
                p.shared_peak_bytes
            );
        }
        for e in &self.kernel_query_errors {
            let _ = writeln!(s, "  kernel query error: {e}");
        }
        s
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}
