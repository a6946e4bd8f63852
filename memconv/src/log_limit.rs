//! Rate limiting of the log lines a guest can cause (a double accept, a failing serial sink,
//! an unknown port, a refused doorbell...): at most [`LogLimiter::per_second`] such lines per
//! second are written, the rest are counted as suppressed. The VMM reports the count
//! (`suppressed_log_lines`) in its summary, so nothing a guest does can flood the host's log
//! and nothing is lost from the record.
//!
//! [`GUEST_LOG`] is the limiter for the whole process: its log is one stream, so is its
//! budget. A process running one VM (`vmm run`) counts exactly that VM's suppressed lines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Guest-caused log lines written per second, process-wide.
pub const GUEST_LOG_PER_SECOND: u32 = 10;

/// The process-wide limiter for guest-caused log lines.
pub static GUEST_LOG: LogLimiter = LogLimiter::new(GUEST_LOG_PER_SECOND);

/// The current one-second window.
#[derive(Debug)]
struct Window {
    start: Option<Instant>,
    written: u32,
}

/// A fixed-window rate limiter for log lines, with a count of the lines it suppressed.
#[derive(Debug)]
pub struct LogLimiter {
    per_second: u32,
    window: Mutex<Window>,
    suppressed: AtomicU64,
}

impl LogLimiter {
    /// A limiter writing at most `per_second` lines per second.
    pub const fn new(per_second: u32) -> Self {
        LogLimiter {
            per_second,
            window: Mutex::new(Window {
                start: None,
                written: 0,
            }),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Lines allowed per second.
    pub fn per_second(&self) -> u32 {
        self.per_second
    }

    /// Whether one more line may be written now; if not, it is counted as suppressed.
    pub fn allow(&self) -> bool {
        self.allow_at(Instant::now())
    }

    /// [`LogLimiter::allow`] at `now`.
    pub fn allow_at(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let fresh = w
            .start
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1));
        if fresh {
            w.start = Some(now);
            w.written = 0;
        }
        if w.written < self.per_second {
            w.written += 1;
            true
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Lines suppressed so far.
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

/// Writes a `tracing::warn!` line if [`GUEST_LOG`] allows it (counted as suppressed if not).
#[macro_export]
macro_rules! guest_warn {
    ($($arg:tt)*) => {
        if $crate::log_limit::GUEST_LOG.allow() {
            ::tracing::warn!($($arg)*);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_n_per_second_and_the_rest_counted() {
        let l = LogLimiter::new(3);
        let t0 = Instant::now();
        let allowed = (0..1000).filter(|_| l.allow_at(t0)).count();
        assert_eq!(allowed, 3);
        assert_eq!(l.suppressed(), 997);
        // Half a second later: still the same window.
        assert!(!l.allow_at(t0 + Duration::from_millis(500)));
        // A new second: a new budget.
        let t1 = t0 + Duration::from_millis(1000);
        assert_eq!((0..10).filter(|_| l.allow_at(t1)).count(), 3);
        assert_eq!(l.suppressed(), 998 + 7);
    }
}
