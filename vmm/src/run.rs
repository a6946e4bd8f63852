//! One VM from start to end: create it, let memconv build guest RAM, load the guest, start the
//! vCPU threads in the chosen execution mode, wait for the end, and gather the summary
//! (exit reason, timings, exits per vCPU, memconv statistics).

use std::sync::Arc;
use std::time::{Duration, Instant};

use memconv::abi;
use memconv::{ConversionService, RamConfig, StatsSnapshot};
use serde::Serialize;

use crate::boot::{self, BootInfoParams};
use crate::config::{ConfigError, VmConfig};
use crate::devices::{BlkConfig, BlkStats, BlockDevice, Devices, DiskError};
use crate::exit_codes::exit_status;
use crate::fixtures::{self, FixtureError};
use crate::pvm::{self, HostKind, PvmError};
use crate::serial::{Console, SerialError};
use crate::signals::SignalStop;
use crate::vcpu::{self, ExitCounts, VcpuControl, VcpuError, VmEnd, VmShared};
use crate::vm::{self, KvmVm, VmError, VmHost};

/// Errors that stop a VM from starting; all are the user's to fix (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Guest not found or unreadable.
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// KVM unavailable or failing.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest RAM could not be set up (stores, huge pages, guest_memfd).
    #[error("{0}")]
    Memory(#[from] memconv::Error),
    /// The guest image could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// The image's memory could not be accepted (backed) for the guest.
    #[error("cannot back the guest image (up to {end:#x}) before boot: {source}{hint}", hint = if *source == memconv::ConversionError::NoMemory { " (no huge page left? see /proc/sys/vm/nr_hugepages)" } else { "" })]
    BootAccept {
        /// End of the image.
        end: u64,
        /// Why.
        source: memconv::ConversionError,
    },
    /// Execution mode problems.
    #[error(transparent)]
    Pvm(#[from] PvmError),
    /// The replay op stream does not fit in guest RAM.
    #[error("the replay op stream ({len} bytes) does not fit in half of the guest's {mem} bytes of RAM: raise --mem")]
    ReplayTooLarge {
        /// Stream bytes.
        len: u64,
        /// Guest RAM.
        mem: u64,
    },
    /// Serial output problems.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// vCPU control setup.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A vCPU thread could not be spawned.
    #[error("cannot start vCPU thread {cpu}: {source}")]
    Thread {
        /// The vCPU index.
        cpu: u32,
        /// Why the thread could not start.
        source: std::io::Error,
    },
    /// The disk image or the block device could not be set up.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// KVM_SET_REGS / KVM_SET_SREGS failed.
    #[error("setting registers of vCPU {cpu} failed: {source}")]
    Registers {
        /// The vCPU index.
        cpu: u32,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// The control socket could not be created.
    #[error(transparent)]
    Api(#[from] crate::api::ServerError),
}

/// Wall-clock milestones of a run, in milliseconds from VM creation.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// VM created to first KVM_RUN.
    pub setup_ms: f64,
    /// VM created to the guest's first serial byte.
    pub first_serial_byte_ms: Option<f64>,
    /// VM created to the end.
    pub total_ms: f64,
}

/// What `vmm run` reports when the VM ends.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// How the VM was started.
    pub config: VmConfig,
    /// `pvm` or `hardware`.
    pub host: &'static str,
    /// Whether guest code ran natively.
    pub native: bool,
    /// Why the VM ended.
    pub end: VmEnd,
    /// The status `vmm run` exits with.
    pub exit_status: u8,
    /// Timings.
    pub timings: Timings,
    /// Exits per vCPU.
    pub exits: Vec<ExitCounts>,
    /// Ports no device owns that the guest touched, with counts.
    pub unknown_ports: std::collections::BTreeMap<u16, u64>,
    /// Times vCPUs were paused (memslot edits).
    pub vcpu_pauses: u64,
    /// Bytes the guest wrote to the serial console.
    pub serial_bytes: u64,
    /// The conversion service's statistics.
    pub memconv: StatsSnapshot,
    /// Guest pool reports over time.
    pub pool_timeline: Vec<vcpu::PoolSample>,
    /// The virtio block device's counters, when the VM had one.
    pub disk: Option<BlkStats>,
    /// Guest-caused log lines suppressed by the rate limits: `memconv::log_limit` (process-wide,
    /// so exactly this VM's under `vmm run`) plus the disk's failure log
    /// (`disk.io_error_log_suppressed`).
    pub suppressed_log_lines: u64,
}

impl RunSummary {
    /// Total exits over all vCPUs.
    pub fn total_exits(&self) -> u64 {
        self.exits.iter().map(|e| e.total).sum()
    }

    /// A readable multi-line summary.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let end = match &self.end {
            VmEnd::GuestExit { cpu, code } => format!("guest exit {code} (vCPU {cpu})"),
            VmEnd::Crash { cpu, reason, .. } => format!("CRASH on vCPU {cpu}: {reason}"),
            VmEnd::AllHalted => "all vCPUs halted".into(),
            VmEnd::UnacceptedAccess { cpu, gpa } => format!(
                "STOPPED: vCPU {cpu} touched unaccepted private memory at gpa {gpa:#x} (security violation)"
            ),
            VmEnd::Stopped => "stopped by the host".into(),
            VmEnd::Signal { signal, number } => format!("stopped by signal {signal} ({number})"),
            VmEnd::HostError { cpu, error } => format!("host error on vCPU {cpu}: {error}"),
            VmEnd::DeviceFailed { device, error } => format!("device {device} failed: {error}"),
        };
        out.push_str(&format!(
            "== vmm summary ==\nguest: {}  mem: {} MiB  cpus: {}  host: {}  exec: {}\n",
            self.config.guest,
            self.config.mem >> 20,
            self.config.cpus,
            self.host,
            if self.native { "native" } else { "emulated" },
        ));
        out.push_str(&format!(
            "end: {end}  status: {}\ntime: setup {}, first serial byte {}, total {}\n",
            self.exit_status,
            ms_text(self.timings.setup_ms),
            self.timings
                .first_serial_byte_ms
                .map_or("-".to_string(), ms_text),
            ms_text(self.timings.total_ms),
        ));
        out.push_str("exits: cpu total io_out io_in serial doorbell unknown_port mmio hlt hypercall interrupted\n");
        for (cpu, e) in self.exits.iter().enumerate() {
            out.push_str(&format!(
                "       {cpu:>3} {:>5} {:>6} {:>5} {:>6} {:>8} {:>12} {:>4} {:>3} {:>9} {:>11}\n",
                e.total,
                e.io_out,
                e.io_in,
                e.serial,
                e.doorbell,
                e.unknown_port,
                e.mmio,
                e.hlt,
                e.hypercall,
                e.interrupted
            ));
        }
        if !self.unknown_ports.is_empty() {
            let ports: Vec<String> = self
                .unknown_ports
                .iter()
                .map(|(p, n)| format!("{p:#x}x{n}"))
                .collect();
            out.push_str(&format!("unknown ports: {}\n", ports.join(" ")));
        }
        out.push_str(&self.memconv.summary());
        if let Some(p) = &self.memconv.pool_report {
            out.push_str(&format!(
                "guest pool '{}' (latest report): conversions 4k {} 2m {} other {}, throttle wait {}, \
                 transient maps {}, grow {} shrink {}, io requests {} errors {}\n",
                p.policy,
                p.conversions_4k,
                p.conversions_2m,
                p.conversions_other,
                memconv::stats::units::duration(p.throttle_wait_ns),
                p.transient_maps,
                p.grow_events,
                p.shrink_events,
                p.io_requests,
                p.io_errors
            ));
        }
        if let Some(d) = &self.disk {
            out.push_str(&d.render());
        }
        let mismatched: u64 = self.exits.iter().map(|e| e.doorbell_mismatch).sum();
        if mismatched > 0 {
            out.push_str(&format!(
                "doorbells refused (value not the ringing vCPU's index): {mismatched}\n"
            ));
        }
        if self.suppressed_log_lines > 0 {
            out.push_str(&format!(
                "log: {} guest-caused warning lines suppressed by rate limits (at most {} per second each)\n",
                self.suppressed_log_lines,
                memconv::log_limit::GUEST_LOG.per_second()
            ));
        }
        out
    }
}

