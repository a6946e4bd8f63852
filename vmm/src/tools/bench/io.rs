//! `vmm bench io`: the DMA device per pool policy: 4 KiB random-read IOPS, 64 KiB bandwidth
//! next to memcpy, pool footprint, conversions and double allocation.

use std::fmt::Write as _;

use memconv::StoreKind;

use super::common::{io_field, BenchError, Capture};
use crate::config::VmConfig;
use crate::run::{self, RunError, RunSummary};
use crate::serial::Console;

/// Pool sizes small enough for a 512 MiB guest, per policy.
const IO_POLICIES: [(&str, &str); 5] = [
    ("legacy", "pool=64M"),
    ("dynamic", "pool=4M"),
    ("refill", "pool=32M"),
    ("throttle", "pool=4M"),
    ("aligned-2m", "pool=16M"),
];

fn io_run(
    policy_opts: &str,
    workload: &str,
    store: StoreKind,
    disk: &std::path::Path,
) -> Result<(RunSummary, String), BenchError> {
    let cfg = VmConfig {
        cmdline: format!("{policy_opts} {workload}"),
        private: store,
        shared: store,
        disk: Some(crate::config::DiskConfig {
            path: disk.to_path_buf(),
            create_size: Some(256 << 20),
            idle_us: crate::devices::virtio_blk::DEFAULT_IDLE_US,
            io: crate::devices::DiskIo::Vectored,
        }),
        ..VmConfig::fixture("io", 512 << 20)
    };
    let capture = Capture::default();
    let outcome =
        run::run_vm_with_console(&cfg, Some(Console::with_writer(Box::new(capture.clone()))))?;
    let s = outcome.summary;
    if s.exit_status != 0 {
        return Err(BenchError::GuestFailed {
            guest: format!("io {}: {}", cfg.cmdline, capture.text()),
            end: s.end,
        });
    }
    Ok((s, capture.text()))
}

/// `vmm bench io`: per policy, 4 KiB random reads at queue depth 32 (IOPS, memfd/memfd) and
/// 64 KiB reads (bandwidth next to a plain memcpy of the same sizes in the same guest,
/// hugetlb/hugetlb), with the pool's footprint and conversions and memconv's double
/// allocation. `secs` seconds per measurement.
pub fn io(secs: u64) -> Result<String, BenchError> {
    let dir = std::env::temp_dir().join(format!("vmm-bench-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        BenchError::Run(RunError::Disk(crate::devices::DiskError::Open {
            path: dir.clone(),
            source: e,
        }))
    })?;
    let disk = dir.join("bench.img");
    let mut out = String::new();
    let _ = writeln!(
        out,
        "io: 1 vCPU, 512 MiB, 256 MiB disk, {secs} s per figure; 4k = random reads qd=32 (memfd/memfd), \
         64k = reads qd=32 (hugetlb/hugetlb) vs memcpy of 64 KiB in the same guest from a \
         128 MiB source (the disk region's size) into the request buffers"
    );
    let _ = writeln!(
        out,
        "  {:<10} {:>9} {:>9} {:>11} {:>6} {:>9} {:>11} {:>10} {:>8} {:>6} {:>6} {:>6} {:>9}",
        "policy",
        "4k IOPS",
        "64k MB/s",
        "memcpy MB/s",
        "ratio",
        "doorbells",
        "shared peak",
        "map fails",
        "throttle",
        "cv 4k",
        "cv 2m",
        "cv oth",
        "dbl peak"
    );
    for (policy, opts) in IO_POLICIES {
        let popts = format!("policy={policy} {opts}");
        let w4k = format!("rw=read sizes=4k qd=32 verify=0 region=128M seconds={secs}");
        let (_s4, o4) = io_run(&popts, &w4k, StoreKind::Memfd, &disk)?;
        let w64 = format!("rw=read sizes=64k qd=32 verify=0 region=128M memcpy=1 seconds={secs}");
        let (s64, o64) = io_run(&popts, &w64, StoreKind::Hugetlb, &disk)?;
        let iops = io_field(&o4, "iops");
        let mbps = io_field(&o64, "MBps");
        let memcpy = io_field(&o64, "memcpy_MBps");
        let doorbells = io_field(&o4, "doorbells") + io_field(&o64, "doorbells");
        let p = s64.memconv.pool_report.as_ref();
        let pf = |f: fn(&memconv::stats::PoolReportSnapshot) -> u64| p.map_or(0, f);
        let _ = writeln!(
            out,
            "  {:<10} {:>9.0} {:>9.0} {:>11.0} {:>6.2} {:>9.0} {:>9.1}Mi {:>10} {:>8} {:>6} {:>6} {:>6} {:>7.1}Mi",
            policy,
            iops,
            mbps,
            memcpy,
            if memcpy > 0.0 { mbps / memcpy } else { 0.0 },
            doorbells,
            pf(|p| p.shared_peak_bytes) as f64 / (1u64 << 20) as f64,
            pf(|p| p.map_failures),
            pf(|p| p.throttle_waits),
            pf(|p| p.conversions_4k),
            pf(|p| p.conversions_2m),
            pf(|p| p.conversions_other),
            s64.memconv.double_alloc.computed_peak_bytes as f64 / (1u64 << 20) as f64,
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}
