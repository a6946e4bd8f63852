//! The KVM_HC_MAP_GPA_RANGE hypercall path on a real VM's conversion service (no vCPU needed):
//! conversions reach the engine, bad requests become error values, other hypercalls ENOSYS.

mod common;

use std::sync::Arc;

use kvm_ioctls::HypercallExit;
use memconv::abi;
use memconv::ConversionService;
use vmm::vcpu::handle_hypercall;
use vmm::vm::KvmVm;

/// A real VM's conversion service (no vCPUs needed for the hypercall path).
fn service() -> (KvmVm, Arc<ConversionService>) {
    let (vm, _host, svc) = common::test_vm(32 << 20);
    (vm, svc)
}

fn hypercall(svc: &ConversionService, nr: u64, args: [u64; 6]) -> (bool, u64) {
    let mut ret = 0xdead_beef;
    let handled = handle_hypercall(
        svc,
        HypercallExit {
            nr,
            args,
            ret: &mut ret,
            longmode: 1,
        },
    );
    (handled, ret)
}

#[test]
fn map_gpa_range_hypercall_reaches_the_engine() {
    let (_vm, svc) = service();
    let gpa = 16 << 20;
    // To shared (attrs bit 4 clear), 2 pages, 4K hint.
    let (handled, ret) = hypercall(&svc, abi::KVM_HC_MAP_GPA_RANGE, [gpa, 2, 0, 0, 0, 0]);
    assert!(handled);
    assert_eq!(ret, 0);
    assert!(svc.check_shared(gpa, 2 * abi::PAGE_SIZE).is_ok());
    // Back to private.
    let (_, ret) = hypercall(
        &svc,
        abi::KVM_HC_MAP_GPA_RANGE,
        [gpa, 2, u64::from(abi::ATTR_ENCRYPTED), 0, 0, 0],
    );
    assert_eq!(ret, 0);
    assert!(svc.check_shared(gpa, abi::PAGE_SIZE).is_err());
    // A bad request is an error value for the guest, never a crash.
    let (_, ret) = hypercall(&svc, abi::KVM_HC_MAP_GPA_RANGE, [gpa + 1, 1, 0, 0, 0, 0]);
    assert_eq!(ret as i64, -22);
    let (_, ret) = hypercall(
        &svc,
        abi::KVM_HC_MAP_GPA_RANGE,
        [u64::MAX - 4095, 1, 0, 0, 0, 0],
    );
    assert_eq!(ret as i64, -22);
    let stats = serde_json::to_value(svc.stats()).unwrap();
    assert_eq!(stats["hypercalls"], 4, "{stats}");
    assert_eq!(stats["pages_converted"], 4, "{stats}");
}

#[test]
fn other_hypercalls_get_enosys() {
    let (_vm, svc) = service();
    let (handled, ret) = hypercall(&svc, 9, [0; 6]);
    assert!(!handled);
    assert_eq!(ret as i64, -1000);
}
