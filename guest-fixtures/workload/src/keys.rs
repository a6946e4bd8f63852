//! The command-line keys each embedded fixture declares, with the values each key accepts: the
//! table a host checks a guest command line against before boot ([`check`]), so that a typo
//! (`polcy=throttle`) or a bad value (`policy=bogus`) is an error naming the key instead of a
//! silently ignored token. Values are checked by the fixtures' own parsers where one exists
//! (the io workload's [`crate::io_options`], the pool's [`swiotlb::Config::set`]). Pure, so
//! host-tested and usable from the host (vmm depends on this crate by path).

use rtcore::cmdline::{self, Cmdline};
use swiotlb::{Config, PolicyKind};

use crate::io_options;

/// What a key's value may be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepts {
    /// A number (decimal or `0x` hex, optional K/M/G suffix) in `min..=max`.
    Number {
        /// Smallest accepted.
        min: u64,
        /// Largest accepted.
        max: u64,
    },
    /// A boolean: `1`/`0` (also `true`/`false`, `yes`/`no`, `on`/`off`).
    Flag,
    /// One of these words.
    OneOf(&'static [&'static str]),
    /// A comma-separated list of these words.
    ListOf(&'static [&'static str]),
    /// A pool key, checked by the swiotlb crate's parser.
    Pool,
    /// An io workload key, checked by [`io_options::parse`].
    Io,
}

/// One key a fixture reads from its command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Key {
    /// The key, as written before `=`.
    pub name: &'static str,
    /// How its value is checked.
    pub accepts: Accepts,
    /// The accepted values, for people (`1..=85`, `legacy|dynamic|...`).
    pub values: &'static str,
}

/// Why a command line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyError<'a> {
    /// A key the fixture does not read.
    UnknownKey {
        /// The key as written.
        key: &'a str,
    },
    /// A known key with a value it does not accept.
    BadValue {
        /// The key.
        key: &'a Key,
        /// The value as written.
        value: &'a str,
    },
    /// Each key is fine alone but together they are not (e.g. `low=` above `high=`, or
    /// `cpus=` leaving no vCPU for `worker=1`); the fixture's parser says why.
    Combination {
        /// The parser's reason.
        reason: &'static str,
    },
}

const fn key(name: &'static str, accepts: Accepts, values: &'static str) -> Key {
    Key {
        name,
        accepts,
        values,
    }
}

const fn num(name: &'static str, min: u64, max: u64, values: &'static str) -> Key {
    key(name, Accepts::Number { min, max }, values)
}

/// The built-in policies' names (`policy=`).
pub const POLICY_NAMES: [&str; 5] = [
    PolicyKind::Legacy.name(),
    PolicyKind::Dynamic.name(),
    PolicyKind::Refill.name(),
    PolicyKind::Throttle.name(),
    PolicyKind::Aligned2m.name(),
];

/// The pool's keys other than `policy=` (see the swiotlb crate's `config` module).
pub const POOL_KEYS: &[Key] = &[
    key("ram", Accepts::Pool, "a size, e.g. 512M"),
    key(
        "pool",
        Accepts::Pool,
        "a size, e.g. 4M (0: the policy's default)",
    ),
    key(
        "min_align",
        Accepts::Pool,
        "a mask 2^n-1 below 2 KiB, e.g. 0xfff",
    ),
    key("prefill", Accepts::Pool, "1 or 0"),
    key("grow", Accepts::Pool, "a size, e.g. 2M"),
    key("max_pools", Accepts::Pool, "1..=64"),
    key("max", Accepts::Pool, "a size, e.g. 1G"),
    key("shrink_ms", Accepts::Pool, "milliseconds (0: never)"),
    key("transient_max", Accepts::Pool, "a count"),
    key(
        "wm",
        Accepts::Pool,
        "five counts, e.g. 256,16384,8192,1024,32",
    ),
    key("batch", Accepts::Pool, "a 4 KiB multiple up to 1G, e.g. 4M"),
    key("high", Accepts::Pool, "a percentage 0..=100, at least low="),
    key("low", Accepts::Pool, "a percentage 0..=100, at most high="),
    key("wait_ms", Accepts::Pool, "milliseconds"),
    key("sem", Accepts::Pool, "a count"),
];

