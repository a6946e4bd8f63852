//! Pool configuration: [`Config`] with every policy's knobs and their defaults (from
//! DESIGN.md and the RFCs), set from `key=value` tokens such as a guest command line, and the
//! sizes each policy derives from it.
//!
//! Keys (tokens separated by whitespace; a `swiotlb.` prefix on a key is accepted):
//!
//! | key | meaning | default |
//! | --- | --- | --- |
//! | `policy` | `legacy`, `dynamic`, `refill`, `throttle`, `aligned-2m`, `adaptive` | `legacy` |
//! | `ram` | guest RAM size, for the RAM-relative defaults | 0 (use the minimums) |
//! | `cpus` | vCPU count (areas per pool) | 1 |
//! | `pool` | boot pool size (refill: the budget the watermarks scale to) | per policy |
//! | `min_align` | min-align mask applied to every map (like a device's) | 0 |
//! | `prefill` | FromDevice maps copy the original into the bounce buffer too | 1 |
//! | `grow` | growth step (dynamic: clamped to 1..4 MiB; aligned-2m: 2 MiB multiple) | 4M / 2M |
//! | `max_pools` | most pools (boot pool included), at most 64 | 32 |
//! | `max` | most bytes in all pools | 1G |
//! | `shrink_ms` | free a grown pool idle this long (0: never) | 0 |
//! | `transient_max` | most live transient buffers (dynamic) | 256 |
//! | `wm` | refill watermarks, buffers per class 512,2K,4K,16K,512K | 256,16384,8192,1024,32 scaled |
//! | `batch` | refill batch size | 4M |
//! | `high`, `low` | throttle thresholds, percent of the pool | 70, 65 |
//! | `wait_ms` | throttle wait bound | 1000 |
//! | `sem` | throttle semaphore count | 1 |
//! | `lowat` | adaptive: grow when free space falls below this (or capacity/8 if more) | 512K |
//! | `reserve` | adaptive: room blocking maps leave for maps that cannot block | 512K |
//! | `soft` | adaptive: blocking maps wait rather than grow past this | 32M |
//! | `hold_ms` | adaptive: a chunk idle this long goes back to private (0: never) | 500 |
//!
//! Sizes take an optional `K`, `M` or `G` suffix (powers of 1024) or a `0x` prefix.

use crate::slots::SEGMENT_BYTES;
use core::fmt;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The six policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// One pool fixed at boot (the kernel's swiotlb).
    Legacy,
    /// Grow by pools in the background; transient buffers meanwhile.
    Dynamic,
    /// Size-class free lists refilled below their watermarks.
    Refill,
    /// A small pool; maps that may block wait instead of failing.
    Throttle,
    /// 2 MiB aligned and sized pools: every conversion is 2M.
    Aligned2m,
    /// 2 MiB chunks grown ahead of demand and returned when idle; blocking maps wait at a
    /// soft cap.
    Adaptive,
}

impl PolicyKind {
    /// Every policy, in a fixed order.
    pub const ALL: [PolicyKind; 6] = [
        PolicyKind::Legacy,
        PolicyKind::Dynamic,
        PolicyKind::Refill,
        PolicyKind::Throttle,
        PolicyKind::Aligned2m,
        PolicyKind::Adaptive,
    ];

    /// The name used in `policy=` and in reports.
    pub const fn name(self) -> &'static str {
        match self {
            PolicyKind::Legacy => "legacy",
            PolicyKind::Dynamic => "dynamic",
            PolicyKind::Refill => "refill",
            PolicyKind::Throttle => "throttle",
            PolicyKind::Aligned2m => "aligned-2m",
            PolicyKind::Adaptive => "adaptive",
        }
    }

    /// The policy called `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        PolicyKind::ALL.iter().copied().find(|k| k.name() == name)
    }
}

