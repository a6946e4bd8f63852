//! The virtio block device ([`BlockDevice`]), by concern: the raw disk image ([`disk`]), the
//! features and configuration space it offers ([`config`]), its access to guest memory, every
//! ring and buffer access checked shared-only through `DmaMemory` ([`guest`]), request
//! execution ([`request`]), serving the queues ([`queue`]), the polling thread with its
//! doorbell/sleep protocol ([`poller`]) and the counters ([`stats`]). This module ties them
//! together and decodes the device's register window.

pub mod config;
pub mod disk;
pub mod guest;
pub mod poller;
pub mod queue;
pub mod request;
pub mod stats;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::bus::{BusDevice, BusEffect};
use super::dma::DmaMemory;
use super::mmio::{self, Event, MmioTransport};
use config::ConfigSpace;
use guest::GuestAccess;
use poller::Wakeup;
use queue::{Core, State};
use stats::bump;

pub use config::{
    device_features, MAX_QUEUES, MAX_QUEUE_SIZE, SEG_MAX, SIZE_MAX, VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
};
pub use disk::{
    Disk, DiskError, DiskIo, FailureLog, TransferError, MAX_DISK_BYTES, MIN_DISK_BYTES, SECTOR_SIZE,
};
pub use request::{
    BLK_ID, MAX_REQUEST_BYTES, REQ_HEADER_LEN, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
};
pub use stats::BlkStats;

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;

/// Default idle spell before the poller sleeps, in microseconds.
pub const DEFAULT_IDLE_US: u64 = 2000;

/// How to build the block device.
#[derive(Clone, Debug, Serialize)]
pub struct BlkConfig {
    /// Number of request queues (1..=16); the guest driver uses one per vCPU.
    pub num_queues: usize,
    /// How long the poller keeps polling without finding work before it sleeps.
    pub idle: Duration,
}

impl Default for BlkConfig {
    fn default() -> Self {
        BlkConfig {
            num_queues: 1,
            idle: Duration::from_micros(DEFAULT_IDLE_US),
        }
    }
}

/// The virtio block device.
pub struct BlockDevice {
    core: Core,
    wakeup: Wakeup,
    idle: Duration,
    config_space: ConfigSpace,
    path: String,
    capacity: u64,
    queues: usize,
    disk_log: Arc<FailureLog>,
}

impl BlockDevice {
    /// A device over `disk`, accessing guest memory through `mem`.
    pub fn new(disk: Disk, mem: Arc<dyn DmaMemory>, cfg: &BlkConfig) -> Result<Self, DiskError> {
        if cfg.num_queues == 0 || cfg.num_queues > MAX_QUEUES {
            return Err(DiskError::Queue(format!(
                "{} queues (1..={MAX_QUEUES})",
                cfg.num_queues
            )));
        }
        let transport = MmioTransport::new(
            VIRTIO_ID_BLOCK,
            device_features(),
            cfg.num_queues,
            MAX_QUEUE_SIZE,
        )
        .map_err(|e| DiskError::Queue(e.to_string()))?;
        let capacity = disk.len();
        let path = disk.path().display().to_string();
        let disk_log = disk.failure_log();
        Ok(BlockDevice {
            core: Core::new(
                State::new(transport, disk, MAX_QUEUE_SIZE),
                GuestAccess::new(mem),
            ),
            wakeup: Wakeup::default(),
            idle: cfg.idle,
            config_space: ConfigSpace::new(capacity, cfg.num_queues),
            path,
            capacity,
            queues: cfg.num_queues,
            disk_log,
        })
    }

    /// A vCPU reads the device's register window at `offset`.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        match offset.checked_sub(mmio::reg::CONFIG) {
            Some(off) => self.config_space.read(off, data),
            None => self.core.lock().transport.read(offset, data),
        }
    }

    /// A vCPU writes the device's register window at `offset`.
    pub fn mmio_write(&self, offset: u64, data: &[u8]) {
        if offset >= mmio::reg::CONFIG {
            // The configuration space is read-only (writeback toggling is not offered).
            return;
        }
        let event = {
            let mut st = self.core.lock();
            let ev = st.transport.write(offset, data);
            if ev == Event::DriverOk && !self.core.validate_queues(&mut st) {
                st.transport.set_needs_reset();
                bump(&self.core.counters.device_faults, 1);
            }
            ev
        };
        match event {
            Event::Notify(_) => {
                bump(&self.core.counters.notifies, 1);
                self.wakeup.kick();
            }
            Event::DriverOk => self.wakeup.kick(),
            Event::Reset => bump(&self.core.counters.resets, 1),
            Event::None => {}
        }
    }

    /// Makes the poller leave its loop.
    pub fn stop(&self) {
        self.wakeup.stop();
    }

    /// A copy of the counters.
    pub fn stats(&self) -> BlkStats {
        self.core.counters.snapshot(
            &self.path,
            self.capacity,
            self.queues as u64,
            &self.disk_log,
        )
    }

    /// Starts the poller thread.
    pub fn spawn_poller(self: &Arc<Self>) -> Result<std::thread::JoinHandle<()>, DiskError> {
        let dev = Arc::clone(self);
        std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || poller::poll_loop(&dev.core, &dev.wakeup, dev.idle))
            .map_err(DiskError::Thread)
    }

    /// Starts the poller thread with a panic guard: a panic in it calls `on_panic` with the
    /// panic's text (the VMM ends the VM with it) instead of leaving the guest without its disk.
    pub fn spawn_poller_guarded(
        self: &Arc<Self>,
        on_panic: impl FnOnce(String) + Send + 'static,
    ) -> Result<std::thread::JoinHandle<()>, DiskError> {
        let dev = Arc::clone(self);
        std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || {
                let run = || poller::poll_loop(&dev.core, &dev.wakeup, dev.idle);
                if let Err(msg) = crate::panic_guard::guarded(run) {
                    on_panic(msg);
                }
            })
            .map_err(DiskError::Thread)
    }
}

impl BusDevice for BlockDevice {
    fn read(&self, _cpu: u32, offset: u64, data: &mut [u8]) -> bool {
        self.mmio_read(offset, data);
        true
    }

    fn write(&self, _cpu: u32, offset: u64, data: &[u8]) -> BusEffect {
        self.mmio_write(offset, data);
        BusEffect::None
    }
}

#[cfg(test)]
mod tests;
