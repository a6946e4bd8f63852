//! The shared Linux 6.12 traces: every line parses, maps pair with unmaps, and the slot model's
//! high-water equals Linux's own `io_tlb_used_hiwater` (261 probe, 6000 blk, 304 net).

use std::path::{Path, PathBuf};

use memconv::replay_ops::{OpReader, OPC_MAP, OPC_UNMAP};
use replay::{DeviceKind, LoadOptions};

/// The shared traces: `../shared` beside the checkout, as on the developers' and CI machines.
const TRACES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../shared/traces/linux-6.12-virtio"
);

fn dir() -> PathBuf {
    let d = std::env::var("REPLAY_TRACES").unwrap_or_else(|_| TRACES.to_string());
    let d = PathBuf::from(d);
    assert!(
        d.join("blk.trace.gz").exists(),
        "the shared traces are not at {} (set REPLAY_TRACES)",
        d.display()
    );
    d
}

fn check(name: &str, linux_hiwater: u64, maps_in_trace: u64) {
    let d = dir();
    let opts = LoadOptions {
        swiotlb_stats: Some(d.join(format!("{name}.swiotlb_stats"))),
        may_block: Vec::new(),
    };
    let t = replay::load(&Path::new(&d).join(format!("{name}.trace.gz")), &opts).unwrap();
    let kinds = replay::device_kinds(&t, &[]);
    let s = replay::Summary::of(&t, &kinds);
    assert_eq!(s.linux_hiwater, Some(linux_hiwater));
    assert_eq!(s.slots.high_water_slots, linux_hiwater, "{name}: {s}");
    let own: u64 = s.devices.iter().map(|d| d.maps).sum();
    assert_eq!(own, maps_in_trace);
    assert_eq!(s.warnings.total(), 0, "{name}: {s}");
    // The encoded stream decodes to the same ops, and never needs more handles than it says.
    let e = replay::encode(&t.pairing, &kinds);
    let r = OpReader::new(&e.bytes).unwrap();
    assert_eq!(u64::from(r.header().op_count), s.ops);
    let mut live = vec![false; r.header().handle_count as usize];
    let (mut maps, mut unmaps) = (0u64, 0u64);
    for op in r {
        let op = op.unwrap();
        let h = op.handle as usize;
        match op.opcode {
            OPC_MAP => {
                assert!(!live[h], "handle {h} reused while live");
                live[h] = true;
                maps += 1;
            }
            OPC_UNMAP => {
                assert!(live[h], "unmap of a dead handle {h}");
                live[h] = false;
                unmaps += 1;
            }
            _ => {}
        }
    }
    assert_eq!(maps, s.maps);
    assert!(unmaps <= maps);
    assert!(kinds.contains(&DeviceKind::Blk) || kinds.contains(&DeviceKind::Net));
}

#[test]
fn probe_reaches_linux_hiwater_261() {
    check("probe", 261, 309);
}

#[test]
fn blk_reaches_linux_hiwater_6000() {
    check("blk", 6000, 85_914);
}

#[test]
fn net_reaches_linux_hiwater_304() {
    check("net", 304, 87_431);
}
