//! Shared helpers for the integration tests: running the VMM binary under test and checking
//! the machine has what the tests need.
#![allow(dead_code)]

pub mod api_client;
pub mod soak_vm;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The VMM binary built with these tests.
pub fn vmm_bin() -> &'static str {
    env!("CARGO_BIN_EXE_vmm-it")
}

/// Fails the test with a clear message when /dev/kvm is missing: KVM tests never pass silently.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test boots a real KVM guest and /dev/kvm does not exist on this machine"
    );
}

/// Runs `vmm ARGS...` to completion.
pub fn vmm(args: &[&str]) -> Output {
    Command::new(vmm_bin())
        .args(args)
        .output()
        .expect("spawn the vmm binary")
}

/// Runs `vmm run` with the given extra arguments (KVM required).
pub fn vmm_run(args: &[&str]) -> Output {
    require_kvm();
    let mut all = vec!["run"];
    all.extend_from_slice(args);
    vmm(&all)
}

/// stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit status code (panics if killed by a signal: the VMM must never die that way).
pub fn code(o: &Output) -> i32 {
    o.status
        .code()
        .unwrap_or_else(|| panic!("vmm killed by a signal: {:?}\n{}", o.status, stderr(o)))
}

/// A fresh scratch directory for one test.
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-it-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// Reads a `--stats-json` file.
pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).expect("stats json written");
    serde_json::from_str(&text).expect("stats json parses")
}

/// Makes sure at least `free` 2 MiB huge pages are free, raising /proc/sys/vm/nr_hugepages as
/// root if needed (never lowering it). Fails the test with a clear message if it cannot.
pub fn ensure_free_hugepages(free: u64) {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let read = |key: &str| -> u64 {
        let meminfo = std::fs::read_to_string("/proc/meminfo").expect("read /proc/meminfo");
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    // Other processes (a parallel test binary, another VMM) may take pages between our raise and
    // our check: raise by the deficit again a few times before giving up.
    for attempt in 0..5 {
        let have = read("HugePages_Free:");
        if have >= free {
            return;
        }
        let total = read("HugePages_Total:");
        let want = total + (free - have);
        std::fs::write("/proc/sys/vm/nr_hugepages", want.to_string()).unwrap_or_else(|e| {
            panic!("this test needs {free} free 2 MiB huge pages ({have} free) and could not reserve them: {e} (run as root, or `echo {want} > /proc/sys/vm/nr_hugepages`)")
        });
        if attempt > 0 {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    let now = read("HugePages_Free:");
    assert!(
        now >= free,
        "asked the kernel for enough huge pages that {free} are free, but only {now} are; free some memory"
    );
}

/// Parses `key=value` pairs from the guest line that starts with `prefix`.
pub fn guest_fields(out: &str, prefix: &str) -> std::collections::HashMap<String, u64> {
    let line = out
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line starting with {prefix:?} in:\n{out}"));
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| v.parse().ok().map(|v| (k.to_string(), v)))
        .collect()
}

/// The value of the sample `name` with `labels` in a parsed Prometheus scrape; fails the test
/// if there is none.
pub fn prom_sample(scrape: &prometheus_parse::Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .unwrap_or_else(|| panic!("no sample {name} {labels:?}"));
    match &s.value {
        prometheus_parse::Value::Counter(v)
        | prometheus_parse::Value::Gauge(v)
        | prometheus_parse::Value::Untyped(v) => *v,
        other => panic!("{name}: unexpected {other:?}"),
    }
}
