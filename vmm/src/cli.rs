//! The command line (clap): `vmm run`, `vmm fixtures`, `vmm conform`, `vmm bench`, `vmm ctl`.
//! Errors a user can act on print one `error:` line (clap's own, for flags it rejects such as
//! a bad `--mem` size, add a hint line) and exit with status 2; `vmm run` otherwise exits with
//! the guest's code. Sizes are parsed once, by clap; the VM configuration is validated once,
//! by [`run::run_vm_with_options`].

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use memconv::{Granularity, Platform, StoreKind};

use crate::config::{parse_size, ConfigError, DiskConfig, ExecMode, VmConfig};
use crate::exit_codes::{EXIT_FAILURE, EXIT_OK, EXIT_USAGE};
use crate::fixtures::{self, FixtureError};
use crate::guest_cmdline;
use crate::main_job::{self, TempDisk};
use crate::run;
use crate::tools::{bench, conform, ctl, metrics_http, replay};

#[derive(Parser, Debug)]
#[command(
    name = "vmm",
    version,
    about = "A minimal KVM VMM for confidential-style VMs with a private<->shared memory-conversion service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a guest and run it to its end. With no --guest: the main job, ~2 s of verified DMA
    /// through the io guest's bounce pool on a temporary disk.
    Run(RunArgs),
    /// List the embedded guest fixtures.
    Fixtures,
    /// The conformance suite: pool policies x store pairs x granularities x workloads, each
    /// checked against named invariants; exits non-zero if any invariant fails.
    Conform(ConformArgs),
    /// Benchmarks that print ratios against a baseline measured in the same run.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Talk to a running VM's control socket (`vmm run --api-socket PATH`). Exit status 2 when
    /// no VMM serves PATH, 1 when the VMM refuses the command.
    Ctl(CtlArgs),
    /// Replay a Linux DMA-API trace (ftrace text of dma:* and swiotlb:* events, plain or
    /// gzip). `--describe` prints its per-device summary and Linux slot model without a VM.
    Replay(ReplayArgs),
}

/// Flags of `vmm replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// The trace: `/sys/kernel/tracing/trace` or `trace-cmd report` text, plain or gzip.
    #[arg(value_name = "TRACE")]
    trace: PathBuf,
    /// The capture's swiotlb statistics (`W.swiotlb_stats`): `io_tlb_used` before the
    /// workload is held from the start, `io_tlb_used_hiwater` after it is shown beside the model.
    #[arg(long, value_name = "FILE")]
    swiotlb_stats: Option<PathBuf>,
    /// Maps of DEVICE may block whatever the trace's irq flags say (repeatable).
    #[arg(long, value_name = "DEVICE")]
    may_block: Vec<String>,
    /// Print the summary without a VM.
    #[arg(long)]
    describe: bool,
    /// With --describe: the summary as JSON.
    #[arg(long, requires = "describe")]
    json: bool,
    /// Write the encoded op stream (the bytes the guest executes) to FILE.
    #[arg(long, value_name = "FILE")]
    dump_stream: Option<PathBuf>,
    /// Pool options for the guest (the swiotlb crate's keys). The default is legacy configured
    /// as the traces' Linux was: 64 MiB (areas = vCPUs: 2).
    #[arg(long, value_name = "ARGS", default_value = "policy=legacy pool=64M")]
    cmdline: String,
    /// Replay the recorded gaps scaled by 1/X (default: as fast as possible).
    #[arg(long, value_name = "X")]
    speed: Option<f64>,
    /// Guest RAM.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = size)]
    mem: u64,
    /// vCPUs (the pool's areas; vCPU 0 replays).
    #[arg(long, value_name = "N", default_value_t = 2)]
    cpus: u32,
    /// Store behind private memory: memfd, hugetlb or gmem.
    #[arg(long, value_name = "STORE", default_value = "memfd")]
    private: StoreKind,
    /// Store behind shared memory: memfd or hugetlb.
    #[arg(long, value_name = "STORE", default_value = "memfd")]
    shared: StoreKind,
    /// Host conversion granularity: 4k or 2m.
    #[arg(long, value_name = "4k|2m", default_value = "4k")]
    granularity: Granularity,
    /// The disk image the device moves data through (overwritten with the check pattern;
    /// default: a file in the temporary directory, removed afterwards).
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// Its size.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = size)]
    disk_size: u64,
    /// Write `replay.*` and the run's statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Do not echo the guest's console.
    #[arg(long)]
    quiet: bool,
}

