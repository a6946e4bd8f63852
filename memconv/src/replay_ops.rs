//! The replay op stream: the compact binary form of a Linux DMA trace that `vmm replay` places in
//! guest memory (a host-filled region named in the boot info) and the guest executes without an
//! exit per op. `no_std`: the guest decodes with [`OpReader`]; the host encodes with
//! [`OpWriter`] (needs the `host` feature).
//!
//! Layout, little-endian: a [`StreamHeader`] (32 bytes), `device_count` device-kind bytes
//! ([`DEVICE_BLK`], [`DEVICE_NET`], [`DEVICE_OTHER`]), then `op_count` ops. An op is one tag byte
//! (bits 0..2 the opcode `OPC_*`, bits 3..4 the direction `DIR_*`, bit 5 may-block, bit 6 held
//! from the start) followed by LEB128 varints: the gap in nanoseconds since the previous op, the
//! handle (a dense index: no more than `handle_count` are live at once, so a table of that many
//! entries holds every live mapping), and for maps and allocations the device index and size.

/// `StreamHeader::magic`: "RPL1".
pub const STREAM_MAGIC: u32 = u32::from_le_bytes(*b"RPL1");
/// `StreamHeader::version`.
pub const STREAM_VERSION: u16 = 1;
/// Size of [`StreamHeader`] in bytes.
pub const HEADER_LEN: usize = 32;

/// Opcode: streaming map (`dma_map_page` / `dma_map_phys` / one entry of `dma_map_sg`).
pub const OPC_MAP: u8 = 1;
/// Opcode: streaming unmap.
pub const OPC_UNMAP: u8 = 2;
/// Opcode: coherent allocation (`dma_alloc`).
pub const OPC_ALLOC: u8 = 3;
/// Opcode: coherent free (`dma_free`).
pub const OPC_FREE: u8 = 4;
/// Opcode: `dma_sync_*_for_cpu` of a live mapping.
pub const OPC_SYNC_CPU: u8 = 5;
/// Opcode: `dma_sync_*_for_device` of a live mapping.
pub const OPC_SYNC_DEVICE: u8 = 6;

/// Direction: both ways.
pub const DIR_BIDIRECTIONAL: u8 = 0;
/// Direction: memory to device (the device reads).
pub const DIR_TO_DEVICE: u8 = 1;
/// Direction: device to memory (the device writes).
pub const DIR_FROM_DEVICE: u8 = 2;
/// Direction: none (`DMA_NONE`).
pub const DIR_NONE: u8 = 3;

/// Device kind: a virtio-blk device in the trace.
pub const DEVICE_BLK: u8 = 1;
/// Device kind: a virtio-net device in the trace.
pub const DEVICE_NET: u8 = 2;
/// Device kind: anything else (or mappings held from before the trace with no known device).
pub const DEVICE_OTHER: u8 = 0;

const TAG_OPC_MASK: u8 = 0x7;
const TAG_DIR_SHIFT: u8 = 3;
const TAG_MAY_BLOCK: u8 = 1 << 5;
const TAG_HELD: u8 = 1 << 6;

/// The 64-bit word at disk byte offset `8 * word` of a replay's disk image: the host fills the
/// image with it, the guest writes it for TO_DEVICE mappings and checks it after FROM_DEVICE
/// ones, so every byte a device moved is verified.
pub const fn pattern_word(word: u64) -> u64 {
    let x = (word ^ 0x5245_504c_4159_0001).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^ (x >> 29)
}

/// The stream header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamHeader {
    /// [`STREAM_MAGIC`].
    pub magic: u32,
    /// [`STREAM_VERSION`].
    pub version: u16,
    /// Number of device-kind bytes after the header.
    pub device_count: u16,
    /// Number of ops.
    pub op_count: u32,
    /// Most handles live at once (size of the guest's handle table).
    pub handle_count: u32,
    /// Number of leading ops that are maps held from the start.
    pub held_count: u32,
    /// Bytes of ops after the device table.
    pub body_len: u32,
    /// Largest map or allocation size in bytes.
    pub max_size: u32,
    /// Reserved, zero.
    pub reserved: u32,
}

