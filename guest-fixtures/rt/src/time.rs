//! Time from the TSC (`rdtsc`, frequency from `BootInfo::tsc_khz`), and bounded waits that fall
//! back to a rough spin count when the host does not know the TSC frequency.

use core::arch::asm;

/// The time-stamp counter.
#[inline]
pub fn rdtsc() -> u64 {
    let lo: u32;
    let hi: u32;
    // SAFETY: reads the TSC (emulated by KVM's instruction emulator, native otherwise).
    unsafe {
        asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    };
    (hi as u64) << 32 | lo as u64
}

/// TSC ticks per millisecond, or 0 if the host did not say.
pub fn tsc_khz() -> u64 {
    crate::bootinfo::boot().tsc_khz as u64
}

/// Convert TSC ticks to nanoseconds at `khz` (saturating; `None` if `khz` is 0).
pub fn ticks_to_ns(ticks: u64, khz: u64) -> Option<u64> {
    if khz == 0 {
        return None;
    }
    let whole = (ticks / khz).saturating_mul(1_000_000);
    Some(whole.saturating_add((ticks % khz) * 1_000_000 / khz))
}

/// Nanoseconds since an arbitrary origin, or `None` if the TSC frequency is unknown.
pub fn now_ns() -> Option<u64> {
    ticks_to_ns(rdtsc(), tsc_khz())
}

/// Wait (spinning with `pause`) until `cond()` holds or about `timeout_ms` milliseconds have
/// passed; returns whether it holds. Uses the TSC when its frequency is known, else a rough
/// iteration count (see [`crate::spins_for_secs`]).
pub fn wait_until(mut cond: impl FnMut() -> bool, timeout_ms: u64) -> bool {
    let khz = tsc_khz();
    if khz == 0 {
        let spins = crate::spins_for_secs(timeout_ms.div_ceil(1000).max(1));
        return crate::sync::spin_until(cond, spins);
    }
    let start = rdtsc();
    let budget = timeout_ms.saturating_mul(khz);
    loop {
        if cond() {
            return true;
        }
        if rdtsc().wrapping_sub(start) > budget {
            return cond();
        }
        core::hint::spin_loop();
    }
}
