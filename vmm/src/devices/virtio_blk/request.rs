//! Request execution: walking a descriptor chain (under the round's ring pin), pinning every
//! byte the request touches (header, data buffers, status byte) in one DMA-fence pin before
//! anything moves, executing IN, OUT, FLUSH and GET_ID against the disk inside that pin, and
//! writing the status byte before letting go.
//!
//! The device never panics on guest input. A request whose descriptors or buffers touch a
//! page that is not shared (or not RAM) is completed with VIRTIO_BLK_S_IOERR and counted as
//! a *violation* (no byte of it is transferred; if the status byte itself is not shared,
//! nothing is written and the used length is 0). A request whose pages a conversion holds
//! right now is not executed: [`Processed::Retry`] puts it back for a later round. One whose
//! shared-store pages are not allocated (an access would fault) fails with IOERR as an error.
//! Other bad requests (malformed chains, indirect descriptors, which are not offered,
//! out-of-range sectors, huge lengths, I/O errors) complete with IOERR (UNSUPP for unknown
//! types) and count as *errors*; those the image failed (a
//! [`TransferError`](super::disk::TransferError): full filesystem, truncated
//! image, flush error) count as *io_errors* too.

use std::sync::atomic::{fence, Ordering};

use memconv::{DmaPin, FenceError};
use smallvec::SmallVec;
use vm_memory::VolatileSlice;

use super::disk::{Disk, SECTOR_SIZE};
use super::guest::GuestAccess;
use super::stats::{bump, Counters};

/// Request type: read.
pub const VIRTIO_BLK_T_IN: u32 = 0;
/// Write.
pub const VIRTIO_BLK_T_OUT: u32 = 1;
/// Flush.
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
/// Device id string.
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
/// Status: done.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Status: failed.
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Status: request type not supported.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

/// The id string GET_ID returns (at most 20 bytes, NUL padded).
pub const BLK_ID: &[u8] = b"memconv-vmm-blk";
/// Bytes of a request header (type, reserved, sector).
pub const REQ_HEADER_LEN: u64 = 16;
/// Largest data transfer of one request (larger ones fail with IOERR).
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;

/// Why a request failed.
enum ReqFail {
    /// Touches memory that is not shared: IOERR + violation.
    Violation,
    /// The image failed the transfer or flush: IOERR + error + io_error.
    Io,
    /// Anything else: IOERR + error.
    Error,
}

/// What became of a request.
pub enum Processed {
    /// Completed (any status): the used length, bytes written into the chain.
    Done(u32),
    /// A conversion holds some of its pages: not executed, nothing counted; put it back.
    Retry,
}

/// One descriptor of a chain.
#[derive(Clone, Copy)]
pub struct Seg {
    addr: u64,
    len: u32,
    write: bool,
}

/// What executing requests needs: guest memory, the disk, the counters.
pub struct Requests<'a> {
    /// Guest memory.
    pub guest: &'a GuestAccess,
    /// The disk image.
    pub disk: &'a Disk,
    /// The device's counters.
    pub counters: &'a Counters,
}

