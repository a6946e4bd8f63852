//! Running the matrix across machines: [`Shard`] (`--shard K/N`: every N-th selected cell,
//! starting at the K-th) and [`merge`] (`vmm conform merge DIR...`: the `conform.json` of every
//! shard joined into one report, checked to cover the selection exactly once).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::report::{self, CellResult, ReportError};

/// Errors of `--shard` and `vmm conform merge`.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// `--shard` is not `K/N` with 1 <= K <= N.
    #[error("--shard wants K/N with 1 <= K <= N (e.g. 3/8), not {0:?}")]
    BadShard(String),
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

/// `--shard K/N`: this machine runs the selected cells whose position `i` has `i % N == K - 1`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shard {
    /// K, 1-based.
    pub index: usize,
    /// N.
    pub count: usize,
}

impl Shard {
    /// The whole selection.
    pub const ALL: Shard = Shard { index: 1, count: 1 };

    /// Whether the cell at position `i` of the selection is this shard's.
    pub fn has(&self, i: usize) -> bool {
        i % self.count == self.index - 1
    }
}

impl FromStr for Shard {
    type Err = ShardError;

    fn from_str(s: &str) -> Result<Self, ShardError> {
        let bad = || ShardError::BadShard(s.to_string());
        let (k, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if index == 0 || index > count {
            return Err(bad());
        }
        Ok(Shard { index, count })
    }
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
pub fn merge(dirs: &[PathBuf], out: &Path) -> Result<Merged, ShardError> {
    let mut by_index: BTreeMap<usize, CellResult> = BTreeMap::new();
    let mut total: Option<usize> = None;
    for dir in dirs {
        let path = if dir.is_dir() {
            dir.join("conform.json")
        } else {
            dir.clone()
        };
        let name = path.display().to_string();
        let text = std::fs::read(&path).map_err(|source| ShardError::Read {
            path: name.clone(),
            source,
        })?;
        let file: ShardFile =
            serde_json::from_slice(&text).map_err(|source| ShardError::Parse {
                path: name.clone(),
                source,
            })?;
        let selected = file.selected.unwrap_or(file.cells.len());
        match total {
            Some(t) if t != selected => {
                return Err(ShardError::Selection {
                    path: name,
                    found: selected,
                    expected: t,
                })
            }
            _ => total = Some(selected),
        }
        for cell in file.cells {
            if let Some(old) = by_index.insert(cell.index, cell) {
                return Err(ShardError::Duplicate {
                    index: old.index,
                    id: old.id,
                });
            }
        }
    }
    let total = total.unwrap_or(0);
    let missing: Vec<usize> = (0..total).filter(|i| !by_index.contains_key(i)).collect();
    if let Some(&first) = missing.first() {
        return Err(ShardError::Missing {
            missing: missing.len(),
            total,
            first,
        });
    }
    std::fs::create_dir_all(out).map_err(|source| ShardError::Read {
        path: out.display().to_string(),
        source,
    })?;
    let results: Vec<CellResult> = by_index.into_values().collect();
    let table = report::table(&results);
    let files = report::write_files(out, &results, results.len(), Shard::ALL)?;
    Ok(Merged {
        results,
        table,
        files,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_selection() {
        assert_eq!(
            "2/3".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 3 }
        );
        for bad in ["0/3", "4/3", "3", "a/b", "1/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let shards: Vec<Shard> = (1..=3).map(|k| Shard { index: k, count: 3 }).collect();
        for i in 0..20 {
            assert_eq!(shards.iter().filter(|s| s.has(i)).count(), 1);
        }
        assert!((0..5).all(|i| Shard::ALL.has(i)));
    }
}
