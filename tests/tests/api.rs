//! The control socket on real VMs: live statistics from concurrent clients while `soak`
//! converts, their consistency with the final `--stats-json` summary, pause/resume/shutdown,
//! every bad-client case (each followed by a check that the VM runs on and other clients are
//! served), socket-file handling, `vmm ctl` (table, JSON, watch, errors) and the Prometheus
//! output checked by a parser of the exposition format (and by `promtool` when installed).

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::api_client::Conn;
use common::soak_vm::{SoakOpts, SoakVm as Vm};
use common::{guest_fields, prom_sample, read_json, require_kvm, scratch, vmm, vmm_bin};
use serde_json::Value;

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Conversions memconv has done (both directions, all sizes).
fn conversions(stats: &Value) -> u64 {
    let m = &stats["memconv"];
    ["to_shared", "to_private"]
        .iter()
        .flat_map(|d| ["4k", "sub2m", "2m"].map(|s| num(&m[d][s])))
        .sum()
}

fn exits_total(stats: &Value) -> u64 {
    stats["exits"]
        .as_array()
        .expect("exits")
        .iter()
        .map(|e| num(&e["total"]))
        .sum()
}

/// The VM keeps running and serving: a new client gets `stats`, and conversions and exits
/// move (snapshots are reused for at most 250 ms: poll for a newer one).
fn assert_alive(sock: &Path) {
    let mut c = Conn::open(sock);
    let a = c.cmd("stats");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let b = c.cmd("stats");
        assert_eq!(b["state"], "running", "{b}");
        if num(&b["uptime_ms"]) > num(&a["uptime_ms"]) {
            assert!(
                conversions(&b) > conversions(&a),
                "conversions stopped: {} -> {}",
                conversions(&a),
                conversions(&b)
            );
            assert!(exits_total(&b) > exits_total(&a), "exits stopped");
            return;
        }
        assert!(Instant::now() < deadline, "no new snapshot in 3 s: {b}");
    }
}

fn ctl(sock: &Path, args: &[&str]) -> std::process::Output {
    Command::new(vmm_bin())
        .arg("ctl")
        .arg(sock)
        .args(args)
        .output()
        .expect("spawn vmm ctl")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn concurrent_clients_see_live_counters_consistent_with_the_final_summary() {
    let mut vm = Vm::start("api-live", "seconds=0");
    let sock = vm.sock.clone();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let sock = sock.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(&sock);
                let mut samples = Vec::new();
                for _ in 0..8 {
                    samples.push(c.cmd("stats"));
                    std::thread::sleep(Duration::from_millis(40));
                }
                samples
            })
        })
        .collect();
    let mut last = Value::Null;
    for t in clients {
        let samples = t.join().expect("client thread");
        for w in samples.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            assert!(conversions(b) >= conversions(a));
            assert!(exits_total(b) >= exits_total(a));
            assert!(num(&b["uptime_ms"]) >= num(&a["uptime_ms"]));
            assert!(num(&b["memconv"]["pages_converted"]) >= num(&a["memconv"]["pages_converted"]));
        }
        let (first, final_) = (&samples[0], &samples[samples.len() - 1]);
        assert!(
            conversions(final_) > conversions(first),
            "counters did not move over 300 ms: {first}"
        );
        assert!(exits_total(final_) > exits_total(first));
        for s in &samples {
            assert_eq!(s["protocol"], 1);
            assert_eq!(s["cpus"], 1);
            // Exit counts are read before the memconv snapshot: never ahead of it.
            assert!(
                num(&s["exits"][0]["doorbell"]) <= num(&s["memconv"]["doorbells"]),
                "{s}"
            );
            // The guest reports what it completed: never ahead of memconv.
            if let Some(p) = s["memconv"]["pool_report"].as_object() {
                assert_eq!(p["policy"], "soak");
                let guest: u64 = ["conversions_4k", "conversions_2m", "conversions_other"]
                    .iter()
                    .map(|k| num(&p[*k]))
                    .sum();
                assert!(
                    guest <= conversions(s),
                    "guest {guest} > host {}",
                    conversions(s)
                );
                assert!(num(&p["maps"]) > 0);
            }
        }
        if last.is_null() || conversions(final_) > conversions(&last) {
            last = final_.clone();
        }
    }
    // The guest reports every 100 ms; on a loaded machine the first report can come later
    // than the sampling window above, so wait for it (bounded).
    if !last["memconv"]["pool_report"].is_object() {
        let mut c = Conn::open(&sock);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !last["memconv"]["pool_report"].is_object() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            last = c.cmd("stats");
        }
    }
    assert!(
        last["memconv"]["pool_report"].is_object(),
        "no guest pool report within 10 s: {last}"
    );

    // Shutdown through the CLI: the VM ends cleanly and the summary is written.
    let out = ctl(&sock, &["shutdown"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("VM ended: stopped"),
        "{}",
        text(&out.stdout)
    );
    let (status, _, err) = vm.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!sock.exists(), "the socket file must be removed on exit");
    let summary = read_json(&vm.json);
    assert_eq!(summary["end"]["kind"], "stopped", "{}", summary["end"]);
    assert_eq!(summary["exit_status"], 0);
    assert!(conversions(&summary) >= conversions(&last));
    assert!(exits_total(&summary) >= exits_total(&last));
    // At the end every exit is published: the vCPU's doorbells are memconv's.
    assert_eq!(
        summary["exits"][0]["doorbell"], summary["memconv"]["doorbells"],
        "{}",
        summary["exits"]
    );
}

