//! Statistics: the engine's counters ([`counters`]), the latency histogram ([`histogram`]),
//! the guest pool report ([`pool_report`]), the acceptance lifecycle ([`lifecycle`]), the
//! serializable snapshot ([`snapshot`]) and its human-readable table
//! ([`StatsSnapshot::summary`]), in the one unit convention of every human-readable view
//! ([`units`]). The kernel figures are measured in `crate::measure`.
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
//! The *kernel* figure is measured (`crate::measure`, for [`crate::ConversionService::stats`]) per page from the
//! files themselves (shmem: SEEK_DATA/SEEK_HOLE; guest_memfd: mincore of its mapping; hugetlb:
//! mincore of the mappings of the file, since SEEK_DATA does not see hugetlbfs holes).

pub mod counters;
pub mod histogram;
pub mod lifecycle;
pub mod pool_report;
pub mod snapshot;
mod summary;
pub mod units;

pub use counters::{Counters, SizeClass};
pub use histogram::{Histogram, LatencyBucket, LatencySnapshot};
pub use lifecycle::{LifecycleCounters, LifecycleInputs, LifecycleSnapshot};
pub use pool_report::PoolReportSnapshot;
pub use snapshot::{
    DoubleAlloc, RejectCount, SizeCounts, SnapshotInputs, StatsSnapshot, StoreUsage,
};
