//! Command-line parsing: whitespace-separated `key=value` (or bare `key`) tokens, number
//! values with optional `0x` and `K`/`M`/`G` suffixes, comma-separated lists.
//!
//! Written with plain byte loops (no `str::split`, no `core::fmt`): `core`'s precompiled
//! searchers may use SSE, which the guest must avoid in emulated mode.

/// A validated (ASCII) command line.
#[derive(Clone, Copy, Debug)]
pub struct Cmdline<'a> {
    bytes: &'a [u8],
}

/// Why a value could not be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ValueError {
    /// Not a number (or overflows a u64).
    NotANumber,
}

/// Whether `bytes` is an acceptable command line: printable ASCII and ASCII whitespace only.
pub fn is_valid(bytes: &[u8]) -> bool {
    bytes
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) || is_space(b))
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// View ASCII bytes as a `&str` without `core::str::from_utf8` (which is precompiled and may
/// use SSE).
fn ascii_str(bytes: &[u8]) -> &str {
    if all_ascii(bytes) {
        // SAFETY: every byte is < 0x80, so the slice is valid UTF-8.
        unsafe { core::str::from_utf8_unchecked(bytes) }
    } else {
        ""
    }
}

fn all_ascii(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] >= 0x80 {
            return false;
        }
        i += 1;
    }
    true
}

impl<'a> Cmdline<'a> {
    /// Wrap `bytes`; a line with bytes outside printable ASCII/whitespace is treated as empty.
    pub fn new(bytes: &'a [u8]) -> Self {
        if is_valid(bytes) {
            Cmdline { bytes }
        } else {
            Cmdline { bytes: &[] }
        }
    }

    /// The whole line.
    pub fn as_str(&self) -> &'a str {
        ascii_str(self.bytes)
    }

    /// The tokens, in order.
    pub fn tokens(&self) -> Tokens<'a> {
        Tokens { rest: self.bytes }
    }

    /// The value of the last `key=value` token for `key` (`Some("")` for a bare `key` or
    /// `key=`), or `None` if absent.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        let mut found = None;
        for tok in self.tokens() {
            let (k, v) = split_once(tok, b'=');
            if k == key {
                found = Some(v.unwrap_or(""));
            }
        }
        found
    }

    /// Whether `key` appears at all.
    pub fn has(&self, key: &str) -> bool {
        self.get(key).is_some()
    }

    /// A boolean option: absent = `default`; bare `key`, `1`, `true`, `yes`, `on` = true;
    /// `0`, `false`, `no`, `off` = false; anything else = `Err`.
    pub fn flag(&self, key: &str, default: bool) -> Result<bool, ValueError> {
        match self.get(key) {
            None => Ok(default),
            Some("" | "1" | "true" | "yes" | "on") => Ok(true),
            Some("0" | "false" | "no" | "off") => Ok(false),
            Some(_) => Err(ValueError::NotANumber),
        }
    }

    /// A number option (see [`parse_u64`]): absent = `default`, unparsable = `Err`.
    pub fn u64_or(&self, key: &str, default: u64) -> Result<u64, ValueError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => parse_u64(v).ok_or(ValueError::NotANumber),
        }
    }
}

/// Iterator over whitespace-separated tokens.
#[derive(Clone, Debug)]
pub struct Tokens<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Tokens<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        let mut start = 0;
        while start < self.rest.len() && is_space(self.rest[start]) {
            start += 1;
        }
        if start == self.rest.len() {
            self.rest = &[];
            return None;
        }
        let mut end = start;
        while end < self.rest.len() && !is_space(self.rest[end]) {
            end += 1;
        }
        let tok = &self.rest[start..end];
        self.rest = &self.rest[end..];
        Some(ascii_str(tok))
    }
}

/// Split at the first `sep`: `("k", Some("v"))` for `"k=v"`, `("k", None)` without `sep`.
pub fn split_once(s: &str, sep: u8) -> (&str, Option<&str>) {
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == sep {
            return (ascii_str(&b[..i]), Some(ascii_str(&b[i + 1..])));
        }
        i += 1;
    }
    (s, None)
}

/// Iterator over the non-empty items of a `sep`-separated list (e.g. `"4k,2m"`).
#[derive(Clone, Debug)]
pub struct ListItems<'a> {
    rest: &'a [u8],
    sep: u8,
}

/// The non-empty items of the comma-separated list `s`.
pub fn list(s: &str) -> ListItems<'_> {
    ListItems {
        rest: s.as_bytes(),
        sep: b',',
    }
}

impl<'a> Iterator for ListItems<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        loop {
            if self.rest.is_empty() {
                return None;
            }
            let mut end = 0;
            while end < self.rest.len() && self.rest[end] != self.sep {
                end += 1;
            }
            let item = &self.rest[..end];
            self.rest = if end < self.rest.len() {
                &self.rest[end + 1..]
            } else {
                &[]
            };
            if !item.is_empty() {
                return Some(ascii_str(item));
            }
        }
    }
}

/// Whether the comma-separated list `s` contains `item`.
pub fn list_contains(s: &str, item: &str) -> bool {
    list(s).any(|x| x == item)
}

