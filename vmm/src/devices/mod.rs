//! Devices in the guest's MMIO window (`abi::MMIO_BASE_GPA`): the bus that routes a vCPU's
//! MMIO exit to the device owning the address, the shared-only DMA view every device uses
//! ([`DmaMemory`]: check with memconv first, then touch the shared store), and the set of
//! devices a VM was started with ([`Devices`]).
//!
//! Devices: [`virtio_blk`] (a virtio block device over the virtio-mmio transport in [`mmio`],
//! backed by a raw disk image, its queues served by a polling thread).

pub mod mmio;
pub mod virtio_blk;

use std::sync::Arc;

use memconv::abi::{self, DeviceInfo};
use memconv::{AccessError, ConversionService};
use vm_memory::GuestMemoryMmap;

pub use virtio_blk::{BlkConfig, BlkStats, BlockDevice, Disk, DiskError};

/// Size of one device's register window in the MMIO window.
pub const DEVICE_WINDOW: u64 = 0x1000;

/// Guest memory as a device may see it: only pages the guest has shared.
///
/// Every access a device makes to guest memory is preceded by `check_shared` on exactly the
/// bytes it touches, and then goes through `memory()` (the shared store). A guest that
/// converts a page between the check and the access only ever exposes shared-store content
/// (never private data) to the device.
pub trait DmaMemory: Send + Sync {
    /// Ok only if every byte of `[gpa, gpa + len)` is guest RAM and shared.
    fn check_shared(&self, gpa: u64, len: u64) -> Result<(), AccessError>;
    /// The shared store, GPA 0..RAM size.
    fn memory(&self) -> &GuestMemoryMmap<()>;
}

impl DmaMemory for ConversionService {
    fn check_shared(&self, gpa: u64, len: u64) -> Result<(), AccessError> {
        ConversionService::check_shared(self, gpa, len)
    }

    fn memory(&self) -> &GuestMemoryMmap<()> {
        self.shared_memory()
    }
}

/// The devices of one VM and the MMIO routing to them.
#[derive(Default)]
pub struct Devices {
    blk: Option<Arc<BlockDevice>>,
}

impl Devices {
    /// No devices.
    pub fn none() -> Self {
        Self::default()
    }

    /// The virtio block device at `abi::MMIO_BASE_GPA`.
    pub fn with_block(blk: Arc<BlockDevice>) -> Self {
        Devices { blk: Some(blk) }
    }

    /// The block device, if any.
    pub fn block(&self) -> Option<&Arc<BlockDevice>> {
        self.blk.as_ref()
    }

    /// What the boot-info page lists.
    pub fn infos(&self) -> Vec<DeviceInfo> {
        self.blk
            .iter()
            .map(|_| DeviceInfo {
                kind: abi::DEVICE_VIRTIO_MMIO,
                id: virtio_blk::VIRTIO_ID_BLOCK,
                mmio_gpa: abi::MMIO_BASE_GPA,
                mmio_len: DEVICE_WINDOW,
            })
            .collect()
    }

    fn route(&self, addr: u64) -> Option<(&BlockDevice, u64)> {
        let blk = self.blk.as_deref()?;
        let off = addr.checked_sub(abi::MMIO_BASE_GPA)?;
        (off < DEVICE_WINDOW).then_some((blk, off))
    }

    /// A vCPU read `data.len()` bytes at `addr`; false if no device owns it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.route(addr) {
            Some((dev, off)) => {
                dev.mmio_read(off, data);
                true
            }
            None => false,
        }
    }

    /// A vCPU wrote `data` at `addr`; false if no device owns it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.route(addr) {
            Some((dev, off)) => {
                dev.mmio_write(off, data);
                true
            }
            None => false,
        }
    }
}
