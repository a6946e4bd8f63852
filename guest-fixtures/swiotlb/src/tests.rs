//! Host tests across policies, on real host memory through [`HostPlatform`]: random
//! multi-threaded sequences of map / sync / unmap / coherent / bad calls checked against a
//! model (no overlap, shared, min-align, data round trip, statistics), and one test per
//! policy behaviour (throttle waits, dynamic transient buffers and growth, refill watermarks,
//! aligned-2m conversions, failures).

use crate::build::AnyPolicy;
use crate::config::{Config, PolicyKind};
use crate::error::BuildError;
use crate::error::MapError;
use crate::host::HostPlatform;
use crate::policy::{Direction, MapOpts, Policy};
use crate::slots::SEGMENT_BYTES;
use crate::{ConvError, Converter, Platform, Range, Stats};
use memconv::abi::{ERR_NO_MEMORY, ERR_REQUIRES_2M, HUGE_PAGE_SIZE};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

mod adaptive;

const MIB: u64 = 1 << 20;

fn build<'p>(plat: &'p HostPlatform, text: &str) -> AnyPolicy<'p> {
    let cfg = Config::parse(text).unwrap();
    AnyPolicy::new(&cfg, plat).unwrap_or_else(|e| panic!("build {text}: {e}"))
}

/// After the policy is dropped: nothing allocated, nothing shared, no violations.
fn assert_clean(plat: &HostPlatform) {
    assert_eq!(plat.violations(), Vec::<String>::new());
    assert_eq!(plat.allocated_bytes(), 0, "leaked pages");
    assert_eq!(plat.shared_bytes(), 0, "left shared");
}

/// The conversion counters agree with the host's log.
fn assert_conversions_counted(plat: &HostPlatform, pool: &dyn Policy) {
    let r = pool.report();
    let (mut k4, mut m2, mut other) = (0, 0, 0);
    for rec in plat.conversions() {
        for range in &rec.ranges {
            match crate::stats::ConvClass::of(range.addr, range.len) {
                crate::stats::ConvClass::K4 => k4 += 1,
                crate::stats::ConvClass::M2 => m2 += 1,
                crate::stats::ConvClass::Other => other += 1,
            }
        }
    }
    assert_eq!(
        (r.conversions_4k, r.conversions_2m, r.conversions_other),
        (k4, m2, other)
    );
    assert_eq!(r.shared_bytes, plat.shared_bytes());
}

// ---------------------------------------------------------------------------------------------
// The model-checked random workload.

#[derive(Clone, Debug)]
enum Op {
    Map {
        len: usize,
        dir: u8,
        may_block: bool,
        misalign: usize,
        mask: u8,
    },
    Unmap(u8),
    SyncDev(u8),
    SyncCpu(u8),
    Coherent(usize),
    FreeCoherent(u8),
    Bad(u8),
    Background,
}

/// One random op; `map_weight` against 4 for unmaps sets the pressure.
fn op(map_weight: u32) -> impl Strategy<Value = Op> {
    let len = prop_oneof![1usize..=4096, 1usize..=65536, 1usize..=262144];
    prop_oneof![
        map_weight => (len, 0u8..3, any::<bool>(), 0usize..4096, 0u8..3).prop_map(|(len, dir, may_block, misalign, mask)| Op::Map {
            len,
            dir,
            may_block,
            misalign,
            mask
        }),
        4 => any::<u8>().prop_map(Op::Unmap),
        1 => any::<u8>().prop_map(Op::SyncDev),
        1 => any::<u8>().prop_map(Op::SyncCpu),
        1 => (1usize..=32768).prop_map(Op::Coherent),
        1 => any::<u8>().prop_map(Op::FreeCoherent),
        1 => any::<u8>().prop_map(Op::Bad),
        1 => Just(Op::Background),
    ]
}

struct Live {
    bounce: u64,
    len: usize,
    dir: Direction,
    buf: Vec<u8>,
    off: usize,
    /// What the original / the bounce buffer must hold.
    want_orig: Vec<u8>,
    want_bounce: Vec<u8>,
}

fn bytes_at(addr: u64, len: usize) -> &'static [u8] {
    // SAFETY: tests only read live bounce buffers / coherent memory they own.
    unsafe { std::slice::from_raw_parts(addr as usize as *const u8, len) }
}

fn write_at(addr: u64, data: &[u8]) {
    // SAFETY: tests only write live bounce buffers / coherent memory they own.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as usize as *mut u8, data.len()) };
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Shared checker state: every live bounce / coherent range across threads.
#[derive(Default)]
struct Shadow {
    live: Mutex<BTreeMap<u64, u64>>,
    maps: AtomicU64,
    failures: AtomicU64,
    bad: AtomicU64,
    max_used: AtomicU64,
}

impl Shadow {
    fn insert(&self, start: u64, len: usize) {
        let end = start + len as u64;
        let mut l = self.live.lock().unwrap();
        if let Some((&s, &e)) = l.range(..end).next_back() {
            assert!(
                e <= start,
                "overlap: new {start:#x}..{end:#x} with live {s:#x}..{e:#x}"
            );
        }
        l.insert(start, end);
    }

    fn remove(&self, start: u64) {
        assert!(self.live.lock().unwrap().remove(&start).is_some());
    }
}

struct Worker<'a> {
    plat: &'a HostPlatform,
    pool: &'a dyn Policy,
    shadow: &'a Shadow,
    live: Vec<Live>,
    coherent: Vec<(u64, usize, Vec<u8>)>,
    seed: u64,
    max_live: usize,
}

