//! Hypercall transport: requests through the calling vCPU's mailbox page and the doorbell port
//! (convert and accept batches, pool reports, exit), per the contract in `memconv::abi`.
//!
//! The mailbox is written and read with volatile accesses, field by field, fenced around the
//! doorbell `out` (the host reads and writes the page between the `out` and its return).
//! [`run_batch`] is the transport logic over any mailbox and doorbell (host-tested with a fake
//! host); the bare-metal wrappers below bind it to this vCPU's mailbox and the real port.

use core::mem::size_of;
use core::ptr::{addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};
use memconv::abi::{
    MailboxEntry, MailboxHeader, PoolReport, ATTR_ENCRYPTED, ATTR_PAGE_SIZE_2M, ATTR_PAGE_SIZE_4K,
    ERR_BUSY, ERR_INTERNAL, HUGE_PAGE_SIZE, MAILBOX_ENTRIES_OFFSET, MAILBOX_MAGIC,
    MAILBOX_MAX_ENTRIES, MAILBOX_MAX_PAYLOAD, OP_CONVERT, OP_EXIT, OP_REPORT, PAGES_PER_CHUNK,
    STATUS_OK,
};

/// The status an entry holds until the host writes one.
pub const STATUS_PENDING: u32 = u32::MAX;
/// Consecutive doorbells without progress after which the rest of a batch is given up (its
/// entries get the header status, or `ERR_INTERNAL`).
pub const MAX_STALLS: u32 = 8;
/// Times a conversion entry the host answered `ERR_BUSY` (a device access to the range was
/// still in flight after the host's bounded wait) is sent again, alone, after its batch.
pub const BUSY_RETRIES: u32 = 8;

const _: () = assert!(size_of::<PoolReport>().is_multiple_of(8));
const _: () = assert!(size_of::<PoolReport>() <= MAILBOX_MAX_PAYLOAD);

/// Outcome of a convert or accept batch; per-entry statuses are in the entries.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Batch {
    /// Doorbells rung (host exits) for this batch.
    pub doorbells: u32,
    /// Entries whose status is not `STATUS_OK`.
    pub errors: u32,
    /// Status of the first failed entry (`STATUS_OK` if none).
    pub first_error: u32,
}

impl Batch {
    /// Whether every entry succeeded.
    pub fn ok(&self) -> bool {
        self.errors == 0
    }
}

/// A request entry (status pending).
pub const fn entry(gpa: u64, npages: u64, attrs: u32) -> MailboxEntry {
    MailboxEntry {
        gpa,
        npages,
        attrs,
        status: STATUS_PENDING,
    }
}

/// Whether `[gpa, gpa + npages * 4 KiB)` is 2 MiB aligned and sized (and not empty).
pub const fn is_2m(gpa: u64, npages: u64) -> bool {
    gpa.is_multiple_of(HUGE_PAGE_SIZE) && npages != 0 && npages.is_multiple_of(PAGES_PER_CHUNK)
}

/// Convert attributes for a range: `ATTR_ENCRYPTED` when going to private, with the 2M page
/// size hint when the range is 2 MiB aligned and sized, else the 4K hint.
pub const fn convert_attrs(gpa: u64, npages: u64, to_private: bool) -> u32 {
    let hint = if is_2m(gpa, npages) {
        ATTR_PAGE_SIZE_2M
    } else {
        ATTR_PAGE_SIZE_4K
    };
    if to_private {
        hint | ATTR_ENCRYPTED
    } else {
        hint
    }
}

fn header(mailbox: *mut u8) -> *mut MailboxHeader {
    mailbox.cast()
}

/// # Safety
/// `mailbox` is a valid mailbox page.
unsafe fn write_header(mailbox: *mut u8, op: u32, end: u32, arg: u64) {
    let h = header(mailbox);
    // SAFETY: the caller guarantees the page; every field is naturally aligned.
    unsafe {
        write_volatile(addr_of_mut!((*h).magic), MAILBOX_MAGIC);
        write_volatile(addr_of_mut!((*h).op), op);
        write_volatile(addr_of_mut!((*h).cur_entry), 0);
        write_volatile(addr_of_mut!((*h).end_entry), end);
        write_volatile(addr_of_mut!((*h).status), STATUS_OK);
        write_volatile(addr_of_mut!((*h).reserved), 0);
        write_volatile(addr_of_mut!((*h).arg), arg);
    }
}

