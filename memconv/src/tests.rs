//! Tests of the whole service with real stores (memfd, hugetlb, guest_memfd from a real KVM
//! VM), real mmaps and fallocate, and a recording [`HostVm`] that plays KVM's memslot table:
//! guest reads/writes go through the slots it recorded, as KVM would resolve them.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use crate::abi::{
    self, HUGE_PAGE_SIZE, MAILBOX_AREA_END, MAILBOX_BASE_GPA, PAGES_PER_CHUNK, PAGE_SIZE,
};
use crate::host_vm::HostVm;
use crate::service::{ConversionService, MailboxOutcome};
use crate::store::{huge_pages_available, StoreKind};
use crate::{AccessError, Granularity, RamConfig};

const MB: u64 = 1 << 20;
const TO_SHARED: u64 = 0;
const TO_PRIVATE: u64 = abi::ATTR_ENCRYPTED as u64;

/// A KVM memslot table stand-in that records slots, enforces KVM's rules (no overlap, no
/// in-place change, page alignment) and counts pauses.
pub struct FakeHost {
    slots: Mutex<BTreeMap<u32, (u64, u64, u64)>>,
    paused: AtomicBool,
    pub pauses: AtomicU64,
    pub unpaused_edits: AtomicU64,
    pub armed: AtomicBool,
    /// Fail the Nth next set_memslot (0 = never).
    pub fail_in: AtomicU64,
    vm: Mutex<Option<OwnedFd>>,
}

const KVM_CREATE_VM: libc::c_ulong = 0xAE01;
const KVM_CREATE_GUEST_MEMFD: libc::c_ulong = 0xC040_AED4;

#[repr(C)]
struct KvmCreateGuestMemfd {
    size: u64,
    flags: u64,
    reserved: [u64; 6],
}

impl FakeHost {
    pub fn new() -> Arc<FakeHost> {
        Arc::new(FakeHost {
            slots: Mutex::new(BTreeMap::new()),
            paused: AtomicBool::new(false),
            pauses: AtomicU64::new(0),
            unpaused_edits: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            fail_in: AtomicU64::new(0),
            vm: Mutex::new(None),
        })
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, (u64, u64, u64)>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn slot_count(&self) -> usize {
        self.slots().len()
    }

    /// Host address KVM would use for `gpa`, and bytes left in that slot.
    pub fn resolve(&self, gpa: u64) -> Option<(u64, u64)> {
        self.slots()
            .values()
            .find(|(g, s, _)| gpa >= *g && gpa < g + s)
            .map(|(g, s, h)| (h + (gpa - g), g + s - gpa))
    }

    pub fn read(&self, gpa: u64, buf: &mut [u8]) {
        let mut done = 0;
        while done < buf.len() {
            let (h, left) = self.resolve(gpa + done as u64).unwrap_or_else(|| {
                panic!("gpa {:#x} has no memslot (MMIO exit)", gpa + done as u64)
            });
            let n = (left as usize).min(buf.len() - done);
            // SAFETY: the slot's host range is mapped by memconv while the slot exists; the
            // test's guest memory is only written through raw copies like this one.
            unsafe { std::ptr::copy_nonoverlapping(h as *const u8, buf[done..].as_mut_ptr(), n) };
            done += n;
        }
    }

    pub fn write(&self, gpa: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let (h, left) = self.resolve(gpa + done as u64).unwrap_or_else(|| {
                panic!("gpa {:#x} has no memslot (MMIO exit)", gpa + done as u64)
            });
            let n = (left as usize).min(data.len() - done);
            // SAFETY: as in read.
            unsafe { std::ptr::copy_nonoverlapping(data[done..].as_ptr(), h as *mut u8, n) };
            done += n;
        }
    }

