//! The confidential-platform lifecycle end to end (`--platform tdx|snp`): the `lifecycle`
//! guest breaks each rule on purpose and the host refuses and counts it; a touch of memory the
//! guest never accepted stops the VM with its GPA; the pool policies follow the lifecycle on
//! snp; a 4 GiB hugetlb guest holds only what it accepted, measured from the store's file.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use serde_json::Value;

/// Runs the lifecycle fixture's `case` on `platform`; returns (exit code, stdout, memconv
/// statistics).
fn lifecycle(platform: &str, case: &str, store: &str) -> (i32, String, Value) {
    if store == "hugetlb" {
        ensure_free_hugepages(16);
    }
    let dir = scratch(&format!("lifecycle-{platform}-{case}-{store}"));
    let json = dir.join("stats.json");
    let cmdline = format!("case={case}");
    let o = vmm_run(&[
        "--guest",
        "lifecycle",
        "--mem",
        "64M",
        "--private",
        store,
        "--shared",
        store,
        "--platform",
        platform,
        "--cmdline",
        &cmdline,
        "--stats-json",
        json.to_str().unwrap(),
    ]);
    let out = stdout(&o);
    let stats = read_json(&json)["memconv"].clone();
    (code(&o), format!("{out}\n{}", stderr(&o)), stats)
}

fn life(stats: &Value, key: &str) -> u64 {
    stats["lifecycle"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no lifecycle.{key}: {stats}"))
}

/// Each rule broken (or followed) on both platforms: the guest sees the expected status, the
/// host counts each refusal under its own name.
#[test]
fn rules_on_both_platforms() {
    for platform in ["tdx", "snp"] {
        for (case, accept_shared, double, must_rescind) in [
            ("double", 0, 2, 0),
            ("shared", 1, 0, 0),
            ("mixed", 1, 0, 0),
            ("roundtrip", 0, 0, 0),
            ("share_valid", 0, 0, u64::from(platform == "snp")),
            ("rescind", 0, 0, 0),
        ] {
            let store = if case == "roundtrip" {
                "hugetlb"
            } else {
                "memfd"
            };
            let (rc, out, st) = lifecycle(platform, case, store);
            let ctx = format!("{platform} {case} {store}\n{out}");
            assert_eq!(rc, 0, "{ctx}");
            assert!(out.contains(&format!("lifecycle: {case} ok")), "{ctx}");
            assert_eq!(st["lifecycle"]["platform"], platform, "{ctx}");
            assert_eq!(life(&st, "accept_shared_refusals"), accept_shared, "{ctx}");
            assert_eq!(life(&st, "double_accepts"), double, "{ctx}");
            assert_eq!(st["double_accept_violations"], double, "{ctx}");
            assert_eq!(life(&st, "must_rescind_refusals"), must_rescind, "{ctx}");
            assert_eq!(life(&st, "unaccepted_accesses"), 0, "{ctx}");
            if case == "roundtrip" {
                // Accepted twice (the second after the round trip is not a double accept).
                assert!(life(&st, "accepted_pages") > 1024, "{ctx}");
                if platform == "snp" {
                    assert!(life(&st, "rescind_entries") >= 2, "{ctx}");
                } else {
                    assert!(life(&st, "dropped_pages") > 512, "{ctx}");
                }
            }
        }
    }
}

/// A touch of never-accepted memory stops the VM (status 72) and is counted with its GPA.
#[test]
fn touching_unaccepted_memory_stops_the_vm() {
    for (platform, store) in [("tdx", "hugetlb"), ("snp", "memfd")] {
        let (rc, out, st) = lifecycle(platform, "touch", store);
        let ctx = format!("{platform} {store}\n{out}");
        assert_eq!(rc, 72, "{ctx}");
        assert!(!out.contains("NOT STOPPED"), "{ctx}");
        let line = out
            .lines()
            .find(|l| l.starts_with("lifecycle: touch reading unaccepted gpa "))
            .unwrap_or_else(|| panic!("no touch line\n{ctx}"));
        let gpa_text = line.rsplit(' ').next().unwrap_or("");
        let gpa = u64::from_str_radix(gpa_text.trim_start_matches("0x"), 16)
            .unwrap_or_else(|_| panic!("bad gpa {gpa_text}\n{ctx}"));
        assert_eq!(life(&st, "unaccepted_accesses"), 1, "{ctx}");
        assert_eq!(life(&st, "unaccepted_access_gpa"), gpa, "{ctx}");
        assert!(
            out.contains(&format!(
                "touched unaccepted private memory at gpa {gpa:#x}"
            )),
            "{ctx}"
        );
    }
}

/// Every pool policy keeps working when the guest must rescind before sharing (snp).
#[test]
fn pool_policies_on_snp() {
    for (policy, opts) in [
        ("legacy", "pool=8M"),
        ("dynamic", "pool=2M"),
        ("refill", "pool=32M"),
        ("throttle", "pool=1M"),
        ("aligned-2m", "pool=4M"),
    ] {
        let dir = scratch(&format!("lifecycle-snp-io-{policy}"));
        let disk = dir.join("d.img");
        let json = dir.join("stats.json");
        let cmdline = format!("policy={policy} {opts} requests=200 qd=8 sizes=512-256k rw=50");
        let o = vmm_run(&[
            "--guest",
            "io",
            "--mem",
            "128M",
            "--platform",
            "snp",
            "--disk",
            disk.to_str().unwrap(),
            "--disk-size",
            "32M",
            "--cmdline",
            &cmdline,
            "--stats-json",
            json.to_str().unwrap(),
        ]);
        let ctx = format!("{policy}\n{}\n{}", stdout(&o), stderr(&o));
        assert_eq!(code(&o), 0, "{ctx}");
        let st = read_json(&json)["memconv"].clone();
        assert_eq!(life(&st, "must_rescind_refusals"), 0, "{ctx}");
        assert_eq!(life(&st, "double_accepts"), 0, "{ctx}");
        assert!(life(&st, "rescind_entries") > 0, "{ctx}");
        assert!(
            ctx.contains("io: done") && ctx.contains("mismatches=0"),
            "{ctx}"
        );
        assert_eq!(st["pool_report"]["policy"], policy, "{ctx}");
    }
}

/// Bytes the kernel has allocated to the file behind /proc/PID/fd/N (fstat st_blocks).
fn fstat_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

/// The VMM's fd of the store named `memconv-WHAT-KIND`.
fn store_fd(pid: u32, name: &str) -> Option<std::path::PathBuf> {
    let dir = format!("/proc/{pid}/fd");
    std::fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let target = std::fs::read_link(e.path()).ok()?;
        target.to_string_lossy().contains(name).then(|| e.path())
    })
}

