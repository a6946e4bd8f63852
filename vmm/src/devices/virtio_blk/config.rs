//! What the block device offers the driver: its feature bits, limits, and the read-only
//! virtio-blk configuration space ([`ConfigSpace`]: capacity, size_max, seg_max, blk_size,
//! num_queues).

use super::disk::SECTOR_SIZE;
use crate::devices::mmio;

/// Feature bits offered besides VERSION_1, ACCESS_PLATFORM and EVENT_IDX.
pub const VIRTIO_BLK_F_SIZE_MAX: u32 = 1;
/// Largest number of data segments in a request.
pub const VIRTIO_BLK_F_SEG_MAX: u32 = 2;
/// blk_size is valid.
pub const VIRTIO_BLK_F_BLK_SIZE: u32 = 6;
/// FLUSH is supported.
pub const VIRTIO_BLK_F_FLUSH: u32 = 9;
/// num_queues is valid (multiqueue).
pub const VIRTIO_BLK_F_MQ: u32 = 12;

/// Largest data segment (advertised as size_max).
pub const SIZE_MAX: u32 = 1 << 20;
/// Most data segments per request (advertised as seg_max).
pub const SEG_MAX: u32 = 64;
/// Largest queue size offered.
pub const MAX_QUEUE_SIZE: u16 = 256;
/// Most queues offered.
pub const MAX_QUEUES: usize = 16;
/// Length of the configuration space we implement.
const CONFIG_LEN: usize = 64;

/// Features the device offers (VERSION_1 is added by the transport).
pub fn device_features() -> u64 {
    [
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_MQ,
        mmio::VIRTIO_RING_F_EVENT_IDX,
        mmio::VIRTIO_F_ACCESS_PLATFORM,
    ]
    .iter()
    .fold(0u64, |acc, b| acc | 1 << b)
}

/// The configuration space (read-only: writeback toggling is not offered).
pub struct ConfigSpace([u8; CONFIG_LEN]);

impl ConfigSpace {
    /// The space of a disk of `capacity` bytes with `num_queues` queues.
    pub fn new(capacity: u64, num_queues: usize) -> Self {
        let mut c = [0u8; CONFIG_LEN];
        c[0..8].copy_from_slice(&(capacity / SECTOR_SIZE).to_le_bytes());
        c[8..12].copy_from_slice(&SIZE_MAX.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[34..36].copy_from_slice(&(num_queues as u16).to_le_bytes());
        ConfigSpace(c)
    }

    /// A 1/2/4/8-byte read at `offset` into the space; other widths and offsets read 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Ok(off) = usize::try_from(offset) else {
            return;
        };
        if matches!(data.len(), 1 | 2 | 4 | 8) {
            if let Some(src) = off
                .checked_add(data.len())
                .and_then(|end| self.0.get(off..end))
            {
                data.copy_from_slice(src);
            }
        }
    }
}