    fn open_vm(&self) -> io::Result<i32> {
        let mut vm = self.vm.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = vm.as_ref() {
            return Ok(fd.as_raw_fd());
        }
        // SAFETY: plain open of a device node.
        let kvm = unsafe { libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if kvm < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `kvm` is our fd.
        let kvm = unsafe { OwnedFd::from_raw_fd(kvm) };
        // SAFETY: KVM_CREATE_VM takes the machine type by value.
        let fd = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh VM fd.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = fd.as_raw_fd();
        *vm = Some(fd);
        Ok(raw)
    }
}

impl HostVm for FakeHost {
    fn set_memslot(&self, slot: u32, gpa: u64, size: u64, host_addr: u64) -> io::Result<()> {
        if self.armed.load(Ordering::SeqCst) && !self.paused.load(Ordering::SeqCst) {
            self.unpaused_edits.fetch_add(1, Ordering::SeqCst);
        }
        let n = self.fail_in.load(Ordering::SeqCst);
        if n > 0 {
            self.fail_in.store(n - 1, Ordering::SeqCst);
            if n == 1 {
                return Err(io::Error::from_raw_os_error(libc::ENOMEM));
            }
        }
        let mut slots = self.slots();
        if size == 0 {
            return match slots.remove(&slot) {
                Some(_) => Ok(()),
                None => Err(io::Error::from_raw_os_error(libc::EINVAL)),
            };
        }
        if !gpa.is_multiple_of(PAGE_SIZE)
            || !size.is_multiple_of(PAGE_SIZE)
            || !host_addr.is_multiple_of(PAGE_SIZE)
        {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if slots.contains_key(&slot) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        if slots
            .values()
            .any(|(g, s, _)| gpa < g + s && *g < gpa + size)
        {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        slots.insert(slot, (gpa, size, host_addr));
        Ok(())
    }

    fn create_guest_memfd(&self, size: u64, flags: u64) -> io::Result<OwnedFd> {
        let vm = self.open_vm()?;
        let arg = KvmCreateGuestMemfd {
            size,
            flags,
            reserved: [0; 6],
        };
        // SAFETY: KVM_CREATE_GUEST_MEMFD reads the struct we pass.
        let fd = unsafe { libc::ioctl(vm, KVM_CREATE_GUEST_MEMFD, &arg) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh fd.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn pause_vcpus(&self) {
        assert!(!self.paused.swap(true, Ordering::SeqCst), "nested pause");
        self.pauses.fetch_add(1, Ordering::SeqCst);
    }

    fn resume_vcpus(&self) {
        assert!(
            self.paused.swap(false, Ordering::SeqCst),
            "resume without pause"
        );
    }
}

static HUGE_LOCK: Mutex<()> = Mutex::new(());

/// Make sure at least `n` free 2 MiB huge pages exist, raising nr_hugepages (never lowering
/// it) if needed. Fails the test with a clear message when that is impossible.
pub fn ensure_hugepages(n: u64) {
    let _g = HUGE_LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let (free, total) = huge_pages_available();
    if free >= n {
        return;
    }
    let want = total + (n - free);
    let r = std::fs::write("/proc/sys/vm/nr_hugepages", format!("{want}\n"));
    let (free2, total2) = huge_pages_available();
    assert!(
        free2 >= n,
        "hugetlb tests need {n} free 2 MiB huge pages; {free2} free (nr_hugepages {total2}); \
         raising nr_hugepages to {want} failed ({r:?}). Run as root or `echo {want} > /proc/sys/vm/nr_hugepages`"
    );
}

pub fn service(
    size: u64,
    private: StoreKind,
    shared: StoreKind,
    g: Granularity,
) -> (Arc<FakeHost>, ConversionService) {
    if private.is_huge() || shared.is_huge() {
        ensure_hugepages(256);
    }
    let host = FakeHost::new();
    let cfg = RamConfig {
        size,
        private,
        shared,
        granularity: g,
        cpus: 2,
    };
    let svc = match ConversionService::new(cfg, host.clone()) {
        Ok(s) => s,
        Err(e) => panic!("creating service {private}/{shared}: {e}"),
    };
    host.armed.store(true, Ordering::SeqCst);
    (host, svc)
}

/// Fill each page with a byte pattern derived from its index, as the guest would.
fn pattern(p: u64, gen: u8) -> u8 {
    (p as u8).wrapping_mul(31).wrapping_add(gen) | 1
}

#[test]
fn smoke_memfd_boot_path() {
    let (host, svc) = service(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Memfd,
        Granularity::Page4K,
    );
    assert_eq!(host.slot_count(), 1);
    // The VMM writes the image through private_memory; the guest sees it.
    svc.private_memory()
        .write_slice(b"hello guest", GuestAddress(abi::IMAGE_BASE_GPA))
        .unwrap();
    let mut buf = [0u8; 11];
    host.read(abi::IMAGE_BASE_GPA, &mut buf);
    assert_eq!(&buf, b"hello guest");
    // The mailbox chunk is shared: guest writes are visible through shared_memory.
    host.write(MAILBOX_BASE_GPA + 8, b"mbx");
    let mut m = [0u8; 3];
    svc.shared_memory()
        .read_slice(&mut m, GuestAddress(MAILBOX_BASE_GPA + 8))
        .unwrap();
    assert_eq!(&m, b"mbx");
    assert!(svc.check_shared(MAILBOX_BASE_GPA, 4096).is_ok());
    assert!(matches!(
        svc.check_shared(abi::IMAGE_BASE_GPA, 1),
        Err(AccessError::NotShared { .. })
    ));
    let st = svc.stats();
    assert_eq!(st.memslots, 1);
}

const PAIRS: [(StoreKind, StoreKind); 5] = [
    (StoreKind::Memfd, StoreKind::Memfd),
    (StoreKind::Gmem, StoreKind::Memfd),
    (StoreKind::Memfd, StoreKind::Hugetlb),
    (StoreKind::Gmem, StoreKind::Hugetlb),
    (StoreKind::Hugetlb, StoreKind::Hugetlb),
];

/// The guest's expected memory: one fill byte per page (0 = zeros), and the attribute.
struct Model {
    fill: Vec<u8>,
    private: Vec<bool>,
}

impl Model {
    fn new(size: u64) -> Model {
        let n = (size / PAGE_SIZE) as usize;
        let mut private = vec![true; n];
        for p in (MAILBOX_BASE_GPA / PAGE_SIZE)..(MAILBOX_AREA_END / PAGE_SIZE) {
            private[p as usize] = false;
        }
        Model {
            fill: vec![0; n],
            private,
        }
    }
}

/// The guest fills page `p` with `v`.
fn guest_fill(host: &FakeHost, m: &mut Model, p: u64, v: u8) {
    host.write(p * PAGE_SIZE, &[v; PAGE_SIZE as usize]);
    m.fill[p as usize] = v;
}

/// Check the guest's view (through the recorded memslots), the device view of shared pages,
/// and the attributes against the model. `full` pages are compared byte for byte, the others
/// at a few offsets.
fn check_view(host: &FakeHost, svc: &ConversionService, m: &Model, full: &[(u64, u64)], ctx: &str) {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for p in 0..m.fill.len() as u64 {
        let want = m.fill[p as usize];
        let gpa = p * PAGE_SIZE;
        if (MAILBOX_BASE_GPA..MAILBOX_AREA_END).contains(&gpa) {
            assert!(
                !svc.is_private(gpa),
                "{ctx}: mailbox page {p:#x} must stay shared"
            );
            continue;
        }
        let is_full = full.iter().any(|&(a, b)| p >= a && p < b);
        if is_full {
            host.read(p * PAGE_SIZE, &mut page);
            if let Some(i) = page.iter().position(|b| *b != want) {
                panic!(
                    "{ctx}: page {p:#x} byte {i} = {:#x}, want {want:#x}",
                    page[i]
                );
            }
        } else {
            for off in [0u64, 1234, PAGE_SIZE - 1] {
                let mut b = [0u8; 1];
                host.read(p * PAGE_SIZE + off, &mut b);
                assert_eq!(b[0], want, "{ctx}: page {p:#x} offset {off}");
            }
        }
        let gpa = p * PAGE_SIZE;
        assert_eq!(
            svc.is_private(gpa),
            m.private[p as usize],
            "{ctx}: attribute of page {p:#x}"
        );
        if !m.private[p as usize] {
            assert!(svc.check_shared(gpa, PAGE_SIZE).is_ok());
            let mut b = [0u8; 1];
            svc.shared_memory()
                .read_slice(&mut b, GuestAddress(gpa + 77))
                .unwrap();
            assert_eq!(b[0], want, "{ctx}: device view of shared page {p:#x}");
        } else {
            assert!(svc.check_shared(gpa, PAGE_SIZE).is_err());
        }
    }
}

fn check_accounting(svc: &ConversionService, touched_all: bool, ctx: &str) {
    let st = svc.stats();
    assert!(
        st.kernel_query_errors.is_empty(),
        "{ctx}: {:?}",
        st.kernel_query_errors
    );
    for u in [&st.private_store, &st.shared_store] {
        assert!(
            u.kernel_bytes <= u.engine_bound_bytes,
            "{ctx}: {} store: kernel {} > engine bound {}\n{st}",
            u.kind,
            u.kernel_bytes,
            u.engine_bound_bytes
        );
        assert!(
            u.kernel_resident_bytes <= u.engine_bound_bytes,
            "{ctx}: {} store: resident {} > engine bound {}\n{st}",
            u.kind,
            u.kernel_resident_bytes,
            u.engine_bound_bytes
        );
        if u.kind == StoreKind::Hugetlb {
            assert_eq!(
                u.kernel_bytes, u.kernel_resident_bytes,
                "{ctx}: hugetlb st_blocks vs mincore\n{st}"
            );
        }
    }
    assert!(
        st.double_alloc.kernel_within_bound,
        "{ctx}: kernel double allocation above computed\n{st}"
    );
    if touched_all {
        assert!(
            st.double_alloc.agree,
            "{ctx}: computed != kernel double allocation\n{st}"
        );
    }
}

/// Convert and apply to the model; returns the status.
fn convert(svc: &ConversionService, m: &mut Model, gpa: u64, npages: u64, attrs: u64) -> u32 {
    let st = svc.map_gpa_range(gpa, npages, attrs);
    if st == abi::STATUS_OK {
        let to_private = attrs & TO_PRIVATE != 0;
        for p in gpa / PAGE_SIZE..gpa / PAGE_SIZE + npages {
            if m.private[p as usize] != to_private {
                m.private[p as usize] = to_private;
                m.fill[p as usize] = 0;
            }
        }
    }
    st
}

fn scenario(private: StoreKind, shared: StoreKind, g: Granularity) {
    let size = 32 * MB;
    let (host, svc) = service(size, private, shared, g);
    let ctx0 = format!("{private}/{shared}/{g}");
    let mut m = Model::new(size);
    let first = MAILBOX_AREA_END / PAGE_SIZE;
    let npages = size / PAGE_SIZE;
    for p in first..npages {
        guest_fill(&host, &mut m, p, pattern(p, 1));
    }
    check_view(&host, &svc, &m, &[], &ctx0);
    check_accounting(&svc, true, &ctx0);
    let c = |i: u64| i * HUGE_PAGE_SIZE;
    let steps: Vec<(u64, u64, u64)> = match g {
        Granularity::Page4K => vec![
            (c(2) + 3 * PAGE_SIZE, 5, TO_SHARED),
            (c(4), PAGES_PER_CHUNK, TO_SHARED),
            (c(6) - 2 * PAGE_SIZE, 5, TO_SHARED),
            (c(2) + 4 * PAGE_SIZE, 1, TO_PRIVATE),
            (c(2), 16, TO_SHARED),
            (c(4), PAGES_PER_CHUNK, TO_PRIVATE),
            (c(2), PAGES_PER_CHUNK * 2, TO_PRIVATE),
            (c(5), PAGES_PER_CHUNK * 3, TO_SHARED),
            (c(5) + 100 * PAGE_SIZE, 1, TO_PRIVATE),
            (c(5) + 100 * PAGE_SIZE, 1, TO_SHARED),
            (c(5), PAGES_PER_CHUNK * 3, TO_PRIVATE),
        ],
        Granularity::Huge2M => vec![
            (c(3), PAGES_PER_CHUNK, TO_SHARED),
            (c(5), PAGES_PER_CHUNK * 2, TO_SHARED),
            (c(3), PAGES_PER_CHUNK, TO_PRIVATE),
            (c(5), PAGES_PER_CHUNK * 4, TO_PRIVATE),
            (c(15), PAGES_PER_CHUNK, TO_SHARED),
        ],
    };
    for (i, &(gpa, n, attrs)) in steps.iter().enumerate() {
        let ctx = format!("{ctx0} step {i} ({gpa:#x}, {n}, {attrs})");
        let st = convert(&svc, &mut m, gpa, n, attrs);
        assert_eq!(st, abi::STATUS_OK, "{ctx}: status {}", abi::status_name(st));
        let full = [(gpa / PAGE_SIZE, gpa / PAGE_SIZE + n)];
        check_view(&host, &svc, &m, &full, &ctx);
        check_accounting(&svc, false, &ctx);
        // The guest now uses every converted page (and so touches everything it owns).
        for p in full[0].0..full[0].1 {
            guest_fill(&host, &mut m, p, pattern(p, 2 + i as u8));
        }
        check_view(&host, &svc, &m, &full, &ctx);
        check_accounting(&svc, true, &ctx);
        assert_eq!(
            host.unpaused_edits.load(Ordering::SeqCst),
            0,
            "{ctx}: memslot edit without pause"
        );
    }
    let st = svc.stats();
    if private.is_huge() || shared.is_huge() {
        if g == Granularity::Page4K {
            assert!(
                st.mixed_chunks_peak > 0 && host.pauses.load(Ordering::SeqCst) > 0,
                "{ctx0}\n{st}"
            );
            assert!(st.double_alloc.computed_peak_bytes > 0, "{ctx0}\n{st}");
        }
    } else {
        assert_eq!(
            host.pauses.load(Ordering::SeqCst),
            0,
            "{ctx0}: 4K hosts never pause"
        );
    }
    if g == Granularity::Huge2M {
        assert_eq!(st.mixed_chunks_peak, 0);
        assert_eq!(
            host.pauses.load(Ordering::SeqCst),
            0,
            "{ctx0}: 2M conversions never change slots"
        );
        assert_eq!(st.double_alloc.computed_peak_bytes, 0);
    }
    // Everything uniform again: the layout is one slot again.
    if st.mixed_chunks == 0 {
        assert_eq!(
            host.slot_count(),
            1,
            "{ctx0}: slots did not merge back\n{st}"
        );
    }
    assert_eq!(
        st.to_shared.total() + st.to_private.total(),
        steps.len() as u64
    );
    assert!(
        st.pages_converted > 0 && st.rejects_total == 0,
        "{ctx0}\n{st}"
    );
}

#[test]
fn scenario_memfd_memfd_4k() {
    scenario(StoreKind::Memfd, StoreKind::Memfd, Granularity::Page4K);
}
#[test]
fn scenario_memfd_memfd_2m() {
    scenario(StoreKind::Memfd, StoreKind::Memfd, Granularity::Huge2M);
}
#[test]
fn scenario_gmem_memfd_4k() {
    scenario(StoreKind::Gmem, StoreKind::Memfd, Granularity::Page4K);
}
#[test]
fn scenario_gmem_memfd_2m() {
    scenario(StoreKind::Gmem, StoreKind::Memfd, Granularity::Huge2M);
}
#[test]
fn scenario_memfd_hugetlb_4k() {
    scenario(StoreKind::Memfd, StoreKind::Hugetlb, Granularity::Page4K);
}
#[test]
fn scenario_memfd_hugetlb_2m() {
    scenario(StoreKind::Memfd, StoreKind::Hugetlb, Granularity::Huge2M);
}
#[test]
fn scenario_gmem_hugetlb_4k() {
    scenario(StoreKind::Gmem, StoreKind::Hugetlb, Granularity::Page4K);
}
#[test]
fn scenario_gmem_hugetlb_2m() {
    scenario(StoreKind::Gmem, StoreKind::Hugetlb, Granularity::Huge2M);
}
#[test]
fn scenario_hugetlb_hugetlb_4k() {
    scenario(StoreKind::Hugetlb, StoreKind::Hugetlb, Granularity::Page4K);
}
#[test]
fn scenario_hugetlb_hugetlb_2m() {
    scenario(StoreKind::Hugetlb, StoreKind::Hugetlb, Granularity::Huge2M);
}

#[test]
fn print_stats_example() {
    for (private, shared) in PAIRS {
        let (host, svc) = service(32 * MB, private, shared, Granularity::Page4K);
        for p in 1024..2048 {
            host.write(p * PAGE_SIZE, &[1]);
        }
        assert_eq!(
            svc.map_gpa_range(5 * HUGE_PAGE_SIZE + 8 * PAGE_SIZE, 3, TO_SHARED),
            0
        );
        host.write(5 * HUGE_PAGE_SIZE + 8 * PAGE_SIZE, &[1]);
        println!("{}", svc.stats());
    }
}

fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is a repr(C) plain-integer abi struct without padding bytes we care about.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
}

#[test]
fn validation_codes() {
    let (_host, svc) = service(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Memfd,
        Granularity::Page4K,
    );
    let c4 = 4 * HUGE_PAGE_SIZE;
    let cases: &[(u64, u64, u64, u32)] = &[
        (c4, 1, 1 << 5, abi::ERR_INVALID_ATTRS),
        (c4, 1, 3, abi::ERR_INVALID_ATTRS),
        (c4, 1, 1 << 40, abi::ERR_INVALID_ATTRS),
        (c4 + 1, 1, 0, abi::ERR_UNALIGNED),
        (c4, 0, 0, abi::ERR_BAD_REQUEST),
        (c4, u64::MAX, 0, abi::ERR_OUT_OF_RAM),
        (u64::MAX - 4095, 2, 0, abi::ERR_OUT_OF_RAM),
        (32 * MB - PAGE_SIZE, 2, 0, abi::ERR_OUT_OF_RAM),
        (abi::MMIO_BASE_GPA, 1, 0, abi::ERR_RESERVED),
        (0, 1, 0, abi::ERR_RESERVED),
        (HUGE_PAGE_SIZE - PAGE_SIZE, 2, 0, abi::ERR_RESERVED),
        (MAILBOX_BASE_GPA, 1, 0, abi::ERR_RESERVED),
        (MAILBOX_AREA_END - PAGE_SIZE, 2, 0, abi::ERR_RESERVED),
        (c4, 1, 2, abi::STATUS_OK),
        (c4, 1, 2, abi::STATUS_OK),
        (c4, 1, TO_PRIVATE | 1, abi::STATUS_OK),
    ];
    for &(gpa, n, attrs, want) in cases {
        assert_eq!(
            svc.map_gpa_range(gpa, n, attrs),
            want,
            "({gpa:#x}, {n}, {attrs:#x})"
        );
    }
    let st = svc.stats();
    assert_eq!(st.noop_pages, 1);
    assert_eq!(st.to_shared.k4, 2);
    assert_eq!(st.to_private.k4, 1);
    let by = |code: u32| {
        st.rejects
            .iter()
            .find(|r| r.code == code)
            .map(|r| r.count)
            .unwrap_or(0)
    };
    assert_eq!(by(abi::ERR_INVALID_ATTRS), 3);
    assert_eq!(by(abi::ERR_RESERVED), 5);
    assert_eq!(by(abi::ERR_OUT_OF_RAM), 3);
    assert_eq!(st.rejects_total, 13);
    // 2M policy.
    let (_h2, svc2) = service(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Memfd,
        Granularity::Huge2M,
    );
    assert_eq!(
        svc2.map_gpa_range(c4 + PAGE_SIZE, PAGES_PER_CHUNK, 0),
        abi::ERR_REQUIRES_2M
    );
    assert_eq!(svc2.map_gpa_range(c4, 1, 0), abi::ERR_REQUIRES_2M);
    assert_eq!(svc2.map_gpa_range(c4, PAGES_PER_CHUNK, 0), abi::STATUS_OK);
    let st2 = svc2.stats();
    assert_eq!(st2.rejects[abi::ERR_REQUIRES_2M as usize - 1].count, 2);
    assert_eq!(st2.to_shared.m2, 1);
}

#[test]
fn accept_and_double_accept() {
    let (_host, svc) = service(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Memfd,
        Granularity::Page4K,
    );
    let c = |i: u64| i * HUGE_PAGE_SIZE;
    assert_eq!(svc.accept(c(2), PAGES_PER_CHUNK * 2), abi::STATUS_OK);
    assert_eq!(
        svc.accept(c(2) + PAGE_SIZE, PAGES_PER_CHUNK),
        abi::ERR_UNALIGNED
    );
    assert_eq!(svc.accept(c(5), 3), abi::ERR_UNALIGNED);
    assert_eq!(svc.accept(c(0), PAGES_PER_CHUNK), abi::ERR_RESERVED);
    assert_eq!(svc.accept(c(1), PAGES_PER_CHUNK), abi::ERR_RESERVED);
    assert_eq!(svc.accept(c(16), PAGES_PER_CHUNK), abi::ERR_OUT_OF_RAM);
    assert_eq!(svc.accept(c(4), 0), abi::ERR_BAD_REQUEST);
    // Overlaps an accepted unit: nothing of the entry is accepted.
    assert_eq!(
        svc.accept(c(3), PAGES_PER_CHUNK * 3),
        abi::ERR_DOUBLE_ACCEPT
    );
    assert_eq!(
        svc.accept(c(4), PAGES_PER_CHUNK * 2),
        abi::STATUS_OK,
        "c4..c6 must still be unaccepted"
    );
    assert_eq!(svc.accept(c(2), PAGES_PER_CHUNK), abi::ERR_DOUBLE_ACCEPT);
    let st = svc.stats();
    assert_eq!(st.accept_entries, 2);
    assert_eq!(st.accepted_units, 4);
    assert_eq!(st.double_accept_violations, 2);
}

/// Write a mailbox page for `cpu` as the guest: header + entries.
fn guest_mailbox(host: &FakeHost, cpu: u32, op: u32, entries: &[(u64, u64, u32)], arg: u64) {
    let h = abi::MailboxHeader {
        magic: abi::MAILBOX_MAGIC,
        op,
        cur_entry: 0,
        end_entry: entries.len() as u32,
        status: 0xffff,
        reserved: 0,
        arg,
    };
    let mut page = bytes_of(&h);
    for &(gpa, npages, attrs) in entries {
        page.extend(bytes_of(&abi::MailboxEntry {
            gpa,
            npages,
            attrs,
            status: 0xffff,
        }));
    }
    host.write(MAILBOX_BASE_GPA + cpu as u64 * PAGE_SIZE, &page);
}

fn read_header(host: &FakeHost, cpu: u32) -> abi::MailboxHeader {
    let mut b = [0u8; 32];
    host.read(MAILBOX_BASE_GPA + cpu as u64 * PAGE_SIZE, &mut b);
    // SAFETY: 32 bytes, header is plain integers.
    unsafe { std::ptr::read_unaligned(b.as_ptr() as *const abi::MailboxHeader) }
}

fn read_entry_status(host: &FakeHost, cpu: u32, i: usize) -> u32 {
    let mut b = [0u8; 4];
    host.read(
        MAILBOX_BASE_GPA + cpu as u64 * PAGE_SIZE + 32 + i as u64 * 24 + 20,
        &mut b,
    );
    u32::from_le_bytes(b)
}

#[test]
fn mailbox_batch_exit_report_and_garbage() {
    let (host, svc) = service(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Hugetlb,
        Granularity::Page4K,
    );
    let c = |i: u64| i * HUGE_PAGE_SIZE;
    guest_mailbox(
        &host,
        1,
        abi::OP_CONVERT,
        &[
            (c(3), 4, 0),
            (c(3) + 1, 1, 0),
            (c(4), PAGES_PER_CHUNK, 0),
            (0, 1, 0),
            (c(3), 4, abi::ATTR_ENCRYPTED),
        ],
        0,
    );
    assert_eq!(svc.service_mailbox(1), MailboxOutcome::Handled);
    let h = read_header(&host, 1);
    assert_eq!(
        (h.cur_entry, h.end_entry, h.status),
        (5, 5, abi::ERR_UNALIGNED)
    );
    let st: Vec<u32> = (0..5).map(|i| read_entry_status(&host, 1, i)).collect();
    assert_eq!(st, vec![0, abi::ERR_UNALIGNED, 0, abi::ERR_RESERVED, 0]);
    assert!(svc.is_private(c(3)));
    assert!(!svc.is_private(c(4) + 5 * PAGE_SIZE));
    // Accept through the mailbox.
    guest_mailbox(
        &host,
        0,
        abi::OP_ACCEPT,
        &[(c(6), PAGES_PER_CHUNK, 0), (c(6), PAGES_PER_CHUNK, 0)],
        0,
    );
    assert_eq!(svc.service_mailbox(0), MailboxOutcome::Handled);
    assert_eq!(read_header(&host, 0).status, abi::ERR_DOUBLE_ACCEPT);
    // Report.
    let mut r = abi::PoolReport {
        version: abi::POOL_REPORT_VERSION,
        policy_len: 6,
        maps: 42,
        ..Default::default()
    };
    r.policy[..6].copy_from_slice(b"legacy");
    let h = abi::MailboxHeader {
        magic: abi::MAILBOX_MAGIC,
        op: abi::OP_REPORT,
        arg: std::mem::size_of::<abi::PoolReport>() as u64,
        ..Default::default()
    };
    let mut page = bytes_of(&h);
    page.extend(bytes_of(&r));
    host.write(MAILBOX_BASE_GPA, &page);
    let decoded = crate::stats::PoolReportSnapshot::from(&r);
    assert_eq!((decoded.policy.as_str(), decoded.maps), ("legacy", 42));
    assert_eq!(svc.service_mailbox(0), MailboxOutcome::Report(decoded));
    // Bad report length.
    host.write(MAILBOX_BASE_GPA + 24, &7u64.to_le_bytes());
    assert_eq!(
        svc.service_mailbox(0),
        MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST)
    );
    // Exit.
    guest_mailbox(&host, 1, abi::OP_EXIT, &[], 77);
    assert_eq!(svc.service_mailbox(1), MailboxOutcome::Exit(77));
    // Garbage: bad magic, bad op, bad cur/end, cpu out of range.
    host.write(MAILBOX_BASE_GPA, &[0xAB; 4096]);
    assert_eq!(
        svc.service_mailbox(0),
        MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST)
    );
    guest_mailbox(&host, 0, 99, &[], 0);
    assert_eq!(
        svc.service_mailbox(0),
        MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST)
    );
    let mut h = abi::MailboxHeader {
        magic: abi::MAILBOX_MAGIC,
        op: abi::OP_CONVERT,
        cur_entry: 0,
        end_entry: abi::MAILBOX_MAX_ENTRIES as u32 + 1,
        ..Default::default()
    };
    host.write(MAILBOX_BASE_GPA, &bytes_of(&h));
    assert_eq!(
        svc.service_mailbox(0),
        MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST)
    );
    h.end_entry = 3;
    h.cur_entry = 4;
    host.write(MAILBOX_BASE_GPA, &bytes_of(&h));
    assert_eq!(
        svc.service_mailbox(0),
        MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST)
    );
    assert_eq!(read_header(&host, 0).status, abi::ERR_BAD_REQUEST);
    assert_eq!(
        svc.service_mailbox(2),
        MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST)
    );
    assert_eq!(
        svc.service_mailbox(u32::MAX),
        MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST)
    );
    // A full mailbox of 169 entries in one exit.
    let entries: Vec<(u64, u64, u32)> = (0..abi::MAILBOX_MAX_ENTRIES as u64)
        .map(|i| (c(8) + i * PAGE_SIZE, 1, 0))
        .collect();
    guest_mailbox(&host, 0, abi::OP_CONVERT, &entries, 0);
    assert_eq!(svc.service_mailbox(0), MailboxOutcome::Handled);
    assert_eq!(read_header(&host, 0).status, abi::STATUS_OK);
    let st = svc.stats();
    assert_eq!(st.doorbells, 12);
    assert_eq!(st.mailbox_ranges, 5 + 2 + abi::MAILBOX_MAX_ENTRIES as u64);
    assert_eq!(st.bad_mailboxes, 7);
    assert_eq!(
        st.pool_report.as_ref().map(|p| (p.policy.as_str(), p.maps)),
        Some(("legacy", 42))
    );
    let json = format!("{:?}", st.summary());
    assert!(json.contains("legacy"));
}

