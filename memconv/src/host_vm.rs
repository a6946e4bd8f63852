//! [`HostVm`]: the narrow trait through which memconv reaches KVM (memslot edits, guest_memfd
//! creation, pausing vCPUs). The VMM implements it; tests implement it without a VM.

/// What memconv needs from KVM; implemented by the VMM.
///
/// memconv uses memslot ids `0..layout::MAX_MEMSLOTS`. `pause_vcpus` may be called from a vCPU
/// thread while other vCPU threads are blocked inside memconv (waiting for its lock, outside
/// KVM_RUN): such vCPUs must count as paused without having to acknowledge, or the pause
/// deadlocks.
pub trait HostVm: Send + Sync {
    /// Install KVM memslot `slot` mapping [gpa, gpa+size) to host address `host_addr`; size == 0 deletes the slot.
    fn set_memslot(&self, slot: u32, gpa: u64, size: u64, host_addr: u64) -> std::io::Result<()>;
    /// Create a KVM guest_memfd of `size` bytes with `flags` (KVM_CREATE_GUEST_MEMFD).
    fn create_guest_memfd(&self, size: u64, flags: u64) -> std::io::Result<std::os::fd::OwnedFd>;
    /// Return once no vCPU other than the calling thread's runs guest code; they stay out until resume_vcpus.
    fn pause_vcpus(&self);
    /// Let paused vCPUs run again.
    fn resume_vcpus(&self);
}
