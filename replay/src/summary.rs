//! The per-device summary `vmm replay TRACE --describe` prints: counts, directions, may-block
//! share, sizes, peaks, and the slot model's high-water beside Linux's own.

use std::collections::BTreeMap;
use std::fmt;

use crate::encode::DeviceKind;
use crate::line::Dir;
use crate::slots::{self, SlotPeaks};
use crate::stream::{OpKind, Warnings};
use crate::trace::Trace;

/// One device's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeviceSummary {
    /// The device name in the trace.
    pub name: String,
    /// Its kind.
    pub kind: Option<DeviceKind>,
    /// Streaming maps made in the trace.
    pub maps: u64,
    /// Unmaps (including of held mappings).
    pub unmaps: u64,
    /// Mappings held from the start.
    pub held: u64,
    /// Maps that may block.
    pub may_block_maps: u64,
    /// Coherent allocations.
    pub allocs: u64,
    /// Coherent frees.
    pub frees: u64,
    /// Syncs.
    pub syncs: u64,
    /// Maps and bytes TO_DEVICE.
    pub to_device: (u64, u64),
    /// Maps and bytes FROM_DEVICE.
    pub from_device: (u64, u64),
    /// Maps and bytes BIDIRECTIONAL.
    pub bidirectional: (u64, u64),
    /// Peak slots of the trace's own mappings.
    pub peak_slots: u64,
    /// Peak bytes of the trace's own mappings.
    pub peak_bytes: u64,
    /// The most frequent exact sizes (size, count), most frequent first, at most 8.
    pub top_sizes: Vec<(u32, u64)>,
}

/// The whole trace's summary.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Summary {
    /// The file.
    pub path: String,
    /// Lines read.
    pub lines: u64,
    /// Event lines.
    pub events: u64,
    /// Ops in the replay (held maps included).
    pub ops: u64,
    /// Streaming maps (held included).
    pub maps: u64,
    /// Mappings still live at the end of the trace.
    pub live_at_end: u64,
    /// Trace span in seconds.
    pub span_s: f64,
    /// The slot model's walk.
    pub slots: SlotPeaks,
    /// Linux's `io_tlb_used_hiwater` after the workload, with `--swiotlb-stats`.
    pub linux_hiwater: Option<u64>,
    /// Linux's `io_tlb_used` before the workload, with `--swiotlb-stats`.
    pub linux_used_before: Option<u64>,
    /// Per device.
    pub devices: Vec<DeviceSummary>,
    /// Counted warnings.
    pub warnings: Warnings,
    /// Phase markers.
    pub phases: Vec<String>,
}

