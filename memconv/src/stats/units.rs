//! The one unit convention of every human-readable view (the run summary, `vmm ctl stats`,
//! `vmm conform`'s table): a duration is a number with one decimal and a unit scaled to it
//! (`150 ns`, `8.2 us`, `1.3 ms`, `2.0 s`), a size is MiB with one decimal (`64.0 MiB`).
//! Machine-readable outputs (JSON, Prometheus) keep base units (`_ns`, `_bytes`, `_seconds`).

/// A duration in nanoseconds as `8.2 us` (ns below 1 us, then us, ms, s).
pub fn duration(ns: u64) -> String {
    let v = ns as f64;
    if ns < 1_000 {
        format!("{ns} ns")
    } else if ns < 1_000_000 {
        format!("{:.1} us", v / 1e3)
    } else if ns < 1_000_000_000 {
        format!("{:.1} ms", v / 1e6)
    } else {
        format!("{:.1} s", v / 1e9)
    }
}

/// Bytes as MiB (format with one decimal: `{:.1} MiB`).
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_scale_their_unit() {
        assert_eq!(duration(150), "150 ns");
        assert_eq!(duration(8_192), "8.2 us");
        assert_eq!(duration(65_536), "65.5 us");
        assert_eq!(duration(1_300_000), "1.3 ms");
        assert_eq!(duration(2_000_000_000), "2.0 s");
        assert_eq!(format!("{:.1}", mib(64 << 20)), "64.0");
    }
}
