//! `vmm bench api`: what the control socket costs. One VM runs the `soak` guest converting at
//! full rate and serving the control socket; the benchmark alternates phases without and with
//! a client polling `stats` every `poll` (10 ms by default) and reports the conversion rate of
//! each (same VM, same run, medians over the phases), the `stats` round trip (median, p99,
//! max) under that load, and the round trip of `config` (no memconv snapshot) for comparison.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use memconv::{Granularity, StoreKind};

use super::client::{Client, ClientError};
use super::protocol::{Request, StatsView};
use crate::config::{GuestSource, VmConfig};
use crate::run::{self, RunError, RunOptions, RunOutcome};
use crate::serial::Console;
use crate::vcpu::VmEnd;

/// Errors of the API benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The VM could not start.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Talking to the VM failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Scratch files or threads.
    #[error("benchmark setup: {0}")]
    Io(#[from] std::io::Error),
    /// The VM ended on its own or did not convert.
    #[error("benchmark VM: {0}")]
    Vm(String),
}

/// What to run.
#[derive(Clone, Debug)]
pub struct ApiBenchOptions {
    /// Phase pairs (without, with the poller).
    pub pairs: u32,
    /// Length of a phase.
    pub phase: Duration,
    /// Poll interval.
    pub poll: Duration,
    /// Guest RAM.
    pub mem: u64,
    /// `soak` command line.
    pub cmdline: String,
}

fn conversions(v: &StatsView) -> u64 {
    v.memconv.to_shared.total() + v.memconv.to_private.total()
}

/// Quantile `q` of sorted `v` (nearest rank).
fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    quantile(&s, 0.5)
}

/// Polls `stats` every `poll` until `stop`; returns the round trips (microseconds) and the
/// ages of the snapshots (milliseconds).
fn poller(
    socket: PathBuf,
    poll: Duration,
    stop: Arc<AtomicBool>,
) -> Result<Vec<(f64, f64)>, ClientError> {
    let mut client = Client::connect(&socket, Duration::from_secs(10))?;
    let mut rtts = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let (_, view) = client.stats()?;
        rtts.push((t.elapsed().as_secs_f64() * 1e6, view.age_ms as f64));
        next += poll;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(rtts)
}

