//! The KVM VM: opening /dev/kvm with errors a user can act on, creating the VM and its vCPUs,
//! and the `memconv::HostVm` implementation (memslot edits, guest_memfd creation, pausing
//! vCPUs) through which the conversion service reaches KVM.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::{Arc, OnceLock};

use kvm_bindings::{kvm_create_guest_memfd, kvm_userspace_memory_region, CpuId};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};

use crate::vcpu::VcpuControl;

/// Errors opening KVM or creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The KVM device does not exist.
    #[error("{0} does not exist: KVM is not available on this machine (load the kvm module or use a host with virtualization)")]
    NoKvm(String),
    /// The KVM device exists but cannot be opened.
    #[error("permission denied opening {0}: run as root or add your user to the kvm group")]
    KvmPermission(String),
    /// Any other failure opening the KVM device.
    #[error("cannot open {0}: {1}")]
    OpenKvm(String, kvm_ioctls::Error),
    /// KVM_CREATE_VM failed.
    #[error("KVM_CREATE_VM failed: {0}")]
    CreateVm(kvm_ioctls::Error),
    /// KVM_CREATE_VCPU or a vCPU setup ioctl failed.
    #[error("setting up vCPU {cpu} failed ({what}): {source}")]
    Vcpu {
        /// The vCPU.
        cpu: u32,
        /// The ioctl.
        what: &'static str,
        /// What failed.
        source: kvm_ioctls::Error,
    },
}

/// Environment variable naming the KVM device (default `/dev/kvm`).
pub const KVM_DEVICE_ENV: &str = "VMM_KVM_DEVICE";

/// Opens the KVM device (`$VMM_KVM_DEVICE` or /dev/kvm), turning the common failures into
/// actionable errors.
pub fn open_kvm() -> Result<Kvm, VmError> {
    let path = std::env::var(KVM_DEVICE_ENV).unwrap_or_else(|_| "/dev/kvm".to_string());
    let c_path =
        std::ffi::CString::new(path.clone()).map_err(|_| VmError::NoKvm(format!("{path:?}")))?;
    Kvm::new_with_path(&c_path).map_err(|e| match e.errno() {
        libc::ENOENT | libc::ENODEV | libc::ENXIO => VmError::NoKvm(path),
        libc::EACCES | libc::EPERM => VmError::KvmPermission(path),
        _ => VmError::OpenKvm(path, e),
    })
}

/// A created VM.
pub struct KvmVm {
    /// The KVM system handle.
    pub kvm: Kvm,
    /// The VM.
    pub fd: Arc<VmFd>,
    /// CPUID the host supports, applied to every vCPU.
    cpuid: CpuId,
}

impl KvmVm {
    /// Creates a VM.
    pub fn new(kvm: Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        // Intel VMX needs a TSS area below 4 GiB; other hosts may refuse: harmless.
        if let Err(e) = fd.set_tss_address(0xfffb_d000) {
            tracing::debug!("KVM_SET_TSS_ADDR: {e} (ignored)");
        }
        enable_exit_hypercall(&fd);
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Vcpu {
                cpu: 0,
                what: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        Ok(Self {
            kvm,
            fd: Arc::new(fd),
            cpuid,
        })
    }

    /// Creates vCPU `cpu` with the host CPUID (APIC id = index) and a reset FPU.
    pub fn create_vcpu(&self, cpu: u32) -> Result<VcpuFd, VmError> {
        let err = |what| move |source| VmError::Vcpu { cpu, what, source };
        let vcpu = self
            .fd
            .create_vcpu(u64::from(cpu))
            .map_err(err("KVM_CREATE_VCPU"))?;
        let mut cpuid = self.cpuid.clone();
        for entry in cpuid.as_mut_slice() {
            match entry.function {
                // Initial APIC id in EBX[31:24].
                1 => entry.ebx = (entry.ebx & 0x00ff_ffff) | (cpu << 24),
                0xb | 0x1f => entry.edx = cpu,
                _ => {}
            }
        }
        vcpu.set_cpuid2(&cpuid).map_err(err("KVM_SET_CPUID2"))?;
        let fpu = kvm_bindings::kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        vcpu.set_fpu(&fpu).map_err(err("KVM_SET_FPU"))?;
        Ok(vcpu)
    }
}

/// KVM_CAP_EXIT_HYPERCALL (not named in kvm-bindings 0.14).
const KVM_CAP_EXIT_HYPERCALL: u32 = 201;

/// Asks KVM to deliver KVM_HC_MAP_GPA_RANGE to userspace (KVM_EXIT_HYPERCALL), the standard
/// path, which the vCPU loop routes to the same engine as the mailbox. kvm_pvm reports the
/// capability but never delivers the exit; the mailbox is the path that works there.
fn enable_exit_hypercall(fd: &VmFd) {
    let mask = 1u64 << memconv::abi::KVM_HC_MAP_GPA_RANGE;
    let supported = fd.check_extension_raw(KVM_CAP_EXIT_HYPERCALL.into());
    if supported < 0 || (supported as u64) & mask == 0 {
        tracing::debug!("KVM_CAP_EXIT_HYPERCALL does not cover KVM_HC_MAP_GPA_RANGE here");
        return;
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        ..Default::default()
    };
    cap.args[0] = mask;
    if let Err(e) = fd.enable_cap(&cap) {
        tracing::debug!("enabling KVM_CAP_EXIT_HYPERCALL failed: {e}");
    }
}

/// What memconv reaches KVM through.
pub struct VmHost {
    vm: Arc<VmFd>,
    control: OnceLock<Arc<VcpuControl>>,
}

impl VmHost {
    /// A host for `vm`; vCPU pausing is wired once vCPUs exist.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            control: OnceLock::new(),
        }
    }

    /// Connects the vCPU control used by pause/resume.
    pub fn attach_vcpus(&self, control: Arc<VcpuControl>) {
        let _ = self.control.set(control);
    }
}

impl memconv::HostVm for VmHost {
    fn set_memslot(&self, slot: u32, gpa: u64, size: u64, host_addr: u64) -> std::io::Result<()> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: if size == 0 { 0 } else { host_addr },
        };
        // SAFETY: memconv guarantees host_addr..host_addr+size is a mapping it keeps alive for
        // as long as the slot exists (it deletes slots before unmapping).
        unsafe { self.vm.set_user_memory_region(region) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }

    fn create_guest_memfd(&self, size: u64, flags: u64) -> std::io::Result<OwnedFd> {
        let request = kvm_create_guest_memfd {
            size,
            flags,
            reserved: [0; 6],
        };
        let fd = self
            .vm
            .create_guest_memfd(request)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: KVM_CREATE_GUEST_MEMFD returned a new file descriptor we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn pause_vcpus(&self) {
        if let Some(control) = self.control.get() {
            control.pause();
        }
    }

    fn resume_vcpus(&self) {
        if let Some(control) = self.control.get() {
            control.resume();
        }
    }
}
