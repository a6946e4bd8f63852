//! Conversion cost per store pair and size, next to the raw floor for the same work measured
//! in the same run: `mmap(MAP_FIXED)` of the range from the other store + `fallocate(PUNCH_HOLE)`
//! of the old side (and, for hugetlb, the same plus `fallocate(0)` of the new 2 MiB page, which
//! the engine does eagerly to turn an exhausted pool into a clean error while the raw floor
//! leaves it to the guest's first touch).
//!
//! Each iteration converts a range to shared and back; the guest's use of the range (one write
//! per 4 KiB page in the owning store) happens between conversions and is not timed. The
//! memslot host is a no-op (real KVM memslot edits and vCPU pauses are the VMM's cost), so
//! hugetlb 4K rows show memconv's own work only.
//!
//! Run: `cargo bench -p memconv --bench convert` (env MEMCONV_BENCH_ITERS scales iterations).
#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Instant;

use memconv::abi::{self, HUGE_PAGE_SIZE, PAGES_PER_CHUNK, PAGE_SIZE};
use memconv::layout::View;
use memconv::store::{huge_pages_available, Store};
use memconv::{ConversionService, Granularity, HostVm, Platform, RamConfig, StoreKind};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const RAM: u64 = 64 << 20;
const TO_PRIVATE: u64 = abi::ATTR_ENCRYPTED as u64;

struct NopHost {
    vm: Option<OwnedFd>,
}

impl HostVm for NopHost {
    fn set_memslot(&self, _: u32, _: u64, _: u64, _: u64) -> io::Result<()> {
        Ok(())
    }
    fn create_guest_memfd(&self, size: u64, flags: u64) -> io::Result<OwnedFd> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let vm = self
            .vm
            .as_ref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))?;
        #[repr(C)]
        struct Arg {
            size: u64,
            flags: u64,
            reserved: [u64; 6],
        }
        let arg = Arg {
            size,
            flags,
            reserved: [0; 6],
        };
        // SAFETY: KVM_CREATE_GUEST_MEMFD reads `arg`.
        let fd = unsafe { libc::ioctl(vm.as_raw_fd(), 0xC040_AED4, &arg) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    fn pause_vcpus(&self) {}
    fn resume_vcpus(&self) {}
}

fn open_vm() -> Option<OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: open + KVM_CREATE_VM with plain arguments.
    unsafe {
        let kvm = libc::open(c"/dev/kvm".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        if kvm < 0 {
            return None;
        }
        let vm = libc::ioctl(kvm, 0xAE01, 0);
        libc::close(kvm);
        if vm < 0 {
            return None;
        }
        Some(OwnedFd::from_raw_fd(vm))
    }
}

fn ensure_hugepages(n: u64) -> Result<(), String> {
    let (free, total) = huge_pages_available();
    if free >= n {
        return Ok(());
    }
    let want = total + (n - free);
    let _ = std::fs::write("/proc/sys/vm/nr_hugepages", format!("{want}\n"));
    let (free, _) = huge_pages_available();
    if free >= n {
        Ok(())
    } else {
        Err(format!(
            "need {n} free 2 MiB huge pages, {free} free: `echo {want} > /proc/sys/vm/nr_hugepages` as root"
        ))
    }
}

fn touch(mem: &GuestMemoryMmap<()>, gpa: u64, pages: u64, v: u8) {
    for p in 0..pages {
        let _ = mem.write_obj(v, GuestAddress(gpa + p * PAGE_SIZE));
    }
}

fn median(v: &mut [u64]) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

/// The engine: ns per conversion (median, mean).
fn engine(
    private: StoreKind,
    shared: StoreKind,
    pages: u64,
    iters: usize,
) -> Result<(u64, u64), String> {
    let host = Arc::new(NopHost { vm: open_vm() });
    let cfg = RamConfig {
        size: RAM,
        private,
        shared,
        granularity: Granularity::Page4K,
        cpus: 1,
        platform: Platform::Tdx,
        prealloc: true,
    };
    let svc = ConversionService::new(cfg, host).map_err(|e| e.to_string())?;
    let gpa = 8 * HUGE_PAGE_SIZE
        + if pages < PAGES_PER_CHUNK {
            16 * PAGE_SIZE
        } else {
            0
        };
    let mut samples = Vec::with_capacity(iters * 2);
    for i in 0..iters + 10 {
        touch(svc.private_memory(), gpa, pages, i as u8);
        let t0 = Instant::now();
        let a = svc.map_gpa_range(gpa, pages, 0);
        let t1 = t0.elapsed().as_nanos() as u64;
        touch(svc.shared_memory(), gpa, pages, i as u8);
        let t2 = Instant::now();
        let b = svc.map_gpa_range(gpa, pages, TO_PRIVATE);
        let t3 = t2.elapsed().as_nanos() as u64;
        if a != 0 || b != 0 {
            return Err(format!(
                "conversion failed: {} / {}",
                abi::status_name(a),
                abi::status_name(b)
            ));
        }
        if i >= 10 {
            samples.push(t1);
            samples.push(t3);
        }
    }
    let mean = samples.iter().sum::<u64>() / samples.len().max(1) as u64;
    Ok((median(&mut samples), mean))
}

