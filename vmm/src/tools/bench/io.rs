//! `vmm bench io`: the DMA device per pool policy: 4 KiB random-read IOPS, 64 KiB bandwidth
//! next to memcpy, pool footprint, conversions and double allocation; then the disk's data
//! path (preadv/pwritev) against the old mapped path at 64 KiB, side by side in one run.

use std::fmt::Write as _;

use memconv::StoreKind;

use super::common::{io_field, spread, BenchError, Capture};
use crate::config::VmConfig;
use crate::devices::DiskIo;
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

/// What `vmm bench io` measures.
#[derive(Clone, Debug)]
pub struct IoBenchOptions {
    /// Seconds per measurement.
    pub secs: u64,
    /// Runs of each data path in the side-by-side comparison.
    pub repeats: u32,
    /// Only the data-path comparison.
    pub data_path_only: bool,
}

fn io_run(
    policy_opts: &str,
    workload: &str,
    store: StoreKind,
    disk: &std::path::Path,
    data_path: DiskIo,
) -> Result<(RunSummary, String), BenchError> {
    let cfg = VmConfig {
        cmdline: format!("{policy_opts} {workload}"),
        private: store,
        shared: store,
        disk: Some(crate::config::DiskConfig {
            path: disk.to_path_buf(),
            create_size: Some(256 << 20),
            idle_us: crate::devices::virtio_blk::DEFAULT_IDLE_US,
            io: data_path,
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
/// allocation. `secs` seconds per measurement. Then [`data_path`].
pub fn io(opts: &IoBenchOptions) -> Result<String, BenchError> {
    let secs = opts.secs;
    let dir = std::env::temp_dir().join(format!("vmm-bench-io-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| {
        BenchError::Run(RunError::Disk(crate::devices::DiskError::Open {
            path: dir.clone(),
            source: e,
        }))
    })?;
    let disk = dir.join("bench.img");
    let mut out = String::new();
    if !opts.data_path_only {
        policies(secs, &disk, &mut out)?;
    }
    data_path(secs, opts.repeats.max(1), &disk, &mut out)?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(out)
}

/// The per-policy table.
fn policies(secs: u64, disk: &std::path::Path, out: &mut String) -> Result<(), BenchError> {
    let _ = writeln!(
        *out,
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
        let (_s4, o4) = io_run(&popts, &w4k, StoreKind::Memfd, disk, DiskIo::Vectored)?;
        let w64 = format!("rw=read sizes=64k qd=32 verify=0 region=128M memcpy=1 seconds={secs}");
        let (s64, o64) = io_run(&popts, &w64, StoreKind::Hugetlb, disk, DiskIo::Vectored)?;
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
    Ok(())
}

/// The disk's data path (preadv/pwritev) next to the old mapped path (mmap + memcpy), at
/// 64 KiB, reads then writes: `repeats` runs of each, interleaved (A B B A A B ...) so that
/// a drift of the machine's load hits both alike; the medians and their ratio.
fn data_path(
    secs: u64,
    repeats: u32,
    disk: &std::path::Path,
    out: &mut String,
) -> Result<(), BenchError> {
    let _ = writeln!(
        out,
        "disk data path, 64 KiB, qd=32, legacy pool=64M, hugetlb/hugetlb, {secs} s per run, \
         {repeats} runs each interleaved A/B: vectored = preadv/pwritev (what vmm run uses), \
         mapped = the old mmap + memcpy path (SIGBUS on a full filesystem or truncated image)"
    );
    let _ = writeln!(
        out,
        "  {:<6} {:>15} {:>13} {:>6}   runs (vectored | mapped), MB/s",
        "op", "vectored MB/s", "mapped MB/s", "ratio"
    );
    for (op, rw) in [("read", "read"), ("write", "write")] {
        let work = format!("rw={rw} sizes=64k qd=32 verify=0 region=128M seconds={secs}");
        let (mut vectored, mut mapped) = (Vec::new(), Vec::new());
        for i in 0..repeats {
            let order = if i % 2 == 0 {
                [DiskIo::Vectored, DiskIo::Mapped]
            } else {
                [DiskIo::Mapped, DiskIo::Vectored]
            };
            for path in order {
                let (_s, o) = io_run(
                    "policy=legacy pool=64M",
                    &work,
                    StoreKind::Hugetlb,
                    disk,
                    path,
                )?;
                let mbps = io_field(&o, "MBps");
                match path {
                    DiskIo::Vectored => vectored.push(mbps),
                    DiskIo::Mapped => mapped.push(mbps),
                }
            }
        }
        let runs = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let list = format!("{} | {}", runs(&vectored), runs(&mapped));
        let (_, v_med, _) = spread(vectored);
        let (_, m_med, _) = spread(mapped);
        let _ = writeln!(
            out,
            "  {:<6} {:>15.0} {:>13.0} {:>6.2}   {list}",
            op,
            v_med,
            m_med,
            if m_med > 0.0 { v_med / m_med } else { 0.0 },
        );
    }
    let _ = writeln!(out, "  target: vectored >= 0.9x mapped (medians)");
    Ok(())
}
