//! Clean stops on SIGINT, SIGTERM and SIGHUP for `vmm run`.
//!
//! [`SignalStop::install`] blocks the three signals in the calling thread, before any other
//! thread exists, so that every thread spawned later inherits the mask and none of them is
//! ever interrupted by them; one thread then takes them with `sigwait(2)`. The first signal
//! ends the VM as `vmm ctl shutdown` does (the summary is printed, `--stats-json` written, the
//! control socket removed), with the end [`VmEnd::Signal`] and exit status 128 + the signal's
//! number. A second signal during that stop ends the process at once (after removing the
//! control socket file, if it is still ours), with 128 + its number. A signal that arrives
//! while the VM is still being set up is kept and ends the VM as soon as it is attached.
//!
//! SIGPIPE stays ignored (the Rust runtime's default, made explicit here): a closed stdout
//! makes writes fail with EPIPE, which the console and the summary printing ignore.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::vcpu::{VmEnd, VmShared};

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Errors setting up signal handling.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// pthread_sigmask failed.
    #[error("cannot block the stop signals: {0}")]
    Mask(std::io::Error),
    /// The signal thread could not be spawned.
    #[error("cannot start the signal thread: {0}")]
    Thread(std::io::Error),
}

/// The name of a stop signal (`SIGTERM`), or `SIG<n>` for any other.
pub fn signal_name(signo: libc::c_int) -> String {
    match signo {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGHUP => "SIGHUP".into(),
        n => format!("SIG{n}"),
    }
}

/// The end a stop signal gives the VM.
pub fn signal_end(signo: libc::c_int) -> VmEnd {
    VmEnd::Signal {
        signal: signal_name(signo),
        number: signo,
    }
}

/// What the signal thread acts on.
#[derive(Default)]
struct State {
    /// The running VM, once attached.
    shared: Option<Arc<VmShared>>,
    /// The control socket file and its (st_dev, st_ino) when attached.
    socket: Option<(PathBuf, (u64, u64))>,
    /// Stop signals received so far.
    received: u32,
    /// The first signal, kept until a VM is attached.
    pending: Option<libc::c_int>,
    /// Files this process created and removes when a second signal ends it at once (the
    /// main job's temporary disk image).
    temp_files: Vec<PathBuf>,
}

/// The stop requested by signals, shared by the signal thread and the run.
#[derive(Default)]
pub struct SignalStop {
    state: Mutex<State>,
}

fn sigset(signals: &[libc::c_int]) -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut set) };
    for s in signals {
        // SAFETY: as above; `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, *s) };
    }
    set
}

impl SignalStop {
    /// A stop nobody delivers signals to yet: [`SignalStop::install`] makes one that the signal
    /// thread drives; this one only acts on [`SignalStop::on_signal`] calls.
    pub fn new() -> SignalStop {
        SignalStop::default()
    }

    /// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread and starts the thread that
    /// takes them. Call it before spawning any other thread (only threads spawned afterwards
    /// inherit the mask).
    pub fn install() -> Result<Arc<SignalStop>, SignalError> {
        let set = sigset(&STOP_SIGNALS);
        // SAFETY: `set` is a valid signal set; a null old set is allowed.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(SignalError::Mask(std::io::Error::from_raw_os_error(rc)));
        }
        // SAFETY: setting SIGPIPE's disposition to ignore has no memory-safety effect.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        let stop = Arc::new(SignalStop::new());
        let thread_stop = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || thread_stop.wait_loop(set))
            .map_err(SignalError::Thread)?;
        Ok(stop)
    }

    fn wait_loop(&self, set: libc::sigset_t) {
        loop {
            let mut signo: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set and `signo` a valid out pointer.
            let rc = unsafe { libc::sigwait(&set, &mut signo) };
            if rc != 0 {
                if rc == libc::EINTR {
                    continue;
                }
                tracing::error!(
                    "sigwait failed: {}; stop signals are no longer handled",
                    std::io::Error::from_raw_os_error(rc)
                );
                return;
            }
            self.on_signal(signo);
        }
    }

    /// Acts on one stop signal: the first stops the VM (or is kept until one is attached), a
    /// second ends the process at once.
    pub fn on_signal(&self, signo: libc::c_int) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.received += 1;
        if st.received > 1 {
            if let Some((path, identity)) = &st.socket {
                remove_if_ours(path, *identity);
            }
            for path in &st.temp_files {
                let _ = std::fs::remove_file(path);
            }
            let msg = format!(
                "vmm: second signal ({}) during the stop: exiting at once\n",
                signal_name(signo)
            );
            // SAFETY: write(2) of a valid buffer to stderr; _exit(2) ends the process without
            // running destructors or atexit handlers, which is the point of a forced stop.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::_exit(128 + signo);
            }
        }
        tracing::info!("{} received: stopping the VM", signal_name(signo));
        match &st.shared {
            Some(shared) => shared.end(signal_end(signo)),
            None => st.pending = Some(signo),
        }
    }

    /// Names the control socket file, removed on a second signal (call it right after binding).
    pub fn set_socket(&self, socket: &Path) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.socket = std::fs::symlink_metadata(socket)
            .ok()
            .map(|m| (socket.to_path_buf(), (m.dev(), m.ino())));
    }

    /// Names a file this process created, removed too if a second signal ends the process at
    /// once (a clean stop returns to its owner, which removes it).
    pub fn remove_on_forced_exit(&self, path: &Path) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.temp_files.push(path.to_path_buf());
    }

    /// Makes signals stop this VM; a signal received before ends it now.
    pub fn attach(&self, shared: &Arc<VmShared>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.shared = Some(Arc::clone(shared));
        if let Some(signo) = st.pending.take() {
            shared.end(signal_end(signo));
        }
    }

    /// Forgets the VM (it has ended; its summary is being written).
    pub fn detach(&self) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.shared = None;
        st.socket = None;
    }

    /// How many stop signals were received so far.
    pub fn received(&self) -> u32 {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .received
    }
}

fn remove_if_ours(path: &Path, identity: (u64, u64)) {
    let ours = std::fs::symlink_metadata(path)
        .map(|m| (m.dev(), m.ino()) == identity)
        .unwrap_or(false);
    if ours {
        let _ = std::fs::remove_file(path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_ends() {
        assert_eq!(signal_name(libc::SIGTERM), "SIGTERM");
        assert_eq!(signal_name(libc::SIGHUP), "SIGHUP");
        assert_eq!(signal_name(libc::SIGINT), "SIGINT");
        let json = serde_json::to_value(signal_end(libc::SIGTERM)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"kind":"signal","signal":"SIGTERM","number":15})
        );
        assert_eq!(
            crate::exit_codes::exit_status(&signal_end(libc::SIGHUP)),
            129
        );
    }
}
