//! Pool statistics: [`Stats`], the lock-free counters every policy keeps, turned into the wire
//! record [`PoolReport`] (`memconv::abi`) by [`Stats::report`], plus [`ExtraStats`] for the
//! figures the wire record has no field for.
//!
//! Definitions shared by all policies:
//! - `used_bytes`: pool memory held by live streaming mappings, in allocation units (slots,
//!   size-class buffers, transient pages), so it is comparable with `capacity_bytes`.
//!   Coherent allocations are not "used" (they are in [`ExtraStats::coherent_bytes`]).
//! - `maps` / `map_failures`: successful / failed map calls.
//! - conversions are counted per range issued to the host: `conversions_4k` exactly 4 KiB,
//!   `conversions_2m` 2 MiB aligned and a multiple of 2 MiB, `conversions_other` the rest.
//! - `shared_bytes` follows successful conversions (to shared adds, to private subtracts).

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};
use memconv::abi::{PoolReport, HUGE_PAGE_SIZE, POLICY_NAME_MAX, POOL_REPORT_VERSION};

/// Counters kept by every policy. All updates are relaxed atomics: the figures are statistics,
/// consistent per counter, not across counters.
#[derive(Debug, Default)]
pub struct Stats {
    used: AtomicU64,
    high_water: AtomicU64,
    capacity: AtomicU64,
    maps: AtomicU64,
    map_failures: AtomicU64,
    throttle_waits: AtomicU64,
    throttle_wait_ns: AtomicU64,
    conv_4k: AtomicU64,
    conv_2m: AtomicU64,
    conv_other: AtomicU64,
    shared: AtomicU64,
    shared_peak: AtomicU64,
    transient_maps: AtomicU64,
    grow_events: AtomicU64,
    shrink_events: AtomicU64,
    // Not in PoolReport:
    bad_calls: AtomicU64,
    refused_conversions: AtomicU64,
    convert_calls: AtomicU64,
    convert_errors: AtomicU64,
    throttle_timeouts: AtomicU64,
    coherent: AtomicU64,
    leaked: AtomicU64,
    grow_failures: AtomicU64,
}

/// Figures [`PoolReport`] has no field for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExtraStats {
    /// Calls refused because their address or length named no live mapping / allocation
    /// (bad unmap, sync or free_coherent).
    pub bad_calls: u64,
    /// Conversions the policy refused to issue (aligned-2m: not 2 MiB aligned and sized).
    pub refused_conversions: u64,
    /// Calls to `Platform::convert` (each may carry many ranges).
    pub convert_calls: u64,
    /// Calls to `Platform::convert` that failed.
    pub convert_errors: u64,
    /// Blocking maps that gave up after the wait bound (throttle).
    pub throttle_timeouts: u64,
    /// Bytes of live coherent allocations.
    pub coherent_bytes: u64,
    /// Bytes left shared and never freed because converting them back failed.
    pub leaked_bytes: u64,
    /// Growth steps that failed (no memory, conversion refused or failed, table full).
    pub grow_failures: u64,
}

/// Size class of one conversion range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvClass {
    /// Exactly 4 KiB.
    K4,
    /// 2 MiB aligned and a multiple of 2 MiB.
    M2,
    /// Anything else.
    Other,
}

impl ConvClass {
    /// The class of `[addr, addr + len)`.
    pub const fn of(addr: u64, len: u64) -> Self {
        if len == 4096 {
            ConvClass::K4
        } else if len != 0
            && addr.is_multiple_of(HUGE_PAGE_SIZE)
            && len.is_multiple_of(HUGE_PAGE_SIZE)
        {
            ConvClass::M2
        } else {
            ConvClass::Other
        }
    }
}

impl Stats {
    /// All zero.
    pub const fn new() -> Self {
        Stats {
            used: AtomicU64::new(0),
            high_water: AtomicU64::new(0),
            capacity: AtomicU64::new(0),
            maps: AtomicU64::new(0),
            map_failures: AtomicU64::new(0),
            throttle_waits: AtomicU64::new(0),
            throttle_wait_ns: AtomicU64::new(0),
            conv_4k: AtomicU64::new(0),
            conv_2m: AtomicU64::new(0),
            conv_other: AtomicU64::new(0),
            shared: AtomicU64::new(0),
            shared_peak: AtomicU64::new(0),
            transient_maps: AtomicU64::new(0),
            grow_events: AtomicU64::new(0),
            shrink_events: AtomicU64::new(0),
            bad_calls: AtomicU64::new(0),
            refused_conversions: AtomicU64::new(0),
            convert_calls: AtomicU64::new(0),
            convert_errors: AtomicU64::new(0),
            throttle_timeouts: AtomicU64::new(0),
            coherent: AtomicU64::new(0),
            leaked: AtomicU64::new(0),
            grow_failures: AtomicU64::new(0),
        }
    }

