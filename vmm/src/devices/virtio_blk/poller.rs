//! The polling thread that serves every queue, its adaptive polling budget, and its doorbell.
//!
//! # Doorbell / sleep protocol (no exit per request)
//!
//! A VMM thread (the poller) serves every queue: it processes whatever the available rings
//! hold, and keeps polling while work arrives. After an idle spell (`BlkConfig::idle`) it
//! goes to sleep, and first tells the driver so through the standard notification
//! suppression of virtio-queue: with VIRTIO_RING_F_EVENT_IDX it writes `avail_event` =
//! the next available index it has not seen (so the driver's next submission crosses it and
//! the driver notifies); without it, it clears VRING_USED_F_NO_NOTIFY (set while it polls).
//! Then it re-reads the available index after a full fence (no lost wake-up: the driver
//! publishes its index, fences, then reads `avail_event`) and sleeps on a condition variable
//! until a QueueNotify write (the doorbell, one MMIO exit) or the end of the VM. While awake
//! the device never asks for notifications, so a driver submitting to an awake device never
//! exits. Completions are written to the used ring, and then vCPUs waiting in a `hlt` for
//! them are woken (`crate::wait`; this VM has no interrupt controller): the driver polls the
//! used ring for a while, then halts.
//!
//! The idle spell is adaptive ([`Budget`]): the poller polls for a few recent inter-batch
//! gaps, at most `BlkConfig::idle`, so a busy host does not lose a core to a poller whose
//! driver has gone to wait.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use memconv::log_limit::LogLimiter;

use super::queue::Core;
use super::stats::bump;
use crate::wait::HaltWaker;

/// How vCPU threads and the host wake the sleeping poller or stop it.
#[derive(Default)]
pub struct Wakeup {
    kicked: Mutex<bool>,
    wake: Condvar,
    stop: AtomicBool,
}

impl Wakeup {
    /// Wakes the poller if it sleeps (a doorbell, DRIVER_OK, or the stop).
    pub fn kick(&self) {
        let mut k = self.kicked.lock().unwrap_or_else(|p| p.into_inner());
        *k = true;
        self.wake.notify_one();
    }

    /// Makes the poller leave its loop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }

    /// Sleeps until kicked or stopped.
    fn sleep(&self) {
        let mut k = self.kicked.lock().unwrap_or_else(|p| p.into_inner());
        while !*k && !self.stop.load(Ordering::SeqCst) {
            k = self.wake.wait(k).unwrap_or_else(|p| p.into_inner());
        }
        *k = false;
    }
}

/// The poller's polling budget: how long it keeps polling an empty queue before it sleeps.
/// It follows the recent gaps between the end of one batch of work and the next (an EWMA):
/// four times that gap, between [`MIN_BUDGET`] and the configured idle spell. A driver that
/// submits back to back keeps the poller awake; a driver that went to wait in a `hlt` (or a
/// host too busy to run it) stops costing a core after a few gaps' worth of polling.
#[derive(Debug)]
pub struct Budget {
    gap_ns: u64,
    max_ns: u64,
}

/// The shortest polling budget.
pub const MIN_BUDGET: Duration = Duration::from_micros(20);

impl Budget {
    /// A budget of at most `max` (starts there).
    pub fn new(max: Duration) -> Self {
        let max_ns = (max.as_nanos() as u64).max(MIN_BUDGET.as_nanos() as u64);
        Budget {
            gap_ns: max_ns / 4,
            max_ns,
        }
    }

    /// Work arrived `gap` after the previous batch ended (found by polling).
    pub fn work_after(&mut self, gap: Duration) {
        let g = (gap.as_nanos() as u64).min(self.max_ns);
        self.gap_ns = (self.gap_ns * 7 + g) / 8;
    }

    /// The poller slept: the next wake-up starts from a short budget's gap again only if the
    /// work keeps coming; a sleep says the gaps are long.
    pub fn slept(&mut self) {
        self.gap_ns = (self.gap_ns * 2).min(self.max_ns);
    }

    /// How long to poll now.
    pub fn now(&self) -> Duration {
        Duration::from_nanos((self.gap_ns * 4).clamp(MIN_BUDGET.as_nanos() as u64, self.max_ns))
    }
}

/// The poller thread's body: serves `core` until `wakeup` says stop, sleeping after an
/// adaptive polling budget (at most `idle`) without work; after every round that completed
/// requests it wakes vCPUs waiting in a `hlt` (`waker`, once the VM installs one).
pub fn poll_loop(core: &Core, wakeup: &Wakeup, idle: Duration, waker: &OnceLock<Arc<HaltWaker>>) {
    let mut budget = Budget::new(idle);
    let mut last_work = Instant::now();
    let mut idle_since: Option<Instant> = None;
    while !wakeup.stop.load(Ordering::Relaxed) {
        let (done, active) = core.service_round();
        if done > 0 {
            if let Some(w) = waker.get() {
                w.wake();
            }
            if let Some(t) = idle_since.take() {
                budget.work_after(t.elapsed());
            }
            if tracing::enabled!(tracing::Level::DEBUG) {
                static ROUNDS: LogLimiter = LogLimiter::new(10);
                if ROUNDS.allow() {
                    tracing::debug!(
                        "virtio-blk: {done} requests completed this round, {} so far ({} rounds not shown so far)",
                        core.counters.requests.load(Ordering::Relaxed),
                        ROUNDS.suppressed()
                    );
                }
            }
            last_work = Instant::now();
            continue;
        }
        if idle_since.is_none() {
            idle_since = Some(Instant::now());
        }
        if active && last_work.elapsed() < budget.now() {
            std::thread::yield_now();
            continue;
        }
        if core.prepare_sleep() {
            // Work arrived while announcing the sleep: keep polling.
            last_work = Instant::now();
            continue;
        }
        bump(&core.counters.sleeps, 1);
        if active {
            budget.slept();
        }
        let slept = Instant::now();
        wakeup.sleep();
        core.after_wake();
        idle_since = None;
        if tracing::enabled!(tracing::Level::DEBUG) {
            static SLEEPS: LogLimiter = LogLimiter::new(10);
            if SLEEPS.allow() {
                tracing::debug!(
                    "virtio-blk: poller slept {} after {} idle, woken by a doorbell or the end ({} sleeps not shown so far)",
                    memconv::stats::units::duration(slept.elapsed().as_nanos() as u64),
                    memconv::stats::units::duration(idle.as_nanos() as u64),
                    SLEEPS.suppressed()
                );
            }
        }
        last_work = Instant::now();
    }
}

#[cfg(test)]
mod budget_tests {
    use super::*;

    #[test]
    fn budget_follows_gaps_within_bounds() {
        let mut b = Budget::new(Duration::from_millis(2));
        assert_eq!(b.now(), Duration::from_millis(2));
        for _ in 0..64 {
            b.work_after(Duration::from_micros(1));
        }
        assert_eq!(b.now(), MIN_BUDGET);
        for _ in 0..64 {
            b.work_after(Duration::from_micros(100));
        }
        let n = b.now();
        assert!(
            n > Duration::from_micros(300) && n <= Duration::from_micros(400),
            "{n:?}"
        );
        for _ in 0..16 {
            b.slept();
        }
        assert_eq!(b.now(), Duration::from_millis(2));
    }
}
