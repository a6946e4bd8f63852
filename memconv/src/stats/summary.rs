//! The human-readable statistics table ([`StatsSnapshot::summary`], also its `Display`), whose
//! lines the run summary prints and tests grep.

use std::fmt::{self, Write as _};

use super::units::{duration, mib};
use super::StatsSnapshot;

impl StatsSnapshot {
    /// A readable multi-line table.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "memconv: {} MiB RAM, private={} shared={} granularity={}, up {:.1} s",
            self.ram_bytes >> 20,
            self.private_store.kind,
            self.shared_store.kind,
            self.granularity,
            self.uptime_ms as f64 / 1000.0
        );
        let _ = writeln!(
            s,
            "  conversions        {:>10} {:>10} {:>10} {:>10}",
            "4k", "sub2m", "2m", "total"
        );
        for (name, c) in [
            ("to_shared", &self.to_shared),
            ("to_private", &self.to_private),
        ] {
            let _ = writeln!(
                s,
                "    {:<16} {:>10} {:>10} {:>10} {:>10}",
                name,
                c.k4,
                c.sub2m,
                c.m2,
                c.total()
            );
        }
        let _ = writeln!(
            s,
            "  pages converted {} (no-op {}), accepts {} entries / {} units, double-accept violations {}",
            self.pages_converted,
            self.noop_pages,
            self.accept_entries,
            self.accepted_units,
            self.double_accept_violations
        );
        let l = &self.lifecycle;
        let _ = writeln!(
            s,
            "  lifecycle platform={}{}: accepted {:.1} MiB now ({} pages in total), {} chunks unaccepted, rescinds {} ({} pages), refused accept_shared={} must_rescind={}, unaccepted accesses {}{}",
            l.platform,
            if l.prealloc { " prealloc" } else { "" },
            mib(l.accepted_bytes),
            l.accepted_pages,
            l.unaccepted_chunks,
            l.rescind_entries,
            l.rescinded_pages,
            l.accept_shared_refusals,
            l.must_rescind_refusals,
            l.unaccepted_accesses,
            l.unaccepted_access_gpa
                .map(|g| format!(" (first at gpa {g:#x})"))
                .unwrap_or_default()
        );
        let _ = writeln!(
            s,
            "  doorbells {} carrying {} ranges ({:.2} ranges/exit), hypercalls {}, bad mailboxes {}",
            self.doorbells, self.mailbox_ranges, self.ranges_per_exit, self.hypercalls, self.bad_mailboxes
        );
        let _ = writeln!(
            s,
            "  rejects {}{}",
            self.rejects_total,
            self.rejects_by_reason()
        );
        let _ = writeln!(
            s,
            "  store      {:>8} {:>12} {:>12} {:>12} {:>12}",
            "kind", "owned MiB", "bound MiB", "kernel MiB", "resident MiB"
        );
        for (name, u) in [
            ("private", &self.private_store),
            ("shared", &self.shared_store),
        ] {
            let _ = writeln!(
                s,
                "    {:<8} {:>8} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
                name,
                u.kind.as_str(),
                mib(u.owned_bytes),
                mib(u.engine_bound_bytes),
                mib(u.kernel_bytes),
                mib(u.kernel_resident_bytes)
            );
        }
        let d = &self.double_alloc;
        // The kernel's figure is the measurement; the engine's is an upper bound that holds
        // exactly only when both stores release at the same granularity.
        let (cmp, verdict) = if d.kernel_within_bound {
            ("<=", "within bound")
        } else {
            (">", "OVER BOUND")
        };
        let exact = if d.agree {
            "bound exact"
        } else {
            "bound not reached"
        };
        let _ = writeln!(
            s,
            "  double allocation: kernel-measured {:.1} MiB {cmp} engine bound {:.1} MiB: {verdict} ({exact}); bound peak {:.1} MiB, {:.1} MiB*s",
            mib(d.kernel_bytes),
            mib(d.computed_bytes),
            mib(d.computed_peak_bytes),
            d.computed_byte_seconds / (1u64 << 20) as f64,
        );
        let _ = writeln!(
            s,
            "  mixed chunks {} (peak {}), memslots {} ({} edits), vcpu pauses {}, punch failures {}, unrecovered {}",
            self.mixed_chunks,
            self.mixed_chunks_peak,
            self.memslots,
            self.memslot_edits,
            self.vcpu_pauses,
            self.punch_failures,
            self.unrecovered_failures
        );
        let f = &self.fence;
        let _ = writeln!(
            s,
            "  dma fence: pins {} (busy {}), conversions that waited for device accesses {} (busy {}, longest {})",
            f.pins,
            f.pins_busy,
            f.conversion_waits,
            f.conversions_busy,
            duration(f.wait_max_ns)
        );
        let l = &self.latency;
        let _ = writeln!(
            s,
            "  latency: n={} mean {}, p50 <= {}, p99 <= {}, max {}",
            l.count,
            duration(l.mean_ns),
            duration(l.p50_ns_le),
            duration(l.p99_ns_le),
            duration(l.max_ns)
        );
        if let Some(p) = &self.pool_report {
            let _ = writeln!(
                s,
                "  guest pool '{}': used {:.1} / {:.1} MiB (high water {:.1}), shared {:.1} MiB (peak {:.1}), maps {} failures {}, throttle waits {} ({})",
                p.policy,
                mib(p.used_bytes),
                mib(p.capacity_bytes),
                mib(p.high_water_bytes),
                mib(p.shared_bytes),
                mib(p.shared_peak_bytes),
                p.maps,
                p.map_failures,
                p.throttle_waits,
                duration(p.throttle_wait_ns)
            );
        }
        for e in &self.kernel_query_errors {
            let _ = writeln!(s, "  kernel query error: {e}");
        }
        s
    }
}

impl fmt::Display for StatsSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}
