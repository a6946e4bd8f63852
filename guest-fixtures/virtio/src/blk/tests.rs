//! Host tests of the block driver against a fake virtio-mmio block device that serves the
//! rings from the same memory and refuses any buffer outside the fake "shared" arena.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::*;
use crate::ring::tests::Mem;

/// Bounce pool: coherent and bounce memory come from one arena (the "shared" memory).
struct FakeDma {
    arena: Mem,
    size: usize,
    next: Cell<usize>,
    maps: RefCell<HashMap<u64, (u64, usize)>>,
    fail_maps: Cell<bool>,
}

impl FakeDma {
    fn new(size: usize) -> Self {
        FakeDma {
            arena: Mem::new(size),
            size,
            next: Cell::new(0),
            maps: RefCell::new(HashMap::new()),
            fail_maps: Cell::new(false),
        }
    }

    fn take(&self, len: usize) -> Result<u64, DmaError> {
        let off = self.next.get().next_multiple_of(4096);
        if off + len > self.size {
            return Err(DmaError::Full);
        }
        self.next.set(off + len);
        Ok(self.arena.base() + off as u64)
    }

    fn is_shared(&self, addr: u64, len: u64) -> bool {
        addr >= self.arena.base() && addr + len <= self.arena.base() + self.size as u64
    }
}

impl Dma for FakeDma {
    fn alloc_coherent(&self, len: usize) -> Result<u64, DmaError> {
        self.take(len)
    }

    fn free_coherent(&self, _addr: u64, _len: usize) -> Result<(), DmaError> {
        Ok(())
    }

    unsafe fn map(&self, buf: u64, len: usize, dir: Dir) -> Result<u64, DmaError> {
        if self.fail_maps.get() {
            return Err(DmaError::Full);
        }
        let b = self.take(len)?;
        if dir == Dir::ToDevice {
            // SAFETY: `buf` holds `len` bytes (the map contract) and `b` is a fresh arena range of
            // `len` bytes.
            unsafe { std::ptr::copy_nonoverlapping(buf as *const u8, b as *mut u8, len) };
        }
        self.maps.borrow_mut().insert(b, (buf, len));
        Ok(b)
    }

    fn unmap(&self, dma: u64, len: usize, dir: Dir) -> Result<(), DmaError> {
        let (buf, l) = self
            .maps
            .borrow_mut()
            .remove(&dma)
            .ok_or(DmaError::Failed("not mapped"))?;
        assert_eq!(l, len);
        if dir == Dir::FromDevice {
            // SAFETY: `dma` is the live arena mapping of `len` bytes found above and `buf` its
            // original (the map contract).
            unsafe { std::ptr::copy_nonoverlapping(dma as *const u8, buf as *mut u8, len) };
        }
        Ok(())
    }
}

/// A virtio-mmio block device model: registers plus a request server over a Vec disk.
struct FakeDev<'a> {
    dma: &'a FakeDma,
    regs: RefCell<HashMap<usize, u32>>,
    queues: RefCell<Vec<(u16, u64, u64, u64)>>,
    disk: RefCell<Vec<u8>>,
    notifies: Cell<u32>,
    violations: Cell<u32>,
    seen: RefCell<Vec<u16>>,
    used: RefCell<Vec<u16>>,
}

impl<'a> FakeDev<'a> {
    fn new(dma: &'a FakeDma) -> Self {
        FakeDev {
            dma,
            regs: RefCell::new(HashMap::new()),
            queues: RefCell::new(vec![(0, 0, 0, 0); 4]),
            disk: RefCell::new(vec![0u8; 1 << 20]),
            notifies: Cell::new(0),
            violations: Cell::new(0),
            seen: RefCell::new(vec![0; 4]),
            used: RefCell::new(vec![0; 4]),
        }
    }

    fn reg(&self, off: usize) -> u32 {
        *self.regs.borrow().get(&off).unwrap_or(&0)
    }

