//! `vmm bench boot`: boot latency (VM creation to the guest's first serial byte and to exit),
//! exits per boot, and a guest compute loop natively vs in KVM's instruction emulator; then
//! how boot scales with RAM on hugetlb/hugetlb, lazy (each chunk backed at ACCEPT) against
//! `--prealloc` (all RAM backed before boot), at 512 MiB, 2 GiB and 4 GiB. Every figure is
//! measured in the same run; the compute loop subtracts a zero-iteration baseline.

use std::fmt::Write as _;

use memconv::StoreKind;

use super::common::{config, run_quiet, spread, BenchError};
use crate::config::{ExecMode, VmConfig};
use crate::run::RunError;

/// RAM sizes of the scaling table.
const SCALING_MEM: [u64; 3] = [512 << 20, 2 << 30, 4 << 30];

/// Median create -> first serial byte of `runs` boots of `hello` with `mem` bytes on
/// hugetlb/hugetlb, or why it could not run (e.g. not enough huge pages for `--prealloc`).
fn hugetlb_boot(mem: u64, prealloc: bool, runs: u32) -> Result<f64, String> {
    let cfg = VmConfig {
        private: StoreKind::Hugetlb,
        shared: StoreKind::Hugetlb,
        prealloc,
        ..VmConfig::fixture("hello", mem)
    };
    let mut first = Vec::new();
    for _ in 0..runs {
        let s = run_quiet(&cfg).map_err(|e| e.to_string())?;
        first.extend(s.timings.first_serial_byte_ms);
    }
    if first.is_empty() {
        return Err("no serial output".into());
    }
    Ok(spread(first).1)
}

/// The scaling table: lazy and eager boot per RAM size, and the two target ratios.
fn scaling(out: &mut String, runs: u32) {
    let _ = writeln!(
        out,
        "boot scaling: hello on hugetlb/hugetlb, create -> first serial byte (ms, median of {runs} lazy, 1 prealloc)"
    );
    let _ = writeln!(out, "  RAM        lazy   prealloc   prealloc/lazy");
    let mut lazy = Vec::new();
    for mem in SCALING_MEM {
        let l = hugetlb_boot(mem, false, runs);
        let e = hugetlb_boot(mem, true, 1);
        let cell = |r: &Result<f64, String>| match r {
            Ok(v) => format!("{v:>10.2}"),
            Err(_) => format!("{:>10}", "n/a"),
        };
        let ratio = match (&l, &e) {
            (Ok(l), Ok(e)) if *l > 0.0 => format!("{:>10.1}x", e / l),
            _ => format!("{:>11}", "-"),
        };
        let _ = writeln!(
            out,
            "  {:>4} MiB {} {} {ratio}",
            mem >> 20,
            cell(&l),
            cell(&e)
        );
        for (what, r) in [("lazy", &l), ("prealloc", &e)] {
            if let Err(why) = r {
                let _ = writeln!(out, "    {what} {} MiB not measured: {why}", mem >> 20);
            }
        }
        lazy.push((l.ok(), e.ok()));
    }
    if let (Some((Some(small), _)), Some((Some(big), eager_big))) = (lazy.first(), lazy.last()) {
        let _ = writeln!(
            out,
            "  lazy 4 GiB / 512 MiB = {:.2}x (target <= 1.5x)",
            big / small
        );
        if let Some(e) = eager_big {
            let _ = writeln!(
                out,
                "  prealloc / lazy at 4 GiB = {:.1}x (target >= 10x)",
                e / big
            );
        }
    }
}

/// Runs the boot benchmark and returns its report (`scaling_runs` 0: no scaling table).
pub fn boot(runs: u32, native_iters: u64, scaling_runs: u32) -> Result<String, BenchError> {
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
    if scaling_runs > 0 {
        scaling(&mut out, scaling_runs);
    }
    Ok(out)
}
