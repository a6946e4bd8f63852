//! `vmm conform size`: the pool-size sweep. For each policy and workload, the smallest `pool=`
//! with zero failed requests, found by bisection over 2 MiB steps (256 KiB steps for the
//! policies whose pools take them), each probe one conformance cell run with that pool;
//! for a policy that sizes itself (`adaptive`), one run and its peak. Writes a table,
//! `size.json`, `size.csv` and `size-WORKLOAD.svg` (failed requests against pool size, a line
//! per policy).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::conform::chart::{self, Series};
use super::conform::matrix::{Shard, Workload};
use super::conform::report::CellResult;
use super::conform::{self, ConformError, ConformOptions};

const MIB: u64 = 1 << 20;
/// The 2 MiB step of the sweep.
const STEP_2M: u64 = 2 * MIB;
/// The finer step of pools made of 256 KiB segments.
const STEP_FINE: u64 = 256 << 10;

/// Errors of the sweep.
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    /// A probe could not run.
    #[error("probe {policy} {workload} pool={bytes}: {source}")]
    Probe {
        /// Policy.
        policy: String,
        /// Workload.
        workload: &'static str,
        /// Pool size probed.
        bytes: u64,
        /// Why.
        source: Box<ConformError>,
    },
    /// Writing results failed.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// JSON encoding failed.
    #[error("cannot encode the sweep as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// How to sweep.
#[derive(Clone, Debug)]
pub struct SizeOptions {
    /// Policies.
    pub policies: Vec<String>,
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Largest pool probed.
    pub max_pool: u64,
    /// The cell every probe runs (store pair and granularity), e.g. `memfd-memfd/4k`.
    pub backing: String,
    /// Where results go.
    pub out_dir: PathBuf,
    /// Guest, RAM, extra command line and timeout of each probe.
    pub guest: String,
    /// Guest RAM per probe.
    pub mem: u64,
    /// Extra guest command line.
    pub extra_cmdline: String,
    /// Longest a probe may run.
    pub timeout: std::time::Duration,
}

/// One probed size.
#[derive(Clone, Debug, Serialize)]
pub struct Probe {
    /// `pool=` bytes (0: the policy's own sizing).
    pub pool_bytes: u64,
    /// Requests that failed (each once).
    pub failed_requests: u64,
    /// Waits of blocking maps.
    pub waits: u64,
    /// Peak shared bytes.
    pub peak_shared_bytes: u64,
    /// Live-mapping high-water bytes.
    pub high_water_bytes: u64,
    /// I/O requests per second.
    pub iops: u64,
    /// Whether every invariant held.
    pub passed: bool,
}

impl Probe {
    fn of(pool_bytes: u64, r: &CellResult) -> Self {
        let m = &r.metrics;
        Probe {
            pool_bytes,
            // A run that broke (crash, I/O error) has failed whatever it counted.
            failed_requests: if r.passed || r.incompatible.is_some() {
                m.failed_requests
            } else {
                m.failed_requests.max(1)
            },
            waits: m.throttle_waits,
            peak_shared_bytes: m.peak_shared_bytes,
            high_water_bytes: m.high_water_bytes,
            iops: m.iops,
            passed: r.passed,
        }
    }

    fn ok(&self) -> bool {
        self.failed_requests == 0 && self.passed
    }
}

/// One policy x workload.
#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    /// Policy.
    pub policy: String,
    /// Workload.
    pub workload: &'static str,
    /// The policy sizes itself: one run, no `pool=`.
    pub self_sizing: bool,
    /// Smallest zero-failure `pool=` (None: none up to the maximum; self-sizing: None).
    pub smallest_pool_bytes: Option<u64>,
    /// Peak shared bytes at that size (self-sizing: of its run).
    pub footprint_bytes: Option<u64>,
    /// Every probe, by size.
    pub probes: Vec<Probe>,
}