#[test]
fn memslot_failure_rolls_back() {
    let (host, svc) = service(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Hugetlb,
        Granularity::Page4K,
    );
    let mut m = Model::new(32 * MB);
    for p in (4 * PAGES_PER_CHUNK)..(6 * PAGES_PER_CHUNK) {
        guest_fill(&host, &mut m, p, pattern(p, 9));
    }
    let slots_before = host.slot_count();
    // Fail the 2nd set_memslot of the next layout change (the first create).
    host.fail_in.store(2, Ordering::SeqCst);
    let st = svc.map_gpa_range(4 * HUGE_PAGE_SIZE + 10 * PAGE_SIZE, 3, TO_SHARED);
    assert_eq!(st, abi::ERR_INTERNAL);
    assert_eq!(host.slot_count(), slots_before);
    check_view(&host, &svc, &m, &[], "after failed memslot edit");
    let s = svc.stats();
    assert_eq!(s.unrecovered_failures, 0);
    assert_eq!(s.mixed_chunks, 0);
    assert!(s.double_alloc.kernel_within_bound);
    // And it works afterwards.
    assert_eq!(
        convert(
            &svc,
            &mut m,
            4 * HUGE_PAGE_SIZE + 10 * PAGE_SIZE,
            3,
            TO_SHARED
        ),
        0
    );
    check_view(&host, &svc, &m, &[], "after retry");
}

