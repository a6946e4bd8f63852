//! Waiting without spinning forever: [`SpinThenHalt`] polls a condition for an adaptive
//! budget ([`crate::budget::PollBudget`]), then waits in a host-ended `hlt`
//! ([`crate::arch::hlt_wait`]) watching a shared word, so a vCPU with nothing to do gives its
//! host core back; and [`Idle`], the back-off of a worker that found nothing to do.

use crate::arch::hlt_wait;
use crate::budget::PollBudget;
use crate::time::now_ns;
use core::ptr::read_volatile;

/// A spin-then-halt waiter with its own adaptive budget and counters.
pub struct SpinThenHalt {
    budget: PollBudget,
    halt_us: u64,
    /// Halts so far (each one exit).
    pub halts: u64,
    /// Waits so far.
    pub waits: u64,
}

impl SpinThenHalt {
    /// A waiter polling between `min_ns` and `max_ns` before halting, each halt at most
    /// `halt_us` microseconds.
    pub const fn new(min_ns: u64, max_ns: u64, halt_us: u64) -> Self {
        SpinThenHalt {
            budget: PollBudget::new(min_ns, max_ns),
            halt_us,
            halts: 0,
            waits: 0,
        }
    }

    /// The polling budget now, in nanoseconds.
    pub fn budget_ns(&self) -> u64 {
        self.budget.ns()
    }

    /// Wait until `ready()` holds or `give_up_ns` passes (returns whether it holds). `word`:
    /// the address of a 32-bit word in shared memory that changes when `ready()` may have
    /// become true (the host ends a halt early when it does), or 0.
    pub fn wait(&mut self, mut ready: impl FnMut() -> bool, word: u64, give_up_ns: u64) -> bool {
        if ready() {
            return true;
        }
        self.waits += 1;
        let Some(start) = now_ns() else {
            // No clock: poll (bounded by the caller's own loop).
            return ready();
        };
        let poll_until = start.saturating_add(self.budget.ns());
        let give_up = start.saturating_add(give_up_ns);
        let mut halted = false;
        loop {
            let now = now_ns().unwrap_or(u64::MAX);
            if now >= give_up {
                return ready();
            }
            if now < poll_until {
                if ready() {
                    break;
                }
                core::hint::spin_loop();
                continue;
            }
            // Read the word before the last check: a change after it ends the halt at once.
            let expected = if word != 0 {
                // SAFETY: callers pass the address of a live, aligned 32-bit word.
                unsafe { read_volatile(word as *const u32) }
            } else {
                0
            };
            if ready() {
                break;
            }
            self.halts += 1;
            halted = true;
            let left_us = (give_up - now).div_ceil(1000);
            hlt_wait(word, expected, self.halt_us.min(left_us));
            if ready() {
                break;
            }
        }
        let waited = now_ns().unwrap_or(start).saturating_sub(start);
        self.budget.record(waited, halted);
        true
    }
}

/// The back-off of a loop that finds nothing to do (a pool's background worker): polls for
/// `spin_ns`, then halts for a time that doubles from `min_us` to `max_us` while it stays idle.
pub struct Idle {
    spin_ns: u64,
    min_us: u64,
    max_us: u64,
    idle_since: Option<u64>,
    halt_us: u64,
    /// Halts so far.
    pub halts: u64,
}

impl Idle {
    /// A back-off polling `spin_ns`, then halting `min_us`..`max_us` at a time.
    pub const fn new(spin_ns: u64, min_us: u64, max_us: u64) -> Self {
        Idle {
            spin_ns,
            min_us,
            max_us,
            idle_since: None,
            halt_us: min_us,
            halts: 0,
        }
    }

    /// There was work: poll again next time.
    pub fn busy(&mut self) {
        self.idle_since = None;
        self.halt_us = self.min_us;
    }

    /// There was nothing to do: spin a little, or halt once.
    pub fn nothing(&mut self) {
        let now = now_ns().unwrap_or(0);
        let since = *self.idle_since.get_or_insert(now);
        if now.saturating_sub(since) < self.spin_ns {
            core::hint::spin_loop();
            return;
        }
        self.halts += 1;
        hlt_wait(0, 0, self.halt_us);
        self.halt_us = (self.halt_us * 2).min(self.max_us);
    }
}
