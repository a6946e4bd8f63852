//! The `stats` snapshot cache: what a `stats` reply is made of, taken at one instant, and how
//! long one snapshot may answer before a fresh one is taken.

use std::time::{Duration, Instant};

use crate::devices::BlkStats;
use crate::vcpu::{ExitCounts, VmShared};

/// Longest a `stats` snapshot is reused (see `Snapshot::reuse_for`).
pub const SNAPSHOT_MAX_REUSE: Duration = Duration::from_millis(250);

/// What a `stats` reply is made of, taken at one instant.
pub(super) struct Snapshot {
    pub(super) taken: Instant,
    /// How long taking it took (memconv's lock wait and kernel queries, mostly).
    pub(super) cost: Duration,
    pub(super) uptime_ms: u64,
    pub(super) exits: Vec<ExitCounts>,
    pub(super) vcpu_pauses: u64,
    pub(super) memconv: memconv::StatsSnapshot,
    /// The block device's counters, when the VM has one.
    pub(super) disk: Option<BlkStats>,
}

impl Snapshot {
    /// Takes a snapshot of what the VM publishes now (`created`: when the VM was created).
    fn take(shared: &VmShared, created: Instant) -> Snapshot {
        let taken = Instant::now();
        // Exit counts first: the memconv snapshot may wait for a conversion batch to finish.
        let exits = shared.exit_counts();
        let mut memconv = shared.memconv.stats();
        // One pause counter everywhere: the vCPU control's (memslot edits and control-socket
        // pauses), not only memconv's own.
        let vcpu_pauses = shared.control.pause_count();
        memconv.vcpu_pauses = vcpu_pauses;
        Snapshot {
            taken,
            cost: taken.elapsed(),
            uptime_ms: taken.duration_since(created).as_millis() as u64,
            exits,
            vcpu_pauses,
            memconv,
            disk: shared.disk_stats(),
        }
    }

    /// How long this snapshot answers `stats`: 100 times what it cost, at most
    /// [`SNAPSHOT_MAX_REUSE`]. memconv's snapshot holds its lock (a converting vCPU waits) while
    /// it asks the kernel about the stores: this bounds the time spent in it at ~1%, however
    /// many clients poll however often, and keeps replies as fresh as that allows.
    pub(super) fn reuse_for(&self) -> Duration {
        (self.cost * 100).min(SNAPSHOT_MAX_REUSE)
    }
}

/// The latest snapshot, reused while it is younger than its [`Snapshot::reuse_for`].
#[derive(Default)]
pub(super) struct SnapshotCache {
    latest: Option<Snapshot>,
}

impl SnapshotCache {
    /// The snapshot to answer `stats` with at `now`: the latest while it is fresh enough, else
    /// a new one.
    pub(super) fn current(
        &mut self,
        now: Instant,
        shared: &VmShared,
        created: Instant,
    ) -> &Snapshot {
        if self
            .latest
            .as_ref()
            .is_some_and(|s| now.duration_since(s.taken) >= s.reuse_for())
        {
            self.latest = None;
        }
        self.latest
            .get_or_insert_with(|| Snapshot::take(shared, created))
    }

    /// Forgets the latest snapshot (the VM's state changed).
    pub(super) fn clear(&mut self) {
        self.latest = None;
    }
}
