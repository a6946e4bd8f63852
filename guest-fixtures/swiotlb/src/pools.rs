//! [`PoolSet`]: an ordered set of slot pools (one for legacy and throttle; growing for
//! dynamic and aligned-2m), searched in order for maps and by address for unmaps, grown under
//! a lock and shrunk when idle, with the streaming-map operations (copy in, copy out, sync)
//! and slot-backed coherent allocations on top.
//!
//! Pools are published lock-free: an entry is filled while nobody looks at it and then
//! marked active. Retiring an idle pool marks it, waits for the vCPUs inside it to leave
//! (each entry counts its users), re-checks that nothing is mapped, converts it back and frees
//! it; a map never enters a retiring pool, and an unmap waits for the retirement to be
//! settled (it can only concern that pool if it is bogus, since the pool is empty).

use crate::common::{copy, sync_copy, zero, Common};
use crate::convert::ConvError;
use crate::error::BuildError;
use crate::error::MapError;
use crate::platform::{Platform, PrivatePages, Range, PAGE};
use crate::policy::{Direction, MapOpts};
use crate::slots::{Alloc, Request, SlotError, SlotPool, FLAG_COHERENT, SEGMENT_BYTES};
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering::*};
use rtcore::sync::SpinLock;

const EMPTY: u8 = 0;
const ACTIVE: u8 = 1;
const RETIRING: u8 = 2;
/// Converting back failed half way: the memory is left out of circulation for good.
const DEAD: u8 = 3;

/// Most pools a set can hold.
pub(crate) const MAX_POOLS: usize = crate::config::MAX_POOLS as usize;

#[repr(C, align(64))]
struct Entry {
    state: AtomicU8,
    /// vCPUs currently inside the pool (touching its metadata).
    users: AtomicU32,
    /// Live allocations (mappings and coherent).
    live: AtomicU32,
    /// `now_ns` when `live` last dropped to 0.
    idle_since: AtomicU64,
    /// The region, readable without entering (0 when empty).
    base: AtomicU64,
    bytes: AtomicU64,
    /// Valid while the state is `ACTIVE` or `RETIRING`.
    pool: UnsafeCell<MaybeUninit<SlotPool>>,
}

/// An ordered set of slot pools.
pub(crate) struct PoolSet {
    entries: *const Entry,
    cap: usize,
    meta: (u64, usize),
    /// Entries `[0, count)` may be in use.
    count: AtomicUsize,
    /// Bumped by every successful growth (lets concurrent growers see they were beaten).
    generation: AtomicU64,
    /// Serialises growth, shrinking and teardown.
    grow_lock: SpinLock<()>,
    areas: usize,
    /// Pools `[0, permanent)` never retire: no user or live counting for them (those shared
    /// counters would be written by every vCPU on every map).
    permanent: usize,
}

// SAFETY: entries are shared through atomics; a pool is written only while its entry is
// EMPTY under `grow_lock` (nobody reads it then) and read only while ACTIVE/RETIRING with
// `users` raised, which retirement waits for before freeing it.
unsafe impl Sync for PoolSet {}
// SAFETY: as above; the set owns its private metadata.
unsafe impl Send for PoolSet {}

impl PoolSet {
    /// Room for `cap` pools (at most [`MAX_POOLS`]), each with up to `areas` areas; the first
    /// `permanent` pools are never retired.
    pub fn new(
        plat: &dyn Platform,
        cap: usize,
        areas: usize,
        permanent: usize,
    ) -> Result<Self, BuildError> {
        let cap = cap.clamp(1, MAX_POOLS);
        let meta = PrivatePages::alloc(plat, cap * core::mem::size_of::<Entry>(), PAGE)
            .ok_or(BuildError::NoMemory)?;
        let entries = meta.ptr::<Entry>();
        for i in 0..cap {
            let e = Entry {
                state: AtomicU8::new(EMPTY),
                users: AtomicU32::new(0),
                live: AtomicU32::new(0),
                idle_since: AtomicU64::new(0),
                base: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                pool: UnsafeCell::new(MaybeUninit::uninit()),
            };
            // SAFETY: `i < cap` entries fit the page-aligned metadata; nothing refers to them.
            unsafe { entries.add(i).write(e) };
        }
        Ok(PoolSet {
            entries,
            cap,
            meta: (meta.addr, meta.bytes),
            count: AtomicUsize::new(0),
            generation: AtomicU64::new(0),
            grow_lock: SpinLock::new(()),
            areas,
            permanent,
        })
    }