/// Why a setting was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// A token without `=`.
    NotKeyValue,
    /// A key this crate does not know.
    UnknownKey,
    /// `policy=` names no policy.
    UnknownPolicy,
    /// The value of this key does not parse or is out of range.
    BadValue(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NotKeyValue => f.write_str("expected key=value"),
            ConfigError::UnknownKey => f.write_str("unknown key"),
            ConfigError::UnknownPolicy => {
                f.write_str("unknown policy (legacy|dynamic|refill|throttle|aligned-2m|adaptive)")
            }
            ConfigError::BadValue(k) => write!(f, "bad value for {k}"),
        }
    }
}

/// Size classes of the refill policy, bytes.
pub const REFILL_CLASSES: [usize; 5] = [512, 2048, 4096, 16384, 512 * 1024];
/// The RFC's watermarks (buffers per class), ~96 MiB when full.
pub const REFILL_WATERMARKS: [u32; 5] = [256, 16384, 8192, 1024, 32];
/// Most pools a growing policy can have.
pub const MAX_POOLS: u32 = 64;

/// Everything a policy is built from. Construct with [`Config::new`] or [`Config::parse`],
/// adjust fields or call [`Config::set`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Which policy.
    pub kind: PolicyKind,
    /// Guest RAM in bytes (0: unknown, RAM-relative sizes take their minimum).
    pub ram_size: u64,
    /// vCPUs (areas per slot pool, rounded up to a power of two).
    pub cpus: u32,
    /// Explicit boot pool size (refill: total budget); `None` for the policy's default.
    pub pool_size: Option<u64>,
    /// Min-align mask applied to every map, OR-ed with the map's own.
    pub min_align_mask: u32,
    /// FromDevice maps also copy the original into the bounce buffer, so a device that writes
    /// less than the whole buffer cannot expose stale pool contents (the kernel does this).
    pub prefill: bool,
    /// Growth step (dynamic, aligned-2m); `None` for the default.
    pub grow_size: Option<u64>,
    /// Most pools, the boot pool included (dynamic, aligned-2m).
    pub max_pools: u32,
    /// Most bytes in all pools (dynamic, aligned-2m) or in all batches (refill).
    pub max_bytes: u64,
    /// Free a grown pool after it has had nothing mapped for this long; 0: never.
    pub shrink_idle_ms: u64,
    /// Most live transient buffers (dynamic).
    pub transient_max: u32,
    /// Refill watermarks; `None`: the RFC's, scaled to the budget.
    pub watermarks: Option<[u32; 5]>,
    /// Refill batch size (one conversion per batch).
    pub batch_bytes: u64,
    /// Throttle: above this percentage of the pool, blocking maps take the semaphore.
    pub high_pct: u32,
    /// Throttle: above this percentage, blocking maps wait if the semaphore is held.
    pub low_pct: u32,
    /// Throttle: longest wait of a blocking map, milliseconds.
    pub wait_ms: u64,
    /// Throttle: semaphore count (mappings that may be throttled at once).
    pub sem_count: u32,
    /// Adaptive: grow when free space falls below this many bytes (or capacity/8 if more).
    pub adaptive_low_water: u64,
    /// Adaptive: bytes blocking maps leave free for maps that cannot block.
    pub adaptive_reserve: u64,
    /// Adaptive: blocking maps wait rather than grow the pool past this; `None`: 32 MiB.
    pub adaptive_soft: Option<u64>,
    /// Adaptive: a grown chunk idle this long returns to private; 0: never.
    pub adaptive_hold_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config::new(PolicyKind::Legacy, 0, 1)
    }
}

/// Parse a size: decimal or `0x` hex, with an optional K/M/G suffix.
pub fn parse_size(s: &str) -> Option<u64> {
    let (num, mul) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], KIB),
        b'm' | b'M' => (&s[..s.len() - 1], MIB),
        b'g' | b'G' => (&s[..s.len() - 1], GIB),
        _ => (s, 1),
    };
    let v = if let Some(hex) = num.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()?
    } else {
        num.parse::<u64>().ok()?
    };
    v.checked_mul(mul)
}

fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "on" | "yes" | "true" => Some(true),
        "0" | "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

fn clamp_u64(v: u64, lo: u64, hi: u64) -> u64 {
    v.max(lo).min(hi)
}

fn round_up(v: u64, to: u64) -> u64 {
    v.div_ceil(to).saturating_mul(to)
}

