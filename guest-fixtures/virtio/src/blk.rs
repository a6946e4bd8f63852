//! The virtio block driver: finding and initialising the device (feature negotiation, one
//! queue per caller-chosen index, rings in coherent DMA memory), and [`BlkQueue`], one queue's
//! requests. A request's header and status byte live in the queue's coherent memory (indexed
//! by the chain's head descriptor); its data buffer is private memory that is mapped through
//! the DMA pool before submission and unmapped at completion (so a disk read lands in the
//! bounce buffer and is copied to the private buffer by the unmap).

use core::fmt;
use core::ptr::{read_volatile, write_volatile};

use crate::mmio::{self, Regs};
use crate::ring::{self, RingError, Seg, SplitQueue, MAX_QUEUE};
use crate::{Dir, Dma, DmaError};

/// virtio device id of a block device.
pub const DEVICE_ID_BLOCK: u32 = 2;
/// Bytes per sector.
pub const SECTOR: u64 = 512;
/// Feature: FLUSH supported.
pub const F_FLUSH: u64 = 1 << 9;
/// Feature: num_queues valid.
pub const F_MQ: u64 = 1 << 12;
/// Feature: blk_size valid.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// Feature: seg_max valid.
pub const F_SEG_MAX: u64 = 1 << 2;
/// Feature: size_max valid.
pub const F_SIZE_MAX: u64 = 1 << 1;
/// Features the driver accepts when offered.
pub const DRIVER_FEATURES: u64 = mmio::F_VERSION_1
    | mmio::F_ACCESS_PLATFORM
    | mmio::F_EVENT_IDX
    | F_FLUSH
    | F_MQ
    | F_BLK_SIZE
    | F_SEG_MAX
    | F_SIZE_MAX;

/// Request type: read.
pub const T_IN: u32 = 0;
/// Request type: write.
pub const T_OUT: u32 = 1;
/// Request type: flush.
pub const T_FLUSH: u32 = 4;
/// Request type: id string.
pub const T_GET_ID: u32 = 8;
/// Status: OK.
pub const S_OK: u8 = 0;
/// Status: I/O error.
pub const S_IOERR: u8 = 1;
/// Status: unsupported.
pub const S_UNSUPP: u8 = 2;
/// Status byte value before the device writes it.
pub const S_PENDING: u8 = 0xff;

/// Bytes of coherent memory per queue beyond the rings: headers (16 per entry) + statuses.
const HDR_BYTES: usize = 16 * MAX_QUEUE;
const STATUS_BYTES: usize = MAX_QUEUE;

/// Errors of the block driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlkError {
    /// No virtio-mmio device answers (bad magic).
    NoDevice(u32),
    /// Not register layout version 2 (legacy devices are not supported).
    BadVersion(u32),
    /// Not a block device.
    NotBlock(u32),
    /// The device does not offer VIRTIO_F_VERSION_1 or refused our features.
    FeaturesRefused,
    /// Queue `n` does not exist or is unusable.
    NoQueue(u16),
    /// The device needs a reset (it found our rings unusable, or a guest bug).
    NeedsReset,
    /// A ring operation failed.
    Ring(RingError),
    /// The DMA pool failed.
    Dma(DmaError),
    /// Length not a multiple of 512, zero, or too large for one request.
    BadLength(u32),
}

impl fmt::Display for BlkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlkError::NoDevice(m) => write!(f, "no virtio-mmio device (magic {m:#x})"),
            BlkError::BadVersion(v) => write!(f, "virtio-mmio version {v} unsupported"),
            BlkError::NotBlock(id) => write!(f, "device id {id} is not a block device"),
            BlkError::FeaturesRefused => f.write_str("feature negotiation failed"),
            BlkError::NoQueue(q) => write!(f, "queue {q} unavailable"),
            BlkError::NeedsReset => f.write_str("device needs reset"),
            BlkError::Ring(e) => write!(f, "ring: {e}"),
            BlkError::Dma(e) => write!(f, "{e}"),
            BlkError::BadLength(n) => write!(f, "bad request length {n}"),
        }
    }
}

impl From<RingError> for BlkError {
    fn from(e: RingError) -> Self {
        BlkError::Ring(e)
    }
}

