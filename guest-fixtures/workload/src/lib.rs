//! `workload`: what the guest workloads share that needs no bare-metal runtime, so it is
//! host-testable (`cargo test -p workload`): [`dma`] (a [`swiotlb::Policy`] as the virtio
//! driver's [`virtio::Dma`], usable by every workload and every plug-in policy) and
//! [`io_options`] (the io workload's command-line options, parsed and checked) and [`keys`]
//! (the keys every embedded fixture declares, which the host checks a command line against).
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod dma;
pub mod io_options;
pub mod keys;
