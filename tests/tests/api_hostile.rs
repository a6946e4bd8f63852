//! The control socket against hostile or careless clients, on a real VM: duplicate keys are
//! refused (`{"cmd":"stats","cmd":"shutdown"}` does not shut the VM down), any JSON id comes
//! back exactly as sent (beyond 64 bits, strings, objects), clients that never send are dropped
//! after the idle timeout so 64 of them cannot lock everyone else out, and
//! `vmm ctl stats --watch` reconnects when it is dropped.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{require_kvm, scratch, vmm_bin};
use serde_json::Value;

/// A `vmm run` of `soak` with a control socket and the given idle timeout.
struct Vm {
    child: Option<Child>,
    dir: PathBuf,
    sock: PathBuf,
}

impl Vm {
    fn start(name: &str, idle_ms: u64) -> Vm {
        require_kvm();
        let dir = scratch(name);
        let sock = dir.join("api.sock");
        let child = Command::new(vmm_bin())
            .args(["run", "--guest", "soak", "--mem", "64M", "--quiet"])
            .args(["--cmdline", "seconds=0"])
            .arg("--api-socket")
            .arg(&sock)
            .arg("--serial")
            .arg(dir.join("serial.txt"))
            .env("VMM_API_IDLE_TIMEOUT_MS", idle_ms.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vmm run");
        let vm = Vm {
            child: Some(child),
            dir,
            sock,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Conn::open(&vm.sock).is_none() {
            assert!(Instant::now() < deadline, "no control socket after 30 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        vm
    }

    /// Shuts the VM down and waits for its exit status.
    fn shutdown(&mut self) -> Option<i32> {
        if let Some(mut c) = Conn::open(&self.sock) {
            let _ = c.request(r#"{"cmd":"shutdown"}"#);
        }
        let mut child = self.child.take()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().expect("try_wait") {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut err);
                }
                assert!(!err.contains("panicked"), "{err}");
                return s.code();
            }
            assert!(Instant::now() < deadline, "vmm did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
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

/// A raw protocol client (greeting read).
struct Conn {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Conn {
    fn open(sock: &Path) -> Option<Conn> {
        let stream = UnixStream::connect(sock).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let writer = stream.try_clone().ok()?;
        let mut c = Conn {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = c.line()?;
        greeting.contains("\"greeting\"").then_some(c)
    }

    fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(n) if n > 0 => Some(line.trim_end().to_string()),
            _ => None,
        }
    }

    /// Sends one request line, returns the reply line.
    fn request(&mut self, line: &str) -> Option<String> {
        self.writer.write_all(line.as_bytes()).ok()?;
        self.writer.write_all(b"\n").ok()?;
        self.line()
    }
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn duplicate_keys_are_refused_and_the_vm_runs_on() {
    let mut vm = Vm::start("dup-keys", 10_000);
    let mut c = Conn::open(&vm.sock).expect("connect");
    for line in [
        r#"{"cmd":"stats","cmd":"shutdown","id":7}"#,
        r#"{"cmd":"shutdown","cmd":"stats","id":7}"#,
        r#"{"id":7,"cmd":"shutdown","protocol":1,"protocol":1}"#,
    ] {
        let reply = parse(&c.request(line).expect("a reply"));
        assert_eq!(reply["ok"], false, "{line}: {reply}");
        assert_eq!(reply["error"]["code"], "bad_request", "{reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("duplicate key")),
            "{reply}"
        );
        assert_eq!(reply["id"], 7, "{reply}");
    }
    // Still running: nothing was shut down.
    let stats = parse(&c.request(r#"{"cmd":"stats"}"#).expect("stats"));
    assert_eq!(stats["return"]["state"], "running", "{stats}");
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn ids_come_back_exactly_as_sent() {
    let mut vm = Vm::start("raw-ids", 10_000);
    let mut c = Conn::open(&vm.sock).expect("connect");
    for id in [
        "18446744073709551616",
        "340282366920938463463374607431768211457",
        "-1.50",
        "1e400",
        r#""req-1""#,
        r#"{"trace": [1, 2, {"k": null}]}"#,
        "null",
    ] {
        for cmd in ["config", "no-such-command"] {
            let reply = c
                .request(&format!(r#"{{"cmd":"{cmd}","id":{id}}}"#))
                .expect("a reply");
            assert!(
                reply.starts_with(&format!(r#"{{"id":{id},"ok":"#)),
                "id {id} came back as: {}",
                &reply[..reply.len().min(120)]
            );
        }
    }
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn idle_clients_are_dropped_so_others_get_served() {
    const IDLE_MS: u64 = 1500;
    let mut vm = Vm::start("idle", IDLE_MS);
    // Every client slot taken by connections that never send: connect until one is refused.
    let t0 = Instant::now();
    let mut idlers: Vec<Conn> = Vec::new();
    let mut refused = false;
    while idlers.len() < 70 {
        match Conn::open(&vm.sock) {
            Some(c) => idlers.push(c),
            None => {
                refused = true;
                break;
            }
        }
    }
    let filled = t0.elapsed();
    assert!(filled < Duration::from_millis(IDLE_MS), "too slow to test");
    assert!(refused, "{} idle clients and none refused", idlers.len());
    assert!(idlers.len() >= 60, "only {} clients served", idlers.len());
    // After the idle timeout each idler is told why and closed.
    for c in &mut idlers {
        let farewell = c.line().expect("an idle_timeout line");
        assert!(farewell.contains("\"idle_timeout\""), "{farewell}");
        assert!(c.line().is_none(), "closed after idle_timeout");
    }
    assert!(t0.elapsed() >= Duration::from_millis(IDLE_MS));
    // Now a client is served.
    let mut c = Conn::open(&vm.sock).expect("connect after the idlers were dropped");
    let stats = parse(&c.request(r#"{"cmd":"stats","id":1}"#).expect("stats"));
    assert_eq!(stats["ok"], true, "{stats}");
    // A client that keeps sending is never dropped.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(IDLE_MS / 2));
        let r = parse(&c.request(r#"{"cmd":"config"}"#).expect("still served"));
        assert_eq!(r["ok"], true, "{r}");
    }
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn ctl_watch_reconnects_when_dropped_for_idling() {
    let mut vm = Vm::start("watch-reconnect", 500);
    // Polling every 1.2 s with a 0.5 s idle timeout: dropped between every two polls.
    let watch = Command::new(vmm_bin())
        .arg("ctl")
        .arg(&vm.sock)
        .args(["stats", "--watch", "1.2", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm ctl");
    std::thread::sleep(Duration::from_millis(4500));
    assert_eq!(vm.shutdown(), Some(0));
    let o = watch.wait_with_output().expect("vmm ctl output");
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{out}\n{err}");
    let replies = out.lines().filter(|l| l.contains("\"ok\":true")).count();
    assert!(replies >= 3, "{replies} replies:\n{out}\n{err}");
    assert!(out.trim_end().ends_with("the VM has ended"), "{out}");
}
