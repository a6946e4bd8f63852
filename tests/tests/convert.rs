//! The conversion service end to end: the `convert` guest on every store pair, both host
//! granularities, 1 and 4 vCPUs, checked against the guest's own verification, the host's
//! reject counters and the kernel's view of the stores.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use serde_json::Value;

const PAIRS: [(&str, &str); 5] = [
    ("memfd", "memfd"),
    ("gmem", "memfd"),
    ("memfd", "hugetlb"),
    ("gmem", "hugetlb"),
    ("hugetlb", "hugetlb"),
];

fn uses_hugetlb(private: &str, shared: &str) -> bool {
    private == "hugetlb" || shared == "hugetlb"
}

/// Runs `convert` and returns (guest stdout, memconv statistics).
fn convert(
    private: &str,
    shared: &str,
    granularity: &str,
    cpus: u32,
    cmdline: &str,
) -> (String, Value) {
    if uses_hugetlb(private, shared) {
        ensure_free_hugepages(160);
    }
    let dir = scratch(&format!("convert-{private}-{shared}-{granularity}-{cpus}"));
    let json = dir.join("stats.json");
    let cpus_s = cpus.to_string();
    let o = vmm_run(&[
        "--guest",
        "convert",
        "--mem",
        "64M",
        "--cpus",
        &cpus_s,
        "--private",
        private,
        "--shared",
        shared,
        "--granularity",
        granularity,
        "--cmdline",
        cmdline,
        "--stats-json",
        json.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    assert_eq!(
        code(&o),
        0,
        "{private}/{shared} {granularity} cpus={cpus}: guest failed\n{out}\n{}",
        stderr(&o)
    );
    let stats = read_json(&json)["memconv"].clone();
    (out, stats)
}

fn reject(stats: &Value, name: &str) -> u64 {
    stats["rejects"]
        .as_array()
        .expect("rejects list")
        .iter()
        .find(|r| r["name"] == name)
        .and_then(|r| r["count"].as_u64())
        .unwrap_or_else(|| panic!("no reject counter {name}: {stats}"))
}

/// The full pattern set: the guest verifies every page; the host's counters match what the
/// guest sent; after the patterns nothing is double allocated and the kernel agrees.
fn full_matrix_cell(private: &str, shared: &str, granularity: &str, cpus: u32) {
    let (out, stats) = convert(private, shared, granularity, cpus, "patterns=all");
    for p in [
        "4k",
        "2m",
        "unaligned",
        "mid",
        "pingpong",
        "batch",
        "errors",
    ] {
        assert!(
            out.contains(&format!("convert: {p} ok")),
            "pattern {p} missing:\n{out}"
        );
    }
    let bad = guest_fields(&out, "convert: bad");
    for name in [
        "unaligned",
        "out_of_ram",
        "reserved",
        "requires_2m",
        "invalid_attrs",
        "bad_request",
        "double_accept",
    ] {
        assert_eq!(
            reject(&stats, name),
            bad[name],
            "reject counter {name} vs what the guest sent:\n{stats}"
        );
    }
    let sent = guest_fields(&out, "convert: sent_bad");
    assert_eq!(
        stats["rejects_total"].as_u64().unwrap(),
        sent["sent_bad"],
        "{stats}"
    );
    assert_eq!(stats["double_accept_violations"].as_u64().unwrap(), 1);
    if granularity == "2m" {
        assert!(
            bad["requires_2m"] > 0,
            "2m host must reject sub-2M requests"
        );
        assert_eq!(stats["to_shared"]["4k"], 0);
        assert_eq!(stats["to_shared"]["sub2m"], 0);
    } else {
        assert_eq!(bad["requires_2m"], 0);
        assert!(stats["to_shared"]["4k"].as_u64().unwrap() > 0);
    }
    // Batching: a 132-range request fits one doorbell.
    assert!(stats["ranges_per_exit"].as_f64().unwrap() > 1.0, "{stats}");
    // Everything went back to private: nothing is double allocated, and the kernel agrees.
    let d = &stats["double_alloc"];
    assert_eq!(d["computed_bytes"], 0, "{d}");
    assert_eq!(d["kernel_bytes"], 0, "{d}");
    assert_eq!(d["agree"], true, "{d}");
    assert_eq!(stats["mixed_chunks"], 0);
    if granularity == "4k" && uses_hugetlb(private, shared) {
        // Sub-2M conversions on hugetlb went through mixed chunks on the way.
        assert!(stats["mixed_chunks_peak"].as_u64().unwrap() > 0, "{stats}");
        assert!(d["computed_peak_bytes"].as_u64().unwrap() >= 2 << 20, "{d}");
    }
    for store in ["private_store", "shared_store"] {
        let s = &stats[store];
        assert!(
            s["kernel_bytes"].as_u64().unwrap() <= s["engine_bound_bytes"].as_u64().unwrap(),
            "{store}: the kernel holds more than the engine accounts for: {s}"
        );
    }
}

macro_rules! matrix {
    ($($name:ident: $private:expr, $shared:expr, $gran:expr, $cpus:expr;)*) => {
        $(#[test] fn $name() { full_matrix_cell($private, $shared, $gran, $cpus); })*
    };
}

matrix! {
    memfd_memfd_4k_1cpu: "memfd", "memfd", "4k", 1;
    memfd_memfd_2m_1cpu: "memfd", "memfd", "2m", 1;
    memfd_memfd_4k_4cpu: "memfd", "memfd", "4k", 4;
    memfd_memfd_2m_4cpu: "memfd", "memfd", "2m", 4;
    gmem_memfd_4k_1cpu: "gmem", "memfd", "4k", 1;
    gmem_memfd_2m_1cpu: "gmem", "memfd", "2m", 1;
    gmem_memfd_4k_4cpu: "gmem", "memfd", "4k", 4;
    gmem_memfd_2m_4cpu: "gmem", "memfd", "2m", 4;
    memfd_hugetlb_4k_1cpu: "memfd", "hugetlb", "4k", 1;
    memfd_hugetlb_2m_1cpu: "memfd", "hugetlb", "2m", 1;
    memfd_hugetlb_4k_4cpu: "memfd", "hugetlb", "4k", 4;
    memfd_hugetlb_2m_4cpu: "memfd", "hugetlb", "2m", 4;
    gmem_hugetlb_4k_1cpu: "gmem", "hugetlb", "4k", 1;
    gmem_hugetlb_2m_1cpu: "gmem", "hugetlb", "2m", 1;
    gmem_hugetlb_4k_4cpu: "gmem", "hugetlb", "4k", 4;
    gmem_hugetlb_2m_4cpu: "gmem", "hugetlb", "2m", 4;
    hugetlb_hugetlb_4k_1cpu: "hugetlb", "hugetlb", "4k", 1;
    hugetlb_hugetlb_2m_1cpu: "hugetlb", "hugetlb", "2m", 1;
    hugetlb_hugetlb_4k_4cpu: "hugetlb", "hugetlb", "4k", 4;
    hugetlb_hugetlb_2m_4cpu: "hugetlb", "hugetlb", "2m", 4;
}

/// Mixed chunks left at exit: on hugetlb every one costs a whole 2 MiB of double allocation;
/// wholly shared chunks cost nothing; the computed figure equals the kernel's.
#[test]
fn mixed_chunks_are_double_allocated_on_hugetlb_and_the_kernel_agrees() {
    for (private, shared) in PAIRS {
        let (out, stats) = convert(
            private,
            shared,
            "4k",
            1,
            "patterns=mid hold_mixed=3 hold_2m=2",
        );
        assert!(out.contains("convert: holding mixed=3 whole=2"), "{out}");
        let d = &stats["double_alloc"];
        assert_eq!(d["agree"], true, "{private}/{shared}: {d}");
        assert_eq!(
            d["computed_bytes"], d["kernel_bytes"],
            "{private}/{shared}: {d}"
        );
        if uses_hugetlb(private, shared) {
            assert_eq!(stats["mixed_chunks"], 3, "{private}/{shared}: {stats}");
            // Every page of a mixed chunk is backed on the hugetlb side; on a 4K side only the
            // pages that side owns are. So 2 MiB per chunk with hugetlb on both sides, and
            // 2 MiB - 4 KiB (the converted page is freed exactly) with one 4K store.
            let per_chunk = if private == shared {
                2 << 20
            } else {
                (2 << 20) - 4096
            };
            assert_eq!(
                d["computed_bytes"].as_u64().unwrap(),
                3 * per_chunk,
                "{private}/{shared}: {d}"
            );
        } else {
            assert_eq!(
                d["computed_bytes"], 0,
                "{private}/{shared}: 4K stores free exactly: {d}"
            );
        }
    }
}

/// 2M-aligned conversions never double allocate, even on hugetlb.
#[test]
fn two_meg_conversions_never_double_allocate() {
    for (private, shared) in PAIRS {
        let (_, stats) = convert(private, shared, "2m", 1, "patterns=2m hold_2m=4");
        let d = &stats["double_alloc"];
        assert_eq!(d["computed_peak_bytes"], 0, "{private}/{shared}: {d}");
        assert_eq!(d["kernel_bytes"], 0, "{private}/{shared}: {d}");
        assert_eq!(stats["mixed_chunks_peak"], 0);
    }
}

/// Not enough huge pages: a clear error before boot, saying how many are needed and how to
/// reserve them (the eager path); the lazy default needs only what boot needs.
#[test]
fn too_few_huge_pages_is_a_clear_error() {
    require_kvm();
    // 60 GiB of hugetlb-backed RAM backed up front cannot be satisfied here.
    let args = [
        "run",
        "--guest",
        "hello",
        "--mem",
        "60G",
        "--private",
        "hugetlb",
        "--shared",
        "hugetlb",
    ];
    let o = vmm(&[&args[..], &["--prealloc"]].concat());
    let err = stderr(&o);
    assert_eq!(code(&o), 2, "{err}");
    assert!(err.contains("nr_hugepages"), "{err}");
    // Backed at ACCEPT: the same guest boots holding a few huge pages.
    ensure_free_hugepages(16);
    let o = vmm(&args);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    assert!(stdout(&o).contains("hello from guest"), "{}", stdout(&o));
}

/// gmem cannot back the shared side.
#[test]
fn gmem_is_private_only() {
    require_kvm();
    let o = vmm(&[
        "run", "--guest", "hello", "--mem", "64M", "--shared", "gmem",
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("gmem"), "{}", stderr(&o));
}
