//! [`Histogram`]: the log2 latency histogram the engine records into, and its serializable
//! summary ([`LatencySnapshot`]).

use serde::{Deserialize, Serialize};

/// Log2 histogram of nanoseconds: bucket `b` counts values in `[2^(b-1), 2^b)` (bucket 0: 0).
#[derive(Clone, Debug)]
pub struct Histogram {
    buckets: [u64; 65],
    count: u64,
    sum: u128,
    max: u64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            buckets: [0; 65],
            count: 0,
            sum: 0,
            max: 0,
        }
    }
}

impl Histogram {
    /// Record one value.
    pub fn record(&mut self, ns: u64) {
        let b = (64 - ns.leading_zeros()) as usize;
        self.buckets[b] += 1;
        self.count += 1;
        self.sum += ns as u128;
        self.max = self.max.max(ns);
    }

    /// Upper bound of the bucket holding quantile `q` (0..=1).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let target = ((self.count as f64) * q).ceil().max(1.0) as u64;
        let mut acc = 0;
        for (b, n) in self.buckets.iter().enumerate() {
            acc += n;
            if acc >= target {
                return if b == 0 {
                    0
                } else {
                    (1u64 << (b - 1)).saturating_mul(2)
                };
            }
        }
        self.max
    }

    /// The serializable summary.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            count: self.count,
            mean_ns: if self.count == 0 {
                0
            } else {
                (self.sum / self.count as u128) as u64
            },
            max_ns: self.max,
            p50_ns_le: self.quantile(0.5),
            p99_ns_le: self.quantile(0.99),
            buckets: self
                .buckets
                .iter()
                .enumerate()
                .filter(|(_, n)| **n != 0)
                .map(|(b, n)| LatencyBucket {
                    lt_ns: if b == 0 {
                        1
                    } else {
                        1u64.checked_shl(b as u32).unwrap_or(u64::MAX)
                    },
                    count: *n,
                })
                .collect(),
        }
    }
}

/// One histogram bucket.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LatencyBucket {
    /// Values below this (and at least half of it).
    pub lt_ns: u64,
    /// How many.
    pub count: u64,
}

/// Conversion latency summary.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct LatencySnapshot {
    /// Conversions timed.
    pub count: u64,
    /// Mean.
    pub mean_ns: u64,
    /// Max.
    pub max_ns: u64,
    /// Upper bound of the median's bucket.
    pub p50_ns_le: u64,
    /// Upper bound of the 99th percentile's bucket.
    pub p99_ns_le: u64,
    /// Non-empty log2 buckets.
    pub buckets: Vec<LatencyBucket>,
}
