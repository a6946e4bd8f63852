//! What the VM benchmarks share: their error enum, the small one-vCPU configuration, running
//! a VM with its console discarded or captured, reading `key=value` figures from guest output,
//! and the spread of a sample.

use crate::config::{ExecMode, VmConfig};
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
    GuestFailed {
        /// The guest (and what it printed, where that helps).
        guest: String,
        /// How it ended.
        end: VmEnd,
    },
    /// The control-socket benchmark failed.
    #[error(transparent)]
    Api(#[from] super::api::BenchError),
}

pub(super) fn config(guest: &str, cmdline: String, exec: Option<ExecMode>) -> VmConfig {
    VmConfig {
        cmdline,
        exec,
        ..VmConfig::fixture(guest, 64 << 20)
    }
}

pub(super) fn run_quiet(cfg: &VmConfig) -> Result<RunSummary, BenchError> {
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
pub(super) fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    (v[0], v[v.len() / 2], v[v.len() - 1])
}

/// A console writer that keeps what the guest printed.
#[derive(Clone, Default)]
pub(super) struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

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
    pub(super) fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(|p| p.into_inner())).into_owned()
    }
}

/// `key=value` from the guest's `io: done` line.
pub(super) fn io_field(out: &str, key: &str) -> f64 {
    guest_field(out, "io: done", key)
}

/// `key=value` from the guest line starting with `prefix`.
pub(super) fn guest_field(out: &str, prefix: &str, key: &str) -> f64 {
    out.lines()
        .filter(|l| l.starts_with(prefix))
        .flat_map(|l| l.split_whitespace())
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}
