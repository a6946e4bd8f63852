//! The disk's rate-limited failure log ([`FailureLog`]): a guest can make every request fail
//! (a full filesystem fails every write), so failures are logged at most [`LINES_PER_WINDOW`]
//! per [`WINDOW`]; the first line after a quiet spell says how many were left out, and the
//! totals (failures, lines left out) go to the run summary and the statistics.

use std::fmt::Display;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Length of a rate window.
pub const WINDOW: Duration = Duration::from_secs(1);
/// Lines logged per window at most.
pub const LINES_PER_WINDOW: u32 = 5;

/// The current window.
struct Window {
    start: Option<Instant>,
    lines: u32,
    /// Failures left out since the last logged line.
    pending: u64,
}

/// Logs disk failures as warnings, rate-limited, and counts them.
pub struct FailureLog {
    image: String,
    failures: AtomicU64,
    suppressed: AtomicU64,
    window: Mutex<Window>,
}

impl FailureLog {
    /// A log for the image at `image` (named in every line).
    pub fn new(image: String) -> Self {
        FailureLog {
            image,
            failures: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            window: Mutex::new(Window {
                start: None,
                lines: 0,
                pending: 0,
            }),
        }
    }

    /// Counts one failure and logs it unless this window's lines are used up; returns whether
    /// a line was written.
    pub fn record(&self, what: &dyn Display) -> bool {
        self.record_at(Instant::now(), what)
    }

    fn record_at(&self, now: Instant, what: &dyn Display) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        if w.start
            .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW)
        {
            w.start = Some(now);
            w.lines = 0;
        }
        if w.lines >= LINES_PER_WINDOW {
            w.pending += 1;
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        w.lines += 1;
        if w.pending > 0 {
            tracing::warn!(
                "disk {}: {what} ({} earlier failures not logged)",
                self.image,
                w.pending
            );
            w.pending = 0;
        } else {
            tracing::warn!("disk {}: {what}", self.image);
        }
        true
    }

    /// Failures recorded.
    pub fn failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Failures counted but not logged (rate limit).
    pub fn suppressed(&self) -> u64 {
        self.suppressed.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_limited_per_window_and_counted() {
        let log = FailureLog::new("t.img".into());
        let t0 = Instant::now();
        let logged = (0..100).filter(|_| log.record_at(t0, &"boom")).count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        assert_eq!(log.failures(), 100);
        assert_eq!(log.suppressed(), 100 - u64::from(LINES_PER_WINDOW));
        // A new window logs again, and the first line carries the count left out.
        assert!(log.record_at(t0 + WINDOW, &"boom"));
        assert_eq!(log.window.lock().unwrap().pending, 0);
        assert_eq!(log.failures(), 101);
    }
}
