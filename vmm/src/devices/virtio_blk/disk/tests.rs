//! The disk's data path on real files: vectored transfers over several buffers, both paths
//! agreeing, and every failure an error (out of range, truncated image, short read).

use super::*;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vmm-disk-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn slices(bufs: &mut [Vec<u8>]) -> Vec<VolatileSlice<'_>> {
    bufs.iter_mut()
        .map(|b| VolatileSlice::from(b.as_mut_slice()))
        .collect()
}

#[test]
fn vectored_round_trip_over_many_buffers() {
    let dir = scratch("rt");
    let disk = Disk::open(&dir.join("d.img"), Some(1 << 20)).unwrap();
    assert_eq!(disk.io(), DiskIo::Vectored);
    // More buffers than one iovec batch, of uneven sizes (one empty).
    let mut src: Vec<Vec<u8>> = (0..vectored::IOV_BATCH + 7)
        .map(|i| vec![i as u8 ^ 0x5a; if i == 3 { 0 } else { 512 * (1 + i % 3) }])
        .collect();
    let total: u64 = src.iter().map(|b| b.len() as u64).sum();
    assert_eq!(disk.write_from(4096, &slices(&mut src)).unwrap(), total);
    let mut dst: Vec<Vec<u8>> = src.iter().map(|b| vec![0u8; b.len()]).collect();
    assert_eq!(disk.read_into(4096, &slices(&mut dst)).unwrap(), total);
    assert_eq!(src, dst);
    // The mapped path sees the same bytes.
    drop(disk);
    let mapped = Disk::open_with(&dir.join("d.img"), None, DiskIo::Mapped).unwrap();
    let mut again: Vec<Vec<u8>> = src.iter().map(|b| vec![0u8; b.len()]).collect();
    assert_eq!(mapped.read_into(4096, &slices(&mut again)).unwrap(), total);
    assert_eq!(src, again);
    mapped.flush().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn out_of_range_is_refused_and_never_extends_the_file() {
    let dir = scratch("range");
    let path = dir.join("d.img");
    let disk = Disk::open(&path, Some(64 << 10)).unwrap();
    let mut buf = vec![vec![1u8; 4096]];
    assert!(matches!(
        disk.write_from((64 << 10) - 512, &slices(&mut buf)),
        Err(TransferError::OutOfRange { .. })
    ));
    assert!(matches!(
        disk.read_into(u64::MAX - 10, &slices(&mut buf)),
        Err(TransferError::OutOfRange { .. })
    ));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 64 << 10);
    assert_eq!(disk.failure_log().failures(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn truncated_image_fails_reads_and_writes_without_growing() {
    let dir = scratch("trunc");
    let path = dir.join("d.img");
    let disk = Disk::open(&path, Some(1 << 20)).unwrap();
    let mut buf = vec![vec![7u8; 8192]];
    disk.write_from(0, &slices(&mut buf)).unwrap();
    // Someone truncates the image under the running VM.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let r = disk.read_into(0, &slices(&mut buf));
    assert!(
        matches!(r, Err(TransferError::ShortRead { got: 4096, .. })),
        "{r:?}"
    );
    let r = disk.write_from(64 << 10, &slices(&mut buf));
    assert!(
        matches!(r, Err(TransferError::Truncated { now: 4096, .. })),
        "{r:?}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4096);
    // What is left still works.
    let mut small = vec![vec![0u8; 4096]];
    assert_eq!(disk.read_into(0, &slices(&mut small)).unwrap(), 4096);
    assert!(small[0].iter().all(|&b| b == 7));
    disk.flush().unwrap();
    assert_eq!(disk.failure_log().failures(), 2);
    let _ = std::fs::remove_dir_all(&dir);
}