fn ring_fenced(ring: &mut dyn FnMut()) {
    compiler_fence(Ordering::SeqCst);
    ring();
    compiler_fence(Ordering::SeqCst);
}

/// Send `op` (`OP_CONVERT` or `OP_ACCEPT`) for every entry, at most `MAILBOX_MAX_ENTRIES` per
/// mailbox fill, ringing (`ring`) again while the host stops short of `end_entry`. Writes each
/// entry's status (entries the host never reached get the header status, or `ERR_INTERNAL`).
/// Conversion entries answered `ERR_BUSY` are sent again one at a time after the batch, up
/// to [`BUSY_RETRIES`] times each (so they may complete after later entries).
///
/// # Safety
/// `mailbox` points to a writable, 8-byte aligned 4 KiB page that nothing else on this side
/// uses during the call; `ring` makes the host process it.
pub unsafe fn run_batch(
    mailbox: *mut u8,
    op: u32,
    entries: &mut [MailboxEntry],
    ring: &mut dyn FnMut(),
) -> Batch {
    let mut out = Batch::default();
    for piece in entries.chunks_mut(MAILBOX_MAX_ENTRIES) {
        // SAFETY: forwarded from the caller.
        unsafe { run_piece(mailbox, op, piece, ring, &mut out) };
    }
    if op == OP_CONVERT && out.errors > 0 {
        for e in entries.iter_mut().filter(|e| e.status == ERR_BUSY) {
            for _ in 0..BUSY_RETRIES {
                let mut once = Batch::default();
                // SAFETY: forwarded from the caller (one entry <= MAILBOX_MAX_ENTRIES).
                unsafe { run_piece(mailbox, op, core::slice::from_mut(e), ring, &mut once) };
                out.doorbells += once.doorbells;
                if e.status != ERR_BUSY {
                    break;
                }
            }
        }
        out.errors = entries.iter().filter(|e| e.status != STATUS_OK).count() as u32;
        out.first_error = entries
            .iter()
            .map(|e| e.status)
            .find(|&st| st != STATUS_OK)
            .unwrap_or(STATUS_OK);
    }
    out
}

/// # Safety
/// As [`run_batch`], with `piece.len() <= MAILBOX_MAX_ENTRIES`.
unsafe fn run_piece(
    mailbox: *mut u8,
    op: u32,
    piece: &mut [MailboxEntry],
    ring: &mut dyn FnMut(),
    out: &mut Batch,
) {
    let n = piece.len() as u32;
    let h = header(mailbox);
    // SAFETY: the entries area follows the header inside the page (n <= MAILBOX_MAX_ENTRIES).
    let ents: *mut MailboxEntry = unsafe { mailbox.add(MAILBOX_ENTRIES_OFFSET) }.cast();
    // SAFETY: the caller guarantees the page; fields are naturally aligned.
    unsafe {
        write_header(mailbox, op, n, 0);
        for (i, e) in piece.iter().enumerate() {
            let p = ents.add(i);
            write_volatile(addr_of_mut!((*p).gpa), e.gpa);
            write_volatile(addr_of_mut!((*p).npages), e.npages);
            write_volatile(addr_of_mut!((*p).attrs), e.attrs);
            write_volatile(addr_of_mut!((*p).status), STATUS_PENDING);
        }
    }
    let mut cur = 0u32;
    let mut stalls = 0u32;
    loop {
        ring_fenced(ring);
        out.doorbells += 1;
        // SAFETY: as above.
        let now = unsafe { read_volatile(addr_of_mut!((*h).cur_entry)) };
        if now >= n {
            break;
        }
        if now > cur {
            cur = now;
            stalls = 0;
        } else {
            stalls += 1;
            if stalls >= MAX_STALLS {
                break;
            }
        }
    }
    // SAFETY: as above.
    let hstatus = unsafe { read_volatile(addr_of_mut!((*h).status)) };
    for (i, e) in piece.iter_mut().enumerate() {
        // SAFETY: as above.
        let mut st = unsafe { read_volatile(addr_of_mut!((*ents.add(i)).status)) };
        if st == STATUS_PENDING {
            st = if hstatus != STATUS_OK {
                hstatus
            } else {
                ERR_INTERNAL
            };
        }
        e.status = st;
        if st != STATUS_OK {
            out.errors += 1;
            if out.first_error == STATUS_OK {
                out.first_error = st;
            }
        }
    }
}

