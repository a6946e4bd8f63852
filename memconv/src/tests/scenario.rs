//! Whole conversion scenarios per store pair and granularity, checked page by page
//! against a model, with the accounting.

use super::*;

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
        Err(FenceError::NotShared { .. })
    ));
    let st = svc.stats();
    assert_eq!(st.memslots, 1);
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
    // Acceptance cuts a chunk out when it comes back wholly private and maps it again when
    // the guest accepts it (the helper re-accepts), each a paused memslot edit; the first
    // pause accepted all RAM.
    let to_private_chunks: u64 = steps
        .iter()
        .filter(|s| s.2 == TO_PRIVATE)
        .map(|s| (s.0 + s.1 * PAGE_SIZE).div_ceil(HUGE_PAGE_SIZE) - s.0 / HUGE_PAGE_SIZE)
        .sum();
    let acceptance_pauses = 1 + 2 * to_private_chunks;
    if private.is_huge() || shared.is_huge() {
        if g == Granularity::Page4K {
            assert!(
                st.mixed_chunks_peak > 0 && host.pauses.load(Ordering::SeqCst) > 0,
                "{ctx0}\n{st}"
            );
            assert!(st.double_alloc.computed_peak_bytes > 0, "{ctx0}\n{st}");
        }
    } else {
        assert!(
            host.pauses.load(Ordering::SeqCst) <= acceptance_pauses,
            "{ctx0}: 4K hosts pause only for acceptance"
        );
    }
    if g == Granularity::Huge2M {
        assert_eq!(st.mixed_chunks_peak, 0);
        assert!(
            host.pauses.load(Ordering::SeqCst) <= acceptance_pauses,
            "{ctx0}: 2M conversions change slots only for acceptance"
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
