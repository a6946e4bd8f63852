//! The benchmarks (`vmm bench ...`): each prints ratios against a baseline measured in the
//! same run. `boot`, `io` and `pool` boot VMs through [`crate::run`]; `api` measures what the
//! control socket costs a converting VM.

pub mod api;
mod boot;
mod common;
mod io;
mod pool;

pub use boot::boot;
pub use common::BenchError;
pub use io::io;
pub use pool::pool;
