//! Sampled debug diagnostics: a [`Sampler`] lets one line through per period (10 per second
//! by default) and counts the events it held back, so `RUST_LOG=debug` shows conversion
//! batches, device queue events and pool reports at a rate a person can read, at any event
//! rate, and costs one relaxed load when debug logging is off (check
//! `tracing::enabled!(tracing::Level::DEBUG)` first).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The default period: at most 10 lines per second per call site.
pub const DEFAULT_PERIOD: Duration = Duration::from_millis(100);

/// Nanoseconds since the first use in this process.
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// One call site's rate limit.
pub struct Sampler {
    period_ns: u64,
    next_ns: AtomicU64,
    held: AtomicU64,
}

impl Sampler {
    /// A sampler letting one event through per `period`.
    pub const fn new(period: Duration) -> Self {
        Sampler {
            period_ns: period.as_nanos() as u64,
            next_ns: AtomicU64::new(0),
            held: AtomicU64::new(0),
        }
    }

    /// `Some(held back since the last line)` when this event may be logged, else `None` (and
    /// the event is counted as held back).
    pub fn ready(&self) -> Option<u64> {
        let now = now_ns();
        let next = self.next_ns.load(Ordering::Relaxed);
        if now >= next
            && self
                .next_ns
                .compare_exchange(
                    next,
                    now + self.period_ns,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.held.swap(0, Ordering::Relaxed));
        }
        self.held.fetch_add(1, Ordering::Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_event_per_period_and_the_rest_are_counted() {
        let s = Sampler::new(Duration::from_secs(3600));
        assert_eq!(s.ready(), Some(0));
        for _ in 0..5 {
            assert_eq!(s.ready(), None);
        }
        let s = Sampler::new(Duration::ZERO);
        assert_eq!(s.ready(), Some(0));
        assert_eq!(s.ready(), Some(0));
    }
}
