//! Decoding and encoding the untrusted per-vCPU mailbox page.
//!
//! The guest owns the page and may change it at any time, so the host copies the whole page
//! out once with volatile reads ([`Snapshot::read`]), decodes and validates only that copy
//! (no double fetch), and writes back just the status fields and `cur_entry` with volatile
//! writes. Nothing here can panic on any byte pattern.

use std::mem::{offset_of, size_of};

use crate::abi::{
    self, MailboxEntry, MailboxHeader, PoolReport, MAILBOX_ENTRIES_OFFSET, MAILBOX_MAGIC,
    MAILBOX_MAX_ENTRIES, PAGE_SIZE, POLICY_NAME_MAX, POOL_REPORT_VERSION,
};

use crate::status::ConversionError;

const PAGE: usize = PAGE_SIZE as usize;

/// A decoded request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Process entries `cur..end` as conversions.
    Convert {
        /// First entry.
        cur: u32,
        /// One past the last.
        end: u32,
    },
    /// Process entries `cur..end` as accepts.
    Accept {
        /// First entry.
        cur: u32,
        /// One past the last.
        end: u32,
    },
    /// End the VM.
    Exit(u64),
    /// A pool report.
    Report(PoolReport),
}

/// Why a mailbox was rejected whole (all map to `ERR_BAD_REQUEST`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MailboxError {
    /// Wrong magic.
    #[error("bad mailbox magic {0:#x}")]
    Magic(u32),
    /// Unknown op.
    #[error("unknown mailbox op {0}")]
    Op(u32),
    /// cur/end out of bounds.
    #[error("bad entry range cur={cur} end={end}")]
    Range {
        /// cur_entry.
        cur: u32,
        /// end_entry.
        end: u32,
    },
    /// Report length or version wrong.
    #[error("bad pool report (len {len}, version {version})")]
    Report {
        /// Claimed payload length.
        len: u64,
        /// Claimed version.
        version: u32,
    },
}

impl MailboxError {
    /// The status to report: every malformed mailbox is a bad request.
    pub fn error(&self) -> ConversionError {
        ConversionError::BadRequest
    }
}

/// A private copy of one mailbox page.
pub struct Snapshot {
    page: [u64; PAGE / 8],
}

impl Snapshot {
    /// Copy the page at `ptr` (4 KiB aligned, mapped, readable) with volatile reads.
    ///
    /// # Safety
    /// `ptr` must point to 4096 readable bytes, 8-byte aligned, that stay mapped for the call.
    pub unsafe fn read(ptr: *const u8) -> Snapshot {
        let mut page = [0u64; PAGE / 8];
        let p = ptr as *const u64;
        for (i, w) in page.iter_mut().enumerate() {
            // SAFETY: within the 4096 bytes the caller guarantees; aligned.
            *w = unsafe { std::ptr::read_volatile(p.add(i)) };
        }
        Snapshot { page }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `page` is 4096 initialized bytes; u8 has no alignment or validity needs.
        unsafe { std::slice::from_raw_parts(self.page.as_ptr() as *const u8, PAGE) }
    }

    fn read_at<T: Copy + Default>(&self, off: usize) -> T {
        let b = self.bytes();
        if off.checked_add(size_of::<T>()).is_none_or(|e| e > b.len()) {
            return T::default();
        }
        // SAFETY: bounds checked; T is only instantiated with plain-integer repr(C) structs for
        // which every bit pattern is valid; read_unaligned has no alignment requirement.
        unsafe { std::ptr::read_unaligned(b.as_ptr().add(off) as *const T) }
    }

    /// The header.
    pub fn header(&self) -> MailboxHeader {
        self.read_at(0)
    }

    /// Entry `i` (zeroed if out of the page).
    pub fn entry(&self, i: u32) -> MailboxEntry {
        let off = MAILBOX_ENTRIES_OFFSET + i as usize * size_of::<MailboxEntry>();
        self.read_at(off)
    }

    /// Decode and validate the request.
    pub fn decode(&self) -> Result<Request, MailboxError> {
        let h = self.header();
        if h.magic != MAILBOX_MAGIC {
            return Err(MailboxError::Magic(h.magic));
        }
        let range = || {
            if h.end_entry as usize > MAILBOX_MAX_ENTRIES || h.cur_entry > h.end_entry {
                Err(MailboxError::Range {
                    cur: h.cur_entry,
                    end: h.end_entry,
                })
            } else {
                Ok((h.cur_entry, h.end_entry))
            }
        };
        match h.op {
            abi::OP_CONVERT => range().map(|(cur, end)| Request::Convert { cur, end }),
            abi::OP_ACCEPT => range().map(|(cur, end)| Request::Accept { cur, end }),
            abi::OP_EXIT => Ok(Request::Exit(h.arg)),
            abi::OP_REPORT => {
                let r: PoolReport = self.read_at(MAILBOX_ENTRIES_OFFSET);
                if h.arg != size_of::<PoolReport>() as u64
                    || r.version != POOL_REPORT_VERSION
                    || r.policy_len as usize > POLICY_NAME_MAX
                {
                    return Err(MailboxError::Report {
                        len: h.arg,
                        version: r.version,
                    });
                }
                Ok(Request::Report(r))
            }
            op => Err(MailboxError::Op(op)),
        }
    }
}

/// Write `v` at byte `off` of the page at `ptr` (volatile).
///
/// # Safety
/// `ptr` must point to a writable, mapped 4096-byte page, 4-byte aligned.
unsafe fn write_u32(ptr: *mut u8, off: usize, v: u32) {
    if !off.is_multiple_of(4) || off + 4 > PAGE {
        return;
    }
    // SAFETY: in bounds and aligned (checked), page writable per the caller.
    unsafe { std::ptr::write_volatile(ptr.add(off) as *mut u32, v) };
}

/// Write entry `i`'s status.
///
/// # Safety
/// `ptr` must point to a writable, mapped 4096-byte page, 4-byte aligned.
pub unsafe fn write_entry_status(ptr: *mut u8, i: u32, status: u32) {
    let off = MAILBOX_ENTRIES_OFFSET
        + i as usize * size_of::<MailboxEntry>()
        + offset_of!(MailboxEntry, status);
    // SAFETY: per the caller; write_u32 bounds-checks.
    unsafe { write_u32(ptr, off, status) };
}

/// Write the header's `cur_entry` (if given) and `status`.
///
/// # Safety
/// `ptr` must point to a writable, mapped 4096-byte page, 4-byte aligned.
pub unsafe fn write_header(ptr: *mut u8, cur: Option<u32>, status: u32) {
    // SAFETY: per the caller.
    unsafe {
        if let Some(c) = cur {
            write_u32(ptr, offset_of!(MailboxHeader, cur_entry), c);
        }
        write_u32(ptr, offset_of!(MailboxHeader, status), status);
    }
}