impl StreamHeader {
    /// The header as its 32 wire bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&self.magic.to_le_bytes());
        b[4..6].copy_from_slice(&self.version.to_le_bytes());
        b[6..8].copy_from_slice(&self.device_count.to_le_bytes());
        b[8..12].copy_from_slice(&self.op_count.to_le_bytes());
        b[12..16].copy_from_slice(&self.handle_count.to_le_bytes());
        b[16..20].copy_from_slice(&self.held_count.to_le_bytes());
        b[20..24].copy_from_slice(&self.body_len.to_le_bytes());
        b[24..28].copy_from_slice(&self.max_size.to_le_bytes());
        b[28..32].copy_from_slice(&self.reserved.to_le_bytes());
        b
    }

    /// Reads a header from the first 32 bytes of `b`, checking magic and version.
    pub fn from_bytes(b: &[u8]) -> Result<Self, DecodeError> {
        if b.len() < HEADER_LEN {
            return Err(DecodeError::Truncated { offset: b.len() });
        }
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let h = StreamHeader {
            magic: u32_at(0),
            version: u16_at(4),
            device_count: u16_at(6),
            op_count: u32_at(8),
            handle_count: u32_at(12),
            held_count: u32_at(16),
            body_len: u32_at(20),
            max_size: u32_at(24),
            reserved: u32_at(28),
        };
        if h.magic != STREAM_MAGIC {
            return Err(DecodeError::BadMagic(h.magic));
        }
        if h.version != STREAM_VERSION {
            return Err(DecodeError::BadVersion(h.version));
        }
        Ok(h)
    }
}

/// One op of the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// `OPC_*`.
    pub opcode: u8,
    /// `DIR_*` (maps and allocations; 0 otherwise).
    pub dir: u8,
    /// The map may block (taken with interrupts on, outside interrupt context).
    pub may_block: bool,
    /// A mapping alive before the trace began (mapped at the start, before the first gap).
    pub held: bool,
    /// Nanoseconds since the previous op in the trace.
    pub gap_ns: u64,
    /// Handle: index into the table of live mappings and allocations.
    pub handle: u32,
    /// Device index (maps and allocations; 0 otherwise).
    pub device: u16,
    /// Bytes (maps and allocations; 0 otherwise).
    pub size: u32,
}

impl Op {
    /// Whether this op creates a mapping or allocation (carries device and size).
    pub fn creates(&self) -> bool {
        self.opcode == OPC_MAP || self.opcode == OPC_ALLOC
    }
}

/// Why a stream did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeError {
    /// The stream ends inside a header, table or op at this byte offset.
    Truncated {
        /// Byte offset where more bytes were needed.
        offset: usize,
    },
    /// The header's magic is not [`STREAM_MAGIC`].
    BadMagic(u32),
    /// The header's version is not [`STREAM_VERSION`].
    BadVersion(u16),
    /// An op's tag holds an unknown opcode.
    BadOpcode {
        /// Byte offset of the tag.
        offset: usize,
        /// The opcode found.
        opcode: u8,
    },
    /// A varint is longer than 10 bytes or overflows its field.
    BadVarint {
        /// Byte offset of the varint.
        offset: usize,
    },
    /// An op names a handle at or beyond the header's `handle_count`, or a device beyond
    /// `device_count`.
    OutOfRange {
        /// Byte offset of the op.
        offset: usize,
    },
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Truncated { offset } => write!(f, "op stream truncated at byte {offset}"),
            DecodeError::BadMagic(m) => write!(f, "op stream magic {m:#x} is not RPL1"),
            DecodeError::BadVersion(v) => write!(f, "op stream version {v} (expected 1)"),
            DecodeError::BadOpcode { offset, opcode } => {
                write!(f, "unknown opcode {opcode} at byte {offset}")
            }
            DecodeError::BadVarint { offset } => write!(f, "bad varint at byte {offset}"),
            DecodeError::OutOfRange { offset } => {
                write!(
                    f,
                    "handle or device out of range in the op at byte {offset}"
                )
            }
        }
    }
}