#[test]
fn pause_stops_the_counters_resume_restarts_them_and_shutdown_ends_a_paused_vm() {
    let mut vm = Vm::start("api-pause", "seconds=0");
    let mut c = Conn::open(&vm.sock);
    let running = c.cmd("stats");
    assert_eq!(running["state"], "running");

    // Pause through the CLI, observe through the protocol.
    let out = ctl(&vm.sock, &["pause"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "paused");
    let a = c.cmd("stats");
    std::thread::sleep(Duration::from_millis(300));
    let b = c.cmd("stats");
    assert_eq!(a["state"], "paused");
    assert_eq!(
        conversions(&a),
        conversions(&b),
        "conversions moved while paused"
    );
    assert_eq!(a["exits"], b["exits"], "exits moved while paused");
    assert_eq!(
        a["memconv"]["pages_converted"],
        b["memconv"]["pages_converted"]
    );
    assert!(conversions(&a) >= conversions(&running));
    // Pausing again changes nothing.
    let again = c.cmd("pause");
    assert_eq!(again, serde_json::json!({"state":"paused","changed":false}));

    let resumed = c.cmd("resume");
    assert_eq!(
        resumed,
        serde_json::json!({"state":"running","changed":true})
    );
    std::thread::sleep(Duration::from_millis(200));
    let after = c.cmd("stats");
    assert!(
        conversions(&after) > conversions(&b),
        "conversions did not restart"
    );
    let out = ctl(&vm.sock, &["resume"]);
    assert_eq!(text(&out.stdout).trim(), "already running");

    // A paused VM shuts down cleanly; the client sees the vm_end event.
    assert_eq!(c.cmd("pause")["changed"], true);
    let paused_at = c.cmd("stats");
    let bye = c.cmd("shutdown");
    assert_eq!(bye, serde_json::json!({"state":"ending","changed":true}));
    let event = loop {
        let msg = c.read_msg().expect("the vm_end event before EOF");
        if msg.get("event").is_some() {
            break msg;
        }
    };
    assert_eq!(event["event"], "vm_end");
    assert_eq!(event["data"]["end"]["kind"], "stopped");
    assert_eq!(event["data"]["exit_status"], 0);
    assert!(c.read_msg().is_none(), "the server closes after vm_end");
    let (status, _, err) = vm.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{err}");
    let summary = read_json(&vm.json);
    assert_eq!(summary["end"]["kind"], "stopped");
    assert_eq!(conversions(&summary), conversions(&paused_at));
    assert!(num(&summary["vcpu_pauses"]) >= 2);
}

#[test]
fn guest_exit_ends_serving_and_the_guest_counts_match_memconv() {
    let mut vm = Vm::start("api-guest-exit", "seconds=1");
    let mut c = Conn::open(&vm.sock);
    let live = c.cmd("stats");
    let event = loop {
        let msg = c.read_msg().expect("vm_end before EOF");
        if msg.get("event").is_some() {
            break msg;
        }
    };
    assert_eq!(event["data"]["end"]["kind"], "guest_exit", "{event}");
    assert_eq!(event["data"]["exit_status"], 0);
    let (status, _, err) = vm.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!vm.sock.exists());
    let serial = vm.serial_text();
    let done = guest_fields(&serial, "soak: done");
    let summary = read_json(&vm.json);
    let m = &summary["memconv"];
    assert_eq!(done["conversions"], conversions(&summary), "{serial}");
    assert_eq!(done["errors"], 0);
    for (guest, host) in [("4k", "4k"), ("sub2m", "sub2m"), ("2m", "2m")] {
        assert_eq!(
            done[guest],
            num(&m["to_shared"][host]) + num(&m["to_private"][host]),
            "{guest}"
        );
    }
    assert_eq!(done["pages"], num(&m["pages_converted"]));
    assert!(conversions(&summary) >= conversions(&live));
    // The last report went out after the last batch: it has the final counts.
    let p = &m["pool_report"];
    assert_eq!(
        num(&p["conversions_4k"]) + num(&p["conversions_2m"]) + num(&p["conversions_other"]),
        done["conversions"]
    );
}