#[test]
fn memslot_limit_rejects_with_no_memory() {
    let (host, svc) = service(
        32 * MB,
        StoreKind::Hugetlb,
        StoreKind::Hugetlb,
        Granularity::Page4K,
    );
    svc.set_memslot_limit(6);
    let mut m = Model::new(32 * MB);
    let c = |i: u64| i * HUGE_PAGE_SIZE;
    // One mixed chunk: view, 3 runs, view = 5 slots.
    assert_eq!(convert(&svc, &mut m, c(4) + 8 * PAGE_SIZE, 1, TO_SHARED), 0);
    assert_eq!(host.slot_count(), 5);
    // A second hole in the same chunk would need 7.
    assert_eq!(
        convert(&svc, &mut m, c(4) + 20 * PAGE_SIZE, 1, TO_SHARED),
        abi::ERR_NO_MEMORY
    );
    assert!(svc.is_private(c(4) + 20 * PAGE_SIZE));
    assert_eq!(host.slot_count(), 5);
    check_view(&host, &svc, &m, &[], "after slot-limit reject");
    // Converting the rest of the hole's neighbourhood back merges everything again.
    assert_eq!(convert(&svc, &mut m, c(4), PAGES_PER_CHUNK, TO_PRIVATE), 0);
    assert_eq!(host.slot_count(), 1);
}

