//! Step 1 of a conversion (validate everything before changing anything): pure reads of the
//! engine's state. (Device accesses are checked by the fence; ACCEPT in `accept`.)

use super::Engine;
use crate::abi::{
    ATTR_ENCRYPTED, ATTR_KNOWN_MASK, ATTR_PAGE_SIZE_1G, ATTR_PAGE_SIZE_MASK, HUGE_PAGE_SIZE,
    MAILBOX_AREA_END, MMIO_BASE_GPA, MMIO_SIZE, PAGE_SIZE,
};
use crate::bitmap::Side;
use crate::ram::Granularity;
use crate::status::ConversionError;

impl Engine {
    /// Check `[gpa, gpa+len)` (len > 0) against RAM bounds, the MMIO window and the
    /// non-convertible chunks; returns its end.
    pub(super) fn check_range(&self, gpa: u64, len: u64) -> Result<u64, ConversionError> {
        let end = gpa.checked_add(len).ok_or(ConversionError::OutOfRam)?;
        if gpa < MMIO_BASE_GPA + MMIO_SIZE && end > MMIO_BASE_GPA {
            return Err(ConversionError::Reserved);
        }
        if end > self.size {
            return Err(ConversionError::OutOfRam);
        }
        if gpa < MAILBOX_AREA_END {
            return Err(ConversionError::Reserved);
        }
        Ok(end)
    }

    /// A valid conversion request as (first page, end page, target side).
    pub(super) fn validate_convert(
        &self,
        gpa: u64,
        npages: u64,
        attrs: u64,
    ) -> Result<(u64, u64, Side), ConversionError> {
        if attrs & !(ATTR_KNOWN_MASK as u64) != 0
            || (attrs & ATTR_PAGE_SIZE_MASK as u64) > ATTR_PAGE_SIZE_1G as u64
        {
            return Err(ConversionError::InvalidAttrs);
        }
        if !gpa.is_multiple_of(PAGE_SIZE) {
            return Err(ConversionError::Unaligned);
        }
        if npages == 0 {
            return Err(ConversionError::BadRequest);
        }
        let len = npages
            .checked_mul(PAGE_SIZE)
            .ok_or(ConversionError::OutOfRam)?;
        let end = self.check_range(gpa, len)?;
        if self.granularity == Granularity::Huge2M
            && (!gpa.is_multiple_of(HUGE_PAGE_SIZE) || !len.is_multiple_of(HUGE_PAGE_SIZE))
        {
            return Err(ConversionError::Requires2M);
        }
        let target = if attrs & ATTR_ENCRYPTED as u64 != 0 {
            Side::Private
        } else {
            Side::Shared
        };
        Ok((gpa / PAGE_SIZE, end / PAGE_SIZE, target))
    }
}
