//! Results of a conformance run: per-cell metrics pulled from a run's statistics, the text
//! table, and the JSON, CSV and SVG files.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::chart::{self, Series};
use super::invariants::{self, RunData, Verdict};
use super::matrix::{Cell, Shard, Workload};

/// Errors writing the report files.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// JSON encoding failed.
    #[error("cannot encode the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Metrics of one cell.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Metrics {
    /// Peak bytes the guest held shared.
    pub peak_shared_bytes: u64,
    /// Peak bytes of live mappings (the pool's high-water mark).
    pub high_water_bytes: u64,
    /// Requests whose map failed (each once, however often it was retried).
    pub failed_requests: u64,
    /// I/O requests per second in the guest's measured phase.
    pub iops: u64,
    /// Failed map attempts (retries of one request each count).
    pub map_failures: u64,
    /// Successful maps.
    pub maps: u64,
    /// Throttle waits.
    pub throttle_waits: u64,
    /// Host conversions (both directions) of exactly 4 KiB.
    pub conversions_4k: u64,
    /// Host conversions of other sub-2M sizes.
    pub conversions_sub2m: u64,
    /// Host conversions 2M aligned and sized.
    pub conversions_2m: u64,
    /// Peak double-allocated bytes (computed, checked against the kernel).
    pub double_alloc_peak_bytes: u64,
    /// Double allocation integrated over time, byte-seconds.
    pub double_alloc_byte_seconds: f64,
    /// Guest I/O requests completed.
    pub io_requests: u64,
}

/// One cell's outcome.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellResult {
    /// Position of the cell in the selected matrix (shards keep it, so merging restores the
    /// order).
    #[serde(default)]
    pub index: usize,
    /// The cell.
    pub cell: Cell,
    /// `cell.id()`.
    pub id: String,
    /// Whether every invariant held (false for an incompatible cell too).
    pub passed: bool,
    /// Why the policy cannot run on this host at all (the cell is then neither pass nor fail).
    pub incompatible: Option<String>,
    /// Every invariant's verdict.
    pub invariants: Vec<Verdict>,
    /// Metrics.
    pub metrics: Metrics,
    /// Wall time of the run, seconds.
    pub run_seconds: f64,
    /// Guest shared bytes over time: (ms, bytes).
    pub shared_timeline: Vec<(f64, u64)>,
}

impl CellResult {
    /// Builds a cell's result from its run.
    pub fn new(index: usize, cell: Cell, run: &RunData, run_seconds: f64) -> Self {
        let invariants = invariants::evaluate(&cell, run);
        let incompatible = invariants::incompatible(run);
        let passed = incompatible.is_none() && invariants.iter().all(|v| v.passed);
        let (metrics, shared_timeline) = run
            .summary
            .as_ref()
            .map(|s| (metrics(s, &run.serial), timeline(s)))
            .unwrap_or_default();
        Self {
            index,
            id: cell.id(),
            cell,
            passed,
            incompatible,
            invariants,
            metrics,
            run_seconds,
            shared_timeline,
        }
    }

    /// Whether an invariant broke (an incompatible cell is not a failure).
    pub fn failed_invariant(&self) -> bool {
        self.incompatible.is_none() && !self.passed
    }

    /// `pass`, `FAIL` or `n/a` (incompatible).
    pub fn verdict(&self) -> &'static str {
        match (self.passed, &self.incompatible) {
            (true, _) => "pass",
            (false, Some(_)) => "n/a",
            (false, None) => "FAIL",
        }
    }

    /// Names of the invariants that failed.
    pub fn failed(&self) -> Vec<&'static str> {
        self.invariants
            .iter()
            .filter(|v| !v.passed)
            .map(|v| v.name)
            .collect()
    }
}

/// `key=N` from the guest's `io: done` line, if there is one.
fn serial_field(serial: &str, key: &str) -> Option<u64> {
    let line = serial.lines().rev().find(|l| l.contains("io: done"))?;
    line.split_ascii_whitespace()
        .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
}

