//! What can go wrong moving data between the image and guest memory, or flushing it
//! ([`TransferError`]). Every one of them completes that request with VIRTIO_BLK_S_IOERR and is
//! counted as `disk.io_errors`; none of them stops the device or the VMM.

use std::io;

/// A failed read, write or flush of the disk image.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The request reaches past the image's size (its size when the VMM opened it): refused
    /// before any byte moves, the file is never extended.
    #[error("{len} bytes at {off:#x} reach past the image's {size} bytes")]
    OutOfRange {
        /// Image offset of the request.
        off: u64,
        /// Its length in bytes.
        len: u64,
        /// The image's size.
        size: u64,
    },
    /// The file is now shorter than the write's end (truncated while the VM runs): the write
    /// is refused rather than extending the file again.
    #[error("write of {len} bytes at {off:#x}: the image was truncated to {now} bytes")]
    Truncated {
        /// Image offset of the write.
        off: u64,
        /// Its length in bytes.
        len: u64,
        /// The file's size now.
        now: u64,
    },
    /// A read hit the end of the file before the request's end (the image was truncated while
    /// the VM runs): an error, not zeros, so the guest never takes lost data for real zeros.
    #[error(
        "read of {len} bytes at {off:#x} ended after {got} bytes: the image is shorter than it was"
    )]
    ShortRead {
        /// Image offset of the read.
        off: u64,
        /// Its length in bytes.
        len: u64,
        /// Bytes read before the end of the file.
        got: u64,
    },
    /// The kernel wrote nothing and reported no error.
    #[error("write of {len} bytes at {off:#x} stopped after {done} bytes: nothing more written")]
    WriteZero {
        /// Image offset of the write.
        off: u64,
        /// Its length in bytes.
        len: u64,
        /// Bytes written before it stopped.
        done: u64,
    },
    /// The read system call failed (I/O error, a guest buffer the kernel could not fill, ...).
    #[error("read of {len} bytes at {off:#x} failed: {source}")]
    Read {
        /// Image offset of the read.
        off: u64,
        /// Its length in bytes.
        len: u64,
        /// What the kernel said.
        source: io::Error,
    },
    /// The write system call failed (ENOSPC on a full filesystem, EROFS, EIO, ...).
    #[error("write of {len} bytes at {off:#x} failed: {source}")]
    Write {
        /// Image offset of the write.
        off: u64,
        /// Its length in bytes.
        len: u64,
        /// What the kernel said.
        source: io::Error,
    },
    /// Reading the image's current size failed before a write.
    #[error("cannot check the image's size: {0}")]
    Size(io::Error),
    /// fdatasync (and msync on the mapped path) failed: earlier writes may be lost.
    #[error("flush failed: {0}")]
    Flush(io::Error),
}
