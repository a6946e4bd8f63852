//! The raw disk image ([`Disk`]): opening or creating it with errors a user can act on, and
//! its data path, which moves bytes between an image offset and a guest buffer the caller has
//! already checked ([`Disk::read_into`], [`Disk::write_from`]) and flushes.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use vm_memory::VolatileSlice;

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

/// The raw disk image.
pub struct Disk {
    file: File,
    path: PathBuf,
    len: u64,
    /// The whole image mapped MAP_SHARED: data moves with one user-space memcpy between it and
    /// guest memory instead of a pread/pwrite per segment (measured ~1.4x faster for 64 KiB
    /// reads here). The VMM owns the image while it runs: shrinking it from outside would
    /// fault the device thread, as it would corrupt any VMM's disk.
    map: *mut u8,
}

// SAFETY: `map` is a process-wide shared mapping owned by the Disk; concurrent access only
// races on data bytes (as a real disk's DMA would), never on memory safety.
unsafe impl Send for Disk {}
// SAFETY: see `Send`.
unsafe impl Sync for Disk {}

impl Drop for Disk {
    fn drop(&mut self) {
        // SAFETY: `map` is our mapping of `len` bytes, unmapped exactly once.
        unsafe { libc::munmap(self.map.cast(), self.len as usize) };
    }
}

impl Disk {
    /// Opens `path` read-write; creates it sparse with `create_size` bytes if it does not
    /// exist (an existing image keeps its size).
    pub fn open(path: &Path, create_size: Option<u64>) -> Result<Disk, DiskError> {
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
        // SAFETY: a fresh shared mapping of the whole file; the kernel picks the address.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(open_err(io::Error::last_os_error()));
        }
        Ok(Disk {
            file,
            path: path.to_path_buf(),
            len,
            map: map.cast(),
        })
    }

    /// Writes the image's dirty pages to stable storage.
    pub fn flush(&self) -> io::Result<()> {
        // SAFETY: `map` is our live mapping of `len` bytes.
        if unsafe { libc::msync(self.map.cast(), self.len as usize, libc::MS_SYNC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        self.file.sync_data()
    }

    /// Size in bytes.
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

    /// Copies between the image at `off` and `guest` (a guest buffer the caller checked
    /// shared), into the guest if `to_guest`.
    fn copy(&self, off: u64, guest: &VolatileSlice<'_>, to_guest: bool) -> io::Result<()> {
        let len = guest.len();
        if len == 0 {
            return Ok(());
        }
        let inside = off
            .checked_add(len as u64)
            .is_some_and(|end| end <= self.len);
        if !inside {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        let guard = guest.ptr_guard_mut();
        // SAFETY: `off..off+len` lies inside the image mapping (checked above) and the guard
        // covers `len` bytes of one mapped range of guest memory; the two never overlap. The
        // guest may change its side concurrently, which only affects the data.
        unsafe {
            let image = self.map.add(off as usize);
            if to_guest {
                std::ptr::copy_nonoverlapping(image, guard.as_ptr(), len);
            } else {
                std::ptr::copy_nonoverlapping(guard.as_ptr(), image, len);
            }
        }
        Ok(())
    }

    /// Copies the image at `off` into `dst` (a guest buffer the caller checked shared).
    pub fn read_into(&self, off: u64, dst: &VolatileSlice<'_>) -> io::Result<()> {
        self.copy(off, dst, true)
    }

    /// Copies `src` (a guest buffer the caller checked shared) into the image at `off`.
    pub fn write_from(&self, off: u64, src: &VolatileSlice<'_>) -> io::Result<()> {
        self.copy(off, src, false)
    }
}