#[test]
fn malformed_requests_get_error_codes_and_the_connection_stays_usable() {
    let vm = Vm::start("api-garbage", "seconds=0");
    let mut c = Conn::open(&vm.sock);
    for (line, code) in [
        ("garbage", "parse_error"),
        ("{\"cmd\":", "parse_error"),
        ("[1,2]", "bad_request"),
        ("{\"id\":5}", "bad_request"),
        ("{\"cmd\":7}", "bad_request"),
        ("{\"cmd\":\"reboot\",\"id\":\"x\"}", "unknown_command"),
        (
            "{\"cmd\":\"stats\",\"protocol\":99}",
            "unsupported_protocol",
        ),
        ("{\"cmd\":\"stats\",\"verbose\":true}", "bad_request"),
    ] {
        let reply = c.request(line);
        assert_eq!(Conn::error_code(&reply), code, "{line}: {reply}");
    }
    let reply = c.request("{\"cmd\":\"reboot\",\"id\":\"x\"}");
    assert_eq!(reply["id"], "x", "the id is echoed in errors");
    // Invalid UTF-8, NUL bytes.
    c.send(b"\xff\xfe\x00{\n");
    assert_eq!(Conn::error_code(&c.reply()), "parse_error");
    // Blank lines are ignored; CRLF is accepted; ids are echoed.
    c.send(b"\n   \n{\"cmd\":\"config\",\"id\":7}\r\n");
    let reply = c.reply();
    assert_eq!(reply["id"], 7, "{reply}");
    assert_eq!(reply["return"]["config"]["mem"], 64 << 20);
    assert_eq!(reply["return"]["config"]["guest"]["Fixture"], "soak");
    // Pipelined requests are answered in order.
    c.send(b"{\"cmd\":\"stats\",\"id\":1}\n{\"cmd\":\"config\",\"id\":2}\n{\"cmd\":\"nope\",\"id\":3}\n");
    for id in 1..=3 {
        assert_eq!(c.reply()["id"], id);
    }
    assert!(c.cmd("stats")["memconv"].is_object());
    assert_alive(&vm.sock);
}