/// `vmm ctl SOCKET COMMAND`.
#[derive(Args, Debug)]
pub struct CtlArgs {
    /// The VM's control socket.
    #[arg(value_name = "SOCKET")]
    socket: PathBuf,
    #[command(subcommand)]
    command: CtlSubcommand,
    /// Print the raw JSON reply line instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for a reply.
    #[arg(long, value_name = "SECONDS", global = true, default_value_t = 10.0)]
    timeout: f64,
}

#[derive(Subcommand, Debug)]
enum CtlSubcommand {
    /// Live conversion statistics, exit counts, guest pool report, uptime.
    Stats {
        /// Refresh every SECONDS (with rates) until the VM ends.
        #[arg(long, value_name = "SECONDS")]
        watch: Option<f64>,
    },
    /// The statistics in the Prometheus text format (node_exporter textfile collector).
    Metrics {
        /// Add NAME=VALUE to every sample (e.g. vm=web1); repeatable.
        #[arg(long, value_name = "NAME=VALUE")]
        label: Vec<String>,
    },
    /// How the VM was started.
    Config,
    /// Stop running guest code (the vCPUs park; statistics stop moving).
    Pause,
    /// Run guest code again.
    Resume,
    /// End the VM cleanly (as stopped by the host: summary and --stats-json are written).
    Shutdown,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// The DMA device per pool policy: 4 KiB random-read IOPS at queue depth 32, 64 KiB
    /// bandwidth next to memcpy of the same size, pool footprint, conversions, double
    /// allocation.
    Io {
        /// Seconds per measurement.
        #[arg(long, default_value_t = 2)]
        secs: u64,
        /// Runs of each disk data path (preadv/pwritev vs the old mmap path) in the
        /// side-by-side comparison, interleaved A/B.
        #[arg(long, default_value_t = 3)]
        repeats: u32,
        /// Only the data-path comparison (skip the per-policy table).
        #[arg(long)]
        data_path_only: bool,
        /// Also measure every figure with N busy threads beside the VM, in the same run, and
        /// print loaded/quiet ratios (warns when they and the VM's threads outnumber the cores).
        #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=64))]
        load: u64,
        /// Measure every per-policy figure N times and print the median and the spread (the
        /// data-path comparison has its own --repeats).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=50))]
        repeat: u64,
    },
    /// Pool map+unmap operations per second inside the VM, per policy and vCPU count (the
    /// host-side twin: `cargo run --release -p swiotlb --features host --example bench_host`
    /// in guest-fixtures/).
    Pool {
        /// Milliseconds per measurement.
        #[arg(long, default_value_t = 500)]
        ms: u64,
        /// Mapping size in bytes.
        #[arg(long, default_value_t = 4096)]
        size: u64,
    },
    /// Boot time to first serial byte and to exit, exits per boot, a guest compute loop
    /// natively vs in the instruction emulator, and boot time vs RAM on hugetlb (lazy vs
    /// --prealloc).
    Boot {
        /// Boots to time.
        #[arg(long, default_value_t = 20)]
        runs: u32,
        /// Iterations of the native compute loop (the emulated one runs 1/10000 of these).
        #[arg(long, default_value_t = 1_000_000_000)]
        iters: u64,
        /// Lazy boots per RAM size (512M, 2G, 4G on hugetlb/hugetlb; one --prealloc boot
        /// each) in the boot-scaling table; 0 skips it.
        #[arg(long, default_value_t = 3)]
        scaling_runs: u32,
    },
    /// Control socket: `stats` round trip while the guest converts at full rate, and the
    /// conversion rate with and without a client polling `stats` (and, as the noise floor,
    /// `config`), in alternating phases of one VM.
    Api {
        /// Rounds of three phases: no poller, a `stats` poller, a `config` poller (the noise
        /// floor), in rotating order.
        #[arg(long, default_value_t = 12)]
        rounds: u32,
        /// Seconds per phase.
        #[arg(long, default_value_t = 0.5)]
        phase_secs: f64,
        /// Milliseconds between the poller's `stats` requests.
        #[arg(long, default_value_t = 10)]
        poll_ms: u64,
        /// Guest RAM.
        #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = size)]
        mem: u64,
        /// Extra `soak` command line (default: 4 KiB ranges, 64 per batch).
        #[arg(long, value_name = "ARGS", default_value = "pattern=4k batch=64")]
        cmdline: String,
    },
}

