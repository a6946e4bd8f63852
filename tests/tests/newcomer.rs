//! A newcomer's first hour (issue 15): `vmm run` alone runs the main job and leaves nothing
//! behind; typos in a guest command line are usage errors naming the key, in `vmm run` and in
//! `vmm conform`; `/metrics` over HTTP parses as Prometheus text (and OpenMetrics when asked);
//! conform removes its cells' disk images unless `--keep`.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn the_default_run_shows_conversions_and_dma_and_leaves_no_file() {
    require_kvm();
    let dir = scratch("default-run");
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let json = dir.join("stats.json");
    let o = Command::new(vmm_bin())
        .args(["run", "--stats-json", json.to_str().unwrap()])
        .env("TMPDIR", &tmp)
        .output()
        .unwrap();
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    assert!(out.contains("io: done policy=legacy"), "{out}");
    assert!(out.contains("double allocation:"), "{out}");
    assert!(out.contains("try next:"), "{out}");
    let s = read_json(&json);
    let m = &s["memconv"];
    let to_shared: u64 = ["4k", "sub2m", "2m"]
        .iter()
        .map(|k| m["to_shared"][k].as_u64().unwrap())
        .sum();
    assert!(to_shared > 0, "no conversions: {m}");
    assert!(
        s["disk"]["requests"].as_u64().unwrap() > 0,
        "no DMA: {}",
        s["disk"]
    );
    assert_eq!(s["disk"]["errors"], 0);
    assert_eq!(m["pool_report"]["policy"], "legacy");
    assert!(m["pool_report"]["maps"].as_u64().unwrap() > 0);
    let disk = s["disk"]["path"].as_str().unwrap();
    assert!(disk.starts_with(tmp.to_str().unwrap()), "{disk}");
    assert_eq!(files_under(&tmp), Vec::<std::path::PathBuf>::new());
}

