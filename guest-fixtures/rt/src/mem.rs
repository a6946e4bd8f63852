//! The C memory functions the compiler emits calls to (`memcpy`, `memmove`, `memset`,
//! `memcmp`, `bcmp`): there is no libc. Written with string instructions in inline assembly so
//! the compiler can neither recognise them as the idioms they implement (which would turn them
//! into calls to themselves) nor vectorise them into SSE (fatal in emulated mode).

use core::arch::asm;

/// # Safety
/// C `memcpy` contract: `n` bytes valid at both, not overlapping.
#[no_mangle]
unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds the memcpy contract; DF is clear per the ABI.
    unsafe {
        asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        )
    };
    dst
}

/// # Safety
/// C `memmove` contract: `n` bytes valid at both, may overlap.
#[no_mangle]
unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst before src, or no overlap: copying forwards is safe.
        // SAFETY: the caller upholds the contract.
        unsafe { memcpy(dst, src, n) };
    } else {
        // dst inside [src, src + n): copy backwards, from the last byte.
        // SAFETY: the caller upholds the contract; DF is restored before returning.
        unsafe {
            asm!(
                "std",
                "rep movsb",
                "cld",
                inout("rcx") n => _,
                inout("rdi") dst.add(n - 1) => _,
                inout("rsi") src.add(n - 1) => _,
                options(nostack),
            )
        };
    }
    dst
}

/// # Safety
/// C `memset` contract: `n` bytes valid at `dst`.
#[no_mangle]
unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller upholds the contract; DF is clear per the ABI.
    unsafe {
        asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            in("al") c as u8,
            options(nostack, preserves_flags),
        )
    };
    dst
}

/// # Safety
/// C `memcmp` contract: `n` bytes valid at both.
#[no_mangle]
unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    if n == 0 {
        return 0;
    }
    let pa: *const u8;
    let pb: *const u8;
    // SAFETY: the caller upholds the contract; DF is clear per the ABI. `repe cmpsb` stops
    // after the first differing byte (rsi/rdi then point one past it) or after n bytes.
    unsafe {
        asm!(
            "repe cmpsb",
            inout("rcx") n => _,
            inout("rsi") a => pa,
            inout("rdi") b => pb,
            options(readonly, nostack),
        )
    };
    // SAFETY: at least one byte was compared, so both pointers moved past it.
    let (x, y) = unsafe { (*pa.sub(1), *pb.sub(1)) };
    x as i32 - y as i32
}

/// # Safety
/// As `memcmp`; only zero / non-zero is meaningful.
#[no_mangle]
unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: same contract.
    unsafe { memcmp(a, b, n) }
}
