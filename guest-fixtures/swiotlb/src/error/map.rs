//! [`MapError`]: why a pool call (map, unmap, sync, coherent allocation) failed, with the
//! conversions from the slot allocator's and the converter's errors.

use crate::convert::ConvError;
use crate::slots::SlotError;
use core::fmt;

/// Why a pool call failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// Zero length, an address range that wraps, or a mask not of the form 2^k - 1.
    InvalidArgument,
    /// Longer than the policy's largest mapping (see [`crate::Policy::max_mapping_size`]).
    TooLarge,
    /// No room in the pool (and no other way to serve the map now).
    NoSpace,
    /// A blocking map waited for the configured bound and gave up (throttle).
    TimedOut,
    /// The address is not a live mapping (or coherent allocation) of this pool.
    NotMapped,
    /// The length does not match the mapping, or a sync range leaves the mapping.
    Mismatch,
    /// The platform had no pages (transient buffer, coherent allocation).
    NoMemory,
    /// A fixed-capacity table is full (transient buffers, coherent allocations).
    TableFull,
    /// A conversion failed or was refused.
    Conversion(ConvError),
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::InvalidArgument => f.write_str("invalid argument"),
            MapError::TooLarge => f.write_str("mapping too large"),
            MapError::NoSpace => f.write_str("bounce pool full"),
            MapError::TimedOut => f.write_str("timed out waiting for the bounce pool"),
            MapError::NotMapped => f.write_str("not a live mapping"),
            MapError::Mismatch => f.write_str("length does not match the mapping"),
            MapError::NoMemory => f.write_str("out of memory"),
            MapError::TableFull => f.write_str("table full"),
            MapError::Conversion(e) => write!(f, "{e}"),
        }
    }
}

impl From<SlotError> for MapError {
    fn from(e: SlotError) -> Self {
        match e {
            SlotError::NoSpace => MapError::NoSpace,
            SlotError::TooLarge => MapError::TooLarge,
            SlotError::BadMask | SlotError::BadRegion => MapError::InvalidArgument,
            SlotError::NotMapped => MapError::NotMapped,
            SlotError::Mismatch => MapError::Mismatch,
            SlotError::NoMemory => MapError::NoMemory,
        }
    }
}

impl From<ConvError> for MapError {
    fn from(e: ConvError) -> Self {
        MapError::Conversion(e)
    }
}

impl MapError {
    /// The host's status code (`memconv::abi` `ERR_*`) of a conversion the host refused, if
    /// that is why the call failed.
    pub fn status_code(&self) -> Option<u32> {
        match self {
            MapError::Conversion(c) => c.status_code(),
            _ => None,
        }
    }
}
