//! The raw disk image ([`Disk`]): opening or creating it with errors a user can act on
//! ([`DiskError`]), and its data path, which moves bytes between an image offset and guest
//! buffers the caller has already checked ([`Disk::read_into`], [`Disk::write_from`]) and
//! flushes ([`Disk::flush`]), every failure returned as a [`TransferError`].
//!
//! Modules: `vectored` (the data path: preadv/pwritev between the file and guest memory),
//! `mapped` (the old mmap path, the baseline of `vmm bench io` only: the filesystem can SIGBUS
//! it), `error` (the data path's error), `failure_log` (rate-limited warnings and totals).
//!
//! What the data path guarantees, whatever the filesystem does:
//! - a request reaching past the image's size (its size at open, the device's capacity) is
//!   refused before a byte moves; a write never extends the file: if the file has been
//!   truncated below a write's end since the VMM opened it, the write is refused;
//! - a read that meets the end of the file early (image truncated while running) fails: the
//!   guest gets an error, never zeros in place of its data;
//! - ENOSPC (full filesystem), EROFS, EIO, EFAULT: the request fails, the VMM runs on;
//! - FLUSH is fdatasync, and its error is the request's error.
//!
//! Every failure is also logged, rate-limited ([`FailureLog`]).

mod error;
mod failure_log;
mod mapped;
mod vectored;

use std::fs::{File, OpenOptions};
use std::io::{self, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use vm_memory::VolatileSlice;

pub use error::TransferError;
pub use failure_log::FailureLog;
use mapped::MappedImage;

/// Bytes per sector.
pub const SECTOR_SIZE: u64 = 512;
/// Largest disk image accepted (1 TiB).
pub const MAX_DISK_BYTES: u64 = 1 << 40;
/// Smallest disk image accepted.
pub const MIN_DISK_BYTES: u64 = 4096;

/// Errors opening or creating the disk image, or starting the device; all the user's to fix.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The image does not exist and no size to create it was given.
    #[error("disk image {0} does not exist; give --disk-size SIZE to create it")]
    Missing(PathBuf),
    /// The path names a directory.
    #[error("disk image {0} is a directory, not a file")]
    IsDirectory(PathBuf),
    /// The image could not be opened or created.
    #[error("cannot open disk image {path}: {source}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// Sizing a new image failed.
    #[error("cannot size the new disk image {path} to {size} bytes: {source}")]
    Create {
        /// The image path.
        path: PathBuf,
        /// The size asked for.
        size: u64,
        /// What failed.
        source: io::Error,
    },
    /// A requested size out of bounds or not a sector multiple.
    #[error("--disk-size {0} is invalid: it must be a multiple of 512 bytes between 4K and 1T")]
    BadSize(u64),
    /// An existing image of an unusable size.
    #[error(
        "disk image {path} is {len} bytes: it must be a multiple of 512 bytes between 4K and 1T"
    )]
    BadImage {
        /// The image path.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// Bad queue parameters.
    #[error("invalid virtio queue setup: {0}")]
    Queue(String),
    /// The poller thread could not start.
    #[error("cannot start the block device thread: {0}")]
    Thread(io::Error),
}

/// How the device moves data between the image and guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskIo {
    /// preadv/pwritev: every failure is an error for that request (what `vmm run` uses).
    #[default]
    Vectored,
    /// The image mmap'd and memcpy: `vmm bench io`'s baseline only (SIGBUS on a full
    /// filesystem or a truncated image).
    Mapped,
}

/// The raw disk image.
pub struct Disk {
    file: File,
    path: PathBuf,
    len: u64,
    /// Only for [`DiskIo::Mapped`].
    map: Option<MappedImage>,
    log: Arc<FailureLog>,
}

impl Disk {
    /// Opens `path` read-write; creates it sparse with `create_size` bytes if it does not
    /// exist (an existing image keeps its size). Data moves by preadv/pwritev.
    pub fn open(path: &Path, create_size: Option<u64>) -> Result<Disk, DiskError> {
        Self::open_with(path, create_size, DiskIo::Vectored)
    }

