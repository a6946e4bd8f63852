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
use crate::run;
use crate::tools::{bench, conform, ctl};

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
    /// Boot a guest (by default the embedded `hello` fixture) and run it to its end.
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
            BenchCommand::Io { secs } => bench::Bench::Io { secs: *secs },
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
pub struct ConformArgs {
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
        default_value = "legacy,dynamic,refill,throttle,aligned-2m"
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
    /// Confidential platform every cell runs on (its acceptance lifecycle): tdx or snp.
    #[arg(long, value_name = "tdx|snp", default_value = "tdx")]
    platform: Platform,
}

/// Flags of `vmm run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// An embedded fixture name (see `vmm fixtures`) or a path to a guest ELF.
    #[arg(long, value_name = "NAME|PATH", default_value = fixtures::DEFAULT_FIXTURE)]
    guest: String,
    /// Guest RAM: bytes or K/M/G suffix, a multiple of 2M.
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = size)]
    mem: u64,
    /// Number of vCPUs.
    #[arg(long, value_name = "N", default_value_t = 1)]
    cpus: u32,
    /// Write the guest's serial console to FILE instead of stdout.
    #[arg(long, value_name = "FILE")]
    serial: Option<PathBuf>,
    /// Guest command line, "key=value ...".
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
    /// Do not print the summary.
    #[arg(long)]
    quiet: bool,
}

/// `--mem`, `--disk-size`: a size like `512M`, parsed by clap (its errors exit with status 2).
fn size(text: &str) -> Result<u64, ConfigError> {
    parse_size(text)
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
        .try_init();
}

impl RunArgs {
    fn disk_config(&self) -> Option<DiskConfig> {
        self.disk.as_ref().map(|path| DiskConfig {
            path: path.clone(),
            create_size: self.disk_size,
            idle_us: self.disk_idle_us,
        })
    }

    /// The VM configuration; [`run::run_vm_with_options`] validates it.
    fn to_config(&self) -> Result<VmConfig, FixtureError> {
        Ok(VmConfig {
            guest: fixtures::resolve(&self.guest)?,
            mem: self.mem,
            cpus: self.cpus,
            serial: self.serial.clone(),
            cmdline: self.cmdline.clone(),
            exec: self.exec,
            private: self.private,
            shared: self.shared,
            granularity: self.granularity,
            platform: self.platform,
            prealloc: self.prealloc,
            stats_json: self.stats_json.clone(),
            disk: self.disk_config(),
        })
    }
}

fn cmd_run(args: &RunArgs) -> ExitCode {
    let cfg = match args.to_config() {
        Ok(cfg) => cfg,
        Err(e) => return fail(e),
    };
    let opts = run::RunOptions {
        api_socket: args.api_socket.clone(),
        ..Default::default()
    };
    let outcome = match run::run_vm_with_options(&cfg, opts) {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let summary = &outcome.summary;
    if let Some(path) = &cfg.stats_json {
        let written = serde_json::to_vec_pretty(summary)
            .map_err(|e| e.to_string())
            .and_then(|json| std::fs::write(path, json).map_err(|e| e.to_string()));
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
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(summary.render().as_bytes());
        let _ = out.flush();
    }
    ExitCode::from(outcome.exit_status())
}

fn cmd_conform(args: &ConformArgs) -> ExitCode {
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

/// The `vmm` entry point.
pub fn main() -> ExitCode {
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
    }
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
