//! The readable `stats` table of `vmm ctl SOCKET stats`: counters, and with an earlier snapshot
//! (`--watch`), rates.

use memconv::stats::units::{duration, mib};

use crate::api::protocol::StatsView;

/// A counter read from an earlier snapshot (for a rate).
type Counter = fn(&StatsView) -> u64;

/// A readable table of a `stats` reply; with an earlier snapshot, rates.
pub fn render_table(s: &StatsView, prev: Option<&StatsView>) -> String {
    use std::fmt::Write as _;
    let m = &s.memconv;
    // Seconds between the snapshots (none when it is the same one).
    let prev = prev
        .filter(|p| p.uptime_ms < s.uptime_ms)
        .map(|p| ((s.uptime_ms - p.uptime_ms) as f64 / 1e3, p));
    let mut o = String::new();
    let _ = writeln!(
        o,
        "VM {}: up {:.1} s{}, {} vCPU{}, {} MiB RAM, granularity {}, stores private={} shared={}",
        s.state,
        s.uptime_ms as f64 / 1e3,
        if s.age_ms > 0 {
            format!(" (snapshot {} ms old)", s.age_ms)
        } else {
            String::new()
        },
        s.cpus,
        if s.cpus == 1 { "" } else { "s" },
        m.ram_bytes >> 20,
        m.granularity,
        m.private_store.kind,
        m.shared_store.kind
    );
    let rate = |now: u64, then: fn(&StatsView) -> u64| -> String {
        match prev {
            Some((dt, p)) if dt > 0.0 => {
                format!("{:>12.0}", now.saturating_sub(then(p)) as f64 / dt)
            }
            _ => format!("{:>12}", "-"),
        }
    };
    let _ = writeln!(
        o,
        "conversions   {:>10} {:>10} {:>10} {:>10} {:>12}",
        "4k", "sub2m", "2m", "total", "per second"
    );
    let directions: [(&str, _, Counter); 2] = [
        ("to_shared", &m.to_shared, |p| p.memconv.to_shared.total()),
        ("to_private", &m.to_private, |p| {
            p.memconv.to_private.total()
        }),
    ];
    for (name, c, then) in directions {
        let _ = writeln!(
            o,
            "  {name:<12}{:>10} {:>10} {:>10} {:>10} {}",
            c.k4,
            c.sub2m,
            c.m2,
            c.total(),
            rate(c.total(), then)
        );
    }
    let _ = writeln!(
        o,
        "pages converted {} (no-op {}), doorbells {} carrying {} ranges ({:.1}/exit), hypercalls {}",
        m.pages_converted,
        m.noop_pages,
        m.doorbells,
        m.mailbox_ranges,
        m.ranges_per_exit,
        m.hypercalls
    );
    let _ = writeln!(
        o,
        "rejects {}{}, accepts {} ({} units), double-accept violations {}",
        m.rejects_total,
        m.rejects_by_reason(),
        m.accept_entries,
        m.accepted_units,
        m.double_accept_violations
    );
    let l = &m.latency;
    let _ = writeln!(
        o,
        "latency: n={} mean {}, p50 <= {}, p99 <= {}, max {}",
        l.count,
        duration(l.mean_ns),
        duration(l.p50_ns_le),
        duration(l.p99_ns_le),
        duration(l.max_ns)
    );
    let _ = writeln!(
        o,
        "memory MiB  {:>8} {:>8} {:>8} {:>8}",
        "owned", "bound", "kernel", "resident"
    );
    for (side, u) in [("private", &m.private_store), ("shared", &m.shared_store)] {
        let _ = writeln!(
            o,
            "  {side:<9} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            mib(u.owned_bytes),
            mib(u.engine_bound_bytes),
            mib(u.kernel_bytes),
            mib(u.kernel_resident_bytes)
        );
    }
    let d = &m.double_alloc;
    let _ = writeln!(
        o,
        "double allocation: kernel-measured {:.1} MiB, engine bound {:.1} MiB (peak {:.1}); mixed chunks {} (peak {}), memslots {}, vcpu pauses {}",
        mib(d.kernel_bytes),
        mib(d.computed_bytes),
        mib(d.computed_peak_bytes),
        m.mixed_chunks,
        m.mixed_chunks_peak,
        m.memslots,
        s.vcpu_pauses
    );
    const REASONS: [&str; 9] = [
        "total",
        "io_out",
        "io_in",
        "serial",
        "doorbell",
        "mmio",
        "hlt",
        "hypercall",
        "interrupted",
    ];
    let _ = write!(o, "exits  cpu");
    for r in REASONS {
        let _ = write!(o, " {r:>11}");
    }
    let _ = writeln!(o);
    for (cpu, e) in s.exits.iter().enumerate() {
        let _ = write!(o, "       {cpu:>3}");
        for r in REASONS {
            let _ = write!(o, " {:>11}", e.get(r).copied().unwrap_or(0));
        }
        let _ = writeln!(o);
    }
    if let Some((dt, p)) = prev {
        if dt > 0.0 {
            let _ = writeln!(
                o,
                "       exits/s {:.0}",
                s.exits_total.saturating_sub(p.exits_total) as f64 / dt
            );
        }
    }
    match &m.pool_report {
        Some(p) => {
            let _ = writeln!(
                o,
                "guest pool '{}': used {:.1} / {:.1} MiB (high water {:.1}), shared {:.1} MiB (peak {:.1}), maps {} failures {}, throttle waits {} ({}), conversions 4k {} 2m {} other {}",
                p.policy,
                mib(p.used_bytes),
                mib(p.capacity_bytes),
                mib(p.high_water_bytes),
                mib(p.shared_bytes),
                mib(p.shared_peak_bytes),
                p.maps,
                p.map_failures,
                p.throttle_waits,
                duration(p.throttle_wait_ns),
                p.conversions_4k,
                p.conversions_2m,
                p.conversions_other
            );
        }
        None => {
            let _ = writeln!(o, "guest pool: no report yet");
        }
    }
    if let Some(d) = &s.disk {
        let _ = writeln!(
            o,
            "disk {}: requests {} (reads {}, writes {}), errors {} (io errors {}), violations {}, device faults {}",
            d.path,
            d.requests,
            d.reads,
            d.writes,
            d.errors,
            d.io_errors,
            d.violations,
            d.device_faults
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_renders_with_and_without_rates() {
        let s = StatsView {
            state: "running".into(),
            cpus: 1,
            exits: vec![[("total".to_string(), 10u64)].into_iter().collect()],
            exits_total: 10,
            ..StatsView::default()
        };
        let first = render_table(&s, None);
        assert_eq!(
            render_table(&s, Some(&s)),
            first,
            "no rates from one snapshot"
        );
        assert!(first.contains("VM running"), "{first}");
        assert!(first.contains("guest pool: no report yet"));
        let mut later = s.clone();
        later.memconv.to_shared.k4 = 500;
        later.exits_total = 30;
        later.uptime_ms = s.uptime_ms + 500;
        let t = render_table(&later, Some(&s));
        assert!(t.contains("1000"), "{t}");
        assert!(t.contains("exits/s 40"), "{t}");
        assert!(!t.contains("disk "), "no disk line without a disk: {t}");
        later.disk = Some(crate::devices::BlkStats {
            path: "d.img".into(),
            errors: 2,
            io_errors: 2,
            ..Default::default()
        });
        let t = render_table(&later, None);
        assert!(t.contains("disk d.img: requests 0"), "{t}");
        assert!(t.contains("errors 2 (io errors 2)"), "{t}");
    }
}
