//! Unit tests of the block device over plain guest memory behind a real memconv DMA fence
//! (no conversion engine): data round trips, the shared-only rule, requests put back while
//! a conversion holds their pages, hostile chains and rings, and the sleep announcement.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use memconv::fence::Fence;
use memconv::{DmaPin, FenceError};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::mmio::{reg, status};

const RAM: u64 = 4 << 20;
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HDR: u64 = 0x20000;
const STATUS: u64 = 0x21000;
const DATA: u64 = 0x100000;
const QSIZE: u16 = 32;

/// Guest memory whose pages are shared or private in a real fence (the engine's part, the
/// page flips, done by the test under `begin_conversion`).
struct FakeMem {
    mem: GuestMemoryMmap<()>,
    fence: Fence,
}

impl FakeMem {
    /// Page `page` becomes private (as a conversion would leave it).
    fn make_private(&self, page: u64) {
        let hold = self.fence.begin_conversion(page, page + 1).unwrap();
        self.fence.set_shared(page, page + 1, false);
        drop(hold);
    }

    /// Every page shared again.
    fn share_all(&self) {
        self.fence.set_shared(0, RAM / 4096, true);
    }
}

impl DmaMemory for FakeMem {
    fn pin_shared(&self, ranges: &[(u64, u64)]) -> Result<DmaPin<'_>, FenceError> {
        self.fence.pin(ranges)
    }

    fn memory(&self) -> &GuestMemoryMmap<()> {
        &self.mem
    }
}

struct Rig {
    dev: BlockDevice,
    mem: Arc<FakeMem>,
    _dir: PathBuf,
    next_avail: u16,
}

fn w32(dev: &BlockDevice, off: u64, v: u32) {
    dev.mmio_write(off, &v.to_le_bytes());
}