/// Send a pool report; returns the header status the host wrote (`ERR_INTERNAL` if none).
///
/// # Safety
/// As [`run_batch`].
pub unsafe fn run_report(mailbox: *mut u8, report: &PoolReport, ring: &mut dyn FnMut()) -> u32 {
    let words = size_of::<PoolReport>() / 8;
    let src: *const u64 = (report as *const PoolReport).cast();
    // SAFETY: the caller guarantees the page; the payload fits (asserted above) and both sides
    // are 8-byte aligned (PoolReport has u64 fields).
    unsafe {
        write_header(mailbox, OP_REPORT, 0, size_of::<PoolReport>() as u64);
        write_volatile(addr_of_mut!((*header(mailbox)).status), STATUS_PENDING);
        let dst: *mut u64 = mailbox.add(MAILBOX_ENTRIES_OFFSET).cast();
        for i in 0..words {
            write_volatile(dst.add(i), read_volatile(src.add(i)));
        }
    }
    ring_fenced(ring);
    // SAFETY: as above.
    let st = unsafe { read_volatile(addr_of_mut!((*header(mailbox)).status)) };
    if st == STATUS_PENDING {
        ERR_INTERNAL
    } else {
        st
    }
}

/// Fill the mailbox with an exit request and ring once.
///
/// # Safety
/// As [`run_batch`].
pub unsafe fn run_exit(mailbox: *mut u8, code: u64, ring: &mut dyn FnMut()) {
    // SAFETY: forwarded from the caller.
    unsafe { write_header(mailbox, OP_EXIT, 0, code) };
    ring_fenced(ring);
}

#[cfg(all(feature = "bare-metal", not(test)))]
mod bare {
    use super::*;
    use crate::arch;
    use core::sync::atomic::AtomicU64;
    use memconv::abi::{
        DOORBELL_PORT, MAILBOX_BASE_GPA, MAX_CPUS, OP_ACCEPT, OP_CONVERT, PAGE_SIZE,
    };

    static DOORBELLS: [AtomicU64; MAX_CPUS as usize] =
        [const { AtomicU64::new(0) }; MAX_CPUS as usize];

    fn mailbox(cpu: u32) -> *mut u8 {
        (MAILBOX_BASE_GPA + cpu as u64 * PAGE_SIZE) as *mut u8
    }

    fn ring(cpu: u32) {
        DOORBELLS[cpu as usize].fetch_add(1, Ordering::Relaxed);
        // SAFETY: the doorbell port only makes the host process this vCPU's mailbox.
        unsafe { arch::outl(DOORBELL_PORT, cpu) };
    }

    fn batch(op: u32, entries: &mut [MailboxEntry]) -> Batch {
        let cpu = crate::cpu_index();
        // SAFETY: vCPU `cpu` owns its mailbox page (shared, identity mapped, never used by
        // anyone else in the guest); the doorbell makes the host process it.
        unsafe { run_batch(mailbox(cpu), op, entries, &mut || ring(cpu)) }
    }

    /// Convert ranges (`OP_CONVERT`, KVM_HC_MAP_GPA_RANGE semantics; see [`convert_attrs`]).
    /// Any number of entries: split into mailbox-sized doorbells. Each entry's `status` is
    /// written.
    pub fn convert(entries: &mut [MailboxEntry]) -> Batch {
        batch(OP_CONVERT, entries)
    }

