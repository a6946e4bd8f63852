//! A careless operator and a hostile environment against `vmm run`: SIGINT, SIGTERM and SIGHUP
//! to a converting VM with a control socket and `--stats-json` (summary printed, stats written,
//! socket gone, exit 128 + signal), a second signal during the stop (exit at once, socket
//! gone), a closed stdout (the VM runs to its end; also with fds 1 and 2 closed), serial output to `/dev/full` (rate-limited
//! warnings, counted), and an unwritable `--stats-json` refused before boot.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use common::{read_json, require_kvm, scratch, vmm_bin};

/// A `vmm run` of `soak` (converting until stopped) with a control socket and --stats-json.
struct Vm {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
    json: PathBuf,
}

impl Vm {
    fn start(name: &str) -> Vm {
        require_kvm();
        let dir = scratch(name);
        let sock = dir.join("api.sock");
        let json = dir.join("stats.json");
        let child = Command::new(vmm_bin())
            .args(["run", "--guest", "soak", "--mem", "64M"])
            .args(["--cmdline", "seconds=0"])
            .arg("--api-socket")
            .arg(&sock)
            .arg("--stats-json")
            .arg(&json)
            .arg("--serial")
            .arg(dir.join("serial.txt"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm run");
        let mut vm = Vm {
            child: Some(child),
            dir,
            sock,
            json,
        };
        vm.wait_converting();
        vm
    }

    fn pid(&self) -> libc::pid_t {
        self.child.as_ref().map_or(0, |c| c.id() as libc::pid_t)
    }

    /// Waits for the socket, then for the guest's first conversions (stats over the socket).
    fn wait_converting(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                let (_, _, err) = self.finish(status);
                panic!("vmm exited ({status}) before converting:\n{err}");
            }
            if self.converted() > 0 {
                return;
            }
            assert!(Instant::now() < deadline, "no conversions after 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pages converted so far, from a `stats` request (0 if the socket is not up yet).
    fn converted(&self) -> u64 {
        let Ok(mut s) = UnixStream::connect(&self.sock) else {
            return 0;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        use std::io::{BufRead, BufReader, Write};
        if s.write_all(b"{\"cmd\":\"stats\",\"id\":1}\n").is_err() {
            return 0;
        }
        let mut r = BufReader::new(s);
        let mut line = String::new();
        for _ in 0..2 {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return 0;
            }
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
        v["return"]["memconv"]["pages_converted"]
            .as_u64()
            .unwrap_or(0)
    }

    fn kill(&self, signo: libc::c_int) {
        // SAFETY: kill(2) of our own child process.
        let rc = unsafe { libc::kill(self.pid(), signo) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits (at most 30 s) for the exit; returns status, stdout and stderr.
    fn wait(&mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let child = self.child.as_mut().expect("vmm still tracked");
            if let Some(status) = child.try_wait().expect("try_wait") {
                return self.finish(status);
            }
            assert!(Instant::now() < deadline, "vmm did not exit within 30 s");
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
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn gone(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

fn stop_signal_is_a_clean_stop(signo: libc::c_int, name: &str) {
    let mut vm = Vm::start(&format!("signal-{name}"));
    vm.kill(signo);
    let (status, out, err) = vm.wait();
    assert_eq!(
        status.code(),
        Some(128 + signo),
        "{status}\nstdout:\n{out}\nstderr:\n{err}"
    );
    assert!(out.contains("== vmm summary =="), "no summary:\n{out}");
    assert!(
        out.contains(&format!("stopped by signal {name} ({signo})")),
        "{out}"
    );
    assert!(!err.contains("panicked"), "{err}");
    let j = read_json(&vm.json);
    assert_eq!(
        j["end"],
        serde_json::json!({"kind": "signal", "signal": name, "number": signo}),
        "{}",
        j["end"]
    );
    assert_eq!(j["exit_status"], 128 + signo);
    assert!(
        j["memconv"]["pages_converted"].as_u64().unwrap_or(0) > 0,
        "{}",
        j["memconv"]
    );
    assert!(gone(&vm.sock), "the control socket was left behind");
}

#[test]
fn sigint_stops_the_vm_cleanly() {
    stop_signal_is_a_clean_stop(libc::SIGINT, "SIGINT");
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    stop_signal_is_a_clean_stop(libc::SIGTERM, "SIGTERM");
}

#[test]
fn sighup_stops_the_vm_cleanly() {
    stop_signal_is_a_clean_stop(libc::SIGHUP, "SIGHUP");
}

#[test]
fn a_second_signal_during_the_stop_exits_at_once() {
    let mut vm = Vm::start("signal-twice");
    // Two different signals (the same one twice may merge while pending): the first starts the
    // stop, the second comes while it runs.
    vm.kill(libc::SIGTERM);
    vm.kill(libc::SIGINT);
    let (status, out, err) = vm.wait();
    assert!(gone(&vm.sock), "the control socket was left behind");
    assert!(!err.contains("panicked"), "{err}");
    // Both may be pending when the signal thread wakes: it takes the lower-numbered first.
    let code = status.code();
    let second = [("SIGINT", 130), ("SIGTERM", 143)]
        .into_iter()
        .find(|(name, _)| err.contains(&format!("second signal ({name})")));
    match second {
        // The second signal ended the stop at once: its status, no summary.
        Some((_, want)) => {
            assert_eq!(code, Some(want), "{status}\n{err}");
            assert!(!out.contains("== vmm summary =="), "{out}");
        }
        // The stop was over before the second signal was taken: a clean stop by the first.
        None => {
            let first = match code {
                Some(130) => "SIGINT",
                Some(143) => "SIGTERM",
                other => panic!("exit {other:?} ({status})\nstdout:\n{out}\nstderr:\n{err}"),
            };
            assert!(out.contains(&format!("stopped by signal {first}")), "{out}");
        }
    }
}

#[test]
fn a_closed_stdout_does_not_kill_the_vmm() {
    require_kvm();
    let dir = scratch("closed-stdout");
    let json = dir.join("stats.json");
    // The guest's console goes to stdout, whose reader is gone: every write gets EPIPE.
    let mut child = Command::new(vmm_bin())
        .args(["run", "--guest", "soak", "--mem", "64M"])
        .args(["--cmdline", "seconds=1"])
        .arg("--stats-json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm run");
    drop(child.stdout.take());
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "{status}\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    let j = read_json(&json);
    assert_eq!(j["end"]["kind"], "guest_exit", "{}", j["end"]);
    assert!(j["serial_bytes"].as_u64().unwrap_or(0) > 0, "{j}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn closed_stdout_and_stderr_descriptors_do_not_stop_the_vmm() {
    require_kvm();
    let dir = scratch("closed-fds");
    let json = dir.join("stats.json");
    // fds 1 and 2 closed, not just broken: the VMM must not hand those numbers to guest RAM.
    let status = Command::new("sh")
        .arg("-c")
        .arg("exec \"$0\" run --guest hello --mem 64M --stats-json \"$1\" >&- 2>&-")
        .arg(vmm_bin())
        .arg(&json)
        .status()
        .expect("run sh");
    assert_eq!(status.code(), Some(0), "{status}");
    let j = read_json(&json);
    assert_eq!(j["end"]["kind"], "guest_exit", "{}", j["end"]);
    assert!(j["serial_bytes"].as_u64().unwrap_or(0) > 0, "{j}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn serial_output_to_dev_full_is_warned_about_at_a_bounded_rate() {
    require_kvm();
    let dir = scratch("dev-full");
    let json = dir.join("stats.json");
    let t0 = Instant::now();
    let o = Command::new(vmm_bin())
        .args(["run", "--guest", "soak", "--mem", "64M", "--quiet"])
        .args(["--cmdline", "seconds=1", "--serial", "/dev/full"])
        .arg("--stats-json")
        .arg(&json)
        .output()
        .expect("run vmm");
    let secs = t0.elapsed().as_secs();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    let j = read_json(&json);
    let bytes = j["serial_bytes"].as_u64().unwrap_or(0);
    let warnings = err.matches("serial write failed").count() as u64;
    let suppressed = j["suppressed_log_lines"].as_u64().unwrap_or(0);
    let per_second = u64::from(memconv::log_limit::GUEST_LOG_PER_SECOND);
    assert!(
        bytes > 2 * per_second,
        "{bytes} serial bytes: too few to test"
    );
    assert!(
        warnings >= 1 && warnings <= per_second * (secs + 1),
        "{warnings} warnings for {bytes} bytes in {secs} s:\n{err}"
    );
    // Every failed byte is either a warning or counted as suppressed.
    assert!(
        warnings + suppressed >= bytes,
        "{warnings} + {suppressed} < {bytes}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unwritable_stats_json_is_refused_before_boot() {
    let dir = scratch("stats-unwritable");
    let path = dir.join("no-such-dir").join("stats.json");
    let t0 = Instant::now();
    let o = Command::new(vmm_bin())
        .args([
            "run",
            "--guest",
            "soak",
            "--mem",
            "64M",
            "--cmdline",
            "seconds=5",
        ])
        .arg("--stats-json")
        .arg(&path)
        .output()
        .expect("run vmm");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot write --stats-json"), "{err}");
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("== vmm summary =="),
        "the VM ran"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "refused only after the run"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
