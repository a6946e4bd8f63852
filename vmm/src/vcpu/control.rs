//! Kicking, pausing, resuming and stopping vCPUs.
//!
//! Kicking: SIGRTMIN to the vCPU's thread; its handler sets `kvm_run.immediate_exit`, so a
//! kick that lands just before KVM_RUN still makes it return EINTR at once. Pausing: a pauser
//! raises the pause flag, kicks, and waits until no vCPU is in (or about to enter) KVM_RUN. A
//! vCPU announces "running" *before* it checks the flag (both SeqCst), so either it sees the
//! flag and parks, or the pauser sees it running and waits for its kick-induced exit. vCPUs
//! handling an exit (maybe blocked on memconv's lock held by the pauser) are not running, so a
//! vCPU thread may pause the others without deadlock.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;

use super::state::{StateCell, Transition, VcpuState};

/// Errors setting up vCPU control.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(vmm_sys_util::errno::Error),
}

thread_local! {
    /// This thread's vCPU `kvm_run` page, for the kick signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let run = KVM_RUN.with(|c| c.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's live kvm_run mapping (cleared before the VcpuFd
        // is dropped); a single byte store is async-signal-safe.
        unsafe { std::ptr::write_volatile(&mut (*run).immediate_exit, 1) };
    }
}

/// Installs the SIGRTMIN kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let result = INSTALLED.get_or_init(|| {
        vmm_sys_util::signal::register_signal_handler(vmm_sys_util::signal::SIGRTMIN(), on_kick)
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(()) => Ok(()),
        Err(_) => Err(VcpuError::SignalHandler(vmm_sys_util::errno::Error::new(
            libc::EINVAL,
        ))),
    }
}

/// Pause, resume and stop for all vCPU threads of a VM.
pub struct VcpuControl {
    states: Vec<StateCell>,
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Pause depth (pausers nest), guarded with the condvar below.
    park: Mutex<u32>,
    wake: Condvar,
    pauses: AtomicU64,
}

impl VcpuControl {
    /// Control for `cpus` vCPUs (none started yet).
    pub fn new(cpus: u32) -> Self {
        Self {
            states: (0..cpus).map(|_| StateCell::default()).collect(),
            threads: Mutex::new(vec![None; cpus as usize]),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            park: Mutex::new(0),
            wake: Condvar::new(),
            pauses: AtomicU64::new(0),
        }
    }

    fn kick(&self, cpu: usize) {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(tid)) = threads.get(cpu) {
            // SAFETY: tid names a vCPU thread that is not joined before the VM ends.
            unsafe { libc::pthread_kill(*tid, vmm_sys_util::signal::SIGRTMIN()) };
        }
    }

    fn state(&self, cpu: usize) -> VcpuState {
        self.states.get(cpu).map_or(VcpuState::Done, StateCell::get)
    }

    /// Returns once no vCPU runs guest code; they stay out until `resume`. Nests.
    pub fn pause(&self) {
        {
            let mut depth = self.park.lock().unwrap_or_else(|p| p.into_inner());
            *depth += 1;
            self.paused.store(true, Ordering::SeqCst);
        }
        self.pauses.fetch_add(1, Ordering::Relaxed);
        let mut last_kick: Option<Instant> = None;
        loop {
            let running: Vec<usize> = (0..self.states.len())
                .filter(|&cpu| self.state(cpu) == VcpuState::Running)
                .collect();
            if running.is_empty() {
                return;
            }
            // Kick at once, then again every millisecond in case a thread had not yet
            // published its kvm_run page.
            if last_kick.is_none_or(|t| t.elapsed() > Duration::from_millis(1)) {
                for cpu in running {
                    self.kick(cpu);
                }
                last_kick = Some(Instant::now());
            }
            std::thread::yield_now();
        }
    }

    /// Lets vCPUs run again once every pauser has resumed.
    pub fn resume(&self) {
        let mut depth = self.park.lock().unwrap_or_else(|p| p.into_inner());
        *depth = depth.saturating_sub(1);
        if *depth == 0 {
            self.paused.store(false, Ordering::SeqCst);
            self.wake.notify_all();
        }
    }

    /// Whether vCPUs are held paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Number of pause operations so far.
    pub fn pause_count(&self) -> u64 {
        self.pauses.load(Ordering::Relaxed)
    }

    /// Makes every vCPU thread leave its loop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.park.lock().unwrap_or_else(|p| p.into_inner());
            self.wake.notify_all();
        }
        for cpu in 0..self.states.len() {
            if self.state(cpu) == VcpuState::Running {
                self.kick(cpu);
            }
        }
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Whether every vCPU is halted or done: nothing can ever run again.
    pub fn all_halted_or_done(&self) -> bool {
        (0..self.states.len()).all(|cpu| self.state(cpu).is_halted_or_done())
    }

    /// Whether every vCPU is parked, halted or done: none runs guest code or handles an exit
    /// (after `pause`, a vCPU still inside an exit, e.g. a conversion batch, finishes it first).
    pub fn is_quiescent(&self) -> bool {
        (0..self.states.len()).all(|cpu| self.state(cpu).is_quiescent())
    }

    /// The vCPU thread of `cpu` changes its state (the only way states change).
    pub(super) fn transition(&self, cpu: u32, t: Transition) {
        if let Some(cell) = self.states.get(cpu as usize) {
            cell.apply(t);
        }
    }

    /// Registers the calling thread as vCPU `cpu`'s, with its `kvm_run` page, for kicks.
    pub(super) fn register_thread(&self, cpu: u32, run: *mut kvm_run) {
        KVM_RUN.with(|c| c.set(run));
        let mut threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = threads.get_mut(cpu as usize) {
            // SAFETY: pthread_self has no preconditions.
            *slot = Some(unsafe { libc::pthread_self() });
        }
    }

    /// The calling thread's `kvm_run` page is about to go away: kicks no longer touch it.
    pub(super) fn unregister_thread(&self) {
        KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    }

    /// Parks a running vCPU thread while paused; returns false if the VM is stopping.
    pub(super) fn park_while_paused(&self, cpu: u32) -> bool {
        let mut depth = self.park.lock().unwrap_or_else(|p| p.into_inner());
        self.transition(cpu, Transition::Park);
        while *depth > 0 && !self.stopping() {
            depth = self.wake.wait(depth).unwrap_or_else(|p| p.into_inner());
        }
        !self.stopping()
    }

    /// Blocks a halted vCPU until the VM stops (nothing can wake it: there are no interrupts).
    pub(super) fn wait_halted(&self) {
        let mut depth = self.park.lock().unwrap_or_else(|p| p.into_inner());
        while !self.stopping() {
            depth = self.wake.wait(depth).unwrap_or_else(|p| p.into_inner());
        }
    }
}