fn r32(dev: &BlockDevice, off: u64) -> u32 {
    let mut b = [0u8; 4];
    dev.mmio_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn rig(name: &str, event_idx: bool) -> Rig {
    let dir = std::env::temp_dir().join(format!("vmm-blk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let disk = Disk::open(&dir.join("d.img"), Some(1 << 20)).unwrap();
    let mem = Arc::new(FakeMem {
        mem: GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap(),
        fence: Fence::new(RAM, Duration::from_millis(20)),
    });
    mem.share_all();
    let dev = BlockDevice::new(disk, mem.clone(), &BlkConfig::default()).unwrap();
    w32(&dev, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
    let lo = device_features() as u32;
    w32(
        &dev,
        reg::DRIVER_FEATURES,
        if event_idx {
            lo
        } else {
            lo & !(1 << mmio::VIRTIO_RING_F_EVENT_IDX)
        },
    );
    w32(&dev, reg::DRIVER_FEATURES_SEL, 1);
    w32(&dev, reg::DRIVER_FEATURES, 1);
    w32(&dev, reg::STATUS, 3 | status::FEATURES_OK);
    w32(&dev, reg::QUEUE_SEL, 0);
    w32(&dev, reg::QUEUE_NUM, u32::from(QSIZE));
    w32(&dev, reg::QUEUE_DESC_LOW, DESC as u32);
    w32(&dev, reg::QUEUE_DRIVER_LOW, AVAIL as u32);
    w32(&dev, reg::QUEUE_DEVICE_LOW, USED as u32);
    w32(&dev, reg::QUEUE_READY, 1);
    w32(&dev, reg::STATUS, 0xf);
    assert_eq!(r32(&dev, reg::STATUS), 0xf);
    Rig {
        dev,
        mem,
        _dir: dir,
        next_avail: 0,
    }
}

impl Rig {
    fn m(&self) -> &GuestMemoryMmap<()> {
        &self.mem.mem
    }

    fn desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let d = Descriptor::new(addr, len, flags, next);
        self.m()
            .write_obj(d, GuestAddress(DESC + u64::from(i) * 16))
            .unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = AVAIL + 4 + u64::from(self.next_avail % QSIZE) * 2;
        self.m().write_obj(head, GuestAddress(slot)).unwrap();
        self.next_avail = self.next_avail.wrapping_add(1);
        self.m()
            .write_obj(self.next_avail, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// A standard 3-descriptor request at descriptors 3k..3k+2 (k = slot).
    fn request(&mut self, slot: u16, kind: u32, sector: u64, data: u64, len: u32) {
        let i = slot * 3;
        let hdr = HDR + u64::from(slot) * 16;
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.m().write_slice(&h, GuestAddress(hdr)).unwrap();
        self.m()
            .write_obj(0xffu8, GuestAddress(STATUS + u64::from(slot)))
            .unwrap();
        let write = if kind == VIRTIO_BLK_T_IN || kind == VIRTIO_BLK_T_GET_ID {
            2
        } else {
            0
        };
        self.desc(i, hdr, 16, 1, i + 1);
        self.desc(i + 1, data, len, 1 | write, i + 2);
        self.desc(i + 2, STATUS + u64::from(slot), 1, 2, 0);
        self.publish(i);
    }

    fn status(&self, slot: u16) -> u8 {
        self.m()
            .read_obj(GuestAddress(STATUS + u64::from(slot)))
            .unwrap()
    }

    fn used_idx(&self) -> u16 {
        self.m().read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn used_len(&self, n: u16) -> u32 {
        self.m()
            .read_obj(GuestAddress(USED + 4 + u64::from(n % QSIZE) * 8 + 4))
            .unwrap()
    }

    fn round(&self) -> usize {
        self.dev.core.service_round().0
    }

    fn needs_reset(&self) -> bool {
        r32(&self.dev, reg::STATUS) & status::DEVICE_NEEDS_RESET != 0
    }
}

#[test]
fn write_then_read_round_trips() {
    let mut r = rig("rt", true);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    r.m().write_slice(&pattern, GuestAddress(DATA)).unwrap();
    r.request(0, VIRTIO_BLK_T_OUT, 8, DATA, 8192);
    assert_eq!(r.round(), 1);
    assert_eq!(r.status(0), VIRTIO_BLK_S_OK);
    assert_eq!(r.used_len(0), 1);
    r.request(1, VIRTIO_BLK_T_IN, 8, DATA + 0x10000, 8192);
    assert_eq!(r.round(), 1);
    assert_eq!(r.status(1), VIRTIO_BLK_S_OK);
    assert_eq!(r.used_len(1), 8193);
    let mut back = vec![0u8; 8192];
    r.m()
        .read_slice(&mut back, GuestAddress(DATA + 0x10000))
        .unwrap();
    assert_eq!(back, pattern);
    let s = r.dev.stats();
    assert_eq!((s.requests, s.reads, s.writes), (2, 1, 1));
    assert_eq!((s.bytes_read, s.bytes_written), (8192, 8192));
    assert_eq!((s.violations, s.errors), (0, 0));
    assert_eq!(r.used_idx(), 2);
}

#[test]
fn private_buffers_are_refused_and_counted() {
    let mut r = rig("priv", true);
    r.m()
        .write_slice(&[0xab; 4096], GuestAddress(DATA))
        .unwrap();
    r.mem.make_private(DATA / 4096 + 1);
    // The second page of the buffer is private: nothing may move.
    r.request(0, VIRTIO_BLK_T_IN, 0, DATA, 8192);
    assert_eq!(r.round(), 1);
    assert_eq!(r.status(0), VIRTIO_BLK_S_IOERR);
    assert_eq!(r.used_len(0), 1);
    let first: u8 = r.m().read_obj(GuestAddress(DATA)).unwrap();
    assert_eq!(
        first, 0xab,
        "a refused read must not write the guest buffer"
    );
    // A private header, then a private status byte (not written at all).
    r.mem.make_private(HDR / 4096);
    r.request(1, VIRTIO_BLK_T_OUT, 0, DATA, 512);
    r.round();
    assert_eq!(r.status(1), VIRTIO_BLK_S_IOERR);
    r.mem.share_all();
    r.mem.make_private(STATUS / 4096);
    r.request(2, VIRTIO_BLK_T_OUT, 0, DATA, 512);
    r.round();
    assert_eq!(r.status(2), 0xff);
    assert_eq!(r.used_len(2), 0);
    let s = r.dev.stats();
    assert_eq!((s.violations, s.errors, s.bytes_read), (3, 0, 0));
    assert!(
        !r.needs_reset(),
        "buffer violations fail requests, not the device"
    );
}

#[test]
fn hostile_chains_fail_without_panicking() {
    let mut r = rig("hostile", true);
    // A loop: 0 -> 1 -> 0.
    r.desc(0, HDR, 16, 1, 1);
    r.desc(1, DATA, 512, 1, 0);
    r.publish(0);
    // Next index out of range.
    r.desc(2, HDR, 16, 1, 200);
    r.publish(2);
    // Indirect descriptor (not offered).
    r.desc(3, DESC + 0x800, 32, 4, 0);
    r.publish(3);
    assert_eq!(r.round(), 3);
    // Huge length, out-of-RAM address, sector past the end, odd length, read into a
    // device-readable buffer.
    r.request(2, VIRTIO_BLK_T_IN, 0, DATA, u32::MAX - 511);
    r.request(3, VIRTIO_BLK_T_IN, 0, RAM - 512, 4096);
    r.request(4, VIRTIO_BLK_T_OUT, (1 << 20) / 512, DATA, 512);
    r.request(5, VIRTIO_BLK_T_OUT, 0, DATA, 100);
    r.desc(18, HDR, 16, 1, 19);
    r.desc(19, DATA, 512, 1, 20);
    r.desc(20, STATUS + 6, 1, 2, 0);
    r.m().write_slice(&[0u8; 16], GuestAddress(HDR)).unwrap();
    r.publish(18);
    assert_eq!(r.round(), 5);
    for slot in [3u16, 4, 5] {
        assert_eq!(r.status(slot), VIRTIO_BLK_S_IOERR, "slot {slot}");
    }
    let s = r.dev.stats();
    assert_eq!(
        s.violations, 2,
        "huge and out-of-RAM buffers are not shared RAM"
    );
    assert_eq!(s.errors, 6);
    assert!(!r.needs_reset());
    // Unsupported type, GET_ID, FLUSH.
    r.request(0, 99, 0, DATA, 512);
    r.request(1, VIRTIO_BLK_T_FLUSH, 0, DATA, 0);
    r.request(2, VIRTIO_BLK_T_GET_ID, 0, DATA, 20);
    assert_eq!(r.round(), 3);
    assert_eq!(r.status(0), VIRTIO_BLK_S_UNSUPP);
    assert_eq!(r.status(1), VIRTIO_BLK_S_OK);
    assert_eq!(r.status(2), VIRTIO_BLK_S_OK);
    let mut id = [0u8; 15];
    r.m().read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, BLK_ID);
}

#[test]
fn bogus_available_index_needs_reset() {
    let r = rig("avail", true);
    r.m().write_obj(1000u16, GuestAddress(AVAIL + 2)).unwrap();
    assert_eq!(r.round(), 0);
    assert!(r.needs_reset());
    assert_eq!(r.dev.stats().device_faults, 1);
    // Dead until reset; after a reset the transport is back at status 0.
    assert_eq!(r.round(), 0);
    w32(&r.dev, reg::STATUS, 0);
    assert_eq!(r32(&r.dev, reg::STATUS), 0);
    assert_eq!(r.dev.stats().resets, 1);
}

#[test]
fn bad_head_index_needs_reset() {
    let mut r = rig("head", true);
    r.publish(QSIZE + 3);
    r.round();
    assert!(r.needs_reset());
}

#[test]
fn private_rings_need_reset() {
    let r = rig("ring", true);
    r.mem.make_private(USED / 4096);
    assert_eq!(r.round(), 0);
    assert!(r.needs_reset());
    let s = r.dev.stats();
    assert_eq!((s.violations, s.device_faults), (1, 1));
}

#[test]
fn sleep_is_announced_through_avail_event() {
    let mut r = rig("sleep", true);
    r.request(0, VIRTIO_BLK_T_OUT, 0, DATA, 512);
    r.round();
    // Nothing pending: avail_event = next available index (1).
    assert!(!r.dev.core.prepare_sleep());
    let avail_event: u16 = r
        .m()
        .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
        .unwrap();
    assert_eq!(avail_event, 1);
    // Work published before the check: no sleep.
    r.request(1, VIRTIO_BLK_T_OUT, 0, DATA, 512);
    assert!(r.dev.core.prepare_sleep());
}

#[test]
fn sleep_without_event_idx_uses_used_flags() {
    let r = rig("flags", false);
    assert!(!r.dev.core.prepare_sleep());
    let flags: u16 = r.m().read_obj(GuestAddress(USED)).unwrap();
    assert_eq!(flags, 0);
    r.dev.core.after_wake();
    let flags: u16 = r.m().read_obj(GuestAddress(USED)).unwrap();
    assert_eq!(flags, 1, "VRING_USED_F_NO_NOTIFY while polling");
}

#[test]
fn poller_thread_serves_and_stops() {
    let mut r = rig("thread", true);
    let dev = Arc::new(std::mem::replace(
        &mut r.dev,
        BlockDevice::new(
            Disk::open(&r._dir.join("d.img"), None).unwrap(),
            r.mem.clone(),
            &BlkConfig::default(),
        )
        .unwrap(),
    ));
    let h = dev.spawn_poller().unwrap();
    r.request(0, VIRTIO_BLK_T_OUT, 0, DATA, 4096);
    let t0 = Instant::now();
    while r.used_idx() != 1 && t0.elapsed() < Duration::from_secs(5) {
        std::thread::yield_now();
    }
    assert_eq!(r.used_idx(), 1);
    dev.stop();
    h.join().unwrap();
}

#[test]
fn disk_open_errors_are_clear() {
    let dir = std::env::temp_dir().join(format!("vmm-blk-{}-open", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("none.img");
    assert!(matches!(
        Disk::open(&missing, None),
        Err(DiskError::Missing(_))
    ));
    assert!(matches!(
        Disk::open(&missing, Some(1000)),
        Err(DiskError::BadSize(1000))
    ));
    assert!(matches!(
        Disk::open(&dir, Some(1 << 20)),
        Err(DiskError::IsDirectory(_))
    ));
    assert!(matches!(
        Disk::open(&dir.join("no/such/dir.img"), Some(1 << 20)),
        Err(DiskError::Open { .. })
    ));
    std::fs::write(dir.join("odd.img"), [0u8; 5000]).unwrap();
    assert!(matches!(
        Disk::open(&dir.join("odd.img"), None),
        Err(DiskError::BadImage { .. })
    ));
    let d = Disk::open(&dir.join("new.img"), Some(8 << 20)).unwrap();
    assert_eq!(d.len(), 8 << 20);
    // An existing image keeps its size.
    let d = Disk::open(&dir.join("new.img"), Some(16 << 20)).unwrap();
    assert_eq!(d.len(), 8 << 20);
}

#[test]
fn requests_wait_for_a_conversion_holding_their_pages() {
    // The data buffer lies away from the rings.
    const FAR: u64 = 0x300000;
    let mut r = rig("fence", true);
    let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 13 + 1) as u8).collect();
    r.m().write_slice(&pattern, GuestAddress(FAR)).unwrap();
    r.request(0, VIRTIO_BLK_T_OUT, 0, FAR, 4096);
    r.request(1, VIRTIO_BLK_T_IN, 0, DATA, 4096);
    // A conversion holds the buffer's chunk: request 0 and the one after it are put back.
    let page = FAR / 4096;
    let hold = r.mem.fence.begin_conversion(page, page + 1).unwrap();
    assert_eq!(r.round(), 0);
    assert_eq!((r.status(0), r.used_idx()), (0xff, 0));
    assert_eq!(r.round(), 0, "retried while the conversion runs");
    drop(hold);
    assert_eq!(r.round(), 2);
    assert_eq!(
        (r.status(0), r.status(1)),
        (VIRTIO_BLK_S_OK, VIRTIO_BLK_S_OK)
    );
    let mut back = vec![0u8; 4096];
    r.m().read_slice(&mut back, GuestAddress(DATA)).unwrap();
    assert_eq!(back, pattern);
    // A conversion holding a ring page: the whole queue waits; no fault.
    r.request(2, VIRTIO_BLK_T_IN, 0, FAR, 512);
    let hold = r
        .mem
        .fence
        .begin_conversion(USED / 4096, USED / 4096 + 1)
        .unwrap();
    assert_eq!(r.round(), 0);
    assert!(
        r.dev.core.prepare_sleep(),
        "no sleep while a conversion holds the rings"
    );
    drop(hold);
    assert_eq!(r.round(), 1);
    // The buffer converted to private after that: refused as a violation.
    r.mem.make_private(page);
    r.request(3, VIRTIO_BLK_T_IN, 0, FAR, 512);
    assert_eq!(r.round(), 1);
    assert_eq!(r.status(3), VIRTIO_BLK_S_IOERR);
    let s = r.dev.stats();
    assert_eq!((s.requests, s.violations, s.errors), (4, 1, 0));
    assert!(s.fence_retries >= 3, "{s:?}");
}
