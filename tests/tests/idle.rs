//! An idle VM gives its cores back: a guest whose I/O vCPU waits for a completion that never
//! comes (`stall=1`: it polls its used ring, then halts in host-ended `hlt` waits) and whose
//! pool worker vCPU has nothing to do (refill, full) must use under 5% of one core over 5 s,
//! measured from the VMM process's CPU time (/proc/PID/stat utime + stime), with the device
//! poller asleep.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// utime + stime of process `pid`, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // The command name (field 2) is in parentheses and may hold spaces: count from after it.
    let rest = &stat[stat.rfind(')').expect("stat has a (comm)") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the comm: state is field 3, utime field 14, stime field 15.
    let utime: u64 = f[11].parse().expect("utime");
    let stime: u64 = f[12].parse().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (utime + stime) as f64 / tck
}

#[test]
fn an_idle_vm_uses_under_5_percent_of_a_core() {
    require_kvm();
    let dir = scratch("idle");
    let disk = dir.join("d.img");
    let child = Command::new(vmm_bin())
        .args([
            "run",
            "--guest",
            "io",
            "--mem",
            "256M",
            "--cpus",
            "2",
            "--disk",
            disk.to_str().unwrap(),
            "--disk-size",
            "16M",
            "--cmdline",
            "policy=refill pool=16M worker=1 cpus=1 stall=1 fill=0 seconds=9",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the vmm binary");
    let pid = child.id();
    // Boot, pool fill and device setup take well under 3 s; then measure 5 s of idling.
    std::thread::sleep(Duration::from_secs(3));
    let (c0, t0) = (cpu_seconds(pid), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let (c1, t1) = (cpu_seconds(pid), Instant::now());
    let o = child.wait_with_output().expect("wait for the vmm");
    let out = stdout(&o);
    assert_eq!(code(&o), 0, "stdout:\n{out}\nstderr:\n{}", stderr(&o));
    let f = guest_fields(&out, "io: done");
    assert_eq!(f["requests"], 0, "{out}");
    // The waiting vCPU really halted (one 50 ms halt after another), not spun.
    assert!(f["halts"] >= 50, "{out}");
    let share = (c1 - c0) / (t1 - t0).as_secs_f64();
    eprintln!("idle VM: {:.2}% of one core over 5 s", share * 100.0);
    assert!(
        share < 0.05,
        "an idle VM used {:.1}% of one core (utime+stime {c0:.2} s -> {c1:.2} s)\n{out}",
        share * 100.0
    );
}
