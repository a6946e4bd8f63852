//! `rt`: the bare-metal runtime of the guest fixtures.
//!
//! Owns what a guest program needs around its `main`: the entry point and per-vCPU stacks
//! (`start`), the C memory functions (`mem`), serial output (`serial`), exceptions (`idt`),
//! panics, boot info and command line (`bootinfo`, `cmdline`), hypercalls (`hypercall`), the
//! physical page allocator (`palloc`), spinning synchronisation (`sync`), TSC time (`time`) and
//! waits that poll, then halt (`wait`; the budget logic in `rtcore::budget`).
//!
//! A program is a `#![no_std] #![no_main]` binary that calls [`entry!`] with its
//! `fn main(cpu: u32) -> u32`. The runtime runs `main` on every vCPU once vCPU 0 has validated
//! the boot info (else: exit code 3) and set up the allocator; what `main` returns on vCPU 0 is
//! the VM's exit code; when it returns on another vCPU, that vCPU halts.
//!
//! Exit codes used by the runtime: 3 bad boot info, `32 + vector` unhandled exception (32..=63),
//! 101 panic.
//!
//! # No SSE in emulated mode
//! Under `--exec emulated` every SSE instruction ends the VM (KVM_EXIT_INTERNAL_ERROR). The
//! runtime's own paths (entry, serial, numbers, exceptions, panic location, boot info,
//! command line, hypercalls, allocator) avoid SSE; `core::fmt` does not, so it is only used
//! when [`native`] is true. Programs meant to run emulated must avoid: `core::fmt`
//! (`format_args!`, `{}`), copying or zero-initialising arrays/structs of 16 bytes or more on
//! the stack (LLVM uses `movaps`/`movups` for those), and `core` routines such as
//! `str::from_utf8` or `str::split`. Check with `objdump -d` (see `tools/check-sse.sh`).
//!
//! # Host tests
//! The pure modules (`numfmt`, `palloc`, boot-info validation, the hypercall transport logic)
//! build on the host: `cargo test -p rt`; `cmdline` and `sync` live in the `rtcore` crate
//! (re-exported here) so that other host-testable crates can use them. The bare-metal parts are
//! compiled only outside `cfg(test)` and with the `bare-metal` feature (on by default; a
//! host-testable crate can depend on rt with `default-features = false` to get only the pure
//! parts).
#![cfg_attr(not(test), no_std)]
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod bootinfo;
pub mod hypercall;
pub mod numfmt;
pub mod palloc;

pub use rtcore::{budget, cmdline, sync};

#[cfg(all(feature = "bare-metal", not(test)))]
pub mod arch;
#[cfg(all(feature = "bare-metal", not(test)))]
pub mod idt;
#[cfg(all(feature = "bare-metal", not(test)))]
mod mem;
#[cfg(all(feature = "bare-metal", not(test)))]
mod panic;
#[cfg(all(feature = "bare-metal", not(test)))]
pub mod serial;
#[cfg(all(feature = "bare-metal", not(test)))]
mod start;
#[cfg(all(feature = "bare-metal", not(test)))]
pub mod time;
#[cfg(all(feature = "bare-metal", not(test)))]
pub mod wait;

pub use memconv::abi;

#[cfg(all(feature = "bare-metal", not(test)))]
pub use bare::*;

#[cfg(all(feature = "bare-metal", not(test)))]
mod bare {
    pub use crate::arch::{halt_forever, spin_iters, triple_fault};
    pub use crate::bootinfo::{
        boot, cmdline, cpu_count, host_2m_flag, native, platform_snp, ram_size,
    };
    pub use crate::hypercall::{
        accept, accept_one, convert, convert_one, exit, report, rescind_one,
    };
    pub use crate::idt::EXIT_EXCEPTION_BASE;
    pub use crate::palloc::global as alloc;
    pub use crate::panic::EXIT_PANIC;
    pub use crate::serial::{line, println, Line};
    pub use crate::start::{cpu_index, STACK_SIZE};
    pub use crate::time::wait_until;

    /// A rough number of [`crate::sync::spin_until`] iterations that take about `secs` seconds
    /// (hardware speed in native mode, ~700 ns per instruction emulated). For bounding waits
    /// that should never time out, not for measuring time.
    pub fn spins_for_secs(secs: u64) -> u64 {
        let per_sec = if native() { 25_000_000 } else { 300_000 };
        secs.saturating_mul(per_sec)
    }
}

/// Exit code for a boot info the runtime cannot use.
pub const EXIT_BAD_BOOT_INFO: u32 = 3;

/// Declare the program's `main: fn(cpu: u32) -> u32` (see the crate docs).
#[macro_export]
macro_rules! entry {
    ($main:path) => {
        /// Called by the runtime on every vCPU (see `rt::entry!`).
        #[no_mangle]
        pub fn __rt_guest_main(cpu: u32) -> u32 {
            let main: fn(u32) -> u32 = $main;
            main(cpu)
        }
    };
}
