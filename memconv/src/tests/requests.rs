//! Request handling: validation codes, ACCEPT, the mailbox (batches, exit, report,
//! garbage), memslot failures and the memslot limit.

use super::*;

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
    let (host, svc) = service_unaccepted(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Memfd,
        Granularity::Page4K,
        Platform::Tdx,
    );
    let c = |i: u64| i * HUGE_PAGE_SIZE;
    assert!(
        host.resolve(c(2)).is_none(),
        "unaccepted RAM has no memslot"
    );
    assert_eq!(svc.accept(c(2), PAGES_PER_CHUNK * 2), abi::STATUS_OK);
    assert!(host.resolve(c(2)).is_some() && host.resolve(c(3)).is_some());
    assert!(host.resolve(c(4)).is_none());
    // Overlaps an accepted page: nothing of the entry is accepted.
    assert_eq!(
        svc.accept(c(2) + PAGE_SIZE, PAGES_PER_CHUNK),
        abi::ERR_DOUBLE_ACCEPT
    );
    assert_eq!(svc.accept(c(5) + 1, 3), abi::ERR_UNALIGNED);
    assert_eq!(
        svc.accept(c(5), 3),
        abi::STATUS_OK,
        "4 KiB accepts are fine"
    );
    assert_eq!(svc.accept(c(0), PAGES_PER_CHUNK), abi::ERR_RESERVED);
    assert_eq!(svc.accept(c(1), PAGES_PER_CHUNK), abi::ERR_RESERVED);
    assert_eq!(svc.accept(c(16), PAGES_PER_CHUNK), abi::ERR_OUT_OF_RAM);
    assert_eq!(svc.accept(c(4), 0), abi::ERR_BAD_REQUEST);
    assert_eq!(
        svc.accept(c(3), PAGES_PER_CHUNK * 3),
        abi::ERR_DOUBLE_ACCEPT
    );
    assert_eq!(
        svc.accept(c(4), PAGES_PER_CHUNK),
        abi::STATUS_OK,
        "c4 must still be unaccepted"
    );
    assert_eq!(svc.accept(c(2), PAGES_PER_CHUNK), abi::ERR_DOUBLE_ACCEPT);
    let st = svc.stats();
    assert_eq!(st.accept_entries, 3);
    assert_eq!(st.lifecycle.accepted_pages, 3 * PAGES_PER_CHUNK + 3);
    assert_eq!(st.double_accept_violations, 3);
    assert_eq!(st.lifecycle.double_accepts, 3);
}

/// The TDX lifecycle: shared drops acceptance, back to private is pending again (accepting it
/// is normal), shared and mixed chunks cannot be accepted, unaccepted chunks have no memslot.
#[test]
fn tdx_lifecycle() {
    for (private, shared) in [
        (StoreKind::Memfd, StoreKind::Memfd),
        (StoreKind::Hugetlb, StoreKind::Hugetlb),
    ] {
        let (host, svc) =
            service_unaccepted(32 * MB, private, shared, Granularity::Page4K, Platform::Tdx);
        let c = |i: u64| i * HUGE_PAGE_SIZE;
        let n = PAGES_PER_CHUNK;
        assert_eq!(svc.accept(c(3), n), abi::STATUS_OK);
        host.write(c(3), &[7; 4096]);
        // Whole chunk round trip: pending again, cut out, accepted again (no violation).
        assert_eq!(svc.map_gpa_range(c(3), n, TO_SHARED), abi::STATUS_OK);
        assert!(host.resolve(c(3)).is_some(), "shared memory stays mapped");
        assert_eq!(svc.accept(c(3), n), abi::ERR_ACCEPT_SHARED);
        assert_eq!(svc.map_gpa_range(c(3), n, TO_PRIVATE), abi::STATUS_OK);
        assert!(host.resolve(c(3)).is_none(), "pending again: cut out");
        assert!(svc.unaccepted_access(c(3) + 8));
        assert_eq!(svc.accept(c(3), n), abi::STATUS_OK);
        let mut b = [1u8; 16];
        host.read(c(3), &mut b);
        assert_eq!(b, [0; 16], "accepted memory reads zero");
        // One page of an accepted chunk: mixed chunk cannot be accepted; the page comes back
        // pending and is accepted alone.
        assert_eq!(svc.map_gpa_range(c(3) + 4096, 1, TO_SHARED), abi::STATUS_OK);
        assert_eq!(svc.accept(c(4), n), abi::STATUS_OK);
        assert_eq!(svc.accept(c(3), n), abi::ERR_ACCEPT_SHARED, "mixed chunk");
        assert_eq!(
            svc.map_gpa_range(c(3) + 4096, 1, TO_PRIVATE),
            abi::STATUS_OK
        );
        assert_eq!(svc.accept(c(3) + 4096, 1), abi::STATUS_OK);
        assert_eq!(svc.accept(c(3) + 4096, 1), abi::ERR_DOUBLE_ACCEPT);
        assert!(!svc.unaccepted_access(c(3)), "accepted chunk");
        assert!(!svc.unaccepted_access(64 << 30), "MMIO");
        let st = svc.stats();
        let l = &st.lifecycle;
        assert_eq!(l.accept_shared_refusals, 2, "{st}");
        assert_eq!(l.double_accepts, 1);
        assert_eq!(l.unaccepted_accesses, 1);
        assert_eq!(l.unaccepted_access_gpa, Some(c(3) + 8));
        assert_eq!(l.dropped_pages, n + 1);
        assert_eq!(l.accepted_bytes, (3 * n) * PAGE_SIZE, "boot area + c3 + c4");
        if private.is_huge() {
            // Only the boot area and the accepted chunks hold private huge pages.
            assert_eq!(st.private_store.kernel_bytes, 3 * HUGE_PAGE_SIZE, "{st}");
            assert_eq!(
                l.backed_chunks, 3,
                "c3 twice (released by its conversion), c4\n{st}"
            );
        }
    }
}

