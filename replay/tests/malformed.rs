//! Whole-trace cases: the errors name their line, the kernel-tolerated oddities are counted
//! warnings, held-from-start mappings, gzip input and the swiotlb-stats reconciliation.

use std::io::Write;

use replay::line::LineError;
use replay::stream::PairError;
use replay::trace::{parse_text, TraceError};

fn map(ts: &str, addr: &str, size: u32, dir: &str) -> String {
    format!("  dd-1 [000] d..1. {ts}: dma_map_page: 0000:00:01.0 dir={dir} dma_addr={addr} size={size} phys_addr=1 attrs=\n")
}

fn unmap(ts: &str, addr: &str, size: u32, dir: &str) -> String {
    format!("  dd-1 [000] d.h1. {ts}: dma_unmap_page: 0000:00:01.0 dir={dir} dma_addr={addr} size={size} attrs=\n")
}

const HEADER: &str = "# tracer: nop\n#\n";

fn run(body: &str) -> Result<replay::stream::Pairing, TraceError> {
    let text = format!("{HEADER}{body}");
    parse_text("t", text.as_bytes(), &[]).map(|r| r.0)
}

fn line_of(e: &TraceError) -> u64 {
    match e {
        TraceError::Line { line, .. } | TraceError::Pair { line, .. } => *line,
        other => panic!("{other}"),
    }
}

#[test]
fn unknown_event_names_its_line() {
    let body = format!(
        "{}  dd-1 [000] ..... 1.5: block_rq_issue: 8,0 W\n",
        map("1.0", "10", 16, "TO_DEVICE")
    );
    let e = run(&body).unwrap_err();
    assert_eq!(line_of(&e), 4);
    assert!(
        e.to_string()
            .starts_with("t:4: unknown event `block_rq_issue`"),
        "{e}"
    );
}

#[test]
fn line_cut_short_names_its_line() {
    let full = map("1.0", "10", 16, "TO_DEVICE");
    let body = format!("{full}{}", &full[..full.len() - 20]);
    let e = run(&body).unwrap_err();
    assert_eq!(line_of(&e), 4);
    assert!(matches!(
        e,
        TraceError::Line {
            source: LineError::Missing { .. },
            ..
        }
    ));
}

#[test]
fn unmap_with_other_size_or_dir_is_an_error() {
    let body = format!(
        "{}{}",
        map("1.0", "10", 16, "TO_DEVICE"),
        unmap("1.1", "10", 48, "TO_DEVICE")
    );
    let e = run(&body).unwrap_err();
    assert_eq!(line_of(&e), 4);
    assert!(matches!(
        e,
        TraceError::Pair {
            source: PairError::SizeMismatch {
                map: 16,
                unmap: 48,
                map_line: 3,
                ..
            },
            ..
        }
    ));
    let body = format!(
        "{}{}",
        map("1.0", "10", 16, "TO_DEVICE"),
        unmap("1.1", "10", 16, "FROM_DEVICE")
    );
    assert!(matches!(
        run(&body).unwrap_err(),
        TraceError::Pair {
            source: PairError::DirMismatch { .. },
            line: 4,
            ..
        }
    ));
}

#[test]
fn double_unmap_is_an_error() {
    let body = format!(
        "{}{}{}",
        map("1.0", "10", 16, "TO_DEVICE"),
        unmap("1.1", "10", 16, "TO_DEVICE"),
        unmap("1.2", "10", 16, "TO_DEVICE")
    );
    let e = run(&body).unwrap_err();
    assert_eq!(line_of(&e), 5);
    assert!(matches!(
        e,
        TraceError::Pair {
            source: PairError::DoubleUnmap { unmap_line: 4, .. },
            ..
        }
    ));
}

