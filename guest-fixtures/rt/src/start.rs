//! Entry: `_start` (every vCPU, `rdi` = boot info, `rsi` = vCPU index, no stack), the per-vCPU
//! stacks, the boot sequence before the program's `main`, and `cpu_index` (derived from the
//! stack pointer: which stack the vCPU runs on).

use crate::{arch, bootinfo, hypercall, idt, palloc, serial};
use core::arch::global_asm;
use core::ptr::addr_of;
use core::sync::atomic::{AtomicU32, Ordering};
use memconv::abi::MAX_CPUS;

/// Bytes of stack per vCPU.
pub const STACK_SIZE: usize = 64 * 1024;
const STACK_SHIFT: u32 = STACK_SIZE.trailing_zeros();
const _: () = assert!(1 << STACK_SHIFT == STACK_SIZE);

#[repr(C, align(4096))]
struct Stacks([u8; STACK_SIZE * MAX_CPUS as usize]);

/// vCPU i's stack is `[STACKS + i * STACK_SIZE, STACKS + (i + 1) * STACK_SIZE)`; in .bss.
static mut STACKS: Stacks = Stacks([0; STACK_SIZE * MAX_CPUS as usize]);

/// Set once vCPU 0 has validated the boot info and set up the allocator.
static READY: AtomicU32 = AtomicU32::new(0);

extern "C" {
    /// One past the end of the image as linked (fixtures/link.ld).
    static __image_end: u8;
}

extern "Rust" {
    /// The program's `main`, defined by [`crate::entry!`].
    fn __rt_guest_main(cpu: u32) -> u32;
}

global_asm!(
    ".pushsection .text._start, \"ax\", @progbits",
    ".global _start",
    ".type _start, @function",
    "_start:",
    "    cld",
    "    cmp rsi, {max_cpus}",
    "    jae 3f",
    // rsp = STACKS + (rsi + 1) * STACK_SIZE: the top of this vCPU's stack, 16-byte aligned.
    "    lea rax, [rsi + 1]",
    "    shl rax, {shift}",
    "    lea rsp, [rip + {stacks}]",
    "    add rsp, rax",
    "    xor ebp, ebp",
    // rdi (boot info) and rsi (vCPU index) pass straight through.
    "    call {entry}",
    "3:",
    // rax 0: a vCPU that is done, not a host-ended wait (memconv::abi::HLT_WAIT_MAGIC).
    "    xor eax, eax",
    "    hlt",
    "    jmp 3b",
    ".size _start, . - _start",
    ".popsection",
    max_cpus = const MAX_CPUS,
    shift = const STACK_SHIFT,
    stacks = sym STACKS,
    entry = sym rt_entry,
);

/// This vCPU's index (0 is the boot vCPU), from the stack it runs on.
#[inline]
pub fn cpu_index() -> u32 {
    let base = addr_of!(STACKS) as u64;
    let i = arch::rsp().wrapping_sub(base) >> STACK_SHIFT;
    if i < MAX_CPUS as u64 {
        i as u32
    } else {
        0
    }
}

fn image_end() -> u64 {
    // Only the address of the linker-script symbol is taken.
    addr_of!(__image_end) as u64
}

extern "C" fn rt_entry(boot_gpa: u64, cpu: u64) -> ! {
    let cpu = cpu as u32;
    idt::install();
    if cpu == 0 {
        let b = bootinfo::boot();
        if let Err(why) = bootinfo::validate(b, boot_gpa, image_end()) {
            serial::line()
                .s("rt: bad boot info: ")
                .s(why)
                .s(" (magic=")
                .hex(b.magic)
                .s(" version=")
                .u(b.version)
                .s(")")
                .end();
            hypercall::exit(crate::EXIT_BAD_BOOT_INFO);
        }
        if !crate::cmdline::is_valid(bootinfo::cmdline_bytes()) {
            serial::println("rt: bad boot info: the command line is not printable ASCII");
            hypercall::exit(crate::EXIT_BAD_BOOT_INFO);
        }
        if bootinfo::native() {
            arch::enable_sse();
        }
        palloc::global::init(b.free_start, b.ram_size, Some(hypercall::accept_one));
        READY.store(1, Ordering::Release);
    } else {
        while READY.load(Ordering::Acquire) == 0 {
            core::hint::spin_loop();
        }
        if bootinfo::native() {
            arch::enable_sse();
        }
    }
    // SAFETY: defined by the program through `rt::entry!` with this signature.
    let code = unsafe { __rt_guest_main(cpu) };
    if cpu == 0 {
        hypercall::exit(code)
    }
    arch::halt_forever()
}
