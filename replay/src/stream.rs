//! Pairing: turns parsed events, in trace order, into the replay's op list. Maps pair with
//! unmaps by (device, dma_addr); `dma_map_sg` lists pair with `dma_unmap_sg` by (device, first
//! original address); coherent allocations pair with frees by (device, dma_addr). An unmap of an
//! address the trace never mapped is a mapping alive before the trace began: it is held from the
//! start. A map's may-block comes from its context (interrupts off or interrupt context: cannot
//! block), unless its device is in the may-block override list. Errors name the line; what the
//! kernel itself tolerates is a counted warning.

use std::collections::HashMap as StdHashMap;
use std::hash::{BuildHasherDefault, Hasher};

use thiserror::Error;

use crate::line::{Dir, Event, Kind};

/// What a trace asked for that replay refuses (the line number is added by the reader).
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PairError {
    /// An unmap whose size differs from its map's.
    #[error("unmap of {device} dma_addr={dma_addr:#x} has size {unmap} but its map (line {map_line}) had size {map}")]
    SizeMismatch {
        /// Device.
        device: String,
        /// Address.
        dma_addr: u64,
        /// The map's size.
        map: u64,
        /// The unmap's size.
        unmap: u64,
        /// Line of the map.
        map_line: u64,
    },
    /// An unmap whose direction differs from its map's.
    #[error("unmap of {device} dma_addr={dma_addr:#x} has dir={unmap} but its map (line {map_line}) had dir={map}")]
    DirMismatch {
        /// Device.
        device: String,
        /// Address.
        dma_addr: u64,
        /// The map's direction.
        map: &'static str,
        /// The unmap's direction.
        unmap: &'static str,
        /// Line of the map.
        map_line: u64,
    },
    /// An unmap of a mapping that was already unmapped (and not mapped again).
    #[error("unmap of {device} dma_addr={dma_addr:#x}, already unmapped at line {unmap_line}")]
    DoubleUnmap {
        /// Device.
        device: String,
        /// Address.
        dma_addr: u64,
        /// Line of the earlier unmap.
        unmap_line: u64,
    },
    /// A map or allocation larger than the op stream carries (4 GiB).
    #[error("size {0} is larger than 4 GiB")]
    TooLarge(u64),
}

/// Counted warnings: what the kernel tolerates and replay works around.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Warnings {
    /// A map of an address still mapped (its unmap was lost): the old mapping is unmapped first.
    pub remap_of_live: u64,
    /// A sync of an address with no live mapping: skipped.
    pub sync_of_unknown: u64,
    /// A free of an allocation the trace never made: skipped.
    pub free_of_unknown: u64,
    /// `dma_unmap_sg` of a list the trace never mapped: skipped (sizes unknown).
    pub unmap_sg_of_unknown: u64,
    /// Events lost by the kernel's ring buffer (`[LOST N EVENTS]`).
    pub lost_events: u64,
    /// Events that involve no swiotlb slot (`dma_map_resource`, `*_err`): skipped.
    pub no_slot_events: u64,
    /// `swiotlb_bounced` with no map of the same device and size following it.
    pub unmatched_bounces: u64,
    /// Mappings held from the start beyond what `--swiotlb-stats` says was used before.
    pub held_beyond_stats: u64,
}

impl Warnings {
    /// Total of all counters.
    pub fn total(&self) -> u64 {
        self.remap_of_live
            + self.sync_of_unknown
            + self.free_of_unknown
            + self.unmap_sg_of_unknown
            + self.lost_events
            + self.no_slot_events
            + self.unmatched_bounces
            + self.held_beyond_stats
    }
}

/// What an op does (before handles are assigned).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A streaming mapping.
    Map,
    /// Its unmap.
    Unmap,
    /// A coherent allocation.
    Alloc,
    /// Its free.
    Free,
    /// A sync for the CPU.
    SyncCpu,
    /// A sync for the device.
    SyncDevice,
}

/// One replay op, naming its mapping by a trace-wide id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceOp {
    /// What it does.
    pub kind: OpKind,
    /// The mapping or allocation (index into [`Pairing::mappings`]).
    pub mapping: u32,
    /// Timestamp in nanoseconds (held mappings: the trace's first timestamp).
    pub ts_ns: u64,
    /// Line of the event (0 for held mappings without one).
    pub line: u64,
}