    fn entry(&self, i: usize) -> &Entry {
        debug_assert!(i < self.cap);
        // SAFETY: `i < cap`, initialised in `new`, alive as long as the set.
        unsafe { &*self.entries.add(i) }
    }

    /// The growth generation (see [`PoolSet::add`]).
    pub fn generation(&self) -> u64 {
        self.generation.load(Acquire)
    }

    /// Active pools.
    pub fn pools(&self) -> usize {
        (0..self.count.load(Acquire))
            .filter(|&i| self.entry(i).state.load(Acquire) == ACTIVE)
            .count()
    }

    /// Run `f` on pool `i` if it is active.
    fn with_active<R>(&self, i: usize, f: impl FnOnce(&Entry, &SlotPool) -> R) -> Option<R> {
        let e = self.entry(i);
        if i < self.permanent {
            return (e.state.load(Acquire) == ACTIVE).then(|| {
                // SAFETY: an active permanent pool stays initialised until `destroy(&mut self)`.
                f(e, unsafe { (*e.pool.get()).assume_init_ref() })
            });
        }
        e.users.fetch_add(1, SeqCst);
        let r = if e.state.load(SeqCst) == ACTIVE {
            // SAFETY: ACTIVE with `users` raised: the pool is initialised and retirement
            // waits for us before dropping it.
            Some(f(e, unsafe { (*e.pool.get()).assume_init_ref() }))
        } else {
            None
        };
        e.users.fetch_sub(1, Release);
        r
    }

    /// Like [`PoolSet::with_active`], but waits while the pool is being retired.
    fn with_settled<R>(
        &self,
        plat: &dyn Platform,
        i: usize,
        f: impl FnOnce(&Entry, &SlotPool) -> R,
    ) -> Option<R> {
        if i < self.permanent {
            return self.with_active(i, f);
        }
        let mut f = Some(f);
        loop {
            let e = self.entry(i);
            e.users.fetch_add(1, SeqCst);
            match e.state.load(SeqCst) {
                ACTIVE => {
                    let f = f.take().expect("called once");
                    // SAFETY: as in `with_active`.
                    let r = f(e, unsafe { (*e.pool.get()).assume_init_ref() });
                    e.users.fetch_sub(1, Release);
                    return Some(r);
                }
                RETIRING => {
                    e.users.fetch_sub(1, Release);
                    plat.relax();
                }
                _ => {
                    e.users.fetch_sub(1, Release);
                    return None;
                }
            }
        }
    }

    /// The pool whose region contains `addr`.
    fn locate(&self, addr: u64) -> Option<usize> {
        (0..self.count.load(Acquire)).find(|&i| {
            let e = self.entry(i);
            let st = e.state.load(Acquire);
            let base = e.base.load(Acquire);
            (st == ACTIVE || st == RETIRING) && addr >= base && addr - base < e.bytes.load(Acquire)
        })
    }

    /// Whether `addr` lies in one of the pools.
    pub fn contains(&self, addr: u64) -> bool {
        self.locate(addr).is_some()
    }

    /// Add a pool of `bytes` (a multiple of 256 KiB) aligned to `align`, converted to shared
    /// in one call; `growth` counts it as a growth event (the boot pool is not one). With
    /// `seen` = the [`PoolSet::generation`] the caller saw when it decided to grow, nothing is
    /// done if another growth happened since.
    pub fn add(
        &self,
        c: &Common,
        bytes: usize,
        align: usize,
        growth: bool,
        seen: Option<u64>,
    ) -> Result<(), MapError> {
        let _g = self.grow_lock.lock();
        if seen.is_some_and(|g| g != self.generation.load(Acquire)) {
            return Ok(());
        }
        let r = self.add_locked(c, bytes, align);
        match r {
            Ok(()) if growth => c.stats.grew(),
            Ok(()) => {}
            Err(_) => c.stats.grow_failed(),
        }
        r
    }

