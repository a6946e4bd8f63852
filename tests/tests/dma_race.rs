//! DMA vs conversion, end to end: the `dmarace` guest converts a 4 MiB shared buffer to
//! private while the disk device copies into it, over 200 rounds with varying delays, with
//! the huge pages used up (hugetlb/hugetlb, inside a hugetlb cgroup that leaves the VM only a
//! few pages beyond what it boots with, so the exhaustion touches no one else's pool) and on
//! memfd/memfd. The VMM must never die (before the DMA fence it died of SIGBUS on hugetlb),
//! every request must end with data or an error status, and the kernel-measured allocation
//! must never exceed the engine's bound, sampled over the control socket all along and at
//! the end (before the fence, memfd runs broke it: the device refilled released pages).

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// hugetlb runs take huge pages: one at a time.
static HUGE: Mutex<()> = Mutex::new(());

const MEM_MIB: u64 = 256;
/// Huge pages the VM may take beyond its boot need (the guest mixes chunks until they are gone).
const SPARE_PAGES: u64 = 8;

/// A hugetlb cgroup (v2) that limits the 2 MiB pages of the processes put in it; removed on
/// drop.
struct HugeCgroup {
    dir: PathBuf,
}

impl HugeCgroup {
    fn new(name: &str, max_pages: u64) -> HugeCgroup {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
        let root = mounts
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 2 && f[2] == "cgroup2")
            .map(|f| PathBuf::from(f[1]))
            .expect("this test needs a cgroup2 mount (for the hugetlb controller)");
        let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
            .expect("read cgroup.controllers");
        assert!(
            controllers.split_whitespace().any(|c| c == "hugetlb"),
            "this test needs the cgroup2 hugetlb controller (found: {controllers})"
        );
        let sub = std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
        if !sub.split_whitespace().any(|c| c == "hugetlb") {
            std::fs::write(root.join("cgroup.subtree_control"), "+hugetlb")
                .expect("enable the hugetlb controller for child cgroups");
        }
        let dir = root.join(format!("vmm-it-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).expect("create the test's cgroup");
        std::fs::write(
            dir.join("hugetlb.2MB.max"),
            format!("{}", max_pages * (2 << 20)),
        )
        .expect("set hugetlb.2MB.max");
        HugeCgroup { dir }
    }

    /// The `cgroup.procs` path a child writes itself into.
    fn procs(&self) -> CString {
        let p = self.dir.join("cgroup.procs");
        CString::new(p.to_str().expect("utf-8 path")).expect("no NUL")
    }
}

impl Drop for HugeCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Pulls `stats` from the control socket until stopped; returns (samples, failures).
fn sampler(sock: PathBuf, stop: Arc<AtomicBool>) -> (u64, Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        if let Ok(s) = UnixStream::connect(&sock) {
            break s;
        }
        if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
            return (0, vec!["no control socket".into()]);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let mut writer = stream.try_clone().expect("clone socket");
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return (0, vec!["no greeting".into()]);
    }
    let (mut n, mut bad) = (0u64, Vec::new());
    while !stop.load(Ordering::SeqCst) {
        if writer.write_all(b"{\"cmd\":\"stats\"}\n").is_err() {
            break;
        }
        let reply = loop {
            line.clear();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return (n, bad);
            }
            let v: Value = serde_json::from_str(&line).expect("JSON from the control socket");
            if v.get("event").is_none() {
                break v;
            }
        };
        if reply["ok"] != true {
            continue;
        }
        n += 1;
        if let Some(why) = out_of_bound(&reply["return"]["memconv"]) {
            bad.push(why);
        }
    }
    (n, bad)
}

/// Why the kernel's figures exceed the engine's bound in this memconv snapshot, if they do.
fn out_of_bound(m: &Value) -> Option<String> {
    let d = &m["double_alloc"];
    if d["kernel_within_bound"] != true {
        return Some(format!("double allocation: {d}"));
    }
    for store in ["private_store", "shared_store"] {
        let s = &m[store];
        let (k, b) = (&s["kernel_bytes"], &s["engine_bound_bytes"]);
        if k.as_u64().zip(b.as_u64()).is_none_or(|(k, b)| k > b) {
            return Some(format!("{store}: kernel {k} > bound {b}"));
        }
    }
    None
}

