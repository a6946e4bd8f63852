//! Creating the service: clear errors for bad configurations and missing resources, and
//! hugetlb exhaustion during conversions as a clean error.

use super::*;

/// A hugetlb file on a private hugetlbfs mount limited to `pages` 2 MiB pages.
fn limited_hugetlb_store(size: u64, pages: u64) -> crate::store::Store {
    limited_hugetlb_store_for("shared", size, pages)
}

/// [`limited_hugetlb_store`] for the store `what`.
fn limited_hugetlb_store_for(what: &'static str, size: u64, pages: u64) -> crate::store::Store {
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
    crate::store::Store::from_fd(StoreKind::Hugetlb, what, size, OwnedFd::from(file)).unwrap()
}

/// Lazy hugetlb: a chunk is backed at ACCEPT; when no huge page is left the ACCEPT fails with
/// `no_memory` (nothing accepted, the chunk stays cut out), never a SIGBUS later.
#[test]
fn accept_without_huge_pages_is_no_memory() {
    ensure_hugepages(8);
    let size = 32 * MB;
    let host = FakeHost::new();
    // The boot area takes one of the 3 pages.
    let p = limited_hugetlb_store_for("private", size, 3);
    let s = crate::store::Store::create(StoreKind::Memfd, "shared", size, None).unwrap();
    let cfg = RamConfig {
        size,
        private: StoreKind::Hugetlb,
        shared: StoreKind::Memfd,
        granularity: Granularity::Page4K,
        cpus: 1,
        platform: Platform::Tdx,
        prealloc: false,
    };
    let svc = ConversionService::with_stores(cfg, p, s, host.clone()).unwrap();
    host.armed.store(true, Ordering::SeqCst);
    let c = |i: u64| i * HUGE_PAGE_SIZE;
    assert_eq!(svc.accept(c(4), PAGES_PER_CHUNK), abi::STATUS_OK);
    assert_eq!(svc.accept(c(5), 1), abi::STATUS_OK);
    assert_eq!(svc.accept(c(6), PAGES_PER_CHUNK), abi::ERR_NO_MEMORY);
    assert_eq!(svc.accept(c(7), 2 * PAGES_PER_CHUNK), abi::ERR_NO_MEMORY);
    assert!(host.resolve(c(6)).is_none() && host.resolve(c(7)).is_none());
    host.write(c(4), &[9; 64]);
    // Giving one back (whole chunk to shared releases its private page) makes room.
    assert_eq!(
        svc.map_gpa_range(c(5), PAGES_PER_CHUNK, TO_SHARED),
        abi::STATUS_OK
    );
    assert_eq!(svc.accept(c(6), PAGES_PER_CHUNK), abi::STATUS_OK);
    let st = svc.stats();
    assert_eq!(st.rejects[abi::ERR_NO_MEMORY as usize - 1].count, 2, "{st}");
    assert_eq!(st.private_store.kernel_bytes, 3 * HUGE_PAGE_SIZE, "{st}");
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
            platform: Platform::Tdx,
            prealloc: false,
        };
        let svc = ConversionService::with_stores(cfg, p, s, host.clone()).unwrap();
        svc.accept_boot(size).unwrap();
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
        platform: Platform::Tdx,
        prealloc: false,
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
    // Eager backing of 64 GiB cannot have its huge pages; lazy backing needs only the boot
    // area and the mailbox chunk.
    let e = ConversionService::new(
        RamConfig {
            prealloc: true,
            ..cfg(abi::MAX_RAM, StoreKind::Hugetlb, StoreKind::Hugetlb)
        },
        host.clone(),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("huge pages"), "{e}");
    ensure_hugepages(4);
    let lazy = ConversionService::new(
        cfg(abi::MAX_RAM, StoreKind::Hugetlb, StoreKind::Hugetlb),
        host,
    );
    assert!(lazy.is_ok(), "lazy 64 GiB: {:?}", lazy.err());
    assert_eq!("hugetlb".parse::<StoreKind>().unwrap(), StoreKind::Hugetlb);
    assert_eq!("2m".parse::<Granularity>().unwrap().to_string(), "2m");
    assert!("1g".parse::<Granularity>().is_err());
}
