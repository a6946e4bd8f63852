//! Prometheus text exposition (format 0.0.4) of a `stats` reply, for `vmm ctl SOCKET metrics`:
//! suitable for node_exporter's textfile collector (`vmm ctl ... metrics > dir/vm.prom.tmp &&
//! mv dir/vm.prom.tmp dir/vm.prom`). Every family has HELP and TYPE lines; names carry their
//! unit (`_bytes`, `_seconds`) and counters end in `_total`. Extra constant labels (e.g.
//! `vm="web1"`) tell several VMs apart in one collector directory. The same text, in the
//! OpenMetrics 1.0 spelling ([`Format::OpenMetrics`]: counter families named without
//! `_total`, `# EOF` at the end), is what `vmm run --metrics-addr` serves to a scraper that
//! asks for it.

use std::fmt::Write as _;

use crate::api::protocol::StatsView;
use crate::devices::BlkStats;

/// Errors in what the user asks to render.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A label given with `--label` is not `name=value` with a valid Prometheus label name.
    #[error("--label {0:?}: expected NAME=VALUE with NAME matching [a-zA-Z_][a-zA-Z0-9_]* (not starting with __)")]
    BadLabel(String),
}

/// Constant labels added to every sample.
#[derive(Clone, Debug, Default)]
pub struct Labels(Vec<(String, String)>);

impl Labels {
    /// Parses `NAME=VALUE` items.
    pub fn parse(items: &[String]) -> Result<Self, MetricsError> {
        let mut out = Vec::new();
        for item in items {
            let Some((name, value)) = item.split_once('=') else {
                return Err(MetricsError::BadLabel(item.clone()));
            };
            if !valid_label_name(name) {
                return Err(MetricsError::BadLabel(item.clone()));
            }
            out.push((name.to_string(), value.to_string()));
        }
        Ok(Labels(out))
    }
}

fn valid_label_name(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && !name.starts_with("__")
}

/// Escapes a label value: backslash, double quote, newline.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Formats a sample value (integers without a fraction; non-finite as Prometheus spells them).
fn value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// Which exposition format to write.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format 0.0.4 (`text/plain; version=0.0.4`).
    #[default]
    Prometheus,
    /// OpenMetrics 1.0 text (`application/openmetrics-text; version=1.0.0`).
    OpenMetrics,
}

impl Format {
    /// The HTTP `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Builds the exposition text, family by family.
struct Writer<'a> {
    out: String,
    constant: &'a Labels,
    format: Format,
}

impl Writer<'_> {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        // OpenMetrics names a counter family without the `_total` of its sample.
        let name = match (self.format, kind) {
            (Format::OpenMetrics, "counter") => name.strip_suffix("_total").unwrap_or(name),
            _ => name,
        };
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], v: f64) {
        self.out.push_str(name);
        let all: Vec<(&str, &str)> = self
            .constant
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(labels.iter().copied())
            .collect();
        if !all.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in all.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{k}=\"{}\"", escape(v));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {}", value(v));
    }

    /// A family with one unlabelled sample.
    fn single(&mut self, name: &str, kind: &str, help: &str, v: f64) {
        self.family(name, kind, help);
        self.sample(name, &[], v);
    }
}

/// Upper bounds (inclusive, nanoseconds) of the conversion latency histogram's buckets:
/// memconv's log2 buckets hold values below 2^k ns, i.e. at most 2^k - 1 ns, k = 8..=34
/// (256 ns .. ~17 s). The set is fixed so that every scrape has the same buckets.
const LATENCY_BOUNDS_LOG2: std::ops::RangeInclusive<u32> = 8..=34;

/// Renders a `stats` reply in the Prometheus text format.
pub fn render(s: &StatsView, constant: &Labels) -> String {
    render_as(s, constant, Format::Prometheus)
}