/// A hugetlb file on a private hugetlbfs mount limited to `pages` 2 MiB pages.
fn limited_hugetlb_store(size: u64, pages: u64) -> crate::store::Store {
    use std::ffi::CString;
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = format!(
        "/tmp/memconv-hugetlbfs-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    std::fs::create_dir_all(&dir).unwrap();
    let cdir = CString::new(dir.clone()).unwrap();
    let opts = CString::new(format!("pagesize=2M,size={}", pages * HUGE_PAGE_SIZE)).unwrap();
    // SAFETY: mount with valid C strings.
    let r = unsafe {
        libc::mount(
            c"none".as_ptr(),
            cdir.as_ptr(),
            c"hugetlbfs".as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    };
    assert_eq!(
        r,
        0,
        "mounting a size-limited hugetlbfs at {dir} failed (need root): {}",
        io::Error::last_os_error()
    );
    let path = format!("{dir}/store");
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(size).unwrap();
    // SAFETY: lazy unmount of our own mount; the open file keeps the fs alive.
    unsafe { libc::umount2(cdir.as_ptr(), libc::MNT_DETACH) };
    let _ = std::fs::remove_dir(&dir);
    crate::store::Store::from_fd(StoreKind::Hugetlb, "shared", size, OwnedFd::from(file)).unwrap()
}

#[test]
fn hugetlb_exhaustion_is_a_clean_error() {
    ensure_hugepages(64);
    for private in [StoreKind::Memfd, StoreKind::Hugetlb] {
        let size = 32 * MB;
        let host = FakeHost::new();
        let p = crate::store::Store::create(private, "private", size, None).unwrap();
        let s = limited_hugetlb_store(size, 3);
        let cfg = RamConfig {
            size,
            private,
            shared: StoreKind::Hugetlb,
            granularity: Granularity::Page4K,
            cpus: 1,
        };
        let svc = ConversionService::with_stores(cfg, p, s, host.clone()).unwrap();
        host.armed.store(true, Ordering::SeqCst);
        let mut m = Model::new(size);
        for pg in (2 * PAGES_PER_CHUNK)..(size / PAGE_SIZE) {
            guest_fill(&host, &mut m, pg, pattern(pg, 3));
        }
        let c = |i: u64| i * HUGE_PAGE_SIZE;
        assert_eq!(convert(&svc, &mut m, c(3), PAGES_PER_CHUNK, TO_SHARED), 0);
        assert_eq!(convert(&svc, &mut m, c(5), 3, TO_SHARED), 0);
        let slots = host.slot_count();
        assert_eq!(
            convert(&svc, &mut m, c(7) + PAGE_SIZE, 1, TO_SHARED),
            abi::ERR_NO_MEMORY
        );
        assert_eq!(
            convert(&svc, &mut m, c(9), PAGES_PER_CHUNK * 2, TO_SHARED),
            abi::ERR_NO_MEMORY
        );
        assert_eq!(host.slot_count(), slots);
        check_view(
            &host,
            &svc,
            &m,
            &[(c(7) / PAGE_SIZE, c(11) / PAGE_SIZE)],
            "after ENOSPC",
        );
        check_accounting(&svc, true, "after ENOSPC");
        // Same chunk as an existing shared page: no new huge page needed.
        assert_eq!(
            convert(&svc, &mut m, c(5) + 100 * PAGE_SIZE, 1, TO_SHARED),
            0
        );
        // Free one and retry.
        assert_eq!(convert(&svc, &mut m, c(3), PAGES_PER_CHUNK, TO_PRIVATE), 0);
        assert_eq!(convert(&svc, &mut m, c(7) + PAGE_SIZE, 1, TO_SHARED), 0);
        check_view(
            &host,
            &svc,
            &m,
            &[(c(3) / PAGE_SIZE, c(8) / PAGE_SIZE)],
            "after retry",
        );
        let st = svc.stats();
        assert_eq!(st.rejects[abi::ERR_NO_MEMORY as usize - 1].count, 2);
    }
}

#[test]
fn creation_errors_are_clear() {
    let host = FakeHost::new();
    let cfg = |size, private, shared| RamConfig {
        size,
        private,
        shared,
        granularity: Granularity::Page4K,
        cpus: 1,
    };
    let e = ConversionService::new(
        cfg(32 * MB + 4096, StoreKind::Memfd, StoreKind::Memfd),
        host.clone(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("multiple of 2 MiB"), "{e}");
    let e = ConversionService::new(
        cfg(8 * MB, StoreKind::Memfd, StoreKind::Memfd),
        host.clone(),
    )
    .err()
    .unwrap();
    assert!(matches!(e, crate::Error::BadSize { .. }));
    let e = ConversionService::new(
        cfg(32 * MB, StoreKind::Memfd, StoreKind::Gmem),
        host.clone(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("private store"), "{e}");
    struct NoGmem;
    impl HostVm for NoGmem {
        fn set_memslot(&self, _: u32, _: u64, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn create_guest_memfd(&self, _: u64, _: u64) -> io::Result<OwnedFd> {
            Err(io::Error::from_raw_os_error(libc::EINVAL))
        }
        fn pause_vcpus(&self) {}
        fn resume_vcpus(&self) {}
    }
    let e = ConversionService::new(
        cfg(32 * MB, StoreKind::Gmem, StoreKind::Memfd),
        Arc::new(NoGmem),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("guest_memfd"), "{e}");
    let msg = crate::store::huge_pages_error(1 << 40).to_string();
    assert!(
        msg.contains("need 1099511627776")
            && msg.contains("echo")
            && msg.contains("/proc/sys/vm/nr_hugepages"),
        "{msg}"
    );
    let e = ConversionService::new(
        cfg(abi::MAX_RAM, StoreKind::Hugetlb, StoreKind::Hugetlb),
        host,
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("huge pages"), "{e}");
    assert_eq!("hugetlb".parse::<StoreKind>().unwrap(), StoreKind::Hugetlb);
    assert_eq!("2m".parse::<Granularity>().unwrap().to_string(), "2m");
    assert!("1g".parse::<Granularity>().is_err());
}

#[derive(Debug, Clone)]
enum Op {
    Convert(u64, u64, u64),
    Accept(u64, u64),
    Touch(u64, u8),
    Mailbox {
        cpu: u32,
        op: u32,
        cur: u32,
        end: u32,
        entries: Vec<(u64, u64, u32)>,
    },
    Garbage {
        cpu: u32,
        bytes: Vec<u8>,
    },
}

const PROP_RAM: u64 = 16 * MB;

fn gpa_strategy(huge: bool) -> impl Strategy<Value = u64> {
    let pages = PROP_RAM / PAGE_SIZE;
    let chunks = PROP_RAM / HUGE_PAGE_SIZE;
    prop_oneof![
        14 => if huge { (2..chunks).prop_map(|c| c * HUGE_PAGE_SIZE).boxed() } else { (2 * PAGES_PER_CHUNK..pages).prop_map(|p| p * PAGE_SIZE).boxed() },
        2 => (0..chunks + 2).prop_map(|c| c * HUGE_PAGE_SIZE),
        1 => any::<u64>(),
        1 => 0..PROP_RAM + 8192,
        1 => Just(abi::MMIO_BASE_GPA),
    ]
}

fn npages_strategy(huge: bool) -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => if huge { (1..3u64).prop_map(|n| n * PAGES_PER_CHUNK).boxed() } else { (1..8u64).boxed() },
        3 => 1..1100u64,
        2 => Just(PAGES_PER_CHUNK),
        1 => Just(0u64),
        1 => any::<u64>(),
    ]
}

fn attrs_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![
        8 => Just(0u64),
        8 => Just(TO_PRIVATE),
        1 => Just(1u64),
        1 => Just(TO_PRIVATE | 1),
        1 => any::<u64>(),
        1 => 0..64u64,
    ]
}

fn op_strategy(huge: bool) -> impl Strategy<Value = Op> {
    let entry = (gpa_strategy(huge), npages_strategy(huge), attrs_strategy())
        .prop_map(|(g, n, a)| (g, n, a as u32));
    prop_oneof![
        8 => (gpa_strategy(huge), npages_strategy(huge), attrs_strategy()).prop_map(|(g, n, a)| Op::Convert(g, n, a)),
        2 => (gpa_strategy(true), prop_oneof![Just(PAGES_PER_CHUNK), Just(2 * PAGES_PER_CHUNK), 0..1100u64]).prop_map(|(g, n)| Op::Accept(g, n)),
        4 => ((2 * PAGES_PER_CHUNK)..(PROP_RAM / PAGE_SIZE), 1..=255u8).prop_map(|(p, v)| Op::Touch(p, v)),
        3 => (0..3u32, prop_oneof![Just(abi::OP_CONVERT), Just(abi::OP_ACCEPT), 0..6u32], 0..6u32, 0..8u32, proptest::collection::vec(entry, 0..6))
            .prop_map(|(cpu, op, cur, end, entries)| Op::Mailbox { cpu, op, cur, end, entries }),
        1 => (0..3u32, proptest::collection::vec(any::<u8>(), 0..300)).prop_map(|(cpu, bytes)| Op::Garbage { cpu, bytes }),
    ]
}

fn apply_model_convert(m: &mut Model, gpa: u64, npages: u64, attrs: u64) {
    let to_private = attrs & TO_PRIVATE != 0;
    for p in gpa / PAGE_SIZE..gpa / PAGE_SIZE + npages {
        if m.private[p as usize] != to_private {
            m.private[p as usize] = to_private;
            m.fill[p as usize] = 0;
        }
    }
}

fn run_ops(private: StoreKind, shared: StoreKind, g: Granularity, ops: &[Op]) {
    let (host, svc) = service(PROP_RAM, private, shared, g);
    let ctx0 = format!("{private}/{shared}/{g}");
    let mut m = Model::new(PROP_RAM);
    for p in (2 * PAGES_PER_CHUNK)..(PROP_RAM / PAGE_SIZE) {
        guest_fill(&host, &mut m, p, pattern(p, 1));
    }
    for (i, op) in ops.iter().enumerate() {
        let ctx = format!("{ctx0} op {i} {op:?}");
        let mut full = Vec::new();
        match op {
            &Op::Convert(gpa, n, attrs) => {
                if convert(&svc, &mut m, gpa, n, attrs) == abi::STATUS_OK {
                    full.push((gpa / PAGE_SIZE, gpa / PAGE_SIZE + n));
                }
            }
            &Op::Accept(gpa, n) => {
                let _ = svc.accept(gpa, n);
            }
            &Op::Touch(p, v) => guest_fill(&host, &mut m, p, v),
            Op::Mailbox {
                cpu,
                op,
                cur,
                end,
                entries,
            } => {
                let h = abi::MailboxHeader {
                    magic: abi::MAILBOX_MAGIC,
                    op: *op,
                    cur_entry: *cur,
                    end_entry: *end,
                    ..Default::default()
                };
                let mut page = bytes_of(&h);
                for &(gpa, npages, attrs) in entries {
                    page.extend(bytes_of(&abi::MailboxEntry {
                        gpa,
                        npages,
                        attrs,
                        status: 0,
                    }));
                }
                page.resize(PAGE_SIZE as usize, 0);
                host.write(MAILBOX_BASE_GPA + *cpu as u64 * PAGE_SIZE, &page);
                let out = svc.service_mailbox(*cpu);
                if out == MailboxOutcome::Handled && *op == abi::OP_CONVERT {
                    for k in *cur..*end {
                        let (gpa, npages, attrs) =
                            entries.get(k as usize).copied().unwrap_or((0, 0, 0));
                        if read_entry_status(&host, *cpu, k as usize) == abi::STATUS_OK {
                            apply_model_convert(&mut m, gpa, npages, attrs as u64);
                            full.push((gpa / PAGE_SIZE, gpa / PAGE_SIZE + npages));
                        }
                    }
                }
                if *cpu >= 2 {
                    assert_eq!(out, MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST));
                }
            }
            Op::Garbage { cpu, bytes } => {
                let mut page = bytes.clone();
                page.resize(PAGE_SIZE as usize, 0);
                host.write(MAILBOX_BASE_GPA + *cpu as u64 * PAGE_SIZE, &page);
                let out = svc.service_mailbox(*cpu);
                // Random bytes practically never carry the magic; if they do, nothing is known.
                prop_assume_ok(out, &ctx);
            }
        }
        check_view(&host, &svc, &m, &full, &ctx);
        check_accounting(&svc, false, &ctx);
        assert_eq!(
            host.unpaused_edits.load(Ordering::SeqCst),
            0,
            "{ctx}: memslot edit without pause"
        );
    }
    // Touch everything the guest owns: computed double allocation must equal the kernel's.
    for p in (2 * PAGES_PER_CHUNK)..(PROP_RAM / PAGE_SIZE) {
        guest_fill(&host, &mut m, p, 0x5a);
    }
    check_view(&host, &svc, &m, &[], &ctx0);
    check_accounting(&svc, true, &format!("{ctx0} after touching all"));
    let st = svc.stats();
    if st.mixed_chunks == 0 {
        assert_eq!(
            host.slot_count(),
            1,
            "{ctx0}: slots must merge back when nothing is mixed"
        );
    }
    if std::env::var_os("MEMCONV_TEST_VERBOSE").is_some() {
        eprintln!(
            "{ctx0}: {} ops, ok conversions {}, pages {}, rejects {}, mixed peak {}, pauses {}, dbl peak {}",
            ops.len(),
            st.to_shared.total() + st.to_private.total(),
            st.pages_converted,
            st.rejects_total,
            st.mixed_chunks_peak,
            st.vcpu_pauses,
            st.double_alloc.computed_peak_bytes
        );
    }
}

fn prop_assume_ok(out: MailboxOutcome, ctx: &str) {
    assert!(
        matches!(out, MailboxOutcome::Rejected(abi::ERR_BAD_REQUEST)),
        "{ctx}: random bytes accepted as a mailbox: {out:?}"
    );
}

fn prop_config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("MEMCONV_PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(12),
        max_shrink_iters: 64,
        ..ProptestConfig::default()
    }
}

