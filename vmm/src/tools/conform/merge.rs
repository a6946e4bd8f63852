//! `vmm conform merge DIR...`: the `conform.json` of every shard of a run
//! ([`super::matrix::Shard`], `--shard K/N`) joined into one report, checked to cover the
//! selection exactly once.

use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::matrix::Shard;
use super::report::{self, CellResult, ReportError};

/// Errors of `vmm conform merge`.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    /// A results file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A results file is not a conform report.
    #[error("{path} is not a vmm conform report: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why.
        source: serde_json::Error,
    },
    /// The shards come from different selections.
    #[error("{path} is from a selection of {found} cells, the others from {expected}: merge shards of one run only")]
    Selection {
        /// The file.
        path: String,
        /// Its selection size.
        found: usize,
        /// The others'.
        expected: usize,
    },
    /// Two shards hold the same cell.
    #[error("cell {index} ({id}) is in more than one shard")]
    Duplicate {
        /// Position in the selection.
        index: usize,
        /// Cell id.
        id: String,
    },
    /// Cells of the selection are in no shard.
    #[error("{missing} of {total} cells are in no shard (first: #{first}): a shard is missing")]
    Missing {
        /// How many.
        missing: usize,
        /// Selection size.
        total: usize,
        /// The first missing position.
        first: usize,
    },
    /// Writing the merged report failed.
    #[error(transparent)]
    Report(#[from] ReportError),
}

/// What `conform.json` says besides the cells (the fields merge needs).
#[derive(Deserialize)]
struct ShardFile {
    cells: Vec<CellResult>,
    /// Cells in the whole selection (absent in reports older than sharding: then its own).
    #[serde(default)]
    selected: Option<usize>,
}

/// What a merge produced.
pub struct Merged {
    /// Every cell, in selection order.
    pub results: Vec<CellResult>,
    /// The text table.
    pub table: String,
    /// Files written.
    pub files: Vec<String>,
}

/// Join the `conform.json` in each of `dirs` (or the files themselves) into one report in
/// `out`: refuses shards of different selections, a cell in two shards and a missing shard.
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Merged, MergeError> {
    let mut by_index: BTreeMap<usize, CellResult> = BTreeMap::new();
    let mut total: Option<usize> = None;
    for dir in dirs {
        let path = if dir.is_dir() {
            dir.join("conform.json")
        } else {
            dir.clone()
        };
        let name = path.display().to_string();
        let text = std::fs::read(&path).map_err(|source| MergeError::Read {
            path: name.clone(),
            source,
        })?;
        let file: ShardFile =
            serde_json::from_slice(&text).map_err(|source| MergeError::Parse {
                path: name.clone(),
                source,
            })?;
        let selected = file.selected.unwrap_or(file.cells.len());
        match total {
            Some(t) if t != selected => {
                return Err(MergeError::Selection {
                    path: name,
                    found: selected,
                    expected: t,
                })
            }
            _ => total = Some(selected),
        }
        for cell in file.cells {
            if let Some(old) = by_index.insert(cell.index, cell) {
                return Err(MergeError::Duplicate {
                    index: old.index,
                    id: old.id,
                });
            }
        }
    }
    let total = total.unwrap_or(0);
    let missing: Vec<usize> = (0..total).filter(|i| !by_index.contains_key(i)).collect();
    if let Some(&first) = missing.first() {
        return Err(MergeError::Missing {
            missing: missing.len(),
            total,
            first,
        });
    }
    std::fs::create_dir_all(out).map_err(|source| MergeError::Read {
        path: out.display().to_string(),
        source,
    })?;
    let results: Vec<CellResult> = by_index.into_values().collect();
    let table = report::table(&results);
    let files = report::write_files(out, &results, results.len(), Shard::ALL, None)?;
    Ok(Merged {
        results,
        table,
        files,
    })
}
