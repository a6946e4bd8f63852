//! Execution mode: detecting kvm_pvm (the paravirtual, shadow-paging KVM of these hosts) and
//! switching a vCPU to native execution on it. On a VMX/SVM host guests run natively anyway
//! and these MSRs are never written.
//!
//! The recipe (measured on the development hosts): KVM_GET_MSRS of `MSR_PVM_SIGNATURE` returns
//! "PVM" on a kvm_pvm host; writing `MSR_PVM_NATIVE_PAGE` = GPA of a spare guest page | 0x400
//! before the first KVM_RUN makes the vCPU run at hardware speed, provided every page-table
//! level has U/S=1 and the guest is in 64-bit long mode. Each vCPU needs its own spare page.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;
use memconv::abi;

use crate::config::ExecMode;

/// Reads "PVM" (0x4d5650) on a kvm_pvm host.
pub const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
/// Takes the GPA of a spare guest page | `NATIVE_ENABLE` to switch the vCPU to native mode.
pub const MSR_PVM_NATIVE_PAGE: u32 = 0x4b56_4d10;
/// Value of `MSR_PVM_SIGNATURE` on kvm_pvm.
pub const PVM_SIGNATURE: u64 = 0x4d_5650;
/// Enable bit in `MSR_PVM_NATIVE_PAGE`.
pub const NATIVE_ENABLE: u64 = 0x400;

/// Errors while choosing or entering an execution mode.
#[derive(Debug, thiserror::Error)]
pub enum PvmError {
    /// Emulated mode asked for on a host that has no way to force it.
    #[error(
        "--exec emulated needs a kvm_pvm host (this KVM runs guests on VMX/SVM hardware, \
         which cannot be switched to the instruction emulator)"
    )]
    EmulationUnavailable,
    /// Building the MSR list failed.
    #[error("cannot build the MSR list: {0}")]
    MsrList(String),
    /// KVM_SET_MSRS failed or wrote nothing.
    #[error("enabling native mode on vCPU {cpu} failed: {reason}")]
    Enable {
        /// The vCPU.
        cpu: u32,
        /// What failed.
        reason: String,
    },
}

/// What kind of KVM host this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKind {
    /// kvm_pvm: emulated unless native mode is enabled per vCPU.
    Pvm,
    /// A hardware-virtualization KVM (VMX/SVM): always native.
    Hardware,
}

fn msrs(entries: &[kvm_msr_entry]) -> Result<Msrs, PvmError> {
    Msrs::from_entries(entries).map_err(|e| PvmError::MsrList(format!("{e:?}")))
}

/// Detects kvm_pvm by reading its signature MSR on a fresh vCPU.
pub fn detect(vcpu: &VcpuFd) -> HostKind {
    let Ok(mut list) = msrs(&[kvm_msr_entry {
        index: MSR_PVM_SIGNATURE,
        ..Default::default()
    }]) else {
        return HostKind::Hardware;
    };
    match vcpu.get_msrs(&mut list) {
        Ok(1) if list.as_slice()[0].data == PVM_SIGNATURE => HostKind::Pvm,
        _ => HostKind::Hardware,
    }
}

/// Resolves the requested mode on this host: `Ok(true)` = enable kvm_pvm native mode.
pub fn wants_native_switch(host: HostKind, requested: Option<ExecMode>) -> Result<bool, PvmError> {
    match (host, requested) {
        (HostKind::Pvm, None | Some(ExecMode::Native)) => Ok(true),
        (HostKind::Pvm, Some(ExecMode::Emulated)) => Ok(false),
        (HostKind::Hardware, None | Some(ExecMode::Native)) => Ok(false),
        (HostKind::Hardware, Some(ExecMode::Emulated)) => Err(PvmError::EmulationUnavailable),
    }
}

/// The spare page kvm_pvm uses for vCPU `cpu`.
pub fn spare_page_gpa(cpu: u32) -> u64 {
    abi::PVM_SPARE_BASE_GPA + u64::from(cpu) * abi::PAGE_SIZE
}

/// Switches vCPU `cpu` to native execution (kvm_pvm only; call before its first KVM_RUN).
pub fn enable_native(vcpu: &VcpuFd, cpu: u32) -> Result<(), PvmError> {
    let list = msrs(&[kvm_msr_entry {
        index: MSR_PVM_NATIVE_PAGE,
        data: spare_page_gpa(cpu) | NATIVE_ENABLE,
        ..Default::default()
    }])?;
    match vcpu.set_msrs(&list) {
        Ok(1) => Ok(()),
        Ok(n) => Err(PvmError::Enable {
            cpu,
            reason: format!("KVM_SET_MSRS wrote {n} of 1 MSRs"),
        }),
        Err(e) => Err(PvmError::Enable {
            cpu,
            reason: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_resolution() {
        assert!(wants_native_switch(HostKind::Pvm, None).unwrap());
        assert!(!wants_native_switch(HostKind::Pvm, Some(ExecMode::Emulated)).unwrap());
        assert!(!wants_native_switch(HostKind::Hardware, Some(ExecMode::Native)).unwrap());
        assert!(wants_native_switch(HostKind::Hardware, Some(ExecMode::Emulated)).is_err());
    }

    #[test]
    fn spare_pages_stay_in_the_boot_area() {
        let last = spare_page_gpa(abi::MAX_CPUS - 1) + abi::PAGE_SIZE;
        assert!(last <= abi::BOOT_AREA_END);
        assert!(spare_page_gpa(0) >= abi::PD_BASE_GPA + 65 * 4096);
    }
}
