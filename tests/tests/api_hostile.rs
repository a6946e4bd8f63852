//! The control socket against hostile or careless clients, on a real VM: duplicate keys are
//! refused (`{"cmd":"stats","cmd":"shutdown"}` does not shut the VM down), any JSON id comes
//! back exactly as sent (beyond 64 bits, strings, objects), clients that never send are dropped
//! after the idle timeout so 64 of them cannot lock everyone else out, and
//! `vmm ctl stats --watch` reconnects when it is dropped.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::api_client::Conn;
use common::soak_vm::{SoakOpts, SoakVm};
use common::vmm_bin;
use serde_json::Value;

/// A `vmm run` of `soak` with a control socket and the given idle timeout.
fn start(name: &str, idle_ms: u64) -> SoakVm {
    SoakVm::start_with(
        name,
        &SoakOpts {
            env: &[("VMM_API_IDLE_TIMEOUT_MS", idle_ms.to_string())],
            ..SoakOpts::default()
        },
    )
}

fn parse(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

#[test]
fn duplicate_keys_are_refused_and_the_vm_runs_on() {
    let mut vm = start("dup-keys", 10_000);
    let mut c = Conn::try_open(&vm.sock).expect("connect");
    for line in [
        r#"{"cmd":"stats","cmd":"shutdown","id":7}"#,
        r#"{"cmd":"shutdown","cmd":"stats","id":7}"#,
        r#"{"id":7,"cmd":"shutdown","protocol":1,"protocol":1}"#,
    ] {
        let reply = parse(&c.try_request(line).expect("a reply"));
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
    let stats = parse(&c.try_request(r#"{"cmd":"stats"}"#).expect("stats"));
    assert_eq!(stats["return"]["state"], "running", "{stats}");
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn ids_come_back_exactly_as_sent() {
    let mut vm = start("raw-ids", 10_000);
    let mut c = Conn::try_open(&vm.sock).expect("connect");
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
                .try_request(&format!(r#"{{"cmd":"{cmd}","id":{id}}}"#))
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
    let mut vm = start("idle", IDLE_MS);
    // Every client slot taken by connections that never send: connect until one is refused.
    let t0 = Instant::now();
    let mut idlers: Vec<Conn> = Vec::new();
    let mut refused = false;
    while idlers.len() < 70 {
        match Conn::try_open(&vm.sock) {
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
    let mut c = Conn::try_open(&vm.sock).expect("connect after the idlers were dropped");
    let stats = parse(&c.try_request(r#"{"cmd":"stats","id":1}"#).expect("stats"));
    assert_eq!(stats["ok"], true, "{stats}");
    // A client that keeps sending is never dropped.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(IDLE_MS / 2));
        let r = parse(&c.try_request(r#"{"cmd":"config"}"#).expect("still served"));
        assert_eq!(r["ok"], true, "{r}");
    }
    assert_eq!(vm.shutdown(), Some(0));
}

#[test]
fn ctl_watch_reconnects_when_dropped_for_idling() {
    let mut vm = start("watch-reconnect", 500);
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
