//! Panic guards for the VMM's long-lived threads (vCPUs, the block device poller): a panic is
//! caught and handed back as text, so that the thread's owner ends the VM with a host error and
//! the summary is still written, instead of the process aborting or a device silently dying.

use std::panic::{catch_unwind, AssertUnwindSafe};

/// The text of a panic payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Runs `f`; a panic inside becomes `Err` with its text. Whatever `f` borrowed mutably may be
/// half-updated after a panic: callers only use it to tear down.
pub fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(payload.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message() {
        assert_eq!(guarded(|| 7), Ok(7));
        let err = guarded(|| -> u32 { panic!("boom {}", 42) });
        assert_eq!(err, Err("boom 42".to_string()));
        let err = guarded(|| -> u32 { std::panic::panic_any(5u8) });
        assert_eq!(err, Err("a panic without a message".to_string()));
    }
}