fn metrics(s: &Value, serial: &str) -> Metrics {
    let m = &s["memconv"];
    let p = &m["pool_report"];
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    let timeline_peak = s["pool_timeline"]
        .as_array()
        .map(|t| t.iter().map(|x| n(&x["shared_bytes"])).max().unwrap_or(0))
        .unwrap_or(0);
    Metrics {
        peak_shared_bytes: n(&p["shared_peak_bytes"]).max(timeline_peak),
        high_water_bytes: n(&p["high_water_bytes"]),
        // A guest that does not count them: every failed map stands for one request.
        failed_requests: serial_field(serial, "failed_requests")
            .unwrap_or_else(|| n(&p["map_failures"])),
        iops: serial_field(serial, "iops").unwrap_or(0),
        map_failures: n(&p["map_failures"]),
        maps: n(&p["maps"]),
        throttle_waits: n(&p["throttle_waits"]),
        conversions_4k: invariants::host_conversions(m, "4k"),
        conversions_sub2m: invariants::host_conversions(m, "sub2m"),
        conversions_2m: invariants::host_conversions(m, "2m"),
        double_alloc_peak_bytes: n(&m["double_alloc"]["computed_peak_bytes"]),
        double_alloc_byte_seconds: m["double_alloc"]["computed_byte_seconds"]
            .as_f64()
            .unwrap_or(0.0),
        io_requests: n(&p["io_requests"]),
    }
}

