//! Errors a user can act on: each exits with status 2, one clear line, and no panic.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;
use std::process::Command;

fn assert_usage_error(o: &std::process::Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(code(o), 2, "stderr:\n{err}\nstdout:\n{}", stdout(o));
    assert!(err.contains(needle), "expected {needle:?} in:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn memory_not_a_multiple_of_2m() {
    assert_usage_error(&vmm(&["run", "--mem", "3M"]), "not a multiple of 2 MiB");
}

#[test]
fn memory_too_large() {
    assert_usage_error(&vmm(&["run", "--mem", "128G"]), "too large");
}

#[test]
fn memory_not_a_size() {
    assert_usage_error(&vmm(&["run", "--mem", "lots"]), "invalid size");
}

#[test]
fn unknown_fixture() {
    assert_usage_error(&vmm(&["run", "--guest", "no-such-guest"]), "unknown guest");
}

#[test]
fn unknown_flag() {
    assert_usage_error(&vmm(&["run", "--bogus"]), "--bogus");
}

#[test]
fn bad_cpu_count() {
    assert_usage_error(&vmm(&["run", "--cpus", "0"]), "--cpus 0");
    assert_usage_error(&vmm(&["run", "--cpus", "65"]), "--cpus 65");
}

#[test]
fn guest_file_that_is_not_elf() {
    let dir = scratch("notelf");
    let f = dir.join("guest.bin");
    std::fs::write(&f, b"#!/bin/sh\necho not a guest\n").unwrap();
    assert_usage_error(
        &vmm_run(&["--guest", f.to_str().unwrap(), "--mem", "64M"]),
        "not an x86-64 ELF",
    );
}

/// A minimal x86-64 ELF executable with one PT_LOAD segment.
fn elf(machine: u16, paddr: u64, memsz: u64) -> Vec<u8> {
    let mut f = vec![0u8; 0x1000 + 16];
    f[..4].copy_from_slice(b"\x7fELF");
    f[4] = 2; // 64-bit
    f[5] = 1; // little endian
    f[6] = 1;
    f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f[18..20].copy_from_slice(&machine.to_le_bytes());
    f[20..24].copy_from_slice(&1u32.to_le_bytes());
    f[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
    f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    f[52..54].copy_from_slice(&64u16.to_le_bytes());
    f[54..56].copy_from_slice(&56u16.to_le_bytes());
    f[56..58].copy_from_slice(&1u16.to_le_bytes());
    let ph = 64;
    f[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f[ph + 4..ph + 8].copy_from_slice(&5u32.to_le_bytes());
    f[ph + 8..ph + 16].copy_from_slice(&0x1000u64.to_le_bytes()); // offset
    f[ph + 16..ph + 24].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 24..ph + 32].copy_from_slice(&paddr.to_le_bytes());
    f[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // filesz
    f[ph + 40..ph + 48].copy_from_slice(&memsz.to_le_bytes());
    f
}

#[test]
fn guest_for_another_machine() {
    let dir = scratch("arm");
    let f = dir.join("arm.elf");
    std::fs::write(&f, elf(183, 0x400000, 16)).unwrap();
    assert_usage_error(
        &vmm_run(&["--guest", f.to_str().unwrap(), "--mem", "64M"]),
        "machine is not x86-64",
    );
}

#[test]
fn guest_that_does_not_fit_in_ram() {
    let dir = scratch("big");
    let f = dir.join("big.elf");
    std::fs::write(&f, elf(62, 0x400000, 256 << 20)).unwrap();
    assert_usage_error(
        &vmm_run(&["--guest", f.to_str().unwrap(), "--mem", "64M"]),
        "does not fit in RAM",
    );
}

#[test]
fn missing_kvm_device() {
    let o = Command::new(vmm_bin())
        .args(["run", "--guest", "hello", "--mem", "64M"])
        .env("VMM_KVM_DEVICE", "/dev/no-such-kvm")
        .output()
        .unwrap();
    assert_usage_error(&o, "does not exist: KVM is not available");
}

#[test]
fn no_permission_on_kvm() {
    require_kvm();
    // Drop to an unprivileged user: /dev/kvm is root-only on these machines.
    let o = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            vmm_bin(),
        ])
        .args(["run", "--guest", "hello", "--mem", "64M"])
        .output()
        .expect("setpriv (util-linux) is installed");
    let err = stderr(&o);
    if o.status.code() == Some(0) {
        panic!("an unprivileged user could open /dev/kvm; this test needs a root-only /dev/kvm:\n{err}");
    }
    assert_usage_error(&o, "permission denied opening /dev/kvm");
}

#[test]
fn fixtures_lists_the_embedded_guests() {
    let o = vmm(&["fixtures"]);
    assert_eq!(code(&o), 0);
    let out = stdout(&o);
    for name in ["hello", "smp", "triple", "panic", "spin", "convert"] {
        assert!(
            out.lines().any(|l| l.starts_with(name)),
            "{name} missing:\n{out}"
        );
    }
}
