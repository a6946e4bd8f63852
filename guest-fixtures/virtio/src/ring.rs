//! The driver side of a split virtqueue: descriptor table, available ring and used ring in
//! shared memory, laid out by [`layout`]; the free list and the chains in flight kept in
//! private memory (this struct), so a device that scribbles on the shared rings can make a
//! request fail but never corrupt the driver. Notification suppression: with EVENT_IDX the
//! driver notifies only when its new available index crosses the device's `avail_event`;
//! without, only when the used ring's NO_NOTIFY flag is clear.

use core::fmt;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{fence, Ordering};

/// Largest queue this driver sets up.
pub const MAX_QUEUE: usize = 256;

/// Descriptor flag: the chain continues at `next`.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const DESC_F_WRITE: u16 = 2;
/// Available-ring flag: no interrupts wanted (there are none anyway).
pub const AVAIL_F_NO_INTERRUPT: u16 = 1;
/// Used-ring flag: the device does not want notifications.
pub const USED_F_NO_NOTIFY: u16 = 1;

/// Why a ring operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// Queue size not a power of two in 1..=MAX_QUEUE, or misaligned ring addresses.
    BadSetup,
    /// Not enough free descriptors.
    Full,
    /// An empty chain, or one longer than the queue.
    BadChain,
    /// The device returned an id that is not a chain in flight.
    BadUsed(u32),
    /// The device moved the used index by more than the chains in flight.
    BadUsedIndex(u16),
}

impl fmt::Display for RingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RingError::BadSetup => f.write_str("bad queue setup"),
            RingError::Full => f.write_str("queue full"),
            RingError::BadChain => f.write_str("bad descriptor chain"),
            RingError::BadUsed(id) => write!(f, "device completed unknown descriptor {id}"),
            RingError::BadUsedIndex(i) => write!(f, "device used index {i} out of range"),
        }
    }
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seg {
    /// Device address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// The device writes it.
    pub write: bool,
}

/// Byte offsets of the parts of a queue of `size` entries in one block of shared memory:
/// (descriptor table, available ring, used ring, total length).
pub const fn layout(size: u16) -> (usize, usize, usize, usize) {
    let n = size as usize;
    let desc = 0;
    let avail = desc + 16 * n;
    // avail: flags, idx, ring[n], used_event.
    let used = (avail + 6 + 2 * n).next_multiple_of(4096);
    // used: flags, idx, ring[n] of (id u32, len u32), avail_event.
    let total = used + 6 + 8 * n;
    (desc, avail, used, total)
}

/// The driver's view of one split virtqueue.
pub struct SplitQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    event_idx: bool,
    free_head: u16,
    num_free: u16,
    /// Private links: the free list, and each chain's descriptors in order.
    next: [u16; MAX_QUEUE],
    /// Descriptors in the chain headed by i (0: i heads no chain in flight).
    chain_len: [u16; MAX_QUEUE],
    avail_idx: u16,
    last_used: u16,
    /// Available index at the last notification decision.
    signalled: u16,
    in_flight: u16,
}

impl Default for SplitQueue {
    fn default() -> Self {
        Self::empty()
    }
}

impl SplitQueue {
    /// An unset queue.
    pub const fn empty() -> Self {
        SplitQueue {
            size: 0,
            desc: 0,
            avail: 0,
            used: 0,
            event_idx: false,
            free_head: 0,
            num_free: 0,
            next: [0; MAX_QUEUE],
            chain_len: [0; MAX_QUEUE],
            avail_idx: 0,
            last_used: 0,
            signalled: 0,
            in_flight: 0,
        }
    }

    /// Set up a queue of `size` entries in the zeroed shared memory at `base` (laid out by
    /// [`layout`]).
    ///
    /// # Safety
    /// `[base, base + layout(size).3)` is zeroed memory, identity mapped, that the queue alone
    /// uses (with the device) for as long as it is in use.
    pub unsafe fn init(&mut self, size: u16, base: u64, event_idx: bool) -> Result<(), RingError> {
        if size == 0
            || !size.is_power_of_two()
            || size as usize > MAX_QUEUE
            || !base.is_multiple_of(4096)
        {
            return Err(RingError::BadSetup);
        }
        let (d, a, u, _) = layout(size);
        self.size = size;
        self.desc = base + d as u64;
        self.avail = base + a as u64;
        self.used = base + u as u64;
        self.event_idx = event_idx;
        for i in 0..size {
            self.next[i as usize] = i.wrapping_add(1);
            self.chain_len[i as usize] = 0;
        }
        self.free_head = 0;
        self.num_free = size;
        self.avail_idx = 0;
        self.last_used = 0;
        self.signalled = 0;
        self.in_flight = 0;
        // SAFETY: the avail flags field lies in the caller's memory.
        unsafe { write_volatile(self.avail as *mut u16, AVAIL_F_NO_INTERRUPT) };
        Ok(())
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        (self.desc, self.avail, self.used)
    }