/// Renders a `stats` reply in `format`.
pub fn render_as(s: &StatsView, constant: &Labels, format: Format) -> String {
    let mut w = Writer {
        out: String::new(),
        constant,
        format,
    };
    let m = &s.memconv;

    w.single(
        "vmm_uptime_seconds",
        "gauge",
        "Time since the VM was created.",
        s.uptime_ms as f64 / 1e3,
    );
    w.single("vmm_vcpus", "gauge", "Number of vCPUs.", f64::from(s.cpus));
    w.family(
        "vmm_state",
        "gauge",
        "VM state: 1 for the current one (running, paused or ending).",
    );
    for state in ["running", "paused", "ending"] {
        let v = if s.state == state { 1.0 } else { 0.0 };
        w.sample("vmm_state", &[("state", state)], v);
    }
    w.family(
        "vmm_vcpu_exits_total",
        "counter",
        "vCPU exits out of KVM_RUN by reason; reason=\"total\" counts all of them, and serial, doorbell and unknown_port exits are also counted in io_out or io_in, doorbell_mismatch (refused doorbells) also in doorbell.",
    );
    for (cpu, exits) in s.exits.iter().enumerate() {
        let cpu = cpu.to_string();
        for (reason, n) in exits {
            w.sample(
                "vmm_vcpu_exits_total",
                &[("cpu", &cpu), ("reason", reason)],
                *n as f64,
            );
        }
    }
    w.single(
        "vmm_vcpu_pauses_total",
        "counter",
        "Times all vCPUs were paused (memslot edits and control-socket pauses).",
        s.vcpu_pauses as f64,
    );

    w.single(
        "memconv_ram_bytes",
        "gauge",
        "Guest RAM size.",
        m.ram_bytes as f64,
    );
    w.family(
        "memconv_conversions_total",
        "counter",
        "Successful conversions by direction and size class (4k: one page; 2m: 2 MiB aligned multiples; sub2m: the rest).",
    );
    for (direction, sizes) in [("to_shared", &m.to_shared), ("to_private", &m.to_private)] {
        for (size, n) in [("4k", sizes.k4), ("sub2m", sizes.sub2m), ("2m", sizes.m2)] {
            w.sample(
                "memconv_conversions_total",
                &[("direction", direction), ("size", size)],
                n as f64,
            );
        }
    }
    w.single(
        "memconv_converted_pages_total",
        "counter",
        "4 KiB pages whose private/shared attribute changed.",
        m.pages_converted as f64,
    );
    w.single(
        "memconv_noop_pages_total",
        "counter",
        "4 KiB pages a conversion found already in the requested state.",
        m.noop_pages as f64,
    );
    w.family(
        "memconv_rejects_total",
        "counter",
        "Requests rejected, by error code.",
    );
    for r in &m.rejects {
        w.sample(
            "memconv_rejects_total",
            &[("code", &r.name)],
            r.count as f64,
        );
    }
    w.single(
        "memconv_accept_entries_total",
        "counter",
        "Successful ACCEPT entries.",
        m.accept_entries as f64,
    );
    w.single(
        "memconv_accepted_units_total",
        "counter",
        "2 MiB units accepted.",
        m.accepted_units as f64,
    );
    w.single(
        "memconv_double_accept_violations_total",
        "counter",
        "Attempts to accept a 2 MiB unit twice (security violations).",
        m.double_accept_violations as f64,
    );
    w.single(
        "memconv_doorbells_total",
        "counter",
        "Mailbox doorbell exits serviced.",
        m.doorbells as f64,
    );
    w.single(
        "memconv_mailbox_ranges_total",
        "counter",
        "Ranges carried by mailbox doorbells.",
        m.mailbox_ranges as f64,
    );
    w.single(
        "memconv_bad_mailboxes_total",
        "counter",
        "Mailboxes rejected whole.",
        m.bad_mailboxes as f64,
    );
    w.single(
        "memconv_hypercalls_total",
        "counter",
        "Conversions through KVM_HC_MAP_GPA_RANGE exits.",
        m.hypercalls as f64,
    );
    let stores = [("private", &m.private_store), ("shared", &m.shared_store)];
    for (name, help, get) in [
        (
            "memconv_store_owned_bytes",
            "Guest memory the attribute bitmap gives to this side.",
            (|u: &memconv::stats::StoreUsage| u.owned_bytes) as fn(&_) -> u64,
        ),
        (
            "memconv_store_engine_bound_bytes",
            "Upper bound of what the engine may have left allocated on this side.",
            |u| u.engine_bound_bytes,
        ),
        (
            "memconv_store_kernel_bytes",
            "Bytes the kernel has allocated to this side's store file.",
            |u| u.kernel_bytes,
        ),
        (
            "memconv_store_kernel_resident_bytes",
            "Bytes of this side's store the kernel reports resident.",
            |u| u.kernel_resident_bytes,
        ),
    ] {
        w.family(name, "gauge", help);
        for (side, u) in stores {
            w.sample(
                name,
                &[("side", side), ("store", u.kind.as_str())],
                get(u) as f64,
            );
        }
    }
    let d = &m.double_alloc;
    w.family(
        "memconv_double_alloc_bytes",
        "gauge",
        "Guest memory allocated in both stores: the engine's figure (an upper bound) and the kernel's.",
    );
    w.sample(
        "memconv_double_alloc_bytes",
        &[("source", "computed")],
        d.computed_bytes as f64,
    );
    w.sample(
        "memconv_double_alloc_bytes",
        &[("source", "kernel")],
        d.kernel_bytes as f64,
    );
    w.single(
        "memconv_double_alloc_peak_bytes",
        "gauge",
        "Peak of the engine's double-allocation figure.",
        d.computed_peak_bytes as f64,
    );
    w.single(
        "memconv_double_alloc_byte_seconds_total",
        "counter",
        "Integral over time of the engine's double-allocation figure.",
        d.computed_byte_seconds,
    );
    w.single(
        "memconv_mixed_chunks",
        "gauge",
        "2 MiB chunks holding both private and shared pages.",
        m.mixed_chunks as f64,
    );
    w.single(
        "memconv_mixed_chunks_peak",
        "gauge",
        "Peak of memconv_mixed_chunks.",
        m.mixed_chunks_peak as f64,
    );
    w.single(
        "memconv_memslots",
        "gauge",
        "KVM memslots installed.",
        m.memslots as f64,
    );
    w.single(
        "memconv_memslot_edits_total",
        "counter",
        "KVM memslot edits.",
        m.memslot_edits as f64,
    );
    w.single(
        "memconv_punch_failures_total",
        "counter",
        "Punches of the old side that failed (memory not released).",
        m.punch_failures as f64,
    );
    w.single(
        "memconv_unrecovered_failures_total",
        "counter",
        "Conversions that failed midway and could not be rolled back.",
        m.unrecovered_failures as f64,
    );

    let l = &m.latency;
    w.family(
        "memconv_conversion_latency_seconds",
        "histogram",
        "Host time per conversion (log2 buckets; _sum is count x mean, within 1 ns per conversion).",
    );
    for k in LATENCY_BOUNDS_LOG2 {
        let lt = 1u64 << k;
        let cumulative: u64 = l
            .buckets
            .iter()
            .filter(|b| b.lt_ns <= lt)
            .map(|b| b.count)
            .sum();
        let le = value((lt - 1) as f64 / 1e9);
        w.sample(
            "memconv_conversion_latency_seconds_bucket",
            &[("le", &le)],
            cumulative as f64,
        );
    }
    w.sample(
        "memconv_conversion_latency_seconds_bucket",
        &[("le", "+Inf")],
        l.count as f64,
    );
    w.sample(
        "memconv_conversion_latency_seconds_sum",
        &[],
        l.mean_ns as f64 * l.count as f64 / 1e9,
    );
    w.sample(
        "memconv_conversion_latency_seconds_count",
        &[],
        l.count as f64,
    );
    w.single(
        "memconv_conversion_latency_max_seconds",
        "gauge",
        "Slowest conversion so far.",
        l.max_ns as f64 / 1e9,
    );

    if let Some(p) = &m.pool_report {
        let policy = [("policy", p.policy.as_str())];
        let gauges = [
            (
                "guest_pool_used_bytes",
                "Bounce-buffer bytes the guest has mapped now.",
                p.used_bytes,
            ),
            (
                "guest_pool_high_water_bytes",
                "Peak of guest_pool_used_bytes.",
                p.high_water_bytes,
            ),
            (
                "guest_pool_capacity_bytes",
                "Bounce-buffer pool capacity (all pools).",
                p.capacity_bytes,
            ),
            (
                "guest_pool_shared_bytes",
                "Guest memory the pool holds shared now.",
                p.shared_bytes,
            ),
            (
                "guest_pool_shared_peak_bytes",
                "Peak of guest_pool_shared_bytes.",
                p.shared_peak_bytes,
            ),
        ];
        for (name, help, v) in gauges {
            w.family(name, "gauge", help);
            w.sample(name, &policy, v as f64);
        }
        let counters = [
            ("guest_pool_maps_total", "Successful maps.", p.maps),
            (
                "guest_pool_map_failures_total",
                "Failed maps.",
                p.map_failures,
            ),
            (
                "guest_pool_throttle_waits_total",
                "Maps that waited for pool space (throttle).",
                p.throttle_waits,
            ),
            (
                "guest_pool_transient_maps_total",
                "Transient buffers handed out (dynamic).",
                p.transient_maps,
            ),
            (
                "guest_pool_grow_events_total",
                "Pool growth steps.",
                p.grow_events,
            ),
            (
                "guest_pool_shrink_events_total",
                "Pool shrink steps.",
                p.shrink_events,
            ),
            (
                "guest_pool_io_requests_total",
                "I/O requests completed by the guest driver.",
                p.io_requests,
            ),
            (
                "guest_pool_io_errors_total",
                "I/O errors seen by the guest driver.",
                p.io_errors,
            ),
        ];
        for (name, help, v) in counters {
            w.family(name, "counter", help);
            w.sample(name, &policy, v as f64);
        }
        w.single_labelled(
            "guest_pool_throttle_wait_seconds_total",
            "counter",
            "Time maps spent waiting for pool space.",
            &policy,
            p.throttle_wait_ns as f64 / 1e9,
        );
        w.family(
            "guest_pool_conversions_total",
            "counter",
            "Conversions the guest pool issued, by size class (as the guest reports them).",
        );
        for (size, n) in [
            ("4k", p.conversions_4k),
            ("2m", p.conversions_2m),
            ("other", p.conversions_other),
        ] {
            w.sample(
                "guest_pool_conversions_total",
                &[("policy", p.policy.as_str()), ("size", size)],
                n as f64,
            );
        }
    }
    render_lifecycle(&mut w, &m.lifecycle);
    if let Some(d) = &s.disk {
        render_disk(&mut w, d);
    }
    if format == Format::OpenMetrics {
        w.out.push_str("# EOF\n");
    }
    w.out
}

