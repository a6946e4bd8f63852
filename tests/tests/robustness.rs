//! A careless operator and a hostile environment against `vmm run`: SIGINT, SIGTERM and SIGHUP
//! to a converting VM with a control socket and `--stats-json` (summary printed, stats written,
//! socket gone, exit 128 + signal), a second signal during the stop (exit at once, socket
//! gone), a closed stdout (the VM runs to its end; also with fds 1 and 2 closed), serial output to `/dev/full` (rate-limited
//! warnings, counted), and an unwritable `--stats-json` refused before boot.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::api_client::Conn;
use common::soak_vm::{SoakOpts, SoakVm};
use common::{read_json, require_kvm, scratch, vmm_bin};

/// Starts a converting `soak` (summary on stdout) and waits for its first conversions.
fn start(name: &str) -> SoakVm {
    let mut vm = SoakVm::spawn_in(
        name,
        &SoakOpts {
            quiet: false,
            ..SoakOpts::default()
        },
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    vm.wait_for_socket(Duration::from_secs(30));
    while converted(&vm.sock) == 0 {
        assert!(Instant::now() < deadline, "no conversions after 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    vm
}

/// Pages converted so far, from a `stats` request (0 if the socket does not answer).
fn converted(sock: &Path) -> u64 {
    let Some(mut c) = Conn::try_open(sock) else {
        return 0;
    };
    let Some(line) = c.try_request(r#"{"cmd":"stats","id":1}"#) else {
        return 0;
    };
    let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
    v["return"]["memconv"]["pages_converted"]
        .as_u64()
        .unwrap_or(0)
}

fn gone(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

fn stop_signal_is_a_clean_stop(signo: libc::c_int, name: &str) {
    let mut vm = start(&format!("signal-{name}"));
    vm.kill(signo);
    let (status, out, err) = vm.wait(Duration::from_secs(30));
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
    let mut vm = start("signal-twice");
    // Two different signals (the same one twice may merge while pending): the first starts the
    // stop, the second comes while it runs.
    vm.kill(libc::SIGTERM);
    vm.kill(libc::SIGINT);
    let (status, out, err) = vm.wait(Duration::from_secs(30));
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
