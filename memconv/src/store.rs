//! The backing stores of guest RAM and the kernel queries about their allocation.
//!
//! A [`Store`] is one file of `size` bytes whose offset equals the GPA, mapped whole
//! (`MAP_SHARED`) once: the "store mapping". Three kinds exist:
//!
//! - `memfd`: `memfd_create` (shmem), 4 KiB pages; holes punched at 4 KiB.
//! - `hugetlb`: `memfd_create(MFD_HUGETLB | MFD_HUGE_2MB)`, 2 MiB pages, mapped with
//!   `MAP_NORESERVE` so that mapping both stores does not reserve twice the RAM. Only whole
//!   2 MiB pages can be punched or allocated; it cannot be mapped 4 KiB at a time.
//! - `gmem`: a KVM guest_memfd created with `GUEST_MEMFD_FLAG_MMAP | GUEST_MEMFD_FLAG_INIT_SHARED`
//!   and used through its mmap (private side only).
//!
//! This module owns the file descriptors and store mappings, the allocation primitives
//! (`fallocate` punch/allocate, zeroing through the mapping) and the kernel's view of what is
//! allocated (`fstat` `st_blocks`, `SEEK_DATA`/`SEEK_HOLE`, `mincore`).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::abi::{HUGE_PAGE_SIZE, PAGE_SIZE};
use crate::bitmap::PageBits;

/// guest_memfd flag: the guest_memfd can be mmapped (not in kvm-bindings 0.14).
pub const GUEST_MEMFD_FLAG_MMAP: u64 = 1;
/// guest_memfd flag: its pages start shared (host-accessible) (not in kvm-bindings 0.14).
pub const GUEST_MEMFD_FLAG_INIT_SHARED: u64 = 2;

const HUGEPAGES_SYSFS: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// Which kind of file backs a store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// shmem memfd, 4 KiB pages.
    Memfd,
    /// hugetlbfs memfd, 2 MiB pages.
    Hugetlb,
    /// KVM guest_memfd used through its mmap (private store only).
    Gmem,
}

impl StoreKind {
    /// The store's allocation unit is 2 MiB (hugetlb).
    pub fn is_huge(self) -> bool {
        matches!(self, StoreKind::Hugetlb)
    }

    /// The name used on the command line and in statistics.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Memfd => "memfd",
            StoreKind::Hugetlb => "hugetlb",
            StoreKind::Gmem => "gmem",
        }
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StoreKind {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "memfd" => Ok(StoreKind::Memfd),
            "hugetlb" => Ok(StoreKind::Hugetlb),
            "gmem" => Ok(StoreKind::Gmem),
            _ => Err(StoreError::UnknownKind(s.to_string())),
        }
    }
}

