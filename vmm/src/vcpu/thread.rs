//! One vCPU thread's body ([`run_vcpu`]): the run loop that drives the vCPU's state machine
//! (enter, park, exit, halt, finish) around KVM_RUN and exit dispatch, the register dump of a
//! crashed vCPU, and the panic guard: a panic on the thread ends the VM as a host error (the
//! summary is still written) instead of aborting the process.

use std::sync::Arc;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;

use super::dispatch::{dispatch, ExitAction};
use super::end::VmEnd;
use super::shared::VmShared;
use super::state::Transition;
use super::telemetry::ExitCounts;

/// Formats the registers of a crashed vCPU.
fn register_dump(fd: &mut VcpuFd) -> String {
    let mut out = String::new();
    if let Ok(r) = fd.get_regs() {
        out.push_str(&format!(
            "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
             rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
             rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
             r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n\
             r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15
        ));
    }
    if let Ok(s) = fd.get_sregs() {
        out.push_str(&format!(
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n\
             cs={:#x} ss={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}\n",
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            s.ss.selector,
            s.idt.base,
            s.idt.limit,
            s.gdt.base,
            s.gdt.limit
        ));
    }
    let run = fd.get_kvm_run();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` union member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        out.push_str(&format!(
            "internal error suberror={} data={:x?}\n",
            internal.suberror,
            &internal.data[..n]
        ));
    }
    out
}

/// One vCPU thread's body: runs until the VM ends. A panic inside ends the VM with
/// [`VmEnd::HostError`] for this vCPU.
pub fn run_vcpu(mut fd: VcpuFd, cpu: u32, shared: Arc<VmShared>) {
    let control = Arc::clone(&shared.control);
    let run_ptr: *mut kvm_run = fd.get_kvm_run();
    control.register_thread(cpu, run_ptr);
    if let Err(msg) = crate::panic_guard::guarded(|| run_loop(&mut fd, cpu, &shared)) {
        shared.end(VmEnd::HostError {
            cpu,
            error: format!("vCPU thread panicked: {msg}"),
        });
    }
    // Before `fd` (and its kvm_run mapping) is dropped.
    control.unregister_thread();
    control.transition(cpu, Transition::Finish);
}

fn run_loop(fd: &mut VcpuFd, cpu: u32, shared: &Arc<VmShared>) {
    let control = &shared.control;
    let mut counts = ExitCounts::default();
    loop {
        if control.stopping() {
            break;
        }
        control.transition(cpu, Transition::Enter);
        if control.is_paused() {
            if !control.park_while_paused(cpu) {
                break;
            }
            continue;
        }
        if control.stopping() {
            break;
        }
        let result = fd.run();
        control.transition(cpu, Transition::Exit);
        counts.total += 1;
        let action = match result {
            Ok(exit) => dispatch(shared, cpu, &mut counts, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                counts.interrupted += 1;
                ExitAction::Resume
            }
            Err(e) => ExitAction::End(VmEnd::HostError {
                cpu,
                error: format!("KVM_RUN failed: {e}"),
            }),
        };
        match action {
            ExitAction::Resume => {}
            ExitAction::Halt => {
                control.transition(cpu, Transition::Halt);
                if control.all_halted_or_done() {
                    shared.end(VmEnd::AllHalted);
                }
                shared.telemetry.publish(cpu, &counts);
                control.wait_halted();
                break;
            }
            ExitAction::End(why) => {
                shared.telemetry.publish(cpu, &counts);
                shared.end(why);
                break;
            }
            ExitAction::Crash(reason) => {
                let registers = register_dump(fd);
                tracing::debug!("vCPU {cpu}: {reason}\n{registers}");
                shared.telemetry.publish(cpu, &counts);
                shared.end(VmEnd::Crash {
                    cpu,
                    reason,
                    registers,
                });
                break;
            }
        }
        // After every exit (this vCPU's own, uncontended lock and a 96-byte copy, against an
        // exit's ~10-80 us): readers such as the control socket see exact counts.
        shared.telemetry.publish(cpu, &counts);
    }
    shared.telemetry.publish(cpu, &counts);
}