/// The acceptance lifecycle's families (`memconv_lifecycle_*`), labelled with the platform.
fn render_lifecycle(w: &mut Writer<'_>, l: &memconv::stats::LifecycleSnapshot) {
    let platform = [("platform", l.platform.as_str())];
    let gauges: [(&str, &str, u64); 3] = [
        (
            "memconv_lifecycle_accepted_bytes",
            "Private memory accepted (validated) now, boot image included.",
            l.accepted_bytes,
        ),
        (
            "memconv_lifecycle_unaccepted_chunks",
            "2 MiB chunks out of the guest's view now (private, nothing accepted, no backing).",
            l.unaccepted_chunks,
        ),
        (
            "memconv_lifecycle_private_backing_bound_bytes",
            "Most the private store may hold now for what is accepted (all private RAM with --prealloc).",
            l.private_backing_bound_bytes,
        ),
    ];
    for (name, help, v) in gauges {
        w.single_labelled(name, "gauge", help, &platform, v as f64);
    }
    let counters: [(&str, &str, u64); 6] = [
        (
            "memconv_lifecycle_accepted_pages_total",
            "4 KiB pages the guest accepted (validated).",
            l.accepted_pages,
        ),
        (
            "memconv_lifecycle_rescinded_pages_total",
            "4 KiB pages the guest rescinded (SNP) before sharing them.",
            l.rescinded_pages,
        ),
        (
            "memconv_lifecycle_dropped_pages_total",
            "4 KiB pages whose acceptance a conversion to shared dropped (TDX).",
            l.dropped_pages,
        ),
        (
            "memconv_lifecycle_backed_chunks_total",
            "2 MiB chunks backed when the guest accepted them.",
            l.backed_chunks,
        ),
        (
            "memconv_lifecycle_released_chunks_total",
            "2 MiB chunks whose backing was released when they became unaccepted.",
            l.released_chunks,
        ),
        (
            "memconv_lifecycle_unaccepted_accesses_total",
            "Guest accesses to unaccepted memory (the VM is stopped at the first).",
            l.unaccepted_accesses,
        ),
    ];
    for (name, help, v) in counters {
        w.single_labelled(name, "counter", help, &platform, v as f64);
    }
    w.family(
        "memconv_lifecycle_refusals_total",
        "counter",
        "Lifecycle rule breaks refused or flagged, by abi status: accept_shared (ACCEPT of shared or mixed memory), must_rescind (SNP: a validated page converted to shared), double_accept (accepting accepted memory).",
    );
    for (status, n) in [
        ("accept_shared", l.accept_shared_refusals),
        ("must_rescind", l.must_rescind_refusals),
        ("double_accept", l.double_accepts),
    ] {
        w.sample(
            "memconv_lifecycle_refusals_total",
            &[("platform", l.platform.as_str()), ("status", status)],
            n as f64,
        );
    }
}