    /// Free descriptors.
    pub fn num_free(&self) -> u16 {
        self.num_free
    }

    /// Chains submitted and not yet completed.
    pub fn in_flight(&self) -> u16 {
        self.in_flight
    }

    /// The head index the next [`SplitQueue::add`] will use, if any descriptor is free.
    pub fn next_head(&self) -> Option<u16> {
        (self.num_free > 0).then_some(self.free_head)
    }

    /// Write a chain and publish it; returns its head index.
    pub fn add(&mut self, segs: &[Seg]) -> Result<u16, RingError> {
        if segs.is_empty() || segs.len() > self.size as usize {
            return Err(RingError::BadChain);
        }
        if segs.len() > self.num_free as usize {
            return Err(RingError::Full);
        }
        let head = self.free_head;
        let mut idx = head;
        for (k, s) in segs.iter().enumerate() {
            let last = k + 1 == segs.len();
            let next = self.next[idx as usize];
            let mut flags = if s.write { DESC_F_WRITE } else { 0 };
            if !last {
                flags |= DESC_F_NEXT;
            }
            let d = self.desc + idx as u64 * 16;
            // SAFETY: descriptor `idx` < size lies in the table (`init`'s contract).
            unsafe {
                write_volatile(d as *mut u64, s.addr);
                write_volatile((d + 8) as *mut u32, s.len);
                write_volatile((d + 12) as *mut u16, flags);
                write_volatile((d + 14) as *mut u16, if last { 0 } else { next });
            }
            if last {
                self.free_head = next;
            } else {
                idx = next;
            }
        }
        self.num_free -= segs.len() as u16;
        self.chain_len[head as usize] = segs.len() as u16;
        self.in_flight += 1;
        let slot = self.avail + 4 + (self.avail_idx % self.size) as u64 * 2;
        // SAFETY: the ring slot lies in the available ring.
        unsafe { write_volatile(slot as *mut u16, head) };
        // The descriptors and the ring entry before the index the device polls.
        fence(Ordering::Release);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        // SAFETY: the idx field of the available ring.
        unsafe { write_volatile((self.avail + 2) as *mut u16, self.avail_idx) };
        Ok(head)
    }

    /// Whether the device wants a notification for what was published since the last call
    /// (it announced it is going to sleep).
    pub fn should_notify(&mut self) -> bool {
        // Publish the index before reading the device's announcement (pairs with the
        // device's write of avail_event + fence + re-read of the index).
        fence(Ordering::SeqCst);
        let new = self.avail_idx;
        let old = self.signalled;
        self.signalled = new;
        if new == old {
            return false;
        }
        if self.event_idx {
            let at = self.used + 4 + self.size as u64 * 8;
            // SAFETY: avail_event follows the used ring entries (`layout`).
            let event = unsafe { read_volatile(at as *const u16) };
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            // SAFETY: the used ring's flags field.
            let flags = unsafe { read_volatile(self.used as *const u16) };
            flags & USED_F_NO_NOTIFY == 0
        }
    }

    /// Whether the device has used a chain not yet popped (one read of the used index).
    pub fn used_pending(&self) -> bool {
        // SAFETY: the used ring's idx field.
        let idx = unsafe { read_volatile((self.used + 2) as *const u16) };
        idx != self.last_used
    }

    /// The address of the used ring's first 32-bit word (flags and index): it changes when
    /// the device uses a chain, so a waiter can watch it.
    pub fn used_word(&self) -> u64 {
        self.used
    }