impl Config {
    /// Defaults for `kind` in a guest with `ram_size` bytes of RAM and `cpus` vCPUs.
    pub const fn new(kind: PolicyKind, ram_size: u64, cpus: u32) -> Self {
        Config {
            kind,
            ram_size,
            cpus,
            pool_size: None,
            min_align_mask: 0,
            prefill: true,
            grow_size: None,
            max_pools: 32,
            max_bytes: GIB,
            shrink_idle_ms: 0,
            transient_max: 256,
            watermarks: None,
            batch_bytes: 4 * MIB,
            high_pct: 70,
            low_pct: 65,
            wait_ms: 1000,
            sem_count: 1,
            adaptive_low_water: 512 * KIB,
            adaptive_reserve: 512 * KIB,
            adaptive_soft: None,
            adaptive_hold_ms: 500,
        }
    }

    /// Defaults, then every `key=value` token of `text` (whitespace separated); unknown keys
    /// are errors.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let mut c = Config::default();
        c.apply(text, false)?;
        Ok(c)
    }

    /// Apply every `key=value` token of `text`. With `skip_unknown`, tokens whose key this
    /// crate does not know (and tokens without `=`) are ignored, so a whole guest command line
    /// can be passed.
    pub fn apply(&mut self, text: &str, skip_unknown: bool) -> Result<(), ConfigError> {
        for tok in text.split_ascii_whitespace() {
            let Some((k, v)) = tok.split_once('=') else {
                if skip_unknown {
                    continue;
                }
                return Err(ConfigError::NotKeyValue);
            };
            match self.set(k, v) {
                Err(ConfigError::UnknownKey) if skip_unknown => {}
                r => r?,
            }
        }
        self.validate()
    }

    /// Set one key (see the module docs for the keys).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), ConfigError> {
        let key = key.strip_prefix("swiotlb.").unwrap_or(key);
        let size = |k: &'static str| parse_size(value).ok_or(ConfigError::BadValue(k));
        let num32 = |k: &'static str| {
            parse_size(value)
                .and_then(|v| u32::try_from(v).ok())
                .ok_or(ConfigError::BadValue(k))
        };
        match key {
            "policy" => {
                self.kind = PolicyKind::from_name(value).ok_or(ConfigError::UnknownPolicy)?
            }
            "ram" => self.ram_size = size("ram")?,
            "cpus" => self.cpus = num32("cpus")?.max(1),
            "pool" => self.pool_size = Some(size("pool")?).filter(|&v| v > 0),
            "min_align" => {
                let m = num32("min_align")?;
                if m as usize >= SEGMENT_BYTES || m & m.wrapping_add(1) != 0 {
                    return Err(ConfigError::BadValue("min_align"));
                }
                self.min_align_mask = m;
            }
            "prefill" => {
                self.prefill = parse_bool(value).ok_or(ConfigError::BadValue("prefill"))?
            }
            "grow" => self.grow_size = Some(size("grow")?).filter(|&v| v > 0),
            "max_pools" => {
                let n = num32("max_pools")?;
                if n == 0 || n > MAX_POOLS {
                    return Err(ConfigError::BadValue("max_pools"));
                }
                self.max_pools = n;
            }
            "max" => self.max_bytes = size("max")?,
            "shrink_ms" => self.shrink_idle_ms = size("shrink_ms")?,
            "transient_max" => self.transient_max = num32("transient_max")?,
            "wm" => {
                let mut wm = [0u32; 5];
                let mut it = value.split(',');
                for w in wm.iter_mut() {
                    *w = it
                        .next()
                        .and_then(parse_size)
                        .and_then(|v| u32::try_from(v).ok())
                        .ok_or(ConfigError::BadValue("wm"))?;
                }
                if it.next().is_some() {
                    return Err(ConfigError::BadValue("wm"));
                }
                self.watermarks = Some(wm);
            }
            "batch" => {
                let b = size("batch")?;
                if b < 4096 || b % 4096 != 0 || b > GIB {
                    return Err(ConfigError::BadValue("batch"));
                }
                self.batch_bytes = b;
            }
            "high" => self.high_pct = num32("high")?,
            "low" => self.low_pct = num32("low")?,
            "wait_ms" => self.wait_ms = size("wait_ms")?,
            "sem" => self.sem_count = num32("sem")?.max(1),
            "lowat" => self.adaptive_low_water = size("lowat")?,
            "reserve" => self.adaptive_reserve = size("reserve")?,
            "soft" => self.adaptive_soft = Some(round_up(size("soft")?.max(1), 2 * MIB)),
            "hold_ms" => self.adaptive_hold_ms = size("hold_ms")?,
            _ => return Err(ConfigError::UnknownKey),
        }
        Ok(())
    }

    /// Check the settings that depend on each other (done by [`Config::apply`] after all
    /// tokens): `low <= high <= 100`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.low_pct > self.high_pct || self.high_pct > 100 {
            return Err(ConfigError::BadValue("high/low"));
        }
        Ok(())
    }

    /// Pools that never retire (dynamic, aligned-2m): the boot pool, or all when shrinking
    /// is off.
    pub fn permanent_pools(&self) -> usize {
        if self.shrink_idle_ms > 0 {
            1
        } else {
            self.max_pools as usize
        }
    }

    /// The legacy boot pool: `pool`, or 6% of RAM clamped to [64 MiB, 1 GiB]; a multiple of
    /// 256 KiB.
    pub fn legacy_pool_bytes(&self) -> u64 {
        let b = self
            .pool_size
            .unwrap_or_else(|| clamp_u64(self.ram_size / 100 * 6, 64 * MIB, GIB));
        round_up(b, SEGMENT_BYTES as u64)
    }

    /// The throttle pool: `pool`, or a quarter of the legacy default clamped to
    /// [4 MiB, 256 MiB]; a multiple of 256 KiB.
    pub fn throttle_pool_bytes(&self) -> u64 {
        let b = self
            .pool_size
            .unwrap_or_else(|| clamp_u64(self.ram_size / 100 * 6 / 4, 4 * MIB, 256 * MIB));
        round_up(b, SEGMENT_BYTES as u64)
    }

    /// The dynamic growth step: `grow` clamped to [1 MiB, 4 MiB], default 4 MiB; a multiple of
    /// 256 KiB.
    pub fn dynamic_grow_bytes(&self) -> u64 {
        round_up(
            clamp_u64(self.grow_size.unwrap_or(4 * MIB), MIB, 4 * MIB),
            SEGMENT_BYTES as u64,
        )
    }

    /// The dynamic boot pool: `pool`, or one growth step; a multiple of 256 KiB.
    pub fn dynamic_pool_bytes(&self) -> u64 {
        round_up(
            self.pool_size.unwrap_or_else(|| self.dynamic_grow_bytes()),
            SEGMENT_BYTES as u64,
        )
    }

    /// The aligned-2m boot pool: `pool`, or 8% of RAM at most 1.25 GiB; a multiple of 2 MiB
    /// (rounded up, at least 2 MiB).
    pub fn aligned_pool_bytes(&self) -> u64 {
        let b = self
            .pool_size
            .unwrap_or_else(|| (self.ram_size / 100 * 8).min(GIB + GIB / 4));
        round_up(b.max(1), 2 * MIB)
    }

    /// The aligned-2m growth step: `grow` rounded up to 2 MiB, default 2 MiB.
    pub fn aligned_grow_bytes(&self) -> u64 {
        round_up(self.grow_size.unwrap_or(2 * MIB).max(1), 2 * MIB)
    }

    /// The adaptive boot chunk: `pool` rounded up to 2 MiB, default 2 MiB.
    pub fn adaptive_pool_bytes(&self) -> u64 {
        round_up(self.pool_size.unwrap_or(2 * MIB).max(1), 2 * MIB)
    }

    /// The adaptive soft cap: `soft` (a multiple of 2 MiB), default 32 MiB, at least the boot
    /// chunk.
    pub fn adaptive_soft_bytes(&self) -> u64 {
        self.adaptive_soft
            .unwrap_or(32 * MIB)
            .max(self.adaptive_pool_bytes())
    }

    /// The refill watermarks: `wm`, or the RFC's scaled down to the budget (`pool`, or the
    /// legacy default size) when that is below the ~96 MiB they need (each at least 1).
    pub fn refill_watermarks(&self) -> [u32; 5] {
        if let Some(wm) = self.watermarks {
            return wm;
        }
        let full: u64 = REFILL_CLASSES
            .iter()
            .zip(REFILL_WATERMARKS.iter())
            .map(|(&s, &w)| s as u64 * w as u64)
            .sum();
        let budget = self.pool_size.unwrap_or_else(|| self.legacy_pool_bytes());
        let mut wm = REFILL_WATERMARKS;
        if budget < full {
            for w in wm.iter_mut() {
                *w = ((*w as u64 * budget / full) as u32).max(1);
            }
        }
        wm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("64m"), Some(64 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("0x1000"), Some(4096));
        assert_eq!(parse_size("0x2M"), Some(2 << 20));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("x1"), None);
        assert_eq!(parse_size("99999999999G"), None);
    }

    #[test]
    fn parse_and_defaults() {
        let c = Config::parse("policy=throttle ram=4G cpus=4 high=80 low=60 wait_ms=5").unwrap();
        assert_eq!(c.kind, PolicyKind::Throttle);
        assert_eq!((c.high_pct, c.low_pct, c.wait_ms, c.cpus), (80, 60, 5, 4));
        assert_eq!(
            Config::parse("policy=nope"),
            Err(ConfigError::UnknownPolicy)
        );
        assert_eq!(Config::parse("what=1"), Err(ConfigError::UnknownKey));
        assert_eq!(Config::parse("pool"), Err(ConfigError::NotKeyValue));
        assert_eq!(
            Config::parse("high=50"),
            Err(ConfigError::BadValue("high/low"))
        );
        assert_eq!(Config::parse("high=60 low=50").unwrap().low_pct, 50);
        assert_eq!(
            Config::parse("min_align=0x1001"),
            Err(ConfigError::BadValue("min_align"))
        );
        let mut c = Config::default();
        c.apply(
            "console=ttyS0 quiet swiotlb.policy=refill wm=1,2,3,4,5",
            true,
        )
        .unwrap();
        assert_eq!(c.kind, PolicyKind::Refill);
        assert_eq!(c.refill_watermarks(), [1, 2, 3, 4, 5]);
        assert_eq!(Config::parse("wm=1,2,3"), Err(ConfigError::BadValue("wm")));

        let mut c = Config::new(PolicyKind::Legacy, 4 * GIB, 2);
        assert_eq!(
            c.legacy_pool_bytes(),
            round_up(4 * GIB / 100 * 6, 256 * KIB)
        );
        c.ram_size = 256 * MIB;
        assert_eq!(c.legacy_pool_bytes(), 64 * MIB);
        c.ram_size = 64 * GIB;
        assert_eq!(c.legacy_pool_bytes(), GIB);
        c.pool_size = Some(1000);
        assert_eq!(c.legacy_pool_bytes(), 256 * KIB);
        assert_eq!(c.aligned_pool_bytes(), 2 * MIB);
        c.pool_size = None;
        assert_eq!(c.aligned_pool_bytes(), GIB + GIB / 4);
        c.grow_size = Some(8 * MIB);
        assert_eq!(c.dynamic_grow_bytes(), 4 * MIB);
        c.grow_size = Some(3 * MIB);
        assert_eq!(c.aligned_grow_bytes(), 4 * MIB);
        c.grow_size = None;
        assert_eq!(c.refill_watermarks(), REFILL_WATERMARKS);
        c.pool_size = Some(8 * MIB);
        let wm = c.refill_watermarks();
        assert!(wm.iter().all(|&w| w >= 1));
        let bytes: u64 = REFILL_CLASSES
            .iter()
            .zip(wm)
            .map(|(&s, w)| s as u64 * w as u64)
            .sum();
        assert!(bytes <= 8 * MIB + 5 * 512 * KIB, "{bytes}");
    }
}
