//! `rtcore`: the pure, host-testable parts of the guest runtime, in a crate of their own so
//! that crates with host unit tests (swiotlb, the workload logic) can use them without linking
//! the bare-metal `rt` (its `_start`, memory functions and panic handler would clash with the
//! host's): spinning synchronisation ([`sync`]: [`sync::SpinLock`], [`sync::Once`]) and
//! command-line parsing ([`cmdline`]) and the adaptive spin-then-halt budget ([`budget`]). `rt` re-exports both as `rt::sync` and `rt::cmdline`.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod budget;
pub mod cmdline;
pub mod sync;
