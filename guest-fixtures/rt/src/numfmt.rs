//! Number formatting without `core::fmt`: decimal and hexadecimal writers over a byte sink.
//!
//! `core::fmt`'s integer formatting uses SSE, which fails under `--exec emulated`; these
//! writers use no buffer (no stack array to zero) and only integer instructions.

/// Something that accepts bytes one at a time (the serial port, a test buffer).
pub trait Sink {
    /// Emit one byte.
    fn put(&mut self, byte: u8);

    /// Emit every byte of `bytes`.
    fn put_all(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.put(b);
        }
    }
}

/// Write `v` in decimal.
pub fn dec<S: Sink + ?Sized>(out: &mut S, v: u64) {
    // The largest power of ten not above `v` (10^19 still fits in a u64), then digit by digit
    // from the most significant one: no buffer needed.
    let mut p = 1u64;
    while v / p >= 10 {
        p *= 10;
    }
    loop {
        out.put(b'0' + (v / p % 10) as u8);
        if p == 1 {
            break;
        }
        p /= 10;
    }
}

/// Write `v` in decimal with a leading `-` when negative.
pub fn dec_signed<S: Sink + ?Sized>(out: &mut S, v: i64) {
    if v < 0 {
        out.put(b'-');
    }
    dec(out, v.unsigned_abs());
}

/// Write `v` in lower-case hexadecimal, `0x` prefixed, without leading zeros (`0x0` for 0).
pub fn hex<S: Sink + ?Sized>(out: &mut S, v: u64) {
    out.put_all(b"0x");
    hex_digits(out, v, 1);
}

/// Write `v` in lower-case hexadecimal with at least `min_digits` digits (zero padded, at most
/// 16), no prefix.
pub fn hex_digits<S: Sink + ?Sized>(out: &mut S, v: u64, min_digits: u32) {
    let used = if v == 0 {
        1
    } else {
        (64 - v.leading_zeros()).div_ceil(4)
    };
    let digits = used.max(min_digits.min(16));
    let mut shift = digits * 4;
    while shift > 0 {
        shift -= 4;
        let nibble = ((v >> shift) & 0xf) as u8;
        out.put(if nibble < 10 {
            b'0' + nibble
        } else {
            b'a' + nibble - 10
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Sink for Vec<u8> {
        fn put(&mut self, byte: u8) {
            self.push(byte);
        }
    }

    fn run(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut v = Vec::new();
        f(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn decimal_matches_std() {
        let cases = [
            0u64,
            1,
            9,
            10,
            11,
            99,
            100,
            101,
            12345,
            1_000_000,
            999_999_999_999,
            10_000_000_000_000_000_000,
            u64::MAX - 1,
            u64::MAX,
        ];
        for v in cases {
            assert_eq!(run(|s| dec(s, v)), v.to_string());
        }
        let mut x = 1u64;
        for _ in 0..200 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let v = x >> (x % 64);
            assert_eq!(run(|s| dec(s, v)), v.to_string());
        }
    }

    #[test]
    fn signed() {
        for v in [0i64, -1, 1, -10, i64::MIN, i64::MAX, -1234567] {
            assert_eq!(run(|s| dec_signed(s, v)), v.to_string());
        }
    }

    #[test]
    fn hexadecimal() {
        for v in [
            0u64,
            1,
            0xf,
            0x10,
            0xdead_beef,
            0x40_0000,
            u64::MAX,
            1 << 63,
        ] {
            assert_eq!(run(|s| hex(s, v)), format!("{v:#x}"));
        }
        assert_eq!(run(|s| hex_digits(s, 0x1f, 4)), "001f");
        assert_eq!(run(|s| hex_digits(s, 0x12345, 4)), "12345");
        assert_eq!(run(|s| hex_digits(s, 0, 0)), "0");
        assert_eq!(run(|s| hex_digits(s, 1, 99)), "0000000000000001");
    }
}
