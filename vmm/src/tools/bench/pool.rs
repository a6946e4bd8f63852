//! `vmm bench pool`: swiotlb map+unmap operations per second inside the VM, per policy and
//! vCPU count (the `poolbench` fixture).

use std::fmt::Write as _;

use super::common::{config, guest_field, BenchError, Capture};
use crate::run;
use crate::serial::Console;

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
    for policy in [
        "legacy",
        "dynamic",
        "refill",
        "throttle",
        "aligned-2m",
        "adaptive",
    ] {
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