    /// [`Disk::open`] with the data path `data_path` ([`DiskIo::Mapped`] for benchmarks only).
    pub fn open_with(
        path: &Path,
        create_size: Option<u64>,
        data_path: DiskIo,
    ) -> Result<Disk, DiskError> {
        if let Some(size) = create_size {
            if size % SECTOR_SIZE != 0 || !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&size) {
                return Err(DiskError::BadSize(size));
            }
        }
        if path.is_dir() {
            return Err(DiskError::IsDirectory(path.to_path_buf()));
        }
        let open_err = |source| DiskError::Open {
            path: path.to_path_buf(),
            source,
        };
        let (file, created) = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => (f, false),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                if create_size.is_none() {
                    return Err(DiskError::Missing(path.to_path_buf()));
                }
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(path)
                    .map_err(open_err)?;
                (f, true)
            }
            Err(e) => return Err(open_err(e)),
        };
        if created {
            let size = create_size.unwrap_or(MIN_DISK_BYTES);
            file.set_len(size).map_err(|source| DiskError::Create {
                path: path.to_path_buf(),
                size,
                source,
            })?;
        }
        let meta = file.metadata().map_err(open_err)?;
        if !meta.is_file() {
            return Err(open_err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let len = meta.len();
        if len % SECTOR_SIZE != 0 || !(MIN_DISK_BYTES..=MAX_DISK_BYTES).contains(&len) {
            return Err(DiskError::BadImage {
                path: path.to_path_buf(),
                len,
            });
        }
        let map = match data_path {
            DiskIo::Vectored => None,
            DiskIo::Mapped => Some(MappedImage::new(&file, len).map_err(open_err)?),
        };
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            len,
            map,
            log: Arc::new(FailureLog::new(path.display().to_string())),
        })
    }

    /// Writes the image's dirty pages to stable storage (msync first on the mapped path,
    /// then fdatasync).
    pub fn flush(&self) -> Result<(), TransferError> {
        let r = match &self.map {
            Some(m) => m.sync().and_then(|()| self.file.sync_data()),
            None => self.file.sync_data(),
        };
        r.map_err(|e| self.failed(TransferError::Flush(e)))
    }

    /// Size in bytes (the file's size when it was opened: the device's capacity).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the image is empty (never: the minimum is 4 KiB).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The image path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The data path in use.
    pub fn io(&self) -> DiskIo {
        if self.map.is_some() {
            DiskIo::Mapped
        } else {
            DiskIo::Vectored
        }
    }

    /// The failure log and its totals (shared: the device's statistics read it).
    pub fn failure_log(&self) -> Arc<FailureLog> {
        Arc::clone(&self.log)
    }

    /// Reads the image at `off` into `dst` (guest buffers the caller checked shared, filled
    /// in order); Ok(bytes read) = their total length. On an error the buffers may hold part
    /// of the data.
    pub fn read_into(&self, off: u64, dst: &[VolatileSlice<'_>]) -> Result<u64, TransferError> {
        self.in_range(off, dst)?;
        let r = match &self.map {
            Some(m) => m.copy(off, dst, true),
            None => vectored::read_at(&self.file, off, dst),
        };
        r.map_err(|e| self.failed(e))
    }

    /// Writes `src` (guest buffers the caller checked shared, in order) into the image at
    /// `off`; Ok(bytes written) = their total length. On an error part of the data may have
    /// reached the image.
    pub fn write_from(&self, off: u64, src: &[VolatileSlice<'_>]) -> Result<u64, TransferError> {
        let len = self.in_range(off, src)?;
        let r = match &self.map {
            Some(m) => m.copy(off, src, false),
            None => self
                .check_not_truncated(off, len)
                .and_then(|()| vectored::write_at(&self.file, off, src)),
        };
        r.map_err(|e| self.failed(e))
    }

    /// The request's length, if `off..off + len` lies inside the image.
    fn in_range(&self, off: u64, bufs: &[VolatileSlice<'_>]) -> Result<u64, TransferError> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if off.checked_add(len).is_none_or(|end| end > self.len) {
            return Err(self.failed(TransferError::OutOfRange {
                off,
                len,
                size: self.len,
            }));
        }
        Ok(len)
    }

    /// A write must not extend a file truncated since it was opened. One lseek(SEEK_END): it
    /// reads the size without fstat's timestamp query (which, with multigrain timestamps,
    /// makes the next write update the file's times at full cost); it moves only the file
    /// position, which preadv/pwritev never use. A truncation racing with the check can
    /// still let this one write land past the new end: the file grows back, sparse, never
    /// past the image's size at open.
    fn check_not_truncated(&self, off: u64, len: u64) -> Result<(), TransferError> {
        let now = (&self.file)
            .seek(io::SeekFrom::End(0))
            .map_err(TransferError::Size)?;
        if off + len > now {
            return Err(TransferError::Truncated { off, len, now });
        }
        Ok(())
    }

    /// Logs `e` (rate-limited) and hands it back.
    fn failed(&self, e: TransferError) -> TransferError {
        self.log.record(&e);
        e
    }
}

#[cfg(test)]
mod tests;
