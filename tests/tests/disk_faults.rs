//! A disk that cannot SIGBUS the VMM: whatever the filesystem under the image does (full,
//! image truncated while the VM runs), the guest's requests fail with VIRTIO_BLK_S_IOERR, the
//! device counts them as `disk.io_errors`, and the VMM ends normally with its summary and
//! `--stats-json`. (With the old memory-mapped data path both cases killed the VMM with
//! SIGBUS, exit 135 and no summary.)
//!
//! The full-filesystem case mounts its own small tmpfs, the failing-filesystem case its own
//! loop-mounted ext4 (root needed); both unmount them.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod common;
use common::*;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A tmpfs of `size` mounted at a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(name: &str, size: &str) -> Tmpfs {
        let dir = scratch(name);
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "this test mounts a {size} tmpfs at {} and could not ({st}): run it as root",
            dir.display()
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A fresh ext4 on a loop device over a file, mounted at a fresh directory; unmounted (and
/// the file removed) on drop.
struct LoopExt4 {
    dir: PathBuf,
    backing: PathBuf,
}

impl LoopExt4 {
    fn mount(name: &str, size: u64) -> LoopExt4 {
        let dir = scratch(name);
        let backing =
            std::env::temp_dir().join(format!("vmm-it-{}-{name}.ext4", std::process::id()));
        std::fs::File::create(&backing)
            .and_then(|f| f.set_len(size))
            .expect("create the filesystem's backing file");
        let mkfs = Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&backing)
            .status()
            .expect("run mkfs.ext4 (e2fsprogs)");
        assert!(mkfs.success(), "mkfs.ext4 failed: {mkfs}");
        let st = Command::new("mount")
            .args(["-o", "loop"])
            .arg(&backing)
            .arg(&dir)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "this test loop-mounts an ext4 at {} and could not ({st}): run it as root",
            dir.display()
        );
        LoopExt4 { dir, backing }
    }

    /// Shuts the filesystem down (EXT4_IOC_SHUTDOWN, no log flush): from now on every read,
    /// write and fsync on it fails with EIO, as on a disk that went away.
    fn shut_down(&self) {
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587d; // _IOR('X', 125, __u32)
        const EXT4_GOING_FLAGS_NOLOGFLUSH: u32 = 2;
        let d = std::fs::File::open(&self.dir).expect("open the mount point");
        let flags = EXT4_GOING_FLAGS_NOLOGFLUSH;
        // SAFETY: EXT4_IOC_SHUTDOWN reads one u32 from the pointer, which points at `flags`.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(&d),
                EXT4_IOC_SHUTDOWN,
                &flags as *const u32,
            )
        };
        assert_eq!(
            r,
            0,
            "EXT4_IOC_SHUTDOWN: {}",
            std::io::Error::last_os_error()
        );
    }
}

impl Drop for LoopExt4 {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.backing);
    }
}