/// Whether `policy` sizes itself (its `pool=` is only a starting point).
pub fn self_sizing(policy: &str) -> bool {
    policy == "adaptive"
}

/// The step a policy's pool sizes take.
pub fn step(policy: &str) -> u64 {
    if matches!(policy, "aligned-2m" | "adaptive") {
        STEP_2M
    } else {
        STEP_FINE
    }
}

fn probe(opts: &SizeOptions, policy: &str, w: Workload, bytes: u64) -> Result<Probe, SizeError> {
    let tag = if bytes == 0 {
        "auto".to_string()
    } else {
        format!("{}K", bytes >> 10)
    };
    let pool = if bytes == 0 {
        String::new()
    } else {
        format!("pool={bytes}")
    };
    let copts = ConformOptions {
        quick: false,
        filters: vec![format!("{policy}/{}/{}", opts.backing, w.name())],
        jobs: 1,
        out_dir: opts
            .out_dir
            .join("probes")
            .join(format!("{policy}-{}-{tag}", w.name())),
        guest: opts.guest.clone(),
        policies: vec![policy.to_string()],
        mem: opts.mem,
        extra_cmdline: format!("{} {pool}", opts.extra_cmdline),
        timeout: opts.timeout,
        shard: Shard::ALL,
        chart_workload: None,
        keep_disks: false,
        platform: memconv::Platform::default(),
    };
    let err = |source| SizeError::Probe {
        policy: policy.to_string(),
        workload: w.name(),
        bytes,
        source: Box::new(source),
    };
    let outcome = conform::run(&copts).map_err(err)?;
    let r = outcome
        .results
        .first()
        .ok_or_else(|| err(ConformError::NoCells(copts.filters.clone())))?;
    let p = Probe::of(bytes, r);
    eprintln!(
        "size: {policy} {} pool={tag}: {} failed requests, peak {:.1} MiB",
        w.name(),
        p.failed_requests,
        p.peak_shared_bytes as f64 / MIB as f64
    );
    Ok(p)
}

/// The sweep of one policy on one workload: double from one step until a size holds, then
/// bisect (on the policy's step) between the largest failing and the smallest holding size.
pub fn sweep_one(opts: &SizeOptions, policy: &str, w: Workload) -> Result<Sweep, SizeError> {
    let mut probes = Vec::new();
    if self_sizing(policy) {
        let p = probe(opts, policy, w, 0)?;
        let fp = p.ok().then_some(p.peak_shared_bytes);
        probes.push(p);
        return Ok(Sweep {
            policy: policy.to_string(),
            workload: w.name(),
            self_sizing: true,
            smallest_pool_bytes: None,
            footprint_bytes: fp,
            probes,
        });
    }
    let step = step(policy);
    let mut lo = 0u64; // largest size known to fail (0: none probed)
    let mut hi = None; // smallest size known to hold
    let mut size = STEP_2M;
    while size <= opts.max_pool {
        let p = probe(opts, policy, w, size)?;
        let ok = p.ok();
        probes.push(p);
        if ok {
            hi = Some(size);
            break;
        }
        lo = size;
        size *= 2;
    }
    if let Some(mut h) = hi {
        while h - lo > step {
            let mid = (lo + (h - lo) / 2).div_ceil(step) * step;
            let mid = mid.clamp(lo + step, h - step);
            let p = probe(opts, policy, w, mid)?;
            let ok = p.ok();
            probes.push(p);
            if ok {
                h = mid;
            } else {
                lo = mid;
            }
        }
        hi = Some(h);
    }
    probes.sort_by_key(|p| p.pool_bytes);
    let footprint = hi.and_then(|h| {
        probes
            .iter()
            .find(|p| p.pool_bytes == h)
            .map(|p| p.peak_shared_bytes)
    });
    Ok(Sweep {
        policy: policy.to_string(),
        workload: w.name(),
        self_sizing: false,
        smallest_pool_bytes: hi,
        footprint_bytes: footprint,
        probes,
    })
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// The text table: one row per policy x workload.
pub fn table(sweeps: &[Sweep]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<12} {:<8} {:>16} {:>14} {:>8} {:>22}",
        "policy", "workload", "smallest pool", "footprint MiB", "probes", "live high-water MiB"
    );
    for s in sweeps {
        let smallest = match (s.self_sizing, s.smallest_pool_bytes) {
            (true, _) => "self-sizing".to_string(),
            (false, Some(b)) => format!("{:.2} MiB", mib(b)),
            (false, None) => "none".to_string(),
        };
        let fp = s
            .footprint_bytes
            .map_or("-".to_string(), |b| format!("{:.1}", mib(b)));
        let hw = s
            .probes
            .iter()
            .filter(|p| p.ok())
            .map(|p| p.high_water_bytes)
            .min()
            .map_or("-".to_string(), |b| format!("{:.2}", mib(b)));
        let _ = writeln!(
            out,
            "{:<12} {:<8} {:>16} {:>14} {:>8} {:>22}",
            s.policy,
            s.workload,
            smallest,
            fp,
            s.probes.len(),
            hw
        );
    }
    out
}