#[test]
fn unmap_of_unknown_is_held_from_the_start_and_may_be_remapped() {
    let body = format!(
        "{}{}{}",
        unmap("1.0", "20", 1536, "FROM_DEVICE"),
        map("1.1", "20", 1536, "FROM_DEVICE"),
        unmap("1.2", "20", 1536, "FROM_DEVICE")
    );
    let p = run(&body).unwrap();
    assert_eq!(p.held.len(), 1);
    assert!(p.mappings[p.held[0].mapping as usize].held);
    assert_eq!(p.ops.len(), 3);
    let peaks = replay::slots::walk(&p);
    assert_eq!(peaks.held_slots, 1);
    assert_eq!(peaks.high_water_slots, 1);
    assert_eq!(peaks.end_slots, 0);
}

#[test]
fn tolerated_oddities_are_counted() {
    let body = format!(
        "{}{}CPU:0 [LOST 7 EVENTS]\n  dd-1 [000] d..1. 1.3: dma_sync_single_for_cpu: 0000:00:01.0 dir=TO_DEVICE dma_addr=99 size=16\n  dd-1 [000] ..... 1.4: dma_free: 0000:00:01.0 dir=BIDIRECTIONAL dma_addr=5 size=100 virt_addr=x attrs=\n",
        map("1.0", "10", 16, "TO_DEVICE"),
        map("1.1", "10", 16, "TO_DEVICE"),
    );
    let p = run(&body).unwrap();
    assert_eq!(p.warnings.remap_of_live, 1);
    assert_eq!(p.warnings.lost_events, 7);
    assert_eq!(p.warnings.sync_of_unknown, 1);
    assert_eq!(p.warnings.free_of_unknown, 1);
    assert_eq!(p.warnings.total(), 10);
}

#[test]
fn may_block_from_flags_and_override() {
    let body = format!(
        "{}  dd-1 [000] ..... 1.1: dma_map_page: 0000:00:01.0 dir=TO_DEVICE dma_addr=30 size=16 phys_addr=1 attrs=\n",
        map("1.0", "10", 16, "TO_DEVICE")
    );
    let p = run(&body).unwrap();
    assert!(!p.mappings[0].may_block);
    assert!(p.mappings[1].may_block);
    let text = format!("{HEADER}{body}");
    let (p, _, _) = parse_text("t", text.as_bytes(), &["0000:00:01.0".to_string()]).unwrap();
    assert!(p.mappings[0].may_block);
}

#[test]
fn gzip_file_and_stats_reconciliation() {
    let dir = std::env::temp_dir().join(format!("replay-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = format!(
        "{HEADER}{}{}{}",
        unmap("1.0", "20", 1536, "FROM_DEVICE"),
        map("1.1", "30", 4096, "FROM_DEVICE"),
        unmap("1.2", "30", 4096, "FROM_DEVICE")
    );
    let path = dir.join("t.trace.gz");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(body.as_bytes()).unwrap();
    std::fs::write(&path, gz.finish().unwrap()).unwrap();
    let stats = dir.join("t.swiotlb_stats");
    std::fs::write(
        &stats,
        "== before\nio_tlb_used=10\n== after\nio_tlb_used=9\nio_tlb_used_hiwater=11\n",
    )
    .unwrap();
    let t = replay::load(
        &path,
        &replay::LoadOptions {
            swiotlb_stats: Some(stats.clone()),
            may_block: vec![],
        },
    )
    .unwrap();
    assert_eq!(t.held_slots, 10);
    let s = replay::Summary::of(&t, &[]);
    assert_eq!(s.slots.high_water_slots, 11);
    assert_eq!(s.linux_hiwater, Some(11));
    // More held by the trace than the stats say: a counted warning.
    std::fs::write(&stats, "== before\nio_tlb_used=0\n").unwrap();
    let t = replay::load(
        &path,
        &replay::LoadOptions {
            swiotlb_stats: Some(stats),
            may_block: vec![],
        },
    )
    .unwrap();
    assert_eq!(t.pairing.warnings.held_beyond_stats, 1);
    // A plain file with no DMA events.
    let empty = dir.join("empty.trace");
    std::fs::write(&empty, HEADER).unwrap();
    assert!(matches!(
        replay::load(&empty, &replay::LoadOptions::default()),
        Err(TraceError::Empty(_))
    ));
    std::fs::remove_dir_all(&dir).ok();
}
