//! The end-of-VM rendezvous: why a VM ended ([`VmEnd`]; the first reason wins), waiting for
//! it, and the eventfd that wakes the control socket's event loop when it happens.

use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_sys_util::eventfd::EventFd;

/// Why a VM ended.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmEnd {
    /// The guest sent EXIT.
    GuestExit {
        /// The vCPU that sent it.
        cpu: u32,
        /// The guest's exit code.
        code: u64,
    },
    /// A vCPU crashed: triple fault, emulation failure, failed entry.
    Crash {
        /// The vCPU that crashed.
        cpu: u32,
        /// What happened.
        reason: String,
        /// Its registers at the crash.
        registers: String,
    },
    /// Every vCPU halted with interrupts unavailable: nothing can ever run again.
    AllHalted,
    /// The host asked the VM to stop.
    Stopped,
    /// A stop signal (SIGINT, SIGTERM, SIGHUP) stopped the VM as `vmm ctl shutdown` would.
    Signal {
        /// Its name, e.g. `SIGTERM`.
        signal: String,
        /// Its number; `vmm run` exits with 128 + it.
        number: i32,
    },
    /// A device's host thread failed (a panic, caught): the VM cannot go on.
    DeviceFailed {
        /// The device, e.g. `virtio-blk`.
        device: String,
        /// What happened.
        error: String,
    },
    /// The guest touched private memory it never accepted (the chunk has no memslot): the VM
    /// is stopped, as a TD is. Counted as `unaccepted_accesses` in the statistics.
    UnacceptedAccess {
        /// The vCPU that touched it.
        cpu: u32,
        /// The guest physical address touched.
        gpa: u64,
    },
    /// KVM_RUN failed, or the vCPU's host thread panicked (caught).
    HostError {
        /// The vCPU whose KVM_RUN failed.
        cpu: u32,
        /// The error.
        error: String,
    },
}

/// Where the VM's end is recorded and waited for.
#[derive(Default)]
pub struct EndRendezvous {
    end: Mutex<Option<VmEnd>>,
    ended: Condvar,
    /// Signalled when the VM ends (wakes the control socket's event loop).
    notify: OnceLock<EventFd>,
}

impl EndRendezvous {
    /// Records `why` unless an end is already recorded, and wakes the waiters.
    pub fn record(&self, why: VmEnd) {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        if end.is_none() {
            *end = Some(why);
        }
        self.ended.notify_all();
    }

    /// Writes the end notifier, if one is installed.
    pub fn signal(&self) {
        if let Some(fd) = self.notify.get() {
            if let Err(e) = fd.write(1) {
                tracing::warn!("cannot signal the VM's end: {e}");
            }
        }
    }

    /// Has `fd` written to when the VM ends (once; later calls are ignored).
    pub fn set_notifier(&self, fd: EventFd) {
        let _ = self.notify.set(fd);
    }

    /// Blocks until the VM has ended, or `timeout` passes; returns the reason if ended.
    pub fn wait(&self, timeout: Option<Duration>) -> Option<VmEnd> {
        let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        let deadline = timeout.map(|t| Instant::now() + t);
        while end.is_none() {
            match deadline {
                None => end = self.ended.wait(end).unwrap_or_else(|p| p.into_inner()),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return None;
                    }
                    end = self
                        .ended
                        .wait_timeout(end, d - now)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
        end.clone()
    }
}
