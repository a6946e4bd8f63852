//! `vmm bench boot`: boot latency (VM creation to the guest's first serial byte and to exit),
//! exits per boot, and a guest compute loop natively vs in KVM's instruction emulator. Every
//! figure is measured in the same run; the compute loop subtracts a zero-iteration baseline.

use std::fmt::Write as _;

use memconv::{Granularity, StoreKind};

use crate::config::{ExecMode, GuestSource, VmConfig};
use crate::run::{self, RunError, RunSummary};
use crate::serial::Console;
use crate::vcpu::VmEnd;

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A VM could not start.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A benchmark guest did not exit cleanly.
    #[error("benchmark guest {guest} did not exit 0: {end:?}")]
    GuestFailed { guest: String, end: VmEnd },
}

fn config(guest: &str, cmdline: String, exec: Option<ExecMode>) -> VmConfig {
    VmConfig {
        guest: GuestSource::Fixture(guest.into()),
        mem: 64 << 20,
        cpus: 1,
        serial: None,
        cmdline,
        exec,
        private: StoreKind::Memfd,
        shared: StoreKind::Memfd,
        granularity: Granularity::Page4K,
        stats_json: None,
        disk: None,
    }
}

fn run_quiet(cfg: &VmConfig) -> Result<RunSummary, BenchError> {
    let outcome =
        run::run_vm_with_console(cfg, Some(Console::with_writer(Box::new(std::io::sink()))))?;
    let s = outcome.summary;
    if s.exit_status != 0 {
        return Err(BenchError::GuestFailed {
            guest: cfg.guest.to_string(),
            end: s.end,
        });
    }
    Ok(s)
}

/// Statistics of a sample: (min, median, max).
fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// Runs the boot benchmark and returns its report.
pub fn boot(runs: u32, native_iters: u64) -> Result<String, BenchError> {
    let mut out = String::new();
    let runs = runs.max(1);
    let mut first = Vec::new();
    let mut total = Vec::new();
    let mut exits = Vec::new();
    let mut native = false;
    for _ in 0..runs {
        let s = run_quiet(&config("hello", String::new(), None))?;
        native = s.native;
        first.extend(s.timings.first_serial_byte_ms);
        total.push(s.timings.total_ms);
        exits.push(s.total_exits() as f64);
    }
    let (f_min, f_med, f_max) = spread(first);
    let (t_min, t_med, t_max) = spread(total);
    let (e_min, e_med, e_max) = spread(exits);
    let _ = writeln!(
        out,
        "boot: {runs} runs of `hello` (64 MiB, 1 vCPU, {})",
        if native { "native" } else { "emulated" }
    );
    let _ = writeln!(out, "  metric                      min      median   max");
    let _ = writeln!(
        out,
        "  create -> first byte (ms) {f_min:>8.2} {f_med:>8.2} {f_max:>8.2}"
    );
    let _ = writeln!(
        out,
        "  create -> exit (ms)       {t_min:>8.2} {t_med:>8.2} {t_max:>8.2}"
    );
    let _ = writeln!(
        out,
        "  exits per boot            {e_min:>8.0} {e_med:>8.0} {e_max:>8.0}"
    );

    let mut per_iter = Vec::new();
    for (mode, iters) in [
        (ExecMode::Native, native_iters),
        (ExecMode::Emulated, (native_iters / 10_000).max(1000)),
    ] {
        let base = run_quiet(&config("spin", "iters=0".into(), Some(mode)));
        let base = match base {
            Ok(b) => b,
            Err(BenchError::Run(RunError::Pvm(e))) => {
                let _ = writeln!(out, "compute loop {mode:?}: not measurable here ({e})");
                continue;
            }
            Err(e) => return Err(e),
        };
        let timed = run_quiet(&config("spin", format!("iters={iters}"), Some(mode)))?;
        let ns = (timed.timings.total_ms - base.timings.total_ms).max(0.0) * 1e6 / iters as f64;
        let _ = writeln!(
            out,
            "compute loop {mode:?}: {iters} iterations, {:.2} ms over a {:.2} ms zero-iteration boot = {ns:.3} ns/iteration",
            timed.timings.total_ms - base.timings.total_ms,
            base.timings.total_ms
        );
        per_iter.push((mode, ns));
    }
    if let [(_, native_ns), (_, emulated_ns)] = per_iter[..] {
        if native_ns > 0.0 {
            let _ = writeln!(
                out,
                "compute loop: emulated / native = {:.0}x",
                emulated_ns / native_ns
            );
        }
    }
    Ok(out)
}

/// A console writer that keeps what the guest printed.
#[derive(Clone, Default)]
struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Capture {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// `key=value` from the guest's `io: done` line.
fn io_field(out: &str, key: &str) -> f64 {
    guest_field(out, "io: done", key)
}

/// `key=value` from the guest line starting with `prefix`.
fn guest_field(out: &str, prefix: &str, key: &str) -> f64 {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .flat_map(|l| l.split_whitespace())
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// `vmm bench pool`: map+unmap operations per second inside the VM for every policy with 1
/// and 2 vCPUs mapping at once (`poolbench` fixture, 256 MiB guest).
pub fn pool(ms: u64, size: u64) -> Result<String, BenchError> {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pool: map+unmap of {size} B ToDevice (may block), {ms} ms per figure, inside the VM (native)"
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>14} {:>14} {:>8}",
        "policy", "1 vCPU ops/s", "2 vCPUs ops/s", "scaling"
    );
    for policy in ["legacy", "dynamic", "refill", "throttle", "aligned-2m"] {
        let mut rates = Vec::new();
        for cpus in [1, 2] {
            let mut cfg = config(
                "poolbench",
                format!("policy={policy} ms={ms} size={size}"),
                None,
            );
            cfg.mem = 256 << 20;
            cfg.cpus = cpus;
            let capture = Capture::default();
            let outcome = run::run_vm_with_console(
                &cfg,
                Some(Console::with_writer(Box::new(capture.clone()))),
            )?;
            if outcome.summary.exit_status != 0 {
                return Err(BenchError::GuestFailed {
                    guest: format!("poolbench {}: {}", cfg.cmdline, capture.text()),
                    end: outcome.summary.end,
                });
            }
            rates.push(guest_field(&capture.text(), "poolbench:", "ops_per_s"));
        }
        let _ = writeln!(
            out,
            "  {policy:<10} {:>14.0} {:>14.0} {:>7.2}x",
            rates[0],
            rates[1],
            if rates[0] > 0.0 {
                rates[1] / rates[0]
            } else {
                0.0
            }
        );
    }
    Ok(out)
}