    /// The next completed chain: (head index, bytes the device wrote), after freeing its
    /// descriptors. `Ok(None)` when nothing new is used. The device's claims are checked
    /// against the chains in flight.
    pub fn pop_used(&mut self) -> Result<Option<(u16, u32)>, RingError> {
        // SAFETY: the used ring's idx field.
        let idx = unsafe { read_volatile((self.used + 2) as *const u16) };
        if idx == self.last_used {
            return Ok(None);
        }
        if idx.wrapping_sub(self.last_used) > self.in_flight {
            return Err(RingError::BadUsedIndex(idx));
        }
        // Read the entry only after seeing the index.
        fence(Ordering::Acquire);
        let e = self.used + 4 + (self.last_used % self.size) as u64 * 8;
        // SAFETY: entry `last_used % size` of the used ring.
        let (id, len) = unsafe {
            (
                read_volatile(e as *const u32),
                read_volatile((e + 4) as *const u32),
            )
        };
        if id >= self.size as u32 || self.chain_len[id as usize] == 0 {
            return Err(RingError::BadUsed(id));
        }
        self.last_used = self.last_used.wrapping_add(1);
        let head = id as u16;
        let n = self.chain_len[head as usize];
        self.chain_len[head as usize] = 0;
        let mut tail = head;
        for _ in 1..n {
            tail = self.next[tail as usize];
        }
        self.next[tail as usize] = self.free_head;
        self.free_head = head;
        self.num_free += n;
        self.in_flight -= 1;
        Ok(Some((head, len)))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Zeroed, page-aligned memory standing in for shared guest memory.
    pub(crate) struct Mem {
        buf: Vec<u8>,
        base: u64,
    }

    impl Mem {
        pub(crate) fn new(len: usize) -> Self {
            let buf = vec![0u8; len + 4096];
            let base = (buf.as_ptr() as u64).next_multiple_of(4096);
            Mem { buf, base }
        }

        pub(crate) fn base(&self) -> u64 {
            let _ = &self.buf;
            self.base
        }
    }

    pub(crate) fn r16(a: u64) -> u16 {
        // SAFETY: (fake device) the address lies in the ring's live test arena, naturally aligned.
        unsafe { read_volatile(a as *const u16) }
    }

    pub(crate) fn w16(a: u64, v: u16) {
        // SAFETY: (fake device) the address lies in the ring's live test arena, naturally aligned.
        unsafe { write_volatile(a as *mut u16, v) }
    }

    /// A descriptor as the device reads it: (addr, len, flags).
    pub(crate) type DevDesc = (u64, u32, u16);

    /// The device side: pops the next available chain, returns its descriptors.
    pub(crate) fn device_pop(q: &SplitQueue, seen: &mut u16) -> Option<(u16, Vec<DevDesc>)> {
        let (d, a, _) = q.addresses();
        if r16(a + 2) == *seen {
            return None;
        }
        let head = r16(a + 4 + (*seen % q.size()) as u64 * 2);
        *seen = seen.wrapping_add(1);
        let mut out = Vec::new();
        let mut i = head;
        loop {
            let p = d + i as u64 * 16;
            // SAFETY: (fake device) the address lies in the ring's live test arena, naturally
            // aligned.
            let (addr, len, flags, next) = unsafe {
                (
                    read_volatile(p as *const u64),
                    read_volatile((p + 8) as *const u32),
                    read_volatile((p + 12) as *const u16),
                    read_volatile((p + 14) as *const u16),
                )
            };
            out.push((addr, len, flags));
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            i = next;
        }
        Some((head, out))
    }

    pub(crate) fn device_push(q: &SplitQueue, used_idx: &mut u16, id: u16, len: u32) {
        let (_, _, u) = q.addresses();
        let e = u + 4 + (*used_idx % q.size()) as u64 * 8;
        // SAFETY: (fake device) the address lies in the ring's live test arena, naturally aligned.
        unsafe {
            write_volatile(e as *mut u32, id as u32);
            write_volatile((e + 4) as *mut u32, len);
        }
        *used_idx = used_idx.wrapping_add(1);
        w16(u + 2, *used_idx);
    }

    fn seg(addr: u64, len: u32, write: bool) -> Seg {
        Seg { addr, len, write }
    }

    #[test]
    fn chains_round_trip_and_descriptors_are_recycled() {
        let m = Mem::new(layout(8).3);
        let mut q = SplitQueue::empty();
        // SAFETY: `m` is a live, zeroed arena of the ring's layout size, used by this queue only
        // (init refuses a bad size or alignment before touching it).
        unsafe { q.init(8, m.base(), true) }.unwrap();
        let (mut seen, mut used) = (0u16, 0u16);
        for round in 0..100u64 {
            let h1 = q
                .add(&[seg(round, 16, false), seg(2, 512, true), seg(3, 1, true)])
                .unwrap();
            let h2 = q.add(&[seg(4, 16, false), seg(5, 1, true)]).unwrap();
            assert_eq!(q.num_free(), 3);
            assert_eq!(q.add(&[seg(0, 1, false); 4]), Err(RingError::Full));
            let (dh1, c1) = device_pop(&q, &mut seen).unwrap();
            assert_eq!(dh1, h1);
            assert_eq!(c1[0], (round, 16, DESC_F_NEXT));
            assert_eq!(c1[1], (2, 512, DESC_F_NEXT | DESC_F_WRITE));
            assert_eq!(c1[2], (3, 1, DESC_F_WRITE));
            let (dh2, _) = device_pop(&q, &mut seen).unwrap();
            // Complete out of order.
            device_push(&q, &mut used, dh2, 1);
            device_push(&q, &mut used, dh1, 513);
            assert_eq!(q.pop_used().unwrap(), Some((h2, 1)));
            assert_eq!(q.pop_used().unwrap(), Some((h1, 513)));
            assert_eq!(q.pop_used().unwrap(), None);
            assert_eq!((q.num_free(), q.in_flight()), (8, 0));
        }
    }

    #[test]
    fn lying_devices_are_caught() {
        let m = Mem::new(layout(8).3);
        let mut q = SplitQueue::empty();
        // SAFETY: `m` is a live, zeroed arena of the ring's layout size, used by this queue only
        // (init refuses a bad size or alignment before touching it).
        unsafe { q.init(8, m.base(), true) }.unwrap();
        let mut used = 0u16;
        let h = q.add(&[seg(1, 16, false), seg(2, 1, true)]).unwrap();
        // An id that heads no chain in flight.
        device_push(&q, &mut used, h + 1, 0);
        assert_eq!(q.pop_used(), Err(RingError::BadUsed(h as u32 + 1)));
        // An index far ahead.
        let (_, _, u) = q.addresses();
        w16(u + 2, 40);
        assert_eq!(q.pop_used(), Err(RingError::BadUsedIndex(40)));
        assert_eq!(q.in_flight(), 1, "nothing was freed");
    }

    #[test]
    fn notifications_follow_avail_event() {
        let m = Mem::new(layout(8).3);
        let mut q = SplitQueue::empty();
        // SAFETY: `m` is a live, zeroed arena of the ring's layout size, used by this queue only
        // (init refuses a bad size or alignment before touching it).
        unsafe { q.init(8, m.base(), true) }.unwrap();
        let (_, _, u) = q.addresses();
        let avail_event = u + 4 + 8 * 8;
        // The device sleeps waiting for index 0 -> the first add must notify.
        q.add(&[seg(1, 1, false)]).unwrap();
        assert!(q.should_notify());
        // Awake device (avail_event left behind): no notification.
        q.add(&[seg(1, 1, false)]).unwrap();
        q.add(&[seg(1, 1, false)]).unwrap();
        assert!(!q.should_notify());
        // The device goes to sleep after seeing 3 entries.
        w16(avail_event, 3);
        q.add(&[seg(1, 1, false)]).unwrap();
        assert!(q.should_notify());
        assert!(!q.should_notify(), "nothing new");
    }

    #[test]
    fn notifications_follow_used_flags_without_event_idx() {
        let m = Mem::new(layout(4).3);
        let mut q = SplitQueue::empty();
        // SAFETY: `m` is a live, zeroed arena of the ring's layout size, used by this queue only
        // (init refuses a bad size or alignment before touching it).
        unsafe { q.init(4, m.base(), false) }.unwrap();
        let (_, _, u) = q.addresses();
        w16(u, USED_F_NO_NOTIFY);
        q.add(&[seg(1, 1, false)]).unwrap();
        assert!(!q.should_notify());
        w16(u, 0);
        q.add(&[seg(1, 1, false)]).unwrap();
        assert!(q.should_notify());
    }

    #[test]
    fn setup_is_checked() {
        let m = Mem::new(layout(8).3);
        let mut q = SplitQueue::empty();
        assert_eq!(
            // SAFETY: `m` is a live, zeroed arena of the ring's layout size, used by this queue
            // only (init refuses a bad size or alignment before touching it).
            unsafe { q.init(6, m.base(), true) },
            Err(RingError::BadSetup)
        );
        assert_eq!(
            // SAFETY: `m` is a live, zeroed arena of the ring's layout size, used by this queue
            // only (init refuses a bad size or alignment before touching it).
            unsafe { q.init(512, m.base(), true) },
            Err(RingError::BadSetup)
        );
        assert_eq!(
            // SAFETY: `m` is a live, zeroed arena of the ring's layout size, used by this queue
            // only (init refuses a bad size or alignment before touching it).
            unsafe { q.init(8, m.base() + 8, true) },
            Err(RingError::BadSetup)
        );
        // SAFETY: `m` is a live, zeroed arena of the ring's layout size, used by this queue only
        // (init refuses a bad size or alignment before touching it).
        unsafe { q.init(8, m.base(), true) }.unwrap();
        assert_eq!(q.add(&[]), Err(RingError::BadChain));
    }
}