/// One mapping or coherent allocation of the trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Device index (into [`Pairing::devices`]).
    pub device: u16,
    /// Bytes.
    pub size: u32,
    /// Direction.
    pub dir: Dir,
    /// May block (from the flags field, or the device override).
    pub may_block: bool,
    /// A coherent allocation rather than a streaming mapping.
    pub coherent: bool,
    /// Alive before the trace began.
    pub held: bool,
    /// CPU that mapped it (held: the CPU that unmapped it).
    pub cpu: u32,
    /// Whether the trace unmaps it.
    pub unmapped: bool,
}

/// A multiply-rotate hasher for the small integer keys of the pairing tables (the default
/// SipHash dominates the parse time of a large trace).
#[derive(Default)]
struct FastHasher(u64);

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u64(u64::from(b));
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_u16(&mut self, v: u16) {
        self.write_u64(u64::from(v));
    }

    fn write_u32(&mut self, v: u32) {
        self.write_u64(u64::from(v));
    }

    fn write_usize(&mut self, v: usize) {
        self.write_u64(v as u64);
    }
}

type HashMap<K, V> = StdHashMap<K, V, BuildHasherDefault<FastHasher>>;

#[derive(Debug, Clone, Copy)]
struct Live {
    mapping: u32,
    line: u64,
}

/// The pairing state and its result.
#[derive(Debug, Default)]
pub struct Pairing {
    /// Device names in order of first appearance.
    pub devices: Vec<String>,
    /// Every mapping and allocation.
    pub mappings: Vec<Mapping>,
    /// Held mappings first (in order of their unmaps), then the trace's ops in order.
    pub held: Vec<TraceOp>,
    /// The trace's ops in order.
    pub ops: Vec<TraceOp>,
    /// Counted warnings.
    pub warnings: Warnings,
    /// Phase markers (`tracing_mark_write` text) with the op index they precede.
    pub markers: Vec<(usize, String)>,
    /// First and last timestamps seen.
    pub span_ns: Option<(u64, u64)>,
    may_block_devices: Vec<String>,
    device_index: HashMap<String, u16>,
    live: HashMap<(u16, u64), Live>,
    unmapped: HashMap<(u16, u64), u64>,
    live_sg: HashMap<(u16, u64), Vec<u32>>,
    coherent: HashMap<(u16, u64), Live>,
    pending_bounces: HashMap<u32, u64>,
    last_device: Option<(u16, String)>,
}

impl Pairing {
    /// Empty state; maps of the named devices may block whatever their context.
    pub fn new(may_block_devices: &[String]) -> Self {
        Pairing {
            may_block_devices: may_block_devices.to_vec(),
            ops: Vec::with_capacity(1 << 16),
            mappings: Vec::with_capacity(1 << 15),
            ..Default::default()
        }
    }

    fn device(&mut self, name: &str) -> u16 {
        if let Some(&(i, ref last)) = self.last_device.as_ref() {
            if last == name {
                return i;
            }
        }
        let i = self.device_slow(name);
        self.last_device = Some((i, name.to_string()));
        i
    }

    fn device_slow(&mut self, name: &str) -> u16 {
        if let Some(&i) = self.device_index.get(name) {
            return i;
        }
        let i = self.devices.len() as u16;
        self.devices.push(name.to_string());
        self.device_index.insert(name.to_string(), i);
        i
    }

    fn size32(size: u64) -> Result<u32, PairError> {
        u32::try_from(size).map_err(|_| PairError::TooLarge(size))
    }

    fn new_mapping(&mut self, m: Mapping) -> u32 {
        self.mappings.push(m);
        (self.mappings.len() - 1) as u32
    }

    fn push(&mut self, kind: OpKind, mapping: u32, ts_ns: u64, line: u64) {
        self.ops.push(TraceOp {
            kind,
            mapping,
            ts_ns,
            line,
        });
    }

