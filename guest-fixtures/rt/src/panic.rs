//! The panic handler: prints the location (without `core::fmt`) and the message (a static
//! message always; a formatted one in native mode only), then ends the VM with exit code 101.

use crate::{hypercall, serial};
use core::panic::PanicInfo;
use core::sync::atomic::{AtomicU32, Ordering};

/// Exit code of a guest panic.
pub const EXIT_PANIC: u32 = 101;

/// The vCPU reporting a panic, + 1 (0: none).
static PANICKING: AtomicU32 = AtomicU32::new(0);

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    let me = crate::cpu_index() + 1;
    if let Err(first) = PANICKING.compare_exchange(0, me, Ordering::Relaxed, Ordering::Relaxed) {
        if first == me {
            // A panic while reporting one: just leave.
            hypercall::exit(EXIT_PANIC);
        }
        // Another vCPU is reporting its panic and will end the VM.
        crate::arch::halt_forever();
    }
    let mut l = serial::line().s("rt: panic on cpu ").u(crate::cpu_index());
    if let Some(loc) = info.location() {
        l = l
            .s(" at ")
            .s(loc.file())
            .c(b':')
            .u(loc.line())
            .c(b':')
            .u(loc.column());
    }
    l.end();
    let msg = info.message();
    if let Some(s) = msg.as_str() {
        serial::line().s("rt: panic message: ").s(s).end();
    } else if crate::native() {
        serial::line()
            .s("rt: panic message: ")
            .f(format_args!("{msg}"))
            .end();
    } else {
        serial::println("rt: panic message: (formatted; not shown in emulated mode)");
    }
    hypercall::exit(EXIT_PANIC)
}

/// `core` is precompiled with unwinding tables that name this personality routine; with
/// `panic = "abort"` nothing ever unwinds, so it is never called. Defined only to satisfy the
/// linker.
#[no_mangle]
extern "C" fn rust_eh_personality() {}