/// The raw floor: view remap + punch of the old side (+ allocation of the new side).
fn floor(kind: StoreKind, pages: u64, iters: usize, alloc: bool) -> Result<(u64, u64), String> {
    let e = |x: io::Error| x.to_string();
    let a = Store::create(kind, "private", RAM, None).map_err(|x| x.to_string())?;
    let b = Store::create(kind, "shared", RAM, None).map_err(|x| x.to_string())?;
    let view = View::reserve(RAM).map_err(e)?;
    view.map(0, RAM, &a).map_err(e)?;
    let off = 8 * HUGE_PAGE_SIZE
        + if pages < PAGES_PER_CHUNK {
            16 * PAGE_SIZE
        } else {
            0
        };
    let len = pages * PAGE_SIZE;
    if kind.is_huge() {
        a.allocate(off, len).map_err(e)?;
    }
    let touch_view = |v: u8| {
        for p in 0..pages {
            // SAFETY: inside the view, mapped RW from a store with the page allocated (hugetlb)
            // or allocatable (shmem).
            unsafe { std::ptr::write_volatile(view.base().add((off + p * PAGE_SIZE) as usize), v) };
        }
    };
    // One timed move of the range from store `from` to store `to`.
    let step = |from: &Store, to: &Store| -> io::Result<u64> {
        let t0 = Instant::now();
        view.map(off, len, to)?;
        from.punch(off, len)?;
        if alloc {
            to.allocate(off, len)?;
        }
        Ok(t0.elapsed().as_nanos() as u64)
    };
    let mut samples = Vec::with_capacity(iters * 2);
    for i in 0..iters + 10 {
        touch_view(i as u8);
        let t1 = step(&a, &b).map_err(e)?;
        touch_view(i as u8);
        let t3 = step(&b, &a).map_err(e)?;
        if i >= 10 {
            samples.push(t1);
            samples.push(t3);
        }
    }
    let mean = samples.iter().sum::<u64>() / samples.len().max(1) as u64;
    Ok((median(&mut samples), mean))
}

fn fmt_us(ns: u64) -> String {
    format!("{:.2}", ns as f64 / 1000.0)
}

fn main() {
    // cargo bench passes --bench; `cargo test --benches` passes nothing useful: run briefly.
    let scale: f64 = std::env::var("MEMCONV_BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let quick = !std::env::args().any(|a| a == "--bench");
    let iters = |n: usize| {
        if quick {
            5
        } else {
            ((n as f64) * scale).max(5.0) as usize
        }
    };
    if let Err(msg) = ensure_hugepages(2 * RAM / HUGE_PAGE_SIZE + 8) {
        eprintln!("hugetlb rows need huge pages: {msg}");
    }
    println!(
        "memconv conversion cost, {} MiB RAM, median (mean) microseconds per conversion",
        RAM >> 20
    );
    println!(
        "{:<17} {:>4} {:>18} {:>18} {:>7} {:>18} {:>7}",
        "private/shared",
        "size",
        "engine",
        "floor mmap+punch",
        "ratio",
        "floor +fallocate",
        "ratio"
    );
    let pairs = [
        (StoreKind::Memfd, StoreKind::Memfd),
        (StoreKind::Hugetlb, StoreKind::Hugetlb),
        (StoreKind::Gmem, StoreKind::Memfd),
        (StoreKind::Memfd, StoreKind::Hugetlb),
        (StoreKind::Gmem, StoreKind::Hugetlb),
    ];
    for (private, shared) in pairs {
        for (label, pages, n) in [("4K", 1u64, 3000usize), ("2M", PAGES_PER_CHUNK, 300)] {
            let name = format!("{private}/{shared}");
            let eng = match engine(private, shared, pages, iters(n)) {
                Ok(v) => v,
                Err(e) => {
                    println!("{name:<17} {label:>4} engine failed: {e}");
                    continue;
                }
            };
            // The floor exists for a single store kind on both sides.
            let floor_kind = if private == shared {
                Some(private)
            } else {
                None
            };
            let (f, fa) = match floor_kind {
                Some(k) if !(k.is_huge() && pages < PAGES_PER_CHUNK) => (
                    floor(k, pages, iters(n), false).ok(),
                    if k.is_huge() {
                        floor(k, pages, iters(n), true).ok()
                    } else {
                        None
                    },
                ),
                _ => (None, None),
            };
            let cell = |v: Option<(u64, u64)>| match v {
                Some((m, a)) => format!("{} ({})", fmt_us(m), fmt_us(a)),
                None => "n/a".to_string(),
            };
            let ratio = |v: Option<(u64, u64)>| match v {
                Some((m, _)) if m > 0 => format!("{:.2}x", eng.0 as f64 / m as f64),
                _ => "-".to_string(),
            };
            println!(
                "{name:<17} {label:>4} {:>18} {:>18} {:>7} {:>18} {:>7}",
                cell(Some(eng)),
                cell(f),
                ratio(f),
                cell(fa),
                ratio(fa)
            );
        }
    }
    println!(
        "n/a: hugetlb cannot be remapped 4K at a time (the engine serves such chunks with memslots);\n\
         mixed pairs have no single-store floor. Floors for gmem are not measured (same as memfd path)."
    );
}