/// The result of a VM run.
pub struct RunOutcome {
    /// Everything measured.
    pub summary: RunSummary,
}

impl RunOutcome {
    /// The process exit status for this outcome.
    pub fn exit_status(&self) -> u8 {
        self.summary.exit_status
    }
}

/// Boots the VM described by `cfg` and runs it to its end.
pub fn run_vm(cfg: &VmConfig) -> Result<RunOutcome, RunError> {
    run_vm_with_console(cfg, None)
}

/// Like `run_vm`, with the serial console given by the caller (benchmarks discard output).
pub fn run_vm_with_console(
    cfg: &VmConfig,
    console: Option<Console>,
) -> Result<RunOutcome, RunError> {
    run_vm_with_options(
        cfg,
        RunOptions {
            console,
            ..Default::default()
        },
    )
}

/// How to run a VM, beyond its configuration.
#[derive(Default)]
pub struct RunOptions {
    /// The serial console (default: `cfg.serial` or stdout).
    pub console: Option<Console>,
    /// Serve the control socket at this path while the VM runs (`--api-socket`).
    pub api_socket: Option<std::path::PathBuf>,
    /// A replay op stream (`vmm replay`) to place in guest RAM after the image, named in the
    /// boot info as a `DEVICE_REPLAY_STREAM` entry.
    pub replay_stream: Option<std::sync::Arc<Vec<u8>>>,
    /// Stop signals end this VM (`vmm run`: [`SignalStop::install`] before anything else).
    pub signals: Option<Arc<SignalStop>>,
    /// Told when the vCPUs start and when the VM has ended (e.g. the `--metrics-addr` HTTP
    /// server, which lives in the tools and reads the running VM's statistics).
    pub observer: Option<Box<dyn LiveObserver>>,
}