/// The built-in policies' `policy=`.
pub const POLICY_KEY: Key = key(
    "policy",
    Accepts::OneOf(&POLICY_NAMES),
    "legacy|dynamic|refill|throttle|aligned-2m",
);

/// The io workload's own keys (see `fixtures::io_workload`).
pub const IO_KEYS: &[Key] = &[
    key(
        "sizes",
        Accepts::Io,
        "512..256k sector multiples: 4k, 512-256k or 4k,64k",
    ),
    key("qd", Accepts::Io, "1..=85"),
    key("burst", Accepts::Io, "0..=85"),
    key(
        "rw",
        Accepts::Io,
        "a read percentage 0..=100, read or write",
    ),
    key(
        "cpus",
        Accepts::Io,
        "1..=vCPUs (minus the worker), at most 16",
    ),
    key("worker", Accepts::Io, "0 or 1"),
    key("requests", Accepts::Io, "a count per vCPU"),
    key("seconds", Accepts::Io, "seconds (0: count requests)"),
    key(
        "region",
        Accepts::Io,
        "a size per vCPU (0: the disk split evenly)",
    ),
    key("fill", Accepts::Io, "0 or 1"),
    key("verify", Accepts::Io, "0 or 1"),
    key("memcpy", Accepts::Io, "0 or 1"),
    key("seed", Accepts::Io, "a number"),
    key("report_ms", Accepts::Io, "milliseconds"),
    key("ramp_ms", Accepts::Io, "milliseconds"),
    key("broken", Accepts::Io, "private-buffer"),
    // `vmm replay` (the io fixture's replay module reads these itself).
    num(
        "replay_speed_milli",
        0,
        u64::MAX,
        "recorded gaps x1000/N (set by --speed)",
    ),
    num("replay_arena", 1 << 21, u64::MAX, "bytes, at least 2M"),
];

const CONVERT_KEYS: &[Key] = &[
    key(
        "patterns",
        Accepts::ListOf(&[
            "all",
            "4k",
            "2m",
            "unaligned",
            "mid",
            "pingpong",
            "batch",
            "errors",
        ]),
        "a comma list of all,4k,2m,unaligned,mid,pingpong,batch,errors",
    ),
    num("chunks", 8, 32, "8..=32"),
    key("host2m", Accepts::Flag, "0 or 1"),
    num("pingpong_iters", 0, u64::MAX, "a count"),
    num("hold_mixed", 0, 32, "0..=32 chunks"),
    num("hold_2m", 0, 32, "0..=32 chunks"),
];

const SOAK_KEYS: &[Key] = &[
    num("seconds", 0, u64::MAX, "seconds (0: until shut down)"),
    num("batches", 0, u64::MAX, "a count (0: use seconds=)"),
    num("chunks", 2, 64, "2..=64"),
    num("batch", 1, 256, "1..=256"),
    num("report_ms", 1, u64::MAX, "milliseconds, at least 1"),
    key(
        "pattern",
        Accepts::OneOf(&["4k", "2m", "mix"]),
        "4k, 2m or mix",
    ),
];

const SPIN_KEYS: &[Key] = &[num("iters", 0, u64::MAX, "a count")];

const DMARACE_KEYS: &[Key] = &[
    num("rounds", 0, u64::MAX, "a count"),
    num("mix", 0, u64::MAX, "chunks to mix (at most 64 are)"),
    num("delay_max_us", 0, u64::MAX, "microseconds"),
    num("hold_us", 0, u64::MAX, "microseconds"),
];

