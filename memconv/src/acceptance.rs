//! Acceptance: the per-4K acceptance state of guest RAM and the platform's lifecycle rules
//! (`--platform tdx|snp`), and which 2 MiB chunks are cut out of the guest's view because
//! nothing in them may be touched (the host enforcement).
//!
//! Rules (the engine asks before it changes anything, and reports after):
//! - ACCEPT (TDX TDG.MEM.PAGE.ACCEPT, SNP PVALIDATE validate=1) of private, unaccepted pages
//!   makes them usable. A shared page in the range is [`ConversionError::AcceptShared`] (a
//!   shared chunk or a mixed one); an accepted page is [`ConversionError::DoubleAccept`] (TDX
//!   double accept, SNP double validation). The whole entry is refused.
//! - Rescind (SNP PVALIDATE validate=0, `abi::ACCEPT_FLAG_RESCIND`): the private pages of the
//!   range lose their acceptance; shared pages are left alone.
//! - Conversion to shared: on TDX the converted pages lose acceptance (the host drops them from
//!   the TD); on SNP a still-validated page is [`ConversionError::MustRescind`].
//! - Conversion to private: pages that were shared are unaccepted (pending) again on both.
//!
//! Enforcement granularity is the 2 MiB chunk: a chunk wholly private with no accepted page is
//! a "hole" (no memslot, no backing); a touch of it exits to the VMM with its GPA. A chunk
//! with at least one accepted or shared page stays mapped whole, so a touch of an unaccepted
//! page inside it is not caught (documented limit). The boot area and the mailbox chunk are
//! never holes.

use crate::abi::{MAILBOX_AREA_END, PAGES_PER_CHUNK, PAGE_SIZE};
use crate::bitmap::{Attributes, PageBits};
use crate::ram::Platform;
use crate::status::ConversionError;

/// First chunk that can be a hole (after the boot area and the mailbox chunk).
const FIRST_CONVERTIBLE_CHUNK: u64 = MAILBOX_AREA_END / PAGE_SIZE / PAGES_PER_CHUNK;

/// Per-4K acceptance and the holes it implies.
pub struct Acceptance {
    platform: Platform,
    accepted: PageBits,
    holes: PageBits,
}

impl Acceptance {
    /// Nothing accepted but the boot area (chunk 0); every convertible chunk a hole.
    pub fn new(platform: Platform, npages: u64) -> Self {
        let nchunks = npages / PAGES_PER_CHUNK;
        let mut accepted = PageBits::new(npages, false);
        accepted.set_range(0, PAGES_PER_CHUNK.min(npages), true);
        let mut holes = PageBits::new(nchunks, true);
        holes.set_range(0, FIRST_CONVERTIBLE_CHUNK.min(nchunks), false);
        Acceptance {
            platform,
            accepted,
            holes,
        }
    }

    /// The platform modelled.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// Per-4K accepted bits.
    pub fn accepted(&self) -> &PageBits {
        &self.accepted
    }

    /// Per chunk: cut out of the guest's view.
    pub fn holes(&self) -> &PageBits {
        &self.holes
    }

    /// Accepted pages.
    pub fn accepted_pages(&self) -> u64 {
        self.accepted.count_ones()
    }

    /// May the private pages `[p0, p1)` be accepted?
    pub fn check_accept(
        &self,
        attrs: &Attributes,
        p0: u64,
        p1: u64,
    ) -> Result<(), ConversionError> {
        if attrs.bits().count_range(p0, p1) != p1 - p0 {
            return Err(ConversionError::AcceptShared);
        }
        if self.accepted.count_range(p0, p1) != 0 {
            return Err(ConversionError::DoubleAccept);
        }
        Ok(())
    }

    /// May `[p0, p1)` be converted to shared?
    pub fn check_share(&self, p0: u64, p1: u64) -> Result<(), ConversionError> {
        if self.platform == Platform::Snp && self.accepted.count_range(p0, p1) != 0 {
            return Err(ConversionError::MustRescind);
        }
        Ok(())
    }

    /// Mark `[p0, p1)` accepted (checked with [`Acceptance::check_accept`]).
    pub fn accept(&mut self, p0: u64, p1: u64) {
        self.accepted.set_range(p0, p1, true);
    }

    /// Drop the acceptance of `[p0, p1)` (a rescind, or a conversion to shared); returns how
    /// many pages lost it.
    pub fn drop_range(&mut self, p0: u64, p1: u64) -> u64 {
        let n = self.accepted.count_range(p0, p1);
        self.accepted.set_range(p0, p1, false);
        n
    }