impl BenchCommand {
    /// The benchmark these flags ask for.
    fn to_bench(&self) -> bench::Bench {
        match self {
            BenchCommand::Io {
                secs,
                repeats,
                data_path_only,
                load,
                repeat,
            } => bench::Bench::Io(bench::IoBenchOptions {
                secs: *secs,
                repeats: *repeats,
                data_path_only: *data_path_only,
                load: *load as usize,
                repeat: *repeat as usize,
            }),
            BenchCommand::Pool { ms, size } => bench::Bench::Pool {
                ms: *ms,
                size: *size,
            },
            BenchCommand::Boot {
                runs,
                iters,
                scaling_runs,
            } => bench::Bench::Boot {
                scaling_runs: *scaling_runs,
                runs: *runs,
                iters: *iters,
            },
            BenchCommand::Api {
                rounds,
                phase_secs,
                poll_ms,
                mem,
                cmdline,
            } => bench::Bench::Api(bench::api::ApiBenchOptions {
                rounds: *rounds,
                // Longer than the longest reuse of a stats snapshot (250 ms).
                phase: std::time::Duration::from_secs_f64(phase_secs.clamp(0.3, 600.0)),
                poll: std::time::Duration::from_millis((*poll_ms).max(1)),
                mem: *mem,
                cmdline: cmdline.clone(),
            }),
        }
    }
}

/// Flags of `vmm conform`.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ConformArgs {
    /// `merge` (join shards' results) or `size` (the pool-size sweep); none: run the suite.
    #[command(subcommand)]
    action: Option<ConformAction>,
    /// Run only the K-th of N shares of the selected cells (every N-th cell, from the K-th;
    /// 1 <= K <= N), for a batch scheduler; join the shares with `vmm conform merge`.
    #[arg(long, value_name = "K/N")]
    shard: Option<conform::matrix::Shard>,
    /// The workload the shared-over-time chart shows (default: burst, else steady).
    #[arg(long, value_name = "WORKLOAD", value_parser = workload)]
    chart_workload: Option<conform::matrix::Workload>,
    /// Run only a small subset (well under a minute).
    #[arg(long)]
    quick: bool,
    /// Only cells whose id (policy/private-shared/granularity/workload) contains every
    /// comma-separated term, e.g. `throttle,hugetlb-hugetlb`.
    #[arg(long, value_name = "TERMS", value_delimiter = ',')]
    filter: Vec<String>,
    /// Cells run at once (default: half the host CPUs).
    #[arg(long, value_name = "N")]
    jobs: Option<usize>,
    /// Directory for conform.json, conform.csv, the SVG charts and per-cell logs.
    #[arg(long, value_name = "DIR", default_value = "conform-out")]
    out: PathBuf,
    /// The guest running the workloads: the embedded `io` fixture, or a fixture built against
    /// the swiotlb crate's policy trait (see README).
    #[arg(long, value_name = "NAME|PATH", default_value = "io")]
    guest: String,
    /// Comma-separated policies to run (a plug-in guest names its own).
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "legacy,dynamic,refill,throttle,aligned-2m,adaptive"
    )]
    policies: Vec<String>,
    /// Guest RAM per cell.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = size)]
    mem: u64,
    /// Extra guest command line for every cell.
    #[arg(long, value_name = "ARGS", default_value = "")]
    cmdline: String,
    /// Longest a cell may run, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
    /// Keep each cell's 64 MiB disk image under DIR/cells/ (removed when the cell is done by
    /// default).
    #[arg(long)]
    keep: bool,
    /// Confidential platform every cell runs on (its acceptance lifecycle): tdx or snp.
    #[arg(long, value_name = "tdx|snp", default_value = "tdx")]
    platform: Platform,
}

