//! How a VM is started: the validated configuration `vmm run` builds from its flags, and the
//! parsing of sizes like `512M`.

use std::fmt;
use std::path::PathBuf;

use memconv::abi;
use memconv::{Granularity, Platform, StoreKind};
use serde::Serialize;

/// Errors in a VM configuration; each says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A size string that is not a number with an optional K/M/G suffix.
    #[error("invalid size {0:?}: expected bytes or a number with a K, M or G suffix, e.g. 512M")]
    BadSize(String),
    /// Guest RAM not a multiple of 2 MiB.
    #[error("--mem {0} is not a multiple of 2 MiB (2097152 bytes)")]
    MemNotAligned(u64),
    /// Guest RAM below the minimum.
    #[error("--mem {got} is too small: the guest needs at least {min} bytes (16M)")]
    MemTooSmall {
        /// The requested bytes.
        got: u64,
        /// The minimum.
        min: u64,
    },
    /// Guest RAM above the maximum.
    #[error("--mem {got} is too large: at most {max} bytes (64G) of guest RAM are supported")]
    MemTooLarge {
        /// The requested bytes.
        got: u64,
        /// The maximum.
        max: u64,
    },
    /// vCPU count out of range.
    #[error("--cpus {got} is out of range: 1 to {max}")]
    BadCpus {
        /// The requested count.
        got: u32,
        /// The maximum.
        max: u32,
    },
    /// Command line too long.
    #[error("--cmdline is {got} bytes long, at most {max} are allowed")]
    CmdlineTooLong {
        /// Its length in bytes.
        got: usize,
        /// The longest allowed.
        max: usize,
    },
}

/// Where the guest image comes from.
#[derive(Clone, Debug, Serialize)]
pub enum GuestSource {
    /// A fixture embedded in this binary, by name.
    Fixture(String),
    /// An ELF file on disk.
    File(PathBuf),
}

impl fmt::Display for GuestSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GuestSource::Fixture(name) => write!(f, "{name}"),
            GuestSource::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// How guest code executes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ExecMode {
    /// At hardware speed (kvm_pvm native mode, or VMX/SVM).
    Native,
    /// In KVM's instruction emulator (kvm_pvm only): ~700 ns per instruction, no SSE.
    Emulated,
}

/// A validated VM configuration.
#[derive(Clone, Debug, Serialize)]
pub struct VmConfig {
    /// The guest to boot.
    pub guest: GuestSource,
    /// Bytes of guest RAM (multiple of 2 MiB).
    pub mem: u64,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Serial console output file; stdout when `None`.
    pub serial: Option<PathBuf>,
    /// Guest command line.
    pub cmdline: String,
    /// Requested execution mode; `None` = native where available.
    pub exec: Option<ExecMode>,
    /// Store behind private guest memory.
    pub private: StoreKind,
    /// Store behind shared guest memory.
    pub shared: StoreKind,
    /// Host conversion granularity.
    pub granularity: Granularity,
    /// The confidential platform whose acceptance lifecycle the host enforces.
    pub platform: Platform,
    /// Back all private RAM at start (the eager path) instead of at the guest's ACCEPT.
    pub prealloc: bool,
    /// Where to write the statistics as JSON when the VM ends.
    pub stats_json: Option<PathBuf>,
    /// The virtio block device's disk image, if any.
    pub disk: Option<DiskConfig>,
}

/// `--disk PATH [--disk-size SIZE] [--disk-idle-us N]`: the virtio block device.
#[derive(Clone, Debug, Serialize)]
pub struct DiskConfig {
    /// Raw disk image.
    pub path: PathBuf,
    /// Size to create the image with when it does not exist (an existing image keeps its
    /// size).
    pub create_size: Option<u64>,
    /// Microseconds the device's queue poller keeps polling without work before it sleeps
    /// (and asks the driver for a doorbell).
    pub idle_us: u64,
    /// How data moves between the image and guest memory: preadv/pwritev for `vmm run`;
    /// `vmm bench io` also measures the old mapped path as its baseline.
    pub io: crate::devices::DiskIo,
}

impl VmConfig {
    /// One vCPU booting the embedded fixture `name` with `mem` bytes of RAM, and the defaults
    /// of `vmm run` for the rest: memfd stores, 4 KiB granularity, no command line, the serial
    /// console on stdout, no statistics file, no disk, tdx, lazy backing.
    pub fn fixture(name: &str, mem: u64) -> Self {
        VmConfig {
            guest: GuestSource::Fixture(name.into()),
            mem,
            cpus: 1,
            serial: None,
            cmdline: String::new(),
            exec: None,
            private: StoreKind::Memfd,
            shared: StoreKind::Memfd,
            granularity: Granularity::Page4K,
            platform: Platform::Tdx,
            prealloc: false,
            stats_json: None,
            disk: None,
        }
    }

    /// Checks the limits the VMM and the guest contract impose.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.mem.is_multiple_of(abi::HUGE_PAGE_SIZE) {
            return Err(ConfigError::MemNotAligned(self.mem));
        }
        if self.mem < abi::MIN_RAM {
            return Err(ConfigError::MemTooSmall {
                got: self.mem,
                min: abi::MIN_RAM,
            });
        }
        if self.mem > abi::MAX_RAM {
            return Err(ConfigError::MemTooLarge {
                got: self.mem,
                max: abi::MAX_RAM,
            });
        }
        if self.cpus == 0 || self.cpus > abi::MAX_CPUS {
            return Err(ConfigError::BadCpus {
                got: self.cpus,
                max: abi::MAX_CPUS,
            });
        }
        if self.cmdline.len() > abi::CMDLINE_MAX {
            return Err(ConfigError::CmdlineTooLong {
                got: self.cmdline.len(),
                max: abi::CMDLINE_MAX,
            });
        }
        Ok(())
    }
}

/// Parses `4096`, `64K`, `512M`, `2G` (also with a trailing `B`/`iB`, case-insensitive) into
/// bytes; powers of 1024.
pub fn parse_size(text: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(text.to_string());
    let t = text.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, shift) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 10),
        Some('m') => (&stripped[..stripped.len() - 1], 20),
        Some('g') => (&stripped[..stripped.len() - 1], 30),
        Some('t') => (&stripped[..stripped.len() - 1], 40),
        _ => (stripped, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let value: u64 = digits.parse().map_err(|_| bad())?;
    value.checked_mul(1u64 << shift).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64K").unwrap(), 64 << 10);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        for bad in ["", "M", "12X", "-1M", "1.5G", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    fn config(mem: u64, cpus: u32) -> VmConfig {
        VmConfig {
            cpus,
            ..VmConfig::fixture("hello", mem)
        }
    }

    #[test]
    fn limits_are_enforced() {
        assert!(config(512 << 20, 1).validate().is_ok());
        assert!(matches!(
            config((512 << 20) + 4096, 1).validate(),
            Err(ConfigError::MemNotAligned(_))
        ));
        assert!(matches!(
            config(2 << 20, 1).validate(),
            Err(ConfigError::MemTooSmall { .. })
        ));
        assert!(matches!(
            config(128 << 30, 1).validate(),
            Err(ConfigError::MemTooLarge { .. })
        ));
        assert!(matches!(
            config(512 << 20, 0).validate(),
            Err(ConfigError::BadCpus { .. })
        ));
        assert!(matches!(
            config(512 << 20, 65).validate(),
            Err(ConfigError::BadCpus { .. })
        ));
    }
}
