//! vCPU telemetry: exit counts by reason per vCPU (one lock each, so publishing after every
//! exit never contends across vCPUs), the ports no device owns that the guest touched, and
//! the guest's pool reports over time.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use serde::Serialize;

/// Per-vCPU exit counts by reason.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExitCounts {
    /// All exits out of KVM_RUN, kicks included.
    pub total: u64,
    /// Port writes.
    pub io_out: u64,
    /// Port reads.
    pub io_in: u64,
    /// Serial console accesses (part of io_out/io_in).
    pub serial: u64,
    /// Doorbell rings (part of io_out).
    pub doorbell: u64,
    /// Accesses to ports no device owns (part of io_out/io_in).
    pub unknown_port: u64,
    /// MMIO reads and writes.
    pub mmio: u64,
    /// MMIO accesses no device owns.
    pub unknown_mmio: u64,
    /// HLT exits.
    pub hlt: u64,
    /// KVM_EXIT_HYPERCALL exits.
    pub hypercall: u64,
    /// Kicks (EINTR) and KVM_EXIT_INTR.
    pub interrupted: u64,
    /// Doorbells refused because their value was not the writing vCPU's index (part of
    /// doorbell).
    pub doorbell_mismatch: u64,
    /// Anything else.
    pub other: u64,
}

/// One guest pool report, as time series point.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct PoolSample {
    /// Milliseconds since the vCPUs started.
    pub t_ms: f64,
    /// Bytes the guest held shared.
    pub shared_bytes: u64,
    /// Bytes mapped by drivers.
    pub used_bytes: u64,
    /// Pool capacity.
    pub capacity_bytes: u64,
    /// Maps so far.
    pub maps: u64,
    /// Failed maps so far.
    pub map_failures: u64,
    /// Throttle waits so far.
    pub throttle_waits: u64,
}

/// Guest pool reports over time, bounded: when full, every other sample is dropped and the
/// minimum spacing doubles, so a long run keeps an even-spaced history of at most `MAX` points.
#[derive(Debug, Default)]
pub struct PoolTimeline {
    samples: Vec<PoolSample>,
    spacing_ms: f64,
}

impl PoolTimeline {
    /// Most samples kept.
    pub const MAX: usize = 2048;

    /// Adds a sample unless it is closer than the current spacing to the previous one.
    pub fn push(&mut self, sample: PoolSample) {
        if let Some(last) = self.samples.last() {
            if sample.t_ms - last.t_ms < self.spacing_ms {
                return;
            }
        }
        if self.samples.len() >= Self::MAX {
            let kept: Vec<PoolSample> = self.samples.iter().step_by(2).copied().collect();
            self.samples = kept;
            self.spacing_ms = (self.spacing_ms * 2.0).max(1.0);
        }
        self.samples.push(sample);
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> &[PoolSample] {
        &self.samples
    }
}

/// What the vCPUs of one VM have counted and seen.
pub struct Telemetry {
    counts: Vec<Mutex<ExitCounts>>,
    unknown_ports: Mutex<BTreeMap<u16, u64>>,
    started: Instant,
    pool_timeline: Mutex<PoolTimeline>,
}

impl Telemetry {
    /// Empty telemetry for `cpus` vCPUs; pool report times count from now.
    pub fn new(cpus: u32) -> Self {
        Self {
            counts: (0..cpus)
                .map(|_| Mutex::new(ExitCounts::default()))
                .collect(),
            unknown_ports: Mutex::new(BTreeMap::new()),
            started: Instant::now(),
            pool_timeline: Mutex::new(PoolTimeline::default()),
        }
    }

    /// Makes `counts` what readers see for vCPU `cpu`.
    pub fn publish(&self, cpu: u32, counts: &ExitCounts) {
        if let Some(slot) = self.counts.get(cpu as usize) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = counts.clone();
        }
    }

    /// A copy of every vCPU's exit counts.
    pub fn exit_counts(&self) -> Vec<ExitCounts> {
        self.counts
            .iter()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
    }

    /// Counts an access to `port`, which no device owns (warns the first time).
    pub fn note_unknown_port(&self, port: u16) {
        let mut ports = self.unknown_ports.lock().unwrap_or_else(|p| p.into_inner());
        let n = ports.entry(port).or_insert(0);
        if *n == 0 {
            memconv::guest_warn!("guest accessed port {port:#x}, which no device owns");
        }
        *n += 1;
    }

    /// Unknown ports touched, with access counts.
    pub fn unknown_ports(&self) -> BTreeMap<u16, u64> {
        self.unknown_ports
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Records a guest pool report in the timeline.
    pub fn note_pool_report(&self, r: &memconv::stats::PoolReportSnapshot) {
        if tracing::enabled!(tracing::Level::DEBUG) {
            static REPORTS: memconv::log_limit::LogLimiter =
                memconv::log_limit::LogLimiter::new(10);
            if REPORTS.allow() {
                let mib = memconv::stats::units::mib;
                tracing::debug!(
                    "pool report '{}': used {:.1} / {:.1} MiB, shared {:.1} MiB, maps {} failures {}, throttle waits {}, io requests {} ({} reports not shown so far)",
                    r.policy,
                    mib(r.used_bytes),
                    mib(r.capacity_bytes),
                    mib(r.shared_bytes),
                    r.maps,
                    r.map_failures,
                    r.throttle_waits,
                    r.io_requests,
                    REPORTS.suppressed()
                );
            }
        }
        let sample = PoolSample {
            t_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            shared_bytes: r.shared_bytes,
            used_bytes: r.used_bytes,
            capacity_bytes: r.capacity_bytes,
            maps: r.maps,
            map_failures: r.map_failures,
            throttle_waits: r.throttle_waits,
        };
        self.pool_timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(sample);
    }

    /// The guest pool reports received so far, over time.
    pub fn pool_timeline(&self) -> Vec<PoolSample> {
        self.pool_timeline
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .samples()
            .to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_timeline_stays_bounded_and_ordered() {
        let mut t = PoolTimeline::default();
        for i in 0..10_000 {
            t.push(PoolSample {
                t_ms: i as f64,
                shared_bytes: i,
                used_bytes: 0,
                capacity_bytes: 0,
                maps: 0,
                map_failures: 0,
                throttle_waits: 0,
            });
        }
        let s = t.samples();
        assert!(s.len() <= PoolTimeline::MAX && s.len() > PoolTimeline::MAX / 4);
        assert!(s.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
        assert_eq!(s[0].t_ms, 0.0);
        assert!(s[s.len() - 1].t_ms > 9000.0);
    }
}
