//! The invariants every conformance cell is checked against, each with a stable name, computed
//! from what one `vmm run` left behind: its exit status, its `--stats-json` summary and the
//! guest's serial output.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use memconv::StoreKind;

use super::matrix::Cell;

/// Exit status of `vmm run` for a crashed vCPU or a KVM failure.
const EXIT_VM_CRASHED: i32 = crate::exit_codes::EXIT_VM_CRASHED as i32;
/// Exit status of `vmm run` when the guest touched unaccepted memory.
const EXIT_UNACCEPTED_ACCESS: i32 = crate::exit_codes::EXIT_UNACCEPTED_ACCESS as i32;

/// What one cell's run left behind.
#[derive(Debug, Default)]
pub struct RunData {
    /// Process exit code (`None` if killed by a signal).
    pub exit_code: Option<i32>,
    /// The `--stats-json` summary, if written and parseable.
    pub summary: Option<Value>,
    /// The guest's serial console.
    pub serial: String,
    /// The VMM's stderr.
    pub stderr: String,
}

/// One invariant's verdict.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// Invariant name (one of [`NAMES`]; read back only if it is one).
    pub name: &'static str,
    /// Whether it held.
    pub passed: bool,
    /// Why it failed (empty when it held).
    pub detail: String,
}

/// Every invariant's name, in check order.
pub const NAMES: [&str; 13] = [
    "vmm_never_crashed",
    "data_integrity",
    "no_dma_violations",
    "no_double_accept",
    "host_guest_stats_agree",
    "double_alloc_matches_kernel",
    "zero_double_alloc_when_all_2m",
    "claims_2m_honoured",
    "throttle_blocking_maps_never_fail",
    "policy_name_matches",
    "no_unaccepted_access",
    "lifecycle_followed",
    "host_backing_within_accepted",
];

/// A [`Verdict`] as read back from another run's JSON (for `vmm conform merge`).
#[derive(Deserialize)]
struct VerdictText {
    name: String,
    passed: bool,
    detail: String,
}

impl<'de> Deserialize<'de> for Verdict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Verdict::try_from(VerdictText::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

impl TryFrom<VerdictText> for Verdict {
    type Error = String;

    /// The name must be one of [`NAMES`].
    fn try_from(v: VerdictText) -> Result<Self, String> {
        let name = NAMES
            .iter()
            .copied()
            .find(|n| *n == v.name)
            .ok_or_else(|| format!("unknown invariant {:?}", v.name))?;
        Ok(Verdict {
            name,
            passed: v.passed,
            detail: v.detail,
        })
    }
}

/// Bytes of the mailbox chunk, shared from boot and not part of any guest pool.
const MAILBOX_CHUNK: u64 = memconv::abi::MAILBOX_AREA_END - memconv::abi::MAILBOX_BASE_GPA;

fn u(v: &Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, k| &v[*k]).as_u64().unwrap_or(0)
}

/// Sum of conversions the host counted, by size class.
pub fn host_conversions(memconv: &Value, class: &str) -> u64 {
    u(memconv, &["to_shared", class]) + u(memconv, &["to_private", class])
}

