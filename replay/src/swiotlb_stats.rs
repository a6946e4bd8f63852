//! The `W.swiotlb_stats` file a capture writes: Linux's swiotlb debugfs counters
//! (`io_tlb_nslabs`, `io_tlb_used`, `io_tlb_used_hiwater`) read at named moments
//! (`== before uptime=...`, `== after_hiwater_reset ...`, `== after ...`).

use std::path::Path;

use thiserror::Error;

/// Why a stats file did not read.
#[derive(Debug, Error)]
pub enum StatsError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line is neither a `== NAME` section nor `key=value`.
    #[error("line {line}: expected `== SECTION` or `key=value`, found `{text}`")]
    BadLine {
        /// Line number (from 1).
        line: usize,
        /// The text.
        text: String,
    },
    /// The file has no `before` section with `io_tlb_used`.
    #[error("no `== before` section with io_tlb_used")]
    NoBefore,
}

/// One section's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Snapshot {
    /// The section name (`before`, `after_hiwater_reset`, `after`).
    pub name: String,
    /// `io_tlb_nslabs`.
    pub nslabs: Option<u64>,
    /// `io_tlb_used`.
    pub used: Option<u64>,
    /// `io_tlb_used_hiwater`.
    pub hiwater: Option<u64>,
}

/// The parsed file.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SwiotlbStats {
    /// Sections in file order.
    pub sections: Vec<Snapshot>,
}

impl SwiotlbStats {
    /// Parses the text of a stats file.
    pub fn parse(text: &str) -> Result<Self, StatsError> {
        let mut s = SwiotlbStats::default();
        for (i, raw) in text.lines().enumerate() {
            let l = raw.trim();
            if l.is_empty() {
                continue;
            }
            if let Some(rest) = l.strip_prefix("==") {
                let name = rest.split_whitespace().next().unwrap_or("").to_string();
                s.sections.push(Snapshot {
                    name,
                    ..Default::default()
                });
                continue;
            }
            let bad = || StatsError::BadLine {
                line: i + 1,
                text: raw.to_string(),
            };
            let (k, v) = l.split_once('=').ok_or_else(bad)?;
            let v: u64 = v.trim().parse().map_err(|_| bad())?;
            let Some(cur) = s.sections.last_mut() else {
                return Err(bad());
            };
            match k.trim() {
                "io_tlb_nslabs" => cur.nslabs = Some(v),
                "io_tlb_used" => cur.used = Some(v),
                "io_tlb_used_hiwater" => cur.hiwater = Some(v),
                _ => {}
            }
        }
        Ok(s)
    }

    /// Reads and parses a stats file.
    pub fn read(path: &Path) -> Result<Self, StatsError> {
        let text = std::fs::read_to_string(path).map_err(|source| StatsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    fn section(&self, name: &str) -> Option<&Snapshot> {
        self.sections.iter().find(|s| s.name == name)
    }

    /// `io_tlb_used` before the workload.
    pub fn used_before(&self) -> Result<u64, StatsError> {
        self.section("before")
            .and_then(|s| s.used)
            .ok_or(StatsError::NoBefore)
    }

    /// Linux's high-water over the workload: `after`'s `io_tlb_used_hiwater` (the capture
    /// resets the high-water after `before` when it can).
    pub fn hiwater_after(&self) -> Option<u64> {
        self.section("after").and_then(|s| s.hiwater)
    }

    /// `io_tlb_nslabs`.
    pub fn nslabs(&self) -> Option<u64> {
        self.sections.iter().find_map(|s| s.nslabs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_capture_shape() {
        let t = "== before uptime=5.82\nio_tlb_nslabs=32768\nio_tlb_used=255\nio_tlb_used_hiwater=261\n== after_hiwater_reset uptime=5.84\nio_tlb_used_hiwater=0\n== after uptime=7.41\nio_tlb_used=255\nio_tlb_used_hiwater=6000\n";
        let s = SwiotlbStats::parse(t).unwrap();
        assert_eq!(s.used_before().unwrap(), 255);
        assert_eq!(s.hiwater_after(), Some(6000));
        assert_eq!(s.nslabs(), Some(32768));
    }

    #[test]
    fn rejects_bad_lines() {
        assert!(matches!(
            SwiotlbStats::parse("io_tlb_used=1\n"),
            Err(StatsError::BadLine { line: 1, .. })
        ));
        assert!(matches!(
            SwiotlbStats::parse("== before\nio_tlb_used=x\n"),
            Err(StatsError::BadLine { line: 2, .. })
        ));
        assert!(matches!(
            SwiotlbStats::parse("== after\nio_tlb_used=1\n")
                .unwrap()
                .used_before(),
            Err(StatsError::NoBefore)
        ));
    }
}