#[test]
fn an_over_long_line_is_refused_and_the_client_closed() {
    let vm = Vm::start("api-long", "seconds=0");
    let mut c = Conn::open(&vm.sock);
    let long = vec![b'a'; 70 * 1024];
    // The server stops reading at 64 KiB: the rest of the write may fail, that is fine.
    let _ = c.try_send(&long);
    let reply = c.read_msg().expect("an error reply");
    assert_eq!(Conn::error_code(&reply), "line_too_long");
    assert!(c.read_msg().is_none(), "the connection is closed");
    // A long but valid-sized line is fine (64 KiB limit).
    let mut c = Conn::open(&vm.sock);
    let padded = format!("{{\"cmd\":\"stats\",\"id\":\"{}\"}}", "p".repeat(60 * 1024));
    let reply = c.request(&padded);
    assert_eq!(reply["ok"], true);
    assert_alive(&vm.sock);
}

#[test]
fn a_half_line_then_disconnect_is_forgotten() {
    let vm = Vm::start("api-half", "seconds=0");
    {
        let mut c = Conn::open(&vm.sock);
        c.send(b"{\"cmd\":\"sta");
    } // dropped mid-line
      // Half-closed after a complete line and a half one: one reply, then EOF.
    let mut c = Conn::open(&vm.sock);
    c.send(b"{\"cmd\":\"config\",\"id\":1}\n{\"cmd\":\"st");
    c.shutdown_write();
    assert_eq!(c.reply()["id"], 1);
    assert!(c.read_msg().is_none());
    // Connect and vanish without a byte.
    drop(UnixStream::connect(&vm.sock).expect("connect"));
    assert_alive(&vm.sock);
}

#[test]
fn a_client_that_stops_reading_is_dropped() {
    let vm = Vm::start("api-noread", "seconds=0");
    let mut bad = UnixStream::connect(&vm.sock).expect("connect");
    bad.set_write_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let requests = 4000;
    let burst = "{\"cmd\":\"stats\"}\n".repeat(requests);
    // The server may drop us while we still write.
    let _ = bad.write_all(burst.as_bytes());
    // Others are served meanwhile.
    assert_alive(&vm.sock);
    // Wait until the server has dropped us: writing then fails (broken pipe or reset).
    bad.set_write_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match bad.write(b"{\"cmd\":\"config\"}\n") {
            Err(e) if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) => {
                break
            }
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "the server kept a client that does not read for 30 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The bad client got some replies and then the connection was closed.
    bad.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(bad);
    let mut lines = 0;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) if line.ends_with('\n') => lines += 1,
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server neither answered nor closed: {e}"),
        }
    }
    assert!(
        lines < requests,
        "the server answered all {lines} requests instead of dropping the client"
    );
    assert_alive(&vm.sock);
}