/// The virtio block device's families (`vmm_disk_*`), labelled with the image path.
fn render_disk(w: &mut Writer<'_>, d: &BlkStats) {
    let image = [("image", d.path.as_str())];
    w.single_labelled(
        "vmm_disk_capacity_bytes",
        "gauge",
        "Size of the disk image the device offers.",
        &image,
        d.capacity_bytes as f64,
    );
    let counters: [(&str, &str, u64); 9] = [
        (
            "vmm_disk_requests_total",
            "Requests the block device completed (any status).",
            d.requests,
        ),
        (
            "vmm_disk_reads_total",
            "Read requests completed OK.",
            d.reads,
        ),
        (
            "vmm_disk_writes_total",
            "Write requests completed OK.",
            d.writes,
        ),
        (
            "vmm_disk_read_bytes_total",
            "Bytes read from the image into guest buffers.",
            d.bytes_read,
        ),
        (
            "vmm_disk_written_bytes_total",
            "Bytes written to the image from guest buffers.",
            d.bytes_written,
        ),
        (
            "vmm_disk_violations_total",
            "Requests refused because they touched memory that is not shared.",
            d.violations,
        ),
        (
            "vmm_disk_errors_total",
            "Other failed requests (malformed, out of range, I/O errors).",
            d.errors,
        ),
        (
            "vmm_disk_io_errors_total",
            "Requests the image failed (full filesystem, truncated or read-only image, flush error), completed with IOERR; included in vmm_disk_errors_total.",
            d.io_errors,
        ),
        (
            "vmm_disk_io_error_log_suppressed_total",
            "Image failures counted but not logged (rate limit).",
            d.io_error_log_suppressed,
        ),
    ];
    for (name, help, v) in counters {
        w.single_labelled(name, "counter", help, &image, v as f64);
    }
}