    /// Serve everything available on queue `qi` (as the device's poller would).
    fn serve(&self, q: &BlkQueue) {
        let qi = q.index() as usize;
        let mut seen = self.seen.borrow()[qi];
        let mut used = self.used.borrow()[qi];
        while let Some((head, segs)) = crate::ring::tests::device_pop(&q.ring, &mut seen) {
            let shared = segs
                .iter()
                .all(|&(a, l, _)| self.dma.is_shared(a, l as u64));
            let (st_addr, _, _) = *segs.last().unwrap();
            if !shared {
                self.violations.set(self.violations.get() + 1);
                // SAFETY: (fake device) the addresses come from the queue's descriptors: the
                // header, data and status slots lie in the fake's arena, which outlives the queue
                // (and were checked shared).
                unsafe { write_volatile(st_addr as *mut u8, S_IOERR) };
                crate::ring::tests::device_push(&q.ring, &mut used, head, 1);
                continue;
            }
            let hdr = segs[0].0;
            // SAFETY: (fake device) the addresses come from the queue's descriptors: the header,
            // data and status slots lie in the fake's arena, which outlives the queue (and were
            // checked shared).
            let (t, sector) = unsafe {
                (
                    read_volatile(hdr as *const u32),
                    read_volatile((hdr + 8) as *const u64),
                )
            };
            let mut written = 1;
            let off = (sector * SECTOR) as usize;
            let mut disk = self.disk.borrow_mut();
            if segs.len() == 3 {
                let (a, l, _) = segs[1];
                let l = l as usize;
                // SAFETY: (fake device) the addresses come from the queue's descriptors: the
                // header, data and status slots lie in the fake's arena, which outlives the queue
                // (and were checked shared).
                unsafe {
                    match t {
                        T_IN => {
                            std::ptr::copy_nonoverlapping(disk[off..].as_ptr(), a as *mut u8, l);
                            written += l as u32;
                        }
                        T_OUT => std::ptr::copy_nonoverlapping(
                            a as *const u8,
                            disk[off..].as_mut_ptr(),
                            l,
                        ),
                        _ => {}
                    }
                }
            }
            // SAFETY: (fake device) the addresses come from the queue's descriptors: the header,
            // data and status slots lie in the fake's arena, which outlives the queue (and were
            // checked shared).
            unsafe { write_volatile(st_addr as *mut u8, S_OK) };
            crate::ring::tests::device_push(&q.ring, &mut used, head, written);
        }
        self.seen.borrow_mut()[qi] = seen;
        self.used.borrow_mut()[qi] = used;
    }
}

impl Regs for FakeDev<'_> {
    fn read32(&self, off: usize) -> u32 {
        match off {
            mmio::MAGIC => mmio::MAGIC_VALUE,
            mmio::VERSION => 2,
            mmio::DEVICE_ID => 2,
            mmio::DEVICE_FEATURES => {
                let f = mmio::F_VERSION_1 | mmio::F_EVENT_IDX | F_MQ | F_FLUSH;
                if self.reg(mmio::DEVICE_FEATURES_SEL) == 0 {
                    f as u32
                } else {
                    (f >> 32) as u32
                }
            }
            mmio::QUEUE_NUM_MAX => 256,
            o if o == mmio::CONFIG => 2048,
            o if o == mmio::CONFIG + 4 => 0,
            o if o == mmio::CONFIG + 32 => 4 << 16,
            o => self.reg(o),
        }
    }

    fn write32(&self, off: usize, value: u32) {
        if off == mmio::QUEUE_NOTIFY {
            self.notifies.set(self.notifies.get() + 1);
            return;
        }
        self.regs.borrow_mut().insert(off, value);
        if off == mmio::QUEUE_READY {
            let sel = self.reg(mmio::QUEUE_SEL) as usize;
            let lo_hi = |l, h| self.reg(l) as u64 | (self.reg(h) as u64) << 32;
            self.queues.borrow_mut()[sel] = (
                self.reg(mmio::QUEUE_NUM) as u16,
                lo_hi(mmio::QUEUE_DESC_LOW, mmio::QUEUE_DESC_HIGH),
                lo_hi(mmio::QUEUE_DRIVER_LOW, mmio::QUEUE_DRIVER_HIGH),
                lo_hi(mmio::QUEUE_DEVICE_LOW, mmio::QUEUE_DEVICE_HIGH),
            );
        }
    }
}

