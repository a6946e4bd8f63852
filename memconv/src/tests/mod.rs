//! Tests of the whole service with real stores (memfd, hugetlb, guest_memfd from a real KVM
//! VM), real mmaps and fallocate, and a recording [`HostVm`] that plays KVM's memslot table:
//! guest reads/writes go through the slots it recorded, as KVM would resolve them.
//!
//! This module holds the fake host and the shared helpers; the tests are split by topic:
//! `scenario` (whole conversion scenarios per store pair), `requests` (validation codes,
//! accept, the mailbox, memslot failures and limits), `creation` (store creation and
//! hugetlb exhaustion errors), `props` (property tests and concurrent vCPUs).

mod creation;
mod fenced;
mod props;
mod requests;
mod scenario;

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
use crate::{ConversionError, FenceError, Granularity, Platform, RamConfig};

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
    // Another process may take pages between the raise and the check: retry by the deficit.
    let mut want = 0;
    let mut r = Ok(());
    for _ in 0..5 {
        let (free, total) = huge_pages_available();
        if free >= n {
            return;
        }
        want = total + (n - free);
        r = std::fs::write("/proc/sys/vm/nr_hugepages", format!("{want}\n"));
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (free2, total2) = huge_pages_available();
    assert!(
        free2 >= n,
        "hugetlb tests need {n} free 2 MiB huge pages; {free2} free (nr_hugepages {total2}); \
         raising nr_hugepages to {want} failed ({r:?}). Run as root or `echo {want} > /proc/sys/vm/nr_hugepages`"
    );
}

/// A service whose RAM after the mailbox chunk the guest has accepted whole (TDX), as the
/// conversion tests assume; [`service_unaccepted`] leaves it unaccepted.
pub fn service(
    size: u64,
    private: StoreKind,
    shared: StoreKind,
    g: Granularity,
) -> (Arc<FakeHost>, ConversionService) {
    let (host, svc) = service_unaccepted(size, private, shared, g, Platform::Tdx);
    if let Err(e) = svc.accept_boot(size) {
        panic!("accepting all RAM: {e}");
    }
    (host, svc)
}

/// A fresh service on `platform`: only the boot area accepted, nothing else backed.
pub fn service_unaccepted(
    size: u64,
    private: StoreKind,
    shared: StoreKind,
    g: Granularity,
    platform: Platform,
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
        platform,
        prealloc: false,
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

/// Convert and apply to the model; returns the status. Pages that came back private are
/// accepted again, as a TDX guest does.
fn convert(svc: &ConversionService, m: &mut Model, gpa: u64, npages: u64, attrs: u64) -> u32 {
    let st = svc.map_gpa_range(gpa, npages, attrs);
    if st == abi::STATUS_OK {
        let to_private = attrs & TO_PRIVATE != 0;
        for p in gpa / PAGE_SIZE..gpa / PAGE_SIZE + npages {
            if m.private[p as usize] != to_private {
                m.private[p as usize] = to_private;
                m.fill[p as usize] = 0;
                if to_private {
                    assert_eq!(svc.accept(p * PAGE_SIZE, 1), abi::STATUS_OK, "re-accept");
                }
            }
        }
    }
    st
}

fn bytes_of<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: T is a repr(C) plain-integer abi struct without padding bytes we care about.
    unsafe { std::slice::from_raw_parts(v as *const T as *const u8, std::mem::size_of::<T>()) }
        .to_vec()
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
    let page = mailbox_bytes(&h, entries, 0xffff);
    host.write(MAILBOX_BASE_GPA + cpu as u64 * PAGE_SIZE, &page);
}

/// The bytes of a mailbox header followed by `entries` (gpa, npages, attrs), each with
/// `entry_status`.
fn mailbox_bytes(
    h: &abi::MailboxHeader,
    entries: &[(u64, u64, u32)],
    entry_status: u32,
) -> Vec<u8> {
    let mut page = bytes_of(h);
    for &(gpa, npages, attrs) in entries {
        page.extend(bytes_of(&abi::MailboxEntry {
            gpa,
            npages,
            attrs,
            status: entry_status,
        }));
    }
    page
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
