//! `vmm conform`: the quick suite passes and its JSON holds what the table says; injected
//! broken policies are named by the invariant they break and make the suite exit non-zero.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use serde_json::Value;

fn conform(name: &str, args: &[&str]) -> (std::process::Output, Value, std::path::PathBuf) {
    require_kvm();
    let dir = scratch(name);
    let out = dir.join("out");
    let mut all = vec!["conform", "--out", out.to_str().unwrap(), "--jobs", "1"];
    all.extend_from_slice(args);
    let o = vmm(&all);
    let json = read_json(&out.join("conform.json"));
    (o, json, out)
}

fn failed_invariants(cell: &Value) -> Vec<String> {
    cell["invariants"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["passed"] == false)
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn quick_suite_passes_and_reports_every_cell() {
    ensure_free_hugepages(300);
    let (o, json, out) = conform("quick", &["--quick"]);
    assert_eq!(code(&o), 0, "{}\n{}", stdout(&o), stderr(&o));
    let cells = json["cells"].as_array().unwrap();
    assert_eq!(cells.len(), 18);
    assert_eq!(json["failed"], 0, "{}", stdout(&o));
    let names = json["invariants"].as_array().unwrap().len();
    for cell in cells {
        assert_eq!(cell["invariants"].as_array().unwrap().len(), names);
        let policy = cell["cell"]["policy"].as_str().unwrap();
        let id = cell["id"].as_str().unwrap();
        if cell["incompatible"].is_null() {
            assert_eq!(cell["passed"], true, "{id}: {:?}", failed_invariants(cell));
            assert!(cell["metrics"]["io_requests"].as_u64().unwrap() > 0, "{id}");
            assert!(
                cell["metrics"]["peak_shared_bytes"].as_u64().unwrap() > 0,
                "{id}"
            );
            assert!(
                !cell["shared_timeline"].as_array().unwrap().is_empty(),
                "{id}"
            );
        } else {
            // Only policies that do not claim 2M can be incompatible, only on a 2m host.
            assert!(policy != "aligned-2m" && policy != "adaptive", "{id}");
            assert_eq!(cell["cell"]["granularity"], "2m", "{id}");
        }
        if policy == "aligned-2m" || policy == "adaptive" {
            assert_eq!(cell["passed"], true, "{id}");
            assert_eq!(cell["metrics"]["double_alloc_peak_bytes"], 0, "{id}");
            assert_eq!(cell["metrics"]["conversions_4k"], 0, "{id}");
            assert_eq!(cell["metrics"]["conversions_sub2m"], 0, "{id}");
        }
    }
    let table = stdout(&o);
    assert!(
        table.contains("aligned-2m/hugetlb-hugetlb/2m/steady"),
        "{table}"
    );
    for file in [
        "conform.csv",
        "shared-over-time.svg",
        "footprint-vs-failures.svg",
    ] {
        let text = std::fs::read_to_string(out.join(file)).unwrap();
        assert!(text.len() > 100, "{file} is too short");
    }
    let csv = std::fs::read_to_string(out.join("conform.csv")).unwrap();
    assert_eq!(csv.lines().count(), 19, "{csv}");
}

#[test]
fn a_policy_that_claims_2m_but_converts_4k_is_caught() {
    let (o, json, _) = conform(
        "broken2m",
        &[
            "--guest",
            "io-broken2m",
            "--policies",
            "broken-2m",
            "--filter",
            "memfd-memfd/4k/steady",
        ],
    );
    assert_eq!(code(&o), 1, "{}\n{}", stdout(&o), stderr(&o));
    let cell = &json["cells"][0];
    assert_eq!(
        failed_invariants(cell),
        vec!["claims_2m_honoured"],
        "{cell}"
    );
    assert!(stdout(&o).contains("FAIL broken-2m/memfd-memfd/4k/steady claims_2m_honoured"));
}

#[test]
fn a_driver_that_leaves_a_buffer_private_is_caught() {
    let (o, json, _) = conform(
        "private",
        &[
            "--policies",
            "legacy",
            "--filter",
            "memfd-memfd/4k/steady",
            "--cmdline",
            "broken=private-buffer",
        ],
    );
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    let failed = failed_invariants(&json["cells"][0]);
    assert!(
        failed.contains(&"no_dma_violations".to_string()),
        "{failed:?}"
    );
}

#[test]
fn bad_conform_arguments_are_clear_errors() {
    let o = vmm(&["conform", "--filter", "no-such-cell"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no cell matches"), "{}", stderr(&o));
    let o = vmm(&["conform", "--guest", "nope"]);
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("unknown guest"), "{}", stderr(&o));
}
