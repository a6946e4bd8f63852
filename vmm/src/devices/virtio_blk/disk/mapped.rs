//! The old data path, kept ONLY as the baseline of `vmm bench io`: the whole image mapped
//! MAP_SHARED and one user-space memcpy between it and guest memory ([`MappedImage`]).
//!
//! It is not safe against the filesystem: a write into an unallocated block of a sparse image
//! on a full filesystem, or any access past the end of an image truncated while the VM runs,
//! raises SIGBUS and kills the VMM. `vmm run` never uses it.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use vm_memory::VolatileSlice;

use super::error::TransferError;

/// The image mapped whole, shared with the file.
pub struct MappedImage {
    map: *mut u8,
    len: u64,
}

// SAFETY: `map` is a process-wide shared mapping owned by this value; concurrent access only
// races on data bytes (as a real disk's DMA would), never on memory safety.
unsafe impl Send for MappedImage {}
// SAFETY: see `Send`.
unsafe impl Sync for MappedImage {}

impl Drop for MappedImage {
    fn drop(&mut self) {
        // SAFETY: `map` is our mapping of `len` bytes, unmapped exactly once.
        unsafe { libc::munmap(self.map.cast(), self.len as usize) };
    }
}

impl MappedImage {
    /// Maps the first `len` bytes of `file` (its size) read-write, shared.
    pub fn new(file: &File, len: u64) -> io::Result<Self> {
        let size =
            usize::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a fresh shared mapping of the file; the kernel picks the address.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MappedImage {
            map: map.cast(),
            len,
        })
    }

    /// Copies between the image at `off` and `bufs` (in order), into the guest if `to_guest`.
    /// The caller checked `off..off + total` lies inside the image.
    pub fn copy(
        &self,
        off: u64,
        bufs: &[VolatileSlice<'_>],
        to_guest: bool,
    ) -> Result<u64, TransferError> {
        let total: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if off.checked_add(total).is_none_or(|end| end > self.len) {
            return Err(TransferError::OutOfRange {
                off,
                len: total,
                size: self.len,
            });
        }
        let mut pos = off;
        for b in bufs {
            let len = b.len();
            let guard = b.ptr_guard_mut();
            // SAFETY: `pos..pos + len` lies inside the mapping (checked above for the whole
            // request) and the guard covers `len` bytes of mapped guest memory; the two never
            // overlap. The guest may change its side concurrently, which only affects the data.
            unsafe {
                let image = self.map.add(pos as usize);
                if to_guest {
                    std::ptr::copy_nonoverlapping(image, guard.as_ptr(), len);
                } else {
                    std::ptr::copy_nonoverlapping(guard.as_ptr(), image, len);
                }
            }
            pos += len as u64;
        }
        Ok(total)
    }

    /// msync of the whole mapping.
    pub fn sync(&self) -> io::Result<()> {
        // SAFETY: `map` is our live mapping of `len` bytes.
        if unsafe { libc::msync(self.map.cast(), self.len as usize, libc::MS_SYNC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
