//! Devices: the [`bus`] that routes a vCPU's port and MMIO exits to the device owning the
//! address, the shared-only DMA view every device uses ([`DmaMemory`]: check with memconv
//! first, then touch the shared store), and the set of devices in the guest's MMIO window
//! (`abi::MMIO_BASE_GPA`) a VM was started with ([`Devices`]).
//!
//! Devices: the memconv [`doorbell`] port, and [`virtio_blk`] (a virtio block device over the
//! virtio-mmio transport in [`mmio`], backed by a raw disk image, its queues served by a
//! polling thread). The serial console is `crate::serial`.

pub mod bus;
pub mod doorbell;
pub mod mmio;
pub mod virtio_blk;

use std::sync::Arc;

use memconv::abi::{self, DeviceInfo};

use bus::{Bus, BusError, DeviceKind, Space};
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

    /// Puts the devices' register windows on `bus`.
    pub fn attach(&self, bus: &mut Bus) -> Result<(), BusError> {
        if let Some(blk) = &self.blk {
            bus.insert(
                Space::Mmio,
                abi::MMIO_BASE_GPA,
                DEVICE_WINDOW,
                DeviceKind::Virtio,
                blk.clone(),
            )?;
        }
        Ok(())
    }
}
