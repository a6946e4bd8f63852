//! `vmm replay` end to end: each shared Linux 6.12 trace replayed in a real KVM guest under
//! `legacy` configured as Linux was (64 MiB, 2 areas, the capture's swiotlb-stats): the pool's
//! own high-water in 2 KiB slots equals Linux's `io_tlb_used_hiwater` (261 probe, 6000 blk,
//! 304 net), no map fails, and every byte the block device moved verifies. Also
//! `--describe` without a VM, and a bad trace's line-numbered error.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;

use std::path::PathBuf;

fn traces() -> PathBuf {
    let d = PathBuf::from(std::env::var("REPLAY_TRACES").unwrap_or_else(|_| {
        // `../shared` beside the checkout, as on the developers' and CI machines.
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/traces/linux-6.12-virtio"
        )
        .to_string()
    }));
    assert!(
        d.join("probe.trace.gz").exists(),
        "the shared traces are not at {} (set REPLAY_TRACES)",
        d.display()
    );
    d
}

fn replay_legacy(name: &str, linux_hiwater: u64) {
    require_kvm();
    let d = traces();
    let dir = scratch(&format!("replay-{name}"));
    let json = dir.join("stats.json");
    let trace = d.join(format!("{name}.trace.gz"));
    let stats = d.join(format!("{name}.swiotlb_stats"));
    let o = vmm(&[
        "replay",
        trace.to_str().unwrap(),
        "--swiotlb-stats",
        stats.to_str().unwrap(),
        "--cmdline",
        "policy=legacy pool=64M",
        "--cpus",
        "2",
        "--disk",
        dir.join("d.img").to_str().unwrap(),
        "--stats-json",
        json.to_str().unwrap(),
        "--quiet",
    ]);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    let v = read_json(&json);
    let r = &v["replay"];
    assert_eq!(r["high_water_slots"], linux_hiwater, "{r}");
    assert_eq!(r["linux_hiwater_slots"], linux_hiwater, "{r}");
    assert_eq!(r["failed_maps"], 0, "{r}");
    assert_eq!(r["mismatches"], 0, "{r}");
    assert_eq!(r["io_errors"], 0, "{r}");
    assert!(r["moved"].as_u64().unwrap() > 0, "{r}");
    assert!(r["ops"].as_u64().unwrap() >= r["maps"].as_u64().unwrap());
    assert!(r["high_water_bytes"].as_u64().unwrap() >= linux_hiwater * 2048);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn probe_under_legacy_reaches_linux_hiwater() {
    replay_legacy("probe", 261);
}

#[test]
fn net_under_legacy_reaches_linux_hiwater() {
    replay_legacy("net", 304);
}

#[test]
fn blk_under_legacy_reaches_linux_hiwater() {
    replay_legacy("blk", 6000);
}

#[test]
fn describe_needs_no_vm() {
    let d = traces();
    let o = vmm(&[
        "replay",
        d.join("probe.trace.gz").to_str().unwrap(),
        "--swiotlb-stats",
        d.join("probe.swiotlb_stats").to_str().unwrap(),
        "--describe",
    ]);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "{out}{}", stderr(&o));
    assert!(
        out.contains("high-water 261 slots") && out.contains("io_tlb_used_hiwater 261 (equal)"),
        "{out}"
    );
    assert!(out.contains("device 0000:00:01.0 (virtio-blk)"), "{out}");
}

#[test]
fn bad_trace_error_names_the_line() {
    let dir = scratch("replay-bad");
    let t = dir.join("bad.trace");
    std::fs::write(
        &t,
        "# tracer: nop\n  dd-1 [000] d..1. 1.0: dma_map_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=10 size=16 phys_addr=1 attrs=\n  dd-1 [000] d.h1. 1.1: dma_unmap_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=10 size=32 attrs=\n",
    )
    .unwrap();
    let o = vmm(&["replay", t.to_str().unwrap(), "--describe"]);
    assert_eq!(code(&o), 2);
    let err = stderr(&o);
    assert!(
        err.contains("bad.trace:3:") && err.contains("size 32"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