impl Requests<'_> {
    /// Walks the chain at `head` into `segs`; Err on malformed chains.
    fn walk(&self, segs: &mut Vec<Seg>, desc_table: u64, size: u16, head: u16) -> Result<(), ()> {
        segs.clear();
        let mut idx = head;
        loop {
            if idx >= size || segs.len() >= usize::from(size) {
                return Err(());
            }
            // The whole descriptor table was checked shared for this round.
            let d = self.guest.descriptor(desc_table, idx).map_err(|_| ())?;
            if d.refers_to_indirect_table() {
                return Err(());
            }
            segs.push(Seg {
                addr: d.addr().0,
                len: d.len(),
                write: d.is_write_only(),
            });
            if !d.has_next() {
                return Ok(());
            }
            idx = d.next();
        }
    }

    /// Processes the request at `head` (`segs` is scratch space; the caller holds the ring
    /// pin): its used length, or `Retry` if a conversion holds its pages now.
    pub fn process(&self, segs: &mut Vec<Seg>, desc_table: u64, size: u16, head: u16) -> Processed {
        let walked = self.walk(segs, desc_table, size, head);
        // The status byte: the last descriptor, device-writable, at least one byte.
        let status_at = match segs.last() {
            Some(s) if s.write && s.len >= 1 && segs.len() >= 2 => Some(s.addr),
            _ => None,
        };
        let (result, pin) = match (walked, status_at) {
            (Ok(()), Some(_)) => match self.pin_request(segs) {
                Ok(pin) => (self.execute(segs), Some(pin)),
                Err(FenceError::Busy) => return Processed::Retry,
                Err(e @ FenceError::NotBacked { .. }) => {
                    // An access would fault: fail the request instead (never expected).
                    memconv::guest_warn!("virtio-blk: request refused: {e}");
                    (Err(ReqFail::Error), None)
                }
                Err(e) => {
                    tracing::debug!("virtio-blk: refused request: {e}");
                    (Err(ReqFail::Violation), None)
                }
            },
            _ => (Err(ReqFail::Error), None),
        };
        // The status byte is written under a pin: the request's, or its own.
        let status_pin = match (pin, status_at) {
            (Some(pin), _) => Some(pin),
            (None, Some(gpa)) => match self.guest.pin(&[(gpa, 1)]) {
                Ok(pin) => Some(pin),
                Err(FenceError::Busy) => return Processed::Retry,
                // Not shared: never written (the request is still counted, below).
                Err(_) => None,
            },
            (None, None) => None,
        };
        let (status, data_len) = match result {
            Ok((st, n)) => (st, n),
            Err(ReqFail::Violation) => {
                bump(&self.counters.violations, 1);
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(ReqFail::Error) => {
                bump(&self.counters.errors, 1);
                (VIRTIO_BLK_S_IOERR, 0)
            }
            Err(ReqFail::Io) => {
                bump(&self.counters.errors, 1);
                bump(&self.counters.io_errors, 1);
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        let (Some(status_gpa), Some(_pin)) = (status_at, status_pin) else {
            return Processed::Done(0);
        };
        if self.guest.write(status_gpa, &[status]).is_err() {
            return Processed::Done(0);
        }
        Processed::Done(data_len.saturating_add(1))
    }

    /// One pin over every byte a well-formed chain touches: the 16-byte header, the data
    /// segments and the status byte (`segs` has at least two entries).
    fn pin_request(&self, segs: &[Seg]) -> Result<DmaPin<'_>, FenceError> {
        let last = segs.len() - 1;
        let range = |(i, s): (usize, &Seg)| {
            let len = if i == 0 {
                REQ_HEADER_LEN.min(u64::from(s.len))
            } else if i == last {
                1
            } else {
                u64::from(s.len)
            };
            (s.addr, len)
        };
        let mut few = [(0u64, 0u64); 8];
        let many: Vec<(u64, u64)>;
        let ranges: &[(u64, u64)] = if segs.len() <= few.len() {
            for (slot, r) in few.iter_mut().zip(segs.iter().enumerate().map(range)) {
                *slot = r;
            }
            &few[..segs.len()]
        } else {
            many = segs.iter().enumerate().map(range).collect();
            &many
        };
        self.guest.pin(ranges)
    }

    /// Executes a well-formed chain whose bytes the caller pinned: Ok((status, bytes written
    /// to the guest)).
    fn execute(&self, segs: &[Seg]) -> Result<(u8, u32), ReqFail> {
        let (header, rest) = segs.split_first().ok_or(ReqFail::Error)?;
        let (_status, data) = rest.split_last().ok_or(ReqFail::Error)?;
        if header.write || u64::from(header.len) < REQ_HEADER_LEN {
            return Err(ReqFail::Error);
        }
        let mut hdr = [0u8; 16];
        self.guest
            .read(header.addr, &mut hdr)
            .map_err(|_| ReqFail::Error)?;
        let req_type = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let total: u64 = data.iter().map(|s| u64::from(s.len)).sum();
        match req_type {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let write_to_guest = req_type == VIRTIO_BLK_T_IN;
                if data.iter().any(|s| s.write != write_to_guest)
                    || !total.is_multiple_of(SECTOR_SIZE)
                    || total > MAX_REQUEST_BYTES
                {
                    return Err(ReqFail::Error);
                }
                let start = sector.checked_mul(SECTOR_SIZE).ok_or(ReqFail::Error)?;
                match start.checked_add(total) {
                    Some(end) if end <= self.disk.len() => {}
                    _ => return Err(ReqFail::Error),
                }
                self.transfer(data, start, write_to_guest)?;
                if write_to_guest {
                    bump(&self.counters.reads, 1);
                    bump(&self.counters.bytes_read, total);
                    Ok((VIRTIO_BLK_S_OK, total as u32))
                } else {
                    bump(&self.counters.writes, 1);
                    bump(&self.counters.bytes_written, total);
                    Ok((VIRTIO_BLK_S_OK, 0))
                }
            }
            VIRTIO_BLK_T_FLUSH => {
                // The disk logs its own failures (rate-limited).
                self.disk.flush().map_err(|_| ReqFail::Io)?;
                bump(&self.counters.flushes, 1);
                Ok((VIRTIO_BLK_S_OK, 0))
            }
            VIRTIO_BLK_T_GET_ID => {
                let Some(out) = data.first().filter(|s| s.write) else {
                    return Err(ReqFail::Error);
                };
                let mut id = [0u8; 20];
                id[..BLK_ID.len()].copy_from_slice(BLK_ID);
                let n = (out.len as usize).min(id.len());
                self.guest
                    .write(out.addr, &id[..n])
                    .map_err(|_| ReqFail::Error)?;
                bump(&self.counters.get_ids, 1);
                Ok((VIRTIO_BLK_S_OK, n as u32))
            }
            _ => {
                bump(&self.counters.unsupported, 1);
                Ok((VIRTIO_BLK_S_UNSUPP, 0))
            }
        }
    }

    /// Moves the request's data between the disk at `off` and guest memory (pinned by the
    /// caller), in one vectored call.
    fn transfer(&self, data: &[Seg], off: u64, to_guest: bool) -> Result<(), ReqFail> {
        let mut slices: SmallVec<[VolatileSlice<'_>; 8]> = SmallVec::new();
        for s in data.iter().filter(|s| s.len > 0) {
            let slice = self.guest.slice(s.addr, s.len as usize).map_err(|e| {
                tracing::debug!("virtio-blk: {e}");
                ReqFail::Error
            })?;
            slices.push(slice);
        }
        // The disk logs its own failures (rate-limited).
        let moved = if to_guest {
            self.disk.read_into(off, &slices)
        } else {
            self.disk.write_from(off, &slices)
        };
        moved.map_err(|_| ReqFail::Io)?;
        fence(Ordering::Release);
        Ok(())
    }
}