/// Pool sizes small enough for a 512 MiB guest, per policy.
const IO_POLICIES: [(&str, &str); 5] = [
    ("legacy", "pool=64M"),
    ("dynamic", "pool=4M"),
    ("refill", "pool=32M"),
    ("throttle", "pool=4M"),
    ("aligned-2m", "pool=16M"),
];

fn io_run(
    policy_opts: &str,
    workload: &str,
    store: StoreKind,
    disk: &std::path::Path,
) -> Result<(RunSummary, String), BenchError> {
    let cfg = VmConfig {
        guest: GuestSource::Fixture("io".into()),
        mem: 512 << 20,
        cpus: 1,
        serial: None,
        cmdline: format!("{policy_opts} {workload}"),
        exec: None,
        private: store,
        shared: store,
        granularity: Granularity::Page4K,
        stats_json: None,
        disk: Some(crate::config::DiskConfig {
            path: disk.to_path_buf(),
            create_size: Some(256 << 20),
            idle_us: crate::devices::virtio_blk::DEFAULT_IDLE_US,
        }),
    };
    let capture = Capture::default();
    let outcome =
        run::run_vm_with_console(&cfg, Some(Console::with_writer(Box::new(capture.clone()))))?;
    let s = outcome.summary;
    if s.exit_status != 0 {
        return Err(BenchError::GuestFailed {
            guest: format!("io {}: {}", cfg.cmdline, capture.text()),
            end: s.end,
        });
    }
    Ok((s, capture.text()))
}

/// `vmm bench io`: per policy, 4 KiB random reads at queue depth 32 (IOPS, memfd/memfd) and
/// 64 KiB reads (bandwidth next to a plain memcpy of the same sizes in the same guest,
/// hugetlb/hugetlb), with the pool's footprint and conversions and memconv's double
/// allocation. `secs` seconds per measurement.
pub fn io(secs: u64) -> Result<String, BenchError> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        BenchError::Run(RunError::Disk(crate::devices::DiskError::Open {
            path: dir.clone(),
            source: e,
        }))
    })?;
    let disk = dir.join("bench.img");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "io: 1 vCPU, 512 MiB, 256 MiB disk, {secs} s per figure; 4k = random reads qd=32 (memfd/memfd), \
         64k = reads qd=32 (hugetlb/hugetlb) vs memcpy of 64 KiB in the same guest from a \
         128 MiB source (the disk region's size) into the request buffers"
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>9} {:>9} {:>11} {:>6} {:>9} {:>11} {:>10} {:>8} {:>6} {:>6} {:>6} {:>9}",
        "policy",
        "4k IOPS",
        "64k MB/s",
        "memcpy MB/s",
        "ratio",
        "doorbells",
        "shared peak",
        "map fails",
        "throttle",
        "cv 4k",
        "cv 2m",
        "cv oth",
        "dbl peak"
    );
    for (policy, opts) in IO_POLICIES {
        let popts = format!("policy={policy} {opts}");
        let w4k = format!("rw=read sizes=4k qd=32 verify=0 region=128M seconds={secs}");
        let (_s4, o4) = io_run(&popts, &w4k, StoreKind::Memfd, &disk)?;
        let w64 = format!("rw=read sizes=64k qd=32 verify=0 region=128M memcpy=1 seconds={secs}");
        let (s64, o64) = io_run(&popts, &w64, StoreKind::Hugetlb, &disk)?;
        let iops = io_field(&o4, "iops");
        let mbps = io_field(&o64, "MBps");
        let memcpy = io_field(&o64, "memcpy_MBps");
        let doorbells = io_field(&o4, "doorbells") + io_field(&o64, "doorbells");
        let p = s64.memconv.pool_report.as_ref();
        let pf = |f: fn(&memconv::stats::PoolReportSnapshot) -> u64| p.map_or(0, f);
        let _ = writeln!(
            out,
            "  {:<10} {:>9.0} {:>9.0} {:>11.0} {:>6.2} {:>9.0} {:>9.1}Mi {:>10} {:>8} {:>6} {:>6} {:>6} {:>7.1}Mi",
            policy,
            iops,
            mbps,
            memcpy,
            if memcpy > 0.0 { mbps / memcpy } else { 0.0 },
            doorbells,
            pf(|p| p.shared_peak_bytes) as f64 / (1u64 << 20) as f64,
            pf(|p| p.map_failures),
            pf(|p| p.throttle_waits),
            pf(|p| p.conversions_4k),
            pf(|p| p.conversions_2m),
            pf(|p| p.conversions_other),
            s64.memconv.double_alloc.computed_peak_bytes as f64 / (1u64 << 20) as f64,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}
