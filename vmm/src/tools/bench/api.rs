//! `vmm bench api`: what the control socket costs. One VM runs the `soak` guest converting at
//! full rate and serving the control socket; the benchmark runs rounds of three phases in
//! rotating order: no client, a client polling `stats` every `poll` (10 ms by default), and a
//! client polling `config` (no memconv snapshot: the socket machinery alone, and the noise
//! floor of the measurement). Each poller phase is compared with the quiet phase of its round
//! (same VM, same host load); conversion rates are measured on the snapshots' own clock. It
//! reports the median effect with quartiles, the `stats` round trip (median, p99, max) under
//! that load, and how fresh the pollers' snapshots were.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::api::protocol::{Request, StatsView};
use crate::config::VmConfig;
use crate::run::{self, RunError, RunOptions, RunOutcome};
use crate::serial::Console;
use crate::tools::ctl::{Client, ClientError};
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
    /// Rounds of three phases (no poller, `stats` poller, `config` poller).
    pub rounds: u32,
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

/// What runs during a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// No client but the phase boundaries.
    Quiet,
    /// A client sends `stats` every poll interval.
    PollStats,
    /// A client sends `config` (no memconv snapshot) every poll interval: the noise floor of
    /// the measurement and the cost of the socket machinery alone.
    PollConfig,
}

/// One poller reply: round trip (us) and, for `stats`, the snapshot's age (ms).
type Sample = (f64, Option<f64>);

