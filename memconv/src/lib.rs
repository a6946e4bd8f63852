//! memconv: the host-side private<->shared memory conversion service.
//!
//! `abi` is the wire contract shared with the guest and is `no_std`; everything else (stores,
//! the conversion engine, accounting) needs the `host` feature, on by default.
//!
//! [`replay_ops`] (no_std too) is the binary op stream of a replayed Linux DMA trace.
//!
//! Modules: [`store`] (the three backing stores and kernel allocation queries), [`bitmap`]
//! (per-4K attributes), [`acceptance`] (per-4K acceptance, the platform's rules, unaccepted
//! chunks cut out of the view), [`layout`] (guest view and memslot layout), [`engine`]
//! (validate, convert, accept; owns the counters), [`fence`] (device accesses and conversions
//! exclude each other: pins and the lock-free shared bitmap), [`status`] ([`ConversionError`], the typed
//! result), [`mailbox`] (the untrusted mailbox page), [`stats`] (counters, histogram, pool
//! report, snapshot, summary), [`measure`] (kernel-measured allocation), [`log_limit`] (the
//! rate limit of guest-caused log lines), [`service`] ([`ConversionService`]), [`host_vm`]
//! ([`HostVm`], what memconv needs from KVM), [`ram`] (configuration).
#![cfg_attr(not(feature = "host"), no_std)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod abi;
pub mod replay_ops;

#[cfg(feature = "host")]
pub mod acceptance;
#[cfg(feature = "host")]
pub mod bitmap;
#[cfg(feature = "host")]
pub mod engine;
#[cfg(feature = "host")]
pub mod fence;
#[cfg(feature = "host")]
pub mod host_vm;
#[cfg(feature = "host")]
pub mod layout;
#[cfg(feature = "host")]
pub mod log_limit;
#[cfg(feature = "host")]
pub mod mailbox;
#[cfg(feature = "host")]
pub mod measure;
#[cfg(feature = "host")]
pub mod ram;
#[cfg(feature = "host")]
pub mod service;
#[cfg(feature = "host")]
pub mod stats;
#[cfg(feature = "host")]
pub mod status;
#[cfg(feature = "host")]
pub mod store;

#[cfg(all(test, feature = "host"))]
mod tests;

#[cfg(feature = "host")]
pub use fence::{DmaPin, FenceError};
#[cfg(feature = "host")]
pub use host_vm::HostVm;
#[cfg(feature = "host")]
pub use ram::{Granularity, Platform, RamConfig};
#[cfg(feature = "host")]
pub use service::{ConversionService, Error, MailboxOutcome};
#[cfg(feature = "host")]
pub use stats::StatsSnapshot;
#[cfg(feature = "host")]
pub use status::ConversionError;
#[cfg(feature = "host")]
pub use store::StoreKind;
