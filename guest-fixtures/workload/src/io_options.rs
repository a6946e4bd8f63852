//! The io workload's command-line options (besides the pool's own keys): [`parse`] checks
//! them into [`Params`]; the keys and limits are described in the fixtures crate's
//! `io_workload` module. Pure (no runtime), so host-tested.

use rtcore::cmdline::{self, Cmdline};

/// Most vCPUs issuing I/O.
pub const MAX_IO_CPUS: usize = 16;
/// Most requests in flight per vCPU (3 descriptors each in a 256-entry ring).
pub const MAX_QD: usize = 85;
/// The largest request.
pub const MAX_REQ: u32 = 256 * 1024;
/// Bytes per disk sector.
pub const SECTOR: u64 = 512;
/// Most sizes in a `sizes=` mix.
pub const MAX_MIX: usize = 8;

/// Request sizes (`sizes=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizes {
    /// One size.
    Fixed(u32),
    /// Random sector multiples in `[lo, hi]`.
    Range(u32, u32),
    /// A random pick among the first `n` sizes.
    Mix([u32; MAX_MIX], usize),
}

impl Sizes {
    /// The largest size.
    pub fn max(&self) -> u32 {
        match *self {
            Sizes::Fixed(n) => n,
            Sizes::Range(_, hi) => hi,
            Sizes::Mix(v, n) => v[..n].iter().copied().max().unwrap_or(SECTOR as u32),
        }
    }

    /// The size for random number `rnd`.
    pub fn pick(&self, rnd: u64) -> u32 {
        match *self {
            Sizes::Fixed(n) => n,
            Sizes::Range(lo, hi) => {
                let (a, b) = (lo as u64 / SECTOR, hi as u64 / SECTOR);
                ((a + rnd % (b - a + 1)) * SECTOR) as u32
            }
            Sizes::Mix(v, n) => v[(rnd % n as u64) as usize],
        }
    }
}

/// The io workload's options, checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Request sizes (`sizes=`).
    pub sizes: Sizes,
    /// Requests in flight per vCPU (`qd=`).
    pub qd: u32,
    /// Percent reads (`rw=`).
    pub read_pct: u32,
    /// Submit this many at once, then drain (`burst=`; 0: steady queue depth).
    pub burst: u32,
    /// vCPUs issuing I/O (`cpus=`).
    pub cpus: u32,
    /// One more vCPU runs the pool's background work (`worker=1`, if there is a vCPU for it).
    pub worker: bool,
    /// Requests per vCPU (`requests=`).
    pub requests: u64,
    /// Run this long instead (`seconds=`; 0: count requests).
    pub seconds: u64,
    /// Disk bytes per vCPU (`region=`; 0: the disk split evenly).
    pub region: u64,
    /// Write the whole region first (`fill=`).
    pub fill: bool,
    /// Check the data read (`verify=`).
    pub verify: bool,
    /// Also measure plain memcpy (`memcpy=`).
    pub memcpy: bool,
    /// Random seed (`seed=`).
    pub seed: u64,
    /// Pool report interval, at least 1 (`report_ms=`).
    pub report_ms: u64,
    /// Start delay between I/O vCPUs (`ramp_ms=`).
    pub ramp_ms: u64,
    /// Hand the device a private buffer (`broken=private-buffer`).
    pub broken: bool,
    /// Submit nothing and wait `seconds` for a completion that never comes (`stall=1`: an
    /// idle VM, for the CPU-use test).
    pub stall: bool,
}

/// `n` as a request size, if it is a sector multiple in 512 B ..= 256 KiB.
fn size_ok(n: u64) -> Option<u32> {
    (n >= SECTOR && n <= MAX_REQ as u64 && n.is_multiple_of(SECTOR)).then_some(n as u32)
}