/// `vmm conform merge` / `vmm conform size`.
#[derive(Subcommand, Debug)]
enum ConformAction {
    /// Join the results of `vmm conform --shard K/N` runs (their --out directories or
    /// conform.json files) into one report; refuses a missing or doubled shard.
    Merge {
        /// The shards' output directories (or their conform.json).
        #[arg(required = true, value_name = "DIR")]
        dirs: Vec<PathBuf>,
        /// Directory for the merged conform.json, conform.csv and charts.
        #[arg(long, value_name = "DIR", default_value = "conform-out")]
        out: PathBuf,
    },
    /// Per policy and workload, the smallest pool= with zero failed requests (bisection over
    /// 2 MiB steps, 256 KiB where the policy allows; a self-sizing policy: its peak), with
    /// failed requests, waits, peak shared bytes and IOPS at every probed size.
    Size(SizeArgs),
}

/// Flags of `vmm conform size`.
#[derive(Args, Debug)]
struct SizeArgs {
    /// Comma-separated policies.
    #[arg(
        long,
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "legacy,dynamic,refill,throttle,aligned-2m,adaptive"
    )]
    policies: Vec<String>,
    /// Comma-separated workloads (steady, large, burst, ramp, smp).
    #[arg(long, value_name = "LIST", value_delimiter = ',', default_value = "steady,large,burst,ramp,smp", value_parser = workload)]
    workloads: Vec<conform::matrix::Workload>,
    /// Largest pool probed.
    #[arg(long, value_name = "SIZE", default_value = "64M", value_parser = size)]
    max_pool: u64,
    /// Store pair and granularity of every probe, as in a cell id.
    #[arg(
        long,
        value_name = "PRIVATE-SHARED/GRAN",
        default_value = "memfd-memfd/4k"
    )]
    backing: String,
    /// Directory for size.json, size.csv, the charts and every probe's cell.
    #[arg(long, value_name = "DIR", default_value = "size-out")]
    out: PathBuf,
    /// The guest running the workloads.
    #[arg(long, value_name = "NAME|PATH", default_value = "io")]
    guest: String,
    /// Guest RAM per probe.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = size)]
    mem: u64,
    /// Extra guest command line for every probe.
    #[arg(long, value_name = "ARGS", default_value = "")]
    cmdline: String,
    /// Longest a probe may run, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    timeout: u64,
}

/// `--workloads`: a workload by name.
fn workload(text: &str) -> Result<conform::matrix::Workload, String> {
    conform::matrix::WORKLOADS
        .into_iter()
        .find(|w| w.name() == text)
        .ok_or_else(|| format!("unknown workload {text:?} (steady, large, burst, ramp, smp)"))
}

