//! Booting real guests under KVM: the hello and smp fixtures, execution modes, crashes and the
//! guest panic path.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;

#[test]
fn hello_boots_and_exits_zero() {
    let o = vmm_run(&["--guest", "hello", "--mem", "64M"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    assert!(
        out.contains("hello from guest: cpus=1 ram=67108864 native=1"),
        "{out}"
    );
    assert!(out.contains("end: guest exit 0"), "summary missing:\n{out}");
}

#[test]
fn hello_with_the_default_ram() {
    // `vmm run` alone is the main job (tests/newcomer.rs); `--guest hello` keeps the hello.
    let o = vmm_run(&["--guest", "hello"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stdout(&o).contains("hello from guest: cpus=1 ram=536870912"));
}

#[test]
fn hello_runs_in_the_instruction_emulator() {
    let o = vmm_run(&["--guest", "hello", "--mem", "64M", "--exec", "emulated"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    assert!(out.contains("native=0"), "{out}");
    assert!(out.contains("exec: emulated"), "{out}");
}

fn smp(cpus: u32) {
    let n = cpus.to_string();
    let o = vmm_run(&["--guest", "smp", "--mem", "64M", "--cpus", &n]);
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    for cpu in 0..cpus {
        assert!(
            out.contains(&format!("cpu {cpu} checked in")),
            "cpu {cpu} missing:\n{out}"
        );
    }
    assert!(
        out.contains(&format!("all {cpus} cpus checked in")),
        "{out}"
    );
}

#[test]
fn smp_one_cpu() {
    smp(1);
}

#[test]
fn smp_two_cpus() {
    smp(2);
}

#[test]
fn smp_four_cpus() {
    smp(4);
}

#[test]
fn serial_goes_to_a_file_when_asked() {
    let dir = scratch("serial");
    let file = dir.join("console.txt");
    let o = vmm_run(&[
        "--guest",
        "hello",
        "--mem",
        "64M",
        "--serial",
        file.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let console = std::fs::read_to_string(&file).unwrap();
    assert!(console.contains("hello from guest"), "{console}");
    assert!(!stdout(&o).contains("hello from guest"));
}

#[test]
fn triple_fault_is_reported_with_registers_and_nonzero_exit() {
    let o = vmm_run(&["--guest", "triple", "--mem", "64M"]);
    let err = stderr(&o);
    assert_eq!(code(&o), 70, "stdout:\n{}\nstderr:\n{err}", stdout(&o));
    assert!(stdout(&o).contains("triple: faulting now"));
    assert!(err.contains("triple fault"), "{err}");
    assert!(err.contains("rip=0x"), "no register dump:\n{err}");
    assert!(err.contains("cr3=0x1000"), "no control registers:\n{err}");
}

#[test]
fn guest_panic_prints_and_exits_with_its_code() {
    let o = vmm_run(&["--guest", "panic", "--mem", "64M"]);
    let out = stdout(&o);
    assert_eq!(code(&o), 101, "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    assert!(out.contains("deliberate panic"), "{out}");
}

#[test]
fn stats_json_records_the_run() {
    let dir = scratch("stats");
    let json = dir.join("stats.json");
    let o = vmm_run(&[
        "--guest",
        "hello",
        "--mem",
        "64M",
        "--stats-json",
        json.to_str().unwrap(),
        "--quiet",
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let v = read_json(&json);
    assert_eq!(v["end"]["kind"], "guest_exit");
    assert_eq!(v["end"]["code"], 0);
    assert_eq!(v["native"], true);
    let serial = v["exits"][0]["serial"].as_u64().unwrap();
    assert!(serial >= "hello from guest".len() as u64, "{v}");
    assert!(v["timings"]["first_serial_byte_ms"].as_f64().unwrap() > 0.0);
}
