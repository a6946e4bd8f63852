//! The benchmarks (`vmm bench ...`): each prints ratios against a baseline measured in the
//! same run. `boot`, `io` and `pool` boot VMs through [`crate::run`]; `api` measures what the
//! control socket costs a converting VM.

pub mod api;
mod boot;
mod common;
mod io;
mod load;
mod pool;

pub use boot::boot;
pub use common::BenchError;
pub use io::{io, IoBenchOptions};
pub use pool::pool;

/// One benchmark with its parameters (`vmm bench ...`).
#[derive(Clone, Debug)]
pub enum Bench {
    /// `vmm bench io`.
    Io(IoBenchOptions),
    /// `vmm bench pool`.
    Pool {
        /// Milliseconds per measurement.
        ms: u64,
        /// Mapping size in bytes.
        size: u64,
    },
    /// `vmm bench boot`.
    Boot {
        /// Boots to time.
        runs: u32,
        /// Iterations of the native compute loop.
        iters: u64,
        /// Lazy boots per RAM size in the hugetlb scaling table (0: skip it).
        scaling_runs: u32,
    },
    /// `vmm bench api`.
    Api(api::ApiBenchOptions),
}

/// Runs a benchmark and returns its report.
pub fn run(bench: &Bench) -> Result<String, BenchError> {
    match bench {
        Bench::Io(opts) => io(opts),
        Bench::Pool { ms, size } => pool(*ms, *size),
        Bench::Boot {
            runs,
            iters,
            scaling_runs,
        } => boot(*runs, *iters, *scaling_runs),
        Bench::Api(opts) => Ok(api::run(opts)?),
    }
}