#[test]
fn many_clients_at_once_and_a_limit() {
    let vm = Vm::start("api-many", "seconds=0");
    let threads: Vec<_> = (0..40)
        .map(|_| {
            let sock = vm.sock.clone();
            std::thread::spawn(move || {
                let mut c = Conn::open(&sock);
                (0..5)
                    .map(|_| conversions(&c.cmd("stats")))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    for t in threads {
        let seen = t.join().expect("client thread");
        assert!(seen.windows(2).all(|w| w[0] <= w[1]));
    }
    // 64 clients are served at once; the next is told why it is turned away.
    let held: Vec<Conn> = (0..64).map(|_| Conn::open(&vm.sock)).collect();
    let mut extra = UnixStream::connect(&vm.sock).expect("connect");
    extra
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut line = String::new();
    BufReader::new(&mut extra)
        .read_line(&mut line)
        .expect("an answer");
    let reply: Value = serde_json::from_str(&line).expect("JSON");
    assert_eq!(Conn::error_code(&reply), "too_many_clients");
    drop(held);
    std::thread::sleep(Duration::from_millis(100));
    assert_alive(&vm.sock);
}

#[test]
fn socket_file_is_private_stale_ones_replaced_live_ones_kept_and_removed_on_exit() {
    require_kvm();
    let dir = scratch("api-sockfile");
    let sock = dir.join("api.sock");
    // A stale socket from a dead VMM.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    assert!(sock.exists());
    let mut vm = Vm::spawn(dir.clone(), sock.clone(), &SoakOpts::default());
    vm.wait_for_socket(Duration::from_secs(30));
    let mode = std::fs::metadata(&sock)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    // A second VMM on the same socket is refused and does not disturb the first.
    let json2 = dir.join("second.json");
    let second = vmm(&[
        "run",
        "--guest",
        "soak",
        "--mem",
        "64M",
        "--cmdline",
        "seconds=1",
        "--api-socket",
        sock.to_str().expect("utf-8 path"),
        "--stats-json",
        json2.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(second.status.code(), Some(2));
    let err = text(&second.stderr);
    assert!(err.contains("a running VMM is serving"), "{err}");
    assert!(!json2.exists(), "the second VM must not have run");
    assert_alive(&sock);

    // A path that is not a socket is never touched.
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "keep me").expect("write");
    let third = vmm(&[
        "run",
        "--guest",
        "hello",
        "--api-socket",
        file.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(third.status.code(), Some(2));
    assert!(text(&third.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&file).expect("kept"), "keep me");

    let out = ctl(&sock, &["shutdown"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let (status, _, err) = vm.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(!sock.exists(), "removed on exit");
}

#[test]
fn ctl_reports_missing_and_refused_sockets_with_status_2() {
    let dir = scratch("api-ctl-errors");
    let missing = dir.join("missing.sock");
    let out = ctl(&missing, &["stats"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(err.contains("no control socket at"), "{err}");
    let stale = dir.join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    let out = ctl(&stale, &["stats"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("refused"),
        "{}",
        text(&out.stderr)
    );
    let out = ctl(&missing, &["stats", "--watch", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn ctl_stats_table_json_and_watch() {
    let mut vm = Vm::start("api-ctl", "seconds=0");
    // Long enough for the guest's first pool report (every 100 ms).
    std::thread::sleep(Duration::from_millis(300));
    let out = ctl(&vm.sock, &["stats"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    for want in [
        "VM running",
        "to_shared",
        "to_private",
        "latency",
        "exits  cpu",
        "guest pool 'soak'",
    ] {
        assert!(table.contains(want), "{want:?} missing from:\n{table}");
    }
    let out = ctl(&vm.sock, &["stats", "--json"]);
    let reply: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(reply["ok"], true);
    assert!(conversions(&reply["return"]) > 0);
    let out = ctl(&vm.sock, &["config", "--json"]);
    let reply: Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(reply["return"]["native"], true);

    // --watch refreshes (with rates) until the VM ends.
    let watcher = Command::new(vmm_bin())
        .arg("ctl")
        .arg(&vm.sock)
        .args(["stats", "--watch", "0.2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn watch");
    std::thread::sleep(Duration::from_millis(900));
    let out = ctl(&vm.sock, &["shutdown"]);
    assert_eq!(out.status.code(), Some(0));
    let watched = watcher.wait_with_output().expect("watch ends with the VM");
    assert_eq!(watched.status.code(), Some(0), "{}", text(&watched.stderr));
    let w = text(&watched.stdout);
    assert!(w.matches("VM running").count() >= 3, "{w}");
    assert!(
        w.contains("exits/s"),
        "rates from the second sample on: {w}"
    );
    assert!(w.contains("the VM has ended"), "{w}");
    let (status, _, _) = vm.wait(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0));
}

#[test]
fn metrics_are_valid_prometheus_text_consistent_with_stats() {
    let vm = Vm::start("api-metrics", "seconds=0");
    let mut c = Conn::open(&vm.sock);
    std::thread::sleep(Duration::from_millis(200));
    let before = c.cmd("stats");
    let out = ctl(&vm.sock, &["metrics", "--label", "vm=it"]);
    let after = c.cmd("stats");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let body = text(&out.stdout);

    // Every line is a HELP, a TYPE or a sample the parser understands; every family has
    // HELP and TYPE before its samples.
    let mut typed: std::collections::HashMap<String, String> = Default::default();
    let mut helped = std::collections::HashSet::new();
    let mut sample_lines = 0;
    for line in body.lines() {
        use prometheus_parse::LineInfo;
        match LineInfo::parse(line) {
            LineInfo::Doc { metric_name, .. } => {
                assert!(helped.insert(metric_name.to_string()), "HELP twice: {line}");
            }
            LineInfo::Type {
                metric_name,
                metric_alias,
                sample_type,
            } => {
                let family = metric_alias.unwrap_or(metric_name);
                assert!(helped.contains(&family), "TYPE before HELP: {line}");
                typed.insert(family, format!("{sample_type:?}"));
            }
            LineInfo::Sample { metric_name, .. } => {
                sample_lines += 1;
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| {
                        metric_name
                            .strip_suffix(s)
                            .filter(|f| typed.get(*f).is_some_and(|t| t == "Histogram"))
                    })
                    .unwrap_or(metric_name);
                let kind = typed
                    .get(family)
                    .unwrap_or_else(|| panic!("sample without TYPE: {line}"));
                if kind == "Counter" {
                    assert!(
                        family.ends_with("_total"),
                        "counter not named _total: {line}"
                    );
                }
                assert!(line.contains("vm=\"it\""), "constant label missing: {line}");
            }
            other => panic!("line the parser does not understand: {line:?} ({other:?})"),
        }
    }
    let scrape =
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("parses");
    assert!(sample_lines > 50, "{body}");
    let value = |name: &str, labels: &[(&str, &str)]| prom_sample(&scrape, name, labels);
    let between = |name: &str, labels: &[(&str, &str)], a: f64, b: f64| {
        let v = value(name, labels);
        assert!(
            a <= v && v <= b,
            "{name} {labels:?} = {v}, not in [{a}, {b}]"
        );
    };
    let m = |s: &Value, d: &str, k: &str| num(&s["memconv"][d][k]) as f64;
    for d in ["to_shared", "to_private"] {
        for k in ["4k", "sub2m", "2m"] {
            between(
                "memconv_conversions_total",
                &[("direction", d), ("size", k)],
                m(&before, d, k),
                m(&after, d, k),
            );
        }
    }
    between(
        "vmm_vcpu_exits_total",
        &[("cpu", "0"), ("reason", "doorbell")],
        num(&before["exits"][0]["doorbell"]) as f64,
        num(&after["exits"][0]["doorbell"]) as f64,
    );
    between(
        "memconv_converted_pages_total",
        &[],
        num(&before["memconv"]["pages_converted"]) as f64,
        num(&after["memconv"]["pages_converted"]) as f64,
    );
    assert_eq!(value("memconv_ram_bytes", &[]), (64u64 << 20) as f64);
    assert_eq!(value("vmm_vcpus", &[]), 1.0);
    assert_eq!(value("vmm_state", &[("state", "running")]), 1.0);
    assert!(value("guest_pool_maps_total", &[("policy", "soak")]) > 0.0);
    assert!(
        value(
            "memconv_store_owned_bytes",
            &[("side", "private"), ("store", "memfd")]
        ) > 0.0
    );
    // The latency histogram: cumulative buckets up to +Inf == count.
    let hist = scrape
        .samples
        .iter()
        .find(|s| s.metric == "memconv_conversion_latency_seconds")
        .expect("latency histogram");
    let prometheus_parse::Value::Histogram(buckets) = &hist.value else {
        panic!("not a histogram: {hist:?}");
    };
    assert!(buckets.windows(2).all(|w| w[0].less_than < w[1].less_than));
    assert!(buckets.windows(2).all(|w| w[0].count <= w[1].count));
    let inf = buckets.last().expect("buckets");
    assert!(inf.less_than.is_infinite());
    assert_eq!(
        inf.count,
        value("memconv_conversion_latency_seconds_count", &[])
    );
    assert!(inf.count > 0.0);

    // promtool's linter, where installed (apt package `prometheus`).
    if let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(body.as_bytes())
            .expect("feed promtool");
        let out = child.wait_with_output().expect("promtool");
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }
    assert_alive(&vm.sock);
}