impl Summary {
    /// Summarises a loaded trace; `kinds` indexed like the trace's devices.
    pub fn of(t: &Trace, kinds: &[DeviceKind]) -> Summary {
        let p = &t.pairing;
        let peaks = slots::walk(p);
        let mut devs: Vec<DeviceSummary> = p
            .devices
            .iter()
            .enumerate()
            .map(|(i, n)| DeviceSummary {
                name: n.clone(),
                kind: kinds.get(i).copied(),
                peak_slots: peaks.device_peak_slots[i],
                peak_bytes: peaks.device_peak_bytes[i],
                ..Default::default()
            })
            .collect();
        let mut sizes: Vec<BTreeMap<u32, u64>> = vec![BTreeMap::new(); devs.len()];
        for op in &p.held {
            let m = &p.mappings[op.mapping as usize];
            devs[m.device as usize].held += 1;
        }
        let mut maps = p.held.len() as u64;
        for op in &p.ops {
            let m = &p.mappings[op.mapping as usize];
            let d = &mut devs[m.device as usize];
            match op.kind {
                OpKind::Map => {
                    maps += 1;
                    d.maps += 1;
                    if m.may_block {
                        d.may_block_maps += 1;
                    }
                    let slot = match m.dir {
                        Dir::ToDevice => &mut d.to_device,
                        Dir::FromDevice => &mut d.from_device,
                        _ => &mut d.bidirectional,
                    };
                    slot.0 += 1;
                    slot.1 += u64::from(m.size);
                    *sizes[m.device as usize].entry(m.size).or_default() += 1;
                }
                OpKind::Unmap => d.unmaps += 1,
                OpKind::Alloc => d.allocs += 1,
                OpKind::Free => d.frees += 1,
                OpKind::SyncCpu | OpKind::SyncDevice => d.syncs += 1,
            }
        }
        for (d, s) in devs.iter_mut().zip(sizes) {
            let mut v: Vec<(u32, u64)> = s.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v.truncate(8);
            d.top_sizes = v;
        }
        let span_s = p.span_ns.map_or(0.0, |(a, b)| (b - a) as f64 / 1e9);
        Summary {
            path: t.path.display().to_string(),
            lines: t.lines,
            events: t.events,
            ops: (p.held.len() + p.ops.len()) as u64,
            maps,
            live_at_end: p.live_at_end() as u64,
            span_s,
            slots: peaks,
            linux_hiwater: t.stats.as_ref().and_then(|s| s.hiwater_after()),
            linux_used_before: t.stats.as_ref().and_then(|s| s.used_before().ok()),
            devices: devs,
            warnings: p.warnings.clone(),
            phases: p.markers.iter().map(|(_, m)| m.clone()).collect(),
        }
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "trace {}: {} lines, {} events, span {:.3} s",
            self.path, self.lines, self.events, self.span_s
        )?;
        writeln!(
            f,
            "replay: {} ops, {} maps ({} held from the start, {} slots), {} live at the end",
            self.ops,
            self.maps,
            self.devices.iter().map(|d| d.held).sum::<u64>(),
            self.slots.held_slots,
            self.live_at_end
        )?;
        let linux = match self.linux_hiwater {
            Some(h) => format!(
                "; Linux io_tlb_used_hiwater {h} ({})",
                if h == self.slots.high_water_slots {
                    "equal"
                } else {
                    "DIFFERENT"
                }
            ),
            None => String::new(),
        };
        writeln!(
            f,
            "slot model (ceil(size/2 KiB) per live mapping): high-water {} slots, {} B ({:.2} MiB) at t={:.6} s{linux}",
            self.slots.high_water_slots,
            self.slots.high_water_bytes,
            mib(self.slots.high_water_bytes),
            self.slots.high_water_ts_ns as f64 / 1e9,
        )?;
        for d in &self.devices {
            let kind = match d.kind {
                Some(DeviceKind::Blk) => " (virtio-blk)",
                Some(DeviceKind::Net) => " (virtio-net)",
                _ => "",
            };
            writeln!(f, "device {}{kind}:", d.name)?;
            let pct = if d.maps > 0 {
                100.0 * d.may_block_maps as f64 / d.maps as f64
            } else {
                0.0
            };
            writeln!(
                f,
                "  maps {} unmaps {} held {} allocs {} frees {} syncs {}; may block {} ({pct:.1}%), cannot block {}",
                d.maps, d.unmaps, d.held, d.allocs, d.frees, d.syncs, d.may_block_maps, d.maps - d.may_block_maps
            )?;
            writeln!(
                f,
                "  TO_DEVICE {} / {} B, FROM_DEVICE {} / {} B, BIDIRECTIONAL {} / {} B",
                d.to_device.0,
                d.to_device.1,
                d.from_device.0,
                d.from_device.1,
                d.bidirectional.0,
                d.bidirectional.1
            )?;
            writeln!(
                f,
                "  peak of its own mappings: {} slots, {} B ({:.2} MiB)",
                d.peak_slots,
                d.peak_bytes,
                mib(d.peak_bytes)
            )?;
            if !d.top_sizes.is_empty() {
                let s: Vec<String> = d
                    .top_sizes
                    .iter()
                    .map(|(s, n)| format!("{s} x{n}"))
                    .collect();
                writeln!(f, "  top sizes: {}", s.join(", "))?;
            }
        }
        let w = &self.warnings;
        writeln!(
            f,
            "warnings: {} (remap of live {}, sync of unknown {}, free of unknown {}, unmap_sg of unknown {}, lost events {}, no-slot events {}, unmatched bounces {}, held beyond stats {})",
            w.total(), w.remap_of_live, w.sync_of_unknown, w.free_of_unknown, w.unmap_sg_of_unknown, w.lost_events, w.no_slot_events, w.unmatched_bounces, w.held_beyond_stats
        )?;
        if self.slots.over_segment > 0 {
            writeln!(
                f,
                "mappings over 128 slots (Linux refuses them): {}",
                self.slots.over_segment
            )?;
        }
        Ok(())
    }
}