/// The CSV: one row per probe.
pub fn csv(sweeps: &[Sweep]) -> String {
    let mut out = String::from(
        "policy,workload,pool_bytes,failed_requests,waits,peak_shared_bytes,high_water_bytes,iops,passed,smallest_zero_failure\n",
    );
    for s in sweeps {
        for p in &s.probes {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{}",
                s.policy,
                s.workload,
                p.pool_bytes,
                p.failed_requests,
                p.waits,
                p.peak_shared_bytes,
                p.high_water_bytes,
                p.iops,
                p.passed,
                s.smallest_pool_bytes == Some(p.pool_bytes)
            );
        }
    }
    out
}

/// Failed requests against pool size for one workload, a line per policy (a self-sizing
/// policy is one point at its peak).
pub fn chart(sweeps: &[Sweep], workload: &str) -> String {
    let series: Vec<Series> = sweeps
        .iter()
        .filter(|s| s.workload == workload)
        .map(|s| Series {
            label: s.policy.clone(),
            points: s
                .probes
                .iter()
                .map(|p| {
                    let x = if s.self_sizing {
                        p.peak_shared_bytes
                    } else {
                        p.pool_bytes
                    };
                    (mib(x), p.failed_requests as f64)
                })
                .collect(),
            point_labels: s
                .probes
                .iter()
                .map(|p| p.failed_requests.to_string())
                .collect(),
        })
        .collect();
    chart::lines(
        &format!("Failed requests vs pool size: {workload}"),
        "pool MiB (self-sizing: its peak)",
        "failed requests",
        &series,
    )
}

fn write(path: &Path, text: &str) -> Result<String, SizeError> {
    std::fs::write(path, text).map_err(|source| SizeError::Write {
        path: path.display().to_string(),
        source,
    })?;
    Ok(path.display().to_string())
}

/// Run the sweep; returns the sweeps, the table and the files written.
pub fn run(opts: &SizeOptions) -> Result<(Vec<Sweep>, String, Vec<String>), SizeError> {
    let mut sweeps = Vec::new();
    for w in &opts.workloads {
        for p in &opts.policies {
            sweeps.push(sweep_one(opts, p, *w)?);
        }
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| SizeError::Write {
        path: opts.out_dir.display().to_string(),
        source,
    })?;
    let mut files = vec![
        write(
            &opts.out_dir.join("size.json"),
            &serde_json::to_string_pretty(&sweeps)?,
        )?,
        write(&opts.out_dir.join("size.csv"), &csv(&sweeps))?,
    ];
    for w in &opts.workloads {
        files.push(write(
            &opts.out_dir.join(format!("size-{}.svg", w.name())),
            &chart(&sweeps, w.name()),
        )?);
    }
    let t = table(&sweeps);
    Ok((sweeps, t, files))
}
