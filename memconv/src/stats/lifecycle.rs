//! The acceptance lifecycle's figures: [`LifecycleCounters`] (kept by the engine with its other
//! counters) and [`LifecycleSnapshot`] (the `lifecycle` object of the statistics JSON).

use serde::{Deserialize, Serialize};

use crate::ram::Platform;

/// What the engine counts about acceptance.
#[derive(Clone, Debug, Default)]
pub struct LifecycleCounters {
    /// Pages accepted by the guest, in total (a page accepted again after a round trip counts
    /// again).
    pub accepted_pages: u64,
    /// Rescind entries (SNP PVALIDATE validate=0).
    pub rescind_entries: u64,
    /// Pages whose acceptance was rescinded.
    pub rescinded_pages: u64,
    /// Pages whose acceptance a conversion to shared dropped (TDX).
    pub dropped_pages: u64,
    /// 2 MiB private chunks backed at ACCEPT (lazy hugetlb).
    pub backed_chunks: u64,
    /// 2 MiB private chunks released when they became unaccepted.
    pub released_chunks: u64,
    /// Guest accesses to unaccepted memory (each stops the VM).
    pub unaccepted_accesses: u64,
    /// GPA of the first such access.
    pub unaccepted_access_gpa: Option<u64>,
}

/// The acceptance lifecycle in a statistics snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LifecycleSnapshot {
    /// The platform modelled.
    pub platform: Platform,
    /// Private RAM backed eagerly at start (`--prealloc`).
    pub prealloc: bool,
    /// Bytes accepted now (boot area and image included).
    pub accepted_bytes: u64,
    /// 2 MiB chunks cut out of the guest's view now (private, nothing accepted).
    pub unaccepted_chunks: u64,
    /// Most the private store may hold now (lazy): nothing for unaccepted chunks; a hugetlb
    /// store 2 MiB per other chunk holding private pages (an accepted page needs its whole
    /// huge page; a mixed chunk keeps one), a 4 KiB store its private pages outside unaccepted
    /// chunks. With `prealloc`, all private RAM.
    pub private_backing_bound_bytes: u64,
    /// Pages accepted by the guest, in total.
    pub accepted_pages: u64,
    /// Rescind entries.
    pub rescind_entries: u64,
    /// Pages rescinded.
    pub rescinded_pages: u64,
    /// Pages whose acceptance a conversion to shared dropped (TDX).
    pub dropped_pages: u64,
    /// Chunks backed at ACCEPT.
    pub backed_chunks: u64,
    /// Chunks released when they became unaccepted.
    pub released_chunks: u64,
    /// ACCEPTs refused because they covered shared memory (`accept_shared`).
    pub accept_shared_refusals: u64,
    /// Conversions to shared refused because a page was still validated (`must_rescind`).
    pub must_rescind_refusals: u64,
    /// Double accepts / double validations.
    pub double_accepts: u64,
    /// Guest accesses to unaccepted memory.
    pub unaccepted_accesses: u64,
    /// GPA of the first access to unaccepted memory.
    pub unaccepted_access_gpa: Option<u64>,
}

/// Figures for the snapshot measured outside the counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct LifecycleInputs {
    /// The platform.
    pub platform: Platform,
    /// Eager backing.
    pub prealloc: bool,
    /// Bytes accepted now.
    pub accepted_bytes: u64,
    /// Chunks cut out now.
    pub unaccepted_chunks: u64,
    /// Most the private store may hold: see [`LifecycleSnapshot::private_backing_bound_bytes`].
    pub private_backing_bound_bytes: u64,
}

impl LifecycleSnapshot {
    /// Assemble from the counters, the refusal counts and the inputs.
    pub fn build(
        c: &LifecycleCounters,
        refusals: [u64; 3],
        inp: LifecycleInputs,
    ) -> LifecycleSnapshot {
        let [accept_shared, must_rescind, double] = refusals;
        LifecycleSnapshot {
            platform: inp.platform,
            prealloc: inp.prealloc,
            accepted_bytes: inp.accepted_bytes,
            unaccepted_chunks: inp.unaccepted_chunks,
            private_backing_bound_bytes: inp.private_backing_bound_bytes,
            accepted_pages: c.accepted_pages,
            rescind_entries: c.rescind_entries,
            rescinded_pages: c.rescinded_pages,
            dropped_pages: c.dropped_pages,
            backed_chunks: c.backed_chunks,
            released_chunks: c.released_chunks,
            accept_shared_refusals: accept_shared,
            must_rescind_refusals: must_rescind,
            double_accepts: double,
            unaccepted_accesses: c.unaccepted_accesses,
            unaccepted_access_gpa: c.unaccepted_access_gpa,
        }
    }
}