    /// Accept private pages (`OP_ACCEPT`; `attrs` 0), or rescind their acceptance (`attrs`
    /// `ACCEPT_FLAG_RESCIND`). Each entry's `status` is written.
    pub fn accept(entries: &mut [MailboxEntry]) -> Batch {
        batch(OP_ACCEPT, entries)
    }

    /// Convert one range; returns its status.
    pub fn convert_one(gpa: u64, npages: u64, attrs: u32) -> u32 {
        let mut e = [entry(gpa, npages, attrs)];
        convert(&mut e);
        e[0].status
    }

    /// Accept one range; returns its status.
    pub fn accept_one(gpa: u64, npages: u64) -> u32 {
        let mut e = [entry(gpa, npages, 0)];
        accept(&mut e);
        e[0].status
    }

    /// Rescind the acceptance of one range (SNP, before converting it to shared); returns
    /// its status.
    pub fn rescind_one(gpa: u64, npages: u64) -> u32 {
        let mut e = [entry(gpa, npages, memconv::abi::ACCEPT_FLAG_RESCIND)];
        accept(&mut e);
        e[0].status
    }

    /// Send pool statistics (`OP_REPORT`); returns the host's status.
    pub fn report(r: &PoolReport) -> u32 {
        let cpu = crate::cpu_index();
        // SAFETY: as in `batch`.
        unsafe { run_report(mailbox(cpu), r, &mut || ring(cpu)) }
    }

    /// End the VM with `code` (`OP_EXIT`); never returns (halts if the host resumes us).
    pub fn exit(code: u32) -> ! {
        let cpu = crate::cpu_index();
        // SAFETY: as in `batch`.
        unsafe { run_exit(mailbox(cpu), code as u64, &mut || ring(cpu)) };
        arch::halt_forever()
    }

    /// Doorbells this vCPU has rung so far (every op, exits included).
    pub fn doorbells() -> u64 {
        DOORBELLS[crate::cpu_index() as usize].load(Ordering::Relaxed)
    }
}

#[cfg(all(feature = "bare-metal", not(test)))]
pub use bare::*;

#[cfg(test)]
mod tests {
    use super::*;
    use memconv::abi::{
        ERR_BAD_REQUEST, ERR_UNALIGNED, OP_ACCEPT, OP_CONVERT, PAGE_SIZE, POOL_REPORT_VERSION,
    };

    #[repr(C, align(4096))]
    struct Page([u8; 4096]);

    /// A fake host processing at most `per_ring` entries per doorbell.
    struct FakeHost {
        page: Box<Page>,
        per_ring: u32,
        rings: u32,
        seen: Vec<(u64, u64, u32)>,
        /// Entries of 7 pages are answered `ERR_BUSY` this many times.
        busy: u32,
    }

    impl FakeHost {
        fn new(per_ring: u32) -> Self {
            FakeHost {
                page: Box::new(Page([0xee; 4096])),
                per_ring,
                rings: 0,
                seen: Vec::new(),
                busy: 0,
            }
        }

        fn mb(&mut self) -> *mut u8 {
            self.page.0.as_mut_ptr()
        }

        fn process(&mut self) {
            self.rings += 1;
            // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the
            // transport take turns on it, never at once.
            let h: MailboxHeader = unsafe { std::ptr::read(self.mb().cast()) };
            if h.magic != MAILBOX_MAGIC || h.cur_entry > h.end_entry {
                // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the
                // transport take turns on it, never at once.
                unsafe { (*self.mb().cast::<MailboxHeader>()).status = ERR_BAD_REQUEST };
                return;
            }
            // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the
            // transport take turns on it, never at once.
            let ents: *mut MailboxEntry = unsafe { self.mb().add(MAILBOX_ENTRIES_OFFSET).cast() };
            let stop = h.end_entry.min(h.cur_entry + self.per_ring);
            let mut first = STATUS_OK;
            for i in h.cur_entry..stop {
                // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the
                // transport take turns on it, never at once.
                let e = unsafe { &mut *ents.add(i as usize) };
                self.seen.push((e.gpa, e.npages, h.op));
                e.status = if e.gpa % PAGE_SIZE != 0 {
                    ERR_UNALIGNED
                } else if e.npages == 0 {
                    ERR_BAD_REQUEST
                } else if e.npages == 7 && self.busy > 0 {
                    self.busy -= 1;
                    ERR_BUSY
                } else {
                    STATUS_OK
                };
                if first == STATUS_OK {
                    first = e.status;
                }
            }
            let hp = self.mb().cast::<MailboxHeader>();
            // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the
            // transport take turns on it, never at once.
            unsafe {
                (*hp).cur_entry = stop;
                (*hp).status = first;
            }
        }
    }