/// Sum of every `violations` counter the DMA device reports.
pub fn device_violations(summary: &Value) -> u64 {
    fn walk(v: &Value, acc: &mut u64) {
        match v {
            Value::Object(map) => {
                for (k, v) in map {
                    if k == "violations" {
                        *acc += v.as_u64().unwrap_or(0);
                    } else {
                        walk(v, acc);
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| walk(v, acc)),
            _ => {}
        }
    }
    let mut total = 0;
    walk(&summary["disk"], &mut total);
    total
}

fn check(name: &'static str, result: Result<(), String>) -> Verdict {
    match result {
        Ok(()) => Verdict {
            name,
            passed: true,
            detail: String::new(),
        },
        Err(detail) => Verdict {
            name,
            passed: false,
            detail,
        },
    }
}

/// Whether the cell could not run at all because the host requires 2 MiB conversions and the
/// policy (which does not claim to be 2M-only) issued smaller ones: the guest gave up during
/// setup. That is a finding about the combination, not a broken invariant.
pub fn incompatible(run: &RunData) -> Option<String> {
    let s = run.summary.as_ref()?;
    let m = &s["memconv"];
    let requires_2m = m["rejects"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "requires_2m"))
        .map_or(0, |r| u(r, &["count"]));
    let guest_failed = s["end"]["kind"] == "guest_exit" && s["end"]["code"] != 0;
    let claims_2m = m["pool_report"]["claims_2m"] == true;
    (guest_failed && requires_2m > 0 && !claims_2m).then(|| {
        format!(
            "the policy issued {requires_2m} conversions smaller than 2M, which this host refuses: {}",
            run.serial
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("")
        )
    })
}

/// Checks every invariant for one cell.
pub fn evaluate(cell: &Cell, run: &RunData) -> Vec<Verdict> {
    let mut out = Vec::with_capacity(NAMES.len());
    let crashed = match (run.exit_code, &run.summary) {
        (None, _) => Err("the VMM was killed by a signal".to_string()),
        (Some(EXIT_VM_CRASHED), _) => Err(format!(
            "a vCPU crashed: {}",
            run.stderr.lines().take(2).collect::<Vec<_>>().join(" / ")
        )),
        (Some(_), None) => Err(format!(
            "no statistics were written: {}",
            run.stderr.lines().next().unwrap_or("")
        )),
        (Some(_), Some(s)) if s["end"]["kind"] != "guest_exit" => {
            Err(format!("the VM ended with {}", s["end"]))
        }
        _ => Ok(()),
    };
    out.push(check("vmm_never_crashed", crashed));
    let Some(s) = &run.summary else {
        for name in &NAMES[1..] {
            out.push(check(name, Err("no statistics".into())));
        }
        return out;
    };
    let m = &s["memconv"];
    let pool = &m["pool_report"];

    out.push(check(
        "data_integrity",
        if s["end"]["code"] == 0 {
            Ok(())
        } else {
            let last = run
                .serial
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("");
            Err(format!("guest exit {}: {last}", s["end"]["code"]))
        },
    ));

    out.push(check(
        "no_dma_violations",
        none(device_violations(s), "DMA violations"),
    ));
    out.push(check(
        "no_double_accept",
        none(u(m, &["double_accept_violations"]), "double accepts"),
    ));

    let host_total: u64 = ["4k", "sub2m", "2m"]
        .iter()
        .map(|c| host_conversions(m, c))
        .sum();
    let agree = if pool.is_null() {
        Err("the guest sent no pool report".to_string())
    } else {
        let guest_total = u(pool, &["conversions_4k"])
            + u(pool, &["conversions_2m"])
            + u(pool, &["conversions_other"]);
        let host_shared = u(m, &["shared_store", "owned_bytes"]).saturating_sub(MAILBOX_CHUNK);
        let guest_shared = u(pool, &["shared_bytes"]);
        if guest_total != host_total {
            Err(format!(
                "guest issued {guest_total} conversions, host performed {host_total}"
            ))
        } else if guest_shared != host_shared {
            Err(format!(
                "guest holds {guest_shared} shared bytes, host's shared store owns {host_shared}"
            ))
        } else {
            Ok(())
        }
    };
    out.push(check("host_guest_stats_agree", agree));

    // The engine's figure is exact where it knows every allocation (hugetlb chunks, which it
    // allocates itself, on both sides; nothing retained on 4K stores) and otherwise an upper
    // bound: a 4K store only holds the pages the guest touched. The kernel's figure must never
    // exceed it, and must equal it where it is exact.
    let d = &m["double_alloc"];
    let exact = cell.private == StoreKind::Hugetlb && cell.shared == StoreKind::Hugetlb
        || u(d, &["computed_bytes"]) == 0;
    out.push(check(
        "double_alloc_matches_kernel",
        if d["agree"] == true || (!exact && d["kernel_within_bound"] == true) {
            Ok(())
        } else {
            Err(format!(
                "computed {} bytes ({}), kernel {} bytes",
                d["computed_bytes"],
                if exact { "exact" } else { "an upper bound" },
                d["kernel_bytes"]
            ))
        },
    ));

    let small = host_conversions(m, "4k") + host_conversions(m, "sub2m");
    out.push(check(
        "zero_double_alloc_when_all_2m",
        if small > 0 || u(d, &["computed_peak_bytes"]) == 0 && u(d, &["kernel_bytes"]) == 0 {
            Ok(())
        } else {
            Err(format!(
                "every conversion was 2M aligned yet {} bytes were double allocated",
                u(d, &["computed_peak_bytes"]).max(u(d, &["kernel_bytes"]))
            ))
        },
    ));

    let claims_2m = pool["claims_2m"] == true;
    let requires_2m = m["rejects"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "requires_2m"))
        .map_or(0, |r| u(r, &["count"]));
    let guest_small = u(pool, &["conversions_4k"]) + u(pool, &["conversions_other"]);
    out.push(check(
        "claims_2m_honoured",
        if !claims_2m || (small == 0 && guest_small == 0 && requires_2m == 0) {
            Ok(())
        } else {
            Err(format!(
                "policy claims 2M conversions but sent smaller ones (host saw {small}, guest counted {guest_small}, host rejected {requires_2m} as not 2M)"
            ))
        },
    ));

    let failures = u(pool, &["map_failures"]);
    out.push(check(
        "throttle_blocking_maps_never_fail",
        if cell.policy != "throttle" || failures == 0 {
            Ok(())
        } else {
            Err(format!("{failures} blocking maps failed under throttle"))
        },
    ));

    // A plug-in guest names its own policy: a row must be the policy its cell says it is.
    let reported = pool["policy"].as_str().unwrap_or("");
    out.push(check(
        "policy_name_matches",
        if pool.is_null() || reported == cell.policy {
            Ok(())
        } else {
            Err(format!(
                "the guest's pool reports policy {reported:?} but the cell is {:?}: run a plug-in guest with --policies NAME",
                cell.policy
            ))
        },
    ));

    let l = &m["lifecycle"];
    out.push(check(
        "no_unaccepted_access",
        if run.exit_code == Some(EXIT_UNACCEPTED_ACCESS) {
            Err(format!(
                "the guest touched unaccepted memory at gpa {} (VM stopped)",
                l["unaccepted_access_gpa"]
            ))
        } else {
            none(
                u(l, &["unaccepted_accesses"]),
                "accesses to unaccepted memory",
            )
        },
    ));
    let broken = [
        ("double accepts/validations", u(l, &["double_accepts"])),
        (
            "accepts of shared memory",
            u(l, &["accept_shared_refusals"]),
        ),
        (
            "conversions of validated pages to shared",
            u(l, &["must_rescind_refusals"]),
        ),
    ];
    out.push(check(
        "lifecycle_followed",
        match broken.iter().find(|(_, n)| *n > 0) {
            None => Ok(()),
            Some((what, n)) => Err(format!("{n} {what} on {}", l["platform"])),
        },
    ));
    let private_kernel = u(m, &["private_store", "kernel_bytes"]);
    let private_bound = u(l, &["private_backing_bound_bytes"]);
    let shared_kernel = u(m, &["shared_store", "kernel_bytes"]);
    let shared_bound = u(m, &["shared_store", "engine_bound_bytes"]);
    out.push(check(
        "host_backing_within_accepted",
        if private_kernel > private_bound {
            Err(format!(
                "the private store holds {private_kernel} bytes, more than the accepted memory and mixed-chunk overhead allow ({private_bound})"
            ))
        } else if shared_kernel > shared_bound {
            Err(format!(
                "the shared store holds {shared_kernel} bytes, more than the shared memory allows ({shared_bound})"
            ))
        } else {
            Ok(())
        },
    ));
    out
}