    fn add_locked(&self, c: &Common, bytes: usize, align: usize) -> Result<(), MapError> {
        if bytes == 0 || !bytes.is_multiple_of(SEGMENT_BYTES) {
            return Err(MapError::InvalidArgument);
        }
        let i = (0..self.cap)
            .find(|&i| self.entry(i).state.load(Acquire) == EMPTY)
            .ok_or(MapError::TableFull)?;
        let plat = c.plat;
        let base = plat
            .alloc_pages(bytes, align.max(SEGMENT_BYTES))
            .ok_or(MapError::NoMemory)?;
        let pool = match SlotPool::create(plat, base, bytes, self.areas) {
            Ok(p) => p,
            Err(e) => {
                plat.free_pages(base, bytes);
                return Err(e.into());
            }
        };
        if let Err(e) = c
            .conv
            .convert(&c.stats, &[Range::new(base, bytes as u64)], true)
        {
            pool.destroy(plat);
            if let ConvError::Stuck(_) = e {
                c.stats.leaked(bytes as u64);
            } else {
                plat.free_pages(base, bytes);
            }
            return Err(e.into());
        }
        let e = self.entry(i);
        // SAFETY: the entry is EMPTY and we hold `grow_lock`: nobody reads or writes its pool.
        unsafe { (*e.pool.get()).write(pool) };
        e.live.store(0, Relaxed);
        e.idle_since.store(plat.now_ns(), Relaxed);
        e.bytes.store(bytes as u64, Release);
        e.base.store(base, Release);
        e.state.store(ACTIVE, Release);
        self.count.fetch_max(i + 1, AcqRel);
        self.generation.fetch_add(1, AcqRel);
        c.stats.capacity_add(bytes as u64);
        Ok(())
    }

    /// Allocate slots for `req` from the first pool (in order) with room.
    pub fn alloc(&self, cpu: usize, req: &Request) -> Result<Alloc, SlotError> {
        for i in 0..self.count.load(Acquire) {
            let r = self.with_active(i, |e, p| {
                let r = p.alloc(cpu, req);
                if r.is_ok() && i >= self.permanent {
                    e.live.fetch_add(1, AcqRel);
                }
                r
            });
            match r {
                None | Some(Err(SlotError::NoSpace)) => continue,
                Some(r) => return r,
            }
        }
        Err(SlotError::NoSpace)
    }

