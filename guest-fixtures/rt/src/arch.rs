//! The x86-64 instructions the runtime needs: port I/O, halting, control registers, stack
//! pointer and code segment, IDT loading, the deliberate triple fault and the spin loop.

use core::arch::asm;

/// Write a byte to an I/O port.
///
/// # Safety
/// The port write must not break an invariant the rest of the guest relies on.
#[inline]
pub unsafe fn outb(port: u16, value: u8) {
    // SAFETY: the caller vouches for the port; `out` touches no memory.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    };
}

/// Write a u32 to an I/O port. Not `nomem`: the host may read and write guest memory (the
/// mailbox) while it handles the `out`, so the compiler must not move memory accesses across it.
///
/// # Safety
/// The port write must not break an invariant the rest of the guest relies on.
#[inline]
pub unsafe fn outl(port: u16, value: u32) {
    // SAFETY: the caller vouches for the port.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nostack, preserves_flags))
    };
}

/// Halt until the next interrupt or spurious wake-up. `rax` is 0, never
/// [`memconv::abi::HLT_WAIT_MAGIC`] (left there by an earlier [`hlt_wait`]), so the host sees
/// a vCPU that is done, not one that waits.
#[inline]
pub fn hlt() {
    // SAFETY: `hlt` only waits; interrupts are off in the guest, so it may also return
    // spuriously, which callers tolerate.
    unsafe { asm!("hlt", in("rax") 0u64, options(nomem, nostack, preserves_flags)) };
}

/// Wait in a `hlt` the host ends ([`memconv::abi::HLT_WAIT_MAGIC`]): when a device completes
/// requests, a vCPU stops for good, the shared 32-bit word at `word` (0: none) no longer holds
/// `expected`, or after about `timeout_us` microseconds; may also return at once. Callers
/// re-check what they wait for.
#[inline]
pub fn hlt_wait(word: u64, expected: u32, timeout_us: u64) {
    // SAFETY: `hlt` only waits; the host reads `word` but writes nothing of ours. rbx cannot be
    // named as an operand (LLVM reserves it), so it is swapped in and back out. Not `nomem`:
    // devices write guest memory while we wait, so memory accesses must not move across it.
    unsafe {
        asm!(
            "xchg {w}, rbx",
            "hlt",
            "xchg {w}, rbx",
            w = inout(reg) word => _,
            in("rax") memconv::abi::HLT_WAIT_MAGIC,
            in("rcx") expected as u64,
            in("rdx") timeout_us,
            options(nostack, preserves_flags)
        )
    };
}

/// Halt forever (`hlt` in a loop: it can wake spuriously).
pub fn halt_forever() -> ! {
    loop {
        hlt();
    }
}

/// Current stack pointer.
#[inline(always)]
pub fn rsp() -> u64 {
    let v: u64;
    // SAFETY: reads a register.
    unsafe { asm!("mov {}, rsp", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Current code segment selector.
pub fn cs() -> u16 {
    let v: u16;
    // SAFETY: reads a segment register.
    unsafe { asm!("mov {:x}, cs", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CR0.
pub fn cr0() -> u64 {
    let v: u64;
    // SAFETY: reads a control register (CPL 0, or trapped and emulated by the host).
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reads a control register.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// CR4.
pub fn cr4() -> u64 {
    let v: u64;
    // SAFETY: reads a control register.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack, preserves_flags)) };
    v
}

/// Make SSE usable (CR0.MP set, CR0.EM clear, CR4.OSFXSR and CR4.OSXMMEXCPT set) unless the
/// host already did: only for native mode, where SSE works at all.
pub fn enable_sse() {
    const CR0_MP: u64 = 1 << 1;
    const CR0_EM: u64 = 1 << 2;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    let c0 = cr0();
    let want0 = (c0 & !CR0_EM) | CR0_MP;
    if want0 != c0 {
        // SAFETY: only changes how x87/SSE instructions behave.
        unsafe { asm!("mov cr0, {}", in(reg) want0, options(nostack, preserves_flags)) };
    }
    let c4 = cr4();
    let want4 = c4 | CR4_OSFXSR | CR4_OSXMMEXCPT;
    if want4 != c4 {
        // SAFETY: only enables SSE state handling.
        unsafe { asm!("mov cr4, {}", in(reg) want4, options(nostack, preserves_flags)) };
    }
}

#[repr(C, packed)]
struct Dtr {
    limit: u16,
    base: u64,
}

/// Load the IDT register.
///
/// # Safety
/// `base..=base + limit` must hold valid gate descriptors for every vector that can occur
/// (or the caller wants the CPU to shut down, see [`triple_fault`]).
pub unsafe fn lidt(base: u64, limit: u16) {
    let d = Dtr { limit, base };
    // SAFETY: `d` lives across the instruction; the caller vouches for the table.
    unsafe { asm!("lidt [{}]", in(reg) &d, options(readonly, nostack, preserves_flags)) };
}

/// Load an empty IDT and raise #UD: the exception cannot be delivered, nor the double fault,
/// so the CPU shuts down (the VMM sees KVM_EXIT_SHUTDOWN).
pub fn triple_fault() -> ! {
    // SAFETY: deliberately makes every exception undeliverable, then raises one.
    unsafe {
        lidt(0, 0);
        asm!("ud2", options(nomem, nostack, noreturn));
    }
}

/// A `dec; jnz` loop of `iters` iterations that the compiler cannot remove or shorten.
pub fn spin_iters(iters: u64) {
    if iters == 0 {
        return;
    }
    // SAFETY: only counts a register down to zero.
    unsafe {
        asm!(
            "2:",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) iters => _,
            options(nomem, nostack),
        )
    };
}
