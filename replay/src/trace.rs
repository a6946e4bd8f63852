//! Reading a trace file (plain text or gzip) line by line into a [`Pairing`], with the line
//! number on every error, and reconciling the mappings held from the start with the capture's
//! `--swiotlb-stats` (`io_tlb_used` before the workload).

use std::io::Read;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::line::{self, LineError};
use crate::slots::slots_of;
use crate::stream::{PairError, Pairing};
use crate::swiotlb_stats::{StatsError, SwiotlbStats};

/// The device name given to the held-from-start mappings that only `--swiotlb-stats` reveals.
pub const HELD_DEVICE: &str = "held-before-trace";

/// Why a trace did not load.
#[derive(Debug, Error)]
pub enum TraceError {
    /// The file could not be read or decompressed.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
    /// A line did not parse.
    #[error("{path}:{line}: {source}")]
    Line {
        /// The file.
        path: String,
        /// Line number (from 1).
        line: u64,
        /// Why.
        source: LineError,
    },
    /// A line is not UTF-8.
    #[error("{path}:{line}: not UTF-8 text")]
    NotText {
        /// The file.
        path: String,
        /// Line number (from 1).
        line: u64,
    },
    /// An event contradicts an earlier one.
    #[error("{path}:{line}: {source}")]
    Pair {
        /// The file.
        path: String,
        /// Line number (from 1).
        line: u64,
        /// Why.
        source: PairError,
    },
    /// The stats file did not read.
    #[error(transparent)]
    Stats(#[from] StatsError),
    /// The file holds no DMA event at all.
    #[error("{0}: no DMA-API event in the file (is it an ftrace text trace of dma:* events?)")]
    Empty(String),
}

/// How to load a trace.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// The capture's swiotlb statistics file.
    pub swiotlb_stats: Option<PathBuf>,
    /// Devices whose maps may block whatever their context (`--may-block DEVICE`).
    pub may_block: Vec<String>,
}

/// A loaded trace.
#[derive(Debug)]
pub struct Trace {
    /// The file.
    pub path: PathBuf,
    /// Maps, unmaps and the rest, paired.
    pub pairing: Pairing,
    /// The capture's stats, when given.
    pub stats: Option<SwiotlbStats>,
    /// Lines read.
    pub lines: u64,
    /// Event lines parsed.
    pub events: u64,
    /// Slots held from the start (trace-revealed plus stats-revealed).
    pub held_slots: u64,
}

/// Reads a file whole, gunzipping when it starts with the gzip magic.
pub fn read_bytes(path: &Path) -> Result<Vec<u8>, TraceError> {
    let io = |source| TraceError::Io {
        path: path.display().to_string(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::with_capacity(raw.len() * 20);
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(io)?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses trace text (already decompressed) into a pairing. `name` is used in errors.
pub fn parse_text(
    name: &str,
    text: &[u8],
    may_block: &[String],
) -> Result<(Pairing, u64, u64), TraceError> {
    let mut p = Pairing::new(may_block);
    let mut lineno = 0u64;
    let mut events = 0u64;
    for raw in text.split(|&b| b == b'\n') {
        lineno += 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        let l = std::str::from_utf8(raw).map_err(|_| TraceError::NotText {
            path: name.to_string(),
            line: lineno,
        })?;
        if line::is_noise(l) {
            continue;
        }
        if let Some(n) = line::lost_events(l) {
            p.lost(n);
            continue;
        }
        let e = line::parse_line(l).map_err(|source| TraceError::Line {
            path: name.to_string(),
            line: lineno,
            source,
        })?;
        events += 1;
        p.event(&e, lineno).map_err(|source| TraceError::Pair {
            path: name.to_string(),
            line: lineno,
            source,
        })?;
    }
    // A trailing newline yields one empty last "line".
    if text.ends_with(b"\n") {
        lineno -= 1;
    }
    if p.mappings.is_empty() && p.ops.is_empty() {
        return Err(TraceError::Empty(name.to_string()));
    }
    Ok((p, lineno, events))
}

/// Loads and pairs a trace; with stats, holds `io_tlb_used`-before slots from the start.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<Trace, TraceError> {
    let text = read_bytes(path)?;
    let name = path.display().to_string();
    let (mut pairing, lines, events) = parse_text(&name, &text, &opts.may_block)?;
    let stats = match &opts.swiotlb_stats {
        Some(s) => Some(SwiotlbStats::read(s)?),
        None => None,
    };
    let mut held_slots: u64 = pairing
        .held
        .iter()
        .map(|op| slots_of(pairing.mappings[op.mapping as usize].size))
        .sum();
    if let Some(st) = &stats {
        let before = st.used_before()?;
        if held_slots > before {
            pairing.warnings.held_beyond_stats += held_slots - before;
        } else {
            pairing.hold_anonymous(HELD_DEVICE, before - held_slots);
            held_slots = before;
        }
    }
    Ok(Trace {
        path: path.to_path_buf(),
        pairing,
        stats,
        lines,
        events,
        held_slots,
    })
}