    /// Notes a `[LOST N EVENTS]` line.
    pub fn lost(&mut self, n: u64) {
        self.warnings.lost_events += n.max(1);
    }

    fn map_one(
        &mut self,
        e: &Event<'_>,
        dev: u16,
        dma_addr: u64,
        size: u64,
        line: u64,
    ) -> Result<u32, PairError> {
        let size = Self::size32(size)?;
        if let Some(old) = self.live.remove(&(dev, dma_addr)) {
            self.warnings.remap_of_live += 1;
            self.mappings[old.mapping as usize].unmapped = true;
            self.push(OpKind::Unmap, old.mapping, e.ts_ns, line);
        }
        let may_block = e.ctx.may_block() || self.may_block_devices.iter().any(|d| d == e.device);
        let id = self.new_mapping(Mapping {
            device: dev,
            size,
            dir: e.dir,
            may_block,
            coherent: false,
            held: false,
            cpu: e.cpu,
            unmapped: false,
        });
        self.unmapped.remove(&(dev, dma_addr));
        self.live
            .insert((dev, dma_addr), Live { mapping: id, line });
        self.push(OpKind::Map, id, e.ts_ns, line);
        Ok(id)
    }

    fn unmap_one(
        &mut self,
        e: &Event<'_>,
        dev: u16,
        dma_addr: u64,
        size: u64,
        line: u64,
    ) -> Result<(), PairError> {
        let Some(l) = self.live.get(&(dev, dma_addr)).copied() else {
            if let Some(&unmap_line) = self.unmapped.get(&(dev, dma_addr)) {
                return Err(PairError::DoubleUnmap {
                    device: e.device.to_string(),
                    dma_addr,
                    unmap_line,
                });
            }
            // Mapped before the trace began: held from the start.
            let id = self.new_mapping(Mapping {
                device: dev,
                size: Self::size32(size)?,
                dir: e.dir,
                may_block: true,
                coherent: false,
                held: true,
                cpu: e.cpu,
                unmapped: true,
            });
            self.held.push(TraceOp {
                kind: OpKind::Map,
                mapping: id,
                ts_ns: 0,
                line: 0,
            });
            self.unmapped.insert((dev, dma_addr), line);
            self.push(OpKind::Unmap, id, e.ts_ns, line);
            return Ok(());
        };
        let m = &self.mappings[l.mapping as usize];
        if u64::from(m.size) != size {
            return Err(PairError::SizeMismatch {
                device: e.device.to_string(),
                dma_addr,
                map: u64::from(m.size),
                unmap: size,
                map_line: l.line,
            });
        }
        if m.dir != e.dir {
            return Err(PairError::DirMismatch {
                device: e.device.to_string(),
                dma_addr,
                map: m.dir.name(),
                unmap: e.dir.name(),
                map_line: l.line,
            });
        }
        self.live.remove(&(dev, dma_addr));
        self.mappings[l.mapping as usize].unmapped = true;
        self.unmapped.insert((dev, dma_addr), line);
        self.push(OpKind::Unmap, l.mapping, e.ts_ns, line);
        Ok(())
    }

    fn sync(&mut self, e: &Event<'_>, dev: u16, dma_addr: u64, for_device: bool, line: u64) {
        // A sync may name an address inside the mapping; the usual case is its start.
        match self.live.get(&(dev, dma_addr)) {
            Some(l) => {
                let kind = if for_device {
                    OpKind::SyncDevice
                } else {
                    OpKind::SyncCpu
                };
                let id = l.mapping;
                self.push(kind, id, e.ts_ns, line);
            }
            None => self.warnings.sync_of_unknown += 1,
        }
    }

