//! The standard conversion path: KVM_EXIT_HYPERCALL with KVM_HC_MAP_GPA_RANGE reaches the same
//! memconv engine as the mailbox, and its status becomes the return value a Linux guest expects.

use kvm_ioctls::HypercallExit;
use memconv::abi;
use memconv::ConversionService;

/// Maps a memconv status to the KVM_HC_MAP_GPA_RANGE return value a Linux guest expects.
pub fn hypercall_return(status: u32) -> u64 {
    const KVM_EINVAL: i64 = 22;
    const KVM_ENOMEM: i64 = 12;
    match status {
        abi::STATUS_OK => 0,
        abi::ERR_NO_MEMORY => (-KVM_ENOMEM) as u64,
        _ => (-KVM_EINVAL) as u64,
    }
}

/// Serves KVM_HC_MAP_GPA_RANGE; other hypercalls fail with -KVM_ENOSYS. Returns whether it was
/// a conversion.
pub fn handle_hypercall(memconv: &ConversionService, exit: HypercallExit<'_>) -> bool {
    const KVM_ENOSYS: i64 = 1000;
    if exit.nr == abi::KVM_HC_MAP_GPA_RANGE {
        let status = memconv.map_gpa_range(exit.args[0], exit.args[1], exit.args[2]);
        *exit.ret = hypercall_return(status);
        true
    } else {
        *exit.ret = (-KVM_ENOSYS) as u64;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{open_kvm, KvmVm, VmHost};
    use memconv::{Granularity, RamConfig, StoreKind};
    use std::sync::Arc;

    /// A real VM's conversion service (no vCPUs needed for the hypercall path).
    fn service() -> (KvmVm, Arc<ConversionService>) {
        let vm = KvmVm::new(open_kvm().expect("/dev/kvm is needed for this test")).unwrap();
        let host = Arc::new(VmHost::new(Arc::clone(&vm.fd)));
        let svc = ConversionService::new(
            RamConfig {
                size: 32 << 20,
                private: StoreKind::Memfd,
                shared: StoreKind::Memfd,
                granularity: Granularity::Page4K,
                cpus: 1,
            },
            host,
        )
        .unwrap();
        (vm, Arc::new(svc))
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

    #[test]
    fn hypercall_return_codes() {
        assert_eq!(hypercall_return(abi::STATUS_OK), 0);
        assert_eq!(hypercall_return(abi::ERR_NO_MEMORY) as i64, -12);
        assert_eq!(hypercall_return(abi::ERR_UNALIGNED) as i64, -22);
    }
}
