//! Every line shape of the shared traces, the trace-cmd report shapes, and malformed lines.

use super::*;

const MAP: &str = "              dd-338     [001] d..1.     5.913391: dma_map_page: 0000:00:01.0 dir=FROM_DEVICE dma_addr=3ca07000 size=4096 phys_addr=5263000 attrs=";

#[test]
fn tracefs_map_with_irqs_off() {
    let e = parse_line(MAP).unwrap();
    assert_eq!(e.cpu, 1);
    assert_eq!(e.ts_ns, 5_913_391_000);
    assert_eq!(e.device, "0000:00:01.0");
    assert_eq!(e.dir, Dir::FromDevice);
    assert!(e.ctx.irqs_off && !e.ctx.hardirq && !e.ctx.softirq);
    assert!(!e.ctx.may_block());
    assert_eq!(
        e.kind,
        Kind::Map {
            dma_addr: 0x3ca0_7000,
            size: 4096
        }
    );
}

#[test]
fn tracefs_unmap_in_hardirq() {
    let l = "          insmod-186     [000] d.h1.     2.841232: dma_unmap_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=3aa02800 size=48 attrs=";
    let e = parse_line(l).unwrap();
    assert!(e.ctx.hardirq && !e.ctx.may_block());
    assert_eq!(
        e.kind,
        Kind::Unmap {
            dma_addr: 0x3aa0_2800,
            size: 48
        }
    );
}

#[test]
fn tracefs_softirq_and_preemptible() {
    let l = "         wget-415     [001] ..s..    10.565307: dma_map_page: 0000:00:03.0 dir=FROM_DEVICE dma_addr=3db95000 size=1536 phys_addr=13696600 attrs=";
    let e = parse_line(l).unwrap();
    assert!(e.ctx.softirq && !e.ctx.irqs_off && !e.ctx.may_block());
    let l = "         dd-338     [000] .....     5.913391: dma_map_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=3aa00000 size=16 phys_addr=1 attrs=";
    assert!(parse_line(l).unwrap().ctx.may_block());
    // `H`: hard interrupt inside a soft one.
    let l = "  <idle>-0  [000] d.H2.  1.000000: dma_unmap_page: 0000:00:03.0 dir=TO_DEVICE dma_addr=1 size=66 attrs=";
    let e = parse_line(l).unwrap();
    assert!(e.ctx.hardirq && e.ctx.softirq);
}

#[test]
fn tracefs_alloc_bounced_and_marker() {
    let l = "          insmod-185     [000] .....     2.800124: dma_alloc: 0000:00:03.0 dir=BIDIRECTIONAL dma_addr=4b3a000 size=6726 virt_addr=(____ptrval____) flags=GFP_KERNEL|__GFP_NOWARN|__GFP_ZERO attrs=NO_WARN";
    let e = parse_line(l).unwrap();
    assert_eq!(e.dir, Dir::Bidirectional);
    assert_eq!(
        e.kind,
        Kind::Alloc {
            dma_addr: 0x4b3a000,
            size: 6726
        }
    );
    let l = "          insmod-186     [000] d..1.     2.839946: swiotlb_bounced: dev_name: 0000:00:01.0 dma_mask=ffffffffffffffff dev_addr=1878c0f8 size=16 FORCE";
    let e = parse_line(l).unwrap();
    assert_eq!(e.device, "0000:00:01.0");
    assert_eq!(e.kind, Kind::Bounced { size: 16 });
    let l = "            init-1       [001] .....     2.722353: tracing_mark_write: LT BEGIN probe";
    assert_eq!(parse_line(l).unwrap().kind, Kind::Marker("LT BEGIN probe"));
    let l = "  insmod-185 [000] ..... 3.0: dma_free: 0000:00:03.0 dir=BIDIRECTIONAL dma_addr=4b3a000 size=6726 virt_addr=(____ptrval____) attrs=";
    assert!(matches!(
        parse_line(l).unwrap().kind,
        Kind::Free { size: 6726, .. }
    ));
}

#[test]
fn later_kernel_names_sg_and_sync() {
    let l = "  fio-9 [001] d..1. 1.000001: dma_map_phys: 0000:00:01.0 dir=TO_DEVICE dma_addr=3aa00000 size=16 phys_addr=1 attrs=";
    assert!(matches!(
        parse_line(l).unwrap().kind,
        Kind::Map { size: 16, .. }
    ));
    let l = "  fio-9 [001] d..1. 1.000002: dma_unmap_phys: 0000:00:01.0 dir=TO_DEVICE dma_addr=3aa00000 size=16 attrs=";
    assert!(matches!(
        parse_line(l).unwrap().kind,
        Kind::Unmap { size: 16, .. }
    ));
    let l = "  fio-9 [001] d..1. 1.000003: dma_map_sg: 0000:00:01.0 dir=FROM_DEVICE nents=2/2 ents=2/2 dma_addrs={0x3aa00000,0x3aa01000} sizes={4096,512} phys_addrs={0x100000,0x200000} attrs=";
    match parse_line(l).unwrap().kind {
        Kind::MapSg {
            dma_addrs,
            sizes,
            phys_addrs,
        } => {
            assert_eq!(dma_addrs, vec![0x3aa0_0000, 0x3aa0_1000]);
            assert_eq!(sizes, vec![4096, 512]);
            assert_eq!(phys_addrs, vec![0x10_0000, 0x20_0000]);
        }
        k => panic!("{k:?}"),
    }
    let l = "  fio-9 [001] d..1. 1.000004: dma_unmap_sg: 0000:00:01.0 dir=FROM_DEVICE phys_addrs={0x100000,0x200000} attrs=";
    assert!(matches!(parse_line(l).unwrap().kind, Kind::UnmapSg { .. }));
    let l = "  fio-9 [001] d..1. 1.000005: dma_sync_single_for_cpu: 0000:00:01.0 dir=FROM_DEVICE dma_addr=3aa00000 size=16";
    assert!(matches!(
        parse_line(l).unwrap().kind,
        Kind::Sync {
            for_device: false,
            ..
        }
    ));
    let l = "  fio-9 [001] d..1. 1.000006: dma_sync_sg_for_device: 0000:00:01.0 dir=TO_DEVICE dma_addrs={0x3aa00000} sizes={16}";
    assert!(matches!(
        parse_line(l).unwrap().kind,
        Kind::SyncSg {
            for_device: true,
            ..
        }
    ));
    let l = "  fio-9 [001] d..1. 1.000007: dma_map_resource: 0000:00:01.0 dir=TO_DEVICE dma_addr=1 size=16 phys_addr=1 attrs=";
    assert_eq!(parse_line(l).unwrap().kind, Kind::NoSlot);
}

