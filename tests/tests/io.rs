//! The DMA device end to end: the `io` fixture drives the virtio block device through the
//! swiotlb pool under every policy, on memfd/memfd and hugetlb/hugetlb backing, with 1 and 2
//! vCPUs; data is verified by the guest, the device must see zero violations, aligned-2m must
//! cause no double allocation on hugetlb. A deliberately broken driver must be refused.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;

use std::sync::Mutex;

/// hugetlb runs take huge pages: one at a time, with enough reserved.
static HUGE: Mutex<()> = Mutex::new(());

const POLICIES: [(&str, &str); 6] = [
    ("legacy", "pool=8M"),
    ("dynamic", "pool=2M"),
    ("refill", "pool=32M"),
    ("throttle", "pool=1M"),
    ("aligned-2m", "pool=4M"),
    ("adaptive", ""),
];

fn run_io(name: &str, policy: &str, opts: &str, huge: bool, cpus: u32) -> serde_json::Value {
    let dir = scratch(&format!("io-{name}"));
    let disk = dir.join("d.img");
    let json = dir.join("stats.json");
    let store = if huge { "hugetlb" } else { "memfd" };
    let cmdline = format!("policy={policy} {opts} requests=300 qd=8 sizes=512-256k rw=50");
    let cpus_s = cpus.to_string();
    let o = vmm_run(&[
        "--guest",
        "io",
        "--mem",
        "128M",
        "--cpus",
        &cpus_s,
        "--private",
        store,
        "--shared",
        store,
        "--disk",
        disk.to_str().unwrap(),
        "--disk-size",
        "32M",
        "--cmdline",
        &cmdline,
        "--stats-json",
        json.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert_eq!(
        code(&o),
        0,
        "{policy} {store} cpus={cpus}\nstdout:\n{out}\nstderr:\n{}",
        stderr(&o)
    );
    assert!(out.contains("io: done"), "{out}");
    assert!(out.contains("mismatches=0"), "{out}");
    let j = read_json(&json);
    let d = &j["disk"];
    assert_eq!(d["violations"], 0, "{out}");
    assert_eq!(d["errors"], 0, "{out}");
    assert_eq!(d["device_faults"], 0, "{out}");
    assert!(d["reads"].as_u64().unwrap() > 0 && d["writes"].as_u64().unwrap() > 0);
    assert_eq!(j["memconv"]["double_accept_violations"], 0, "{out}");
    let report = &j["memconv"]["pool_report"];
    assert_eq!(report["policy"], policy, "{out}");
    assert!(
        report["io_requests"].as_u64().unwrap() >= 300 * cpus as u64,
        "{out}"
    );
    assert_eq!(report["io_errors"], 0);
    // The pool statistics are printed next to memconv's.
    assert!(
        out.contains(&format!("guest pool '{policy}' (latest report)")),
        "{out}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    j
}

fn policy_on(policy: &str, huge: bool) {
    let opts = POLICIES
        .iter()
        .find(|(p, _)| *p == policy)
        .map(|(_, o)| *o)
        .unwrap();
    let _guard = huge.then(|| HUGE.lock().unwrap_or_else(|p| p.into_inner()));
    if huge {
        ensure_free_hugepages(400);
    }
    for cpus in [1, 2] {
        let name = format!("{policy}-{}-{cpus}", if huge { "huge" } else { "memfd" });
        let j = run_io(&name, policy, opts, huge, cpus);
        if huge && (policy == "aligned-2m" || policy == "adaptive") {
            let dbl = &j["memconv"]["double_alloc"];
            assert_eq!(
                dbl["computed_peak_bytes"], 0,
                "aligned-2m double allocation: {dbl}"
            );
            assert_eq!(dbl["kernel_bytes"], 0, "{dbl}");
        }
    }
}

#[test]
fn io_legacy_memfd() {
    policy_on("legacy", false);
}
#[test]
fn io_dynamic_memfd() {
    policy_on("dynamic", false);
}
#[test]
fn io_refill_memfd() {
    policy_on("refill", false);
}
#[test]
fn io_throttle_memfd() {
    policy_on("throttle", false);
}
#[test]
fn io_aligned_2m_memfd() {
    policy_on("aligned-2m", false);
}
#[test]
fn io_adaptive_memfd() {
    policy_on("adaptive", false);
}
#[test]
fn io_adaptive_hugetlb() {
    policy_on("adaptive", true);
}
#[test]
fn io_legacy_hugetlb() {
    policy_on("legacy", true);
}
#[test]
fn io_dynamic_hugetlb() {
    policy_on("dynamic", true);
}
#[test]
fn io_refill_hugetlb() {
    policy_on("refill", true);
}
#[test]
fn io_throttle_hugetlb() {
    policy_on("throttle", true);
}
#[test]
fn io_aligned_2m_hugetlb() {
    policy_on("aligned-2m", true);
}

#[test]
fn broken_driver_is_refused_and_counted() {
    let dir = scratch("io-broken");
    let disk = dir.join("d.img");
    let json = dir.join("stats.json");
    let o = vmm_run(&[
        "--guest",
        "io",
        "--mem",
        "128M",
        "--disk",
        disk.to_str().unwrap(),
        "--disk-size",
        "8M",
        "--cmdline",
        "policy=legacy pool=4M broken=private-buffer",
        "--stats-json",
        json.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert_eq!(code(&o), 6, "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    assert!(
        out.contains("the device refused the private buffer"),
        "{out}"
    );
    let j = read_json(&json);
    assert_eq!(j["disk"]["violations"], 1, "{out}");
    assert_eq!(j["disk"]["bytes_written"], 0, "{out}");
    assert!(out.contains("violations 1"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn disk_errors_are_clear() {
    let dir = scratch("io-disk-errors");
    let missing = dir.join("missing.img");
    let missing = missing.to_str().unwrap();
    // Each case: extra `vmm run` flags, and what the one-line error must say.
    let cases: [(&[&str], &str); 4] = [
        (&["--disk", missing], "give --disk-size"),
        (
            &["--disk", missing, "--disk-size", "1000"],
            "multiple of 512",
        ),
        (&["--disk", dir.to_str().unwrap()], "is a directory"),
        (&["--disk-size", "8M"], ""),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["--guest", "hello", "--mem", "64M"];
        args.extend_from_slice(flags);
        let o = vmm_run(&args);
        assert_eq!(code(&o), 2, "{flags:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{flags:?}: {}", stderr(&o));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
