//! What the VMM crate's own integration tests share: a real KVM VM with a conversion service on
//! memfd stores (4 KiB granularity, one vCPU, TDX lifecycle), for the tests that drive the VMM's
//! pieces directly instead of running the binary.
#![allow(dead_code)]

use std::sync::Arc;

use memconv::{ConversionService, Granularity, Platform, RamConfig, StoreKind};
use vmm::vm::{open_kvm, KvmVm, VmHost};

/// A VM on /dev/kvm (the test fails with a clear message without it), its host side, and a
/// conversion service over `size` bytes of guest RAM.
pub fn test_vm(size: u64) -> (KvmVm, Arc<VmHost>, Arc<ConversionService>) {
    let vm =
        KvmVm::new(open_kvm().expect("/dev/kvm is needed for this test")).expect("KVM_CREATE_VM");
    let host = Arc::new(VmHost::new(Arc::clone(&vm.fd)));
    let svc = ConversionService::new(
        RamConfig {
            size,
            private: StoreKind::Memfd,
            shared: StoreKind::Memfd,
            granularity: Granularity::Page4K,
            cpus: 1,
            platform: Platform::Tdx,
            prealloc: false,
        },
        host.clone(),
    )
    .expect("the conversion service starts");
    (vm, host, Arc::new(svc))
}
