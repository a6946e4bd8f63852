//! The shared-only view of guest memory every DMA-capable device uses ([`DmaMemory`]), and
//! its implementation by the conversion service.

use memconv::{ConversionService, DmaPin, FenceError};
use vm_memory::GuestMemoryMmap;

/// Guest memory as a device may see it: only pages the guest has shared, and only under a pin.
///
/// Every access a device makes to guest memory happens while it holds a [`DmaPin`] from
/// `pin_shared` covering exactly the bytes it touches, and goes through `memory()` (the
/// shared store). While the pin lives no conversion of those pages runs; after a conversion
/// to private returns no pin succeeds on them (memconv's `fence` module). A device never
/// waits for a vCPU while it holds a pin: on `Busy` it lets go of its pins and retries.
pub trait DmaMemory: Send + Sync {
    /// Pin every range `(gpa, len)`: Ok only if every byte is guest RAM and shared.
    fn pin_shared(&self, ranges: &[(u64, u64)]) -> Result<DmaPin<'_>, FenceError>;
    /// The shared store, GPA 0..RAM size.
    fn memory(&self) -> &GuestMemoryMmap<()>;
}

impl DmaMemory for ConversionService {
    fn pin_shared(&self, ranges: &[(u64, u64)]) -> Result<DmaPin<'_>, FenceError> {
        ConversionService::pin_shared(self, ranges)
    }

    fn memory(&self) -> &GuestMemoryMmap<()> {
        self.shared_memory()
    }
}