fn timeline(s: &Value) -> Vec<(f64, u64)> {
    s["pool_timeline"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|x| {
                    (
                        x["t_ms"].as_f64().unwrap_or(0.0),
                        x["shared_bytes"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The text table, then one line per failed invariant.
pub fn table(results: &[CellResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<40} {:<6} {:>10} {:>8} {:>8} {:>8} {:>8} {:>17} {:>10} {:>10} {:>7}",
        "cell",
        "result",
        "peak MiB",
        "hw MiB",
        "failed",
        "waits",
        "IOPS",
        "conv 4k/sub/2m",
        "dbl MiB",
        "dbl MiB*s",
        "time s"
    );
    for r in results {
        let m = &r.metrics;
        let _ = writeln!(
            out,
            "{:<40} {:<6} {:>10.1} {:>8.1} {:>8} {:>8} {:>8} {:>17} {:>10.1} {:>10.2} {:>7.1}",
            r.id,
            r.verdict(),
            mib(m.peak_shared_bytes),
            mib(m.high_water_bytes),
            m.failed_requests,
            m.throttle_waits,
            m.iops,
            format!(
                "{}/{}/{}",
                m.conversions_4k, m.conversions_sub2m, m.conversions_2m
            ),
            mib(m.double_alloc_peak_bytes),
            m.double_alloc_byte_seconds / (1u64 << 20) as f64,
            r.run_seconds
        );
    }
    let failed: Vec<&CellResult> = results.iter().filter(|r| r.failed_invariant()).collect();
    let na: Vec<&CellResult> = results
        .iter()
        .filter(|r| r.incompatible.is_some())
        .collect();
    let _ = writeln!(
        out,
        "\n{} cells: {} passed, {} failed, {} not applicable",
        results.len(),
        results.len() - failed.len() - na.len(),
        failed.len(),
        na.len()
    );
    for r in na {
        let _ = writeln!(
            out,
            "n/a  {}: {}",
            r.id,
            r.incompatible.as_deref().unwrap_or("")
        );
    }
    for r in failed {
        for v in r.invariants.iter().filter(|v| !v.passed) {
            let _ = writeln!(out, "FAIL {} {}: {}", r.id, v.name, v.detail);
        }
    }
    out
}

fn write(path: &Path, contents: &str) -> Result<(), ReportError> {
    std::fs::write(path, contents).map_err(|source| ReportError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// The CSV file: one row per cell.
pub fn csv(results: &[CellResult]) -> String {
    let mut out = String::from(
        "cell,policy,private,shared,granularity,workload,result,failed_invariants,peak_shared_bytes,high_water_bytes,failed_requests,iops,maps,map_failures,throttle_waits,conversions_4k,conversions_sub2m,conversions_2m,double_alloc_peak_bytes,double_alloc_byte_seconds,io_requests,run_seconds\n",
    );
    for r in results {
        let m = &r.metrics;
        let c = &r.cell;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{:.0},{},{:.3}",
            r.id,
            c.policy,
            c.private,
            c.shared,
            c.granularity,
            c.workload.name(),
            r.verdict().to_lowercase(),
            if r.incompatible.is_some() {
                String::new()
            } else {
                r.failed().join(";")
            },
            m.peak_shared_bytes,
            m.high_water_bytes,
            m.failed_requests,
            m.iops,
            m.maps,
            m.map_failures,
            m.throttle_waits,
            m.conversions_4k,
            m.conversions_sub2m,
            m.conversions_2m,
            m.double_alloc_peak_bytes,
            m.double_alloc_byte_seconds,
            m.io_requests,
            r.run_seconds
        );
    }
    out
}

/// Shared bytes over time, one line per policy, for the cells of `workload` on the first
/// store pair and granularity that has it.
pub fn shared_over_time_chart(results: &[CellResult], workload: Workload) -> Option<String> {
    let first = results.iter().find(|r| r.cell.workload == workload)?;
    let series: Vec<Series> = results
        .iter()
        .filter(|r| {
            r.cell.workload == workload
                && r.cell.private == first.cell.private
                && r.cell.shared == first.cell.shared
                && r.cell.granularity == first.cell.granularity
        })
        .map(|r| Series {
            label: r.cell.policy.clone(),
            points: r
                .shared_timeline
                .iter()
                .map(|(t, b)| (*t / 1000.0, mib(*b)))
                .collect(),
            point_labels: Vec::new(),
        })
        .collect();
    Some(chart::lines(
        &format!(
            "Guest shared memory over time: {} on {}-{} {}",
            workload.name(),
            first.cell.private,
            first.cell.shared,
            first.cell.granularity
        ),
        "seconds",
        "shared MiB",
        &series,
    ))
}

/// Peak shared MiB vs failed-request percentage, one point per cell that ran (n/a cells left
/// out), labelled with its workload.
pub fn footprint_chart(results: &[CellResult]) -> String {
    let mut policies: Vec<&str> = results.iter().map(|r| r.cell.policy.as_str()).collect();
    policies.dedup();
    policies.sort();
    policies.dedup();
    let series: Vec<Series> = policies
        .iter()
        .map(|p| Series {
            label: p.to_string(),
            points: results
                .iter()
                .filter(|r| r.cell.policy == *p && r.incompatible.is_none())
                .map(|r| {
                    let m = &r.metrics;
                    (
                        mib(m.peak_shared_bytes),
                        100.0 * m.failed_requests as f64 / m.io_requests.max(1) as f64,
                    )
                })
                .collect(),
            point_labels: results
                .iter()
                .filter(|r| r.cell.policy == *p && r.incompatible.is_none())
                .map(|r| r.cell.workload.name().to_string())
                .collect(),
        })
        .collect();
    chart::scatter(
        "Footprint vs failures (one point per cell)",
        "peak shared MiB",
        "failed requests %",
        &series,
    )
}

/// Writes conform.json, conform.csv and the charts into `dir`; returns the files written.
/// `selected` is the size of the whole selection `shard` is part of (merge checks it); the
/// shared-over-time chart shows `chart_workload` (default: burst, else steady, else the first).
pub fn write_files(
    dir: &Path,
    results: &[CellResult],
    selected: usize,
    shard: Shard,
    chart_workload: Option<Workload>,
) -> Result<Vec<String>, ReportError> {
    let mut written = Vec::new();
    let json = serde_json::json!({
        "shard": shard,
        "selected": selected,
        "invariants": invariants::NAMES,
        "cells": results,
        "passed": results.iter().filter(|r| r.passed).count(),
        "failed": results.iter().filter(|r| r.failed_invariant()).count(),
        "not_applicable": results.iter().filter(|r| r.incompatible.is_some()).count(),
    });
    let files: Vec<(&str, String)> = vec![
        ("conform.json", serde_json::to_string_pretty(&json)?),
        ("conform.csv", csv(results)),
        ("footprint-vs-failures.svg", footprint_chart(results)),
    ];
    for (name, contents) in files {
        let path = dir.join(name);
        write(&path, &contents)?;
        written.push(path.display().to_string());
    }
    let workload = chart_workload
        .into_iter()
        .chain([Workload::Burst, Workload::Steady])
        .find(|w| results.iter().any(|r| r.cell.workload == *w))
        .or_else(|| results.first().map(|r| r.cell.workload));
    if let Some(svg) = workload.and_then(|w| shared_over_time_chart(results, w)) {
        let path = dir.join("shared-over-time.svg");
        write(&path, &svg)?;
        written.push(path.display().to_string());
    }
    Ok(written)
}
