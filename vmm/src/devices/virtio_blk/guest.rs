//! The device's access to guest memory ([`GuestAccess`]): every pin of shared ranges and
//! every read or write of a ring, descriptor, header, status byte or data buffer goes
//! through here, over the shared-only [`DmaMemory`] view. Callers access only ranges they
//! hold a pin on.

use std::sync::Arc;

use memconv::{DmaPin, FenceError};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use crate::devices::dma::DmaMemory;

/// A guest memory access that failed (outside RAM, or not mapped).
#[derive(Debug, thiserror::Error)]
#[error("guest memory access at {gpa:#x}+{len:#x} failed")]
pub struct GuestError {
    /// Start of the access.
    pub gpa: u64,
    /// Its length.
    pub len: u64,
}

/// Guest memory as the block device sees it.
pub struct GuestAccess {
    mem: Arc<dyn DmaMemory>,
}

impl GuestAccess {
    /// Access through `mem`.
    pub fn new(mem: Arc<dyn DmaMemory>) -> Self {
        Self { mem }
    }

    /// Pin the ranges `(gpa, len)`: Ok only if every byte is guest RAM and shared; no
    /// conversion touches them while the pin lives.
    pub fn pin(&self, ranges: &[(u64, u64)]) -> Result<DmaPin<'_>, FenceError> {
        self.mem.pin_shared(ranges)
    }

    /// The shared store, for virtio-queue's ring accesses (rings pinned first).
    pub fn memory(&self) -> &GuestMemoryMmap<()> {
        self.mem.memory()
    }

    /// Reads descriptor `index` of the table at `table`.
    pub fn descriptor(&self, table: u64, index: u16) -> Result<Descriptor, GuestError> {
        let gpa = table + u64::from(index) * 16;
        self.memory()
            .read_obj(GuestAddress(gpa))
            .map_err(|_| GuestError { gpa, len: 16 })
    }

    /// Reads `buf.len()` bytes at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestError> {
        self.memory()
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestError {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// Writes `buf` at `gpa`.
    pub fn write(&self, gpa: u64, buf: &[u8]) -> Result<(), GuestError> {
        self.memory()
            .write_slice(buf, GuestAddress(gpa))
            .map_err(|_| GuestError {
                gpa,
                len: buf.len() as u64,
            })
    }

    /// The `len` bytes at `gpa` as one slice of the shared store (for the disk's data path).
    pub fn slice(&self, gpa: u64, len: usize) -> Result<VolatileSlice<'_>, GuestError> {
        self.memory()
            .get_slice(GuestAddress(gpa), len)
            .map_err(|_| GuestError {
                gpa,
                len: len as u64,
            })
    }
}
