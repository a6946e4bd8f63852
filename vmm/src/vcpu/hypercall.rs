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

    #[test]
    fn hypercall_return_codes() {
        assert_eq!(hypercall_return(abi::STATUS_OK), 0);
        assert_eq!(hypercall_return(abi::ERR_NO_MEMORY) as i64, -12);
        assert_eq!(hypercall_return(abi::ERR_UNALIGNED) as i64, -22);
    }
}
