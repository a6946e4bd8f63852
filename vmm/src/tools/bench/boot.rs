//! `vmm bench boot`: boot latency (VM creation to the guest's first serial byte and to exit),
//! exits per boot, and a guest compute loop natively vs in KVM's instruction emulator. Every
//! figure is measured in the same run; the compute loop subtracts a zero-iteration baseline.

use std::fmt::Write as _;

use super::common::{config, run_quiet, spread, BenchError};
use crate::config::ExecMode;
use crate::run::RunError;

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