    fn run(host: &mut FakeHost, op: u32, entries: &mut [MailboxEntry]) -> Batch {
        let mb = host.mb();
        let hp: *mut FakeHost = host;
        // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the transport
        // take turns on it, never at once.
        unsafe { run_batch(mb, op, entries, &mut || (*hp).process()) }
    }

    #[test]
    fn splits_and_rerings() {
        let mut host = FakeHost::new(50);
        let mut es: Vec<MailboxEntry> = (0..400)
            .map(|i| entry(i * PAGE_SIZE, 1 + (i % 3), 0))
            .collect();
        es[7].gpa += 1;
        es[300].npages = 0;
        let b = run(&mut host, OP_CONVERT, &mut es);
        // 169 + 169 + 62 entries, 50 per ring: 4 + 4 + 2 doorbells.
        assert_eq!(b.doorbells, 10);
        assert_eq!(host.rings, 10);
        assert_eq!(b.errors, 2);
        assert_eq!(b.first_error, ERR_UNALIGNED);
        assert_eq!(es[7].status, ERR_UNALIGNED);
        assert_eq!(es[300].status, ERR_BAD_REQUEST);
        assert!(es
            .iter()
            .enumerate()
            .all(|(i, e)| i == 7 || i == 300 || e.status == STATUS_OK));
        let want: Vec<(u64, u64, u32)> = es.iter().map(|e| (e.gpa, e.npages, OP_CONVERT)).collect();
        assert_eq!(host.seen, want, "every entry exactly once, in order");
    }

    #[test]
    fn busy_conversions_are_retried_alone() {
        let mut host = FakeHost::new(u32::MAX);
        host.busy = 3;
        let mut es = [entry(0, 1, 0), entry(PAGE_SIZE, 7, 0), entry(0, 2, 0)];
        let b = run(&mut host, OP_CONVERT, &mut es);
        // One doorbell for the batch, then three retries of the busy entry.
        assert_eq!((b.doorbells, b.errors, b.first_error), (4, 0, STATUS_OK));
        assert!(es.iter().all(|e| e.status == STATUS_OK));
        assert_eq!(host.seen.len(), 6);
        // A range that stays busy gives up after BUSY_RETRIES.
        host.busy = u32::MAX;
        let mut es = [entry(PAGE_SIZE, 7, 0), entry(0, 0, 0)];
        let b = run(&mut host, OP_CONVERT, &mut es);
        assert_eq!((b.doorbells, b.errors), (1 + BUSY_RETRIES, 2));
        assert_eq!((es[0].status, b.first_error), (ERR_BUSY, ERR_BUSY));
        // Accepts are never retried.
        host.busy = 1;
        let mut es = [entry(0, 7, 0)];
        let b = run(&mut host, OP_ACCEPT, &mut es);
        assert_eq!((b.doorbells, es[0].status), (1, ERR_BUSY));
    }

    #[test]
    fn one_doorbell_for_a_full_mailbox() {
        let mut host = FakeHost::new(u32::MAX);
        let mut es: Vec<MailboxEntry> = (0..MAILBOX_MAX_ENTRIES as u64)
            .map(|i| entry(i * HUGE_PAGE_SIZE, PAGES_PER_CHUNK, 0))
            .collect();
        let b = run(&mut host, OP_ACCEPT, &mut es);
        assert_eq!((b.doorbells, b.errors), (1, 0));
        assert!(b.ok());
        let b = run(&mut host, OP_ACCEPT, &mut []);
        assert_eq!(b, Batch::default());
    }

