//! Spinning synchronisation for a machine without a scheduler: [`SpinLock`], a
//! test-and-test-and-set lock owning its value (critical sections are short: metadata
//! updates, never a copy or a conversion), [`Once`], a value set once and then read by every
//! vCPU without locking, and bounded spin-waits ([`spin_until`]).

use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};

/// A test-and-test-and-set spinlock owning a `T`.
pub struct SpinLock<T> {
    locked: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the lock hands out at most one `&mut T` at a time (acquire/release on `locked`), so
// sharing the lock between vCPUs is sound whenever `T` may be sent between them.
unsafe impl<T: Send> Sync for SpinLock<T> {}

impl<T> SpinLock<T> {
    /// A new, unlocked lock.
    pub const fn new(value: T) -> Self {
        SpinLock {
            locked: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// Spin until the lock is taken.
    #[inline]
    pub fn lock(&self) -> SpinGuard<'_, T> {
        loop {
            if let Some(g) = self.try_lock() {
                return g;
            }
            while self.locked.load(Ordering::Relaxed) {
                core::hint::spin_loop();
            }
        }
    }

    /// Take the lock if it is free.
    #[inline]
    pub fn try_lock(&self) -> Option<SpinGuard<'_, T>> {
        self.locked
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .ok()
            .map(|_| SpinGuard { lock: self })
    }

    /// The value, without locking: `&mut self` proves exclusivity.
    pub fn get_mut(&mut self) -> &mut T {
        self.value.get_mut()
    }
}

/// Holds a [`SpinLock`]; unlocks on drop.
pub struct SpinGuard<'a, T> {
    lock: &'a SpinLock<T>,
}

impl<T> Deref for SpinGuard<'_, T> {
    type Target = T;
    #[inline]
    fn deref(&self) -> &T {
        // SAFETY: the guard exists only while the lock is held, so no `&mut T` exists elsewhere.
        unsafe { &*self.lock.value.get() }
    }
}

impl<T> DerefMut for SpinGuard<'_, T> {
    #[inline]
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: the guard exists only while the lock is held and is not shared.
        unsafe { &mut *self.lock.value.get() }
    }
}

impl<T> Drop for SpinGuard<'_, T> {
    #[inline]
    fn drop(&mut self) {
        self.lock.locked.store(false, Ordering::Release);
    }
}

const EMPTY: u8 = 0;
const SETTING: u8 = 1;
const SET: u8 = 2;

/// A value set at most once (typically by vCPU 0 during setup) and then read by any vCPU
/// without locking: the replacement for a `static mut` that is written once.
pub struct Once<T> {
    state: AtomicU8,
    value: UnsafeCell<MaybeUninit<T>>,
}

// SAFETY: the value is written once, by the one caller that moved `state` from EMPTY to
// SETTING, and only read after `state` is SET (Release / Acquire), so sharing a `Once` hands
// out only `&T` to a fully written value: sound whenever `&T` may be shared (`T: Sync`) and
// the value may have been written on another vCPU (`T: Send`).
unsafe impl<T: Send + Sync> Sync for Once<T> {}

impl<T> Once<T> {
    /// An empty cell.
    pub const fn new() -> Self {
        Once {
            state: AtomicU8::new(EMPTY),
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// Store `value` if the cell is empty and return the stored value; if it was set (or is
    /// being set) already, hand `value` back.
    pub fn set(&self, value: T) -> Result<&T, T> {
        if self
            .state
            .compare_exchange(EMPTY, SETTING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            return Err(value);
        }
        // SAFETY: winning EMPTY -> SETTING makes this the only writer, and no reader looks at
        // the value before `state` is SET below; the returned `&T` is never written through.
        let stored = unsafe { (*self.value.get()).write(value) };
        self.state.store(SET, Ordering::Release);
        Ok(stored)
    }

    /// The value, once set.
    #[inline]
    pub fn get(&self) -> Option<&T> {
        if self.state.load(Ordering::Acquire) != SET {
            return None;
        }
        // SAFETY: SET (Acquire) is stored only after the value was written, and it is never
        // written again.
        Some(unsafe { (*self.value.get()).assume_init_ref() })
    }
}

impl<T> Default for Once<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Drop for Once<T> {
    fn drop(&mut self) {
        if *self.state.get_mut() == SET {
            // SAFETY: SET means the value was written, and `&mut self` means nobody else
            // holds a reference to it.
            unsafe { self.value.get_mut().assume_init_drop() };
        }
    }
}

/// Spin (with `pause`) until `cond()` holds or `max_spins` checks have failed; returns whether
/// it holds.
pub fn spin_until(mut cond: impl FnMut() -> bool, max_spins: u64) -> bool {
    let mut n = 0u64;
    loop {
        if cond() {
            return true;
        }
        if n >= max_spins {
            return false;
        }
        n += 1;
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn lock_excludes() {
        let l = Arc::new(SpinLock::new(0u64));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        *l.lock() += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(*l.lock(), 40_000);
        let g = l.lock();
        assert!(l.try_lock().is_none());
        drop(g);
        assert!(l.try_lock().is_some());
    }

    #[test]
    fn once_is_set_once_and_seen_everywhere() {
        let o = Arc::new(Once::new());
        assert!(o.get().is_none());
        let threads: Vec<_> = (0..4u64)
            .map(|i| {
                let o = o.clone();
                std::thread::spawn(move || o.set(i).is_ok())
            })
            .collect();
        let winners = threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|&won| won)
            .count();
        assert_eq!(winners, 1);
        let v = *o.get().unwrap();
        assert!(v < 4);
        assert_eq!(o.set(9), Err(9));
        assert_eq!(*o.get().unwrap(), v);
    }

    #[test]
    fn bounded_spin() {
        let mut k = 0;
        assert!(spin_until(
            || {
                k += 1;
                k == 5
            },
            10
        ));
        assert!(!spin_until(|| false, 100));
        assert!(spin_until(|| true, 0));
    }
}
