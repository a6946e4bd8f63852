//! `vmm replay TRACE`: loads a Linux DMA-API trace with the `replay` crate (parse, pair,
//! held-from-start mappings, the Linux slot model) and, with `--describe`, prints its
//! per-device summary without a VM; otherwise boots the `io` fixture with the encoded op
//! stream in guest RAM and a disk image filled with `replay_ops::pattern_word`, reads the
//! guest's `replay: done` line and reports `replay.*` (and the run's statistics) as JSON.

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
    /// The VM did not run.
    #[error(transparent)]
    Run(#[from] crate::run::RunError),
    /// The guest image is missing.
    #[error(transparent)]
    Fixture(#[from] crate::fixtures::FixtureError),
    /// The guest ended without its `replay: done` line.
    #[error("the guest printed no `replay: done` line (exit status {0}); see its output above")]
    NoResult(u8),
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

/// How to run the VM of a replay.
#[derive(Debug, Clone)]
pub struct ReplayRun {
    /// Guest RAM.
    pub mem: u64,
    /// vCPUs (the pool's areas; only vCPU 0 replays).
    pub cpus: u32,
    /// Pool options and other guest options.
    pub cmdline: String,
    /// Recorded gaps scaled by 1/speed; `None`: as fast as possible.
    pub speed: Option<f64>,
    /// Store behind private memory.
    pub private: memconv::StoreKind,
    /// Store behind shared memory.
    pub shared: memconv::StoreKind,
    /// Host granularity.
    pub granularity: memconv::Granularity,
    /// The disk image (created and filled with the pattern).
    pub disk: PathBuf,
    /// Its size in bytes.
    pub disk_size: u64,
    /// Print the guest's console.
    pub echo: bool,
}

/// What a replay in a VM gave.
#[derive(Debug, serde::Serialize)]
pub struct ReplayReport {
    /// `replay.*`.
    pub replay: serde_json::Map<String, serde_json::Value>,
    /// The VM's statistics.
    pub run: crate::run::RunSummary,
}

/// Fills `path` with `size` bytes of the pattern the guest verifies.
fn fill_disk(path: &std::path::Path, size: u64) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut buf = Vec::with_capacity(1 << 20);
    let words = size / 8;
    let mut w = 0u64;
    while w < words {
        buf.clear();
        let n = (words - w).min(1 << 17);
        for i in 0..n {
            buf.extend_from_slice(&memconv::replay_ops::pattern_word(w + i).to_le_bytes());
        }
        f.write_all(&buf)?;
        w += n;
    }
    f.flush()
}

/// A console writer that keeps a copy of what the guest printed.
struct Tee {
    keep: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    echo: bool,
}

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut k) = self.keep.lock() {
            k.extend_from_slice(buf);
        }
        if self.echo {
            std::io::stdout().write_all(buf)?;
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.echo {
            std::io::stdout().flush()?;
        }
        Ok(())
    }
}

/// The `key=value` pairs of the guest's `replay: done` line.
pub fn parse_done_line(console: &str) -> Option<Vec<(String, String)>> {
    let line = console
        .lines()
        .rev()
        .find(|l| l.starts_with("replay: done"))?;
    Some(
        line.split_whitespace()
            .filter_map(|t| t.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// Runs the trace in a VM.
pub fn run(opts: &ReplayOptions, r: &ReplayRun) -> Result<(Loaded, ReplayReport), ReplayError> {
    let loaded = load(opts)?;
    fill_disk(&r.disk, r.disk_size).map_err(|source| ReplayError::Write {
        path: r.disk.display().to_string(),
        source,
    })?;
    let mut cmdline = r.cmdline.clone();
    if let Some(s) = r.speed {
        cmdline.push_str(&format!(
            " replay_speed_milli={}",
            (s * 1000.0).round().max(1.0) as u64
        ));
    }
    let cfg = crate::config::VmConfig {
        guest: crate::fixtures::resolve("io")?,
        mem: r.mem,
        cpus: r.cpus,
        serial: None,
        cmdline,
        exec: None,
        private: r.private,
        shared: r.shared,
        granularity: r.granularity,
        platform: memconv::Platform::Tdx,
        prealloc: false,
        stats_json: None,
        disk: Some(crate::config::DiskConfig {
            path: r.disk.clone(),
            create_size: None,
            idle_us: crate::devices::virtio_blk::DEFAULT_IDLE_US,
            io: crate::devices::DiskIo::Vectored,
        }),
    };
    let keep = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let console = crate::serial::Console::with_writer(Box::new(Tee {
        keep: keep.clone(),
        echo: r.echo,
    }));
    let outcome = crate::run::run_vm_with_options(
        &cfg,
        crate::run::RunOptions {
            console: Some(console),
            replay_stream: Some(std::sync::Arc::new(loaded.stream.bytes.clone())),
            ..Default::default()
        },
    )?;
    let text = keep
        .lock()
        .map(|k| String::from_utf8_lossy(&k).into_owned())
        .unwrap_or_default();
    let Some(pairs) = parse_done_line(&text) else {
        return Err(ReplayError::NoResult(outcome.exit_status()));
    };
    let mut m = serde_json::Map::new();
    let num = |k: &str| {
        pairs
            .iter()
            .find(|(n, _)| n == k)
            .and_then(|(_, v)| v.parse::<u64>().ok())
    };
    for (k, v) in &pairs {
        let val = match v.parse::<u64>() {
            Ok(n) => serde_json::Value::from(n),
            Err(_) => serde_json::Value::from(v.clone()),
        };
        m.insert(k.clone(), val);
    }
    // The slot policies (legacy, dynamic, throttle, aligned-2m) count used bytes in whole
    // 2 KiB slots: their high-water in slots is what Linux's `io_tlb_used_hiwater` counts.
    // refill hands out size-class buffers (512 B .. 512 KiB), not slots: no slot figure.
    let hw = num("pool_high_water_bytes").unwrap_or(0);
    let slot_policy = pairs.iter().any(|(k, v)| k == "policy" && v != "refill");
    let slots = if slot_policy {
        serde_json::Value::from(hw / replay::slots::SLOT_SIZE)
    } else {
        serde_json::Value::Null
    };
    m.insert("high_water_slots".into(), slots);
    m.insert("high_water_bytes".into(), hw.into());
    m.insert(
        "model_high_water_slots".into(),
        loaded.summary.slots.high_water_slots.into(),
    );
    if let Some(h) = loaded.summary.linux_hiwater {
        m.insert("linux_hiwater_slots".into(), h.into());
    }
    m.insert("exit_status".into(), outcome.exit_status().into());
    Ok((
        loaded,
        ReplayReport {
            replay: m,
            run: outcome.summary,
        },
    ))
}
