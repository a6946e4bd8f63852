//! The conformance matrix: which cells exist (pool policy x store pair x host granularity x
//! workload), the `--quick` subset, `--filter`, `--shard K/N`, and the guest command line of
//! each workload.

use std::fmt;
use std::str::FromStr;

use memconv::{Granularity, StoreKind};
use serde::{Deserialize, Serialize};

/// Errors of the matrix's settings.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    /// `--shard` is not `K/N` with 1 <= K <= N.
    #[error("--shard wants K/N with 1 <= K <= N (e.g. 3/8), not {0:?}")]
    BadShard(String),
}

/// The built-in pool policies.
pub const POLICIES: [&str; 6] = [
    "legacy",
    "dynamic",
    "refill",
    "throttle",
    "aligned-2m",
    "adaptive",
];

/// The store pairs (private, shared) of the matrix.
pub const STORE_PAIRS: [(StoreKind, StoreKind); 3] = [
    (StoreKind::Memfd, StoreKind::Memfd),
    (StoreKind::Gmem, StoreKind::Hugetlb),
    (StoreKind::Hugetlb, StoreKind::Hugetlb),
];

/// Host granularities.
pub const GRANULARITIES: [Granularity; 2] = [Granularity::Page4K, Granularity::Huge2M];

/// A guest I/O workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Steady small packets: 512 B - 2 KiB requests at a modest queue depth.
    Steady,
    /// Large disk blocks: 64 KiB - 256 KiB requests.
    Large,
    /// Bursts of 64 requests of 16-256 KiB (up to 16 MiB in flight) over a 4 MiB pool.
    Burst,
    /// A ramp that adds I/O streams over time.
    Ramp,
    /// Several vCPUs issuing I/O at once.
    Smp,
}

/// Every workload, in table order.
pub const WORKLOADS: [Workload; 5] = [
    Workload::Steady,
    Workload::Large,
    Workload::Burst,
    Workload::Ramp,
    Workload::Smp,
];

impl Workload {
    /// Short name used in cell ids.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Steady => "steady",
            Workload::Large => "large",
            Workload::Burst => "burst",
            Workload::Ramp => "ramp",
            Workload::Smp => "smp",
        }
    }

    /// vCPUs the workload runs with: its I/O vCPUs plus one for the pool's background worker.
    pub fn cpus(self) -> u32 {
        match self {
            Workload::Ramp | Workload::Smp => 3,
            _ => 2,
        }
    }

    /// The io fixture's command line for this workload (policy options come separately).
    pub fn cmdline(self) -> &'static str {
        match self {
            Workload::Steady => "sizes=512-2k qd=8 rw=50 seconds=1 cpus=1 worker=1 report_ms=20",
            Workload::Large => "sizes=64k-256k qd=4 rw=50 seconds=1 cpus=1 worker=1 report_ms=20",
            Workload::Burst => {
                "sizes=16k-256k burst=64 pool=4M rw=50 seconds=1 cpus=1 worker=1 report_ms=20"
            }
            Workload::Ramp => "sizes=2k-32k qd=16 rw=50 requests=1500 cpus=2 worker=1 ramp_ms=200",
            Workload::Smp => "sizes=2k-32k qd=16 rw=50 seconds=1 cpus=2 worker=1 report_ms=20",
        }
    }
}

/// One cell of the matrix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cell {
    /// Pool policy name.
    pub policy: String,
    /// Private store.
    pub private: StoreKind,
    /// Shared store.
    pub shared: StoreKind,
    /// Host granularity.
    pub granularity: Granularity,
    /// Workload.
    pub workload: Workload,
}

impl Cell {
    /// `policy/private-shared/granularity/workload`.
    pub fn id(&self) -> String {
        format!(
            "{}/{}-{}/{}/{}",
            self.policy,
            self.private,
            self.shared,
            self.granularity,
            self.workload.name()
        )
    }

    /// Whether every `--filter` term occurs in the cell id.
    pub fn matches(&self, filters: &[String]) -> bool {
        let id = self.id();
        filters.iter().all(|f| id.contains(f.as_str()))
    }

    /// Huge pages this cell's VM may need.
    pub fn hugepages(&self, mem: u64) -> u64 {
        let per_store = mem / memconv::abi::HUGE_PAGE_SIZE;
        [self.private, self.shared]
            .iter()
            .filter(|s| **s == StoreKind::Hugetlb)
            .count() as u64
            * per_store
    }
}

impl fmt::Display for Cell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id())
    }
}

/// The full matrix for `policies`.
pub fn full(policies: &[String]) -> Vec<Cell> {
    let mut cells = Vec::new();
    for policy in policies {
        for (private, shared) in STORE_PAIRS {
            for granularity in GRANULARITIES {
                for workload in WORKLOADS {
                    cells.push(Cell {
                        policy: policy.clone(),
                        private,
                        shared,
                        granularity,
                        workload,
                    });
                }
            }
        }
    }
    cells
}

/// The `--quick` subset: every policy on the steady and burst workloads over memfd at 4k, and
/// on hugetlb/hugetlb at 2m (where the 2M-aligned policy must show zero double allocation).
pub fn quick(policies: &[String]) -> Vec<Cell> {
    full(policies)
        .into_iter()
        .filter(|c| {
            let memfd_4k = c.private == StoreKind::Memfd && c.granularity == Granularity::Page4K;
            let huge_2m = c.private == StoreKind::Hugetlb && c.granularity == Granularity::Huge2M;
            (memfd_4k && matches!(c.workload, Workload::Steady | Workload::Burst))
                || (huge_2m && c.workload == Workload::Steady)
        })
        .collect()
}

/// `--shard K/N`: this machine runs the selected cells whose position `i` has `i % N == K - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// K, 1-based.
    pub index: usize,
    /// N.
    pub count: usize,
}

impl Shard {
    /// The whole selection.
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    /// Whether the cell at position `i` of the selection is this shard's.
    pub fn has(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }
}

impl FromStr for Shard {
    type Err = MatrixError;

    fn from_str(s: &str) -> Result<Self, MatrixError> {
        let bad = || MatrixError::BadShard(s.to_string());
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies() -> Vec<String> {
        POLICIES.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn shards_partition_the_selection() {
        assert_eq!(
            "2/3".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 3 }
        );
        for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let shards: Vec<Shard> = (1..=3).map(|k| Shard { index: k, count: 3 }).collect();
        for i in 0..20 {
            assert_eq!(shards.iter().filter(|s| s.has(i)).count(), 1);
        }
        assert!((0..5).all(|i| Shard::ALL.has(i)));
    }

    #[test]
    fn full_matrix_has_every_combination_once() {
        let cells = full(&policies());
        assert_eq!(cells.len(), POLICIES.len() * 3 * 2 * 5);
        let mut ids: Vec<String> = cells.iter().map(Cell::id).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), cells.len());
        assert!(ids.contains(&"aligned-2m/hugetlb-hugetlb/2m/burst".to_string()));
    }

    #[test]
    fn quick_is_a_small_subset_and_filters_match_substrings() {
        let q = quick(&policies());
        assert_eq!(q.len(), POLICIES.len() * 3);
        let f = vec!["throttle".to_string(), "hugetlb-hugetlb".to_string()];
        let picked: Vec<_> = full(&policies())
            .into_iter()
            .filter(|c| c.matches(&f))
            .collect();
        assert_eq!(picked.len(), 2 * 5);
        assert!(picked.iter().all(|c| c.policy == "throttle"));
    }
}