/// Reads the ops of an encoded stream in order, borrowing it (no allocation).
#[derive(Debug, Clone)]
pub struct OpReader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
    left: u32,
    header: StreamHeader,
    devices: &'a [u8],
}

impl<'a> OpReader<'a> {
    /// Checks the header and positions at the first op.
    pub fn new(buf: &'a [u8]) -> Result<Self, DecodeError> {
        let header = StreamHeader::from_bytes(buf)?;
        let dev_end = HEADER_LEN + header.device_count as usize;
        let end = dev_end + header.body_len as usize;
        if buf.len() < end {
            return Err(DecodeError::Truncated { offset: buf.len() });
        }
        Ok(OpReader {
            buf,
            pos: dev_end,
            end,
            left: header.op_count,
            header,
            devices: &buf[HEADER_LEN..dev_end],
        })
    }

    /// The stream's header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// The device-kind table (`DEVICE_*`), indexed by `Op::device`.
    pub fn devices(&self) -> &'a [u8] {
        self.devices
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        if self.pos >= self.end {
            return Err(DecodeError::Truncated { offset: self.pos });
        }
        let b = self.buf[self.pos];
        self.pos += 1;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let start = self.pos;
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && (b & 0x7e) != 0 {
                return Err(DecodeError::BadVarint { offset: start });
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::BadVarint { offset: start })
    }

    fn varint_u32(&mut self) -> Result<u32, DecodeError> {
        let start = self.pos;
        u32::try_from(self.varint()?).map_err(|_| DecodeError::BadVarint { offset: start })
    }

    fn read_op(&mut self) -> Result<Op, DecodeError> {
        let offset = self.pos;
        let tag = self.byte()?;
        let opcode = tag & TAG_OPC_MASK;
        if !(OPC_MAP..=OPC_SYNC_DEVICE).contains(&opcode) {
            return Err(DecodeError::BadOpcode { offset, opcode });
        }
        let mut op = Op {
            opcode,
            dir: (tag >> TAG_DIR_SHIFT) & 0x3,
            may_block: tag & TAG_MAY_BLOCK != 0,
            held: tag & TAG_HELD != 0,
            gap_ns: self.varint()?,
            handle: self.varint_u32()?,
            device: 0,
            size: 0,
        };
        if op.creates() {
            let dev = self.varint_u32()?;
            op.size = self.varint_u32()?;
            if dev >= u32::from(self.header.device_count) {
                return Err(DecodeError::OutOfRange { offset });
            }
            op.device = dev as u16;
        }
        if op.handle >= self.header.handle_count {
            return Err(DecodeError::OutOfRange { offset });
        }
        Ok(op)
    }
}

impl Iterator for OpReader<'_> {
    type Item = Result<Op, DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let r = self.read_op();
        if r.is_err() {
            self.left = 0;
        }
        Some(r)
    }
}

/// Builds an encoded stream (host side).
#[cfg(feature = "host")]
#[derive(Debug, Default, Clone)]
pub struct OpWriter {
    body: Vec<u8>,
    op_count: u32,
    handle_count: u32,
    held_count: u32,
    max_size: u32,
}

#[cfg(feature = "host")]
impl OpWriter {
    /// An empty stream.
    pub fn new() -> Self {
        Self::default()
    }

