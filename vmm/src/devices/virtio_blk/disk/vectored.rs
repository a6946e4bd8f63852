//! The data path: preadv/pwritev straight between the image file and guest memory
//! [`VolatileSlice`]s, one copy (the kernel's, between the page cache and the guest buffers)
//! and every failure returned as a [`TransferError`], never a signal.
//!
//! A request's buffers go to the kernel as one iovec array (built on the stack, in batches of
//! [`IOV_BATCH`]), at an explicit offset (no lseek, no shared file position, so no lock on the
//! file). Partial transfers continue where they stopped; EINTR is retried. A read that meets
//! the end of the file early is a [`TransferError::ShortRead`]; a write that makes no progress
//! is a [`TransferError::WriteZero`].

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::VolatileSlice;

use super::error::TransferError;

/// Most iovecs handed to one preadv/pwritev (a request has at most a queue's worth of
/// descriptors; the device advertises 64 data segments).
pub const IOV_BATCH: usize = 64;

/// Which way the bytes go.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dir {
    /// Image -> guest.
    Read,
    /// Guest -> image.
    Write,
}

/// Reads the image at `off` into `bufs`, in order; Ok(bytes) = their total length.
pub fn read_at(file: &File, off: u64, bufs: &[VolatileSlice<'_>]) -> Result<u64, TransferError> {
    transfer(file, off, bufs, Dir::Read)
}

/// Writes `bufs`, in order, into the image at `off`; Ok(bytes) = their total length.
pub fn write_at(file: &File, off: u64, bufs: &[VolatileSlice<'_>]) -> Result<u64, TransferError> {
    transfer(file, off, bufs, Dir::Write)
}

fn transfer(
    file: &File,
    off: u64,
    bufs: &[VolatileSlice<'_>],
    dir: Dir,
) -> Result<u64, TransferError> {
    let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
    let fd = file.as_raw_fd();
    let mut done = 0u64;
    // Position: buffer `idx`, `skip` bytes into it.
    let (mut idx, mut skip) = (0usize, 0usize);
    while done < total {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; IOV_BATCH];
        let mut n = 0;
        let (mut j, mut s) = (idx, skip);
        while j < bufs.len() && n < IOV_BATCH {
            let b = &bufs[j];
            if b.len() > s {
                iov[n] = libc::iovec {
                    // The guest memory is a plain mmap (vm-memory without its xen feature): the
                    // guard holds nothing, the pointer stays valid while `bufs` is borrowed.
                    iov_base: b.ptr_guard_mut().as_ptr().wrapping_add(s).cast(),
                    iov_len: b.len() - s,
                };
                n += 1;
            }
            j += 1;
            s = 0;
        }
        let pos = off + done;
        let file_off = libc::off_t::try_from(pos).map_err(|_| TransferError::OutOfRange {
            off,
            len: total,
            size: pos,
        })?;
        // SAFETY: `iov[..n]` describes guest-memory ranges inside `bufs` (each a live mapping
        // of its length, borrowed for this call); the kernel reads or writes only those bytes
        // and reports a range it cannot access as EFAULT (an error, not a signal). The guest
        // may touch the same bytes concurrently, which only affects the data.
        let r = unsafe {
            match dir {
                Dir::Read => libc::preadv(fd, iov.as_ptr(), n as libc::c_int, file_off),
                Dir::Write => libc::pwritev(fd, iov.as_ptr(), n as libc::c_int, file_off),
            }
        };
        if r < 0 {
            let source = io::Error::last_os_error();
            if source.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(match dir {
                Dir::Read => TransferError::Read {
                    off,
                    len: total,
                    source,
                },
                Dir::Write => TransferError::Write {
                    off,
                    len: total,
                    source,
                },
            });
        }
        if r == 0 {
            return Err(match dir {
                Dir::Read => TransferError::ShortRead {
                    off,
                    len: total,
                    got: done,
                },
                Dir::Write => TransferError::WriteZero {
                    off,
                    len: total,
                    done,
                },
            });
        }
        let mut left = r as usize;
        done += left as u64;
        while left > 0 && idx < bufs.len() {
            let avail = bufs[idx].len() - skip;
            if left >= avail {
                left -= avail;
                idx += 1;
                skip = 0;
            } else {
                skip += left;
                left = 0;
            }
        }
    }
    Ok(done)
}
