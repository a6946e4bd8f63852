//! vCPU threads: the per-vCPU run loop as an explicit state machine, exit dispatch (port I/O,
//! doorbell, HLT, hypercalls, crashes), and the control that pauses, resumes and stops vCPUs
//! by kicking them out of KVM_RUN.
//!
//! Kicking: SIGRTMIN to the vCPU's thread; its handler sets `kvm_run.immediate_exit`, so a
//! kick that lands just before KVM_RUN still makes it return EINTR at once. Pausing: a pauser
//! raises the pause flag, kicks, and waits until no vCPU is in (or about to enter) KVM_RUN. A
//! vCPU announces "running" *before* it checks the flag (both SeqCst), so either it sees the
//! flag and parks, or the pauser sees it running and waits for its kick-induced exit. vCPUs
//! handling an exit (maybe blocked on memconv's lock held by the pauser) are not running, so a
//! vCPU thread may pause the others without deadlock.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{HypercallExit, VcpuExit, VcpuFd};
use memconv::abi;
use memconv::stats::PoolReportSnapshot;
use memconv::{ConversionService, MailboxOutcome};
use serde::Serialize;

use crate::devices::Devices;
use crate::serial::{Console, SERIAL_PORTS};

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
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
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

// vCPU thread states, as seen by the pauser.
const STATE_RUNNING: u8 = 0;
const STATE_OUTSIDE: u8 = 1;
const STATE_PARKED: u8 = 2;
const STATE_HALTED: u8 = 3;
const STATE_DONE: u8 = 4;

/// Pause, resume and stop for all vCPU threads of a VM.
pub struct VcpuControl {
    states: Vec<AtomicU8>,
    threads: Mutex<Vec<Option<libc::pthread_t>>>,
    paused: AtomicBool,
    stop: AtomicBool,
    /// Pause depth (pausers nest), guarded with the condvar below.
    park: Mutex<u32>,
    wake: Condvar,
    pauses: std::sync::atomic::AtomicU64,
}