    #[test]
    fn stalled_host_gives_up_with_header_status() {
        let mut host = FakeHost::new(0);
        let mut es = [entry(0, 1, 0), entry(PAGE_SIZE, 1, 0)];
        let b = run(&mut host, OP_CONVERT, &mut es);
        assert_eq!(b.doorbells, MAX_STALLS);
        assert_eq!(b.errors, 2);
        // The fake host wrote STATUS_OK as header status without processing: ERR_INTERNAL.
        assert_eq!(es[0].status, ERR_INTERNAL);

        // A host that rejects the whole request.
        let mut host = FakeHost::new(10);
        let mb = host.mb();
        let hp: *mut FakeHost = &mut host;
        let mut es = [entry(0, 1, 0)];
        // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the transport
        // take turns on it, never at once.
        let b = unsafe {
            run_batch(mb, OP_CONVERT, &mut es, &mut || {
                (*mb.cast::<MailboxHeader>()).magic = 0;
                (*hp).process();
            })
        };
        assert_eq!(
            (b.first_error, es[0].status),
            (ERR_BAD_REQUEST, ERR_BAD_REQUEST)
        );
    }

    #[test]
    fn attrs_and_hints() {
        assert!(is_2m(0x20_0000, 512));
        assert!(is_2m(0x40_0000, 1024));
        assert!(!is_2m(0x20_0000, 0));
        assert!(!is_2m(0x20_1000, 512));
        assert!(!is_2m(0x20_0000, 511));
        assert_eq!(convert_attrs(0x20_0000, 512, false), ATTR_PAGE_SIZE_2M);
        assert_eq!(
            convert_attrs(0x20_0000, 512, true),
            ATTR_PAGE_SIZE_2M | ATTR_ENCRYPTED
        );
        assert_eq!(convert_attrs(0x20_1000, 1, true), ATTR_ENCRYPTED);
        assert_eq!(convert_attrs(0x20_1000, 1, false), 0);
    }

    #[test]
    fn report_and_exit_layout() {
        let mut host = FakeHost::new(1);
        let mb = host.mb();
        let mut r = PoolReport {
            version: POOL_REPORT_VERSION,
            policy_len: 6,
            ..PoolReport::default()
        };
        r.policy[..6].copy_from_slice(b"legacy");
        r.io_errors = 0x1122_3344;
        // A host that does not answer: ERR_INTERNAL.
        // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the transport
        // take turns on it, never at once.
        let st = unsafe { run_report(mb, &r, &mut || {}) };
        assert_eq!(st, ERR_INTERNAL);
        // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the transport
        // take turns on it, never at once.
        let st = unsafe {
            run_report(mb, &r, &mut || {
                (*mb.cast::<MailboxHeader>()).status = STATUS_OK;
            })
        };
        assert_eq!(st, STATUS_OK);
        // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the transport
        // take turns on it, never at once.
        let h: MailboxHeader = unsafe { std::ptr::read(mb.cast()) };
        assert_eq!(
            (h.magic, h.op, h.arg),
            (MAILBOX_MAGIC, OP_REPORT, size_of::<PoolReport>() as u64)
        );
        // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the transport
        // take turns on it, never at once.
        let got: PoolReport = unsafe { std::ptr::read(mb.add(MAILBOX_ENTRIES_OFFSET).cast()) };
        assert_eq!(got, r);
        let mut rung = 0;
        // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the transport
        // take turns on it, never at once.
        unsafe { run_exit(mb, 77, &mut || rung += 1) };
        // SAFETY: (test) `mb` is the fake host's live mailbox page; the fake host and the transport
        // take turns on it, never at once.
        let h: MailboxHeader = unsafe { std::ptr::read(mb.cast()) };
        assert_eq!(
            (h.op, h.arg, h.cur_entry, h.end_entry, rung),
            (OP_EXIT, 77, 0, 0, 1)
        );
    }
}
