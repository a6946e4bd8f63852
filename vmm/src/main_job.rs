//! The main job: what `vmm run` does when no `--guest` is named. A short (~2 s)
//! confidential-style VM that shows what the project is for: the `io` guest writes, reads back
//! and verifies a virtio-blk disk through its swiotlb bounce pool (the default policy), on the
//! default stores, so the summary shows conversions, the pool, DMA and double allocation. The
//! disk is a temporary image this module creates and removes: when the run ends, on an error,
//! and on SIGINT/SIGTERM/SIGHUP (the handler unlinks it and re-raises the signal).

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicPtr, Ordering};

/// The guest of the main job.
pub const GUEST: &str = "io";
/// vCPUs of the main job: one issuing I/O, one running the pool's background work.
pub const CPUS: u32 = 2;
/// Size of the temporary disk image.
pub const DISK_SIZE: u64 = 64 << 20;
/// The io workload's command line (the pool policy is the default, `legacy`); a `--cmdline`
/// given with no `--guest` is appended, so its keys win (`--cmdline policy=throttle`).
pub const CMDLINE: &str = "sizes=4k-64k qd=16 rw=50 seconds=2 cpus=1 worker=1 report_ms=100";

/// What to try after the main job, printed under its summary.
pub const TRY_NEXT: &str = "\
try next:
  vmm run --cmdline \"policy=throttle pool=4M\"      # the same job through a small throttled pool
  vmm run --private gmem --shared hugetlb           # guest_memfd + huge pages: double allocation appears
  vmm conform --quick                               # every policy x store pair, checked against invariants
";

/// Errors creating the temporary disk.
#[derive(Debug, thiserror::Error)]
pub enum MainJobError {
    /// The image could not be created.
    #[error("cannot create the main job's temporary disk image {path}: {source}")]
    Create {
        /// The image.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

/// The path the signal handler unlinks (a leaked C string), or null.
static SIGNAL_UNLINK: AtomicPtr<libc::c_char> = AtomicPtr::new(std::ptr::null_mut());

/// The signals that remove the temporary disk before the process dies of them.
const CLEANUP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn unlink_and_reraise(sig: libc::c_int) {
    let path = SIGNAL_UNLINK.swap(std::ptr::null_mut(), Ordering::SeqCst);
    // SAFETY: unlink, signal and raise are async-signal-safe; `path` is null or a
    // NUL-terminated string leaked by `TempDisk::create` and never freed.
    unsafe {
        if !path.is_null() {
            libc::unlink(path);
        }
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// A disk image removed when dropped (and by the signal handler if the process is killed by
/// SIGINT, SIGTERM or SIGHUP first).
pub struct TempDisk {
    path: PathBuf,
}

impl TempDisk {
    /// Creates an empty sparse image of `size` bytes under the temporary directory.
    pub fn create(size: u64) -> Result<Self, MainJobError> {
        let path = std::env::temp_dir().join(format!("vmm-main-job-{}.img", std::process::id()));
        let fail = |source| MainJobError::Create {
            path: path.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(fail)?;
        let disk = TempDisk { path };
        file.set_len(size).map_err(|source| MainJobError::Create {
            path: disk.path.clone(),
            source,
        })?;
        if let Ok(c) = CString::new(disk.path.as_os_str().as_bytes()) {
            SIGNAL_UNLINK.store(c.into_raw(), Ordering::SeqCst);
            for sig in CLEANUP_SIGNALS {
                // SAFETY: installs a handler that only calls async-signal-safe functions.
                unsafe {
                    libc::signal(
                        sig,
                        unlink_and_reraise as extern "C" fn(libc::c_int) as libc::sighandler_t,
                    );
                }
            }
        }
        Ok(disk)
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        // The signal handler no longer has anything to remove (the string stays leaked: a
        // handler may be reading it right now).
        SIGNAL_UNLINK.store(std::ptr::null_mut(), Ordering::SeqCst);
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("cannot remove {}: {e}", self.path.display());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_disk_is_created_sparse_and_removed() {
        let disk = TempDisk::create(1 << 20).unwrap();
        let path = disk.path().to_path_buf();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        assert!(
            TempDisk::create(1 << 20).is_err(),
            "one per process at a time"
        );
        drop(disk);
        assert!(!path.exists());
    }
}