impl Worker<'_> {
    fn check_live(&self, l: &Live) {
        assert!(
            bytes_at(l.bounce, l.len) == &l.want_bounce[..],
            "bounce contents of {:#x}",
            l.bounce
        );
    }

    fn step(&mut self, op: &Op) {
        self.seed += 1;
        match *op {
            Op::Map {
                len,
                dir,
                may_block,
                misalign,
                mask,
            } => {
                if self.live.len() >= self.max_live {
                    return;
                }
                let dir = [
                    Direction::ToDevice,
                    Direction::FromDevice,
                    Direction::Bidirectional,
                ][dir as usize];
                let mask = [0u32, 0x3, 0xfff][mask as usize];
                let mut buf = vec![0u8; len + misalign];
                let data = pattern(self.seed, len);
                buf[misalign..].copy_from_slice(&data);
                let orig = buf.as_ptr() as u64 + misalign as u64;
                let opts = MapOpts::new(may_block).min_align(mask);
                // SAFETY: `buf` is ours and outlives the mapping (kept in `Live`).
                match unsafe { self.pool.map_with(orig, len, dir, opts) } {
                    Ok(bounce) => {
                        self.shadow.maps.fetch_add(1, Ordering::Relaxed);
                        self.shadow.insert(bounce, len);
                        assert!(
                            self.plat.is_shared(bounce, len),
                            "bounce {bounce:#x}+{len:#x} not shared"
                        );
                        assert_eq!(bounce & mask as u64, orig & mask as u64, "min-align");
                        let used = self.pool.report().used_bytes;
                        self.shadow.max_used.fetch_max(used, Ordering::Relaxed);
                        // With prefill (the default) every direction starts as a copy.
                        assert!(bytes_at(bounce, len) == &data[..], "map copy-in");
                        let mut want_bounce = data.clone();
                        if dir.from_device() {
                            // The device writes its result.
                            want_bounce = pattern(self.seed ^ 0xdead, len);
                            write_at(bounce, &want_bounce);
                        }
                        self.live.push(Live {
                            bounce,
                            len,
                            dir,
                            buf,
                            off: misalign,
                            want_orig: data,
                            want_bounce,
                        });
                    }
                    Err(e) => {
                        self.shadow.failures.fetch_add(1, Ordering::Relaxed);
                        let offset = (orig & mask as u64) as usize;
                        let ok = match e {
                            MapError::TooLarge => offset + len > self.pool.max_mapping_size(),
                            MapError::NoSpace => true,
                            MapError::TimedOut => {
                                matches!(self.pool.name(), "throttle" | "adaptive") && may_block
                            }
                            MapError::TableFull | MapError::NoMemory => {
                                self.pool.name() == "dynamic"
                            }
                            _ => false,
                        };
                        assert!(
                            ok,
                            "{} map of {len} (offset {offset}) failed: {e:?}",
                            self.pool.name()
                        );
                    }
                }
            }
            Op::Unmap(sel) => {
                if self.live.is_empty() {
                    return;
                }
                let l = self.live.swap_remove(sel as usize % self.live.len());
                self.check_live(&l);
                self.shadow.remove(l.bounce);
                self.pool.unmap(l.bounce, l.len, l.dir).unwrap();
                let want = if l.dir.from_device() {
                    &l.want_bounce
                } else {
                    &l.want_orig
                };
                assert!(l.buf[l.off..] == want[..], "unmap copy-back");
            }
            Op::SyncDev(sel) => {
                if self.live.is_empty() {
                    return;
                }
                let i = sel as usize % self.live.len();
                let seed = self.seed;
                let l = &mut self.live[i];
                if l.dir.to_device() {
                    let new = pattern(seed ^ 0xbeef, l.len);
                    l.buf[l.off..].copy_from_slice(&new);
                    l.want_orig = new.clone();
                    l.want_bounce = new;
                }
                self.pool.sync_for_device(l.bounce, l.len).unwrap();
                let l = &self.live[i];
                self.check_live(l);
            }
            Op::SyncCpu(sel) => {
                if self.live.is_empty() {
                    return;
                }
                let i = sel as usize % self.live.len();
                let l = &mut self.live[i];
                // A part of the mapping.
                let start = (sel as usize * 7) % l.len;
                let n = (l.len - start).min(1 + sel as usize * 13);
                self.pool.sync_for_cpu(l.bounce + start as u64, n).unwrap();
                if l.dir.from_device() {
                    let part = l.want_bounce[start..start + n].to_vec();
                    l.want_orig[start..start + n].copy_from_slice(&part);
                }
                assert!(l.buf[l.off..] == l.want_orig[..], "sync_for_cpu");
            }
            Op::Coherent(len) => {
                if self.coherent.len() >= 4 {
                    return;
                }
                match self.pool.alloc_coherent(len) {
                    Ok(addr) => {
                        assert_eq!(addr % 4096, 0);
                        assert!(self.plat.is_shared(addr, len));
                        assert!(
                            bytes_at(addr, len).iter().all(|&b| b == 0),
                            "coherent not zeroed"
                        );
                        self.shadow.insert(addr, len);
                        let p = pattern(self.seed ^ 0xc0, len);
                        write_at(addr, &p);
                        self.coherent.push((addr, len, p));
                    }
                    Err(e) => assert!(
                        matches!(e, MapError::NoSpace | MapError::TableFull),
                        "coherent: {e:?}"
                    ),
                }
            }
            Op::FreeCoherent(sel) => {
                if self.coherent.is_empty() {
                    return;
                }
                let (addr, len, p) = self
                    .coherent
                    .swap_remove(sel as usize % self.coherent.len());
                assert!(bytes_at(addr, len) == &p[..], "coherent contents");
                self.shadow.remove(addr);
                self.pool.free_coherent(addr, len).unwrap();
            }
            Op::Bad(sel) => {
                self.shadow.bad.fetch_add(1, Ordering::Relaxed);
                let r = match (sel % 4, self.live.first()) {
                    (0, Some(l)) => self.pool.unmap(l.bounce + 1, l.len, l.dir),
                    (1, Some(l)) => self.pool.unmap(l.bounce, l.len + 1, l.dir),
                    (2, Some(l)) => self.pool.free_coherent(l.bounce, l.len),
                    _ => self
                        .pool
                        .unmap(0x1000 + sel as u64 * 4096, 16, Direction::ToDevice),
                };
                assert!(
                    matches!(r, Err(MapError::NotMapped) | Err(MapError::Mismatch)),
                    "{r:?}"
                );
            }
            Op::Background => {
                self.pool.background_work();
            }
        }
    }

    fn finish(&mut self) {
        while !self.live.is_empty() {
            self.step(&Op::Unmap(0));
        }
        while !self.coherent.is_empty() {
            self.step(&Op::FreeCoherent(0));
        }
    }
}