impl From<DmaError> for BlkError {
    fn from(e: DmaError) -> Self {
        BlkError::Dma(e)
    }
}

/// What initialisation found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkInfo {
    /// Disk size in sectors.
    pub capacity: u64,
    /// Queues the device offers.
    pub device_queues: u16,
    /// Features negotiated.
    pub features: u64,
}

/// A block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `len` bytes from `sector` into the buffer.
    Read,
    /// Write the buffer to `sector`.
    Write,
    /// Flush the disk's write cache.
    Flush,
    /// Read the device id string (up to 20 bytes) into the buffer.
    GetId,
}

impl Op {
    fn code(self) -> u32 {
        match self {
            Op::Read => T_IN,
            Op::Write => T_OUT,
            Op::Flush => T_FLUSH,
            Op::GetId => T_GET_ID,
        }
    }

    fn dir(self) -> Dir {
        match self {
            Op::Write => Dir::ToDevice,
            _ => Dir::FromDevice,
        }
    }
}

/// A request's data buffer mapped through the DMA pool by the driver and not yet submitted:
/// made by [`Mapping::new`] without the queue (so a map that waits for room can let
/// completions be reaped meanwhile), ended by [`BlkQueue::submit_mapping`] (then unmapped at
/// completion) or by [`Mapping::release`]. Only the driver maps and unmaps data buffers.
#[must_use = "a mapping must be submitted or released"]
#[derive(Debug, PartialEq, Eq)]
pub struct Mapping {
    op: Op,
    dev_addr: u64,
    len: u32,
}

impl Mapping {
    /// Map the data buffer `[buf, buf + len)` of an `op` request (nothing for a flush).
    ///
    /// # Safety
    /// `[buf, buf + len)` is memory the caller owns and leaves alone until the request's
    /// completion (or the [`Mapping::release`]).
    pub unsafe fn new(dma: &dyn Dma, op: Op, buf: u64, len: u32) -> Result<Self, BlkError> {
        BlkQueue::check_len(op, len)?;
        let dev_addr = if len > 0 {
            // SAFETY: forwarded from the caller.
            unsafe { dma.map(buf, len as usize, op.dir())? }
        } else {
            0
        };
        Ok(Mapping { op, dev_addr, len })
    }

    /// End the mapping without submitting it.
    pub fn release(self, dma: &dyn Dma) -> Result<(), DmaError> {
        if self.len == 0 {
            return Ok(());
        }
        dma.unmap(self.dev_addr, self.len as usize, self.op.dir())
    }
}

/// A completed request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// The caller's cookie.
    pub cookie: u64,
    /// The device's status byte (`S_*`, or `S_PENDING` if it wrote none).
    pub status: u8,
    /// Bytes the device says it wrote.
    pub used_len: u32,
    /// The unmap failed (the data of a read may not have reached the buffer).
    pub unmap_failed: bool,
}

impl Completion {
    /// Whether the request succeeded end to end.
    pub fn ok(&self) -> bool {
        self.status == S_OK && !self.unmap_failed
    }
}

#[derive(Clone, Copy)]
struct Slot {
    cookie: u64,
    dma: u64,
    len: u32,
    dir: Dir,
    mapped: bool,
}

const EMPTY_SLOT: Slot = Slot {
    cookie: 0,
    dma: 0,
    len: 0,
    dir: Dir::ToDevice,
    mapped: false,
};

/// One request queue of the device, used by one vCPU.
pub struct BlkQueue {
    ring: SplitQueue,
    index: u16,
    mem: u64,
    mem_len: usize,
    hdrs: u64,
    status: u64,
    slots: [Slot; MAX_QUEUE],
    /// QueueNotify writes (exits) so far.
    pub notifies: u64,
    /// Requests submitted so far.
    pub submitted: u64,
    /// Requests completed so far.
    pub completed: u64,
}

impl Default for BlkQueue {
    fn default() -> Self {
        Self::empty()
    }
}

impl BlkQueue {
    /// An unset queue.
    pub const fn empty() -> Self {
        BlkQueue {
            ring: SplitQueue::empty(),
            index: 0,
            mem: 0,
            mem_len: 0,
            hdrs: 0,
            status: 0,
            slots: [EMPTY_SLOT; MAX_QUEUE],
            notifies: 0,
            submitted: 0,
            completed: 0,
        }
    }

