//! [`Counters`]: what the engine counts under its lock (conversions by [`SizeClass`], rejects
//! by reason, mailbox traffic, failures, latency, the double-allocation integrator, the latest
//! guest pool report).

use std::time::Instant;

use super::histogram::Histogram;
use super::lifecycle::LifecycleCounters;
use super::pool_report::PoolReportSnapshot;
use crate::abi::{HUGE_PAGE_SIZE, PAGES_PER_CHUNK, PAGE_SIZE, STATUS_COUNT};
use crate::status::ConversionError;

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
    pub pool_report: Option<PoolReportSnapshot>,
    /// The acceptance lifecycle.
    pub lifecycle: LifecycleCounters,
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
            lifecycle: LifecycleCounters::default(),
            started: now,
        }
    }
}

impl Counters {
    /// Count a rejected request.
    pub fn reject(&mut self, err: ConversionError) {
        if let Some(n) = self.rejects.get_mut(err.to_abi() as usize) {
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