/// Parse a u64: decimal or `0x` hexadecimal, `_` allowed between digits, optional `K`, `M` or
/// `G` suffix (binary: x1024, x1024^2, x1024^3; either case). `None` if malformed or it
/// overflows.
pub fn parse_u64(s: &str) -> Option<u64> {
    let mut b = s.as_bytes();
    let mut shift = 0u32;
    if let Some(&last) = b.last() {
        shift = match last {
            b'k' | b'K' => 10,
            b'm' | b'M' => 20,
            b'g' | b'G' => 30,
            _ => 0,
        };
        if shift != 0 {
            b = &b[..b.len() - 1];
        }
    }
    let radix: u64 = if b.len() > 2 && b[0] == b'0' && (b[1] == b'x' || b[1] == b'X') {
        b = &b[2..];
        16
    } else {
        10
    };
    if b.is_empty() || b[0] == b'_' {
        return None;
    }
    let mut v: u64 = 0;
    for &c in b {
        let d = match c {
            b'0'..=b'9' => (c - b'0') as u64,
            b'a'..=b'f' if radix == 16 => (c - b'a' + 10) as u64,
            b'A'..=b'F' if radix == 16 => (c - b'A' + 10) as u64,
            b'_' => continue,
            _ => return None,
        };
        v = v.checked_mul(radix)?.checked_add(d)?;
    }
    if shift != 0 {
        if v.leading_zeros() < shift {
            return None;
        }
        v <<= shift;
    }
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_lookup() {
        let c = Cmdline::new(b"  iters=1000 patterns=4k,2m\tverbose  host2m=1 iters=7 empty= ");
        let toks: Vec<&str> = c.tokens().collect();
        assert_eq!(
            toks,
            [
                "iters=1000",
                "patterns=4k,2m",
                "verbose",
                "host2m=1",
                "iters=7",
                "empty="
            ]
        );
        assert_eq!(c.get("iters"), Some("7"), "last one wins");
        assert_eq!(c.get("patterns"), Some("4k,2m"));
        assert_eq!(c.get("verbose"), Some(""));
        assert_eq!(c.get("empty"), Some(""));
        assert_eq!(c.get("missing"), None);
        assert_eq!(c.get("iter"), None);
        assert!(c.has("verbose"));
        assert_eq!(c.flag("verbose", false), Ok(true));
        assert_eq!(c.flag("host2m", false), Ok(true));
        assert_eq!(c.flag("nope", true), Ok(true));
        assert_eq!(c.flag("patterns", false), Err(ValueError::NotANumber));
        assert_eq!(c.u64_or("iters", 5), Ok(7));
        assert_eq!(c.u64_or("nope", 5), Ok(5));
        assert_eq!(c.u64_or("patterns", 5), Err(ValueError::NotANumber));
    }

    #[test]
    fn value_with_equals_and_empty_line() {
        let c = Cmdline::new(b"a=b=c");
        assert_eq!(c.get("a"), Some("b=c"));
        let e = Cmdline::new(b"");
        assert_eq!(e.tokens().count(), 0);
        assert_eq!(e.get("a"), None);
        let ws = Cmdline::new(b"   \t ");
        assert_eq!(ws.tokens().count(), 0);
    }

    #[test]
    fn invalid_bytes_make_an_empty_line() {
        assert!(!is_valid(b"a=\xff"));
        assert!(!is_valid(b"a=\x00"));
        assert!(is_valid(b"a=1\tb=2\n"));
        let c = Cmdline::new(b"a=1 b=\xc3\xa9");
        assert_eq!(c.get("a"), None);
        assert_eq!(c.as_str(), "");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_u64("0"), Some(0));
        assert_eq!(parse_u64("1000000"), Some(1_000_000));
        assert_eq!(parse_u64("1_000_000"), Some(1_000_000));
        assert_eq!(parse_u64("0x10"), Some(16));
        assert_eq!(parse_u64("0XfF"), Some(255));
        assert_eq!(parse_u64("4K"), Some(4096));
        assert_eq!(parse_u64("4k"), Some(4096));
        assert_eq!(parse_u64("2M"), Some(2 << 20));
        assert_eq!(parse_u64("3g"), Some(3 << 30));
        assert_eq!(parse_u64("0x2M"), Some(2 << 20));
        assert_eq!(parse_u64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(parse_u64("18446744073709551616"), None);
        assert_eq!(parse_u64("0xffffffffffffffff"), Some(u64::MAX));
        assert_eq!(parse_u64("0x1ffffffffffffffff"), None);
        assert_eq!(parse_u64("17179869184G"), None);
        assert_eq!(parse_u64("17179869183G"), Some(17179869183 << 30));
        for bad in [
            "", "K", "0x", "0xK", "12a", "-1", "1.5", "_1", "0xg", "1KK", " 1",
        ] {
            assert_eq!(parse_u64(bad), None, "{bad:?}");
        }
        assert_eq!(parse_u64("0x"), None);
        assert_eq!(parse_u64("0xa"), Some(10));
    }

    #[test]
    fn lists() {
        let items: Vec<&str> = list("4k,,2m,unaligned,").collect();
        assert_eq!(items, ["4k", "2m", "unaligned"]);
        assert!(list_contains("4k,2m", "2m"));
        assert!(!list_contains("4k,2m", "2"));
        assert!(!list_contains("", "2m"));
        assert_eq!(list("").count(), 0);
        assert_eq!(list(",,").count(), 0);
        assert_eq!(split_once("a=b", b'='), ("a", Some("b")));
        assert_eq!(split_once("ab", b'='), ("ab", None));
    }
}