macro_rules! prop_pair {
    ($name:ident, $p:expr, $s:expr, $g:expr) => {
        proptest! {
            #![proptest_config(prop_config())]
            #[test]
            fn $name(ops in proptest::collection::vec(op_strategy($g == Granularity::Huge2M), 1..24)) {
                run_ops($p, $s, $g, &ops);
            }
        }
    };
}

prop_pair!(
    prop_memfd_memfd_4k,
    StoreKind::Memfd,
    StoreKind::Memfd,
    Granularity::Page4K
);
prop_pair!(
    prop_memfd_memfd_2m,
    StoreKind::Memfd,
    StoreKind::Memfd,
    Granularity::Huge2M
);
prop_pair!(
    prop_gmem_memfd_4k,
    StoreKind::Gmem,
    StoreKind::Memfd,
    Granularity::Page4K
);
prop_pair!(
    prop_memfd_hugetlb_4k,
    StoreKind::Memfd,
    StoreKind::Hugetlb,
    Granularity::Page4K
);
prop_pair!(
    prop_memfd_hugetlb_2m,
    StoreKind::Memfd,
    StoreKind::Hugetlb,
    Granularity::Huge2M
);
prop_pair!(
    prop_gmem_hugetlb_4k,
    StoreKind::Gmem,
    StoreKind::Hugetlb,
    Granularity::Page4K
);
prop_pair!(
    prop_hugetlb_hugetlb_4k,
    StoreKind::Hugetlb,
    StoreKind::Hugetlb,
    Granularity::Page4K
);
prop_pair!(
    prop_hugetlb_hugetlb_2m,
    StoreKind::Hugetlb,
    StoreKind::Hugetlb,
    Granularity::Huge2M
);

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]
    /// Any bytes in the mailbox page decode without panicking.
    #[test]
    fn mailbox_decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 4096)) {
        let mut page = [0u64; 512];
        for (i, w) in page.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            *w = u64::from_le_bytes(b);
        }
        // SAFETY: a 4096-byte aligned local buffer.
        let snap = unsafe { crate::mailbox::Snapshot::read(page.as_ptr() as *const u8) };
        let _ = snap.decode();
        for i in 0..200 {
            let _ = snap.entry(i);
        }
    }
}

