//! Every process exit status the `vmm` binary uses, in one place, and the mapping from a VM's
//! end reason to the status of `vmm run`. Depends only on [`VmEnd`], so the CLI, the run, the
//! control socket and the conformance suite can all use it without depending on each other.

use crate::vcpu::VmEnd;

/// Success (`vmm run`: the guest exited with 0 or the host stopped it).
pub const EXIT_OK: u8 = 0;
/// `vmm conform`: an invariant failed; `vmm ctl`: the VMM refused the command or the
/// connection broke.
pub const EXIT_FAILURE: u8 = 1;
/// Errors the user must fix (bad flags, missing KVM, bad guest image, no VMM at a socket...).
pub const EXIT_USAGE: u8 = 2;
/// `vmm run`: a vCPU crashed or KVM failed.
pub const EXIT_VM_CRASHED: u8 = 70;
/// `vmm run`: every vCPU halted for good.
pub const EXIT_ALL_HALTED: u8 = 71;

/// `vmm run`: the guest touched memory it had not accepted; the VM was stopped.
pub const EXIT_UNACCEPTED_ACCESS: u8 = 72;

/// The exit status `vmm run` uses for an end reason: the guest's own code (saturated to 255),
/// [`EXIT_VM_CRASHED`], [`EXIT_ALL_HALTED`], [`EXIT_UNACCEPTED_ACCESS`], [`EXIT_OK`] when the
/// host stopped it, or 128 + the signal's number when a stop signal did.
pub fn exit_status(end: &VmEnd) -> u8 {
    match end {
        VmEnd::GuestExit { code, .. } => u8::try_from(*code).unwrap_or(u8::MAX),
        VmEnd::Crash { .. } | VmEnd::HostError { .. } | VmEnd::DeviceFailed { .. } => {
            EXIT_VM_CRASHED
        }
        VmEnd::AllHalted => EXIT_ALL_HALTED,
        VmEnd::UnacceptedAccess { .. } => EXIT_UNACCEPTED_ACCESS,
        VmEnd::Stopped => EXIT_OK,
        VmEnd::Signal { number, .. } => u8::try_from(128 + number).unwrap_or(u8::MAX),
    }
}
