//! The Linux swiotlb slot accounting, as `io_tlb_used` counts it: a streaming mapping of `size`
//! bytes takes `ceil(size / 2 KiB)` slots from its map to its unmap (the virtio devices set no
//! min-align mask, so no offset slots are added; the page alignment Linux applies to mappings of
//! 4 KiB or more moves where a mapping starts, not how many slots it counts); coherent
//! allocations take none (`dma_alloc` comes from the page allocator under `swiotlb=force`).
//! Walking the held mappings and the ops gives the high-water Linux reports in
//! `io_tlb_used_hiwater`, and the per-device peaks.

use crate::stream::{OpKind, Pairing};

/// Bytes per swiotlb slot (`IO_TLB_SIZE`).
pub const SLOT_SIZE: u64 = 2048;
/// Slots per segment (`IO_TLB_SEGSIZE`): the longest mapping is 128 slots (256 KiB).
pub const SEGMENT_SLOTS: u64 = 128;

/// Slots a mapping of `size` bytes takes.
pub fn slots_of(size: u32) -> u64 {
    u64::from(size).div_ceil(SLOT_SIZE)
}

/// The result of the walk.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SlotPeaks {
    /// Most slots in use at once (held plus trace mappings): Linux's `io_tlb_used_hiwater`.
    pub high_water_slots: u64,
    /// Bytes mapped at that moment.
    pub high_water_bytes: u64,
    /// Index in the op list where the high-water was reached (held maps count as before 0).
    pub high_water_at_op: usize,
    /// Timestamp of that op (ns).
    pub high_water_ts_ns: u64,
    /// Slots in use at the end.
    pub end_slots: u64,
    /// Slots held from the start.
    pub held_slots: u64,
    /// Per device (indexed like `Pairing::devices`): peak slots of the trace's own mappings.
    pub device_peak_slots: Vec<u64>,
    /// Per device: peak bytes of the trace's own mappings.
    pub device_peak_bytes: Vec<u64>,
    /// Mappings longer than a segment (128 slots), which Linux refuses.
    pub over_segment: u64,
}

/// Walks held mappings then ops, counting slots as Linux does.
pub fn walk(p: &Pairing) -> SlotPeaks {
    let nd = p.devices.len();
    let mut r = SlotPeaks {
        device_peak_slots: vec![0; nd],
        device_peak_bytes: vec![0; nd],
        ..Default::default()
    };
    let mut used = 0u64;
    let mut bytes = 0u64;
    let mut dev_slots = vec![0u64; nd];
    let mut dev_bytes = vec![0u64; nd];
    for op in &p.held {
        let m = &p.mappings[op.mapping as usize];
        used += slots_of(m.size);
        bytes += u64::from(m.size);
    }
    r.held_slots = used;
    r.high_water_slots = used;
    r.high_water_bytes = bytes;
    for (i, op) in p.ops.iter().enumerate() {
        let m = &p.mappings[op.mapping as usize];
        if m.coherent {
            continue;
        }
        let s = slots_of(m.size);
        let d = m.device as usize;
        match op.kind {
            OpKind::Map => {
                if s > SEGMENT_SLOTS {
                    r.over_segment += 1;
                }
                used += s;
                bytes += u64::from(m.size);
                dev_slots[d] += s;
                dev_bytes[d] += u64::from(m.size);
                if used > r.high_water_slots {
                    r.high_water_slots = used;
                    r.high_water_bytes = bytes;
                    r.high_water_at_op = i;
                    r.high_water_ts_ns = op.ts_ns;
                }
                r.device_peak_slots[d] = r.device_peak_slots[d].max(dev_slots[d]);
                r.device_peak_bytes[d] = r.device_peak_bytes[d].max(dev_bytes[d]);
            }
            OpKind::Unmap => {
                used = used.saturating_sub(s);
                bytes = bytes.saturating_sub(u64::from(m.size));
                if !m.held {
                    dev_slots[d] = dev_slots[d].saturating_sub(s);
                    dev_bytes[d] = dev_bytes[d].saturating_sub(u64::from(m.size));
                }
            }
            _ => {}
        }
    }
    r.end_slots = used;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_round_up_per_mapping() {
        assert_eq!(slots_of(1), 1);
        assert_eq!(slots_of(16), 1);
        assert_eq!(slots_of(2048), 1);
        assert_eq!(slots_of(2049), 2);
        assert_eq!(slots_of(4096), 2);
        assert_eq!(slots_of(262_144), 128);
    }
}