impl Writer<'_> {
    fn single_labelled(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        labels: &[(&str, &str)],
        v: f64,
    ) {
        self.family(name, kind, help);
        self.sample(name, labels, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use memconv::stats::{LatencyBucket, PoolReportSnapshot};

    #[test]
    fn labels_parse_and_escape() {
        let l = Labels::parse(&["vm=a\"b\\c\nd".into()]).unwrap();
        let text = render(&StatsView::default(), &l);
        assert!(
            text.contains("vmm_vcpus{vm=\"a\\\"b\\\\c\\nd\"} 0"),
            "{text}"
        );
        for bad in ["novalue", "1x=y", "a-b=c", "__x=y", "=v"] {
            assert!(Labels::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_family_has_help_and_type_before_its_samples() {
        let mut s = StatsView {
            exits: vec![[("total".to_string(), 5u64), ("doorbell".to_string(), 2)]
                .into_iter()
                .collect()],
            ..StatsView::default()
        };
        s.memconv.latency.count = 3;
        s.memconv.latency.mean_ns = 1000;
        s.memconv.latency.buckets = vec![
            LatencyBucket {
                lt_ns: 1024,
                count: 1,
            },
            LatencyBucket {
                lt_ns: 2048,
                count: 2,
            },
        ];
        s.memconv.pool_report = Some(PoolReportSnapshot {
            policy: "soak".into(),
            ..PoolReportSnapshot::default()
        });
        s.disk = Some(BlkStats {
            path: "/tmp/d.img".into(),
            io_errors: 7,
            errors: 7,
            ..BlkStats::default()
        });
        let text = render(&s, &Labels::default());
        let mut typed = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(typed.insert(name.to_string()), "{name} typed twice");
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        name.strip_suffix(s)
                            .filter(|f| typed.contains(*f) && f.ends_with("_seconds"))
                    })
                    .unwrap_or(name);
                assert!(typed.contains(family), "{name} has no TYPE before it");
            }
        }
        assert!(text.contains("memconv_conversion_latency_seconds_bucket{le=\"0.000001023\"} 1"));
        assert!(text.contains("memconv_conversion_latency_seconds_bucket{le=\"0.000002047\"} 3"));
        assert!(text.contains("memconv_conversion_latency_seconds_bucket{le=\"+Inf\"} 3"));
        assert!(text.contains("vmm_vcpu_exits_total{cpu=\"0\",reason=\"doorbell\"} 2"));
        assert!(text.contains("guest_pool_maps_total{policy=\"soak\"} 0"));
        assert!(text.contains("vmm_disk_io_errors_total{image=\"/tmp/d.img\"} 7"));
        assert!(text.contains(
            "memconv_lifecycle_refusals_total{platform=\"tdx\",status=\"must_rescind\"} 0"
        ));
    }
}
