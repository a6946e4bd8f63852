//! The DMA fence through the service: a pinned range delays its conversion, a conversion
//! that outlasts the bound is refused `busy`, and after a conversion to private no pin
//! succeeds on it; on memfd and hugetlb stores.

use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use super::*;

const C: u64 = 2 * MB;

fn fenced(private: StoreKind, shared: StoreKind) {
    let (_host, svc) = service(32 * MB, private, shared, Granularity::Page4K);
    let svc = Arc::new(svc);
    let (gpa, npages) = (4 * C, 2 * PAGES_PER_CHUNK);
    assert_eq!(svc.map_gpa_range(gpa, npages, 0), abi::STATUS_OK);
    // A device pins the middle of the range; a vCPU converts it to private meanwhile.
    let pin = svc.pin_shared(&[(gpa + 8192, 3 * MB)]).expect("pin");
    let released = Arc::new(AtomicBool::new(false));
    let (svc2, rel2) = (svc.clone(), released.clone());
    let vcpu = std::thread::spawn(move || {
        let st = svc2.map_gpa_range(gpa, npages, abi::ATTR_ENCRYPTED as u64);
        (st, rel2.load(Ordering::SeqCst))
    });
    // Once the conversion holds the chunks (new pins are busy), it has not happened yet: the
    // pages are still shared and the vCPU waits (with the engine lock: only lock-free reads).
    while svc.pin_shared(&[(gpa, 1)]).err() != Some(FenceError::Busy) {
        std::thread::yield_now();
    }
    std::thread::sleep(Duration::from_millis(5));
    assert!(svc.check_shared(gpa, npages * PAGE_SIZE).is_ok());
    released.store(true, Ordering::SeqCst);
    drop(pin);
    let (st, after_release) = vcpu.join().expect("vcpu thread");
    assert_eq!(st, abi::STATUS_OK);
    assert!(
        after_release,
        "the conversion returned while the pin was held"
    );
    assert!(svc.is_private(gpa + 8192));
    assert_eq!(
        svc.pin_shared(&[(gpa, 4096)]).err(),
        Some(FenceError::NotShared { gpa })
    );
    // A pin held past the bound: the conversion is refused busy and changes nothing.
    assert_eq!(svc.map_gpa_range(gpa, npages, 0), abi::STATUS_OK);
    let pin = svc.pin_shared(&[(gpa + C, 16)]).expect("pin");
    let t0 = Instant::now();
    assert_eq!(
        svc.map_gpa_range(gpa, npages, abi::ATTR_ENCRYPTED as u64),
        abi::ERR_BUSY
    );
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert!(!svc.is_private(gpa) && !svc.is_private(gpa + C));
    // A conversion elsewhere does not wait for it.
    assert_eq!(svc.map_gpa_range(8 * C, 1, 0), abi::STATUS_OK);
    drop(pin);
    let st = svc.stats();
    assert_eq!(st.rejects_total, 1);
    let f = svc.fence_stats();
    assert_eq!((f.conversion_waits, f.conversions_busy), (2, 1));
}

#[test]
fn fence_memfd() {
    fenced(StoreKind::Memfd, StoreKind::Memfd);
}

#[test]
fn fence_hugetlb() {
    fenced(StoreKind::Hugetlb, StoreKind::Hugetlb);
}
