//! The polling thread that serves every queue, and its doorbell.
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
//! exits. Completions are only written to the used ring: the guest polls it (this VM has no
//! interrupt controller).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use memconv::log_limit::LogLimiter;

use super::queue::Core;
use super::stats::bump;

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

/// The poller thread's body: serves `core` until `wakeup` says stop, sleeping after `idle`
/// without work.
pub fn poll_loop(core: &Core, wakeup: &Wakeup, idle: Duration) {
    let mut last_work = Instant::now();
    while !wakeup.stop.load(Ordering::Relaxed) {
        let (done, active) = core.service_round();
        if done > 0 {
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
        if active && last_work.elapsed() < idle {
            std::thread::yield_now();
            continue;
        }
        if core.prepare_sleep() {
            // Work arrived while announcing the sleep: keep polling.
            last_work = Instant::now();
            continue;
        }
        bump(&core.counters.sleeps, 1);
        let slept = Instant::now();
        wakeup.sleep();
        core.after_wake();
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
