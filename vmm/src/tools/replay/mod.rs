//! `vmm replay TRACE`: loads a Linux DMA-API trace with the `replay` crate (parse, pair,
//! held-from-start mappings, the Linux slot model) and, with `--describe`, prints its
//! per-device summary without a VM.

use std::path::PathBuf;

use thiserror::Error;

/// Why a replay did not run.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The trace (or its stats file) did not load.
    #[error(transparent)]
    Trace(#[from] replay::TraceError),
    /// The summary could not be rendered as JSON.
    #[error("cannot render the summary as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// The encoded op stream could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// The error.
        source: std::io::Error,
    },
}

/// What `vmm replay` was asked.
#[derive(Debug, Clone, Default)]
pub struct ReplayOptions {
    /// The trace file (plain or gzip).
    pub trace: PathBuf,
    /// The capture's swiotlb statistics.
    pub swiotlb_stats: Option<PathBuf>,
    /// Devices whose maps may block whatever their context.
    pub may_block: Vec<String>,
    /// Print the summary as JSON.
    pub json: bool,
    /// Write the encoded op stream here.
    pub dump_stream: Option<PathBuf>,
}

/// A loaded trace with its device kinds and encoded stream.
#[derive(Debug)]
pub struct Loaded {
    /// The trace.
    pub trace: replay::Trace,
    /// Its devices' kinds.
    pub kinds: Vec<replay::DeviceKind>,
    /// The summary.
    pub summary: replay::Summary,
    /// The op stream.
    pub stream: replay::Encoded,
}

/// Loads, summarises and encodes a trace.
pub fn load(opts: &ReplayOptions) -> Result<Loaded, ReplayError> {
    let lo = replay::LoadOptions {
        swiotlb_stats: opts.swiotlb_stats.clone(),
        may_block: opts.may_block.clone(),
    };
    let trace = replay::load(&opts.trace, &lo)?;
    let kinds = replay::device_kinds(&trace, &[]);
    let summary = replay::Summary::of(&trace, &kinds);
    let stream = replay::encode(&trace.pairing, &kinds);
    if let Some(p) = &opts.dump_stream {
        std::fs::write(p, &stream.bytes).map_err(|source| ReplayError::Write {
            path: p.display().to_string(),
            source,
        })?;
    }
    Ok(Loaded {
        trace,
        kinds,
        summary,
        stream,
    })
}

/// `--describe`: the summary text (or JSON), with the op stream's size.
pub fn describe(opts: &ReplayOptions) -> Result<String, ReplayError> {
    let l = load(opts)?;
    if opts.json {
        return Ok(serde_json::to_string_pretty(&l.summary)? + "\n");
    }
    Ok(format!(
        "{}op stream: {} ops in {} bytes, {} handles\n",
        l.summary,
        l.stream.ops,
        l.stream.bytes.len(),
        l.stream.handles
    ))
}
