//! `virtio`: the guest's virtio block driver, `no_std` and host-testable.
//!
//! - [`ring`]: the driver side of a split virtqueue over shared memory (descriptor free list
//!   kept in private memory, never trusting what the device writes; notification suppression
//!   with VIRTIO_RING_F_EVENT_IDX or the used-ring flags).
//! - [`mmio`]: the virtio-mmio register layout and the register access trait [`mmio::Regs`].
//! - [`blk`]: device discovery and initialisation, and per-queue block requests whose data is
//!   bounced through a DMA pool ([`Dma`]): map before submit, unmap after completion, both
//!   by the driver (a caller that must map without holding its queue gets a
//!   [`blk::Mapping`] from the driver and hands it back with the request).
//!
//! Addresses are guest physical addresses, which are also pointers (identity map); host tests
//! use heap memory whose addresses play the part.
//!
//! # Doorbells
//! The device (see the VMM's `devices::virtio_blk`) polls the available ring from a host
//! thread and only asks for a notification (an MMIO exit, ~76 us) when it is about to sleep:
//! [`blk::BlkQueue::kick`] writes QueueNotify only when the device's `avail_event` (or the
//! used-ring NO_NOTIFY flag) says so. Completions are found by polling the used ring: there
//! are no interrupts.
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod blk;
pub mod mmio;
pub mod ring;

use core::fmt;

/// DMA direction of a data buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// The device reads the buffer (a disk write).
    ToDevice,
    /// The device writes the buffer (a disk read).
    FromDevice,
}

/// Why a DMA pool call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaError {
    /// No room now; completing in-flight requests may make room.
    Full,
    /// The host refused to convert memory for the pool, with its status code (a
    /// `memconv::abi` `ERR_*` number; shown by name).
    Conversion(u32),
    /// Any other failure, with a short reason.
    Failed(&'static str),
}

impl fmt::Display for DmaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DmaError::Full => f.write_str("DMA pool full"),
            DmaError::Conversion(code) => write!(
                f,
                "DMA pool: conversion failed: {}",
                memconv::abi::status_name(*code)
            ),
            DmaError::Failed(why) => write!(f, "DMA pool: {why}"),
        }
    }
}

/// The DMA API the driver uses: shared coherent memory for rings, bounce mappings for data.
pub trait Dma {
    /// `len` bytes of zeroed, shared, page-aligned memory the device may access for as long as
    /// the queue lives.
    fn alloc_coherent(&self, len: usize) -> Result<u64, DmaError>;

    /// Give back [`Dma::alloc_coherent`] memory.
    fn free_coherent(&self, addr: u64, len: usize) -> Result<(), DmaError>;

    /// Map `[buf, buf + len)` for the device; returns the address to hand the device (a bounce
    /// buffer in shared memory; copied from `buf` for [`Dir::ToDevice`]).
    ///
    /// # Safety
    /// `[buf, buf + len)` is memory the caller owns and does not touch until the unmap.
    unsafe fn map(&self, buf: u64, len: usize, dir: Dir) -> Result<u64, DmaError>;

    /// End a mapping (copies back to the original buffer for [`Dir::FromDevice`]).
    fn unmap(&self, dma: u64, len: usize, dir: Dir) -> Result<(), DmaError>;
}