/// Sends `request` every `poll` until `stop`.
fn poller(
    socket: PathBuf,
    request: Request,
    poll: Duration,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Sample>, ClientError> {
    let mut client = Client::connect(&socket, Duration::from_secs(10))?;
    let mut samples = Vec::new();
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        let age = if request == Request::Stats {
            let (_, view) = client.stats()?;
            Some(view.age_ms as f64)
        } else {
            client.request(request)?;
            None
        };
        samples.push((t.elapsed().as_secs_f64() * 1e6, age));
        next += poll;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    Ok(samples)
}

/// Conversions per second over one phase, measured on the snapshots' own clock.
fn phase_rate(
    control: &mut Client,
    socket: &std::path::Path,
    phase: Phase,
    opts: &ApiBenchOptions,
    samples: &mut Vec<Sample>,
) -> Result<f64, BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let request = match phase {
        Phase::Quiet => None,
        Phase::PollStats => Some(Request::Stats),
        Phase::PollConfig => Some(Request::Config),
    };
    let poll_thread = match request {
        Some(request) => {
            let (s, p, st) = (socket.to_path_buf(), opts.poll, Arc::clone(&stop));
            Some(
                std::thread::Builder::new()
                    .name("bench-poller".into())
                    .spawn(move || poller(s, request, p, st))?,
            )
        }
        None => None,
    };
    let (_, v0) = control.stats()?;
    std::thread::sleep(opts.phase);
    if opts.phase >= crate::api::server::idle_timeout() / 2 {
        // A long phase idles the control connection: the server may have dropped it.
        *control = Client::connect(socket, Duration::from_secs(10))?;
    }
    let (_, v1) = control.stats()?;
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = poll_thread {
        match t.join() {
            Ok(r) => samples.extend(r?),
            Err(_) => return Err(BenchError::Vm("the poller thread panicked".into())),
        }
    }
    let dt_ms = v1.uptime_ms.saturating_sub(v0.uptime_ms);
    if dt_ms == 0 {
        return Err(BenchError::Vm("a phase saw one snapshot twice".into()));
    }
    Ok(conversions(&v1).saturating_sub(conversions(&v0)) as f64 * 1e3 / dt_ms as f64)
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
        cmdline: format!("seconds=0 {}", opts.cmdline),
        ..VmConfig::fixture("soak", opts.mem)
    };
    let run_opts = RunOptions {
        console: Some(Console::with_writer(Box::new(std::io::sink()))),
        api_socket: Some(socket.clone()),
        ..Default::default()
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
    loop {
        let (_, v) = control.stats()?;
        if conversions(&v) > 0 && v.memconv.pool_report.is_some() {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Vm("the guest does not convert".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));

    // Rounds of three phases in rotating order; each poller phase is compared with the quiet
    // phase of its own round (they share the host's background load).
    let phases = [Phase::Quiet, Phase::PollStats, Phase::PollConfig];
    let mut rates: Vec<[f64; 3]> = Vec::new();
    let mut stats_samples = Vec::new();
    let mut config_samples = Vec::new();
    for round in 0..opts.rounds.max(1) as usize {
        let mut rate = [0.0; 3];
        for k in 0..3 {
            let i = (round + k) % 3;
            let samples = match phases[i] {
                Phase::PollConfig => &mut config_samples,
                _ => &mut stats_samples,
            };
            rate[i] = phase_rate(&mut control, &socket, phases[i], opts, samples)?;
        }
        rates.push(rate);
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

    let sorted = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v
    };
    let rtt = sorted(stats_samples.iter().map(|s| s.0).collect());
    let ages = sorted(stats_samples.iter().filter_map(|s| s.1).collect());
    let fresh = ages.iter().filter(|a| **a == 0.0).count();
    let config_rtt = sorted(config_samples.iter().map(|s| s.0).collect());
    let effect = |i: usize| {
        sorted(
            rates
                .iter()
                .filter(|r| r[0] > 0.0)
                .map(|r| (r[i] - r[0]) / r[0] * 100.0)
                .collect(),
        )
    };
    let (stats_effect, config_effect) = (effect(1), effect(2));
    let column = |i: usize| sorted(rates.iter().map(|r| r[i]).collect::<Vec<_>>());

    let mut out = String::new();
    let _ = writeln!(
        out,
        "api: `soak {}` on {} MiB, 1 vCPU ({}), {} rounds of 3 phases of {:.1} s, pollers every {} ms",
        opts.cmdline,
        opts.mem >> 20,
        if s.native { "native" } else { "emulated" },
        rates.len(),
        opts.phase.as_secs_f64(),
        opts.poll.as_millis()
    );
    let _ = writeln!(
        out,
        "  stats round trip (n={}): median {:.0} us, p99 {:.0} us, max {:.0} us",
        rtt.len(),
        quantile(&rtt, 0.5),
        quantile(&rtt, 0.99),
        rtt.last().copied().unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "  stats snapshots: {:.0}% of poller replies fresh, age median {:.0} ms, max {:.0} ms",
        fresh as f64 * 100.0 / ages.len().max(1) as f64,
        quantile(&ages, 0.5),
        ages.last().copied().unwrap_or(0.0)
    );
    let _ = writeln!(
        out,
        "  config round trip (n={}): median {:.0} us, p99 {:.0} us",
        config_rtt.len(),
        quantile(&config_rtt, 0.5),
        quantile(&config_rtt, 0.99)
    );
    for (name, i) in [("no poller", 0), ("stats poller", 1), ("config poller", 2)] {
        let c = column(i);
        let _ = writeln!(
            out,
            "  conversions/s, {name:<13}: median {:.0} (min {:.0}, max {:.0})",
            quantile(&c, 0.5),
            c.first().copied().unwrap_or(0.0),
            c.last().copied().unwrap_or(0.0)
        );
    }
    for (name, e) in [
        ("stats poller", &stats_effect),
        ("config poller (noise floor)", &config_effect),
    ] {
        let _ = writeln!(
            out,
            "  effect of the {name}: {:+.2}% (median of {} rounds, quartiles {:+.2}% .. {:+.2}%)",
            quantile(e, 0.5),
            e.len(),
            quantile(e, 0.25),
            quantile(e, 0.75)
        );
    }
    let d = quantile(&stats_effect, 0.5);
    let _ = writeln!(
        out,
        "  target: the stats poller within 2% -> {}",
        if d.abs() < 2.0 { "ok" } else { "OVER TARGET" }
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
