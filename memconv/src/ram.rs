//! RAM configuration: size, the two stores, the host granularity policy, the vCPU count, the
//! modelled confidential platform and whether RAM is backed eagerly.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::store::StoreKind;

/// The host's conversion granularity policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Granularity {
    /// Honour any 4 KiB aligned request.
    #[serde(rename = "4k")]
    Page4K,
    /// Reject requests that are not 2 MiB aligned and sized (`ERR_REQUIRES_2M`).
    #[serde(rename = "2m")]
    Huge2M,
}

impl Granularity {
    /// "4k" or "2m".
    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Page4K => "4k",
            Granularity::Huge2M => "2m",
        }
    }
}

impl fmt::Display for Granularity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a granularity.
#[derive(Debug, thiserror::Error)]
#[error("unknown granularity {0:?} (expected 4k or 2m)")]
pub struct ParseGranularityError(pub String);

impl FromStr for Granularity {
    type Err = ParseGranularityError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "4k" => Ok(Granularity::Page4K),
            "2m" => Ok(Granularity::Huge2M),
            _ => Err(ParseGranularityError(s.to_string())),
        }
    }
}

/// The confidential platform whose acceptance lifecycle the host enforces.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Platform {
    /// Intel TDX: conversion to shared drops acceptance; back to private it is pending again.
    #[default]
    #[serde(rename = "tdx")]
    Tdx,
    /// AMD SEV-SNP: validation must be rescinded before a page is converted to shared.
    #[serde(rename = "snp")]
    Snp,
}

impl Platform {
    /// "tdx" or "snp".
    pub fn as_str(self) -> &'static str {
        match self {
            Platform::Tdx => "tdx",
            Platform::Snp => "snp",
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a platform.
#[derive(Debug, thiserror::Error)]
#[error("unknown platform {0:?} (expected tdx or snp)")]
pub struct ParsePlatformError(pub String);

impl FromStr for Platform {
    type Err = ParsePlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tdx" => Ok(Platform::Tdx),
            "snp" => Ok(Platform::Snp),
            _ => Err(ParsePlatformError(s.to_string())),
        }
    }
}

/// Guest RAM configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamConfig {
    /// Bytes of RAM from GPA 0; a multiple of 2 MiB in `abi::MIN_RAM..=abi::MAX_RAM`.
    pub size: u64,
    /// Store backing private pages.
    pub private: StoreKind,
    /// Store backing shared pages (not gmem).
    pub shared: StoreKind,
    /// Host granularity policy.
    pub granularity: Granularity,
    /// Number of vCPUs (mailboxes), 1..=abi::MAX_CPUS.
    pub cpus: u32,
    /// The platform whose acceptance rules apply.
    #[serde(default)]
    pub platform: Platform,
    /// Back all private RAM at creation (the eager path) instead of at ACCEPT.
    #[serde(default)]
    pub prealloc: bool,
}