const FAULT_KEYS: &[Key] = &[key(
    "fault",
    Accepts::OneOf(&["ud", "bp", "de", "gp", "pf"]),
    "ud, bp, de, gp or pf",
)];

const POOLBENCH_KEYS: &[Key] = &[
    num("size", 1, 256 * 1024, "bytes, 1..=256k"),
    num("ms", 1, u64::MAX, "milliseconds"),
];

const BROKEN2M_POLICY: Key = key("policy", Accepts::OneOf(&["broken-2m"]), "broken-2m");

/// The keys of one fixture: groups of [`Key`]s; the first group that names a key decides.
pub type KeyGroups = &'static [&'static [Key]];

/// The keys the embedded fixture `name` reads, or `None` for a guest this table does not
/// know (an ELF built elsewhere declares nothing here, so nothing is checked).
pub fn fixture_keys(name: &str) -> Option<KeyGroups> {
    const NONE: KeyGroups = &[];
    const IO: KeyGroups = &[&[POLICY_KEY], IO_KEYS, POOL_KEYS];
    const BROKEN2M: KeyGroups = &[&[BROKEN2M_POLICY], IO_KEYS, POOL_KEYS];
    const POOLBENCH: KeyGroups = &[&[POLICY_KEY], POOLBENCH_KEYS, POOL_KEYS];
    Some(match name {
        "hello" | "smp" | "triple" | "panic" => NONE,
        "io" => IO,
        "io-broken2m" => BROKEN2M,
        "poolbench" => POOLBENCH,
        "convert" => &[CONVERT_KEYS],
        "soak" => &[SOAK_KEYS],
        "spin" => &[SPIN_KEYS],
        "dmarace" => &[DMARACE_KEYS],
        "fault" => &[FAULT_KEYS],
        _ => return None,
    })
}

/// The key called `name` in `groups` (a `swiotlb.` prefix names a pool key).
pub fn find(groups: KeyGroups, name: &str) -> Option<&'static Key> {
    let pool_name = name.strip_prefix("swiotlb.");
    groups.iter().find_map(|g| {
        g.iter().find(|k| {
            k.name == name
                || (pool_name == Some(k.name) && (k.accepts == Accepts::Pool || k.name == "policy"))
        })
    })
}

fn value_ok(k: &Key, value: &str, token: &str, cpus: u32) -> bool {
    match k.accepts {
        Accepts::Number { min, max } => {
            cmdline::parse_u64(value).is_some_and(|v| (min..=max).contains(&v))
        }
        Accepts::Flag => matches!(
            value,
            "" | "1" | "0" | "true" | "false" | "yes" | "no" | "on" | "off"
        ),
        Accepts::OneOf(words) => words.contains(&value),
        Accepts::ListOf(words) => {
            !value.is_empty() && cmdline::list(value).all(|w| words.contains(&w))
        }
        Accepts::Pool => Config::default().set(k.name, value).is_ok(),
        // The vCPU count is checked elsewhere; a value is judged as if there were one.
        Accepts::Io => io_options::parse(&Cmdline::new(token.as_bytes()), cpus.max(1)).is_ok(),
    }
}

