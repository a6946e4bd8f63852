//! The main job: what `vmm run` does when no `--guest` is named. A short (~2 s)
//! confidential-style VM that shows what the project is for: the `io` guest writes, reads back
//! and verifies a virtio-blk disk through its swiotlb bounce pool (the default policy), on the
//! default stores, so the summary shows conversions, the pool, DMA and double allocation. The
//! disk is a temporary image ([`TempDisk`]) removed when it is dropped: when the run ends, on an
//! error, and after a stop signal (`crate::signals` ends the VM cleanly, so `vmm run` returns
//! and drops it; a forced second signal removes it through
//! `SignalStop::remove_on_forced_exit`).

use std::path::{Path, PathBuf};

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

/// A disk image removed when dropped.
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
        Ok(disk)
    }

    /// The image.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
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