/// Errors creating or querying a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not one of memfd, hugetlb, gmem.
    #[error("unknown store kind {0:?} (expected memfd, hugetlb or gmem)")]
    UnknownKind(String),
    /// A guest_memfd may only back the private store.
    #[error("gmem (guest_memfd) can only be the private store; use memfd or hugetlb as the shared store")]
    GmemShared,
    /// `memfd_create` failed.
    #[error("memfd_create for the {what} store failed: {source}")]
    MemfdCreate {
        /// Which store.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// Sizing the file failed.
    #[error("ftruncate of the {what} store to {size} bytes failed: {source}")]
    Truncate {
        /// Which store.
        what: &'static str,
        /// Requested size.
        size: u64,
        /// The OS error.
        source: io::Error,
    },
    /// KVM could not create a guest_memfd.
    #[error(
        "KVM cannot create a guest_memfd of {size} bytes with flags MMAP|INIT_SHARED ({source}); \
         this host's KVM lacks KVM_CAP_GUEST_MEMFD with mmap support: use --private memfd or hugetlb"
    )]
    GmemUnavailable {
        /// Requested size.
        size: u64,
        /// The error from KVM_CREATE_GUEST_MEMFD.
        source: io::Error,
    },
    /// Mapping the store failed.
    #[error("mmap of the {what} store ({size} bytes) failed: {source}")]
    Mmap {
        /// Which store.
        what: &'static str,
        /// Mapping size.
        size: u64,
        /// The OS error.
        source: io::Error,
    },
    /// Not enough free 2 MiB huge pages.
    #[error(
        "not enough free 2 MiB huge pages: the hugetlb store(s) need {needed}, {free} are free \
         (nr_hugepages = {total}); reserve them as root with `echo {suggest} > /proc/sys/vm/nr_hugepages`"
    )]
    HugePages {
        /// Huge pages needed.
        needed: u64,
        /// Huge pages free now (free - reserved).
        free: u64,
        /// Current nr_hugepages.
        total: u64,
        /// Value of nr_hugepages that would suffice.
        suggest: u64,
    },
    /// Preallocating hugetlb pages failed for another reason.
    #[error("preallocating the {what} hugetlb store failed: {source}")]
    Prealloc {
        /// Which store.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A kernel query failed.
    #[error("kernel query on the {what} store failed: {source}")]
    Query {
        /// Which store.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
}

/// Free 2 MiB huge pages as the kernel reports them: (available = free - reserved, nr_hugepages).
pub fn huge_pages_available() -> (u64, u64) {
    let read = |name: &str| -> u64 {
        std::fs::read_to_string(format!("{HUGEPAGES_SYSFS}/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let free = read("free_hugepages");
    let resv = read("resv_hugepages");
    (free.saturating_sub(resv), read("nr_hugepages"))
}

/// Error for `needed` huge pages when only `free` are available.
pub fn huge_pages_error(needed: u64) -> StoreError {
    let (free, total) = huge_pages_available();
    StoreError::HugePages {
        needed,
        free,
        total,
        suggest: total + needed.saturating_sub(free),
    }
}

/// One store file and its whole mapping.
pub struct Store {
    kind: StoreKind,
    what: &'static str,
    fd: OwnedFd,
    base: *mut u8,
    size: u64,
}

// SAFETY: `base` points to a MAP_SHARED mapping owned by this struct for its whole lifetime; the
// mapping is process-wide memory, and all accesses through it are either volatile or to ranges
// the engine serializes under its lock.
unsafe impl Send for Store {}
// SAFETY: see `Send`; `&Store` only hands out the address and performs syscalls.
unsafe impl Sync for Store {}

fn last_err() -> io::Error {
    io::Error::last_os_error()
}

impl Store {
    /// Create the store file of `size` bytes and map it whole. `gmem_fd` must be `Some` (a
    /// guest_memfd of `size` bytes) for `StoreKind::Gmem`.
    pub fn create(
        kind: StoreKind,
        what: &'static str,
        size: u64,
        gmem_fd: Option<OwnedFd>,
    ) -> Result<Store, StoreError> {
        let fd = match kind {
            StoreKind::Gmem => match gmem_fd {
                Some(fd) => fd,
                None => {
                    return Err(StoreError::GmemUnavailable {
                        size,
                        source: io::Error::from_raw_os_error(libc::ENODEV),
                    })
                }
            },
            StoreKind::Memfd | StoreKind::Hugetlb => {
                let mut flags = libc::MFD_CLOEXEC;
                if kind.is_huge() {
                    flags |= libc::MFD_HUGETLB | libc::MFD_HUGE_2MB;
                }
                // "memconv-private-hugetlb" etc.: /proc/PID/fd tells the stores apart.
                let name = std::ffi::CString::new(format!("memconv-{what}-{}", kind.as_str()))
                    .unwrap_or_else(|_| c"memconv".to_owned());
                // SAFETY: `name` is NUL-terminated; memfd_create has no memory side effects.
                let raw = unsafe { libc::memfd_create(name.as_ptr().cast(), flags) };
                if raw < 0 {
                    return Err(StoreError::MemfdCreate {
                        what,
                        source: last_err(),
                    });
                }
                // SAFETY: `raw` is a fresh fd we own.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                // SAFETY: plain syscall on our fd.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
                    return Err(StoreError::Truncate {
                        what,
                        size,
                        source: last_err(),
                    });
                }
                fd
            }
        };
        Self::map(kind, what, size, fd)
    }

    /// Wrap an existing file (e.g. on a size-limited hugetlbfs mount in tests) as a store.
    pub fn from_fd(
        kind: StoreKind,
        what: &'static str,
        size: u64,
        fd: OwnedFd,
    ) -> Result<Store, StoreError> {
        Self::map(kind, what, size, fd)
    }

    fn map(
        kind: StoreKind,
        what: &'static str,
        size: u64,
        fd: OwnedFd,
    ) -> Result<Store, StoreError> {
        let mut flags = libc::MAP_SHARED;
        if kind.is_huge() {
            flags |= libc::MAP_NORESERVE;
        }
        // SAFETY: a fresh mapping at a kernel-chosen address; no existing memory is affected.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(StoreError::Mmap {
                what,
                size,
                source: last_err(),
            });
        }
        Ok(Store {
            kind,
            what,
            fd,
            base: p.cast(),
            size,
        })
    }

    /// Kind of this store.
    pub fn kind(&self) -> StoreKind {
        self.kind
    }

    /// "private" or "shared".
    pub fn what(&self) -> &'static str {
        self.what
    }

    /// Host address of the store mapping (offset 0 = GPA 0).
    pub fn base(&self) -> *mut u8 {
        self.base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The store file.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Allocation unit of the store: 4 KiB or 2 MiB.
    pub fn unit(&self) -> u64 {
        if self.kind.is_huge() {
            HUGE_PAGE_SIZE
        } else {
            PAGE_SIZE
        }
    }

    fn fallocate(&self, mode: i32, off: u64, len: u64) -> io::Result<()> {
        loop {
            // SAFETY: plain syscall on our fd; punching/allocating never invalidates our mapping
            // (accesses to punched ranges read zeros or allocate anew).
            let r =
                unsafe { libc::fallocate(self.fd(), mode, off as libc::off_t, len as libc::off_t) };
            if r == 0 {
                return Ok(());
            }
            let e = last_err();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Release `[off, off+len)` (fallocate PUNCH_HOLE | KEEP_SIZE).
    pub fn punch(&self, off: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    }

    /// Allocate `[off, off+len)` (fallocate mode 0). ENOSPC/ENOMEM when the store is exhausted.
    pub fn allocate(&self, off: u64, len: u64) -> io::Result<()> {
        self.fallocate(0, off, len)
    }

    /// Map already-allocated pages of `[off, off+len)` into the store mapping without
    /// allocating (MADV_POPULATE_READ), so `mincore` on the mapping sees them.
    pub fn populate_read(&self, off: u64, len: u64) -> io::Result<()> {
        // SAFETY: the range lies inside our mapping; populating has no effect on contents.
        let r = unsafe {
            libc::madvise(
                self.base.add(off as usize).cast(),
                len as usize,
                libc::MADV_POPULATE_READ,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(last_err())
        }
    }

    /// Write zeros to `[off, off+len)` through the store mapping. The caller guarantees the
    /// range is allocated (hugetlb) so the write cannot SIGBUS.
    pub fn zero(&self, off: u64, len: u64) {
        if off.checked_add(len).is_none_or(|e| e > self.size) {
            return;
        }
        // SAFETY: the range is inside our mapping (checked above); no Rust reference to this
        // memory exists (it is guest memory only reached through raw pointers/volatile access),
        // and the engine only zeroes pages no guest slot currently maps from this store.
        unsafe { std::ptr::write_bytes(self.base.add(off as usize), 0, len as usize) };
    }

    /// Bytes the kernel has allocated to the file (`st_blocks * 512`).
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        // SAFETY: zeroed `stat` is a valid out-parameter.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: plain syscall writing into `st`.
        if unsafe { libc::fstat(self.fd(), &mut st) } != 0 {
            return Err(last_err());
        }
        Ok((st.st_blocks as u64).saturating_mul(512))
    }

    /// Mark in `out` (one bit per 4 KiB page, GPA order) the pages the kernel reports
    /// allocated in the file: `SEEK_DATA`/`SEEK_HOLE` where the file supports it (shmem);
    /// `mincore` on the store mapping otherwise (guest_memfd: page cache lookup). Does not
    /// handle hugetlb (see [`Store::mincore_chunks`]): SEEK_DATA does not see its holes.
    /// Returns the method used ("seek_data" or "mincore").
    pub fn resident_pages(&self, out: &mut PageBits) -> io::Result<&'static str> {
        match self.seek_data_pages(out) {
            Ok(()) => Ok("seek_data"),
            Err(e)
                if e.raw_os_error() == Some(libc::ESPIPE)
                    || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                self.mincore_pages(self.base, 0, self.size, out)?;
                Ok("mincore")
            }
            Err(e) => Err(e),
        }
    }

    fn seek_data_pages(&self, out: &mut PageBits) -> io::Result<()> {
        let size = self.size as libc::off_t;
        let mut pos: libc::off_t = 0;
        while pos < size {
            // SAFETY: lseek on our fd has no memory effects.
            let data = unsafe { libc::lseek(self.fd(), pos, libc::SEEK_DATA) };
            if data < 0 {
                let e = last_err();
                if e.raw_os_error() == Some(libc::ENXIO) {
                    break;
                }
                return Err(e);
            }
            // SAFETY: as above.
            let hole = unsafe { libc::lseek(self.fd(), data, libc::SEEK_HOLE) };
            if hole < 0 {
                return Err(last_err());
            }
            let hole = hole.min(size);
            let first = data as u64 / PAGE_SIZE;
            let last = (hole as u64).div_ceil(PAGE_SIZE);
            out.set_range(first, last, true);
            if hole <= data {
                break;
            }
            pos = hole;
        }
        Ok(())
    }

    /// `mincore` over `[addr, addr+len)` (which maps this store at file offset `off`): marks
    /// resident 4 KiB pages into `out` at page index `off / 4K + i`.
    fn mincore_pages(
        &self,
        addr: *mut u8,
        off: u64,
        len: u64,
        out: &mut PageBits,
    ) -> io::Result<()> {
        const STEP: u64 = 64 << 20;
        let mut vec = vec![0u8; (STEP / PAGE_SIZE) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(STEP);
            let pages = (n / PAGE_SIZE) as usize;
            // SAFETY: [addr+done, +n) lies inside a mapping we own; `vec` has room for `pages`.
            let r = unsafe {
                libc::mincore(addr.add(done as usize).cast(), n as usize, vec.as_mut_ptr())
            };
            if r != 0 {
                return Err(last_err());
            }
            let first = (off + done) / PAGE_SIZE;
            for (i, b) in vec.iter().take(pages).enumerate() {
                if b & 1 != 0 {
                    out.set(first + i as u64, true);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// For a hugetlb store mapped at `addr` (file offset `off`, `len` bytes, 2 MiB aligned):
    /// marks into `out` (one bit per 2 MiB chunk) the chunks whose huge page is mapped there.
    ///
    /// # Safety
    /// `[addr, addr+len)` must be a mapped range (mincore only reads page tables).
    pub unsafe fn mincore_chunks(
        addr: *mut u8,
        off: u64,
        len: u64,
        out: &mut PageBits,
    ) -> io::Result<()> {
        let chunks = len / HUGE_PAGE_SIZE;
        let mut vec = vec![0u8; PAGES_PER_CHUNK_USIZE];
        for c in 0..chunks {
            // SAFETY: the chunk lies inside a mapping we own; `vec` holds one byte per 4 KiB.
            let r = unsafe {
                libc::mincore(
                    addr.add((c * HUGE_PAGE_SIZE) as usize).cast(),
                    HUGE_PAGE_SIZE as usize,
                    vec.as_mut_ptr(),
                )
            };
            if r != 0 {
                return Err(last_err());
            }
            if vec.iter().any(|b| b & 1 != 0) {
                out.set(off / HUGE_PAGE_SIZE + c, true);
            }
        }
        Ok(())
    }
}

const PAGES_PER_CHUNK_USIZE: usize = (HUGE_PAGE_SIZE / PAGE_SIZE) as usize;

impl Drop for Store {
    fn drop(&mut self) {
        // SAFETY: we created this mapping in `map` and nothing uses it after drop (the
        // vm-memory views over it are owned by the service and dropped before the stores).
        unsafe { libc::munmap(self.base.cast(), self.size as usize) };
    }
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("kind", &self.kind)
            .field("what", &self.what)
            .field("size", &self.size)
            .finish()
    }
}