fn wait(q: &mut BlkQueue, dev: &FakeDev, dma: &FakeDma) -> Completion {
    dev.serve(q);
    q.poll(dma).unwrap().expect("a completion")
}

#[test]
fn init_negotiates_and_sets_up_queues() {
    let dma = FakeDma::new(1 << 20);
    let dev = FakeDev::new(&dma);
    let (mut q0, mut q1) = (BlkQueue::empty(), BlkQueue::empty());
    let info = init(&dev, &dma, &mut [&mut q0, &mut q1]).unwrap();
    let qs = [q0, q1];
    assert_eq!(info.capacity, 2048);
    assert_eq!(info.device_queues, 4);
    assert_ne!(info.features & mmio::F_EVENT_IDX, 0);
    assert_eq!(dev.reg(mmio::STATUS), 0xf);
    let devq = dev.queues.borrow();
    for (i, q) in qs.iter().enumerate() {
        let (d, a, u) = q.ring.addresses();
        assert_eq!(devq[i], (256, d, a, u));
        assert!(dma.is_shared(d, 4096) && dma.is_shared(q.status, 256));
    }
    assert_eq!(qs[0].capacity(), 85);
}

#[test]
fn writes_and_reads_are_bounced() {
    let dma = FakeDma::new(1 << 20);
    let dev = FakeDev::new(&dma);
    let mut q0 = BlkQueue::empty();
    init(&dev, &dma, &mut [&mut q0]).unwrap();
    let q = &mut q0;
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut back = vec![0u8; 8192];
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    unsafe { q.submit(&dma, Op::Write, 4, data.as_ptr() as u64, 8192, 7) }.unwrap();
    // The sleeping device (avail_event 0) wants a doorbell for the first request only.
    assert!(q.kick(&dev));
    let c = wait(q, &dev, &dma);
    assert_eq!((c.cookie, c.status, c.ok()), (7, S_OK, true));
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    unsafe { q.submit(&dma, Op::Read, 4, back.as_mut_ptr() as u64, 8192, 8) }.unwrap();
    assert!(!q.kick(&dev));
    let c = wait(q, &dev, &dma);
    assert_eq!((c.cookie, c.used_len), (8, 8193));
    assert_eq!(back, data);
    assert_eq!(dev.violations.get(), 0);
    assert_eq!(dev.disk.borrow()[2048..2048 + 8192], data[..]);
    assert!(dma.maps.borrow().is_empty(), "every mapping was unmapped");
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    unsafe { q.submit(&dma, Op::Flush, 0, 0, 0, 9) }.unwrap();
    assert!(wait(q, &dev, &dma).ok());
    assert_eq!((q.submitted, q.completed, q.in_flight()), (3, 3, 0));
}

#[test]
fn private_buffers_handed_over_directly_are_refused() {
    let dma = FakeDma::new(1 << 20);
    let dev = FakeDev::new(&dma);
    let mut q0 = BlkQueue::empty();
    init(&dev, &dma, &mut [&mut q0]).unwrap();
    let q = &mut q0;
    let private = vec![0u8; 4096];
    q.submit_direct(Op::Write, 0, private.as_ptr() as u64, 4096, 1)
        .unwrap();
    let c = wait(q, &dev, &dma);
    assert_eq!(c.status, S_IOERR);
    assert!(!c.ok());
    assert_eq!(dev.violations.get(), 1);
}

