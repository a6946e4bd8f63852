//! `vmm conform`: the conformance suite. Runs every selected cell of the matrix (pool policy x
//! store pair x host granularity x workload) as its own `vmm run` of the `io` guest (a child
//! process, so a crashing VMM is seen as such), checks the invariants, and writes the table,
//! JSON, CSV and charts. Every cell's guest command line is checked before any cell runs (a
//! bad `--cmdline` is a usage error, not a failing cell); each cell's disk image is removed
//! when the cell is done unless `--keep`.

pub mod chart;
pub mod invariants;
pub mod matrix;
pub mod merge;
pub mod report;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

use invariants::RunData;
use matrix::Cell;
use matrix::Shard;
use report::{CellResult, ReportError};

/// Errors that stop the suite from running (a failing invariant is a result, not an error).
#[derive(Debug, thiserror::Error)]
pub enum ConformError {
    /// Nothing matched the filters.
    #[error("no cell matches --filter {0:?}; cell ids look like legacy/memfd-memfd/4k/steady")]
    NoCells(Vec<String>),
    /// The output directory could not be created.
    #[error("cannot create output directory {path}: {source}")]
    OutDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// This executable could not be found to run cells.
    #[error("cannot locate the vmm executable: {0}")]
    SelfExe(std::io::Error),
    /// Too few huge pages for the hugetlb cells.
    #[error(
        "the selected cells need {needed} free 2 MiB huge pages ({jobs} at a time) but {free} are free: \
         reserve them as root with `echo {total} > /proc/sys/vm/nr_hugepages`, or skip hugetlb cells with --filter memfd-memfd"
    )]
    HugePages {
        /// Huge pages the cells run at once need.
        needed: u64,
        /// Huge pages free now.
        free: u64,
        /// The `nr_hugepages` that would do.
        total: u64,
        /// Cells run at once.
        jobs: usize,
    },
    /// Writing results failed.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A cell's guest command line would be refused by the guest (a bad `--cmdline`).
    #[error("cell {cell}: {source}")]
    Cmdline {
        /// The first cell whose command line is refused.
        cell: String,
        /// Why.
        source: crate::guest_cmdline::CmdlineError,
    },
    /// The guest cannot be found.
    #[error(transparent)]
    Guest(#[from] crate::fixtures::FixtureError),
}

/// How to run the suite.
#[derive(Clone, Debug)]
pub struct ConformOptions {
    /// Only the quick subset.
    pub quick: bool,
    /// Substrings every selected cell id must contain.
    pub filters: Vec<String>,
    /// Cells run at once.
    pub jobs: usize,
    /// Where results go.
    pub out_dir: PathBuf,
    /// The guest (an embedded fixture or an ELF path) running the workloads.
    pub guest: String,
    /// Policies to run (the built-in six by default; a plug-in fixture names its own).
    pub policies: Vec<String>,
    /// Guest RAM per cell.
    pub mem: u64,
    /// Extra guest command line appended to every cell's.
    pub extra_cmdline: String,
    /// Longest a cell may run.
    pub timeout: Duration,
    /// Which share of the selected cells this machine runs.
    pub shard: Shard,
    /// The workload of the shared-over-time chart (default: burst, else steady).
    pub chart_workload: Option<matrix::Workload>,
    /// Keep each cell's disk image (`--keep`); by default it is removed when the cell is done.
    pub keep_disks: bool,
    /// The platform every cell runs on (`--platform`).
    pub platform: memconv::Platform,
}

/// Everything a finished suite produced.
pub struct ConformOutcome {
    /// Per-cell results, in matrix order.
    pub results: Vec<CellResult>,
    /// The text table.
    pub table: String,
    /// Files written.
    pub files: Vec<String>,
}

impl ConformOutcome {
    /// Whether no invariant broke in any cell (incompatible cells are not failures).
    pub fn all_passed(&self) -> bool {
        !self.results.iter().any(CellResult::failed_invariant)
    }
}

fn free_hugepages() -> (u64, u64) {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |key: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("HugePages_Free:"), field("HugePages_Total:"))
}

/// The guest command line of `cell`.
fn cell_cmdline(cell: &Cell, opts: &ConformOptions) -> String {
    format!(
        "policy={} {} {}",
        cell.policy,
        cell.workload.cmdline(),
        opts.extra_cmdline
    )
    .trim()
    .to_string()
}

/// `m:ss` for an ETA.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

