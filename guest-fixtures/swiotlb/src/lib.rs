//! `swiotlb`: the guest's bounce-buffer pool for DMA in a confidential-style VM, with six
//! policies behind one kernel-shaped interface ([`Policy`]): `legacy`, `dynamic`, `refill`,
//! `throttle`, `aligned-2m` and `adaptive` (DESIGN.md, "Guest pool policies" and "The
//! adaptive policy").
//!
//! `no_std` and allocation-free: the pool gets memory from the guest runtime through
//! [`Platform`] (pages, private<->shared conversion, time, waiting, vCPU index), keeps all its
//! metadata in private pages and hands out bounce buffers in shared memory. Every policy
//! reports the same statistics ([`memconv::abi::PoolReport`], see [`stats`]).
//!
//! ```text
//! let cfg = Config::parse("policy=throttle cpus=4 pool=16M")?;   // or Config::apply(cmdline, true)
//! let pool = AnyPolicy::new(&cfg, &PLATFORM)?;
//! let bounce = unsafe { pool.map(buf, len, Direction::ToDevice, /*may_block*/ true) }?;
//! ... device DMA on [bounce, bounce + len) ...
//! pool.unmap(bounce, len, Direction::ToDevice)?;
//! while pool.background_work() {}                               // worker vCPU, or between requests
//! ```
//!
//! Modules: [`platform`] (the environment trait), [`stats`], [`convert`] (checked, counted
//! conversions), [`slots`] (the kernel-style slot allocator), `pools` (ordered sets of slot
//! pools), `coherent` and `transient` (per-allocation converted memory), [`config`],
//! [`policy`] (the trait), [`error`] (the error types), [`build`] (construction by name),
//! `pooled` (what the slot-pool policies share), one module per policy, and `host` (a
//! host-memory [`Platform`] for tests and benchmarks, feature `host`). The spinlock is
//! `rtcore::sync::SpinLock`, shared with the runtime.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod adaptive;
pub mod aligned2m;
pub mod build;
mod coherent;
mod common;
pub mod config;
pub mod convert;
pub mod dynamic;
pub mod error;
pub mod legacy;
pub mod platform;
pub mod policy;
mod pooled;
mod pools;
pub mod refill;
pub mod slots;
pub mod stats;
pub mod throttle;
mod transient;

#[cfg(any(test, feature = "host"))]
pub mod host;

#[cfg(test)]
mod tests;

pub use adaptive::Adaptive;
pub use aligned2m::Aligned2m;
pub use build::AnyPolicy;
pub use config::{Config, ConfigError, PolicyKind};
pub use convert::{ConvError, Converter};
pub use dynamic::Dynamic;
pub use error::{BuildError, MapError};
pub use legacy::Legacy;
pub use platform::{ConvertError, Platform, Range};
pub use policy::{Direction, MapOpts, Policy};
pub use refill::Refill;
pub use stats::{ExtraStats, Stats};
pub use throttle::Throttle;
