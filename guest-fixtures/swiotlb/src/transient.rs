//! Transient bounce buffers (dynamic policy): when every pool is full, a map gets pages of
//! its own, converted to shared for it and converted back at unmap. [`TransientTable`]
//! records the live ones (fixed capacity, in private pages) so unmaps and syncs can be
//! checked.

use crate::common::{copy, sync_copy, Common};
use crate::convert::ConvError;
use crate::error::BuildError;
use crate::error::MapError;
use crate::platform::{align_up, PrivatePages, Range, PAGE};
use crate::policy::{Direction, MapOpts};
use rtcore::sync::SpinLock;

const FREE: u8 = 0;
const RESERVED: u8 = 1;
const LIVE: u8 = 2;
const RELEASING: u8 = 3;

#[derive(Clone, Copy)]
struct Entry {
    bounce: u64,
    orig: u64,
    pages: u64,
    bytes: u64,
    len: usize,
    state: u8,
    dir: u8,
}

struct Table {
    entries: *mut Entry,
    cap: usize,
}

impl Table {
    fn slice(&mut self) -> &mut [Entry] {
        // SAFETY: `entries` holds `cap` initialised entries (see `TransientTable::new`), and
        // `&mut self` comes from the table lock.
        unsafe { core::slice::from_raw_parts_mut(self.entries, self.cap) }
    }
}

// SAFETY: the entries are private memory owned by the table and only reached under its lock.
unsafe impl Send for Table {}

/// Live transient buffers.
pub(crate) struct TransientTable {
    table: SpinLock<Table>,
    meta: (u64, usize),
}

impl TransientTable {
    /// Room for `cap` live buffers.
    pub fn new(c: &Common, cap: usize) -> Result<Self, BuildError> {
        let cap = cap.max(1);
        let meta = PrivatePages::alloc(c.plat, cap * core::mem::size_of::<Entry>(), PAGE)
            .ok_or(BuildError::NoMemory)?;
        let p = meta.ptr::<Entry>();
        for i in 0..cap {
            let e = Entry {
                bounce: 0,
                orig: 0,
                pages: 0,
                bytes: 0,
                len: 0,
                state: FREE,
                dir: 0,
            };
            // SAFETY: `i < cap` entries fit the pages, which nothing else refers to.
            unsafe { p.add(i).write(e) };
        }
        Ok(TransientTable {
            table: SpinLock::new(Table { entries: p, cap }),
            meta: (meta.addr, meta.bytes),
        })
    }

    /// Serve a map from a buffer of its own (counts the map).
    ///
    /// # Safety
    /// The map contract of [`crate::Policy::map_with`].
    pub unsafe fn map(
        &self,
        c: &Common,
        orig: u64,
        len: usize,
        dir: Direction,
        opts: &MapOpts,
    ) -> Result<u64, MapError> {
        let req = c.request(orig, len, dir, opts, 0)?;
        let offset = (orig as usize) & req.min_align_mask;
        let align = ((req.min_align_mask | req.alloc_align_mask) + 1).max(PAGE);
        let bytes = align_up(offset + len, PAGE).ok_or(MapError::InvalidArgument)?;
        let slot = {
            let mut t = self.table.lock();
            let s = t.slice();
            let i = s
                .iter()
                .position(|e| e.state == FREE)
                .ok_or(MapError::TableFull)?;
            s[i].state = RESERVED;
            i
        };
        let unreserve = || self.table.lock().slice()[slot].state = FREE;
        let Some(pages) = c.plat.alloc_pages(bytes, align) else {
            unreserve();
            return Err(MapError::NoMemory);
        };
        if let Err(e) = c
            .conv
            .convert(&c.stats, &[Range::new(pages, bytes as u64)], true)
        {
            unreserve();
            if let ConvError::Stuck(_) = e {
                c.stats.leaked(bytes as u64);
            } else {
                c.plat.free_pages(pages, bytes);
            }
            return Err(e.into());
        }
        let bounce = pages + offset as u64;
        // SAFETY: `orig` per the caller's contract; the buffer is ours.
        unsafe { c.fill(bounce, orig, len, dir) };
        self.table.lock().slice()[slot] = Entry {
            bounce,
            orig,
            pages,
            bytes: bytes as u64,
            len,
            state: LIVE,
            dir: dir.bits(),
        };
        c.stats.transient_map();
        c.stats.map_ok(bytes as u64);
        Ok(bounce)
    }

    /// End a transient mapping: copy back for `dir`, convert back, free.
    pub fn unmap(
        &self,
        c: &Common,
        bounce: u64,
        len: usize,
        dir: Direction,
    ) -> Result<(), MapError> {
        let e = {
            let mut t = self.table.lock();
            let s = t.slice();
            let i = s
                .iter()
                .position(|e| e.state == LIVE && e.bounce == bounce)
                .ok_or(MapError::NotMapped)?;
            if s[i].len != len {
                return Err(MapError::Mismatch);
            }
            s[i].state = RELEASING;
            (i, s[i])
        };
        let (i, e) = e;
        if dir.from_device() {
            // SAFETY: the original is writable until this unmap (the map contract); the buffer
            // is the live one we just validated.
            unsafe { copy(e.orig, e.bounce, e.len) };
        }
        match c
            .conv
            .convert(&c.stats, &[Range::new(e.pages, e.bytes)], false)
        {
            Ok(()) => c.plat.free_pages(e.pages, e.bytes as usize),
            Err(_) => c.stats.leaked(e.bytes),
        }
        self.table.lock().slice()[i].state = FREE;
        c.stats.unmapped(e.bytes);
        Ok(())
    }

    /// Sync part of a transient mapping.
    pub fn sync(&self, addr: u64, len: usize, for_device: bool) -> Result<(), MapError> {
        let e = {
            let mut t = self.table.lock();
            let s = t.slice();
            *s.iter()
                .find(|e| e.state == LIVE && addr >= e.bounce && addr < e.bounce + e.len as u64)
                .ok_or(MapError::NotMapped)?
        };
        let end = addr.checked_add(len as u64).ok_or(MapError::Mismatch)?;
        if end > e.bounce + e.len as u64 {
            return Err(MapError::Mismatch);
        }
        let dir = Direction::from_bits(e.dir);
        let orig = e.orig + (addr - e.bounce);
        // SAFETY: inside a live, validated bounce buffer and its original (the map contract).
        unsafe { sync_copy(addr, orig, len, dir, for_device) };
        Ok(())
    }

    /// Convert back and free every live buffer (abandoned mappings) and the table.
    pub fn destroy(&self, c: &Common) {
        let mut t = self.table.lock();
        for e in t.slice().iter_mut().filter(|e| e.state == LIVE) {
            match c
                .conv
                .convert(&c.stats, &[Range::new(e.pages, e.bytes)], false)
            {
                Ok(()) => c.plat.free_pages(e.pages, e.bytes as usize),
                Err(_) => c.stats.leaked(e.bytes),
            }
            e.state = FREE;
        }
        PrivatePages {
            addr: self.meta.0,
            bytes: self.meta.1,
        }
        .free(c.plat);
        t.cap = 0;
    }
}