    /// A map succeeded and holds `bytes` of pool memory.
    pub fn map_ok(&self, bytes: u64) {
        self.maps.fetch_add(1, Relaxed);
        let now = self.used.fetch_add(bytes, Relaxed) + bytes;
        if now > self.high_water.load(Relaxed) {
            self.high_water.fetch_max(now, Relaxed);
        }
    }

    /// A map failed.
    pub fn map_failed(&self) {
        self.map_failures.fetch_add(1, Relaxed);
    }

    /// An unmap released `bytes` of pool memory.
    pub fn unmapped(&self, bytes: u64) {
        self.used.fetch_sub(bytes, Relaxed);
    }

    /// Bytes held by live mappings now.
    pub fn used(&self) -> u64 {
        self.used.load(Relaxed)
    }

    /// Pool capacity grew (`+`) or shrank.
    pub fn capacity_add(&self, bytes: u64) {
        self.capacity.fetch_add(bytes, Relaxed);
    }

    /// Pool capacity shrank.
    pub fn capacity_sub(&self, bytes: u64) {
        self.capacity.fetch_sub(bytes, Relaxed);
    }

    /// Total capacity now.
    pub fn capacity(&self) -> u64 {
        self.capacity.load(Relaxed)
    }

    /// A map waited `ns` (throttle).
    pub fn waited(&self, ns: u64) {
        self.throttle_waits.fetch_add(1, Relaxed);
        self.throttle_wait_ns.fetch_add(ns, Relaxed);
    }

    /// A blocking map gave up after the wait bound.
    pub fn wait_timed_out(&self) {
        self.throttle_timeouts.fetch_add(1, Relaxed);
    }

    /// One range was issued to the host.
    pub fn conversion_issued(&self, addr: u64, len: u64) {
        let c = match ConvClass::of(addr, len) {
            ConvClass::K4 => &self.conv_4k,
            ConvClass::M2 => &self.conv_2m,
            ConvClass::Other => &self.conv_other,
        };
        c.fetch_add(1, Relaxed);
    }

    /// One call to `Platform::convert`, successful or not.
    pub fn convert_call(&self, ok: bool) {
        self.convert_calls.fetch_add(1, Relaxed);
        if !ok {
            self.convert_errors.fetch_add(1, Relaxed);
        }
    }

    /// `bytes` became shared (`to_shared`) or private.
    pub fn shared_changed(&self, bytes: u64, to_shared: bool) {
        if to_shared {
            let now = self.shared.fetch_add(bytes, Relaxed) + bytes;
            self.shared_peak.fetch_max(now, Relaxed);
        } else {
            self.shared.fetch_sub(bytes, Relaxed);
        }
    }

    /// A conversion was refused before being issued.
    pub fn conversion_refused(&self) {
        self.refused_conversions.fetch_add(1, Relaxed);
    }

    /// A transient buffer was handed out.
    pub fn transient_map(&self) {
        self.transient_maps.fetch_add(1, Relaxed);
    }

    /// The pool grew.
    pub fn grew(&self) {
        self.grow_events.fetch_add(1, Relaxed);
    }

    /// A growth step failed.
    pub fn grow_failed(&self) {
        self.grow_failures.fetch_add(1, Relaxed);
    }

    /// The pool shrank.
    pub fn shrank(&self) {
        self.shrink_events.fetch_add(1, Relaxed);
    }

    /// A call named no live mapping or allocation.
    pub fn bad_call(&self) {
        self.bad_calls.fetch_add(1, Relaxed);
    }

    /// Coherent memory handed out (`+`) or returned.
    pub fn coherent_changed(&self, bytes: u64, alloc: bool) {
        if alloc {
            self.coherent.fetch_add(bytes, Relaxed);
        } else {
            self.coherent.fetch_sub(bytes, Relaxed);
        }
    }