/// Passes when `count` is 0; else says how many `what` there were.
fn none(count: u64, what: &str) -> Result<(), String> {
    if count == 0 {
        Ok(())
    } else {
        Err(format!("{count} {what}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tools::conform::matrix::Workload;
    use memconv::Granularity;
    use serde_json::json;

    fn cell(policy: &str) -> Cell {
        Cell {
            policy: policy.into(),
            private: StoreKind::Hugetlb,
            shared: StoreKind::Hugetlb,
            granularity: Granularity::Huge2M,
            workload: Workload::Steady,
        }
    }

    fn good_summary() -> Value {
        json!({
            "end": {"kind": "guest_exit", "code": 0},
            "disk": {"violations": 0},
            "memconv": {
                "to_shared": {"4k": 0, "sub2m": 0, "2m": 3},
                "to_private": {"4k": 0, "sub2m": 0, "2m": 1},
                "double_accept_violations": 0,
                "rejects": [{"name": "requires_2m", "count": 0}],
                "shared_store": {"owned_bytes": MAILBOX_CHUNK + (4 << 20)},
                "double_alloc": {"agree": true, "computed_bytes": 0, "computed_peak_bytes": 0, "kernel_bytes": 0},
                "pool_report": {
                    "conversions_4k": 0, "conversions_2m": 4, "conversions_other": 0,
                    "shared_bytes": 4 << 20, "map_failures": 0, "claims_2m": true,
                    "policy": "aligned-2m"
                }
            }
        })
    }

    /// A run that exited 0 and left `summary`.
    fn exited_0(summary: Value) -> RunData {
        RunData {
            exit_code: Some(0),
            summary: Some(summary),
            ..Default::default()
        }
    }

    fn failed(verdicts: &[Verdict]) -> Vec<&'static str> {
        verdicts
            .iter()
            .filter(|v| !v.passed)
            .map(|v| v.name)
            .collect()
    }

    #[test]
    fn a_mislabelled_row_is_refused() {
        let run = exited_0(good_summary());
        let v = evaluate(&cell("legacy"), &run);
        assert_eq!(failed(&v), vec!["policy_name_matches"]);
        let detail = &v.iter().find(|v| !v.passed).unwrap().detail;
        assert!(
            detail.contains("\"aligned-2m\"") && detail.contains("--policies"),
            "{detail}"
        );
    }

    #[test]
    fn a_clean_run_passes_everything() {
        let run = exited_0(good_summary());
        let v = evaluate(&cell("aligned-2m"), &run);
        assert_eq!(v.len(), NAMES.len());
        assert!(failed(&v).is_empty(), "{v:?}");
    }

    #[test]
    fn a_policy_claiming_2m_that_sends_4k_is_named() {
        let mut s = good_summary();
        s["memconv"]["to_shared"]["4k"] = json!(5);
        s["memconv"]["pool_report"]["conversions_4k"] = json!(5);
        s["memconv"]["pool_report"]["conversions_2m"] = json!(4);
        s["memconv"]["to_private"]["2m"] = json!(1);
        s["memconv"]["to_shared"]["2m"] = json!(3);
        let run = exited_0(s);
        assert_eq!(
            failed(&evaluate(&cell("aligned-2m"), &run)),
            vec!["claims_2m_honoured"]
        );
    }

    #[test]
    fn double_allocation_is_exact_on_hugetlb_and_a_bound_elsewhere() {
        let mut s = good_summary();
        s["memconv"]["double_alloc"] = json!({"agree": false, "kernel_within_bound": true,
            "computed_bytes": 2 << 20, "computed_peak_bytes": 2 << 20, "kernel_bytes": 4096});
        let run = exited_0(s);
        let named = |c: &Cell| {
            evaluate(c, &run)
                .into_iter()
                .any(|v| v.name == "double_alloc_matches_kernel" && !v.passed)
        };
        assert!(
            named(&cell("aligned-2m")),
            "hugetlb on both sides must agree exactly"
        );
        let mut gmem = cell("aligned-2m");
        gmem.private = StoreKind::Gmem;
        assert!(!named(&gmem), "a 4K private store makes the figure a bound");
    }

    #[test]
    fn violations_crashes_and_throttle_failures_are_named() {
        let mut s = good_summary();
        s["disk"]["violations"] = json!(2);
        s["memconv"]["pool_report"]["map_failures"] = json!(1);
        s["memconv"]["pool_report"]["policy"] = json!("throttle");
        let run = exited_0(s);
        assert_eq!(
            failed(&evaluate(&cell("throttle"), &run)),
            vec!["no_dma_violations", "throttle_blocking_maps_never_fail"]
        );
        let crashed = RunData {
            exit_code: None,
            ..Default::default()
        };
        let v = evaluate(&cell("legacy"), &crashed);
        assert_eq!(v.len(), NAMES.len());
        assert!(!v[0].passed);
    }
}