/// Checks every token of `line` against `groups` for a VM of `cpus` vCPUs: the first unknown
/// key or bad value, then (for fixtures with io or pool keys) the combination as the
/// fixture's parser sees it.
pub fn check<'a>(groups: KeyGroups, line: &'a str, cpus: u32) -> Result<(), KeyError<'a>> {
    let mut io = false;
    let mut pool = false;
    for token in Cmdline::new(line.as_bytes()).tokens() {
        let (name, value) = cmdline::split_once(token, b'=');
        let Some(k) = find(groups, name) else {
            return Err(KeyError::UnknownKey { key: name });
        };
        let value = value.unwrap_or("");
        if !value_ok(k, value, token, cpus) {
            return Err(KeyError::BadValue { key: k, value });
        }
        io |= k.accepts == Accepts::Io;
        pool |= k.accepts == Accepts::Pool;
    }
    if io {
        io_options::parse(&Cmdline::new(line.as_bytes()), cpus.max(1))
            .map_err(|reason| KeyError::Combination { reason })?;
    }
    if pool {
        let mut c = Config::default();
        let pool_tokens = Cmdline::new(line.as_bytes()).tokens().filter(|t| {
            let name = cmdline::split_once(t, b'=').0;
            find(groups, name).is_some_and(|k| k.accepts == Accepts::Pool)
        });
        for t in pool_tokens {
            let (name, value) = cmdline::split_once(t, b'=');
            // Each value was accepted alone above.
            let _ = c.set(name, value.unwrap_or(""));
        }
        c.validate().map_err(|_| KeyError::Combination {
            reason: "low= must be at most high=, and high= at most 100",
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io() -> KeyGroups {
        fixture_keys("io").unwrap()
    }

    #[test]
    fn good_lines_pass() {
        for line in [
            "",
            "policy=throttle sizes=4k-64k qd=16 rw=50 seconds=2 cpus=1 worker=1",
            "swiotlb.policy=dynamic swiotlb.pool=8M grow=2M",
            "sizes=16k-256k burst=64 pool=4M rw=read cpus=1 worker=1 report_ms=20",
        ] {
            assert_eq!(check(io(), line, 2), Ok(()), "{line}");
        }
        let soak = fixture_keys("soak").unwrap();
        assert_eq!(check(soak, "seconds=0 pattern=4k batch=64", 1), Ok(()));
        let convert = fixture_keys("convert").unwrap();
        assert_eq!(check(convert, "patterns=4k,2m host2m chunks=8", 1), Ok(()));
    }

    #[test]
    fn unknown_keys_are_named() {
        assert_eq!(
            check(io(), "policy=legacy polcy=throttle", 1),
            Err(KeyError::UnknownKey { key: "polcy" })
        );
        let hello = fixture_keys("hello").unwrap();
        assert_eq!(
            check(hello, "x=1", 1),
            Err(KeyError::UnknownKey { key: "x" })
        );
        assert!(fixture_keys("some/elf").is_none());
    }

    #[test]
    fn bad_values_name_the_key() {
        for (line, name) in [
            ("policy=bogus", "policy"),
            ("qd=0", "qd"),
            ("qd=x", "qd"),
            ("rw=101", "rw"),
            ("pool=lots", "pool"),
            ("max_pools=65", "max_pools"),
            ("worker=2", "worker"),
        ] {
            match check(io(), line, 2) {
                Err(KeyError::BadValue { key, .. }) => assert_eq!(key.name, name, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        let soak = fixture_keys("soak").unwrap();
        assert!(matches!(
            check(soak, "pattern=5k", 1),
            Err(KeyError::BadValue { key, value: "5k" }) if key.name == "pattern"
        ));
        let broken = fixture_keys("io-broken2m").unwrap();
        assert!(check(broken, "policy=broken-2m", 2).is_ok());
        assert!(check(broken, "policy=legacy", 2).is_err());
    }

    #[test]
    fn combinations_are_checked_by_the_parsers() {
        assert!(matches!(
            check(io(), "cpus=2 worker=1", 2),
            Err(KeyError::Combination { .. })
        ));
        assert!(matches!(
            check(io(), "high=50 low=60", 1),
            Err(KeyError::Combination { .. })
        ));
    }

    #[test]
    fn every_pool_key_is_one_the_pool_parser_knows() {
        for k in POOL_KEYS {
            assert_ne!(
                Config::default().set(k.name, "zzz"),
                Err(swiotlb::ConfigError::UnknownKey),
                "{}",
                k.name
            );
        }
        for p in POLICY_NAMES {
            assert!(PolicyKind::from_name(p).is_some());
        }
    }
}
