//! Waiting vCPUs ([`HaltWaker`]): a vCPU whose guest executed `hlt` with
//! [`abi::HLT_WAIT_MAGIC`] in `rax` ([`HaltWait`]) blocks its thread here until something may
//! have changed for it: a device completed requests, another vCPU halted for good, the VM
//! ends, or the wait's timeout passes. No interrupt controller is needed: the guest re-checks
//! its condition after the `hlt`, so a wake-up is only a hint.
//!
//! # No lost wake-up
//! The guest names a shared 32-bit word and the value it last saw there (for the block driver:
//! its used ring's flags and index). The waiter registers itself (SeqCst) under the waker's
//! lock and only then reads the word; a waker first publishes its memory writes, fences
//! (SeqCst) and then checks for waiters. So either the waiter sees the new word and returns at
//! once, or the waker sees the waiter and bumps the generation under the lock, which the
//! waiter, already blocked on the condition variable, receives. A word in private memory is
//! not read (the host does not look at private memory): such a wait ends on the next wake-up
//! or its timeout.

use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use memconv::abi;

/// A `hlt` wait the guest asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HaltWait {
    /// GPA of the 32-bit word to watch (4-byte aligned), if any.
    pub word: Option<u64>,
    /// The value the guest last saw there.
    pub expected: u32,
    /// Longest wait (clamped to [`abi::HLT_WAIT_MAX_US`]).
    pub timeout: Duration,
}

impl HaltWait {
    /// The wait a `hlt` with these registers asks for, or None (the vCPU is done).
    pub fn from_regs(rax: u64, rbx: u64, rcx: u64, rdx: u64) -> Option<HaltWait> {
        if rax != abi::HLT_WAIT_MAGIC {
            return None;
        }
        Some(HaltWait {
            word: (rbx != 0 && rbx.is_multiple_of(4)).then_some(rbx),
            expected: rcx as u32,
            timeout: Duration::from_micros(rdx.min(abi::HLT_WAIT_MAX_US)),
        })
    }
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitEnd {
    /// The watched word had already changed: no wait.
    Changed,
    /// A waker signalled.
    Woken,
    /// The timeout passed.
    TimedOut,
}

/// Where waiting vCPUs block and what wakes them (see the module docs).
#[derive(Default)]
pub struct HaltWaker {
    generation: Mutex<u64>,
    cv: Condvar,
    waiters: AtomicU32,
    waits: AtomicU64,
    wakeups: AtomicU64,
}

impl HaltWaker {
    /// Wakes every waiting vCPU if there is one. Call after the memory writes the waiters
    /// may watch (costs one fence and one load when nobody waits).
    pub fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.waiters.load(Ordering::SeqCst) == 0 {
            return;
        }
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        *g = g.wrapping_add(1);
        self.wakeups.fetch_add(1, Ordering::Relaxed);
        self.cv.notify_all();
    }

    /// Blocks until woken or `timeout` passes, unless `unchanged()` (evaluated once the waiter
    /// is registered) says the condition already changed.
    pub fn wait(&self, timeout: Duration, unchanged: impl FnOnce() -> bool) -> WaitEnd {
        let mut g = self.generation.lock().unwrap_or_else(|p| p.into_inner());
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let end = if !unchanged() {
            WaitEnd::Changed
        } else {
            self.waits.fetch_add(1, Ordering::Relaxed);
            let start = *g;
            let deadline = Instant::now() + timeout;
            loop {
                if *g != start {
                    break WaitEnd::Woken;
                }
                let now = Instant::now();
                if now >= deadline {
                    break WaitEnd::TimedOut;
                }
                g = self
                    .cv
                    .wait_timeout(g, deadline - now)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        };
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        end
    }

    /// (waits that blocked, wake-ups sent) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.waits.load(Ordering::Relaxed),
            self.wakeups.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn registers_decode() {
        let w = HaltWait::from_regs(abi::HLT_WAIT_MAGIC, 0x1000, 7, 5_000_000).unwrap();
        assert_eq!(w.word, Some(0x1000));
        assert_eq!(w.expected, 7);
        assert_eq!(w.timeout, Duration::from_micros(abi::HLT_WAIT_MAX_US));
        assert_eq!(
            HaltWait::from_regs(abi::HLT_WAIT_MAGIC, 0x1002, 0, 1)
                .unwrap()
                .word,
            None
        );
        assert_eq!(HaltWait::from_regs(0, 0x1000, 0, 1), None);
    }

    #[test]
    fn changed_word_does_not_block_and_timeout_ends_a_wait() {
        let w = HaltWaker::default();
        let t = Instant::now();
        assert_eq!(w.wait(Duration::from_secs(5), || false), WaitEnd::Changed);
        assert!(t.elapsed() < Duration::from_secs(1));
        assert_eq!(
            w.wait(Duration::from_millis(20), || true),
            WaitEnd::TimedOut
        );
        assert!(t.elapsed() >= Duration::from_millis(20));
    }

    #[test]
    fn a_write_before_wake_is_never_lost() {
        // The waker's "device" sets the flag then wakes; the waiter must either see the flag
        // or be woken, never sleep out its (long) timeout.
        for _ in 0..200 {
            let w = Arc::new(HaltWaker::default());
            let flag = Arc::new(AtomicBool::new(false));
            let (w2, f2) = (Arc::clone(&w), Arc::clone(&flag));
            let t = std::thread::spawn(move || {
                f2.store(true, Ordering::SeqCst);
                w2.wake();
            });
            let start = Instant::now();
            let end = w.wait(Duration::from_secs(10), || !flag.load(Ordering::SeqCst));
            t.join().unwrap();
            assert_ne!(end, WaitEnd::TimedOut);
            assert!(start.elapsed() < Duration::from_secs(5));
        }
    }
}