/// A `sizes=` value: `4k`, `512-256k` or `4k,64k`.
pub fn parse_sizes(s: &str) -> Option<Sizes> {
    let (lo, hi) = cmdline::split_once(s, b'-');
    if let Some(hi) = hi {
        let (a, b) = (
            size_ok(cmdline::parse_u64(lo)?)?,
            size_ok(cmdline::parse_u64(hi)?)?,
        );
        return (a <= b).then_some(Sizes::Range(a, b));
    }
    let mut v = [0u32; MAX_MIX];
    let mut n = 0;
    for item in cmdline::list(s) {
        if n == MAX_MIX {
            return None;
        }
        v[n] = size_ok(cmdline::parse_u64(item)?)?;
        n += 1;
    }
    match n {
        0 => None,
        1 => Some(Sizes::Fixed(v[0])),
        _ => Some(Sizes::Mix(v, n)),
    }
}

/// Parse and check the options on command line `c` for a VM of `cpu_count` vCPUs; the
/// error says which option is wrong and what it accepts.
pub fn parse(c: &Cmdline, cpu_count: u32) -> Result<Params, &'static str> {
    let num = |k: &str, d: u64| c.u64_or(k, d).map_err(|_| "a number option is malformed");
    let sizes = match c.get("sizes") {
        None => Sizes::Fixed(4096),
        Some(s) => parse_sizes(s)
            .ok_or("sizes= must be 512..256k sector multiples: 4k, 512-256k or 4k,64k")?,
    };
    let read_pct = match c.get("rw") {
        Some("read") => 100,
        Some("write") => 0,
        _ => num("rw", 50)?,
    };
    if read_pct > 100 {
        return Err("rw= is a read percentage 0..100");
    }
    let worker = c.flag("worker", false).map_err(|_| "worker= is 0 or 1")?;
    let max_io = cpu_count - u32::from(worker && cpu_count > 1);
    let cpus = num("cpus", max_io as u64)? as u32;
    if cpus == 0 || cpus > max_io || cpus as usize > MAX_IO_CPUS {
        return Err("cpus= must be 1..=vCPUs (minus the worker), at most 16");
    }
    let qd = num("qd", 8)? as u32;
    if qd == 0 || qd as usize > MAX_QD {
        return Err("qd= must be 1..=85");
    }
    let burst = num("burst", 0)? as u32;
    if burst as usize > MAX_QD {
        return Err("burst= must be 0..=85");
    }
    let broken = match c.get("broken") {
        None => false,
        Some("private-buffer") => true,
        Some(_) => return Err("broken= only knows private-buffer"),
    };
    Ok(Params {
        sizes,
        qd,
        read_pct: read_pct as u32,
        burst,
        cpus,
        worker: worker && cpu_count > cpus,
        requests: num("requests", 1000)?,
        seconds: num("seconds", 0)?,
        region: num("region", 0)?,
        fill: c.flag("fill", true).map_err(|_| "fill= is 0 or 1")?,
        verify: c.flag("verify", true).map_err(|_| "verify= is 0 or 1")?,
        memcpy: c.flag("memcpy", false).map_err(|_| "memcpy= is 0 or 1")?,
        seed: num("seed", 1)?,
        report_ms: num("report_ms", 100)?.max(1),
        ramp_ms: num("ramp_ms", 0)?,
        broken,
        stall: c.flag("stall", false).map_err(|_| "stall= is 0 or 1")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(line: &str, cpus: u32) -> Result<Params, &'static str> {
        parse(&Cmdline::new(line.as_bytes()), cpus)
    }

    #[test]
    fn defaults() {
        let p = opts("policy=legacy", 2).unwrap();
        assert_eq!(p.sizes, Sizes::Fixed(4096));
        assert_eq!((p.qd, p.read_pct, p.burst, p.cpus), (8, 50, 0, 2));
        assert!(!p.worker && p.fill && p.verify && !p.memcpy && !p.broken && !p.stall);
        assert!(opts("stall=1", 1).unwrap().stall);
        assert_eq!((p.requests, p.seconds, p.region, p.seed), (1000, 0, 0, 1));
        assert_eq!((p.report_ms, p.ramp_ms), (100, 0));
    }

    #[test]
    fn sizes_forms() {
        assert_eq!(parse_sizes("64k"), Some(Sizes::Fixed(65536)));
        assert_eq!(parse_sizes("512-256k"), Some(Sizes::Range(512, 262144)));
        let mut v = [0u32; MAX_MIX];
        v[0] = 4096;
        v[1] = 65536;
        assert_eq!(parse_sizes("4k,64k"), Some(Sizes::Mix(v, 2)));
        for bad in [
            "",
            "100",
            "256",
            "512k",
            "8k-4k",
            "1k,2k,3k,4k,5k,6k,7k,8k,9k",
            "x",
        ] {
            assert_eq!(parse_sizes(bad), None, "{bad}");
        }
        assert!(opts("sizes=1000", 1).unwrap_err().starts_with("sizes="));
    }

    #[test]
    fn sizes_pick_and_max() {
        let r = Sizes::Range(512, 4096);
        for rnd in 0..100 {
            let n = r.pick(rnd);
            assert!((512..=4096).contains(&n) && n.is_multiple_of(512));
        }
        assert_eq!(r.max(), 4096);
        assert_eq!(parse_sizes("4k,64k,8k").unwrap().max(), 65536);
        assert_eq!(Sizes::Fixed(512).pick(7), 512);
    }

    #[test]
    fn read_percentage() {
        assert_eq!(opts("rw=read", 1).unwrap().read_pct, 100);
        assert_eq!(opts("rw=write", 1).unwrap().read_pct, 0);
        assert_eq!(opts("rw=30", 1).unwrap().read_pct, 30);
        assert_eq!(opts("rw=101", 1), Err("rw= is a read percentage 0..100"));
        assert_eq!(opts("rw=x", 1), Err("a number option is malformed"));
    }

    #[test]
    fn cpus_and_worker() {
        let p = opts("worker=1", 4).unwrap();
        assert_eq!((p.cpus, p.worker), (3, true));
        let p = opts("worker=1", 1).unwrap();
        assert_eq!((p.cpus, p.worker), (1, false));
        let p = opts("cpus=2", 4).unwrap();
        assert_eq!((p.cpus, p.worker), (2, false));
        let p = opts("cpus=2 worker=1", 4).unwrap();
        assert_eq!((p.cpus, p.worker), (2, true));
        let e = "cpus= must be 1..=vCPUs (minus the worker), at most 16";
        assert_eq!(opts("cpus=0", 4), Err(e));
        assert_eq!(opts("cpus=4 worker=1", 4), Err(e));
        assert_eq!(opts("cpus=17", 32), Err(e));
        assert_eq!(opts("worker=2", 4), Err("worker= is 0 or 1"));
    }

    #[test]
    fn queue_depth_burst_and_broken() {
        assert_eq!(opts("qd=85", 1).unwrap().qd, 85);
        assert_eq!(opts("qd=0", 1), Err("qd= must be 1..=85"));
        assert_eq!(opts("qd=86", 1), Err("qd= must be 1..=85"));
        assert_eq!(opts("burst=85", 1).unwrap().burst, 85);
        assert_eq!(opts("burst=86", 1), Err("burst= must be 0..=85"));
        assert!(opts("broken=private-buffer", 1).unwrap().broken);
        assert_eq!(
            opts("broken=other", 1),
            Err("broken= only knows private-buffer")
        );
    }

    #[test]
    fn flags_and_numbers() {
        let p = opts(
            "fill=0 verify=0 memcpy=1 seed=9 requests=5 seconds=2 region=1M report_ms=0 ramp_ms=3",
            1,
        )
        .unwrap();
        assert!(!p.fill && !p.verify && p.memcpy);
        assert_eq!(
            (p.seed, p.requests, p.seconds, p.region),
            (9, 5, 2, 1 << 20)
        );
        assert_eq!((p.report_ms, p.ramp_ms), (1, 3));
        assert_eq!(opts("fill=2", 1), Err("fill= is 0 or 1"));
        assert_eq!(opts("verify=x", 1), Err("verify= is 0 or 1"));
        assert_eq!(opts("memcpy=x", 1), Err("memcpy= is 0 or 1"));
    }
}