/// A 4 GiB guest on hugetlb/hugetlb holds only the huge pages of what it accepted: the
/// private store's size as the kernel counts it (fstat of the VMM's fd, read from outside the
/// VMM while the guest runs) stays within the accepted bytes the host reports, a few MiB.
#[test]
fn hugetlb_4g_boot_holds_only_accepted_memory() {
    require_kvm();
    ensure_free_hugepages(32);
    let dir = scratch("lifecycle-4g");
    let json = dir.join("stats.json");
    let child = std::process::Command::new(vmm_bin())
        .args([
            "run",
            "--guest",
            "spin",
            "--mem",
            "4G",
            "--private",
            "hugetlb",
            "--shared",
            "hugetlb",
            "--cmdline",
            "iters=6000000000",
            "--stats-json",
            json.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let pid = child.id();
    let mut measured = None;
    for _ in 0..100 {
        std::thread::sleep(std::time::Duration::from_millis(50));
        if let Some(fd) = store_fd(pid, "memconv-private-hugetlb") {
            // Let boot finish (the image is accepted before the first instruction).
            std::thread::sleep(std::time::Duration::from_millis(500));
            measured = fstat_bytes(&fd);
            break;
        }
    }
    let out = child.wait_with_output().expect("vmm ends");
    let ctx = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{ctx}");
    let measured = measured.unwrap_or_else(|| panic!("no private store fd seen\n{ctx}"));
    let st = read_json(&json)["memconv"].clone();
    let accepted = life(&st, "accepted_bytes");
    let chunk = 2u64 << 20;
    assert!(
        measured > 0 && measured <= accepted.div_ceil(chunk) * chunk,
        "private store holds {measured} bytes, accepted {accepted}\n{ctx}"
    );
    assert!(
        measured <= 64 << 20,
        "a 4 GiB guest that accepted nothing but its image holds {measured} bytes\n{ctx}"
    );
    assert_eq!(st["private_store"]["kernel_bytes"], measured, "{ctx}");
}