    /// Whether the queue was set up.
    pub fn is_ready(&self) -> bool {
        self.mem != 0
    }

    /// The device queue index.
    pub fn index(&self) -> u16 {
        self.index
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u16 {
        self.ring.in_flight()
    }

    /// Most requests that can be in flight at once (3 descriptors each).
    pub fn capacity(&self) -> u16 {
        self.ring.size() / 3
    }

    /// Submit a request whose data buffer `[buf, buf + len)` is private memory: it is mapped
    /// through `dma` first (the device sees only the bounce buffer). `len` is a multiple of
    /// 512 for reads and writes (0 for a flush). Nothing is submitted on error.
    ///
    /// # Safety
    /// `[buf, buf + len)` is memory the caller owns and leaves alone until the completion.
    pub unsafe fn submit(
        &mut self,
        dma: &dyn Dma,
        op: Op,
        sector: u64,
        buf: u64,
        len: u32,
        cookie: u64,
    ) -> Result<(), BlkError> {
        Self::check_len(op, len)?;
        if self.ring.num_free() < 3 {
            return Err(BlkError::Ring(RingError::Full));
        }
        // SAFETY: forwarded from the caller.
        let m = unsafe { Mapping::new(dma, op, buf, len)? };
        self.submit_mapping(dma, sector, m, cookie)
    }

    /// Submit the request `m` was mapped for (see [`Mapping::new`]); [`BlkQueue::poll`]
    /// unmaps its buffer at completion. On error nothing is submitted and the buffer is
    /// unmapped here: either way the mapping ends in the driver.
    pub fn submit_mapping(
        &mut self,
        dma: &dyn Dma,
        sector: u64,
        m: Mapping,
        cookie: u64,
    ) -> Result<(), BlkError> {
        let r = self.push(m.op, sector, m.dev_addr, m.len, cookie, m.len > 0);
        if r.is_err() {
            let _ = m.release(dma);
        }
        r
    }

    /// Submit a request whose data buffer is handed to the device as is, not bounced: only
    /// right for memory that is already shared. (A broken driver handing it private memory
    /// is what the `io` fixture's `broken=private-buffer` mode simulates.)
    pub fn submit_direct(
        &mut self,
        op: Op,
        sector: u64,
        dev_addr: u64,
        len: u32,
        cookie: u64,
    ) -> Result<(), BlkError> {
        Self::check_len(op, len)?;
        self.push(op, sector, dev_addr, len, cookie, false)
    }

    fn check_len(op: Op, len: u32) -> Result<(), BlkError> {
        let ok = match op {
            Op::Read | Op::Write => len > 0 && (len as u64).is_multiple_of(SECTOR),
            Op::Flush => len == 0,
            Op::GetId => len > 0,
        };
        if ok {
            Ok(())
        } else {
            Err(BlkError::BadLength(len))
        }
    }

    fn push(
        &mut self,
        op: Op,
        sector: u64,
        dev_addr: u64,
        len: u32,
        cookie: u64,
        mapped: bool,
    ) -> Result<(), BlkError> {
        let head = self
            .ring
            .next_head()
            .ok_or(BlkError::Ring(RingError::Full))?;
        let hdr = self.hdrs + head as u64 * 16;
        let st = self.status + head as u64;
        // SAFETY: header and status slots of entry `head` lie in the queue's coherent memory.
        unsafe {
            write_volatile(hdr as *mut u32, op.code());
            write_volatile((hdr + 4) as *mut u32, 0);
            write_volatile((hdr + 8) as *mut u64, sector);
            write_volatile(st as *mut u8, S_PENDING);
        }
        let dir = op.dir();
        let header = Seg {
            addr: hdr,
            len: 16,
            write: false,
        };
        let status = Seg {
            addr: st,
            len: 1,
            write: true,
        };
        let data = Seg {
            addr: dev_addr,
            len,
            write: dir == Dir::FromDevice,
        };
        let got = if len == 0 {
            self.ring.add(&[header, status])?
        } else {
            self.ring.add(&[header, data, status])?
        };
        debug_assert_eq!(got, head);
        self.slots[head as usize] = Slot {
            cookie,
            dma: dev_addr,
            len,
            dir,
            mapped,
        };
        self.submitted += 1;
        Ok(())
    }

    /// Ring the doorbell if the device asked for it (it is going to sleep); returns whether it
    /// rang (one MMIO exit).
    pub fn kick(&mut self, regs: &dyn Regs) -> bool {
        if self.ring.should_notify() {
            regs.write32(mmio::QUEUE_NOTIFY, self.index as u32);
            self.notifies += 1;
            true
        } else {
            false
        }
    }

    /// Whether a completion is waiting to be polled (no unmap, one read).
    pub fn completion_pending(&self) -> bool {
        self.ring.used_pending()
    }

    /// The shared word that changes when the device completes a request on this queue (for
    /// a waiter that halts: see the VMM's `hlt` wait).
    pub fn completion_word(&self) -> u64 {
        self.ring.used_word()
    }

    /// The next completed request, its data buffer unmapped (for reads: copied back).
    pub fn poll(&mut self, dma: &dyn Dma) -> Result<Option<Completion>, BlkError> {
        let Some((head, used_len)) = self.ring.pop_used()? else {
            return Ok(None);
        };
        let slot = self.slots[head as usize];
        self.slots[head as usize] = EMPTY_SLOT;
        // SAFETY: the status slot of entry `head`.
        let status = unsafe { read_volatile((self.status + head as u64) as *const u8) };
        let mut unmap_failed = false;
        if slot.mapped {
            unmap_failed = dma.unmap(slot.dma, slot.len as usize, slot.dir).is_err();
        }
        self.completed += 1;
        Ok(Some(Completion {
            cookie: slot.cookie,
            status,
            used_len,
            unmap_failed,
        }))
    }
}

fn read64(regs: &dyn Regs, off: usize) -> u64 {
    regs.read32(off) as u64 | (regs.read32(off + 4) as u64) << 32
}

/// Bytes of coherent memory a queue of `size` entries needs.
pub const fn queue_mem_bytes(size: u16) -> usize {
    (ring::layout(size).3.next_multiple_of(4096) + HDR_BYTES + STATUS_BYTES).next_multiple_of(4096)
}

/// Reset and initialise the block device at `regs`, setting up `queues.len()` queues (each
/// vCPU its own; at most what the device offers), rings from `dma`'s coherent memory. On
/// error the device is left failed. (The same as [`negotiate`], [`setup_queue`] for each
/// queue, then [`driver_ok`].)
pub fn init(
    regs: &dyn Regs,
    dma: &dyn Dma,
    queues: &mut [&mut BlkQueue],
) -> Result<BlkInfo, BlkError> {
    let info = negotiate(regs)?;
    for (i, q) in queues.iter_mut().enumerate() {
        setup_queue(regs, dma, &info, i as u16, q)?;
    }
    driver_ok(regs)?;
    Ok(info)
}

fn fail(regs: &dyn Regs, e: BlkError) -> BlkError {
    regs.write32(mmio::STATUS, regs.read32(mmio::STATUS) | mmio::S_FAILED);
    e
}

/// Identify the device, reset it and negotiate features (status ACKNOWLEDGE | DRIVER |
/// FEATURES_OK); reads the configuration.
pub fn negotiate(regs: &dyn Regs) -> Result<BlkInfo, BlkError> {
    let magic = regs.read32(mmio::MAGIC);
    if magic != mmio::MAGIC_VALUE {
        return Err(BlkError::NoDevice(magic));
    }
    let version = regs.read32(mmio::VERSION);
    if version != 2 {
        return Err(BlkError::BadVersion(version));
    }
    let id = regs.read32(mmio::DEVICE_ID);
    if id != DEVICE_ID_BLOCK {
        return Err(BlkError::NotBlock(id));
    }
    regs.write32(mmio::STATUS, 0);
    let mut status = mmio::S_ACKNOWLEDGE;
    regs.write32(mmio::STATUS, status);
    status |= mmio::S_DRIVER;
    regs.write32(mmio::STATUS, status);
    regs.write32(mmio::DEVICE_FEATURES_SEL, 0);
    let lo = regs.read32(mmio::DEVICE_FEATURES) as u64;
    regs.write32(mmio::DEVICE_FEATURES_SEL, 1);
    let hi = regs.read32(mmio::DEVICE_FEATURES) as u64;
    let features = (lo | hi << 32) & DRIVER_FEATURES;
    if features & mmio::F_VERSION_1 == 0 {
        return Err(fail(regs, BlkError::FeaturesRefused));
    }
    regs.write32(mmio::DRIVER_FEATURES_SEL, 0);
    regs.write32(mmio::DRIVER_FEATURES, features as u32);
    regs.write32(mmio::DRIVER_FEATURES_SEL, 1);
    regs.write32(mmio::DRIVER_FEATURES, (features >> 32) as u32);
    status |= mmio::S_FEATURES_OK;
    regs.write32(mmio::STATUS, status);
    if regs.read32(mmio::STATUS) & mmio::S_FEATURES_OK == 0 {
        return Err(fail(regs, BlkError::FeaturesRefused));
    }
    let capacity = read64(regs, mmio::CONFIG);
    let device_queues = if features & F_MQ != 0 {
        (regs.read32(mmio::CONFIG + 32) >> 16) as u16
    } else {
        1
    }
    .max(1);
    Ok(BlkInfo {
        capacity,
        device_queues,
        features,
    })
}

/// Set up device queue `index` in `q` (after [`negotiate`], before [`driver_ok`]).
pub fn setup_queue(
    regs: &dyn Regs,
    dma: &dyn Dma,
    info: &BlkInfo,
    index: u16,
    q: &mut BlkQueue,
) -> Result<(), BlkError> {
    if index >= info.device_queues {
        return Err(fail(regs, BlkError::NoQueue(index)));
    }
    regs.write32(mmio::QUEUE_SEL, index as u32);
    let max = regs.read32(mmio::QUEUE_NUM_MAX);
    if max == 0 {
        return Err(fail(regs, BlkError::NoQueue(index)));
    }
    // The largest power of two <= min(max, MAX_QUEUE).
    let cap = max.min(MAX_QUEUE as u32);
    let size = 1u16 << (31 - cap.leading_zeros());
    let bytes = queue_mem_bytes(size);
    let mem = dma
        .alloc_coherent(bytes)
        .map_err(|e| fail(regs, e.into()))?;
    let event_idx = info.features & mmio::F_EVENT_IDX != 0;
    // SAFETY: fresh zeroed coherent memory of `bytes` >= the ring layout, ours alone.
    if let Err(e) = unsafe { q.ring.init(size, mem, event_idx) } {
        let _ = dma.free_coherent(mem, bytes);
        return Err(fail(regs, e.into()));
    }
    q.index = index;
    q.mem = mem;
    q.mem_len = bytes;
    q.hdrs = mem + ring::layout(size).3.next_multiple_of(4096) as u64;
    q.status = q.hdrs + HDR_BYTES as u64;
    let (d, a, u) = q.ring.addresses();
    regs.write32(mmio::QUEUE_NUM, size as u32);
    regs.write32(mmio::QUEUE_DESC_LOW, d as u32);
    regs.write32(mmio::QUEUE_DESC_HIGH, (d >> 32) as u32);
    regs.write32(mmio::QUEUE_DRIVER_LOW, a as u32);
    regs.write32(mmio::QUEUE_DRIVER_HIGH, (a >> 32) as u32);
    regs.write32(mmio::QUEUE_DEVICE_LOW, u as u32);
    regs.write32(mmio::QUEUE_DEVICE_HIGH, (u >> 32) as u32);
    regs.write32(mmio::QUEUE_READY, 1);
    Ok(())
}

/// Set DRIVER_OK: the device starts serving the queues.
pub fn driver_ok(regs: &dyn Regs) -> Result<(), BlkError> {
    let status = regs.read32(mmio::STATUS) | mmio::S_DRIVER_OK;
    regs.write32(mmio::STATUS, status);
    let now = regs.read32(mmio::STATUS);
    if now & mmio::S_NEEDS_RESET != 0 || now & mmio::S_DRIVER_OK == 0 {
        return Err(fail(regs, BlkError::NeedsReset));
    }
    Ok(())
}

/// Whether the device reports it needs a reset (one MMIO exit).
pub fn needs_reset(regs: &dyn Regs) -> bool {
    regs.read32(mmio::STATUS) & (mmio::S_NEEDS_RESET | mmio::S_FAILED) != 0
}

#[cfg(test)]
mod tests;