#[test]
fn queue_limits_and_map_failures_leave_nothing_behind() {
    let dma = FakeDma::new(1 << 20);
    let dev = FakeDev::new(&dma);
    let mut q0 = BlkQueue::empty();
    init(&dev, &dma, &mut [&mut q0]).unwrap();
    let q = &mut q0;
    let buf = vec![0u8; 512];
    for i in 0..85 {
        // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or
        // the mapping is released).
        unsafe { q.submit(&dma, Op::Write, 0, buf.as_ptr() as u64, 512, i) }.unwrap();
    }
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    let full = unsafe { q.submit(&dma, Op::Write, 0, buf.as_ptr() as u64, 512, 99) };
    assert_eq!(full, Err(BlkError::Ring(RingError::Full)));
    dev.serve(q);
    let mut n = 0;
    while let Some(c) = q.poll(&dma).unwrap() {
        assert_eq!(c.cookie, n);
        n += 1;
    }
    assert_eq!(n, 85);
    dma.fail_maps.set(true);
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    let r = unsafe { q.submit(&dma, Op::Read, 0, buf.as_ptr() as u64, 512, 1) };
    assert_eq!(r, Err(BlkError::Dma(DmaError::Full)));
    assert_eq!(q.in_flight(), 0);
    assert_eq!(
        // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or
        // the mapping is released).
        unsafe { q.submit(&dma, Op::Read, 0, buf.as_ptr() as u64, 100, 1) },
        Err(BlkError::BadLength(100))
    );
}

#[test]
fn non_block_devices_are_refused() {
    struct Net;
    impl Regs for Net {
        fn read32(&self, off: usize) -> u32 {
            match off {
                mmio::MAGIC => mmio::MAGIC_VALUE,
                mmio::VERSION => 2,
                _ => 1,
            }
        }
        fn write32(&self, _: usize, _: u32) {}
    }
    let dma = FakeDma::new(1 << 16);
    assert_eq!(init(&Net, &dma, &mut []), Err(BlkError::NotBlock(1)));
}

#[test]
fn a_mapping_made_apart_from_the_queue_ends_in_the_driver() {
    let dma = FakeDma::new(1 << 20);
    let dev = FakeDev::new(&dma);
    let mut q0 = BlkQueue::empty();
    init(&dev, &dma, &mut [&mut q0]).unwrap();
    let q = &mut q0;
    let data: Vec<u8> = (0..4096u32).map(|i| (i % 13) as u8).collect();
    let mut back = vec![0u8; 4096];
    // Mapped without the queue, submitted later, unmapped by the completion.
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    let m = unsafe { Mapping::new(&dma, Op::Write, data.as_ptr() as u64, 4096) }.unwrap();
    assert_eq!(dma.maps.borrow().len(), 1);
    q.submit_mapping(&dma, 8, m, 1).unwrap();
    q.kick(&dev);
    assert!(wait(q, &dev, &dma).ok());
    assert!(dma.maps.borrow().is_empty());
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    let m = unsafe { Mapping::new(&dma, Op::Read, back.as_mut_ptr() as u64, 4096) }.unwrap();
    q.submit_mapping(&dma, 8, m, 2).unwrap();
    q.kick(&dev);
    assert!(wait(q, &dev, &dma).ok());
    assert_eq!(back, data);
    // Released unused: unmapped.
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    let m = unsafe { Mapping::new(&dma, Op::Write, data.as_ptr() as u64, 512) }.unwrap();
    m.release(&dma).unwrap();
    assert!(dma.maps.borrow().is_empty());
    // Refused by a full ring: unmapped by the driver, nothing submitted.
    for i in 0..85 {
        // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or
        // the mapping is released).
        unsafe { q.submit(&dma, Op::Write, 0, data.as_ptr() as u64, 512, i) }.unwrap();
    }
    // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or the
    // mapping is released).
    let m = unsafe { Mapping::new(&dma, Op::Write, data.as_ptr() as u64, 512) }.unwrap();
    assert_eq!(
        q.submit_mapping(&dma, 0, m, 99),
        Err(BlkError::Ring(RingError::Full))
    );
    assert_eq!(dma.maps.borrow().len(), 85);
    assert_eq!(
        // SAFETY: the buffer is this test's live Vec, left alone until the request completes (or
        // the mapping is released).
        unsafe { Mapping::new(&dma, Op::Read, data.as_ptr() as u64, 100) },
        Err(BlkError::BadLength(100))
    );
}

#[test]
fn a_refused_conversion_keeps_its_code() {
    let e = BlkError::Dma(DmaError::Conversion(memconv::abi::ERR_NO_MEMORY));
    let shown = std::format!("{e}");
    assert!(
        shown.contains(memconv::abi::status_name(memconv::abi::ERR_NO_MEMORY)),
        "{shown}"
    );
}
