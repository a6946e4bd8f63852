//! Host benchmark of the five pool policies on host memory (`HostPlatform`):
//! map+unmap operations per second for 1, 2 and 4 threads, and bounce copy bandwidth (map
//! ToDevice + unmap FromDevice: two copies) next to plain memcpy of the same bytes, measured
//! in the same run.
//!
//! `cargo run --release -p swiotlb --features host --example bench_host [-- MILLIS [NAME]]`
//! (MILLIS per measurement, default 300; NAME: only the rows of that policy).

use std::time::{Duration, Instant};
use swiotlb::host::HostPlatform;
use swiotlb::{AnyPolicy, Config, Direction, Policy, PolicyKind};

/// Pool configuration per policy: the same order of size where a size applies.
fn config(kind: PolicyKind, cpus: u32) -> Config {
    let text = match kind {
        PolicyKind::Legacy => "pool=64M",
        PolicyKind::Dynamic => "pool=4M",
        PolicyKind::Refill => "pool=64M",
        PolicyKind::Throttle => "pool=16M",
        PolicyKind::Aligned2m => "pool=64M",
        PolicyKind::Adaptive => "",
    };
    let mut c = Config::new(kind, 4 << 30, cpus);
    c.apply(text, false).expect("config");
    c
}

/// map+unmap pairs of `len` bytes per second, `threads` threads for `dur`.
fn ops_per_sec(pool: &AnyPolicy, threads: usize, len: usize, dur: Duration) -> f64 {
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    HostPlatform::set_cpu(t as u32);
                    let buf = vec![t as u8; len];
                    let mut n = 0u64;
                    let end = Instant::now() + dur;
                    while Instant::now() < end {
                        for _ in 0..64 {
                            // SAFETY: `buf` outlives the mapping.
                            let b = unsafe {
                                pool.map(buf.as_ptr() as u64, len, Direction::ToDevice, true)
                            }
                            .expect("map");
                            pool.unmap(b, len, Direction::ToDevice).expect("unmap");
                        }
                        n += 64;
                    }
                    n
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    total as f64 / start.elapsed().as_secs_f64()
}

/// Bytes per second through the pool: map ToDevice (copy in) + unmap FromDevice (copy out).
fn bounce_bw(pool: &AnyPolicy, len: usize, dur: Duration) -> f64 {
    let mut buf = vec![1u8; len];
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < dur {
        for _ in 0..16 {
            // SAFETY: `buf` outlives the mapping.
            let b = unsafe { pool.map(buf.as_mut_ptr() as u64, len, Direction::ToDevice, true) }
                .expect("map");
            pool.unmap(b, len, Direction::FromDevice).expect("unmap");
        }
        n += 16;
    }
    (2 * len) as f64 * n as f64 / start.elapsed().as_secs_f64()
}

/// Bytes per second of two plain copies of `len` (there and back), as the bounce does.
fn memcpy_bw(len: usize, dur: Duration) -> f64 {
    let mut a = vec![1u8; len];
    let mut b = vec![2u8; len];
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < dur {
        for _ in 0..16 {
            b.copy_from_slice(std::hint::black_box(&a));
            a.copy_from_slice(std::hint::black_box(&b));
        }
        n += 16;
    }
    std::hint::black_box((&a, &b));
    (2 * len) as f64 * n as f64 / start.elapsed().as_secs_f64()
}

fn main() {
    let ms: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(300);
    let dur = Duration::from_millis(ms);
    let only = std::env::args().nth(2);
    let wanted = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let plat = HostPlatform::new(1 << 30);
    plat.set_logging(false);

    println!("map+unmap of 4 KiB (ToDevice, may_block), Mops/s ({ms} ms per cell)");
    println!(
        "{:<11} {:>9} {:>9} {:>9}",
        "policy", "1 thread", "2 threads", "4 threads"
    );
    for kind in PolicyKind::ALL.into_iter().filter(|k| wanted(k.name())) {
        let pool = AnyPolicy::new(&config(kind, 4), &plat).expect("build");
        let r: Vec<f64> = [1, 2, 4]
            .iter()
            .map(|&t| ops_per_sec(&pool, t, 4096, dur) / 1e6)
            .collect();
        println!(
            "{:<11} {:>9.2} {:>9.2} {:>9.2}",
            kind.name(),
            r[0],
            r[1],
            r[2]
        );
    }

    println!();
    println!("bounce bandwidth: map ToDevice + unmap FromDevice (2 copies) vs 2 memcpy, GB/s");
    println!(
        "{:<11} {:>6} {:>9} {:>9} {:>6}",
        "policy", "size", "bounce", "memcpy", "ratio"
    );
    for len in [4096usize, 64 << 10] {
        // The slot allocator searches next-fit (like the kernel): successive maps walk the
        // whole pool, so a big pool bounces through cold cache lines. `legacy-4M` shows the
        // same allocator with a cache-sized pool.
        let mut small = config(PolicyKind::Legacy, 1);
        small.pool_size = Some(4 << 20);
        let rows = PolicyKind::ALL
            .iter()
            .map(|&k| (k.name(), config(k, 1)))
            .chain([("legacy-4M", small)]);
        for (name, cfg) in rows.filter(|(n, _)| wanted(n)) {
            let pool = AnyPolicy::new(&cfg, &plat).expect("build");
            let bw = bounce_bw(&pool, len, dur);
            let mc = memcpy_bw(len, dur);
            println!(
                "{:<11} {:>5}K {:>9.2} {:>9.2} {:>6.2}",
                name,
                len >> 10,
                bw / 1e9,
                mc / 1e9,
                bw / mc
            );
        }
    }
}
