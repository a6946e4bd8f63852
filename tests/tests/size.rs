//! `vmm conform size`: on a small workload the sweep returns a pool size at which the cell has
//! no failed request, and the probe one step below it failed; a self-sizing policy reports its
//! peak from one run.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;

#[test]
fn the_sweep_finds_the_smallest_zero_failure_pool() {
    require_kvm();
    let dir = scratch("size");
    let out = dir.join("out");
    let o = vmm(&[
        "conform",
        "size",
        "--policies",
        "legacy,adaptive",
        "--workloads",
        "large",
        "--max-pool",
        "16M",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let json = read_json(&out.join("size.json"));
    let sweeps = json.as_array().unwrap();
    assert_eq!(sweeps.len(), 2);
    let legacy = &sweeps[0];
    assert_eq!(legacy["policy"], "legacy");
    let smallest = legacy["smallest_pool_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no zero-failure size: {legacy}"));
    let probes = legacy["probes"].as_array().unwrap();
    let at = |bytes: u64| probes.iter().find(|p| p["pool_bytes"] == bytes);
    let hold = at(smallest).unwrap();
    assert_eq!(hold["failed_requests"], 0, "{hold}");
    assert_eq!(hold["passed"], true, "{hold}");
    // Legacy pools take 256 KiB steps: the size one step below was probed and failed.
    let step = 256 << 10;
    assert!(
        smallest > step,
        "legacy held the large workload at {smallest} B"
    );
    let below = at(smallest - step).unwrap_or_else(|| panic!("no probe below: {legacy}"));
    assert!(
        below["failed_requests"].as_u64().unwrap() > 0 || below["passed"] == false,
        "{below}"
    );
    // Adaptive sizes itself: one run, its peak, no failure.
    let adaptive = &sweeps[1];
    assert_eq!(adaptive["self_sizing"], true);
    assert_eq!(adaptive["probes"].as_array().unwrap().len(), 1);
    assert!(
        adaptive["footprint_bytes"].as_u64().unwrap() >= 2 << 20,
        "{adaptive}"
    );
    for f in ["size.csv", "size-large.svg"] {
        let text = std::fs::read_to_string(out.join(f)).unwrap();
        assert!(text.contains("legacy") && text.contains("adaptive"), "{f}");
    }
    assert!(stdout(&o).contains("self-sizing"), "{}", stdout(&o));
}