    /// Whether chunk `c` should be a hole under `attrs` and the current acceptance.
    pub fn hole_of(&self, attrs: &Attributes, c: u64) -> bool {
        let p0 = c * PAGES_PER_CHUNK;
        c >= FIRST_CONVERTIBLE_CHUNK
            && attrs.private_in_chunk(c) == PAGES_PER_CHUNK
            && self.accepted.count_range(p0, p0 + PAGES_PER_CHUNK) == 0
    }

    /// Recompute the hole bit of chunks `[c0, c1)`; pushes every chunk whose bit changed to
    /// `changed` (an undo list for [`Acceptance::flip_holes`]).
    pub fn update_holes(&mut self, attrs: &Attributes, c0: u64, c1: u64, changed: &mut Vec<u64>) {
        for c in c0..c1.min(self.holes.len()) {
            let h = self.hole_of(attrs, c);
            if h != self.holes.get(c) {
                self.holes.set(c, h);
                changed.push(c);
            }
        }
    }

    /// Flip the hole bits of `chunks` (undo of [`Acceptance::update_holes`]).
    pub fn flip_holes(&mut self, chunks: &[u64]) {
        for &c in chunks {
            let h = self.holes.get(c);
            self.holes.set(c, !h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bitmap::Side;

    const C: u64 = PAGES_PER_CHUNK;

    fn setup(platform: Platform) -> (Acceptance, Attributes) {
        let npages = 8 * C;
        let mut attrs = Attributes::new_private(npages);
        attrs.flip_run(C, 2 * C, Side::Shared);
        (Acceptance::new(platform, npages), attrs)
    }

    #[test]
    fn starts_with_convertible_chunks_cut_out() {
        let (a, attrs) = setup(Platform::Tdx);
        assert!(!a.holes().get(0) && !a.holes().get(1));
        assert!((2..8).all(|c| a.holes().get(c)));
        assert!((2..8).all(|c| a.hole_of(&attrs, c)));
        assert_eq!(a.accepted_pages(), C);
    }

    #[test]
    fn accept_rules() {
        let (mut a, mut attrs) = setup(Platform::Tdx);
        assert_eq!(a.check_accept(&attrs, 2 * C, 3 * C), Ok(()));
        a.accept(2 * C, 3 * C);
        let mut changed = Vec::new();
        a.update_holes(&attrs, 2, 3, &mut changed);
        assert_eq!(changed, [2]);
        assert_eq!(
            a.check_accept(&attrs, 2 * C, 3 * C),
            Err(ConversionError::DoubleAccept)
        );
        // A mixed chunk (one shared page) cannot be accepted.
        attrs.flip_run(3 * C + 5, 3 * C + 6, Side::Shared);
        assert_eq!(
            a.check_accept(&attrs, 3 * C, 4 * C),
            Err(ConversionError::AcceptShared)
        );
        assert_eq!(a.check_accept(&attrs, 3 * C, 3 * C + 5), Ok(()));
    }

    #[test]
    fn snp_requires_rescind_before_sharing() {
        let (mut a, _) = setup(Platform::Snp);
        a.accept(2 * C, 3 * C);
        assert_eq!(
            a.check_share(2 * C, 2 * C + 1),
            Err(ConversionError::MustRescind)
        );
        assert_eq!(a.drop_range(2 * C, 2 * C + 1), 1);
        assert_eq!(a.check_share(2 * C, 2 * C + 1), Ok(()));
        let (mut t, _) = setup(Platform::Tdx);
        t.accept(2 * C, 3 * C);
        assert_eq!(t.check_share(2 * C, 2 * C + 1), Ok(()));
    }

    #[test]
    fn holes_follow_round_trips() {
        let (mut a, mut attrs) = setup(Platform::Tdx);
        let mut changed = Vec::new();
        a.accept(4 * C, 5 * C);
        a.update_holes(&attrs, 4, 5, &mut changed);
        // The whole chunk goes shared (acceptance dropped), then back private: a hole again.
        attrs.flip_run(4 * C, 5 * C, Side::Shared);
        a.drop_range(4 * C, 5 * C);
        a.update_holes(&attrs, 4, 5, &mut changed);
        assert!(!a.holes().get(4));
        attrs.flip_run(4 * C, 5 * C, Side::Private);
        changed.clear();
        a.update_holes(&attrs, 4, 5, &mut changed);
        assert_eq!(changed, [4]);
        assert!(a.holes().get(4));
        a.flip_holes(&changed);
        assert!(!a.holes().get(4));
    }
}
