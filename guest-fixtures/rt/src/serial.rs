//! Serial console output on COM1 (`abi::SERIAL_PORT`): whole lines under a cross-vCPU lock,
//! numbers formatted without `core::fmt` (safe in emulated mode), and `core::fmt` output for
//! native mode only.
//!
//! ```ignore
//! rt::line().s("x=").u(5u32).s(" at ").hex(0x1000).end();
//! ```

use crate::arch;
use crate::numfmt::{self, Sink};
use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};
use memconv::abi::SERIAL_PORT;

/// Holder of the console lock: 0 = free, else vCPU index + 1.
static OWNER: AtomicU32 = AtomicU32::new(0);
/// Nesting depth of the holder (an exception or panic may print while a line is open).
static DEPTH: AtomicU32 = AtomicU32::new(0);

fn put(b: u8) {
    // SAFETY: writing the 16550 transmit register only emits a byte (the host's UART is
    // always ready, no need to poll LSR).
    unsafe { arch::outb(SERIAL_PORT, b) };
}

/// The raw serial port as a byte sink (no locking).
struct Port;

impl Sink for Port {
    fn put(&mut self, byte: u8) {
        put(byte);
    }
}

/// Take the console lock; re-entrant on the same vCPU. Returns whether this nests inside a
/// line already open on this vCPU.
fn lock() -> bool {
    let me = crate::cpu_index() + 1;
    if OWNER.load(Ordering::Relaxed) == me {
        DEPTH.fetch_add(1, Ordering::Relaxed);
        return true;
    }
    while OWNER
        .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        core::hint::spin_loop();
    }
    DEPTH.store(1, Ordering::Relaxed);
    false
}

fn unlock() {
    if DEPTH.fetch_sub(1, Ordering::Relaxed) == 1 {
        OWNER.store(0, Ordering::Release);
    }
}

/// Unsigned integers accepted by [`Line::u`] and [`Line::hex`].
pub trait Unsigned: Copy {
    /// Widen to u64.
    fn to_u64(self) -> u64;
}

/// Signed integers accepted by [`Line::i`].
pub trait Signed: Copy {
    /// Widen to i64.
    fn to_i64(self) -> i64;
}

macro_rules! widen {
    ($tr:ident, $f:ident, $to:ty: $($t:ty),*) => {
        $(impl $tr for $t {
            fn $f(self) -> $to {
                self as $to
            }
        })*
    };
}
widen!(Unsigned, to_u64, u64: u8, u16, u32, u64, usize, bool);
widen!(Signed, to_i64, i64: i8, i16, i32, i64, isize);

/// One console line, written as it is built, under the console lock; the newline is written
/// and the lock released by [`Line::end`] (or on drop).
#[must_use = "call .end() to finish the line"]
pub struct Line {
    _private: (),
}

/// Start a console line.
pub fn line() -> Line {
    if lock() {
        put(b'\n');
    }
    Line { _private: () }
}

/// Print `s` as a whole line.
pub fn println(s: &str) {
    line().s(s).end();
}

impl Line {
    /// Append a string.
    pub fn s(self, s: &str) -> Self {
        Port.put_all(s.as_bytes());
        self
    }

    /// Append raw bytes.
    pub fn bytes(self, b: &[u8]) -> Self {
        Port.put_all(b);
        self
    }

    /// Append one byte (character).
    pub fn c(self, b: u8) -> Self {
        put(b);
        self
    }

    /// Append an unsigned integer in decimal.
    pub fn u(self, v: impl Unsigned) -> Self {
        numfmt::dec(&mut Port, v.to_u64());
        self
    }

    /// Append a signed integer in decimal.
    pub fn i(self, v: impl Signed) -> Self {
        numfmt::dec_signed(&mut Port, v.to_i64());
        self
    }

    /// Append an unsigned integer in hexadecimal, `0x` prefixed.
    pub fn hex(self, v: impl Unsigned) -> Self {
        numfmt::hex(&mut Port, v.to_u64());
        self
    }

    /// Append the name of an abi status code (`ok`, `unaligned`, ...).
    pub fn status(self, st: u32) -> Self {
        self.s(memconv::abi::status_name(st))
    }

    /// Append `core::fmt` output. Native mode only (`core::fmt` uses SSE); in emulated mode
    /// appends `<fmt: emulated>` instead.
    pub fn f(self, args: fmt::Arguments<'_>) -> Self {
        if crate::native() {
            let _ = fmt::Write::write_fmt(&mut Console, args);
        } else {
            Port.put_all(b"<fmt: emulated>");
        }
        self
    }

    /// Finish the line (newline, unlock).
    pub fn end(self) {}
}

impl Drop for Line {
    fn drop(&mut self) {
        put(b'\n');
        unlock();
    }
}

/// The console as a `core::fmt::Write` (no locking, no newline handling). Only for native mode:
/// `core::fmt` uses SSE. Prefer [`line`] with [`Line::f`], or [`crate::nprintln!`].
pub struct Console;

impl fmt::Write for Console {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        Port.put_all(s.as_bytes());
        Ok(())
    }
}

/// `println!` through `core::fmt`, for native mode only (prints a placeholder in emulated mode).
#[macro_export]
macro_rules! nprintln {
    ($($arg:tt)*) => {
        $crate::serial::line().f(format_args!($($arg)*)).end()
    };
}
