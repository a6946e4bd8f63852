//! Property tests (random operation sequences against the model, random mailbox bytes)
//! and concurrent vCPUs.

use super::*;

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

/// Apply a conversion done through the mailbox to the model; pages back on private are
/// pushed to `back` (the guest accepts them again, TDX, after the batch).
fn apply_model_convert(m: &mut Model, gpa: u64, npages: u64, attrs: u64, back: &mut Vec<u64>) {
    let to_private = attrs & TO_PRIVATE != 0;
    for p in gpa / PAGE_SIZE..gpa / PAGE_SIZE + npages {
        if m.private[p as usize] != to_private {
            m.private[p as usize] = to_private;
            m.fill[p as usize] = 0;
            if to_private {
                back.push(p);
            }
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
                let mut page = mailbox_bytes(&h, entries, 0);
                page.resize(PAGE_SIZE as usize, 0);
                host.write(MAILBOX_BASE_GPA + *cpu as u64 * PAGE_SIZE, &page);
                let out = svc.service_mailbox(*cpu);
                if out == MailboxOutcome::Handled && *op == abi::OP_ACCEPT {
                    // A rescind entry: the guest validates those pages again (else they could
                    // not be read through the model's view).
                    for k in *cur..*end {
                        let (gpa, npages, attrs) =
                            entries.get(k as usize).copied().unwrap_or((0, 0, 0));
                        if attrs == abi::ACCEPT_FLAG_RESCIND
                            && read_entry_status(&host, *cpu, k as usize) == abi::STATUS_OK
                        {
                            // A wholly private chunk left with nothing accepted is released.
                            let (p0, p1) = (gpa / PAGE_SIZE, gpa / PAGE_SIZE + npages);
                            for c in p0.div_ceil(PAGES_PER_CHUNK)..p1 / PAGES_PER_CHUNK {
                                let r = (c * PAGES_PER_CHUNK) as usize
                                    ..((c + 1) * PAGES_PER_CHUNK) as usize;
                                if m.private[r.clone()].iter().all(|&x| x) {
                                    m.fill[r].fill(0);
                                }
                            }
                            for p in p0..p1 {
                                if m.private[p as usize] {
                                    // A later accept entry of the batch may have done it.
                                    let st = svc.accept(p * PAGE_SIZE, 1);
                                    assert!(st == abi::STATUS_OK || st == abi::ERR_DOUBLE_ACCEPT);
                                }
                            }
                        }
                    }
                }
                if out == MailboxOutcome::Handled && *op == abi::OP_CONVERT {
                    let mut back = Vec::new();
                    for k in *cur..*end {
                        let (gpa, npages, attrs) =
                            entries.get(k as usize).copied().unwrap_or((0, 0, 0));
                        if read_entry_status(&host, *cpu, k as usize) == abi::STATUS_OK {
                            apply_model_convert(&mut m, gpa, npages, attrs as u64, &mut back);
                            full.push((gpa / PAGE_SIZE, gpa / PAGE_SIZE + npages));
                        }
                    }
                    back.sort_unstable();
                    back.dedup();
                    for p in back.into_iter().filter(|&p| m.private[p as usize]) {
                        assert_eq!(svc.accept(p * PAGE_SIZE, 1), abi::STATUS_OK, "re-accept");
                    }
                }
                if *cpu >= 2 {
                    assert_eq!(out, MailboxOutcome::Rejected(ConversionError::BadRequest));
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
        matches!(out, MailboxOutcome::Rejected(ConversionError::BadRequest)),
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
