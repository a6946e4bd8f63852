//! The shared-only view of guest memory every DMA-capable device uses ([`DmaMemory`]), and
//! its implementation by the conversion service.

use memconv::{AccessError, ConversionService};
use vm_memory::GuestMemoryMmap;

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