#[test]
fn the_main_job_removes_its_disk_when_killed_by_sigterm() {
    require_kvm();
    let dir = scratch("default-run-term");
    let mut child = Command::new(vmm_bin())
        .args(["run", "--cmdline", "seconds=30"])
        .env("TMPDIR", &dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while files_under(&dir).is_empty() {
        assert!(Instant::now() < deadline, "the main job made no disk");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    assert!(!status.success());
    assert_eq!(files_under(&dir), Vec::<std::path::PathBuf>::new());
}

#[test]
fn an_unknown_key_or_a_bad_value_is_a_usage_error_naming_the_key() {
    for (args, named) in [
        (
            &["--guest", "io", "--cmdline", "polcy=throttle"][..],
            "\"polcy\"",
        ),
        (&["--cmdline", "polcy=throttle"][..], "\"polcy\""),
        (
            &["--guest", "io", "--cmdline", "policy=bogus"][..],
            "key policy",
        ),
        (
            &["--guest", "soak", "--cmdline", "pattern=5k"][..],
            "key pattern",
        ),
        (&["--guest", "hello", "--cmdline", "x=1"][..], "\"x\""),
    ] {
        let mut all = vec!["run"];
        all.extend_from_slice(args);
        let o = vmm(&all);
        let err = stderr(&o);
        assert_eq!(code(&o), 2, "{args:?}: {err}");
        assert!(err.contains(named), "{args:?}: {err}");
        assert!(
            err.contains("accepts"),
            "{args:?} should list what is accepted: {err}"
        );
    }
    let o = vmm(&["run", "--guest", "io", "--cmdline", "policy=bogus"]);
    assert!(stderr(&o).contains("throttle"), "{}", stderr(&o));
}

#[test]
fn conform_with_a_bad_cmdline_is_a_usage_error_before_any_cell_runs() {
    let dir = scratch("conform-bad-cmdline");
    let out = dir.join("out");
    let o = vmm(&[
        "conform",
        "--quick",
        "--out",
        out.to_str().unwrap(),
        "--cmdline",
        "qd=0",
    ]);
    let err = stderr(&o);
    assert_eq!(code(&o), 2, "{err}");
    assert!(err.contains("key qd"), "{err}");
    assert!(!out.join("conform.json").exists(), "no cell may have run");
}

/// A VMM whose stderr is read for the metrics address line.
struct MetricsVm {
    child: Child,
    addr: SocketAddr,
    sock: std::path::PathBuf,
    json: std::path::PathBuf,
}

impl MetricsVm {
    fn start(dir: &Path) -> MetricsVm {
        require_kvm();
        let sock = dir.join("vm.sock");
        let json = dir.join("stats.json");
        let mut child = Command::new(vmm_bin())
            .args(["run", "--guest", "soak", "--mem", "64M", "--quiet"])
            .args(["--cmdline", "seconds=0 pattern=mix"])
            .args(["--metrics-addr", "127.0.0.1:0", "--stats-json"])
            .arg(&json)
            .arg("--api-socket")
            .arg(&sock)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        err.read_line(&mut line).unwrap();
        let addr = line
            .trim()
            .strip_prefix("vmm: metrics at http://")
            .and_then(|l| l.strip_suffix("/metrics"))
            .unwrap_or_else(|| panic!("no metrics address line: {line:?}"))
            .parse()
            .unwrap();
        // Keep draining stderr so the VMM never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
        MetricsVm {
            child,
            addr,
            sock,
            json,
        }
    }

    /// `GET path` with `accept`: (status line, headers, body).
    fn get(&self, path: &str, accept: &str) -> (String, String, String) {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (
            status.to_string(),
            headers.to_ascii_lowercase(),
            body.to_string(),
        )
    }
}

impl Drop for MetricsVm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool check metrics` on `body`, if promtool is installed.
fn promtool_check(body: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        eprintln!("promtool is not installed (apt-get install prometheus): skipping its check");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    // promtool exits 3 for lint findings (style), 1 for a body it cannot parse.
    let report = format!("{}{}", stdout(&o), stderr(&o));
    assert_ne!(o.status.code(), Some(1), "promtool cannot parse: {report}");
    assert!(!report.contains("error while linting"), "{report}");
}

#[test]
fn metrics_over_http_parse_and_carry_the_conversion_counters() {
    let dir = scratch("metrics-http");
    let vm = MetricsVm::start(&dir);
    let deadline = Instant::now() + Duration::from_secs(30);
    let (scrape, body) = loop {
        let (status, headers, body) = vm.get("/metrics", "text/plain");
        assert!(status.contains(" 200 "), "{status}");
        assert!(headers.contains("text/plain; version=0.0.4"), "{headers}");
        let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
            .expect("the body parses as Prometheus text");
        let converted = prom_sample(
            &scrape,
            "memconv_conversions_total",
            &[("direction", "to_shared"), ("size", "4k")],
        ) + prom_sample(
            &scrape,
            "memconv_conversions_total",
            &[("direction", "to_shared"), ("size", "2m")],
        );
        if converted > 0.0 {
            break (scrape, body);
        }
        assert!(Instant::now() < deadline, "no conversion counted:\n{body}");
        std::thread::sleep(Duration::from_millis(300));
    };
    assert!(scrape.samples.len() > 50, "{body}");
    assert!(scrape.docs.contains_key("memconv_conversions_total"));
    promtool_check(&body);

    // OpenMetrics when asked: counter families without _total, # EOF at the end.
    let (status, headers, om) = vm.get(
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    );
    assert!(status.contains(" 200 "), "{status}");
    assert!(
        headers.contains("application/openmetrics-text"),
        "{headers}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE memconv_conversions counter"), "{om}");
    assert!(om.contains("memconv_conversions_total{"), "{om}");

    let (status, _, _) = vm.get("/nope", "*/*");
    assert!(status.contains(" 404 "), "{status}");

    // A control-socket pause shows in the pause counter.
    let before = prom_sample(&scrape, "vmm_vcpu_pauses_total", &[]);
    for cmd in ["pause", "resume"] {
        let o = vmm(&["ctl", vm.sock.to_str().unwrap(), cmd]);
        assert_eq!(code(&o), 0, "{}", stderr(&o));
    }
    std::thread::sleep(Duration::from_millis(300));
    let (_, _, body) = vm.get("/metrics", "text/plain");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap();
    assert!(prom_sample(&scrape, "vmm_vcpu_pauses_total", &[]) > before);
    let o = vmm(&["ctl", vm.sock.to_str().unwrap(), "shutdown"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let mut vm = vm;
    assert!(vm.child.wait().unwrap().success());
    // The summary's pause counter is the same one: the control-socket pause is in it.
    let stats = read_json(&vm.json);
    assert!(
        stats["memconv"]["vcpu_pauses"].as_u64().unwrap() >= 1,
        "{stats}"
    );
    assert_eq!(stats["vcpu_pauses"], stats["memconv"]["vcpu_pauses"]);
}

#[test]
fn a_bad_or_busy_metrics_address_is_a_clear_usage_error() {
    let o = vmm(&["run", "--guest", "hello", "--metrics-addr", "localhost"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("--metrics-addr"), "{}", stderr(&o));
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let o = vmm(&["run", "--guest", "hello", "--metrics-addr", &addr]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot listen"), "{}", stderr(&o));
}

fn conform_one_cell(name: &str, keep: bool) -> Vec<std::path::PathBuf> {
    require_kvm();
    let dir = scratch(name);
    let out = dir.join("out");
    let mut args = vec![
        "conform",
        "--filter",
        "legacy/memfd-memfd/4k/steady",
        "--jobs",
        "1",
        "--out",
        out.to_str().unwrap(),
    ];
    if keep {
        args.push("--keep");
    }
    let o = vmm(&args);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let cells = out.join("cells");
    assert!(
        files_under(&cells)
            .iter()
            .any(|f| f.ends_with("serial.txt")),
        "the cell ran and kept its log"
    );
    files_under(&cells)
        .into_iter()
        .filter(|f| f.extension().is_some_and(|e| e == "img"))
        .collect()
}

#[test]
fn conform_removes_cell_disks_unless_keep() {
    assert_eq!(
        conform_one_cell("conform-rm", false),
        Vec::<std::path::PathBuf>::new()
    );
    assert_eq!(conform_one_cell("conform-keep", true).len(), 1);
}