    /// Coherent bytes handed out now.
    pub fn coherent(&self) -> u64 {
        self.coherent.load(Relaxed)
    }

    /// Shared memory that could not be converted back and is kept out of circulation.
    pub fn leaked(&self, bytes: u64) {
        self.leaked.fetch_add(bytes, Relaxed);
    }

    /// The wire record for policy `name` (truncated to `POLICY_NAME_MAX` bytes) with the
    /// policy's claims `flags` (`abi::POOL_FLAG_*`). The driver fields (`io_requests`,
    /// `io_errors`) are left 0 for the caller to fill.
    pub fn report(&self, name: &str, flags: u64) -> PoolReport {
        let mut policy = [0u8; POLICY_NAME_MAX];
        let n = name.len().min(POLICY_NAME_MAX);
        policy[..n].copy_from_slice(&name.as_bytes()[..n]);
        PoolReport {
            version: POOL_REPORT_VERSION,
            policy_len: n as u32,
            policy,
            used_bytes: self.used.load(Relaxed),
            high_water_bytes: self.high_water.load(Relaxed),
            capacity_bytes: self.capacity.load(Relaxed),
            maps: self.maps.load(Relaxed),
            map_failures: self.map_failures.load(Relaxed),
            throttle_waits: self.throttle_waits.load(Relaxed),
            throttle_wait_ns: self.throttle_wait_ns.load(Relaxed),
            conversions_4k: self.conv_4k.load(Relaxed),
            conversions_2m: self.conv_2m.load(Relaxed),
            conversions_other: self.conv_other.load(Relaxed),
            shared_bytes: self.shared.load(Relaxed),
            shared_peak_bytes: self.shared_peak.load(Relaxed),
            transient_maps: self.transient_maps.load(Relaxed),
            grow_events: self.grow_events.load(Relaxed),
            shrink_events: self.shrink_events.load(Relaxed),
            io_requests: 0,
            io_errors: 0,
            flags,
        }
    }

    /// The figures [`PoolReport`] lacks.
    pub fn extra(&self) -> ExtraStats {
        ExtraStats {
            bad_calls: self.bad_calls.load(Relaxed),
            refused_conversions: self.refused_conversions.load(Relaxed),
            convert_calls: self.convert_calls.load(Relaxed),
            convert_errors: self.convert_errors.load(Relaxed),
            throttle_timeouts: self.throttle_timeouts.load(Relaxed),
            coherent_bytes: self.coherent.load(Relaxed),
            leaked_bytes: self.leaked.load(Relaxed),
            grow_failures: self.grow_failures.load(Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        assert_eq!(ConvClass::of(0x1000, 4096), ConvClass::K4);
        assert_eq!(ConvClass::of(0x20_0000, 4096), ConvClass::K4);
        assert_eq!(ConvClass::of(0x20_0000, 0x20_0000), ConvClass::M2);
        assert_eq!(ConvClass::of(0x40_0000, 0x60_0000), ConvClass::M2);
        assert_eq!(ConvClass::of(0x21_0000, 0x20_0000), ConvClass::Other);
        assert_eq!(ConvClass::of(0x20_0000, 0x2000), ConvClass::Other);
        assert_eq!(ConvClass::of(0, 0), ConvClass::Other);
    }

    #[test]
    fn report_adds_up() {
        let s = Stats::new();
        s.map_ok(4096);
        s.map_ok(2048);
        s.unmapped(4096);
        s.map_failed();
        s.shared_changed(1 << 20, true);
        s.shared_changed(4096, false);
        s.conversion_issued(0x20_0000, 0x20_0000);
        let r = s.report("legacy", 0);
        assert_eq!(&r.policy[..r.policy_len as usize], b"legacy");
        assert_eq!(r.used_bytes, 2048);
        assert_eq!(r.high_water_bytes, 6144);
        assert_eq!(r.maps, 2);
        assert_eq!(r.map_failures, 1);
        assert_eq!(r.shared_bytes, (1 << 20) - 4096);
        assert_eq!(r.shared_peak_bytes, 1 << 20);
        assert_eq!(r.conversions_2m, 1);
        let long = s.report("a-very-long-policy-name", 0);
        assert_eq!(long.policy_len as usize, POLICY_NAME_MAX);
    }
}