struct Vm {
    thread: Option<JoinHandle<Result<RunOutcome, RunError>>>,
    dir: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        // On an early error, make sure the VM thread does not outlive the benchmark silently.
        if let Some(t) = self.thread.take() {
            if let Ok(mut c) = Client::connect(&self.dir.join("api.sock"), Duration::from_secs(5)) {
                let _ = c.request(Request::Shutdown);
            }
            let _ = t.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the benchmark and returns its report.
pub fn run(opts: &ApiBenchOptions) -> Result<String, BenchError> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("api.sock");
    let cfg = VmConfig {
        guest: GuestSource::Fixture("soak".into()),
        mem: opts.mem,
        cpus: 1,
        serial: None,
        cmdline: format!("seconds=0 {}", opts.cmdline),
        exec: None,
        private: StoreKind::Memfd,
        shared: StoreKind::Memfd,
        granularity: Granularity::Page4K,
        stats_json: None,
        disk: None,
    };
    let run_opts = RunOptions {
        console: Some(Console::with_writer(Box::new(std::io::sink()))),
        api_socket: Some(socket.clone()),
    };
    let vm_cfg = cfg.clone();
    let thread = std::thread::Builder::new()
        .name("bench-vm".into())
        .spawn(move || run::run_vm_with_options(&vm_cfg, run_opts))?;
    let mut vm = Vm {
        thread: Some(thread),
        dir,
    };

    // Wait for the socket and for conversions to flow.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut control = loop {
        if vm.thread.as_ref().is_some_and(|t| t.is_finished()) {
            let outcome = vm.thread.take().map(|t| t.join());
            return Err(match outcome {
                Some(Ok(Err(e))) => BenchError::Run(e),
                _ => BenchError::Vm("the VM ended before its control socket came up".into()),
            });
        }
        match Client::connect(&socket, Duration::from_secs(10)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let start_view = loop {
        let (_, v) = control.stats()?;
        if conversions(&v) > 0 && v.memconv.pool_report.is_some() {
            break v;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Vm("the guest does not convert".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::thread::sleep(Duration::from_millis(300));

    let mut rate_off = Vec::new();
    let mut rate_on = Vec::new();
    let mut paired = Vec::new();
    let mut rtts: Vec<f64> = Vec::new();
    let mut ages: Vec<f64> = Vec::new();
    for pair in 0..opts.pairs.max(1) {
        // ABBA order over pairs cancels a slow drift of the rate.
        let order = if pair % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_poller in order {
            let stop = Arc::new(AtomicBool::new(false));
            let poll_thread = if with_poller {
                let (s, p, st) = (socket.clone(), opts.poll, Arc::clone(&stop));
                Some(
                    std::thread::Builder::new()
                        .name("bench-poller".into())
                        .spawn(move || poller(s, p, st))?,
                )
            } else {
                None
            };
            let (_, v0) = control.stats()?;
            let t0 = Instant::now();
            std::thread::sleep(opts.phase);
            let (_, v1) = control.stats()?;
            let dt = t0.elapsed().as_secs_f64();
            stop.store(true, Ordering::Relaxed);
            if let Some(t) = poll_thread {
                match t.join() {
                    Ok(r) => {
                        for (rtt, age) in r? {
                            rtts.push(rtt);
                            ages.push(age);
                        }
                    }
                    Err(_) => return Err(BenchError::Vm("the poller thread panicked".into())),
                }
            }
            let rate = conversions(&v1).saturating_sub(conversions(&v0)) as f64 / dt;
            if with_poller {
                rate_on.push(rate);
            } else {
                rate_off.push(rate);
            }
        }
        // Adjacent phases share the background load of the host: compare within the pair.
        if let (Some(on), Some(off)) = (rate_on.last(), rate_off.last()) {
            if *off > 0.0 {
                paired.push((on - off) / off * 100.0);
            }
        }
    }

    // The round trip without a memconv snapshot, under the same load.
    let mut config_rtts = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        control.request(Request::Config)?;
        config_rtts.push(t.elapsed().as_secs_f64() * 1e6);
    }

    control.request(Request::Shutdown)?;
    let outcome = match vm.thread.take().map(|t| t.join()) {
        Some(Ok(Ok(o))) => o,
        Some(Ok(Err(e))) => return Err(e.into()),
        _ => return Err(BenchError::Vm("the VM thread panicked".into())),
    };
    let s = &outcome.summary;
    if !matches!(s.end, VmEnd::Stopped) {
        return Err(BenchError::Vm(format!(
            "the VM ended on its own: {:?}",
            s.end
        )));
    }

    rtts.sort_by(|a, b| a.total_cmp(b));
    let fresh = ages.iter().filter(|a| **a == 0.0).count();
    ages.sort_by(|a, b| a.total_cmp(b));
    config_rtts.sort_by(|a, b| a.total_cmp(b));
    let off = median(&rate_off);
    let on = median(&rate_on);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "api: `soak {}` on {} MiB, 1 vCPU ({}), {} phase pairs of {:.1} s, poller every {} ms",
        opts.cmdline,
        opts.mem >> 20,
        if s.native { "native" } else { "emulated" },
        opts.pairs.max(1),
        opts.phase.as_secs_f64(),
        opts.poll.as_millis()
    );
    let _ = writeln!(
        out,
        "  guest conversions/s at start: {:.0} (ranges per doorbell {:.1})",
        conversions(&start_view) as f64 / (start_view.memconv.uptime_ms.max(1) as f64 / 1e3),
        start_view.memconv.ranges_per_exit
    );
    let _ = writeln!(
        out,
        "  stats round trip (n={}): median {:.0} us, p99 {:.0} us, max {:.0} us, min {:.0} us",
        rtts.len(),
        quantile(&rtts, 0.5),
        quantile(&rtts, 0.99),
        rtts.last().copied().unwrap_or(0.0),
        rtts.first().copied().unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "  stats snapshots: {:.0}% of replies fresh (age 0 ms), age median {:.0} ms, max {:.0} ms",
        fresh as f64 * 100.0 / ages.len().max(1) as f64,
        quantile(&ages, 0.5),
        ages.last().copied().unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "  config round trip (n={}): median {:.0} us, p99 {:.0} us",
        config_rtts.len(),
        quantile(&config_rtts, 0.5),
        quantile(&config_rtts, 0.99)
    );
    let fmt = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.0}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let _ = writeln!(
        out,
        "  conversions/s without poller: median {off:.0} (phases: {})",
        fmt(&rate_off)
    );
    let _ = writeln!(
        out,
        "  conversions/s with poller:    median {on:.0} (phases: {})",
        fmt(&rate_on)
    );
    paired.sort_by(|a, b| a.total_cmp(b));
    let diff = quantile(&paired, 0.5);
    let _ = writeln!(
        out,
        "  poller effect on the conversion rate: {diff:+.2}% (median of {} paired phases; quartiles {:+.2}% .. {:+.2}%; target: within 2%) -> {}",
        paired.len(),
        quantile(&paired, 0.25),
        quantile(&paired, 0.75),
        if diff.abs() < 2.0 { "ok" } else { "OVER TARGET" }
    );
    let _ = writeln!(
        out,
        "  VM: {} conversions in {:.1} s, ended {:?}",
        s.memconv.to_shared.total() + s.memconv.to_private.total(),
        s.timings.total_ms / 1e3,
        s.end
    );
    Ok(out)
}