#[test]
fn concurrent_vcpus_keep_state_consistent() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ConversionService>();
    for (private, shared) in [
        (StoreKind::Memfd, StoreKind::Memfd),
        (StoreKind::Gmem, StoreKind::Hugetlb),
    ] {
        let (host, svc) = service(32 * MB, private, shared, Granularity::Page4K);
        let svc = Arc::new(svc);
        let mut handles = Vec::new();
        for t in 0..3u64 {
            let svc = svc.clone();
            let host = host.clone();
            handles.push(std::thread::spawn(move || {
                // Thread t owns chunks [2 + 4t, 6 + 4t); returns its final per-page attributes.
                let base = (2 + 4 * t) * PAGES_PER_CHUNK;
                let mut private = vec![true; (4 * PAGES_PER_CHUNK) as usize];
                let mut x = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(t + 1);
                for _ in 0..150 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let start = x % (4 * PAGES_PER_CHUNK);
                    let n = 1 + (x >> 20) % 40.min(4 * PAGES_PER_CHUNK - start);
                    let to_private = (x >> 40) & 1 == 1;
                    let attrs = if to_private { TO_PRIVATE } else { TO_SHARED };
                    assert_eq!(svc.map_gpa_range((base + start) * PAGE_SIZE, n, attrs), 0);
                    for p in start..start + n {
                        private[p as usize] = to_private;
                    }
                    // Use the range as the guest would.
                    host.write((base + start) * PAGE_SIZE, &[t as u8 + 1; 64]);
                }
                (base, private)
            }));
        }
        let mut m = Model::new(32 * MB);
        for h in handles {
            let (base, private) = h.join().unwrap();
            for (i, p) in private.iter().enumerate() {
                m.private[base as usize + i] = *p;
            }
        }
        for p in 0..(32 * MB / PAGE_SIZE) {
            let gpa = p * PAGE_SIZE;
            if (MAILBOX_BASE_GPA..MAILBOX_AREA_END).contains(&gpa) {
                continue;
            }
            assert_eq!(svc.is_private(gpa), m.private[p as usize], "page {p:#x}");
        }
        // Touch everything; accounting must match the kernel.
        for p in (2 * PAGES_PER_CHUNK)..(32 * MB / PAGE_SIZE) {
            host.write(p * PAGE_SIZE, &[0x11]);
        }
        check_accounting(&svc, true, "after concurrent conversions");
        assert_eq!(host.unpaused_edits.load(Ordering::SeqCst), 0);
    }
}