/// Runs one cell's VM to completion (or kills it at the timeout).
fn run_cell(exe: &Path, cell: &Cell, opts: &ConformOptions, dir: &Path) -> (RunData, f64) {
    let stats = dir.join("stats.json");
    let serial = dir.join("serial.txt");
    let disk = dir.join("disk.img");
    let _ = std::fs::remove_file(&stats);
    let _ = std::fs::remove_file(&disk);
    let cmdline = cell_cmdline(cell, opts);
    let started = Instant::now();
    let child = Command::new(exe)
        .arg("run")
        .args(["--guest", &opts.guest])
        .args(["--mem", &opts.mem.to_string()])
        .args(["--cpus", &cell.workload.cpus().to_string()])
        .args(["--private", &cell.private.to_string()])
        .args(["--shared", &cell.shared.to_string()])
        .args(["--granularity", &cell.granularity.to_string()])
        .args(["--platform", opts.platform.as_str()])
        .arg("--disk")
        .arg(&disk)
        .args(["--disk-size", "64M"])
        .args(["--cmdline", &cmdline])
        .arg("--stats-json")
        .arg(&stats)
        .arg("--serial")
        .arg(&serial)
        .arg("--quiet")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut run = RunData::default();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            run.stderr = format!("cannot start vmm: {e}");
            run.exit_code = Some(crate::exit_codes::EXIT_USAGE.into());
            return (run, 0.0);
        }
    };
    let exit = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() > opts.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                run.stderr = format!("timed out after {:?}", opts.timeout);
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                run.stderr = format!("waiting for vmm failed: {e}");
                break None;
            }
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    if let Some(status) = exit {
        run.exit_code = status.code();
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut run.stderr);
        }
    } else {
        run.exit_code = Some(crate::exit_codes::EXIT_VM_CRASHED.into());
    }
    if !opts.keep_disks {
        if let Err(e) = std::fs::remove_file(&disk) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!("cannot remove {}: {e}", disk.display());
            }
        }
    }
    run.serial = std::fs::read_to_string(&serial).unwrap_or_default();
    run.summary = std::fs::read(&stats)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    (run, seconds)
}

/// Runs the suite.
pub fn run(opts: &ConformOptions) -> Result<ConformOutcome, ConformError> {
    let all = if opts.quick {
        matrix::quick(&opts.policies)
    } else {
        matrix::full(&opts.policies)
    };
    let selected: Vec<Cell> = all
        .into_iter()
        .filter(|c| c.matches(&opts.filters))
        .collect();
    // (position in the selection, cell): a shard keeps the positions for `conform merge`.
    let cells: Vec<(usize, Cell)> = selected
        .iter()
        .cloned()
        .enumerate()
        .filter(|(i, _)| opts.shard.has(*i))
        .collect();
    if cells.is_empty() {
        return Err(ConformError::NoCells(opts.filters.clone()));
    }
    let guest = crate::fixtures::resolve(&opts.guest)?;
    for (_, cell) in &cells {
        crate::guest_cmdline::check(&guest, &cell_cmdline(cell, opts), cell.workload.cpus())
            .map_err(|source| ConformError::Cmdline {
                cell: cell.id(),
                source,
            })?;
    }
    let jobs = opts.jobs.clamp(1, cells.len());
    let per_cell = cells
        .iter()
        .map(|(_, c)| c.hugepages(opts.mem))
        .max()
        .unwrap_or(0);
    let needed = per_cell * jobs as u64;
    let (free, total) = free_hugepages();
    if needed > free {
        return Err(ConformError::HugePages {
            needed,
            free,
            total: total + needed - free,
            jobs,
        });
    }
    std::fs::create_dir_all(&opts.out_dir).map_err(|source| ConformError::OutDir {
        path: opts.out_dir.display().to_string(),
        source,
    })?;
    let exe = std::env::current_exe().map_err(ConformError::SelfExe)?;

    let bar = ProgressBar::new(cells.len() as u64);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:40} {pos}/{len} cells {elapsed} elapsed, ETA {eta} {msg}",
    ) {
        bar.set_style(style);
    }
    let next = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let suite_started = Instant::now();
    let results: Mutex<Vec<Option<CellResult>>> = Mutex::new(vec![None; cells.len()]);
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some((index, cell)) = cells.get(i) else {
                    break;
                };
                let dir = opts.out_dir.join("cells").join(cell.id().replace('/', "_"));
                let result = match std::fs::create_dir_all(&dir) {
                    Ok(()) => {
                        let (run, seconds) = run_cell(&exe, cell, opts, &dir);
                        CellResult::new(*index, cell.clone(), &run, seconds)
                    }
                    Err(e) => {
                        let run = RunData {
                            stderr: format!("cannot create {}: {e}", dir.display()),
                            ..Default::default()
                        };
                        CellResult::new(*index, cell.clone(), &run, 0.0)
                    }
                };
                let finished = done.fetch_add(1, Ordering::SeqCst) + 1;
                let left = cells.len() - finished;
                let eta = suite_started
                    .elapsed()
                    .mul_f64(left as f64 / finished as f64);
                let progress = format!("[{finished}/{}, ETA {}]", cells.len(), clock(eta));
                let line = if result.failed_invariant() {
                    format!(
                        "FAIL {} [{}] {progress}",
                        result.id,
                        result.failed().join(", ")
                    )
                } else {
                    format!(
                        "{} {} ({:.1} s) {progress}",
                        result.verdict(),
                        result.id,
                        result.run_seconds
                    )
                };
                // A hidden bar (stderr not a terminal) prints nothing: say it plainly.
                if bar.is_hidden() {
                    eprintln!("{line}");
                } else {
                    bar.println(line);
                }
                bar.inc(1);
                results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(result);
            });
        }
    });
    bar.finish_and_clear();
    let results: Vec<CellResult> = results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
        .collect();
    let table = report::table(&results);
    let files = report::write_files(
        &opts.out_dir,
        &results,
        selected.len(),
        opts.shard,
        opts.chart_workload,
    )?;
    Ok(ConformOutcome {
        results,
        table,
        files,
    })
}
