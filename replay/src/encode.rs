//! The op list of a [`Pairing`] as the binary op stream the guest executes
//! ([`memconv::replay_ops`]): held mappings first (gap 0), then the trace's ops with the gaps
//! between their timestamps, each mapping named by a dense handle reused after its unmap, so the
//! guest's handle table needs only as many entries as mappings are live at once.

use memconv::replay_ops::{
    Op, OpWriter, DEVICE_BLK, DEVICE_NET, DEVICE_OTHER, OPC_ALLOC, OPC_FREE, OPC_MAP, OPC_SYNC_CPU,
    OPC_SYNC_DEVICE, OPC_UNMAP,
};

use crate::stream::{OpKind, Pairing, TraceOp};

/// What kind of device a trace's device name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum DeviceKind {
    /// virtio-blk.
    Blk,
    /// virtio-net.
    Net,
    /// Unknown.
    Other,
}

impl DeviceKind {
    /// The op-stream code.
    pub fn code(self) -> u8 {
        match self {
            DeviceKind::Blk => DEVICE_BLK,
            DeviceKind::Net => DEVICE_NET,
            DeviceKind::Other => DEVICE_OTHER,
        }
    }
}

/// Reads a capture's `devices.txt` (`virtioN device_id=0x0002 pci=0000:00:01.0 ...`): virtio
/// device id 1 is net, 2 is block. Returns (pci name, kind) pairs.
pub fn parse_devices_txt(text: &str) -> Vec<(String, DeviceKind)> {
    let mut out = Vec::new();
    for l in text.lines() {
        let mut id = None;
        let mut pci = None;
        for w in l.split_whitespace() {
            if let Some(v) = w.strip_prefix("device_id=") {
                id = Some(v.to_string());
            } else if let Some(v) = w.strip_prefix("pci=") {
                pci = Some(v.to_string());
            }
        }
        if let (Some(id), Some(pci)) = (id, pci) {
            let kind = match id.as_str() {
                "0x0001" | "1" => DeviceKind::Net,
                "0x0002" | "2" => DeviceKind::Blk,
                _ => DeviceKind::Other,
            };
            out.push((pci, kind));
        }
    }
    out
}

/// The encoded stream and what it took.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// The bytes.
    pub bytes: Vec<u8>,
    /// Ops written.
    pub ops: u64,
    /// Handle-table entries the guest needs.
    pub handles: u32,
}

/// Encodes the pairing's held mappings and ops.
pub fn encode(p: &Pairing, kinds: &[DeviceKind]) -> Encoded {
    let mut w = OpWriter::new();
    let mut handle_of = vec![u32::MAX; p.mappings.len()];
    let mut free: Vec<u32> = Vec::new();
    let mut next = 0u32;
    let mut prev_ts: Option<u64> = None;
    let mut ops = 0u64;
    let mut emit = |op: &TraceOp, held: bool, w: &mut OpWriter| {
        let m = &p.mappings[op.mapping as usize];
        let creates = matches!(op.kind, OpKind::Map | OpKind::Alloc);
        let handle = if creates {
            let h = free.pop().unwrap_or_else(|| {
                next += 1;
                next - 1
            });
            handle_of[op.mapping as usize] = h;
            h
        } else {
            handle_of[op.mapping as usize]
        };
        if matches!(op.kind, OpKind::Unmap | OpKind::Free) {
            free.push(handle);
        }
        let gap_ns = if held {
            0
        } else {
            let g = prev_ts.map_or(0, |t| op.ts_ns.saturating_sub(t));
            prev_ts = Some(op.ts_ns);
            g
        };
        let opcode = match op.kind {
            OpKind::Map => OPC_MAP,
            OpKind::Unmap => OPC_UNMAP,
            OpKind::Alloc => OPC_ALLOC,
            OpKind::Free => OPC_FREE,
            OpKind::SyncCpu => OPC_SYNC_CPU,
            OpKind::SyncDevice => OPC_SYNC_DEVICE,
        };
        w.push(&Op {
            opcode,
            dir: if creates { m.dir.code() } else { 0 },
            may_block: creates && m.may_block,
            held,
            gap_ns,
            handle,
            device: if creates { m.device } else { 0 },
            size: if creates { m.size } else { 0 },
        });
        ops += 1;
    };
    for op in &p.held {
        emit(op, true, &mut w);
    }
    for op in &p.ops {
        emit(op, false, &mut w);
    }
    let devices: Vec<u8> = (0..p.devices.len())
        .map(|i| kinds.get(i).copied().unwrap_or(DeviceKind::Other).code())
        .collect();
    let handles = next;
    Encoded {
        bytes: w.finish(&devices),
        ops,
        handles,
    }
}