    fn varint(&mut self, mut v: u64) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                self.body.push(b);
                return;
            }
            self.body.push(b | 0x80);
        }
    }

    /// Appends one op.
    pub fn push(&mut self, op: &Op) {
        let mut tag = (op.opcode & TAG_OPC_MASK) | ((op.dir & 0x3) << TAG_DIR_SHIFT);
        if op.may_block {
            tag |= TAG_MAY_BLOCK;
        }
        if op.held {
            tag |= TAG_HELD;
            self.held_count += 1;
        }
        self.body.push(tag);
        self.varint(op.gap_ns);
        self.varint(u64::from(op.handle));
        if op.creates() {
            self.varint(u64::from(op.device));
            self.varint(u64::from(op.size));
            self.max_size = self.max_size.max(op.size);
        }
        self.handle_count = self.handle_count.max(op.handle + 1);
        self.op_count += 1;
    }

    /// The finished stream: header, device table, ops.
    pub fn finish(self, devices: &[u8]) -> Vec<u8> {
        let header = StreamHeader {
            magic: STREAM_MAGIC,
            version: STREAM_VERSION,
            device_count: devices.len() as u16,
            op_count: self.op_count,
            handle_count: self.handle_count,
            held_count: self.held_count,
            body_len: self.body.len() as u32,
            max_size: self.max_size,
            reserved: 0,
        };
        let mut out = Vec::with_capacity(HEADER_LEN + devices.len() + self.body.len());
        out.extend_from_slice(&header.to_bytes());
        out.extend_from_slice(devices);
        out.extend_from_slice(&self.body);
        out
    }
}

#[cfg(all(test, feature = "host"))]
mod tests {
    use super::*;

    fn op(opcode: u8, handle: u32, size: u32, gap_ns: u64) -> Op {
        Op {
            opcode,
            dir: DIR_FROM_DEVICE,
            may_block: handle.is_multiple_of(2),
            held: false,
            gap_ns,
            handle,
            device: if opcode == OPC_MAP || opcode == OPC_ALLOC {
                1
            } else {
                0
            },
            size: if opcode == OPC_MAP || opcode == OPC_ALLOC {
                size
            } else {
                0
            },
        }
    }

    #[test]
    fn round_trip_every_opcode() {
        let ops = [
            op(OPC_ALLOC, 0, 6726, 0),
            op(OPC_MAP, 1, 262_144, 1_234_567_890_123),
            op(OPC_SYNC_CPU, 1, 0, 5),
            op(OPC_SYNC_DEVICE, 1, 0, 0),
            op(OPC_UNMAP, 1, 0, u64::MAX),
            op(OPC_FREE, 0, 0, 1),
        ];
        let mut w = OpWriter::new();
        for o in &ops {
            w.push(o);
        }
        let bytes = w.finish(&[DEVICE_NET, DEVICE_BLK]);
        let r = OpReader::new(&bytes).unwrap();
        assert_eq!(r.devices(), &[DEVICE_NET, DEVICE_BLK]);
        assert_eq!(r.header().handle_count, 2);
        assert_eq!(r.header().max_size, 262_144);
        let back: Vec<Op> = r.map(|o| o.unwrap()).collect();
        assert_eq!(back, ops);
    }

    #[test]
    fn rejects_bad_input() {
        let mut w = OpWriter::new();
        w.push(&op(OPC_MAP, 0, 16, 0));
        let bytes = w.finish(&[DEVICE_BLK, DEVICE_NET]);
        assert!(matches!(
            OpReader::new(&bytes[..bytes.len() - 1]),
            Err(DecodeError::Truncated { .. })
        ));
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(OpReader::new(&bad), Err(DecodeError::BadMagic(_))));
        let mut bad = bytes.clone();
        bad[HEADER_LEN + 2] = 7; // tag byte: opcode 7
        let mut r = OpReader::new(&bad).unwrap();
        assert!(matches!(r.next(), Some(Err(DecodeError::BadOpcode { .. }))));
        assert!(r.next().is_none());
        let mut bad = bytes.clone();
        bad[12] = 0; // handle_count 0: handle 0 out of range
        let mut r = OpReader::new(&bad).unwrap();
        assert!(matches!(
            r.next(),
            Some(Err(DecodeError::OutOfRange { .. }))
        ));
    }
}