    /// Map: allocate and fill. Counts a success in the stats; a failure is for the caller to
    /// count (it may still serve the map another way).
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
        flags: u8,
    ) -> Result<Alloc, MapError> {
        let req = c.request(orig, len, dir, opts, flags)?;
        let al = self.alloc(c.plat.cpu() as usize, &req)?;
        // SAFETY: `orig` per the caller's contract; the bounce range was just allocated.
        unsafe { c.fill(al.bounce, orig, len, dir) };
        c.stats.map_ok(al.bytes());
        Ok(al)
    }

    /// Release an allocation found by `begin`: `during` runs between validation and freeing.
    fn release(
        &self,
        c: &Common,
        addr: u64,
        len: usize,
        coherent: bool,
        during: impl FnOnce(&Alloc),
    ) -> Result<Alloc, MapError> {
        let i = self.locate(addr).ok_or(MapError::NotMapped)?;
        let al = self
            .with_settled(c.plat, i, |_, p| p.begin_release(addr, len, coherent))
            .ok_or(MapError::NotMapped)??;
        during(&al);
        let done = self.with_settled(c.plat, i, |e, p| {
            p.finish_release(&al);
            if i >= self.permanent && e.live.fetch_sub(1, AcqRel) == 1 {
                e.idle_since.store(c.plat.now_ns(), Relaxed);
            }
        });
        debug_assert!(
            done.is_some(),
            "a pool with a live allocation cannot retire"
        );
        Ok(al)
    }

    /// Unmap: validate, copy back for `dir`, free.
    pub fn unmap(
        &self,
        c: &Common,
        bounce: u64,
        len: usize,
        dir: Direction,
    ) -> Result<Alloc, MapError> {
        let al = self.release(c, bounce, len, false, |al| {
            if dir.from_device() {
                // SAFETY: `al.orig` is writable until this unmap (the map contract); the bounce
                // range is the live allocation we just validated.
                unsafe { copy(al.orig, al.bounce, al.len) };
            }
        })?;
        c.stats.unmapped(al.bytes());
        Ok(al)
    }

    /// Sync part of a mapping: to the device (original -> bounce) or for the CPU.
    pub fn sync(
        &self,
        c: &Common,
        addr: u64,
        len: usize,
        for_device: bool,
    ) -> Result<(), MapError> {
        let i = self.locate(addr).ok_or(MapError::NotMapped)?;
        let al = self
            .with_settled(c.plat, i, |_, p| p.lookup(addr, len))
            .ok_or(MapError::NotMapped)??;
        let dir = Direction::from_bits(al.flags);
        let orig = al.orig + (addr - al.bounce);
        // SAFETY: inside a live, validated bounce buffer and its original (the map contract).
        unsafe { sync_copy(addr, orig, len, dir, for_device) };
        Ok(())
    }

    /// A coherent allocation from the slots (page aligned, zeroed).
    pub fn alloc_coherent(&self, c: &Common, len: usize) -> Result<u64, MapError> {
        let req = Request {
            orig: 0,
            len,
            min_align_mask: 0,
            alloc_align_mask: PAGE - 1,
            flags: FLAG_COHERENT,
        };
        let al = self.alloc(c.plat.cpu() as usize, &req)?;
        // SAFETY: the allocation is ours and lies in the pool.
        unsafe { zero(al.bounce, len) };
        c.stats.coherent_changed(al.bytes(), true);
        Ok(al.bounce)
    }

    /// Free a slot-backed coherent allocation.
    pub fn free_coherent(&self, c: &Common, addr: u64, len: usize) -> Result<(), MapError> {
        let al = self.release(c, addr, len, true, |_| {})?;
        c.stats.coherent_changed(al.bytes(), false);
        Ok(())
    }

    /// Convert back and free up to `max` of the non-permanent pools that have had nothing
    /// mapped for `idle_ns` (the last ones first, since maps fill the set in order; all of them
    /// in one conversion call). Returns whether any was freed.
    pub fn shrink_idle(&self, c: &Common, idle_ns: u64, max: usize) -> bool {
        let Some(_g) = self.grow_lock.try_lock() else {
            return false;
        };
        let now = c.plat.now_ns();
        let mut picked = [0usize; MAX_POOLS];
        let mut ranges = [Range::default(); MAX_POOLS];
        let mut n = 0;
        for i in (self.permanent..self.count.load(Acquire)).rev() {
            if n >= max {
                break;
            }
            let e = self.entry(i);
            if e.state.load(Acquire) != ACTIVE
                || e.live.load(Acquire) != 0
                || now.saturating_sub(e.idle_since.load(Relaxed)) < idle_ns
            {
                continue;
            }
            e.state.store(RETIRING, SeqCst);
            while e.users.load(SeqCst) != 0 {
                core::hint::spin_loop();
            }
            // SAFETY: RETIRING with no users: we are alone with the (initialised) pool.
            let used = unsafe { (*e.pool.get()).assume_init_ref() }.used_slots();
            if used != 0 || e.live.load(Acquire) != 0 {
                e.state.store(ACTIVE, Release);
                continue;
            }
            picked[n] = i;
            ranges[n] = Range::new(e.base.load(Relaxed), e.bytes.load(Relaxed));
            n += 1;
        }
        if n == 0 {
            return false;
        }
        let res = c.conv.convert(&c.stats, &ranges[..n], false);
        if matches!(res, Err(ConvError::Host(_)) | Err(ConvError::Refused)) {
            // Still shared and intact: keep using them.
            for &i in &picked[..n] {
                self.entry(i).state.store(ACTIVE, Release);
            }
            return false;
        }
        for (&i, r) in picked[..n].iter().zip(&ranges[..n]) {
            self.drop_pool(c, i, r, res.is_ok());
            c.stats.shrank();
        }
        true
    }

    /// Tear down pool `i` (retiring, converted back when `private`; else leaked).
    fn drop_pool(&self, c: &Common, i: usize, r: &Range, private: bool) {
        let e = self.entry(i);
        // SAFETY: the pool is RETIRING with no users (or the set is being torn down): nobody
        // else can reach it, and the state change below forgets it.
        let pool = unsafe { (*e.pool.get()).assume_init_read() };
        pool.destroy(c.plat);
        if private {
            c.plat.free_pages(r.addr, r.len as usize);
        } else {
            c.stats.leaked(r.len);
        }
        c.stats.capacity_sub(r.len);
        e.base.store(0, Release);
        e.bytes.store(0, Release);
        e.state.store(if private { EMPTY } else { DEAD }, Release);
    }

    /// Convert every pool back (one call) and free everything. Live mappings are abandoned.
    pub fn destroy(&mut self, c: &Common) {
        let mut picked = [0usize; MAX_POOLS];
        let mut ranges = [Range::default(); MAX_POOLS];
        let mut n = 0;
        for i in 0..self.count.load(Acquire) {
            let e = self.entry(i);
            if e.state.load(Acquire) == ACTIVE {
                e.state.store(RETIRING, SeqCst);
                picked[n] = i;
                ranges[n] = Range::new(e.base.load(Relaxed), e.bytes.load(Relaxed));
                n += 1;
            }
        }
        let ok = c.conv.convert(&c.stats, &ranges[..n], false).is_ok();
        for (&i, r) in picked[..n].iter().zip(&ranges[..n]) {
            self.drop_pool(c, i, r, ok);
        }
        PrivatePages {
            addr: self.meta.0,
            bytes: self.meta.1,
        }
        .free(c.plat);
        self.cap = 0;
        self.count.store(0, Release);
    }
}