/// A running VM, as an observer sees it: what the control socket's `stats` reads.
#[derive(Clone)]
pub struct LiveVm {
    /// What the vCPU threads share (memconv, exit counts, vCPU control).
    pub shared: Arc<VmShared>,
    /// When the VM was created.
    pub created: Instant,
    /// vCPUs.
    pub cpus: u32,
}

/// Something that runs beside a VM from its start to its end.
pub trait LiveObserver: Send {
    /// The vCPUs have started.
    fn started(&mut self, vm: LiveVm);
    /// The VM has ended (every vCPU thread has returned); stop using it.
    fn ended(&mut self);
}

/// Like `run_vm`, with [`RunOptions`].
pub fn run_vm_with_options(cfg: &VmConfig, opts: RunOptions) -> Result<RunOutcome, RunError> {
    let RunOptions {
        console,
        api_socket,
        replay_stream,
        signals,
        mut observer,
    } = opts;
    cfg.validate()?;
    let image = fixtures::load(&cfg.guest)?;
    // First, so that a socket in use is reported before any work (and removed on any error).
    let api_socket = match &api_socket {
        Some(path) => Some(crate::api::ApiSocket::bind(path)?),
        None => None,
    };
    if let (Some(stop), Some(socket)) = (&signals, &api_socket) {
        stop.set_socket(socket.path());
    }
    let console = match console {
        Some(c) => c,
        None => Console::new(cfg.serial.as_deref())?,
    };
    vcpu::install_kick_handler()?;

    let kvm = vm::open_kvm()?;
    let created = Instant::now();
    let vm = KvmVm::new(kvm)?;
    let host = Arc::new(VmHost::new(Arc::clone(&vm.fd)));
    let memconv = Arc::new(ConversionService::new(
        RamConfig {
            size: cfg.mem,
            private: cfg.private,
            shared: cfg.shared,
            granularity: cfg.granularity,
            cpus: cfg.cpus,
            platform: cfg.platform,
            prealloc: cfg.prealloc,
        },
        host.clone(),
    )?);
    // KVM's own memslot limit (KVM_CAP_NR_MEMSLOTS) bounds memconv's layouts.
    memconv.set_memslot_limit(vm.kvm.get_nr_memslots());

    let vcpus = (0..cfg.cpus)
        .map(|cpu| vm.create_vcpu(cpu))
        .collect::<Result<Vec<_>, _>>()?;
    let host_kind = pvm::detect(&vcpus[0]);
    let switch_native = pvm::wants_native_switch(host_kind, cfg.exec)?;
    let native = host_kind == HostKind::Hardware || switch_native;

    let devices = match &cfg.disk {
        Some(d) => {
            let disk = crate::devices::Disk::open_with(&d.path, d.create_size, d.io)?;
            let blk = BlockDevice::new(
                disk,
                memconv.clone(),
                &BlkConfig {
                    num_queues: (cfg.cpus as usize).min(crate::devices::virtio_blk::MAX_QUEUES),
                    idle: Duration::from_micros(d.idle_us),
                },
            )?;
            Devices::with_block(Arc::new(blk))
        }
        None => Devices::none(),
    };
    let mut device_infos = devices.infos();

    let mem = memconv.private_memory();
    // The image (and a replay stream placed after it) is the platform's initial memory:
    // accepted (backed, mapped) before it is written; the rest of RAM waits for the guest's
    // ACCEPT.
    let image_end = boot::image_end(&image, cfg.mem)?;
    let stream_at = replay_stream.as_ref().map(|stream| {
        let gpa = image_end.next_multiple_of(abi::HUGE_PAGE_SIZE);
        (gpa, stream.len() as u64)
    });
    if let Some((gpa, len)) = stream_at {
        // Leave at least half of RAM to the guest.
        if gpa + len > cfg.mem / 2 {
            return Err(RunError::ReplayTooLarge { len, mem: cfg.mem });
        }
    }
    let accepted_end = stream_at.map_or(image_end, |(gpa, len)| gpa + len);
    memconv
        .accept_boot(accepted_end)
        .map_err(|source| RunError::BootAccept {
            end: accepted_end,
            source,
        })?;
    let loaded = boot::load_image(mem, &image, cfg.mem)?;
    let mut reserved_end = 0;
    if let (Some(stream), Some((gpa, len))) = (&replay_stream, stream_at) {
        vm_memory::Bytes::write_slice(mem, stream, vm_memory::GuestAddress(gpa))
            .map_err(|source| boot::BootError::Memory { gpa, source })?;
        device_infos.push(abi::DeviceInfo {
            kind: abi::DEVICE_REPLAY_STREAM,
            id: 0,
            mmio_gpa: gpa,
            mmio_len: len,
        });
        reserved_end = gpa + len;
    }
    boot::write_page_tables(mem, cfg.mem)?;
    let mut flags = 0;
    if native {
        flags |= abi::BOOT_FLAG_NATIVE;
    }
    if cfg.granularity == memconv::Granularity::Huge2M {
        flags |= abi::BOOT_FLAG_HOST_2M;
    }
    if cfg.platform == memconv::Platform::Snp {
        flags |= abi::BOOT_FLAG_PLATFORM_SNP;
    }
    boot::write_boot_info(
        mem,
        &BootInfoParams {
            cpus: cfg.cpus,
            ram_size: cfg.mem,
            cmdline: &cfg.cmdline,
            flags,
            image: loaded,
            devices: &device_infos,
            tsc_khz: vcpus[0].get_tsc_khz().unwrap_or(0),
            reserved_end,
        },
    )?;

    for (cpu, fd) in vcpus.iter().enumerate() {
        let cpu = cpu as u32;
        let mut sregs = fd
            .get_sregs()
            .map_err(|source| RunError::Registers { cpu, source })?;
        boot::long_mode_sregs(&mut sregs);
        fd.set_sregs(&sregs)
            .map_err(|source| RunError::Registers { cpu, source })?;
        fd.set_regs(&boot::entry_regs(loaded.entry, cpu))
            .map_err(|source| RunError::Registers { cpu, source })?;
        if switch_native {
            pvm::enable_native(fd, cpu)?;
        }
    }

    let control = Arc::new(VcpuControl::new(cfg.cpus));
    host.attach_vcpus(Arc::clone(&control));
    let devices = Arc::new(devices);
    let shared = Arc::new(
        VmShared::new(
            Arc::clone(&memconv),
            console,
            Arc::clone(&control),
            cfg.cpus,
        )
        .with_devices(Arc::clone(&devices)),
    );
    if let Some(blk) = devices.block() {
        blk.wake_on_completion(shared.waker());
    }
    if let Some(stop) = &signals {
        stop.attach(&shared);
    }
    let poller = match devices.block() {
        Some(blk) => {
            let on_panic = {
                let shared = Arc::clone(&shared);
                move |msg: String| {
                    shared.end(VmEnd::DeviceFailed {
                        device: "virtio-blk".into(),
                        error: format!("device thread panicked: {msg}"),
                    })
                }
            };
            Some(blk.spawn_poller_guarded(on_panic)?)
        }
        None => None,
    };
    let setup_ms = ms(created.elapsed());
    let mut threads = Vec::with_capacity(vcpus.len());
    for (cpu, fd) in vcpus.into_iter().enumerate() {
        let cpu = cpu as u32;
        let shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{cpu}"))
            .spawn(move || vcpu::run_vcpu(fd, cpu, shared))
            .map_err(|source| {
                control.stop();
                if let Some(blk) = devices.block() {
                    blk.stop();
                }
                RunError::Thread { cpu, source }
            })?;
        threads.push(handle);
    }
    if let Some(o) = observer.as_mut() {
        o.started(LiveVm {
            shared: Arc::clone(&shared),
            created,
            cpus: cfg.cpus,
        });
    }

    let end = match api_socket {
        // The control socket's event loop runs on this thread until the VM ends.
        Some(socket) => crate::api::serve(
            socket,
            crate::api::VmContext {
                shared: Arc::clone(&shared),
                config: cfg.clone(),
                host: match host_kind {
                    HostKind::Pvm => "pvm",
                    HostKind::Hardware => "hardware",
                },
                native,
                created,
            },
        ),
        None => shared.wait_end(None).unwrap_or(VmEnd::Stopped),
    };
    for t in threads {
        if t.join().is_err() {
            tracing::error!("a vCPU thread panicked");
        }
    }
    if let Some(stop) = &signals {
        stop.detach();
    }
    let total_ms = ms(created.elapsed());
    if let Some(o) = observer.as_mut() {
        o.ended();
    }
    shared.console.flush();
    if let Some(blk) = devices.block() {
        blk.stop();
    }
    if let Some(p) = poller {
        if p.join().is_err() {
            tracing::error!("the block device thread panicked");
        }
    }

    let disk = devices.block().map(|b| b.stats());
    let summary = RunSummary {
        config: cfg.clone(),
        host: match host_kind {
            HostKind::Pvm => "pvm",
            HostKind::Hardware => "hardware",
        },
        native,
        exit_status: exit_status(&end),
        end,
        timings: Timings {
            setup_ms,
            first_serial_byte_ms: shared
                .console
                .first_byte_at()
                .map(|t| ms(t.duration_since(created))),
            total_ms,
        },
        exits: shared.exit_counts(),
        unknown_ports: shared.unknown_ports(),
        vcpu_pauses: control.pause_count(),
        serial_bytes: shared.console.bytes_written(),
        memconv: {
            // One pause counter everywhere: the vCPU control's, which counts memconv's
            // memslot-edit pauses and control-socket pauses alike.
            let mut stats = memconv.stats();
            stats.vcpu_pauses = control.pause_count();
            stats
        },
        pool_timeline: shared.pool_timeline(),
        suppressed_log_lines: memconv::log_limit::GUEST_LOG.suppressed()
            + disk.as_ref().map_or(0, |d| d.io_error_log_suppressed),
        disk,
    };
    Ok(RunOutcome { summary })
}

/// Milliseconds in the one unit convention of the readable views (`39.1 ms`, `5.2 s`).
fn ms_text(ms: f64) -> String {
    memconv::stats::units::duration((ms * 1e6) as u64)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