/// Run `threads` op sequences concurrently on one policy and check the whole run.
fn run_model(text: &str, threads: Vec<Vec<Op>>, max_live: usize, worker_thread: bool) {
    let plat = HostPlatform::new(256 << 20);
    let pool = build(&plat, text);
    let shadow = Shadow::default();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        if worker_thread {
            s.spawn(|| {
                HostPlatform::set_cpu(7);
                while !stop.load(Ordering::Relaxed) {
                    if !pool.background_work() {
                        std::thread::yield_now();
                    }
                }
            });
        }
        let hs: Vec<_> = threads
            .iter()
            .enumerate()
            .map(|(t, ops)| {
                let (plat, pool, shadow) = (&plat, &pool, &shadow);
                s.spawn(move || {
                    HostPlatform::set_cpu(t as u32);
                    let mut w = Worker {
                        plat,
                        pool,
                        shadow,
                        live: Vec::new(),
                        coherent: Vec::new(),
                        seed: (t as u64) << 32,
                        max_live,
                    };
                    for op in ops {
                        w.step(op);
                    }
                    w.finish();
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    let r = pool.report();
    let x = pool.extra_stats();
    if std::env::var_os("SWIOTLB_DEBUG").is_some() {
        std::eprintln!("{} maps={} fail={} hw={} cap={} waits={} transient={} grow={} shrink={} c4k={} c2m={} other={} bad={}",
            pool.name(), r.maps, r.map_failures, r.high_water_bytes, r.capacity_bytes, r.throttle_waits, r.transient_maps, r.grow_events, r.shrink_events, r.conversions_4k, r.conversions_2m, r.conversions_other, x.bad_calls);
    }
    assert_eq!(r.used_bytes, 0, "used after all unmaps");
    assert_eq!(r.maps, shadow.maps.load(Ordering::Relaxed));
    assert_eq!(r.map_failures, shadow.failures.load(Ordering::Relaxed));
    assert!(r.high_water_bytes >= shadow.max_used.load(Ordering::Relaxed));
    assert!(
        r.high_water_bytes <= r.capacity_bytes + 256 * MIB,
        "high water"
    );
    assert_eq!(x.bad_calls, shadow.bad.load(Ordering::Relaxed));
    assert_eq!(x.coherent_bytes, 0);
    assert!(r.shared_peak_bytes >= r.shared_bytes);
    assert_eq!(&r.policy[..r.policy_len as usize], pool.name().as_bytes());
    assert_conversions_counted(&plat, &pool);
    if pool.name() == "aligned-2m" {
        for rec in plat.conversions() {
            for range in &rec.ranges {
                assert!(
                    range.addr % HUGE_PAGE_SIZE == 0 && range.len % HUGE_PAGE_SIZE == 0,
                    "{range:?}"
                );
            }
        }
        assert_eq!(r.conversions_4k + r.conversions_other, 0);
    }
    assert_eq!(plat.violations(), Vec::<String>::new());
    drop(pool);
    assert_clean(&plat);
}

fn workload() -> impl Strategy<Value = Vec<Vec<Op>>> {
    proptest::collection::vec(proptest::collection::vec(op(5), 1..60), 1..=3)
}

/// Mostly maps: the pools run full.
fn pressure() -> impl Strategy<Value = Vec<Vec<Op>>> {
    proptest::collection::vec(proptest::collection::vec(op(16), 20..60), 2..=3)
}

proptest! {
    // More cases for a soak: SWIOTLB_CASES=500 cargo test --release -p swiotlb model_
    #![proptest_config(ProptestConfig {
        cases: std::env::var("SWIOTLB_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn model_legacy(w in workload()) {
        run_model("policy=legacy pool=4M cpus=4", w, 6, false);
    }

    #[test]
    fn model_legacy_tiny(w in workload()) {
        run_model("policy=legacy pool=512K cpus=2", w, 8, false);
    }

    #[test]
    fn model_throttle(w in workload()) {
        run_model("policy=throttle pool=512K cpus=2 wait_ms=20", w, 4, false);
    }

    #[test]
    fn model_dynamic(w in workload()) {
        run_model("policy=dynamic pool=512K grow=1M max_pools=4 shrink_ms=1 cpus=2", w, 10, true);
    }

    #[test]
    fn model_refill(w in workload()) {
        run_model("policy=refill pool=4M batch=1M cpus=2", w, 6, true);
    }

    #[test]
    fn model_dynamic_pressure(w in pressure()) {
        run_model("policy=dynamic pool=512K grow=1M max_pools=3 shrink_ms=1 cpus=2", w, 16, true);
    }

    #[test]
    fn model_aligned_2m_pressure(w in pressure()) {
        run_model("policy=aligned-2m pool=2M grow=2M max_pools=3 shrink_ms=1 cpus=4", w, 16, true);
    }

    #[test]
    fn model_adaptive(w in workload()) {
        run_model("policy=adaptive soft=4M lowat=512K reserve=256K hold_ms=1 wait_ms=20 cpus=4", w, 16, true);
    }

    #[test]
    fn model_adaptive_pressure(w in pressure()) {
        run_model("policy=adaptive soft=2M max=6M lowat=512K reserve=256K hold_ms=1 wait_ms=2 cpus=2", w, 16, true);
    }

    #[test]
    fn model_aligned_2m(w in workload()) {
        run_model("policy=aligned-2m pool=2M grow=2M max_pools=3 shrink_ms=1 cpus=4", w, 16, true);
    }
}

// ---------------------------------------------------------------------------------------------
// Per-policy behaviour.

/// Map `len` bytes of a leaked buffer (tests that only care about the pool).
fn map_scratch(pool: &dyn Policy, len: usize, may_block: bool) -> Result<u64, MapError> {
    let buf: &'static mut [u8] = Vec::leak(vec![7u8; len]);
    // SAFETY: the buffer is leaked, hence valid forever.
    unsafe { pool.map(buf.as_ptr() as u64, len, Direction::ToDevice, may_block) }
}

#[test]
fn legacy_converts_once_and_fails_when_full() {
    let plat = HostPlatform::new(128 << 20);
    let pool = build(&plat, "policy=legacy pool=1M cpus=3");
    let log = plat.conversions();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].ranges.len(), 1);
    assert!(log[0].to_shared && log[0].ranges[0].len == MIB);
    let mut live = Vec::new();
    while let Ok(b) = map_scratch(&pool, 64 << 10, false) {
        live.push(b);
    }
    assert_eq!(live.len(), 16);
    let r = pool.report();
    assert_eq!(
        (
            r.maps,
            r.map_failures,
            r.used_bytes,
            r.high_water_bytes,
            r.capacity_bytes
        ),
        (16, 1, MIB, MIB, MIB)
    );
    assert_eq!(map_scratch(&pool, 1, true), Err(MapError::NoSpace));
    for b in live {
        pool.unmap(b, 64 << 10, Direction::ToDevice).unwrap();
    }
    assert_eq!(pool.report().used_bytes, 0);
    assert_eq!(
        map_scratch(&pool, SEGMENT_BYTES + 1, false),
        Err(MapError::TooLarge)
    );
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn legacy_default_size_and_2m_host() {
    let plat = HostPlatform::new(256 << 20);
    // 6% of 1 GiB is below the 64 MiB floor.
    let cfg = Config::new(PolicyKind::Legacy, 1 << 30, 2);
    let pool = AnyPolicy::new(&cfg, &plat).unwrap();
    assert_eq!(pool.report().capacity_bytes, 64 * MIB);
    drop(pool);
    // A pool that is not a 2 MiB multiple cannot be converted on a 2M host.
    plat.set_require_2m(true);
    let cfg = Config::parse("policy=legacy pool=1M").unwrap();
    assert!(matches!(
        AnyPolicy::new(&cfg, &plat),
        Err(BuildError::Conversion(ConvError::Host(ERR_REQUIRES_2M)))
    ));
    assert_clean(&plat);
}

#[test]
fn unmap_copies_back_and_syncs() {
    let plat = HostPlatform::new(64 << 20);
    for kind in PolicyKind::ALL {
        let text = std::format!("policy={} pool=2M", kind.name());
        let pool = build(&plat, &text);
        let mut buf = vec![1u8; 10000];
        let orig = buf.as_mut_ptr() as u64;
        // SAFETY: `buf` outlives the mapping.
        let b = unsafe { pool.map(orig, 10000, Direction::Bidirectional, false) }.unwrap();
        assert!(bytes_at(b, 10000).iter().all(|&x| x == 1));
        write_at(b + 100, &[9u8; 50]);
        pool.sync_for_cpu(b + 100, 50).unwrap();
        assert_eq!(
            buf[99..151],
            [[1u8].as_slice(), &[9u8; 50], &[1u8]].concat()[..]
        );
        buf[0] = 5;
        pool.sync_for_device(b, 1).unwrap();
        assert_eq!(bytes_at(b, 1), [5]);
        assert_eq!(pool.sync_for_cpu(b + 9990, 20), Err(MapError::Mismatch));
        write_at(b + 9999, &[3]);
        pool.unmap(b, 10000, Direction::Bidirectional).unwrap();
        assert_eq!(buf[9999], 3);
        // FromDevice without prefill leaves the bounce buffer alone at map.
        drop(pool);
        let pool = build(&plat, &std::format!("{text} prefill=0"));
        let mut buf = vec![2u8; 100];
        // SAFETY: `buf` outlives the mapping.
        let b = unsafe { pool.map(buf.as_mut_ptr() as u64, 100, Direction::FromDevice, false) }
            .unwrap();
        write_at(b, &[4u8; 100]);
        pool.sync_for_device(b, 100).unwrap();
        assert_eq!(bytes_at(b, 100), [4u8; 100]);
        pool.unmap(b, 100, Direction::FromDevice).unwrap();
        assert_eq!(buf, [4u8; 100]);
        drop(pool);
        assert_clean(&plat);
    }
}

#[test]
fn bad_calls_are_refused_and_counted() {
    let plat = HostPlatform::new(64 << 20);
    for kind in PolicyKind::ALL {
        let pool = build(&plat, &std::format!("policy={} pool=2M", kind.name()));
        let b = map_scratch(&pool, 3000, false).unwrap();
        let c = pool.alloc_coherent(100).unwrap();
        assert_eq!(
            pool.unmap(b + 1, 3000, Direction::ToDevice),
            Err(MapError::NotMapped)
        );
        assert_eq!(
            pool.unmap(b, 2999, Direction::ToDevice),
            Err(MapError::Mismatch)
        );
        assert_eq!(
            pool.unmap(c, 100, Direction::ToDevice),
            Err(MapError::NotMapped)
        );
        assert_eq!(
            pool.unmap(u64::MAX - 10, 100, Direction::ToDevice),
            Err(MapError::NotMapped)
        );
        assert_eq!(pool.free_coherent(b, 3000), Err(MapError::NotMapped));
        assert_eq!(pool.free_coherent(c, 99), Err(MapError::Mismatch));
        assert_eq!(pool.sync_for_cpu(0, 1), Err(MapError::NotMapped));
        pool.unmap(b, 3000, Direction::ToDevice).unwrap();
        assert_eq!(
            pool.unmap(b, 3000, Direction::ToDevice),
            Err(MapError::NotMapped),
            "double unmap"
        );
        pool.free_coherent(c, 100).unwrap();
        assert_eq!(
            pool.free_coherent(c, 100),
            Err(MapError::NotMapped),
            "double free"
        );
        // SAFETY: zero length / wrapping ranges are refused before any copy.
        unsafe {
            assert_eq!(
                pool.map(0x1000, 0, Direction::ToDevice, false),
                Err(MapError::InvalidArgument)
            );
            assert_eq!(
                pool.map(u64::MAX - 5, 10, Direction::ToDevice, false),
                Err(MapError::InvalidArgument)
            );
            assert_eq!(
                pool.map_with(
                    0x1000,
                    1,
                    Direction::ToDevice,
                    MapOpts::new(false).min_align(0x1001)
                ),
                Err(MapError::InvalidArgument)
            );
        }
        assert_eq!(pool.extra_stats().bad_calls, 9, "{}", kind.name());
        assert_eq!(pool.report().map_failures, 3);
        drop(pool);
        assert_clean(&plat);
    }
}

#[test]
fn throttle_blocking_maps_wait_instead_of_failing() {
    let plat = HostPlatform::new(64 << 20);
    let pool = build(&plat, "policy=throttle pool=1M wait_ms=5000");
    // Fill the pool completely with non-blocking maps.
    let mut held = Vec::new();
    while let Ok(b) = map_scratch(&pool, 32 << 10, false) {
        held.push(b);
    }
    assert_eq!(held.len(), 32);
    let failures = pool.report().map_failures;
    let done = AtomicU64::new(0);
    let started = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            HostPlatform::set_cpu(1);
            started.store(true, Ordering::SeqCst);
            // Blocking maps: must all succeed once the holder lets go.
            for _ in 0..8 {
                let b = map_scratch(&pool, 32 << 10, true).expect("blocking map failed");
                done.fetch_add(1, Ordering::Relaxed);
                pool.unmap(b, 32 << 10, Direction::ToDevice).unwrap();
            }
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(done.load(Ordering::Relaxed), 0, "waited");
        for b in held.drain(..) {
            pool.unmap(b, 32 << 10, Direction::ToDevice).unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
    });
    let r = pool.report();
    assert_eq!(r.map_failures, failures);
    assert!(r.throttle_waits >= 1);
    assert!(r.throttle_wait_ns >= 5_000_000, "{}", r.throttle_wait_ns);
    assert_eq!(r.used_bytes, 0);
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn throttle_semaphore_hysteresis_and_timeout() {
    let plat = HostPlatform::new(64 << 20);
    let pool = build(&plat, "policy=throttle pool=1M wait_ms=10000");
    // 23 x 32 KiB = 71.9% of 1 MiB: above the high threshold.
    let held: Vec<u64> = (0..23)
        .map(|_| map_scratch(&pool, 32 << 10, false).unwrap())
        .collect();
    // This one takes the semaphore (no wait: it is free).
    let first = map_scratch(&pool, 4096, true).unwrap();
    assert_eq!(pool.report().throttle_waits, 0);
    let second_done = AtomicBool::new(false);
    let started = AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            started.store(true, Ordering::SeqCst);
            let b = map_scratch(&pool, 4096, true).unwrap();
            second_done.store(true, Ordering::SeqCst);
            pool.unmap(b, 4096, Direction::ToDevice).unwrap();
        });
        while !started.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(30));
        // Room is plentiful, but the semaphore is held: the second waits.
        assert!(!second_done.load(Ordering::SeqCst));
        pool.unmap(first, 4096, Direction::ToDevice).unwrap();
    });
    assert!(second_done.load(Ordering::SeqCst));
    let r = pool.report();
    assert_eq!(r.throttle_waits, 1);
    assert!(r.throttle_wait_ns >= 5_000_000);
    for b in held {
        pool.unmap(b, 32 << 10, Direction::ToDevice).unwrap();
    }
    drop(pool);

    // Bounded: with the pool full and nobody releasing, a blocking map gives up.
    let pool = build(&plat, "policy=throttle pool=256K wait_ms=20");
    let held: Vec<u64> = (0..4)
        .map(|_| map_scratch(&pool, 64 << 10, false).unwrap())
        .collect();
    let t = std::time::Instant::now();
    assert_eq!(map_scratch(&pool, 4096, true), Err(MapError::TimedOut));
    assert!(t.elapsed() >= Duration::from_millis(20));
    assert_eq!(map_scratch(&pool, 4096, false), Err(MapError::NoSpace));
    let (r, x) = (pool.report(), pool.extra_stats());
    assert_eq!(
        (r.map_failures, x.throttle_timeouts, r.throttle_waits),
        (2, 1, 1)
    );
    for b in held {
        pool.unmap(b, 64 << 10, Direction::ToDevice).unwrap();
    }
    // The semaphore was given back on the timeout: a blocking map goes straight through.
    let b = map_scratch(&pool, 4096, true).unwrap();
    pool.unmap(b, 4096, Direction::ToDevice).unwrap();
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn dynamic_transient_then_growth_then_shrink() {
    let plat = HostPlatform::new(128 << 20);
    let pool = build(&plat, "policy=dynamic pool=256K grow=1M shrink_ms=5");
    let AnyPolicy::Dynamic(d) = &pool else {
        unreachable!()
    };
    let held: Vec<u64> = (0..4)
        .map(|_| map_scratch(&pool, 64 << 10, false).unwrap())
        .collect();
    let before = plat.conversions().len();
    // Full: served by a transient buffer of exactly its (page-rounded) size.
    let mut buf = vec![6u8; 5000];
    // SAFETY: `buf` outlives the mapping.
    let t = unsafe {
        pool.map(
            buf.as_mut_ptr() as u64,
            5000,
            Direction::Bidirectional,
            false,
        )
    }
    .unwrap();
    assert!(plat.is_shared(t, 5000));
    let log = plat.conversions();
    assert_eq!(log.len(), before + 1);
    assert_eq!(log[before].ranges, vec![Range::new(t & !4095, 8192)]);
    assert_eq!(pool.report().transient_maps, 1);
    write_at(t, &[8u8; 5000]);
    // Growth happens in the background step.
    assert_eq!(d.pools(), 1);
    assert!(pool.background_work());
    assert_eq!(d.pools(), 2);
    assert_eq!(pool.report().grow_events, 1);
    assert_eq!(pool.report().capacity_bytes, 256 * 1024 + MIB);
    let in_pool = map_scratch(&pool, 64 << 10, false).unwrap();
    assert_eq!(pool.report().transient_maps, 1);
    // The transient buffer is converted back at unmap, after the copy back.
    pool.unmap(t, 5000, Direction::Bidirectional).unwrap();
    assert_eq!(buf, vec![8u8; 5000]);
    assert!(!plat.is_shared(t & !4095, 4096));
    pool.unmap(in_pool, 64 << 10, Direction::ToDevice).unwrap();
    // The grown pool is idle: freed after shrink_ms; the boot pool stays.
    std::thread::sleep(Duration::from_millis(10));
    assert!(pool.background_work());
    assert_eq!(d.pools(), 1);
    let r = pool.report();
    assert_eq!((r.shrink_events, r.capacity_bytes), (1, 256 * 1024));
    assert!(!pool.background_work());
    for b in held {
        pool.unmap(b, 64 << 10, Direction::ToDevice).unwrap();
    }
    assert_eq!(pool.report().used_bytes, 0);
    assert_conversions_counted(&plat, &pool);
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn dynamic_transient_failure_is_clean() {
    let plat = HostPlatform::new(64 << 20);
    let pool = build(&plat, "policy=dynamic pool=256K transient_max=1");
    let held = map_scratch(&pool, SEGMENT_BYTES, false).unwrap();
    plat.fail_next_converts(1);
    assert_eq!(
        map_scratch(&pool, 100, false),
        Err(MapError::Conversion(ConvError::Host(ERR_NO_MEMORY)))
    );
    let t = map_scratch(&pool, 100, false).unwrap();
    assert_eq!(map_scratch(&pool, 100, false), Err(MapError::TableFull));
    assert_eq!(pool.report().map_failures, 2);
    pool.unmap(t, 100, Direction::ToDevice).unwrap();
    pool.unmap(held, SEGMENT_BYTES, Direction::ToDevice)
        .unwrap();
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn refill_classes_watermarks_and_batches() {
    let plat = HostPlatform::new(256 << 20);
    let pool = build(&plat, "policy=refill wm=4,8,8,4,2 batch=64K");
    let AnyPolicy::Refill(rf) = &pool else {
        unreachable!()
    };
    // Boot fill: every class at least at its watermark, converted in one call.
    assert_eq!(plat.conversions().len(), 1);
    let free = rf.free_buffers();
    for (f, w) in free.iter().zip(rf.watermarks()) {
        assert!(*f >= w, "{free:?}");
    }
    assert_eq!(pool.report().grow_events, 0);
    // Smallest fitting class.
    let a = map_scratch(&pool, 512, false).unwrap();
    assert_eq!(rf.free_buffers()[0], free[0] - 1);
    // Larger than the largest class.
    assert_eq!(
        map_scratch(&pool, (512 << 10) + 1, false),
        Err(MapError::TooLarge)
    );
    // Drain the 512 KiB class (2 buffers): then maps of that size fail.
    let big: Vec<u64> = (0..free[4])
        .map(|_| map_scratch(&pool, 300 << 10, false).unwrap())
        .collect();
    assert_eq!(map_scratch(&pool, 300 << 10, false), Err(MapError::NoSpace));
    assert_eq!(pool.report().map_failures, 2);
    // An empty 16 KiB class falls through to the 512 KiB one.
    let mids: Vec<u64> = (0..free[3])
        .map(|_| map_scratch(&pool, 10 << 10, false).unwrap())
        .collect();
    for b in big {
        pool.unmap(b, 300 << 10, Direction::ToDevice).unwrap();
    }
    let spill = map_scratch(&pool, 10 << 10, false).unwrap();
    assert_eq!(rf.free_buffers()[4], free[4] - 1);
    // Below half the watermark: background refills, one conversion (one range) per batch.
    let n = plat.conversions().len();
    assert!(pool.background_work());
    let log = plat.conversions();
    assert_eq!(log.len(), n + 1);
    assert_eq!(log[n].ranges.len(), 1);
    assert!(log[n].to_shared);
    while pool.background_work() {}
    let now = rf.free_buffers();
    for (f, w) in now.iter().zip(rf.watermarks()) {
        assert!(*f >= w, "{now:?}");
    }
    assert!(pool.report().grow_events >= 1);
    for b in mids {
        pool.unmap(b, 10 << 10, Direction::ToDevice).unwrap();
    }
    pool.unmap(spill, 10 << 10, Direction::ToDevice).unwrap();
    pool.unmap(a, 512, Direction::ToDevice).unwrap();
    assert_eq!(pool.report().used_bytes, 0);
    assert_conversions_counted(&plat, &pool);
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn refill_default_watermarks_are_the_rfcs() {
    let plat = HostPlatform::new(160 << 20);
    let cfg = Config::new(PolicyKind::Refill, 4 << 30, 2);
    let pool = AnyPolicy::new(&cfg, &plat).unwrap();
    let AnyPolicy::Refill(rf) = &pool else {
        unreachable!()
    };
    assert_eq!(rf.watermarks(), [256, 16384, 8192, 1024, 32]);
    let cap = pool.report().capacity_bytes;
    // ~96 MiB (the 512 B class fills one 128 KiB batch).
    assert!((96 * MIB..=100 * MIB).contains(&cap), "{cap}");
    // Few calls: 32 batches per conversion call.
    assert!(plat.conversions().len() <= 2);
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn aligned_2m_only_2m_conversions_and_coherent_from_pool() {
    let plat = HostPlatform::new(128 << 20);
    plat.set_require_2m(true);
    let pool = build(&plat, "policy=aligned-2m pool=2M grow=2M cpus=2");
    let AnyPolicy::Aligned2m(a) = &pool else {
        unreachable!()
    };
    assert_eq!(pool.report().flags, memconv::abi::POOL_FLAG_CLAIMS_2M);
    let conv = plat.conversions().len();
    // Coherent memory comes from the pool: no conversion.
    let ring = pool.alloc_coherent(8192).unwrap();
    assert_eq!(plat.conversions().len(), conv);
    // Fill the boot pool; a non-blocking map then fails and schedules growth.
    let mut held = Vec::new();
    while let Ok(b) = map_scratch(&pool, 128 << 10, false) {
        held.push(b);
    }
    assert!(pool.background_work());
    assert_eq!(a.pools(), 2);
    // A blocking map grows inline when full.
    while let Ok(b) = map_scratch(&pool, 128 << 10, false) {
        held.push(b);
    }
    held.push(map_scratch(&pool, 128 << 10, true).unwrap());
    assert_eq!(a.pools(), 3);
    // Large coherent allocations take whole 2 MiB units.
    let big = pool.alloc_coherent(3 << 20).unwrap();
    assert_eq!(big % HUGE_PAGE_SIZE, 0);
    for rec in plat.conversions() {
        assert!(rec.ok);
        for r in &rec.ranges {
            assert!(r.addr % HUGE_PAGE_SIZE == 0 && r.len % HUGE_PAGE_SIZE == 0);
        }
    }
    pool.free_coherent(big, 3 << 20).unwrap();
    pool.free_coherent(ring, 8192).unwrap();
    for b in held {
        pool.unmap(b, 128 << 10, Direction::ToDevice).unwrap();
    }
    let r = pool.report();
    assert_eq!(
        (r.conversions_4k, r.conversions_other, r.grow_events),
        (0, 0, 2)
    );
    assert_eq!(pool.extra_stats().refused_conversions, 0);
    assert_conversions_counted(&plat, &pool);
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn converter_refuses_non_2m() {
    let plat = HostPlatform::new(16 << 20);
    let stats = Stats::new();
    let conv = Converter::new(&plat, true);
    let page = plat.alloc_pages(4 << 20, 2 << 20).unwrap();
    assert_eq!(
        conv.convert(&stats, &[Range::new(page, 4096)], true),
        Err(ConvError::Refused)
    );
    assert_eq!(
        conv.convert(
            &stats,
            &[
                Range::new(page, 2 << 20),
                Range::new(page + (2 << 20), 4096)
            ],
            true
        ),
        Err(ConvError::Refused)
    );
    assert!(plat.conversions().is_empty(), "nothing reached the host");
    assert_eq!(stats.extra().refused_conversions, 2);
    // A failure half way through a batch is undone.
    plat.set_require_2m(true);
    let conv4k = Converter::new(&plat, false);
    let ranges = [
        Range::new(page, 2 << 20),
        Range::new(page + (2 << 20), 8192),
    ];
    assert_eq!(
        conv4k.convert(&stats, &ranges, true),
        Err(ConvError::Host(ERR_REQUIRES_2M))
    );
    assert_eq!(plat.shared_bytes(), 0);
    assert_eq!(stats.report("x", 0).shared_bytes, 0);
    plat.free_pages(page, 4 << 20);
    assert_clean(&plat);
}

#[test]
fn build_failures_leave_nothing_behind() {
    let plat = HostPlatform::new(16 << 20);
    for kind in PolicyKind::ALL {
        plat.fail_next_converts(1);
        let cfg = Config::parse(&std::format!("policy={} pool=2M", kind.name())).unwrap();
        assert!(
            matches!(AnyPolicy::new(&cfg, &plat), Err(BuildError::Conversion(_))),
            "{}",
            kind.name()
        );
        let cfg = Config::parse(&std::format!("policy={} pool=64M", kind.name())).unwrap();
        assert!(AnyPolicy::new(&cfg, &plat).is_err(), "{}", kind.name());
        assert_clean(&plat);
    }
}

#[test]
fn external_policy_plugs_in() {
    /// A deliberately broken policy: hands out private memory and never copies.
    struct Broken(AtomicU64);
    impl Policy for Broken {
        fn name(&self) -> &'static str {
            "broken"
        }
        unsafe fn map_with(
            &self,
            orig: u64,
            _len: usize,
            _dir: Direction,
            _o: MapOpts,
        ) -> Result<u64, MapError> {
            self.0.fetch_add(1, Ordering::Relaxed);
            Ok(orig)
        }
        fn unmap(&self, _b: u64, _l: usize, _d: Direction) -> Result<(), MapError> {
            Ok(())
        }
        fn sync_for_device(&self, _b: u64, _l: usize) -> Result<(), MapError> {
            Ok(())
        }
        fn sync_for_cpu(&self, _b: u64, _l: usize) -> Result<(), MapError> {
            Ok(())
        }
        fn alloc_coherent(&self, _l: usize) -> Result<u64, MapError> {
            Err(MapError::NoMemory)
        }
        fn free_coherent(&self, _a: u64, _l: usize) -> Result<(), MapError> {
            Err(MapError::NotMapped)
        }
        fn background_work(&self) -> bool {
            false
        }
        fn report(&self) -> memconv::abi::PoolReport {
            let s = Stats::new();
            s.map_ok(0);
            s.report(self.name(), memconv::abi::POOL_FLAG_CLAIMS_2M)
        }
        fn max_mapping_size(&self) -> usize {
            usize::MAX
        }
    }
    let b = Broken(AtomicU64::new(0));
    let p: &dyn Policy = &b;
    assert_eq!(
        // SAFETY: the broken policy never dereferences.
        unsafe { p.map(0x5000, 10, Direction::ToDevice, true) },
        Ok(0x5000)
    );
    assert_eq!(p.report().maps, 1);
}
