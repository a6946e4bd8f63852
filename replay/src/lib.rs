//! replay: Linux DMA-API traces (ftrace text of `dma:*` and `swiotlb:*` events, plain or
//! gzip, as `/sys/kernel/tracing/trace` and `trace-cmd report` print them) turned into the op
//! stream a guest executes through a pool policy.
//!
//! Modules: [`line`] (one line into an event), [`stream`] (pairing maps with unmaps, held
//! mappings, may-block, warnings), [`trace`] (reading files, line numbers on errors, held
//! mappings reconciled with the capture's stats), [`swiotlb_stats`] (the capture's debugfs
//! counters), [`slots`] (Linux's `io_tlb_used` accounting and its high-water), [`encode`] (the
//! binary op stream, [`memconv::replay_ops`]), [`summary`] (what `--describe` prints).
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod encode;
pub mod line;
pub mod slots;
pub mod stream;
pub mod summary;
pub mod swiotlb_stats;
pub mod trace;

pub use encode::{encode, DeviceKind, Encoded};
pub use summary::Summary;
pub use trace::{load, LoadOptions, Trace, TraceError};

/// Device kinds for a trace's devices: from the capture's `devices.txt` beside the trace when
/// present, else by name `blk`/`net` hints given by the caller, else unknown.
pub fn device_kinds(t: &Trace, overrides: &[(String, DeviceKind)]) -> Vec<DeviceKind> {
    let mut known: Vec<(String, DeviceKind)> = overrides.to_vec();
    if let Some(dir) = t.path.parent() {
        if let Ok(text) = std::fs::read_to_string(dir.join("devices.txt")) {
            known.extend(encode::parse_devices_txt(&text));
        }
    }
    t.pairing
        .devices
        .iter()
        .map(|d| {
            known
                .iter()
                .find(|(n, _)| n == d)
                .map_or(DeviceKind::Other, |(_, k)| *k)
        })
        .collect()
}
