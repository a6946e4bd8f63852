//! `vmm conform --shard K/N` and `vmm conform merge`: the shares of `--quick` merged give the
//! same cells and verdicts as one unsharded run; a missing or doubled shard is refused; and a
//! plug-in guest run under a built-in policy's name is refused as mislabelled.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use serde_json::Value;
use std::path::Path;

/// (id, verdict) of every cell of a report, in its order.
fn verdicts(json: &Value) -> Vec<(String, Value, Value)> {
    json["cells"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap().to_string(),
                c["passed"].clone(),
                c["incompatible"].is_null().into(),
            )
        })
        .collect()
}

fn conform_into(out: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["conform", "--out", out.to_str().unwrap(), "--jobs", "1"];
    all.extend_from_slice(args);
    vmm(&all)
}

#[test]
fn shards_of_quick_merge_into_the_unsharded_run() {
    require_kvm();
    ensure_free_hugepages(300);
    let dir = scratch("shard");
    let whole = dir.join("whole");
    let o = conform_into(&whole, &["--quick"]);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let mut parts = Vec::new();
    for k in 1..=3 {
        let part = dir.join(format!("part{k}"));
        let o = conform_into(&part, &["--quick", "--shard", &format!("{k}/3")]);
        assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
        let json = read_json(&part.join("conform.json"));
        assert_eq!(json["cells"].as_array().unwrap().len(), 6, "shard {k}");
        parts.push(part);
    }
    let merged = dir.join("merged");
    let mut args = vec!["conform", "merge", "--out", merged.to_str().unwrap()];
    args.extend(parts.iter().map(|p| p.to_str().unwrap()));
    let o = vmm(&args);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let want = verdicts(&read_json(&whole.join("conform.json")));
    let got = verdicts(&read_json(&merged.join("conform.json")));
    assert_eq!(got, want);
    assert!(merged.join("conform.csv").exists());
    assert!(stdout(&o).contains("18 cells: "), "{}", stdout(&o));

    // A missing shard and a doubled one are refused.
    let o = vmm(&[
        "conform",
        "merge",
        "--out",
        dir.join("m2").to_str().unwrap(),
        parts[0].to_str().unwrap(),
        parts[1].to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("a shard is missing"), "{}", stderr(&o));
    let o = vmm(&[
        "conform",
        "merge",
        "--out",
        dir.join("m3").to_str().unwrap(),
        parts[0].to_str().unwrap(),
        parts[0].to_str().unwrap(),
    ]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("in more than one shard"),
        "{}",
        stderr(&o)
    );
    let o = vmm(&["conform", "--quick", "--shard", "4/3"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
}

#[test]
fn a_plug_in_under_a_built_in_name_is_refused() {
    require_kvm();
    let dir = scratch("mislabel");
    let out = dir.join("out");
    // Refused before any cell runs: the plug-in guest does not offer `policy=legacy` (a guest
    // that took it anyway would fail its row's policy_name_matches invariant, unit-tested in
    // the vmm crate).
    let o = conform_into(
        &out,
        &[
            "--guest",
            "io-broken2m",
            "--policies",
            "legacy",
            "--filter",
            "memfd-memfd/4k/steady",
        ],
    );
    assert_eq!(code(&o), 2, "{}\n{}", stdout(&o), stderr(&o));
    assert!(stderr(&o).contains("policy"), "{}", stderr(&o));
    assert!(!out.join("conform.json").exists());
}