    /// Feeds one event (line numbers from 1).
    pub fn event(&mut self, e: &Event<'_>, line: u64) -> Result<(), PairError> {
        self.span_ns = Some(match self.span_ns {
            None => (e.ts_ns, e.ts_ns),
            Some((a, b)) => (a.min(e.ts_ns), b.max(e.ts_ns)),
        });
        match &e.kind {
            Kind::Marker(text) => {
                self.markers.push((self.ops.len(), text.to_string()));
            }
            Kind::NoSlot => self.warnings.no_slot_events += 1,
            Kind::Bounced { .. } => {
                // Per CPU: the bounce and its map are recorded back to back on one CPU.
                if self.pending_bounces.insert(e.cpu, 1).is_some() {
                    self.warnings.unmatched_bounces += 1;
                }
            }
            Kind::Map { dma_addr, size } => {
                self.pending_bounces.remove(&e.cpu);
                let dev = self.device(e.device);
                self.map_one(e, dev, *dma_addr, *size, line)?;
            }
            Kind::Unmap { dma_addr, size } => {
                let dev = self.device(e.device);
                self.unmap_one(e, dev, *dma_addr, *size, line)?;
            }
            Kind::MapSg {
                dma_addrs,
                sizes,
                phys_addrs,
            } => {
                self.pending_bounces.remove(&e.cpu);
                let dev = self.device(e.device);
                let mut ids = Vec::with_capacity(dma_addrs.len());
                for (a, s) in dma_addrs.iter().zip(sizes) {
                    ids.push(self.map_one(e, dev, *a, *s, line)?);
                }
                let key = phys_addrs.first().copied().unwrap_or(0);
                self.live_sg.insert((dev, key), ids);
            }
            Kind::UnmapSg { phys_addrs } => {
                let dev = self.device(e.device);
                let key = phys_addrs.first().copied().unwrap_or(0);
                match self.live_sg.remove(&(dev, key)) {
                    Some(ids) => {
                        for id in ids {
                            let addr = self
                                .live
                                .iter()
                                .find(|(_, l)| l.mapping == id)
                                .map(|(k, _)| k.1);
                            if let Some(a) = addr {
                                let size = u64::from(self.mappings[id as usize].size);
                                self.unmap_one(e, dev, a, size, line)?;
                            }
                        }
                    }
                    None => self.warnings.unmap_sg_of_unknown += 1,
                }
            }
            Kind::Alloc { dma_addr, size } => {
                let dev = self.device(e.device);
                let id = self.new_mapping(Mapping {
                    device: dev,
                    size: Self::size32(*size)?,
                    dir: e.dir,
                    may_block: e.ctx.may_block(),
                    coherent: true,
                    held: false,
                    cpu: e.cpu,
                    unmapped: false,
                });
                self.coherent
                    .insert((dev, *dma_addr), Live { mapping: id, line });
                self.push(OpKind::Alloc, id, e.ts_ns, line);
            }
            Kind::Free { dma_addr, .. } => {
                let dev = self.device(e.device);
                match self.coherent.remove(&(dev, *dma_addr)) {
                    Some(l) => {
                        self.mappings[l.mapping as usize].unmapped = true;
                        self.push(OpKind::Free, l.mapping, e.ts_ns, line);
                    }
                    None => self.warnings.free_of_unknown += 1,
                }
            }
            Kind::Sync {
                for_device,
                dma_addr,
                ..
            } => {
                let dev = self.device(e.device);
                self.sync(e, dev, *dma_addr, *for_device, line);
            }
            Kind::SyncSg {
                for_device,
                dma_addrs,
            } => {
                let dev = self.device(e.device);
                for a in dma_addrs {
                    self.sync(e, dev, *a, *for_device, line);
                }
            }
        }
        Ok(())
    }

    /// Mappings (not allocations) still live at the end of the trace.
    pub fn live_at_end(&self) -> usize {
        self.live.len()
    }

    /// Adds `count` one-slot mappings held from the start and never unmapped: the part of
    /// `io_tlb_used` before the workload that the trace's own unmaps do not explain (with
    /// `--swiotlb-stats`). They are given to device `device` (created if new).
    pub fn hold_anonymous(&mut self, device: &str, count: u64) {
        if count == 0 {
            return;
        }
        let dev = self.device(device);
        for _ in 0..count {
            let id = self.new_mapping(Mapping {
                device: dev,
                size: 2048,
                dir: Dir::FromDevice,
                may_block: true,
                coherent: false,
                held: true,
                cpu: 0,
                unmapped: false,
            });
            self.held.push(TraceOp {
                kind: OpKind::Map,
                mapping: id,
                ts_ns: 0,
                line: 0,
            });
        }
    }
}