/// Flags of `vmm run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// An embedded fixture name (see `vmm fixtures`) or a path to a guest ELF. Without it:
    /// the main job (the io guest on a temporary disk, ~2 s; `--guest hello` for the hello).
    #[arg(long, value_name = "NAME|PATH")]
    guest: Option<String>,
    /// Guest RAM: bytes or K/M/G suffix, a multiple of 2M.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = size)]
    mem: u64,
    /// Number of vCPUs (default 1; the main job: 2).
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Write the guest's serial console to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,
    /// Guest command line, "key=value ..."; checked against the keys the fixture declares.
    /// With no --guest, appended to the main job's.
    #[arg(long, value_name = "ARGS", default_value = "")]
    cmdline: String,
    /// Execution mode (default: native where the host allows).
    #[arg(long, value_enum)]
    exec: Option<ExecMode>,
    /// Store behind private memory: memfd, hugetlb or gmem.
    #[arg(long, value_name = "STORE", default_value = "memfd")]
    private: StoreKind,
    /// Store behind shared memory: memfd or hugetlb.
    #[arg(long, value_name = "STORE", default_value = "memfd")]
    shared: StoreKind,
    /// Host conversion granularity: 4k or 2m.
    #[arg(long, value_name = "4k|2m", default_value = "4k")]
    granularity: Granularity,
    /// Confidential platform whose acceptance lifecycle the host enforces: tdx or snp.
    #[arg(long, value_name = "tdx|snp", default_value = "tdx")]
    platform: Platform,
    /// Back all private RAM before boot instead of each 2 MiB chunk at the guest's ACCEPT.
    #[arg(long)]
    prealloc: bool,
    /// Write the end-of-run statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    stats_json: Option<PathBuf>,
    /// Attach a virtio block device backed by this raw disk image.
    #[arg(long, value_name = "PATH")]
    disk: Option<PathBuf>,
    /// Create the --disk image sparse with this size if it does not exist (K/M/G suffix, a
    /// multiple of 512); an existing image keeps its size.
    #[arg(long, value_name = "SIZE", requires = "disk", value_parser = size)]
    disk_size: Option<u64>,
    /// Microseconds the block device polls its queues without work before it sleeps and asks
    /// the guest for a doorbell.
    #[arg(long, value_name = "US", requires = "disk", default_value_t = crate::devices::virtio_blk::DEFAULT_IDLE_US)]
    disk_idle_us: u64,
    /// Serve the control socket at PATH while the VM runs (see `vmm ctl`).
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Serve Prometheus metrics at http://ADDR:PORT/metrics while the VM runs; a bare PORT
    /// listens on 127.0.0.1 only.
    #[arg(long, value_name = "ADDR:PORT", value_parser = metrics_addr)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Do not print the summary.
    #[arg(long)]
    quiet: bool,
}

/// `--mem`, `--disk-size`: a size like `512M`, parsed by clap (its errors exit with status 2).
fn size(text: &str) -> Result<u64, ConfigError> {
    parse_size(text)
}

/// `--metrics-addr`: `PORT` (loopback) or `ADDR:PORT`.
fn metrics_addr(text: &str) -> Result<std::net::SocketAddr, metrics_http::MetricsHttpError> {
    metrics_http::parse_addr(text)
}