#[test]
fn trace_cmd_report_shapes() {
    // Default report: [cpu] then timestamp, padded event name.
    let l = "          insmod-186   [000]     2.840400: dma_map_page:         0000:00:01.0 dir=TO_DEVICE dma_addr=3aa00000 size=16 phys_addr=1878c0f8 attrs=";
    let e = parse_line(l).unwrap();
    assert!(!e.ctx.known && e.ctx.may_block());
    assert_eq!(e.ts_ns, 2_840_400_000);
    assert!(matches!(e.kind, Kind::Map { size: 16, .. }));
    // Report with the flags column (trace-cmd 3.x) and nanosecond timestamps.
    let l = "  insmod-186   [000] d..1.  2.840400123: dma_map_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=3aa00000 size=16 phys_addr=1878c0f8 attrs=";
    let e = parse_line(l).unwrap();
    assert!(e.ctx.irqs_off);
    assert_eq!(e.ts_ns, 2_840_400_123);
    // `report -l`: the CPU and flags as one latency word.
    let l = "  insmod-186     0d.h1  2.841232: dma_unmap_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=3aa02800 size=48 attrs=";
    let e = parse_line(l).unwrap();
    assert_eq!(e.cpu, 0);
    assert!(e.ctx.hardirq);
    // A task name with spaces and dashes; `system:event` naming.
    let l = "  kworker/u4:2-my task-77 [001] ..s.. 3.5: dma:dma_unmap_page: 0000:00:03.0 dir=FROM_DEVICE dma_addr=10 size=1536 attrs=";
    let e = parse_line(l).unwrap();
    assert_eq!(e.cpu, 1);
    assert!(matches!(e.kind, Kind::Unmap { size: 1536, .. }));
}

#[test]
fn noise_and_lost_events() {
    for l in [
        "# tracer: nop",
        "#           TASK-PID     CPU#  |||||  TIMESTAMP  FUNCTION",
        "",
        "   ",
        "cpus=2",
        "version = 6",
        "CPU 1 is empty",
    ] {
        assert!(is_noise(l), "{l}");
    }
    assert!(!is_noise(MAP));
    assert_eq!(lost_events("CPU:1 [LOST 42 EVENTS]"), Some(42));
    assert_eq!(lost_events(MAP), None);
}

#[test]
fn malformed_lines() {
    // Unknown event.
    let l = "  dd-338 [001] d..1. 5.913391: sched_switch: prev=a next=b";
    assert_eq!(
        parse_line(l),
        Err(LineError::UnknownEvent("sched_switch".into()))
    );
    // Cut short at several places.
    for cut in [20, 40, 60, 80, 100, 120, 140, MAP.len() - 7] {
        let r = parse_line(&MAP[..cut]);
        assert!(r.is_err(), "cut at {cut}: {r:?}");
    }
    assert_eq!(
        parse_line(&MAP[..MAP.len() - 6]),
        Err(LineError::Missing {
            event: "dma_map_page",
            field: "attrs"
        })
    );
    // No prefix at all.
    assert_eq!(parse_line("hello world"), Err(LineError::NoPrefix));
    // Bad values.
    let l = "  dd-338 [001] d..1. 5.9: dma_map_page: 0000:00:01.0 dir=SIDEWAYS dma_addr=3 size=4 phys_addr=1 attrs=";
    assert!(matches!(
        parse_line(l),
        Err(LineError::BadValue { field: "dir", .. })
    ));
    let l = "  dd-338 [001] d..1. 5.9: dma_map_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=zz size=4 phys_addr=1 attrs=";
    assert!(matches!(
        parse_line(l),
        Err(LineError::BadValue {
            field: "dma_addr",
            ..
        })
    ));
    let l = "  dd-338 [001] d..1. 5.9: dma_map_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=3 size=-4 phys_addr=1 attrs=";
    assert!(matches!(
        parse_line(l),
        Err(LineError::BadValue { field: "size", .. })
    ));
    let l = "  dd-338 [001] d..1. 5.9: dma_map_sg: 0000:00:01.0 dir=TO_DEVICE nents=1/1 ents=1/1 dma_addrs={0x1,0x2} sizes={4} phys_addrs={0x1} attrs=";
    assert!(matches!(
        parse_line(l),
        Err(LineError::BadValue { field: "sizes", .. })
    ));
}
