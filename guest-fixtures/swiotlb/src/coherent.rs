//! Coherent (ring) memory allocated straight from the platform and converted for it, as the
//! kernel's `dma_alloc_coherent` does in a confidential guest: [`CoherentTable`] remembers
//! each allocation (fixed capacity) so a free can be checked, and converts it back on free.

use crate::common::{zero, Common};
use crate::convert::ConvError;
use crate::error::MapError;
use crate::platform::{align_up, Range, PAGE};
use rtcore::sync::SpinLock;

/// Most live direct coherent allocations per policy.
pub const COHERENT_MAX: usize = 64;

#[derive(Clone, Copy)]
struct Entry {
    addr: u64,
    bytes: u64,
    len: usize,
}

/// Live direct coherent allocations.
pub(crate) struct CoherentTable {
    entries: SpinLock<[Entry; COHERENT_MAX]>,
}

const NONE: Entry = Entry {
    addr: 0,
    bytes: 0,
    len: 0,
};

impl CoherentTable {
    pub const fn new() -> Self {
        CoherentTable {
            entries: SpinLock::new([NONE; COHERENT_MAX]),
        }
    }

    /// `len` bytes of zeroed shared memory, in units of `unit` (4 KiB, or 2 MiB for the
    /// aligned-2m policy: then aligned to 2 MiB as well).
    pub fn alloc(&self, c: &Common, len: usize, unit: usize) -> Result<u64, MapError> {
        if len == 0 {
            return Err(MapError::InvalidArgument);
        }
        let bytes = align_up(len, unit.max(PAGE)).ok_or(MapError::InvalidArgument)?;
        let slot = {
            let mut t = self.entries.lock();
            let i = t
                .iter()
                .position(|e| e.addr == 0)
                .ok_or(MapError::TableFull)?;
            // Reserve it (address 1 is never a page).
            t[i].addr = 1;
            i
        };
        let unreserve = || self.entries.lock()[slot] = NONE;
        let Some(addr) = c.plat.alloc_pages(bytes, unit.max(PAGE)) else {
            unreserve();
            return Err(MapError::NoMemory);
        };
        if let Err(e) = c
            .conv
            .convert(&c.stats, &[Range::new(addr, bytes as u64)], true)
        {
            unreserve();
            if let ConvError::Stuck(_) = e {
                c.stats.leaked(bytes as u64);
            } else {
                c.plat.free_pages(addr, bytes);
            }
            return Err(e.into());
        }
        // SAFETY: freshly allocated and converted for us.
        unsafe { zero(addr, len) };
        self.entries.lock()[slot] = Entry {
            addr,
            bytes: bytes as u64,
            len,
        };
        c.stats.coherent_changed(bytes as u64, true);
        Ok(addr)
    }

    /// Free an allocation (same address and length as allocated).
    pub fn free(&self, c: &Common, addr: u64, len: usize) -> Result<(), MapError> {
        let e = {
            let mut t = self.entries.lock();
            let i = t
                .iter()
                .position(|e| e.addr == addr && addr > 1)
                .ok_or(MapError::NotMapped)?;
            if t[i].len != len {
                return Err(MapError::Mismatch);
            }
            let e = t[i];
            t[i] = NONE;
            e
        };
        c.stats.coherent_changed(e.bytes, false);
        match c
            .conv
            .convert(&c.stats, &[Range::new(e.addr, e.bytes)], false)
        {
            Ok(()) => c.plat.free_pages(e.addr, e.bytes as usize),
            // Still (partly) shared: never hand it back to the page allocator.
            Err(_) => c.stats.leaked(e.bytes),
        }
        Ok(())
    }

    /// Convert back and free everything (one conversion call).
    pub fn destroy(&self, c: &Common) {
        let mut t = self.entries.lock();
        let mut ranges = [Range::default(); COHERENT_MAX];
        let mut n = 0;
        for e in t.iter().filter(|e| e.addr > 1) {
            ranges[n] = Range::new(e.addr, e.bytes);
            n += 1;
        }
        let ok = c.conv.convert(&c.stats, &ranges[..n], false).is_ok();
        for r in &ranges[..n] {
            if ok {
                c.plat.free_pages(r.addr, r.len as usize);
            } else {
                c.stats.leaked(r.len);
            }
            c.stats.coherent_changed(r.len, false);
        }
        *t = [NONE; COHERENT_MAX];
    }
}