fn fail(message: impl std::fmt::Display) -> ExitCode {
    let _ = writeln!(std::io::stderr(), "error: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // A closed stderr must not make tracing report its own write errors.
        .log_internal_errors(false)
        .try_init();
}

impl RunArgs {
    /// Whether this is the main job (no `--guest`).
    fn main_job(&self) -> bool {
        self.guest.is_none()
    }

    fn disk_config(&self, temp: Option<&TempDisk>) -> Option<DiskConfig> {
        let path = self
            .disk
            .clone()
            .or_else(|| temp.map(|t| t.path().to_path_buf()))?;
        Some(DiskConfig {
            path,
            create_size: self.disk_size,
            idle_us: self.disk_idle_us,
            io: crate::devices::DiskIo::Vectored,
        })
    }

    /// The guest command line: the main job's with `--cmdline` appended, or `--cmdline`.
    fn guest_cmdline(&self) -> String {
        if self.main_job() {
            format!("{} {}", main_job::CMDLINE, self.cmdline)
                .trim()
                .to_string()
        } else {
            self.cmdline.clone()
        }
    }

    /// The VM configuration (`temp`: the main job's disk); [`run::run_vm_with_options`]
    /// validates it.
    fn to_config(&self, temp: Option<&TempDisk>) -> Result<VmConfig, FixtureError> {
        let guest = self.guest.as_deref().unwrap_or(main_job::GUEST);
        let default_cpus = if self.main_job() { main_job::CPUS } else { 1 };
        Ok(VmConfig {
            guest: fixtures::resolve(guest)?,
            mem: self.mem,
            cpus: self.cpus.unwrap_or(default_cpus),
            serial: self.serial.clone(),
            cmdline: self.guest_cmdline(),
            exec: self.exec,
            private: self.private,
            shared: self.shared,
            granularity: self.granularity,
            platform: self.platform,
            prealloc: self.prealloc,
            stats_json: self.stats_json.clone(),
            disk: self.disk_config(temp),
        })
    }
}

fn cmd_run(args: &RunArgs) -> ExitCode {
    // First, before any thread exists: every thread spawned later inherits the signal mask.
    let signals = match crate::signals::SignalStop::install() {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    // Checked before anything is created: a typo is a usage error, not a silent default.
    let cfg = match args.to_config(None) {
        Ok(cfg) => cfg,
        Err(e) => return fail(e),
    };
    // The limits first (a bad --cpus is reported as such), then the guest's keys.
    if let Err(e) = cfg.validate() {
        return fail(e);
    }
    if let Err(e) = guest_cmdline::check(&cfg.guest, &cfg.cmdline, cfg.cpus) {
        return fail(e);
    }
    let metrics = match args.metrics_addr.map(metrics_http::MetricsServer::bind) {
        Some(Ok(server)) => Some(server),
        Some(Err(e)) => return fail(e),
        None => None,
    };
    // Removed when this function returns, whichever way: a stop signal ends the VM cleanly
    // and returns here; a forced (second) signal removes it before exiting.
    let temp_disk = if args.main_job() && args.disk.is_none() {
        match TempDisk::create(main_job::DISK_SIZE) {
            Ok(d) => {
                signals.remove_on_forced_exit(d.path());
                Some(d)
            }
            Err(e) => return fail(e),
        }
    } else {
        None
    };
    let cfg = VmConfig {
        disk: args.disk_config(temp_disk.as_ref()),
        ..cfg
    };
    // Opened (created or truncated) before boot: an unwritable path is refused now, not after
    // the run.
    let mut stats_file = match &cfg.stats_json {
        Some(path) => match std::fs::File::create(path) {
            Ok(f) => Some(f),
            Err(e) => return fail(format!("cannot write --stats-json {}: {e}", path.display())),
        },
        None => None,
    };
    let mut opts = run::RunOptions {
        api_socket: args.api_socket.clone(),
        signals: Some(signals),
        ..Default::default()
    };
    if let Some(server) = metrics {
        let _ = writeln!(
            std::io::stderr(),
            "vmm: metrics at http://{}/metrics",
            server.addr()
        );
        opts.observer = Some(Box::new(server));
    }
    if args.main_job() && !args.quiet {
        let _ = writeln!(
            std::io::stdout(),
            "vmm: the main job: the io guest does ~2 s of verified DMA through its bounce pool \
             (policy legacy unless --cmdline says otherwise) on a temporary disk; \
             `vmm run --guest hello` boots the hello guest"
        );
    }
    let outcome = match run::run_vm_with_options(&cfg, opts) {
        Ok(o) => o,
        Err(e) => {
            if let (Some(path), Some(f)) = (&cfg.stats_json, stats_file.take()) {
                // Nothing was measured: leave no empty file behind.
                drop(f);
                let _ = std::fs::remove_file(path);
            }
            return fail(e);
        }
    };
    let summary = &outcome.summary;
    if let (Some(path), Some(file)) = (&cfg.stats_json, stats_file.as_mut()) {
        let written = serde_json::to_vec_pretty(summary)
            .map_err(|e| e.to_string())
            .and_then(|json| {
                file.write_all(&json)
                    .and_then(|()| file.flush())
                    .map_err(|e| e.to_string())
            });
        if let Err(e) = written {
            let _ = writeln!(
                std::io::stderr(),
                "error: cannot write --stats-json {}: {e}",
                path.display()
            );
        }
    }
    if let crate::vcpu::VmEnd::Crash {
        cpu,
        reason,
        registers,
    } = &summary.end
    {
        let _ = writeln!(
            std::io::stderr(),
            "vmm: vCPU {cpu} crashed: {reason}\n{registers}"
        );
    }
    if !args.quiet {
        // A closed stdout (EPIPE; SIGPIPE is ignored) loses the summary, nothing else.
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(summary.render().as_bytes());
        if args.main_job() {
            let _ = out.write_all(main_job::TRY_NEXT.as_bytes());
        }
        let _ = out.flush();
    }
    drop(temp_disk);
    ExitCode::from(outcome.exit_status())
}

fn cmd_conform_merge(dirs: &[PathBuf], out: &std::path::Path) -> ExitCode {
    match conform::merge::merge(dirs, out) {
        Ok(merged) => {
            print!("{}", merged.table);
            for f in &merged.files {
                println!("wrote {f}");
            }
            if merged.results.iter().any(|r| r.failed_invariant()) {
                ExitCode::from(EXIT_FAILURE)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => fail(e),
    }
}

fn cmd_conform_size(a: &SizeArgs) -> ExitCode {
    if let Err(e) = fixtures::resolve(&a.guest) {
        return fail(e);
    }
    let opts = crate::tools::size::SizeOptions {
        policies: a.policies.clone(),
        workloads: a.workloads.clone(),
        max_pool: a.max_pool,
        backing: a.backing.clone(),
        out_dir: a.out.clone(),
        guest: a.guest.clone(),
        mem: a.mem,
        extra_cmdline: a.cmdline.clone(),
        timeout: std::time::Duration::from_secs(a.timeout),
    };
    match crate::tools::size::run(&opts) {
        Ok((_, table, files)) => {
            print!("{table}");
            for f in &files {
                println!("wrote {f}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn cmd_conform(args: &ConformArgs) -> ExitCode {
    match &args.action {
        Some(ConformAction::Merge { dirs, out }) => return cmd_conform_merge(dirs, out),
        Some(ConformAction::Size(a)) => return cmd_conform_size(a),
        None => {}
    }
    if let Err(e) = fixtures::resolve(&args.guest) {
        return fail(e);
    }
    let opts = conform::ConformOptions {
        quick: args.quick,
        filters: args.filter.clone(),
        // Each cell's vCPUs spin at full speed: one cell per two host CPUs.
        jobs: args.jobs.unwrap_or_else(|| {
            (std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) / 2).max(1)
        }),
        out_dir: args.out.clone(),
        guest: args.guest.clone(),
        policies: args.policies.clone(),
        mem: args.mem,
        extra_cmdline: args.cmdline.clone(),
        timeout: std::time::Duration::from_secs(args.timeout),
        shard: args.shard.unwrap_or(conform::matrix::Shard::ALL),
        chart_workload: args.chart_workload,
        keep_disks: args.keep,
        platform: args.platform,
    };
    match conform::run(&opts) {
        Ok(outcome) => {
            print!("{}", outcome.table);
            for f in &outcome.files {
                println!("wrote {f}");
            }
            if outcome.all_passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILURE)
            }
        }
        Err(e) => fail(e),
    }
}

fn cmd_fixtures() -> ExitCode {
    let mut out = std::io::stdout().lock();
    for (name, description) in fixtures::list() {
        let _ = writeln!(out, "{name:<12} {description}");
    }
    ExitCode::SUCCESS
}

/// Opens /dev/null on any of fds 0, 1, 2 that is closed (`vmm run >&-`): otherwise the next
/// file the VMM opens (a memfd of guest RAM, the disk image) would get that number and receive
/// whatever is written to stdout or stderr.
fn ensure_std_fds() {
    for fd in 0..3 {
        // SAFETY: F_GETFD only queries the descriptor's flags.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1 {
            continue;
        }
        // SAFETY: a NUL-terminated path; open(2) returns the lowest free descriptor, which is
        // `fd` (all lower ones are open), and it stays open for the process's lifetime.
        unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) };
    }
}

/// The `vmm` entry point.
pub fn main() -> ExitCode {
    ensure_std_fds();
    init_tracing();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { EXIT_USAGE } else { EXIT_OK };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command {
        Command::Run(args) => cmd_run(&args),
        Command::Fixtures => cmd_fixtures(),
        Command::Conform(args) => cmd_conform(&args),
        Command::Bench(command) => match bench::run(&command.to_bench()) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        },
        Command::Ctl(args) => cmd_ctl(&args),
        Command::Replay(args) => cmd_replay(&args),
    }
}

fn cmd_replay(args: &ReplayArgs) -> ExitCode {
    let opts = replay::ReplayOptions {
        trace: args.trace.clone(),
        swiotlb_stats: args.swiotlb_stats.clone(),
        may_block: args.may_block.clone(),
        json: args.json,
        dump_stream: args.dump_stream.clone(),
    };
    if !args.describe {
        return cmd_replay_vm(args, &opts);
    }
    match replay::describe(&opts) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn cmd_replay_vm(args: &ReplayArgs, opts: &replay::ReplayOptions) -> ExitCode {
    if let Some(s) = args.speed {
        if !(s.is_finite() && s > 0.0) {
            return fail(format!("--speed {s}: expected a factor above 0"));
        }
    }
    let temp = args.disk.is_none();
    let disk = args.disk.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("vmm-replay-{}.img", std::process::id()))
    });
    let r = replay::ReplayRun {
        mem: args.mem,
        cpus: args.cpus,
        cmdline: args.cmdline.clone(),
        speed: args.speed,
        private: args.private,
        shared: args.shared,
        granularity: args.granularity,
        disk: disk.clone(),
        disk_size: args.disk_size.next_multiple_of(512),
        echo: !args.quiet,
    };
    let result = replay::run(opts, &r);
    if temp {
        let _ = std::fs::remove_file(&disk);
    }
    let (_, report) = match result {
        Ok(x) => x,
        Err(e) => return fail(e),
    };
    if let Some(path) = &args.stats_json {
        let written = serde_json::to_vec_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|json| std::fs::write(path, json).map_err(|e| e.to_string()));
        if let Err(e) = written {
            return fail(format!("cannot write --stats-json {}: {e}", path.display()));
        }
    }
    let g = |k: &str| {
        report
            .replay
            .get(k)
            .map(|v| v.to_string())
            .unwrap_or_default()
    };
    println!(
        "replay: ops={} maps={} failed_maps={} high_water_slots={} (model {}, Linux {}) high_water_bytes={} moved={} unmoved={} verified={} mismatches={}",
        g("ops"),
        g("maps"),
        g("failed_maps"),
        g("high_water_slots"),
        g("model_high_water_slots"),
        g("linux_hiwater_slots"),
        g("high_water_bytes"),
        g("moved"),
        g("unmoved"),
        g("verified"),
        g("mismatches")
    );
    ExitCode::from(report.run.exit_status)
}

fn cmd_ctl(args: &CtlArgs) -> ExitCode {
    use ctl::CtlCommand;
    let command = match &args.command {
        CtlSubcommand::Stats { watch } => CtlCommand::Stats { watch: *watch },
        CtlSubcommand::Metrics { label } => CtlCommand::Metrics {
            labels: label.clone(),
        },
        CtlSubcommand::Config => CtlCommand::Config,
        CtlSubcommand::Pause => CtlCommand::Pause,
        CtlSubcommand::Resume => CtlCommand::Resume,
        CtlSubcommand::Shutdown => CtlCommand::Shutdown,
    };
    if !(args.timeout.is_finite() && args.timeout > 0.0) {
        return fail(format!(
            "--timeout {}: expected seconds above 0",
            args.timeout
        ));
    }
    let opts = ctl::CtlOptions {
        socket: args.socket.clone(),
        command,
        json: args.json,
        timeout: std::time::Duration::from_secs_f64(args.timeout.min(86_400.0)),
    };
    let mut out = std::io::stdout().lock();
    match ctl::ctl(&opts, &mut out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = out.flush();
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::from(e.exit_status())
        }
    }
}
