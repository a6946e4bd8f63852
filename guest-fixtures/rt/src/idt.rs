//! Exceptions: an IDT with gates for vectors 0..31, installed on every vCPU, whose handlers
//! print the vector, error code and RIP and end the VM with exit code `32 + vector` (32..=63:
//! below 128, so a shell cannot mistake it for 128 + a signal number).

use crate::{arch, hypercall, serial};
use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::ptr::{addr_of, read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use memconv::abi::{GDT_GPA, MAX_CPUS};

const VECTORS: usize = 32;

/// Exit code for an unhandled exception: `EXIT_EXCEPTION_BASE + vector`.
pub const EXIT_EXCEPTION_BASE: u32 = 32;

#[repr(C, align(16))]
struct Idt(UnsafeCell<[u64; VECTORS * 2]>);

// SAFETY: written once by the first vCPU (guarded by `STATE`), read-only afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new([0; VECTORS * 2]));
/// 0 = not built, 1 = being built, 2 = ready.
static STATE: AtomicU32 = AtomicU32::new(0);
static IN_HANDLER: [AtomicBool; MAX_CPUS as usize] =
    [const { AtomicBool::new(false) }; MAX_CPUS as usize];

extern "C" {
    /// Addresses of the 32 entry stubs (below).
    static __rt_exc_table: [u64; VECTORS];
}

// Entry stubs: push a zero error code where the CPU pushes none, then the vector, and call
// `rt_exception` with a pointer to [vector, error, rip, cs, rflags, rsp, ss].
global_asm!(
    ".pushsection .text.__rt_exc, \"ax\", @progbits",
    ".irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31",
    "__rt_exc_\\v:",
    "    push 0",
    "    push \\v",
    "    jmp __rt_exc_common",
    ".endr",
    ".irp v, 8,10,11,12,13,14,17,21,29,30",
    "__rt_exc_\\v:",
    "    push \\v",
    "    jmp __rt_exc_common",
    ".endr",
    "__rt_exc_common:",
    "    cld",
    "    mov rdi, rsp",
    "    and rsp, -16",
    "    call {handler}",
    "    ud2",
    ".popsection",
    ".pushsection .rodata.__rt_exc_table, \"a\", @progbits",
    ".balign 8",
    ".global __rt_exc_table",
    "__rt_exc_table:",
    ".irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31",
    "    .quad __rt_exc_\\v",
    ".endr",
    ".popsection",
    handler = sym rt_exception,
);

/// The selector of the 64-bit ring-0 code segment the host set up. `cs` itself, unless this
/// runs in hardware ring 3 (kvm_pvm native mode), where `cs` shows the host's user selector:
/// then the first 64-bit DPL-0 code descriptor of the GDT at `GDT_GPA`.
fn code_selector() -> u16 {
    let cs = arch::cs();
    if cs & 3 == 0 {
        return cs;
    }
    for i in 1..16u64 {
        // SAFETY: the GDT page lies in the boot area, identity mapped RAM.
        let d = unsafe { read_volatile((GDT_GPA + i * 8) as *const u64) };
        let present = d & (1 << 47) != 0;
        let code = d & (3 << 43) == 3 << 43; // S=1 (code/data), type bit 3 = code
        let long = d & (1 << 53) != 0;
        let dpl0 = d & (3 << 45) == 0;
        if present && code && long && dpl0 {
            return (i * 8) as u16;
        }
    }
    cs & !3
}

fn build() {
    let sel = code_selector() as u64;
    let base = IDT.0.get() as *mut u64;
    // The table is a linker-resolved array of 32 addresses (taking its address is safe).
    let table: *const u64 = addr_of!(__rt_exc_table).cast();
    for v in 0..VECTORS {
        // SAFETY: v < 32, inside the table.
        let h = unsafe { read_volatile(table.add(v)) };
        // 64-bit interrupt gate: present, DPL 0, type 0xE, IST 0.
        let low = (h & 0xffff) | (sel << 16) | (0x8e << 40) | ((h >> 16) & 0xffff) << 48;
        let high = h >> 32;
        // SAFETY: only the first vCPU writes (STATE = 1), nobody reads before STATE = 2.
        // Volatile stores keep the compiler from merging them into SSE stores.
        unsafe {
            write_volatile(base.add(2 * v), low);
            write_volatile(base.add(2 * v + 1), high);
        }
    }
}

/// Build the IDT (first caller) and load it on this vCPU.
pub fn install() {
    if STATE
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Acquire)
        .is_ok()
    {
        build();
        STATE.store(2, Ordering::Release);
    } else {
        while STATE.load(Ordering::Acquire) != 2 {
            core::hint::spin_loop();
        }
    }
    // SAFETY: the table holds valid gates for all 32 exception vectors.
    unsafe { arch::lidt(IDT.0.get() as u64, (VECTORS * 16 - 1) as u16) };
}

/// Mnemonic of an exception vector.
pub const fn vector_name(v: u64) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        2 => "NMI",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        18 => "#MC",
        19 => "#XM",
        20 => "#VE",
        21 => "#CP",
        29 => "#VC",
        30 => "#SX",
        _ => "reserved",
    }
}

/// What the stubs leave on the stack (`ss` is only there because the CPU pushes it).
#[repr(C)]
#[allow(dead_code)]
struct Frame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

extern "C" fn rt_exception(f: &Frame) -> ! {
    let vector = f.vector;
    let code = EXIT_EXCEPTION_BASE + vector as u32;
    let cpu = crate::cpu_index();
    if IN_HANDLER[cpu as usize].swap(true, Ordering::Relaxed) {
        // Faulted while reporting a fault: just leave.
        hypercall::exit(code);
    }
    let mut l = serial::line()
        .s("rt: exception ")
        .s(vector_name(vector))
        .s(" vector=")
        .u(vector)
        .s(" error=")
        .hex(f.error)
        .s(" rip=")
        .hex(f.rip)
        .s(" rsp=")
        .hex(f.rsp)
        .s(" cs=")
        .hex(f.cs)
        .s(" rflags=")
        .hex(f.rflags)
        .s(" cpu=")
        .u(cpu);
    if vector == 14 {
        l = l.s(" cr2=").hex(arch::cr2());
    }
    l.end();
    hypercall::exit(code)
}
