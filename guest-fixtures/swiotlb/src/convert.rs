//! Every conversion the pool issues goes through [`Converter`]: it checks the ranges (4 KiB
//! aligned and sized; 2 MiB aligned and sized in the aligned-2m mode, where anything else is
//! refused and counted), counts them by size class and follows the shared byte count, and
//! makes a failed request all-or-nothing by converting a partially done prefix back.

use crate::platform::{Platform, Range};
use crate::stats::Stats;
use core::fmt;
use memconv::abi::HUGE_PAGE_SIZE;

/// Why a conversion did not happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvError {
    /// Refused before reaching the host (a range not 4 KiB aligned and sized, or not 2 MiB
    /// aligned and sized where only 2M is allowed). Nothing changed.
    Refused,
    /// The host failed with this `abi::ERR_*` code. Nothing changed (a partially converted
    /// prefix was converted back).
    Host(u32),
    /// The host failed with this code and undoing the partial progress failed as well: the
    /// ranges are in a mixed state. The caller must neither reuse nor free that memory.
    Stuck(u32),
}

impl fmt::Display for ConvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConvError::Refused => f.write_str("conversion refused (alignment)"),
            ConvError::Host(c) => write!(f, "conversion failed: {}", memconv::abi::status_name(*c)),
            ConvError::Stuck(c) => write!(
                f,
                "conversion failed and could not be undone: {}",
                memconv::abi::status_name(*c)
            ),
        }
    }
}

impl ConvError {
    /// The host's status code (`memconv::abi` `ERR_*`), unless the guest refused the request
    /// before it reached the host.
    pub fn status_code(&self) -> Option<u32> {
        match *self {
            ConvError::Refused => None,
            ConvError::Host(code) | ConvError::Stuck(code) => Some(code),
        }
    }
}

/// Checked, counted access to [`Platform::convert`].
#[derive(Clone, Copy)]
pub struct Converter<'p> {
    plat: &'p dyn Platform,
    only_2m: bool,
}

impl<'p> Converter<'p> {
    /// Conversions at 4 KiB granularity (`only_2m` false) or 2 MiB only.
    pub fn new(plat: &'p dyn Platform, only_2m: bool) -> Self {
        Converter { plat, only_2m }
    }

    /// The platform behind it.
    pub fn platform(&self) -> &'p dyn Platform {
        self.plat
    }

    /// Whether only 2 MiB aligned and sized conversions are issued.
    pub fn only_2m(&self) -> bool {
        self.only_2m
    }

    /// Whether this converter would issue `r`.
    pub fn acceptable(&self, r: &Range) -> bool {
        let unit = if self.only_2m { HUGE_PAGE_SIZE } else { 4096 };
        r.len != 0
            && r.addr.is_multiple_of(unit)
            && r.len.is_multiple_of(unit)
            && r.addr.checked_add(r.len).is_some()
    }

    /// Convert all `ranges` (one platform call), or none of them.
    pub fn convert(
        &self,
        stats: &Stats,
        ranges: &[Range],
        to_shared: bool,
    ) -> Result<(), ConvError> {
        if ranges.is_empty() {
            return Ok(());
        }
        if !ranges.iter().all(|r| self.acceptable(r)) {
            stats.conversion_refused();
            return Err(ConvError::Refused);
        }
        match self.issue(stats, ranges, to_shared) {
            Ok(()) => Ok(()),
            Err((done, code)) => {
                if done == 0 {
                    return Err(ConvError::Host(code));
                }
                match self.issue(stats, &ranges[..done], !to_shared) {
                    Ok(()) => Err(ConvError::Host(code)),
                    Err(_) => Err(ConvError::Stuck(code)),
                }
            }
        }
    }

    /// One platform call, counted. On failure: how many ranges were converted, and the code.
    fn issue(&self, stats: &Stats, ranges: &[Range], to_shared: bool) -> Result<(), (usize, u32)> {
        let res = self.plat.convert(ranges, to_shared);
        stats.convert_call(res.is_ok());
        let (done, issued) = match res {
            Ok(()) => (ranges.len(), ranges.len()),
            Err(e) => {
                let done = e.done.min(ranges.len());
                (done, (done + 1).min(ranges.len()))
            }
        };
        for r in &ranges[..issued] {
            stats.conversion_issued(r.addr, r.len);
        }
        let bytes: u64 = ranges[..done].iter().map(|r| r.len).sum();
        stats.shared_changed(bytes, to_shared);
        match res {
            Ok(()) => Ok(()),
            Err(e) => Err((done, e.code)),
        }
    }
}
