//! The block device's counters: the atomics the poller and the vCPU threads bump
//! ([`Counters`]) and their snapshot for the run summary and `--stats-json` ([`BlkStats`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::disk::FailureLog;

/// Counters, updated by the poller and the vCPU threads.
#[derive(Default)]
pub struct Counters {
    pub(super) requests: AtomicU64,
    pub(super) reads: AtomicU64,
    pub(super) writes: AtomicU64,
    pub(super) flushes: AtomicU64,
    pub(super) get_ids: AtomicU64,
    pub(super) unsupported: AtomicU64,
    pub(super) bytes_read: AtomicU64,
    pub(super) bytes_written: AtomicU64,
    pub(super) violations: AtomicU64,
    pub(super) errors: AtomicU64,
    pub(super) io_errors: AtomicU64,
    pub(super) device_faults: AtomicU64,
    pub(super) notifies: AtomicU64,
    pub(super) sleeps: AtomicU64,
    pub(super) polls: AtomicU64,
    pub(super) resets: AtomicU64,
    pub(super) fence_retries: AtomicU64,
}

/// Adds `n` to counter `c`.
pub fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// A snapshot, with the device's identity and the disk's failure-log totals.
    pub fn snapshot(
        &self,
        path: &str,
        capacity_bytes: u64,
        queues: u64,
        log: &FailureLog,
    ) -> BlkStats {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        BlkStats {
            path: path.to_string(),
            capacity_bytes,
            queues,
            requests: g(&self.requests),
            reads: g(&self.reads),
            writes: g(&self.writes),
            flushes: g(&self.flushes),
            get_ids: g(&self.get_ids),
            unsupported: g(&self.unsupported),
            bytes_read: g(&self.bytes_read),
            bytes_written: g(&self.bytes_written),
            violations: g(&self.violations),
            errors: g(&self.errors),
            io_errors: g(&self.io_errors),
            io_error_log_suppressed: log.suppressed(),
            device_faults: g(&self.device_faults),
            notifies: g(&self.notifies),
            sleeps: g(&self.sleeps),
            polls: g(&self.polls),
            resets: g(&self.resets),
            fence_retries: g(&self.fence_retries),
        }
    }
}

/// The device's statistics (JSON in `--stats-json` under `disk`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct BlkStats {
    /// Disk image path.
    pub path: String,
    /// Disk size in bytes.
    pub capacity_bytes: u64,
    /// Queues offered.
    pub queues: u64,
    /// Requests completed (any status).
    pub requests: u64,
    /// IN requests completed OK.
    pub reads: u64,
    /// OUT requests completed OK.
    pub writes: u64,
    /// FLUSH requests completed OK.
    pub flushes: u64,
    /// GET_ID requests completed OK.
    pub get_ids: u64,
    /// Requests of an unknown type (VIRTIO_BLK_S_UNSUPP).
    pub unsupported: u64,
    /// Bytes read from the disk into guest buffers.
    pub bytes_read: u64,
    /// Bytes written to the disk from guest buffers.
    pub bytes_written: u64,
    /// Requests refused because a descriptor or buffer touched memory that is not shared.
    pub violations: u64,
    /// Other failed requests (malformed, out of range, I/O errors); violations not included.
    pub errors: u64,
    /// Of `errors`, the requests the image failed (read, write or flush: full filesystem,
    /// image truncated or read-only, EIO...), each completed with VIRTIO_BLK_S_IOERR.
    pub io_errors: u64,
    /// Image failures counted but not logged (the failure log's rate limit).
    pub io_error_log_suppressed: u64,
    /// Ring-level faults that set DEVICE_NEEDS_RESET.
    pub device_faults: u64,
    /// QueueNotify writes (doorbell exits).
    pub notifies: u64,
    /// Times the poller went to sleep.
    pub sleeps: u64,
    /// Polling rounds.
    pub polls: u64,
    /// Device resets by the driver.
    pub resets: u64,
    /// Requests or ring rounds put back because a conversion held their pages (the DMA
    /// fence said busy); each was retried on a later round.
    pub fence_retries: u64,
}

impl BlkStats {
    /// One summary line.
    pub fn render(&self) -> String {
        format!(
            "disk: {} ({} MiB, {} queues): requests {} (reads {}, writes {}, flushes {}, get_id {}, unsupported {}), \
             read {:.1} MiB, written {:.1} MiB, violations {}, errors {} (io errors {}, {} not logged), device faults {}, doorbells {}, sleeps {}, resets {}\n",
            self.path,
            self.capacity_bytes >> 20,
            self.queues,
            self.requests,
            self.reads,
            self.writes,
            self.flushes,
            self.get_ids,
            self.unsupported,
            memconv::stats::units::mib(self.bytes_read),
            memconv::stats::units::mib(self.bytes_written),
            self.violations,
            self.errors,
            self.io_errors,
            self.io_error_log_suppressed,
            self.device_faults,
            self.notifies,
            self.sleeps,
            self.resets
        )
    }
}
