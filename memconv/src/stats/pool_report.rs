//! [`PoolReportSnapshot`]: the host's one shape of the guest's pool report, decoded once from
//! the wire [`PoolReport`] and serialized in the statistics (`pool_report`).

use serde::{Deserialize, Serialize};

use crate::abi::{self, PoolReport};

/// The guest's latest pool report, decoded.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct PoolReportSnapshot {
    /// Policy name.
    pub policy: String,
    /// Bytes mapped now.
    pub used_bytes: u64,
    /// Peak used.
    pub high_water_bytes: u64,
    /// Pool capacity.
    pub capacity_bytes: u64,
    /// Successful maps.
    pub maps: u64,
    /// Failed maps.
    pub map_failures: u64,
    /// Throttle waits.
    pub throttle_waits: u64,
    /// Throttle wait time.
    pub throttle_wait_ns: u64,
    /// 4K conversions issued.
    pub conversions_4k: u64,
    /// 2M conversions issued.
    pub conversions_2m: u64,
    /// Other conversions issued.
    pub conversions_other: u64,
    /// Bytes shared now.
    pub shared_bytes: u64,
    /// Peak bytes shared.
    pub shared_peak_bytes: u64,
    /// Transient buffers.
    pub transient_maps: u64,
    /// Growth steps.
    pub grow_events: u64,
    /// Shrink steps.
    pub shrink_events: u64,
    /// I/O requests completed.
    pub io_requests: u64,
    /// I/O errors.
    pub io_errors: u64,
    /// The policy claims every conversion it issues is 2 MiB aligned and sized.
    pub claims_2m: bool,
}

impl From<&PoolReport> for PoolReportSnapshot {
    fn from(r: &PoolReport) -> Self {
        let n = (r.policy_len as usize).min(abi::POLICY_NAME_MAX);
        let policy: String = r.policy[..n]
            .iter()
            .map(|b| {
                if b.is_ascii_graphic() || *b == b' ' {
                    *b as char
                } else {
                    '?'
                }
            })
            .collect();
        PoolReportSnapshot {
            policy,
            used_bytes: r.used_bytes,
            high_water_bytes: r.high_water_bytes,
            capacity_bytes: r.capacity_bytes,
            maps: r.maps,
            map_failures: r.map_failures,
            throttle_waits: r.throttle_waits,
            throttle_wait_ns: r.throttle_wait_ns,
            conversions_4k: r.conversions_4k,
            conversions_2m: r.conversions_2m,
            conversions_other: r.conversions_other,
            shared_bytes: r.shared_bytes,
            shared_peak_bytes: r.shared_peak_bytes,
            transient_maps: r.transient_maps,
            grow_events: r.grow_events,
            shrink_events: r.shrink_events,
            io_requests: r.io_requests,
            io_errors: r.io_errors,
            claims_2m: r.flags & abi::POOL_FLAG_CLAIMS_2M != 0,
        }
    }
}
