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