/// Spawns `vmm run` of the io guest on `img` (created with 32 MiB), waits until the guest has
/// written into it, then runs `fault` under the running VM.
fn run_and_fault(
    img: &Path,
    json: &Path,
    extra: &[&str],
    fault: impl FnOnce(),
) -> std::process::Child {
    let mut child = Command::new(vmm_bin())
        .args([
            "run",
            "--guest",
            "io",
            "--mem",
            "128M",
            "--disk",
            img.to_str().unwrap(),
            "--disk-size",
            "32M",
            "--cmdline",
            "policy=legacy pool=8M rw=50 verify=0 seconds=6 qd=8 sizes=4k-64k",
            "--stats-json",
            json.to_str().unwrap(),
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the vmm binary");
    // Wait until the guest has written into the image (its fill phase).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let data = std::fs::metadata(img).map(|m| std::os::unix::fs::MetadataExt::blocks(&m));
        if data.is_ok_and(|b| b > 0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the guest never wrote to the image"
        );
        if let Ok(Some(st)) = child.try_wait() {
            panic!("the VMM ended before the fault: {st}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    fault();
    child
}

/// Fills the filesystem holding `dir` until it has no free block left.
fn fill_up(dir: &Path) {
    let mut f = std::fs::File::create(dir.join("filler")).expect("create filler");
    let chunk = vec![0xa5u8; 64 << 10];
    let mut small = false;
    loop {
        let piece = if small { &chunk[..4096] } else { &chunk[..] };
        match f.write(piece) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                if small {
                    break;
                }
                small = true;
            }
            Err(e) => panic!("filling the tmpfs: {e}"),
        }
    }
    let _ = f.sync_all();
}

/// The checks both cases share: ended by the guest (not a signal), summary printed, the guest
/// saw errors, the device counted io_errors.
fn assert_survived(o: &std::process::Output, json: &Path) -> serde_json::Value {
    let out = stdout(o);
    let status = code(o);
    assert!(
        out.contains("== vmm summary =="),
        "no summary (status {status})\nstdout:\n{out}\nstderr:\n{}",
        stderr(o)
    );
    // The io guest exits 4 when requests failed with an I/O error.
    assert_eq!(status, 4, "stdout:\n{out}\nstderr:\n{}", stderr(o));
    let guest = guest_fields(&out, "io: done");
    assert!(guest["errors"] > 0, "{out}");
    let j = read_json(json);
    let d = &j["disk"];
    let io_errors = d["io_errors"].as_u64().expect("disk.io_errors");
    assert!(io_errors > 0, "{d}");
    assert!(d["errors"].as_u64().unwrap() >= io_errors, "{d}");
    assert_eq!(d["violations"], 0, "{d}");
    assert_eq!(d["device_faults"], 0, "{d}");
    assert!(out.contains(&format!("io errors {io_errors}")), "{out}");
    j
}

#[test]
fn full_filesystem_fails_writes_with_ioerr() {
    require_kvm();
    let fs = Tmpfs::mount("disk-full", "8m");
    let img = fs.dir.join("d.img");
    // A sparse image larger than the filesystem, then the filesystem filled up.
    std::fs::File::create(&img)
        .and_then(|f| f.set_len(32 << 20))
        .expect("create the sparse image");
    fill_up(&fs.dir);
    let json = scratch("disk-full-json").join("stats.json");
    let o = vmm_run(&[
        "--guest",
        "io",
        "--mem",
        "128M",
        "--disk",
        img.to_str().unwrap(),
        "--cmdline",
        "policy=legacy pool=8M rw=write fill=0 requests=200 qd=8 sizes=4k-64k",
        "--stats-json",
        json.to_str().unwrap(),
    ]);
    let j = assert_survived(&o, &json);
    assert_eq!(
        j["disk"]["io_errors"], j["memconv"]["pool_report"]["io_errors"],
        "every write failed in the image, and the guest saw each"
    );
    // The image was never extended.
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 32 << 20);
}

#[test]
fn image_truncated_while_running_fails_requests_with_ioerr() {
    require_kvm();
    let dir = scratch("disk-trunc");
    let img = dir.join("d.img");
    let json = dir.join("stats.json");
    let sock = dir.join("vm.sock");
    let child = run_and_fault(
        &img,
        &json,
        &["--api-socket", sock.to_str().unwrap()],
        || {
            // Cut the image down to one page under the running VM.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&img)
                .and_then(|f| f.set_len(4096))
                .expect("truncate the image");
        },
    );
    // While the VM runs, the control socket's stats and metrics count the failures.
    let ctl = |args: &[&str]| {
        Command::new(vmm_bin())
            .arg("ctl")
            .arg(&sock)
            .args(args)
            .output()
            .expect("spawn vmm ctl")
    };
    let deadline = Instant::now() + Duration::from_secs(4);
    let live = loop {
        let o = ctl(&["stats", "--json"]);
        let n = serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .ok()
            .and_then(|r| r["return"]["disk"]["io_errors"].as_u64())
            .unwrap_or(0);
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        live > 0,
        "control-socket stats never showed disk.io_errors > 0"
    );
    let metrics = stdout(&ctl(&["metrics"]));
    let line = metrics
        .lines()
        .find(|l| l.starts_with("vmm_disk_io_errors_total{"))
        .unwrap_or_else(|| panic!("no vmm_disk_io_errors_total in:\n{metrics}"));
    let value: u64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(value >= live, "{line}");
    let o = child.wait_with_output().expect("wait for the vmm");
    assert_survived(&o, &json);
    // Writes past the new end were refused (one racing with the truncation may land: the
    // file never grows past the device's capacity).
    assert!(std::fs::metadata(&img).unwrap().len() <= 32 << 20);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn failing_filesystem_fails_requests_with_ioerr() {
    require_kvm();
    let fs = LoopExt4::mount("disk-shutdown", 64 << 20);
    let img = fs.dir.join("d.img");
    let json = scratch("disk-shutdown-json").join("stats.json");
    let child = run_and_fault(&img, &json, &[], || fs.shut_down());
    let o = child.wait_with_output().expect("wait for the vmm");
    assert_survived(&o, &json);
}