fn race(name: &str, store: &str) {
    require_kvm();
    let huge = store == "hugetlb";
    let _guard = huge.then(|| HUGE.lock().unwrap_or_else(|p| p.into_inner()));
    // Boot: every chunk but the mailbox's in the private store, the mailbox chunk shared.
    let boot_pages = MEM_MIB / 2;
    let cgroup = huge.then(|| {
        ensure_free_hugepages(boot_pages + SPARE_PAGES);
        HugeCgroup::new(name, boot_pages + SPARE_PAGES)
    });
    let dir = scratch(&format!("dmarace-{name}"));
    let (disk, json, sock) = (dir.join("d.img"), dir.join("s.json"), dir.join("api.sock"));
    let mut cmd = Command::new(vmm_bin());
    cmd.args(["run", "--guest", "dmarace", "--mem", &format!("{MEM_MIB}M")])
        .args(["--private", store, "--shared", store, "--disk"])
        .arg(&disk)
        .args(["--disk-size", "8M", "--cmdline", "rounds=200"])
        // The huge-page budget counts all RAM backed at boot (the eager path).
        .args(huge.then_some("--prealloc"))
        .arg("--stats-json")
        .arg(&json)
        .arg("--api-socket")
        .arg(&sock)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(cg) = &cgroup {
        let procs = cg.procs();
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // async-signal-safe functions (open, write, close) on memory prepared before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let n = libc::write(fd, b"0\n".as_ptr().cast(), 2);
                libc::close(fd);
                if n != 2 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let child = cmd.spawn().expect("spawn vmm run");
    let stop = Arc::new(AtomicBool::new(false));
    let sampling = {
        let (sock, stop) = (sock.clone(), stop.clone());
        std::thread::spawn(move || sampler(sock, stop))
    };
    let o = child.wait_with_output().expect("wait for vmm");
    stop.store(true, Ordering::SeqCst);
    let (samples, bad) = sampling.join().expect("sampler thread");
    drop(cgroup);
    let out = stdout(&o);
    let ctx = format!("{store}\nstdout:\n{out}\nstderr:\n{}", stderr(&o));
    // Never killed by a signal (`code` panics on one), and the guest's checks passed.
    assert_eq!(code(&o), 0, "{ctx}");
    let g = guest_fields(&out, "dmarace: rounds=");
    assert_eq!(g["rounds"], 200, "{ctx}");
    assert_eq!(
        g["ok"] + g["ioerr"],
        200,
        "every request ends with a status: {ctx}"
    );
    assert_eq!((g["bad_data"], g["nonzero_private"]), (0, 0), "{ctx}");
    if huge {
        assert_eq!(
            g["exhausted"], 1,
            "the guest must use up the huge pages: {ctx}"
        );
    }
    assert!(samples > 0, "no statistics sampled during the run: {ctx}");
    assert!(
        bad.is_empty(),
        "kernel figures above the engine's bound in {} of {samples} samples, first: {:?}\n{ctx}",
        bad.len(),
        &bad[..bad.len().min(3)]
    );
    let j = read_json(&json);
    let m = &j["memconv"];
    assert_eq!(out_of_bound(m), None, "{ctx}");
    let d = &j["disk"];
    assert_eq!(d["device_faults"], 0, "{ctx}");
    // The race was real: some conversions met device accesses in flight (they waited for
    // them), or came first and the device refused the now-private buffer.
    let f = &m["fence"];
    let met = f["conversion_waits"].as_u64().unwrap_or(0)
        + d["violations"].as_u64().unwrap_or(0)
        + d["fence_retries"].as_u64().unwrap_or(0);
    assert!(
        met > 0,
        "no round overlapped a device access: {f} {d}\n{ctx}"
    );
    assert_eq!(d["violations"].as_u64(), Some(g["ioerr"]), "{ctx}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dma_race_hugetlb_exhausted() {
    race("huge", "hugetlb");
}

#[test]
fn dma_race_memfd() {
    race("memfd", "memfd");
}
