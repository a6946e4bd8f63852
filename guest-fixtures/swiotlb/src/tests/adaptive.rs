//! Host tests of the `adaptive` policy: 2M-only conversions on a 2m host, growth ahead of
//! demand from background work, the reserve for maps that cannot block, bounded waits at the
//! soft cap, and the return of idle chunks after the hold time with hysteresis.

use super::{assert_clean, assert_conversions_counted, build, map_scratch};
use crate::build::AnyPolicy;
use crate::error::MapError;
use crate::host::HostPlatform;
use crate::policy::{Direction, Policy};
use memconv::abi::HUGE_PAGE_SIZE;
use std::time::Duration;

const MIB: u64 = 1 << 20;

fn adaptive<'a>(pool: &'a AnyPolicy<'_>) -> &'a crate::Adaptive<'a> {
    match pool {
        AnyPolicy::Adaptive(a) => a,
        _ => unreachable!("built with policy=adaptive"),
    }
}

/// Every conversion the host saw was 2 MiB aligned and sized, and succeeded.
fn assert_only_2m(plat: &HostPlatform) {
    for rec in plat.conversions() {
        assert!(rec.ok);
        for r in &rec.ranges {
            assert!(
                r.addr % HUGE_PAGE_SIZE == 0 && r.len % HUGE_PAGE_SIZE == 0,
                "{r:?}"
            );
        }
    }
}

fn unmap_all(pool: &dyn Policy, held: Vec<u64>, len: usize) {
    for b in held {
        pool.unmap(b, len, Direction::ToDevice).unwrap();
    }
}