/// SNP: a validated page cannot be converted to shared until rescinded; validating twice is
/// the double-validation violation.
#[test]
fn snp_rescind_before_share() {
    let (host, svc) = service_unaccepted(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Memfd,
        Granularity::Page4K,
        Platform::Snp,
    );
    let c = |i: u64| i * HUGE_PAGE_SIZE;
    let n = PAGES_PER_CHUNK;
    assert_eq!(svc.accept(c(3), n), abi::STATUS_OK);
    assert_eq!(svc.map_gpa_range(c(3), 1, TO_SHARED), abi::ERR_MUST_RESCIND);
    assert_eq!(svc.accept(c(3), 1), abi::ERR_DOUBLE_ACCEPT);
    let rescind = abi::ACCEPT_FLAG_RESCIND as u64;
    assert_eq!(svc.accept_with(c(3), 1, rescind), abi::STATUS_OK);
    assert_eq!(svc.map_gpa_range(c(3), 1, TO_SHARED), abi::STATUS_OK);
    assert_eq!(svc.map_gpa_range(c(3), 1, TO_PRIVATE), abi::STATUS_OK);
    assert_eq!(
        svc.accept(c(3), 1),
        abi::STATUS_OK,
        "validated again after the trip"
    );
    // Rescinding a whole chunk cuts it out.
    assert_eq!(svc.accept_with(c(3), n, rescind), abi::STATUS_OK);
    assert!(host.resolve(c(3)).is_none());
    assert_eq!(svc.accept_with(c(3), n, 2), abi::ERR_INVALID_ATTRS);
    let st = svc.stats();
    assert_eq!(st.lifecycle.must_rescind_refusals, 1);
    assert_eq!(st.lifecycle.double_accepts, 1);
    assert_eq!(st.lifecycle.rescind_entries, 2);
    assert_eq!(st.lifecycle.rescinded_pages, 1 + n);
}

#[test]
fn double_accept_warnings_are_rate_limited_and_every_one_counted() {
    let (_host, svc) = service_unaccepted(
        32 * MB,
        StoreKind::Memfd,
        StoreKind::Memfd,
        Granularity::Page4K,
        Platform::Tdx,
    );
    let unit = 2 * HUGE_PAGE_SIZE;
    assert_eq!(svc.accept(unit, PAGES_PER_CHUNK), abi::STATUS_OK);
    let before = crate::log_limit::GUEST_LOG.suppressed();
    let t0 = std::time::Instant::now();
    for _ in 0..500 {
        assert_eq!(svc.accept(unit, PAGES_PER_CHUNK), abi::ERR_DOUBLE_ACCEPT);
    }
    let secs = t0.elapsed().as_secs();
    // Each violation is counted; at most GUEST_LOG_PER_SECOND warnings a second are written.
    assert_eq!(svc.stats().double_accept_violations, 500);
    let suppressed = crate::log_limit::GUEST_LOG.suppressed() - before;
    let written = u64::from(crate::log_limit::GUEST_LOG_PER_SECOND) * (secs + 1);
    assert!(suppressed + written >= 500, "{suppressed} suppressed");
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
        MailboxOutcome::Rejected(ConversionError::BadRequest)
    );
    // Exit.
    guest_mailbox(&host, 1, abi::OP_EXIT, &[], 77);
    assert_eq!(svc.service_mailbox(1), MailboxOutcome::Exit(77));
    // Garbage: bad magic, bad op, bad cur/end, cpu out of range.
    host.write(MAILBOX_BASE_GPA, &[0xAB; 4096]);
    assert_eq!(
        svc.service_mailbox(0),
        MailboxOutcome::Rejected(ConversionError::BadRequest)
    );
    guest_mailbox(&host, 0, 99, &[], 0);
    assert_eq!(
        svc.service_mailbox(0),
        MailboxOutcome::Rejected(ConversionError::BadRequest)
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
        MailboxOutcome::Rejected(ConversionError::BadRequest)
    );
    h.end_entry = 3;
    h.cur_entry = 4;
    host.write(MAILBOX_BASE_GPA, &bytes_of(&h));
    assert_eq!(
        svc.service_mailbox(0),
        MailboxOutcome::Rejected(ConversionError::BadRequest)
    );
    assert_eq!(read_header(&host, 0).status, abi::ERR_BAD_REQUEST);
    assert_eq!(
        svc.service_mailbox(2),
        MailboxOutcome::Rejected(ConversionError::BadRequest)
    );
    assert_eq!(
        svc.service_mailbox(u32::MAX),
        MailboxOutcome::Rejected(ConversionError::BadRequest)
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