impl VcpuControl {
    /// Control for `cpus` vCPUs (none started yet).
    pub fn new(cpus: u32) -> Self {
        Self {
            states: (0..cpus).map(|_| AtomicU8::new(STATE_OUTSIDE)).collect(),
            threads: Mutex::new(vec![None; cpus as usize]),
            paused: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            park: Mutex::new(0),
            wake: Condvar::new(),
            pauses: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn kick(&self, cpu: usize) {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(Some(tid)) = threads.get(cpu) {
            // SAFETY: tid names a vCPU thread that is not joined before the VM ends.
            unsafe { libc::pthread_kill(*tid, vmm_sys_util::signal::SIGRTMIN()) };
        }
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
            let running: Vec<usize> = self
                .states
                .iter()
                .enumerate()
                .filter(|(_, s)| s.load(Ordering::SeqCst) == STATE_RUNNING)
                .map(|(i, _)| i)
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
            if self.states[cpu].load(Ordering::SeqCst) == STATE_RUNNING {
                self.kick(cpu);
            }
        }
    }

    /// Whether the VM is stopping.
    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn set_state(&self, cpu: u32, state: u8) {
        self.states[cpu as usize].store(state, Ordering::SeqCst);
    }

    fn all_halted_or_done(&self) -> bool {
        self.states.iter().all(|s| {
            let s = s.load(Ordering::SeqCst);
            s == STATE_HALTED || s == STATE_DONE
        })
    }

    /// Whether every vCPU is parked, halted or done: none runs guest code or handles an exit
    /// (after `pause`, a vCPU still inside an exit, e.g. a conversion batch, finishes it first).
    pub fn is_quiescent(&self) -> bool {
        self.states.iter().all(|s| {
            let s = s.load(Ordering::SeqCst);
            s == STATE_PARKED || s == STATE_HALTED || s == STATE_DONE
        })
    }

    /// Blocks a vCPU thread while paused; returns false if the VM is stopping.
    fn park_while_paused(&self, cpu: u32) -> bool {
        let mut depth = self.park.lock().unwrap_or_else(|p| p.into_inner());
        self.set_state(cpu, STATE_PARKED);
        while *depth > 0 && !self.stopping() {
            depth = self.wake.wait(depth).unwrap_or_else(|p| p.into_inner());
        }
        !self.stopping()
    }

    /// Blocks a halted vCPU until the VM stops (nothing can wake it: there are no interrupts).
    fn wait_halted(&self, cpu: u32) {
        let mut depth = self.park.lock().unwrap_or_else(|p| p.into_inner());
        self.set_state(cpu, STATE_HALTED);
        while !self.stopping() {
            depth = self.wake.wait(depth).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Why a VM ended.
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VmEnd {
    /// The guest sent EXIT.
    GuestExit { cpu: u32, code: u64 },
    /// A vCPU crashed: triple fault, emulation failure, failed entry.
    Crash {
        cpu: u32,
        reason: String,
        registers: String,
    },
    /// Every vCPU halted with interrupts unavailable: nothing can ever run again.
    AllHalted,
    /// The host asked the VM to stop.
    Stopped,
    /// KVM_RUN failed.
    HostError { cpu: u32, error: String },
}

/// Per-vCPU exit counts by reason.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExitCounts {
    /// All exits out of KVM_RUN, kicks included.
    pub total: u64,
    /// Port writes.
    pub io_out: u64,
    /// Port reads.
    pub io_in: u64,
    /// Serial console accesses (part of io_out/io_in).
    pub serial: u64,
    /// Doorbell rings (part of io_out).
    pub doorbell: u64,
    /// Accesses to ports no device owns (part of io_out/io_in).
    pub unknown_port: u64,
    /// MMIO reads and writes.
    pub mmio: u64,
    /// MMIO accesses no device owns.
    pub unknown_mmio: u64,
    /// HLT exits.
    pub hlt: u64,
    /// KVM_EXIT_HYPERCALL exits.
    pub hypercall: u64,
    /// Kicks (EINTR) and KVM_EXIT_INTR.
    pub interrupted: u64,
    /// Anything else.
    pub other: u64,
}

/// Everything vCPU threads share.
pub struct VmShared {
    /// The conversion service.
    pub memconv: Arc<ConversionService>,
    /// COM1.
    pub console: Console,
    /// Pause/stop.
    pub control: Arc<VcpuControl>,
    end: Mutex<Option<VmEnd>>,
    ended: Condvar,
    /// One lock per vCPU: publishing after every exit never contends across vCPUs.
    counts: Vec<Mutex<ExitCounts>>,
    unknown_ports: Mutex<std::collections::BTreeMap<u16, u64>>,
    started: Instant,
    pool_timeline: Mutex<PoolTimeline>,
    devices: Arc<Devices>,
    /// Signalled when the VM ends (wakes the control socket's event loop).
    end_notify: std::sync::OnceLock<vmm_sys_util::eventfd::EventFd>,
}

/// One guest pool report, as time series point.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PoolSample {
    /// Milliseconds since the vCPUs started.
    pub t_ms: f64,
    /// Bytes the guest held shared.
    pub shared_bytes: u64,
    /// Bytes mapped by drivers.
    pub used_bytes: u64,
    /// Pool capacity.
    pub capacity_bytes: u64,
    /// Maps so far.
    pub maps: u64,
    /// Failed maps so far.
    pub map_failures: u64,
    /// Throttle waits so far.
    pub throttle_waits: u64,
}

/// Guest pool reports over time, bounded: when full, every other sample is dropped and the
/// minimum spacing doubles, so a long run keeps an even-spaced history of at most `MAX` points.
#[derive(Debug, Default)]
pub struct PoolTimeline {
    samples: Vec<PoolSample>,
    spacing_ms: f64,
}

impl PoolTimeline {
    const MAX: usize = 2048;

    /// Adds a sample unless it is closer than the current spacing to the previous one.
    pub fn push(&mut self, sample: PoolSample) {
        if let Some(last) = self.samples.last() {
            if sample.t_ms - last.t_ms < self.spacing_ms {
                return;
            }
        }
        if self.samples.len() >= Self::MAX {
            let kept: Vec<PoolSample> = self.samples.iter().step_by(2).copied().collect();
            self.samples = kept;
            self.spacing_ms = (self.spacing_ms * 2.0).max(1.0);
        }
        self.samples.push(sample);
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> &[PoolSample] {
        &self.samples
    }
}

impl VmShared {
    /// Shared state for a VM with `cpus` vCPUs.
    pub fn new(
        memconv: Arc<ConversionService>,
        console: Console,
        control: Arc<VcpuControl>,
        cpus: u32,
    ) -> Self {
        Self {
            memconv,
            console,
            control,
            end: Mutex::new(None),
            ended: Condvar::new(),
            counts: (0..cpus)
                .map(|_| Mutex::new(ExitCounts::default()))
                .collect(),
            unknown_ports: Mutex::new(Default::default()),
            started: Instant::now(),
            pool_timeline: Mutex::new(PoolTimeline::default()),
            devices: Arc::new(Devices::none()),
            end_notify: std::sync::OnceLock::new(),
        }
    }

    /// The same, with the devices of the MMIO window (MMIO exits are routed to them).
    pub fn with_devices(mut self, devices: Arc<Devices>) -> Self {
        self.devices = devices;
        self
    }

    /// Ends the VM (the first reason wins) and stops every vCPU.
    pub fn end(&self, why: VmEnd) {
        {
            let mut end = self.end.lock().unwrap_or_else(|p| p.into_inner());
            if end.is_none() {
                *end = Some(why);
            }
            self.ended.notify_all();
        }
        self.control.stop();
        if let Some(fd) = self.end_notify.get() {
            if let Err(e) = fd.write(1) {
                tracing::warn!("cannot signal the VM's end: {e}");
            }
        }
    }

    /// Has `fd` written to when the VM ends (once; later calls are ignored). The VM may
    /// already have ended: check [`VmShared::wait_end`] after installing it.
    pub fn set_end_notifier(&self, fd: vmm_sys_util::eventfd::EventFd) {
        let _ = self.end_notify.set(fd);
    }

    /// Blocks until the VM has ended, or `timeout` passes; returns the reason if ended.
    pub fn wait_end(&self, timeout: Option<Duration>) -> Option<VmEnd> {
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

    /// A copy of every vCPU's exit counts.
    pub fn exit_counts(&self) -> Vec<ExitCounts> {
        self.counts
            .iter()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Unknown ports touched, with access counts.
    pub fn unknown_ports(&self) -> std::collections::BTreeMap<u16, u64> {
        self.unknown_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a guest pool report in the timeline.
    fn note_pool_report(&self, r: &PoolReportSnapshot) {
        let sample = PoolSample {
            t_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            shared_bytes: r.shared_bytes,
            used_bytes: r.used_bytes,
            capacity_bytes: r.capacity_bytes,
            maps: r.maps,
            map_failures: r.map_failures,
            throttle_waits: r.throttle_waits,
        };
        self.pool_timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sample);
    }

    /// The guest pool reports received so far, over time.
    pub fn pool_timeline(&self) -> Vec<PoolSample> {
        self.pool_timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .samples()
            .to_vec()
    }

    fn note_unknown_port(&self, port: u16) {
        let mut ports = self.unknown_ports.lock().unwrap_or_else(|p| p.into_inner());
        let n = ports.entry(port).or_insert(0);
        if *n == 0 {
            tracing::warn!("guest accessed port {port:#x}, which no device owns");
        }
        *n += 1;
    }
}

/// What the run loop does after an exit.
#[derive(Debug)]
enum Next {
    /// Enter the guest again.
    Run,
    /// The vCPU executed HLT.
    Halt,
    /// The VM ends.
    End(VmEnd),
    /// The vCPU crashed; the loop adds the register dump.
    Crash(String),
}

/// Maps a memconv status to the KVM_HC_MAP_GPA_RANGE return value a Linux guest expects.
pub fn hypercall_return(status: u32) -> u64 {
    const KVM_EINVAL: i64 = 22;
    const KVM_ENOMEM: i64 = 12;
    match status {
        abi::STATUS_OK => 0,
        abi::ERR_NO_MEMORY => (-KVM_ENOMEM) as u64,
        _ => (-KVM_EINVAL) as u64,
    }
}

/// The standard path: KVM_EXIT_HYPERCALL with KVM_HC_MAP_GPA_RANGE reaches the same engine as
/// the mailbox. Other hypercalls fail with -KVM_ENOSYS. Returns whether it was a conversion.
pub fn handle_hypercall(memconv: &ConversionService, exit: HypercallExit<'_>) -> bool {
    const KVM_ENOSYS: i64 = 1000;
    if exit.nr == abi::KVM_HC_MAP_GPA_RANGE {
        let status = memconv.map_gpa_range(exit.args[0], exit.args[1], exit.args[2]);
        *exit.ret = hypercall_return(status);
        true
    } else {
        *exit.ret = (-KVM_ENOSYS) as u64;
        false
    }
}

fn dispatch(shared: &VmShared, cpu: u32, counts: &mut ExitCounts, exit: VcpuExit<'_>) -> Next {
    let serial_range = abi::SERIAL_PORT..abi::SERIAL_PORT + SERIAL_PORTS;
    match exit {
        VcpuExit::IoOut(port, data) => {
            counts.io_out += 1;
            if serial_range.contains(&port) {
                counts.serial += 1;
                if let Some(byte) = data.first() {
                    shared.console.write((port - abi::SERIAL_PORT) as u8, *byte);
                }
                Next::Run
            } else if port == abi::DOORBELL_PORT {
                counts.doorbell += 1;
                match shared.memconv.service_mailbox(cpu) {
                    MailboxOutcome::Exit(code) => Next::End(VmEnd::GuestExit { cpu, code }),
                    MailboxOutcome::Report(report) => {
                        shared.note_pool_report(&report);
                        Next::Run
                    }
                    _ => Next::Run,
                }
            } else {
                counts.unknown_port += 1;
                shared.note_unknown_port(port);
                Next::Run
            }
        }
        VcpuExit::IoIn(port, data) => {
            counts.io_in += 1;
            if serial_range.contains(&port) {
                counts.serial += 1;
                let value = shared.console.read((port - abi::SERIAL_PORT) as u8);
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = value;
                }
            } else {
                counts.unknown_port += 1;
                shared.note_unknown_port(port);
                data.fill(0xff);
            }
            Next::Run
        }
        VcpuExit::MmioRead(addr, data) => {
            counts.mmio += 1;
            if !shared.devices.mmio_read(addr, data) {
                counts.unknown_mmio += 1;
                data.fill(0xff);
            }
            Next::Run
        }
        VcpuExit::MmioWrite(addr, data) => {
            counts.mmio += 1;
            if !shared.devices.mmio_write(addr, data) {
                counts.unknown_mmio += 1;
            }
            Next::Run
        }
        VcpuExit::Hlt => {
            counts.hlt += 1;
            Next::Halt
        }
        VcpuExit::Hypercall(h) => {
            counts.hypercall += 1;
            handle_hypercall(&shared.memconv, h);
            Next::Run
        }
        VcpuExit::Intr => {
            counts.interrupted += 1;
            Next::Run
        }
        VcpuExit::Shutdown => Next::Crash("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::InternalError => Next::Crash("KVM internal error (emulation failure)".into()),
        VcpuExit::FailEntry(reason, hw_cpu) => Next::Crash(format!(
            "VM entry failed: hardware reason {reason:#x} on host cpu {hw_cpu}"
        )),
        VcpuExit::SystemEvent(kind, _) => Next::Crash(format!("system event {kind}")),
        other => {
            counts.other += 1;
            Next::Crash(format!("unhandled exit {other:?}"))
        }
    }
}

/// Formats the registers of a crashed vCPU.
fn register_dump(fd: &mut VcpuFd) -> String {
    let mut out = String::new();
    if let Ok(r) = fd.get_regs() {
        out.push_str(&format!(
            "rip={:#018x} rsp={:#018x} rflags={:#x}\n\
             rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}\n\
             rsi={:#018x} rdi={:#018x} rbp={:#018x}\n\
             r8={:#018x} r9={:#018x} r10={:#018x} r11={:#018x}\n\
             r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}\n",
            r.rip,
            r.rsp,
            r.rflags,
            r.rax,
            r.rbx,
            r.rcx,
            r.rdx,
            r.rsi,
            r.rdi,
            r.rbp,
            r.r8,
            r.r9,
            r.r10,
            r.r11,
            r.r12,
            r.r13,
            r.r14,
            r.r15
        ));
    }
    if let Ok(s) = fd.get_sregs() {
        out.push_str(&format!(
            "cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} efer={:#x}\n\
             cs={:#x} ss={:#x} idt={:#x}/{:#x} gdt={:#x}/{:#x}\n",
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            s.ss.selector,
            s.idt.base,
            s.idt.limit,
            s.gdt.base,
            s.gdt.limit
        ));
    }
    let run = fd.get_kvm_run();
    if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        // SAFETY: for KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal` union member.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        out.push_str(&format!(
            "internal error suberror={} data={:x?}\n",
            internal.suberror,
            &internal.data[..n]
        ));
    }
    out
}

/// One vCPU thread's body: runs until the VM ends.
pub fn run_vcpu(mut fd: VcpuFd, cpu: u32, shared: Arc<VmShared>) {
    let control = Arc::clone(&shared.control);
    let run_ptr: *mut kvm_run = fd.get_kvm_run();
    KVM_RUN.with(|c| c.set(run_ptr));
    {
        let mut threads = control.threads.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: pthread_self has no preconditions.
        threads[cpu as usize] = Some(unsafe { libc::pthread_self() });
    }
    let mut counts = ExitCounts::default();
    loop {
        if control.stopping() {
            break;
        }
        control.set_state(cpu, STATE_RUNNING);
        if control.is_paused() {
            if !control.park_while_paused(cpu) {
                break;
            }
            continue;
        }
        if control.stopping() {
            break;
        }
        let result = fd.run();
        control.set_state(cpu, STATE_OUTSIDE);
        counts.total += 1;
        let next = match result {
            Ok(exit) => dispatch(&shared, cpu, &mut counts, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                counts.interrupted += 1;
                Next::Run
            }
            Err(e) => Next::End(VmEnd::HostError {
                cpu,
                error: format!("KVM_RUN failed: {e}"),
            }),
        };
        match next {
            Next::Run => {}
            Next::Halt => {
                control.set_state(cpu, STATE_HALTED);
                if control.all_halted_or_done() {
                    shared.end(VmEnd::AllHalted);
                }
                publish_counts(&shared, cpu, &counts);
                control.wait_halted(cpu);
                break;
            }
            Next::End(why) => {
                publish_counts(&shared, cpu, &counts);
                shared.end(why);
                break;
            }
            Next::Crash(reason) => {
                let registers = register_dump(&mut fd);
                tracing::debug!("vCPU {cpu}: {reason}\n{registers}");
                publish_counts(&shared, cpu, &counts);
                shared.end(VmEnd::Crash {
                    cpu,
                    reason,
                    registers,
                });
                break;
            }
        }
        // After every exit (this vCPU's own, uncontended lock and a 96-byte copy, against an
        // exit's ~10-80 us): readers such as the control socket see exact counts.
        publish_counts(&shared, cpu, &counts);
    }
    publish_counts(&shared, cpu, &counts);
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
    control.set_state(cpu, STATE_DONE);
}

fn publish_counts(shared: &VmShared, cpu: u32, counts: &ExitCounts) {
    if let Some(slot) = shared.counts.get(cpu as usize) {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = counts.clone();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::{open_kvm, KvmVm, VmHost};
    use memconv::{Granularity, RamConfig, StoreKind};

    /// A real VM's conversion service (no vCPUs needed for the hypercall path).
    fn service() -> (KvmVm, Arc<ConversionService>) {
        let vm = KvmVm::new(open_kvm().expect("/dev/kvm is needed for this test")).unwrap();
        let host = Arc::new(VmHost::new(Arc::clone(&vm.fd)));
        let svc = ConversionService::new(
            RamConfig {
                size: 32 << 20,
                private: StoreKind::Memfd,
                shared: StoreKind::Memfd,
                granularity: Granularity::Page4K,
                cpus: 1,
            },
            host,
        )
        .unwrap();
        (vm, Arc::new(svc))
    }

    fn hypercall(svc: &ConversionService, nr: u64, args: [u64; 6]) -> (bool, u64) {
        let mut ret = 0xdead_beef;
        let handled = handle_hypercall(
            svc,
            HypercallExit {
                nr,
                args,
                ret: &mut ret,
                longmode: 1,
            },
        );
        (handled, ret)
    }

    #[test]
    fn map_gpa_range_hypercall_reaches_the_engine() {
        let (_vm, svc) = service();
        let gpa = 16 << 20;
        // To shared (attrs bit 4 clear), 2 pages, 4K hint.
        let (handled, ret) = hypercall(&svc, abi::KVM_HC_MAP_GPA_RANGE, [gpa, 2, 0, 0, 0, 0]);
        assert!(handled);
        assert_eq!(ret, 0);
        assert!(svc.check_shared(gpa, 2 * abi::PAGE_SIZE).is_ok());
        // Back to private.
        let (_, ret) = hypercall(
            &svc,
            abi::KVM_HC_MAP_GPA_RANGE,
            [gpa, 2, u64::from(abi::ATTR_ENCRYPTED), 0, 0, 0],
        );
        assert_eq!(ret, 0);
        assert!(svc.check_shared(gpa, abi::PAGE_SIZE).is_err());
        // A bad request is an error value for the guest, never a crash.
        let (_, ret) = hypercall(&svc, abi::KVM_HC_MAP_GPA_RANGE, [gpa + 1, 1, 0, 0, 0, 0]);
        assert_eq!(ret as i64, -22);
        let (_, ret) = hypercall(
            &svc,
            abi::KVM_HC_MAP_GPA_RANGE,
            [u64::MAX - 4095, 1, 0, 0, 0, 0],
        );
        assert_eq!(ret as i64, -22);
        let stats = serde_json::to_value(svc.stats()).unwrap();
        assert_eq!(stats["hypercalls"], 4, "{stats}");
        assert_eq!(stats["pages_converted"], 4, "{stats}");
    }

    #[test]
    fn other_hypercalls_get_enosys() {
        let (_vm, svc) = service();
        let (handled, ret) = hypercall(&svc, 9, [0; 6]);
        assert!(!handled);
        assert_eq!(ret as i64, -1000);
    }

    #[test]
    fn pool_timeline_stays_bounded_and_ordered() {
        let mut t = PoolTimeline::default();
        for i in 0..10_000 {
            t.push(PoolSample {
                t_ms: i as f64,
                shared_bytes: i,
                used_bytes: 0,
                capacity_bytes: 0,
                maps: 0,
                map_failures: 0,
                throttle_waits: 0,
            });
        }
        let s = t.samples();
        assert!(s.len() <= PoolTimeline::MAX && s.len() > PoolTimeline::MAX / 4);
        assert!(s.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
        assert_eq!(s[0].t_ms, 0.0);
        assert!(s[s.len() - 1].t_ms > 9000.0);
    }

    #[test]
    fn hypercall_return_codes() {
        assert_eq!(hypercall_return(abi::STATUS_OK), 0);
        assert_eq!(hypercall_return(abi::ERR_NO_MEMORY) as i64, -12);
        assert_eq!(hypercall_return(abi::ERR_UNALIGNED) as i64, -22);
    }
}
