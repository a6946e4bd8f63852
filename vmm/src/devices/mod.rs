//! Devices: the [`bus`] that routes a vCPU's port and MMIO exits to the device owning the
//! address, the shared-only DMA view every device uses ([`DmaMemory`]: check with memconv
//! first, then touch the shared store), and the set of devices in the guest's MMIO window
//! (`abi::MMIO_BASE_GPA`) a VM was started with ([`Devices`]).
//!
//! Devices: the memconv [`doorbell`] port, and [`virtio_blk`] (a virtio block device over the
//! virtio-mmio transport in [`mmio`], backed by a raw disk image, its queues served by a
//! polling thread). The serial console is `crate::serial`.

pub mod bus;
pub mod dma;
pub mod doorbell;
pub mod mmio;
pub mod virtio_blk;

use std::sync::Arc;

use memconv::abi::{self, DeviceInfo};

use bus::{Bus, BusError, DeviceKind, Space};

pub use dma::DmaMemory;
pub use virtio_blk::{BlkConfig, BlkStats, BlockDevice, Disk, DiskError, DiskIo};

/// Size of one device's register window in the MMIO window.
pub const DEVICE_WINDOW: u64 = 0x1000;

/// The devices of one VM's MMIO window.
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
