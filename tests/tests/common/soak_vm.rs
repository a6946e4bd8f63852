//! A `vmm run` of the `soak` guest (converting until stopped, or for the cmdline's `seconds=`)
//! with a control socket, `--stats-json` and a serial file in a scratch directory: started, waited
//! for, signalled, and killed with its directory removed when dropped. The api, api_hostile and
//! robustness tests drive the VMM through it.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::api_client::Conn;
use super::{require_kvm, scratch, vmm_bin};

/// How a [`SoakVm`] is started.
pub struct SoakOpts<'a> {
    /// The guest command line (`seconds=0`: until shut down).
    pub cmdline: &'a str,
    /// Pass `--quiet` (no summary on stdout).
    pub quiet: bool,
    /// Extra environment variables for the VMM.
    pub env: &'a [(&'a str, String)],
}

impl Default for SoakOpts<'_> {
    fn default() -> Self {
        SoakOpts {
            cmdline: "seconds=0",
            quiet: true,
            env: &[],
        }
    }
}

/// A running `vmm run --guest soak`.
pub struct SoakVm {
    child: Option<Child>,
    /// The scratch directory (removed on drop).
    pub dir: PathBuf,
    /// The control socket.
    pub sock: PathBuf,
    /// The `--stats-json` file.
    pub json: PathBuf,
    /// The `--serial` file.
    pub serial: PathBuf,
}

impl SoakVm {
    /// Starts a quiet `soak` with `cmdline` in a fresh scratch directory and waits for its socket.
    pub fn start(name: &str, cmdline: &str) -> SoakVm {
        SoakVm::start_with(
            name,
            &SoakOpts {
                cmdline,
                ..SoakOpts::default()
            },
        )
    }

    /// Starts `soak` as `opts` says in a fresh scratch directory and waits for its socket.
    pub fn start_with(name: &str, opts: &SoakOpts) -> SoakVm {
        let mut vm = SoakVm::spawn_in(name, opts);
        vm.wait_for_socket(Duration::from_secs(30));
        vm
    }

    /// Starts `soak` in a fresh scratch directory, without waiting for anything.
    pub fn spawn_in(name: &str, opts: &SoakOpts) -> SoakVm {
        let dir = scratch(name);
        let sock = dir.join("api.sock");
        SoakVm::spawn(dir, sock, opts)
    }

    /// Starts `soak` in `dir` serving `sock`, without waiting for anything.
    pub fn spawn(dir: PathBuf, sock: PathBuf, opts: &SoakOpts) -> SoakVm {
        require_kvm();
        let json = dir.join("stats.json");
        let serial = dir.join("serial.txt");
        let mut cmd = Command::new(vmm_bin());
        cmd.args(["run", "--guest", "soak", "--mem", "64M"]);
        if opts.quiet {
            cmd.arg("--quiet");
        }
        cmd.arg("--cmdline")
            .arg(opts.cmdline)
            .arg("--api-socket")
            .arg(&sock)
            .arg("--stats-json")
            .arg(&json)
            .arg("--serial")
            .arg(&serial)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in opts.env {
            cmd.env(key, value);
        }
        let child = cmd.spawn().expect("spawn vmm run");
        SoakVm {
            child: Some(child),
            dir,
            sock,
            json,
            serial,
        }
    }

    /// Waits until the control socket greets a client; fails the test if the VMM exits first.
    pub fn wait_for_socket(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let (_, out, err) = self.finish(status);
                panic!("vmm exited ({status}) before serving its socket:\n{out}\n{err}");
            }
            if Conn::try_open(&self.sock).is_some() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "no control socket after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The VMM's process id.
    pub fn pid(&self) -> libc::pid_t {
        self.child.as_ref().map_or(0, |c| c.id() as libc::pid_t)
    }

    /// Sends `signo` to the VMM.
    pub fn kill(&self, signo: libc::c_int) {
        // SAFETY: kill(2) of our own child process, which has not been reaped yet.
        let rc = unsafe { libc::kill(self.pid(), signo) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits (at most `timeout`) for the VMM to exit; returns its status, stdout and stderr.
    pub fn wait(&mut self, timeout: Duration) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("vmm still tracked");
            if let Some(status) = child.try_wait().expect("try_wait") {
                return self.finish(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("vmm did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn finish(&mut self, status: ExitStatus) -> (ExitStatus, String, String) {
        let mut child = self.child.take().expect("vmm still tracked");
        let (mut out, mut err) = (String::new(), String::new());
        if let Some(mut o) = child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        // Reaped already (try_wait returned its status); this only returns it again.
        let _ = child.wait();
        (status, out, err)
    }

    /// Asks the VMM to shut down over its socket and waits (30 s) for the exit code; fails the
    /// test if it panicked.
    pub fn shutdown(&mut self) -> Option<i32> {
        if let Some(mut c) = Conn::try_open(&self.sock) {
            let _ = c.try_request(r#"{"cmd":"shutdown"}"#);
        }
        self.child.as_ref()?;
        let (status, _, err) = self.wait(Duration::from_secs(30));
        assert!(!err.contains("panicked"), "{err}");
        status.code()
    }

    /// What the guest wrote to its serial port so far.
    pub fn serial_text(&self) -> String {
        std::fs::read_to_string(&self.serial).unwrap_or_default()
    }
}

impl Drop for SoakVm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
