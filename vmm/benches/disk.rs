//! The disk's data path on the host alone, no VM: [`Disk::read_into`] / [`Disk::write_from`]
//! of 64 KiB and 4 KiB requests at random sector-aligned offsets of a 128 MiB region of one
//! image, with preadv/pwritev (`vectored`, what `vmm run` uses) next to the old mapped path
//! (`mapped`: mmap + memcpy), into and out of a 2 MiB guest-like buffer (32 request slots,
//! anonymous shared memory). Rounds alternate A/B and B/A; the report is the median of each
//! and their ratio (target: vectored >= 0.9x mapped). One thread, so far less sensitive to a
//! loaded machine than `vmm bench io`, but still to be re-measured on a quiet one.
//!
//! Run: `cargo bench -p vmm --bench disk` (env VMM_DISK_BENCH_ROUNDS, default 7; the image
//! lives in `TMPDIR`, so `TMPDIR=/dev/shm` measures tmpfs).
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::time::Instant;

use vm_memory::VolatileSlice;
use vmm::devices::{Disk, DiskIo};

const REGION: u64 = 128 << 20;
const BUF: usize = 2 << 20;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// MB/s of `ops` requests of `size` on `disk`, reads or writes.
fn run(disk: &Disk, buf: &[VolatileSlice<'_>], size: usize, ops: usize, write: bool) -> f64 {
    let slots = BUF / size;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let start = Instant::now();
    for i in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let off = x % (REGION / size as u64) * size as u64;
        let slot = &buf[i % slots..i % slots + 1];
        let r = if write {
            disk.write_from(off, slot)
        } else {
            disk.read_into(off, slot)
        };
        if let Err(e) = r {
            eprintln!("disk bench: {e}");
            std::process::exit(1);
        }
    }
    (ops * size) as f64 / start.elapsed().as_secs_f64() / 1e6
}

fn main() {
    let rounds: usize = std::env::var("VMM_DISK_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7);
    let dir = std::env::temp_dir().join(format!("vmm-disk-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("disk bench: cannot create {}: {e}", dir.display());
        std::process::exit(1);
    }
    let path = dir.join("bench.img");
    let open = |io| {
        Disk::open_with(&path, Some(REGION), io).unwrap_or_else(|e| {
            eprintln!("disk bench: {e}");
            std::process::exit(1);
        })
    };
    let vectored = open(DiskIo::Vectored);
    let mapped = open(DiskIo::Mapped);
    // SAFETY: a fresh anonymous shared mapping; the kernel picks the address.
    let mem = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            BUF,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
            -1,
            0,
        )
    };
    if mem == libc::MAP_FAILED {
        eprintln!("disk bench: mmap: {}", std::io::Error::last_os_error());
        std::process::exit(1);
    }
    let slices_of = |size: usize| -> Vec<VolatileSlice<'static>> {
        (0..BUF / size)
            // SAFETY: each slot lies inside the mapping above, which lives until the process
            // exits; only this thread (and the kernel, on its behalf) touches it.
            .map(|i| unsafe { VolatileSlice::new(mem.cast::<u8>().add(i * size), size) })
            .collect()
    };
    // Fill the region once (both paths then read data, not holes).
    let fill = slices_of(BUF);
    for off in (0..REGION).step_by(BUF) {
        if let Err(e) = vectored.write_from(off, &fill) {
            eprintln!("disk bench: fill: {e}");
            std::process::exit(1);
        }
    }
    println!(
        "disk data path, host only: random requests over a {} MiB region of a page-cached image, {rounds} rounds A/B interleaved, MB/s",
        REGION >> 20
    );
    println!(
        "  {:<10} {:>14} {:>12} {:>6}",
        "request", "vectored MB/s", "mapped MB/s", "ratio"
    );
    for (size, ops) in [(64 << 10, 4096), (4 << 10, 32768)] {
        let buf = slices_of(size);
        for write in [false, true] {
            let (mut v, mut m) = (Vec::new(), Vec::new());
            // One warm-up each: page tables of the mapping, page cache.
            run(&vectored, &buf, size, ops, write);
            run(&mapped, &buf, size, ops, write);
            for r in 0..rounds {
                if r % 2 == 0 {
                    v.push(run(&vectored, &buf, size, ops, write));
                    m.push(run(&mapped, &buf, size, ops, write));
                } else {
                    m.push(run(&mapped, &buf, size, ops, write));
                    v.push(run(&vectored, &buf, size, ops, write));
                }
            }
            let (v, m) = (median(v), median(m));
            println!(
                "  {:<10} {:>14.0} {:>12.0} {:>6.2}",
                format!("{}k {}", size >> 10, if write { "write" } else { "read" }),
                v,
                m,
                v / m
            );
        }
    }
    println!("  target: vectored >= 0.9x mapped at 64k");
    let _ = std::fs::remove_dir_all(&dir);
}
