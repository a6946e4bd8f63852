//! Exit dispatch: one KVM exit becomes device calls through the bus (ports and MMIO alike),
//! a hypercall, a crash, or the end of the VM for an MMIO exit inside RAM that memconv cut out
//! as unaccepted, counted by reason, and an [`ExitAction`] for the run loop.

use kvm_ioctls::VcpuExit;

use super::end::VmEnd;
use super::hypercall::handle_hypercall;
use super::shared::VmShared;
use super::telemetry::ExitCounts;
use crate::devices::bus::{BusEffect, DeviceKind, Space};

/// What an exit asks of the run loop.
#[derive(Debug)]
pub enum ExitAction {
    /// Enter the guest again.
    Resume,
    /// The vCPU executed HLT.
    Halt,
    /// The VM ends.
    End(VmEnd),
    /// The vCPU crashed; the loop adds the register dump.
    Crash(String),
}

fn count_kind(counts: &mut ExitCounts, kind: DeviceKind) {
    match kind {
        DeviceKind::Serial => counts.serial += 1,
        DeviceKind::Doorbell => counts.doorbell += 1,
        DeviceKind::Virtio | DeviceKind::Other => {}
    }
}

/// An access no device owns: counted (ports also by number).
fn unowned(shared: &VmShared, counts: &mut ExitCounts, space: Space, addr: u64) {
    match space {
        Space::Pio => {
            counts.unknown_port += 1;
            shared.telemetry.note_unknown_port(addr as u16);
        }
        Space::Mmio => counts.unknown_mmio += 1,
    }
}

/// A read routed through the bus; unowned addresses read all-ones.
fn bus_read(
    shared: &VmShared,
    cpu: u32,
    counts: &mut ExitCounts,
    (space, addr): (Space, u64),
    data: &mut [u8],
) -> ExitAction {
    match shared.bus.read(space, cpu, addr, data) {
        Some(kind) => count_kind(counts, kind),
        None => {
            unowned(shared, counts, space, addr);
            data.fill(0xff);
        }
    }
    ExitAction::Resume
}

/// A write routed through the bus, and what the owning device asks.
fn bus_write(
    shared: &VmShared,
    cpu: u32,
    counts: &mut ExitCounts,
    (space, addr): (Space, u64),
    data: &[u8],
) -> ExitAction {
    let Some((kind, effect)) = shared.bus.write(space, cpu, addr, data) else {
        unowned(shared, counts, space, addr);
        return ExitAction::Resume;
    };
    count_kind(counts, kind);
    match effect {
        BusEffect::GuestExit(code) => ExitAction::End(VmEnd::GuestExit { cpu, code }),
        BusEffect::PoolReport(report) => {
            shared.telemetry.note_pool_report(&report);
            ExitAction::Resume
        }
        BusEffect::DoorbellRefused => {
            counts.doorbell_mismatch += 1;
            ExitAction::Resume
        }
        BusEffect::None => ExitAction::Resume,
    }
}

/// Handles one exit of vCPU `cpu`, counting it in `counts`.
pub fn dispatch(
    shared: &VmShared,
    cpu: u32,
    counts: &mut ExitCounts,
    exit: VcpuExit<'_>,
) -> ExitAction {
    match exit {
        VcpuExit::IoOut(port, data) => {
            counts.io_out += 1;
            bus_write(shared, cpu, counts, (Space::Pio, port.into()), data)
        }
        VcpuExit::IoIn(port, data) => {
            counts.io_in += 1;
            bus_read(shared, cpu, counts, (Space::Pio, port.into()), data)
        }
        VcpuExit::MmioRead(addr, data) => {
            counts.mmio += 1;
            if shared.memconv.unaccepted_access(addr) {
                return ExitAction::End(VmEnd::UnacceptedAccess { cpu, gpa: addr });
            }
            bus_read(shared, cpu, counts, (Space::Mmio, addr), data)
        }
        VcpuExit::MmioWrite(addr, data) => {
            counts.mmio += 1;
            if shared.memconv.unaccepted_access(addr) {
                return ExitAction::End(VmEnd::UnacceptedAccess { cpu, gpa: addr });
            }
            bus_write(shared, cpu, counts, (Space::Mmio, addr), data)
        }
        VcpuExit::Hlt => {
            counts.hlt += 1;
            ExitAction::Halt
        }
        VcpuExit::Hypercall(h) => {
            counts.hypercall += 1;
            handle_hypercall(&shared.memconv, h);
            ExitAction::Resume
        }
        VcpuExit::Intr => {
            counts.interrupted += 1;
            ExitAction::Resume
        }
        VcpuExit::Shutdown => ExitAction::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::InternalError => {
            ExitAction::Crash("KVM internal error (emulation failure)".into())
        }
        VcpuExit::FailEntry(reason, hw_cpu) => ExitAction::Crash(format!(
            "VM entry failed: hardware reason {reason:#x} on host cpu {hw_cpu}"
        )),
        VcpuExit::SystemEvent(kind, _) => ExitAction::Crash(format!("system event {kind}")),
        other => {
            counts.other += 1;
            ExitAction::Crash(format!("unhandled exit {other:?}"))
        }
    }
}
