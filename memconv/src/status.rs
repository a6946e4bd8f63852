//! [`ConversionError`]: why the host refused or failed a conversion or accept, as a Rust enum.
//! The engine and the service work with it; the abi numbers (`abi::ERR_*`) appear only where a
//! status is written back to the guest (mailbox entries and header, the hypercall return) and
//! in the statistics, whose JSON lists rejects by code.

use crate::abi;

/// A conversion or accept that did not happen (`Ok(())` is `abi::STATUS_OK`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ConversionError {
    /// `gpa` not 4 KiB aligned.
    #[error("unaligned range")]
    Unaligned,
    /// The range is not inside guest RAM (or overflows).
    #[error("range not inside guest RAM")]
    OutOfRam,
    /// The range overlaps the boot area, the mailboxes or the MMIO window.
    #[error("range overlaps a reserved area")]
    Reserved,
    /// 2 MiB granularity and the range is not 2 MiB aligned and sized.
    #[error("the host requires 2 MiB aligned and sized ranges")]
    Requires2M,
    /// The target store could not allocate, or the memslot limit was reached.
    #[error("out of memory")]
    NoMemory,
    /// A page was already accepted (TDX double accept, SNP double validation: a security
    /// violation).
    #[error("double accept")]
    DoubleAccept,
    /// Unknown attribute bits or page-size hint.
    #[error("invalid attributes")]
    InvalidAttrs,
    /// Malformed request.
    #[error("bad request")]
    BadRequest,
    /// The host failed internally.
    #[error("internal error")]
    Internal,
    /// A device access to the range did not finish within the fence's bound; retry.
    #[error("busy: a device access is in flight; retry")]
    Busy,
    /// An ACCEPT covered a shared page (of a shared or a mixed chunk).
    #[error("accept of shared memory")]
    AcceptShared,
    /// SNP: a conversion to shared covered a page still validated (not rescinded).
    #[error("conversion to shared of a validated page (rescind it first)")]
    MustRescind,
}

/// The result of one conversion or accept.
pub type Status = Result<(), ConversionError>;

impl ConversionError {
    /// Every error, in abi code order (codes `1..abi::STATUS_COUNT`).
    pub const ALL: [ConversionError; abi::STATUS_COUNT - 1] = [
        ConversionError::Unaligned,
        ConversionError::OutOfRam,
        ConversionError::Reserved,
        ConversionError::Requires2M,
        ConversionError::NoMemory,
        ConversionError::DoubleAccept,
        ConversionError::InvalidAttrs,
        ConversionError::BadRequest,
        ConversionError::Internal,
        ConversionError::Busy,
        ConversionError::AcceptShared,
        ConversionError::MustRescind,
    ];

    /// The abi error code.
    pub const fn to_abi(self) -> u32 {
        match self {
            ConversionError::Unaligned => abi::ERR_UNALIGNED,
            ConversionError::OutOfRam => abi::ERR_OUT_OF_RAM,
            ConversionError::Reserved => abi::ERR_RESERVED,
            ConversionError::Requires2M => abi::ERR_REQUIRES_2M,
            ConversionError::NoMemory => abi::ERR_NO_MEMORY,
            ConversionError::DoubleAccept => abi::ERR_DOUBLE_ACCEPT,
            ConversionError::InvalidAttrs => abi::ERR_INVALID_ATTRS,
            ConversionError::BadRequest => abi::ERR_BAD_REQUEST,
            ConversionError::Internal => abi::ERR_INTERNAL,
            ConversionError::Busy => abi::ERR_BUSY,
            ConversionError::AcceptShared => abi::ERR_ACCEPT_SHARED,
            ConversionError::MustRescind => abi::ERR_MUST_RESCIND,
        }
    }

    /// The error of an abi code (None for `STATUS_OK` and unknown codes).
    pub fn from_abi(code: u32) -> Option<ConversionError> {
        ConversionError::ALL
            .into_iter()
            .find(|e| e.to_abi() == code)
    }

    /// The abi name of the code (`abi::status_name`).
    pub const fn name(self) -> &'static str {
        abi::status_name(self.to_abi())
    }
}

/// The abi status code of a result.
pub fn to_abi(status: Status) -> u32 {
    match status {
        Ok(()) => abi::STATUS_OK,
        Err(e) => e.to_abi(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_cover_the_abi() {
        for (i, e) in ConversionError::ALL.into_iter().enumerate() {
            assert_eq!(e.to_abi() as usize, i + 1);
            assert_eq!(ConversionError::from_abi(e.to_abi()), Some(e));
            assert_eq!(e.name(), abi::status_name(e.to_abi()));
        }
        assert_eq!(ConversionError::from_abi(abi::STATUS_OK), None);
        assert_eq!(ConversionError::from_abi(abi::STATUS_COUNT as u32), None);
        assert_eq!(to_abi(Ok(())), abi::STATUS_OK);
        assert_eq!(to_abi(Err(ConversionError::Internal)), abi::ERR_INTERNAL);
    }
}