#[test]
fn adaptive_starts_at_2m_and_grows_ahead_from_background_work() {
    let plat = HostPlatform::new(128 << 20);
    plat.set_require_2m(true);
    let pool = build(&plat, "policy=adaptive cpus=2 lowat=1M hold_ms=0");
    let a = adaptive(&pool);
    assert_eq!(a.capacity(), 2 * MIB);
    assert_eq!(pool.report().flags, memconv::abi::POOL_FLAG_CLAIMS_2M);
    // Coherent memory comes from the pool: no conversion.
    let conv = plat.conversions().len();
    let ring = pool.alloc_coherent(8192).unwrap();
    assert_eq!(plat.conversions().len(), conv);
    assert!(!pool.background_work(), "plenty free: nothing to do");
    // Take the boot chunk down to under 1 MiB free: the worker adds one chunk, ahead of any
    // failure.
    let mut held = Vec::new();
    for _ in 0..5 {
        held.push(map_scratch(&pool, 256 << 10, false).unwrap());
    }
    assert!(a.free() < MIB);
    assert!(pool.background_work());
    assert_eq!((a.pools(), a.capacity()), (2, 4 * MIB));
    assert!(!pool.background_work(), "above the low watermark again");
    assert_eq!(pool.report().map_failures, 0);
    // Large coherent allocations take whole 2 MiB units.
    let big = pool.alloc_coherent(3 << 20).unwrap();
    assert_eq!(big % HUGE_PAGE_SIZE, 0);
    pool.free_coherent(big, 3 << 20).unwrap();
    pool.free_coherent(ring, 8192).unwrap();
    unmap_all(&pool, held, 256 << 10);
    assert_only_2m(&plat);
    let r = pool.report();
    assert_eq!((r.conversions_4k, r.conversions_other), (0, 0));
    assert_eq!(pool.extra_stats().refused_conversions, 0);
    assert_conversions_counted(&plat, &pool);
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn adaptive_keeps_room_for_maps_that_cannot_block() {
    let plat = HostPlatform::new(64 << 20);
    // Soft cap = the boot chunk: blocking maps may not grow, only wait (briefly here).
    let pool = build(
        &plat,
        "policy=adaptive pool=2M soft=2M reserve=512K wait_ms=20 hold_ms=0 cpus=1",
    );
    let a = adaptive(&pool);
    let mut held = Vec::new();
    // Blocking maps stop 512 KiB short of full: 6 x 256 KiB fit (1.5 MiB), the 7th would eat
    // into the reserve and waits, then gives the reserve up at the deadline and succeeds.
    for _ in 0..6 {
        held.push(map_scratch(&pool, 256 << 10, true).unwrap());
    }
    assert_eq!(pool.report().throttle_waits, 0);
    // The reserve serves maps that cannot block, with no conversion.
    let conv = plat.conversions().len();
    held.push(map_scratch(&pool, 256 << 10, false).unwrap());
    assert_eq!(plat.conversions().len(), conv);
    // One 256 KiB segment left: a blocking map waits the bound, then takes it.
    held.push(map_scratch(&pool, 256 << 10, true).unwrap());
    let r = pool.report();
    assert_eq!((r.throttle_waits, r.map_failures), (1, 0));
    assert!(r.throttle_wait_ns >= 20_000_000, "{}", r.throttle_wait_ns);
    // Full: a blocking map waits and times out; a non-blocking one fails at once.
    assert_eq!(
        map_scratch(&pool, 4096, true),
        Err(MapError::TimedOut),
        "full at the soft cap"
    );
    assert_eq!(map_scratch(&pool, 4096, false), Err(MapError::NoSpace));
    let r = pool.report();
    assert_eq!(
        (r.map_failures, pool.extra_stats().throttle_timeouts),
        (2, 1)
    );
    // The failed non-blocking map lets the worker grow past the soft cap.
    assert!(pool.background_work());
    assert_eq!(a.capacity(), 4 * MIB);
    held.push(map_scratch(&pool, 4096, false).unwrap());
    for b in held.drain(..held.len() - 1) {
        pool.unmap(b, 256 << 10, Direction::ToDevice).unwrap();
    }
    pool.unmap(held[0], 4096, Direction::ToDevice).unwrap();
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn adaptive_blocking_map_at_the_soft_cap_waits_for_an_unmap() {
    let plat = HostPlatform::new(64 << 20);
    let pool = build(
        &plat,
        "policy=adaptive pool=2M soft=2M reserve=0 wait_ms=2000 hold_ms=0 cpus=2",
    );
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(map_scratch(&pool, 256 << 10, true).unwrap());
    }
    let last = held.pop().unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            HostPlatform::set_cpu(1);
            std::thread::sleep(Duration::from_millis(30));
            pool.unmap(last, 256 << 10, Direction::ToDevice).unwrap();
        });
        held.push(map_scratch(&pool, 256 << 10, true).unwrap());
    });
    let r = pool.report();
    assert_eq!((r.throttle_waits, r.map_failures, r.grow_events), (1, 0, 0));
    assert_eq!(
        adaptive(&pool).capacity(),
        2 * MIB,
        "waited instead of growing"
    );
    unmap_all(&pool, held, 256 << 10);
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn adaptive_blocking_maps_grow_inline_below_the_soft_cap() {
    let plat = HostPlatform::new(64 << 20);
    plat.set_require_2m(true);
    let pool = build(&plat, "policy=adaptive soft=8M reserve=0 hold_ms=0 cpus=2");
    let mut held = Vec::new();
    // 24 x 256 KiB = 6 MiB with no worker at all: inline growth, no wait, no failure.
    for _ in 0..24 {
        held.push(map_scratch(&pool, 256 << 10, true).unwrap());
    }
    let r = pool.report();
    assert_eq!((r.map_failures, r.throttle_waits), (0, 0));
    assert_eq!(adaptive(&pool).capacity(), 6 * MIB);
    assert_only_2m(&plat);
    unmap_all(&pool, held, 256 << 10);
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn adaptive_returns_idle_chunks_after_the_hold_time_with_hysteresis() {
    let plat = HostPlatform::new(64 << 20);
    plat.set_require_2m(true);
    let pool = build(
        &plat,
        "policy=adaptive soft=16M reserve=0 lowat=1M hold_ms=50 cpus=1",
    );
    let a = adaptive(&pool);
    let mut held = Vec::new();
    for _ in 0..32 {
        held.push(map_scratch(&pool, 256 << 10, true).unwrap());
    }
    assert_eq!(a.capacity(), 8 * MIB);
    // Still busy: nothing returns, and background work grows ahead (free is 0).
    assert!(pool.background_work());
    assert_eq!(a.capacity(), 10 * MIB);
    unmap_all(&pool, held, 256 << 10);
    // Idle, but not for the hold time yet.
    assert!(!pool.background_work());
    assert_eq!(a.capacity(), 10 * MIB);
    std::thread::sleep(Duration::from_millis(60));
    // One chunk per step, while the free space left stays at least twice the low watermark.
    let mut steps = 0;
    while pool.background_work() {
        steps += 1;
        assert!(steps < 10);
    }
    assert_eq!(a.pools(), 1);
    assert_eq!(a.capacity(), 2 * MIB, "back to the boot chunk");
    assert_eq!(pool.report().shrink_events, 4);
    assert_only_2m(&plat);
    assert_eq!(plat.shared_bytes(), 2 * MIB);
    // A map after the shrink still works, and a refill does not flap: with 1.75 MiB free
    // above the 1 MiB watermark nothing grows.
    let b = map_scratch(&pool, 256 << 10, true).unwrap();
    assert!(!pool.background_work());
    pool.unmap(b, 256 << 10, Direction::ToDevice).unwrap();
    drop(pool);
    assert_clean(&plat);
}

#[test]
fn adaptive_hysteresis_keeps_a_chunk_above_the_low_watermark() {
    let plat = HostPlatform::new(64 << 20);
    let pool = build(
        &plat,
        "policy=adaptive soft=16M reserve=0 lowat=1M hold_ms=1 cpus=1",
    );
    let a = adaptive(&pool);
    // 3 MiB live in the boot chunk and a grown one (grown inline).
    let mut held = Vec::new();
    for _ in 0..12 {
        held.push(map_scratch(&pool, 256 << 10, true).unwrap());
    }
    assert_eq!(a.capacity(), 4 * MIB);
    // Free the last 1 MiB: the grown chunk is idle, but returning it would leave nothing
    // free, less than twice the low watermark: it stays.
    for b in held.drain(8..) {
        pool.unmap(b, 256 << 10, Direction::ToDevice).unwrap();
    }
    std::thread::sleep(Duration::from_millis(5));
    while pool.background_work() {}
    assert_eq!(a.capacity(), 4 * MIB);
    assert_eq!(pool.report().shrink_events, 0);
    unmap_all(&pool, held, 256 << 10);
    drop(pool);
    assert_clean(&plat);
}
