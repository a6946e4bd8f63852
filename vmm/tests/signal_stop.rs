//! The signal stop on a real VM's shared state (KVM, memfd stores; no vCPU needs to run): a
//! stop signal taken before the VM is attached ends it as soon as it is, with the signal's end
//! and exit status; one taken after ends it at once. (The second-signal exit and the real
//! signal delivery are tested on the binary, in tests/tests/robustness.rs.)

mod common;

use std::sync::Arc;
use std::time::Duration;

use vmm::exit_codes::exit_status;
use vmm::serial::Console;
use vmm::signals::SignalStop;
use vmm::vcpu::{VcpuControl, VmEnd, VmShared};
use vmm::vm::KvmVm;

fn shared() -> (KvmVm, Arc<VmShared>) {
    let (vm, host, memconv) = common::test_vm(memconv::abi::MIN_RAM);
    let control = Arc::new(VcpuControl::new(1));
    host.attach_vcpus(Arc::clone(&control));
    let console = Console::with_writer(Box::new(std::io::sink()));
    (vm, Arc::new(VmShared::new(memconv, console, control, 1)))
}

#[test]
fn a_signal_before_the_vm_is_attached_ends_it_when_it_is() {
    let (_vm, shared) = shared();
    let stop = SignalStop::new();
    stop.on_signal(libc::SIGTERM);
    assert!(shared.wait_end(Some(Duration::ZERO)).is_none());
    stop.attach(&shared);
    let end = shared
        .wait_end(Some(Duration::ZERO))
        .expect("ended on attach");
    match &end {
        VmEnd::Signal { signal, number } => {
            assert_eq!((signal.as_str(), *number), ("SIGTERM", libc::SIGTERM));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(exit_status(&end), 143);
    assert!(shared.control.stopping());
    assert_eq!(stop.received(), 1);
}

#[test]
fn a_signal_after_attach_ends_the_vm_at_once() {
    let (_vm, shared) = shared();
    let stop = SignalStop::new();
    stop.attach(&shared);
    assert!(shared.wait_end(Some(Duration::ZERO)).is_none());
    stop.on_signal(libc::SIGHUP);
    let end = shared.wait_end(Some(Duration::ZERO)).expect("ended");
    assert!(
        matches!(&end, VmEnd::Signal { signal, number: 1 } if signal == "SIGHUP"),
        "{end:?}"
    );
    assert_eq!(exit_status(&end), 129);
}
