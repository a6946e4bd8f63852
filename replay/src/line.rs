//! One line of ftrace text into an [`Event`]: the shapes `/sys/kernel/tracing/trace` prints
//! (`task-pid [cpu] flags timestamp: event: fields`, with or without the irq-info flags column)
//! and the shapes `trace-cmd report` prints (a `[cpu]` column with or without flags, or `-l`'s
//! latency column where the CPU number and the flags are one word, `0d..1`), for the DMA-API
//! (`dma:*`) and `swiotlb:*` events whose formats are in the traces' `event_formats.txt`.
//! Borrowing, no allocation except for the arrays of `dma_map_sg` and friends.

use thiserror::Error;

/// A DMA direction as the events print it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Dir {
    /// `BIDIRECTIONAL`.
    Bidirectional,
    /// `TO_DEVICE`: the device reads the buffer.
    ToDevice,
    /// `FROM_DEVICE`: the device writes the buffer.
    FromDevice,
    /// `NONE`.
    None,
}

impl Dir {
    fn parse(s: &str) -> Option<Dir> {
        Some(match s {
            "BIDIRECTIONAL" => Dir::Bidirectional,
            "TO_DEVICE" => Dir::ToDevice,
            "FROM_DEVICE" => Dir::FromDevice,
            "NONE" => Dir::None,
            _ => return None,
        })
    }

    /// The direction's name as the events print it.
    pub fn name(self) -> &'static str {
        match self {
            Dir::Bidirectional => "BIDIRECTIONAL",
            Dir::ToDevice => "TO_DEVICE",
            Dir::FromDevice => "FROM_DEVICE",
            Dir::None => "NONE",
        }
    }

    /// The op-stream code (`memconv::replay_ops::DIR_*`).
    pub fn code(self) -> u8 {
        use memconv::replay_ops::*;
        match self {
            Dir::Bidirectional => DIR_BIDIRECTIONAL,
            Dir::ToDevice => DIR_TO_DEVICE,
            Dir::FromDevice => DIR_FROM_DEVICE,
            Dir::None => DIR_NONE,
        }
    }
}

/// The context an event was recorded in, from the irq-flags (latency) field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Context {
    /// Interrupts (or bottom halves) were off (`d` / `D` / `b`).
    pub irqs_off: bool,
    /// In a hard interrupt (`h`, `H`) or NMI (`z`, `Z`).
    pub hardirq: bool,
    /// In a soft interrupt (`s`, `H`).
    pub softirq: bool,
    /// The trace had a flags field for this line (without one, nothing is known).
    pub known: bool,
}

impl Context {
    /// Whether a map taken in this context could have blocked: interrupts on and outside
    /// interrupt context. Unknown context (no flags column) counts as may block.
    pub fn may_block(&self) -> bool {
        !(self.irqs_off || self.hardirq || self.softirq)
    }

    fn parse(flags: &str) -> Option<Context> {
        let b = flags.as_bytes();
        if b.len() < 4 || b.len() > 6 {
            return None;
        }
        let irq = b[0];
        let hs = b[2];
        if !matches!(irq, b'd' | b'D' | b'X' | b'b' | b'.') {
            return None;
        }
        if !matches!(hs, b'h' | b's' | b'H' | b'z' | b'Z' | b'.') {
            return None;
        }
        Some(Context {
            irqs_off: matches!(irq, b'd' | b'D' | b'b' | b'X'),
            hardirq: matches!(hs, b'h' | b'H' | b'z' | b'Z'),
            softirq: matches!(hs, b's' | b'H'),
            known: true,
        })
    }
}

/// What happened, with the fields replay needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind<'a> {
    /// `dma_map_page` / `dma_map_phys`.
    Map {
        /// The device address (the swiotlb slot): names the mapping until its unmap.
        dma_addr: u64,
        /// Bytes.
        size: u64,
    },
    /// `dma_unmap_page` / `dma_unmap_phys`.
    Unmap {
        /// The device address mapped.
        dma_addr: u64,
        /// Bytes.
        size: u64,
    },
    /// `dma_map_sg`: one mapping per entry.
    MapSg {
        /// Device addresses of the entries.
        dma_addrs: Vec<u64>,
        /// Sizes of the entries.
        sizes: Vec<u64>,
        /// Original buffer addresses: what `dma_unmap_sg` prints.
        phys_addrs: Vec<u64>,
    },
    /// `dma_unmap_sg`.
    UnmapSg {
        /// Original buffer addresses of the list.
        phys_addrs: Vec<u64>,
    },
    /// `dma_alloc` / `dma_alloc_pages` / `dma_alloc_sgt`: a coherent allocation.
    Alloc {
        /// Its device address.
        dma_addr: u64,
        /// Bytes.
        size: u64,
    },
    /// `dma_free` / `dma_free_pages` / `dma_free_sgt`.
    Free {
        /// Its device address.
        dma_addr: u64,
        /// Bytes.
        size: u64,
    },
    /// `dma_sync_single_for_cpu` / `_for_device`.
    Sync {
        /// `_for_device` (else `_for_cpu`).
        for_device: bool,
        /// The mapping's device address (or an address inside it).
        dma_addr: u64,
        /// Bytes synced.
        size: u64,
    },
    /// `dma_sync_sg_for_cpu` / `_for_device`.
    SyncSg {
        /// `_for_device` (else `_for_cpu`).
        for_device: bool,
        /// Device addresses of the entries.
        dma_addrs: Vec<u64>,
    },
    /// `swiotlb_bounced`: precedes its map.
    Bounced {
        /// Bytes.
        size: u64,
    },
    /// `dma_map_resource`, `dma_unmap_resource`, `dma_alloc_sgt_err`, `dma_map_sg_err`: no
    /// swiotlb slot involved; counted and skipped.
    NoSlot,
    /// `tracing_mark_write` (a phase marker) and other marker text.
    Marker(&'a str),
}

/// One parsed event line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event<'a> {
    /// CPU that recorded it.
    pub cpu: u32,
    /// Context from the flags field.
    pub ctx: Context,
    /// Timestamp in nanoseconds.
    pub ts_ns: u64,
    /// The device name (`0000:00:01.0`), empty for markers.
    pub device: &'a str,
    /// Direction (`None` where the event has none).
    pub dir: Dir,
    /// The event.
    pub kind: Kind<'a>,
}

/// Why one line did not parse.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LineError {
    /// No `task-pid [cpu]` / latency prefix, or no timestamp.
    #[error("not an ftrace event line (no task-pid, CPU and timestamp)")]
    NoPrefix,
    /// The event name is not one of the DMA-API or swiotlb events.
    #[error("unknown event `{0}`")]
    UnknownEvent(String),
    /// A field the event always prints is missing: the line was cut short.
    #[error("line cut short: `{event}` has no `{field}`")]
    Missing {
        /// The event.
        event: &'static str,
        /// The missing field.
        field: &'static str,
    },
    /// A field's value does not parse.
    #[error("bad value `{value}` for `{field}`")]
    BadValue {
        /// The field.
        field: &'static str,
        /// What was there.
        value: String,
    },
}

/// A line that carries no event (header comments, blank lines, `cpus=N`, `CPU N is empty`,
/// trace-cmd's `version = 6`): skipped.
pub fn is_noise(line: &str) -> bool {
    let t = line.trim_start();
    t.is_empty()
        || t.starts_with('#')
        || t.starts_with("cpus=")
        || t.starts_with("version =")
        || t.starts_with("version=")
        || (t.starts_with("CPU ") && t.ends_with(" is empty"))
}

/// A ring-buffer overrun marker (`CPU:0 [LOST 12 EVENTS]`, trace-cmd's `[LOST EVENTS]`):
/// the kernel dropped events. Returns the count when given.
pub fn lost_events(line: &str) -> Option<u64> {
    let t = line.trim_start();
    if !t.starts_with("CPU:") && !t.starts_with("[LOST") {
        return None;
    }
    let i = line.find("[LOST ")?;
    let rest = &line[i + 6..];
    let n = rest.split_whitespace().next()?;
    Some(n.parse().unwrap_or(0))
}

fn parse_ts(s: &str) -> Option<u64> {
    let s = s.strip_suffix(':')?;
    let (secs, frac) = s.split_once('.')?;
    let secs: u64 = secs.parse().ok()?;
    if frac.is_empty() || frac.len() > 9 || !frac.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let f: u64 = frac.parse().ok()?;
    let scale = 10u64.pow(9 - frac.len() as u32);
    secs.checked_mul(1_000_000_000)?.checked_add(f * scale)
}

/// Finds the CPU column: returns (cpu, context, rest after the flags/cpu column).
fn split_prefix(line: &str) -> Option<(u32, Context, &str)> {
    let b = line.as_bytes();
    // `[NNN]` preceded by whitespace and `task-pid`.
    let mut from = 0;
    while let Some(off) = line[from..].find('[') {
        let i = from + off;
        from = i + 1;
        let Some(close) = line[i..].find(']') else {
            break;
        };
        let inner = &line[i + 1..i + close];
        if inner.is_empty() || !inner.bytes().all(|c| c.is_ascii_digit()) {
            continue;
        }
        if i == 0 || !b[i - 1].is_ascii_whitespace() {
            continue;
        }
        let before = line[..i].trim_end();
        let Some((_, pid)) = before.rsplit_once('-') else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cpu: u32 = inner.parse().ok()?;
        let rest = line[i + close + 1..].trim_start();
        let first = rest.split(' ').next()?;
        if let Some(ctx) = Context::parse(first) {
            return Some((cpu, ctx, rest[first.len()..].trim_start()));
        }
        return Some((cpu, Context::default(), rest));
    }
    // trace-cmd report -l: `task-pid  0d..1  ts: ...`: a word of digits then flags, after
    // a `-pid` word.
    let mut words = line.split_whitespace();
    let mut prev: Option<&str> = None;
    for w in words.by_ref() {
        if let Some(p) = prev {
            let pid_ok = p
                .rsplit_once('-')
                .is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|c| c.is_ascii_digit()));
            let digits = w.bytes().take_while(|c| c.is_ascii_digit()).count();
            if pid_ok && digits > 0 && digits < w.len() {
                if let Some(ctx) = Context::parse(&w[digits..]) {
                    let cpu: u32 = w[..digits].parse().ok()?;
                    let at = w.as_ptr() as usize - line.as_ptr() as usize + w.len();
                    return Some((cpu, ctx, line[at..].trim_start()));
                }
            }
        }
        prev = Some(w);
    }
    None
}

/// `key=value` in the fields, values without spaces.
fn field<'a>(fields: &'a str, key: &str) -> Option<&'a str> {
    let mut search = fields;
    loop {
        let i = search.find(key)?;
        let at_word = i == 0 || search.as_bytes()[i - 1] == b' ';
        let after = &search[i + key.len()..];
        if at_word && after.starts_with('=') {
            let v = &after[1..];
            return Some(v.split(' ').next().unwrap_or(""));
        }
        search = &search[i + key.len()..];
    }
}

fn need<'a>(fields: &'a str, event: &'static str, key: &'static str) -> Result<&'a str, LineError> {
    field(fields, key).ok_or(LineError::Missing { event, field: key })
}

fn hex(v: &str, field: &'static str) -> Result<u64, LineError> {
    let t = v.strip_prefix("0x").unwrap_or(v);
    u64::from_str_radix(t, 16).map_err(|_| LineError::BadValue {
        field,
        value: v.to_string(),
    })
}

fn dec(v: &str, field: &'static str) -> Result<u64, LineError> {
    v.parse().map_err(|_| LineError::BadValue {
        field,
        value: v.to_string(),
    })
}

/// `{0x1,0x2}` (hex) or `{1,2}` (decimal).
fn array(v: &str, field: &'static str, is_hex: bool) -> Result<Vec<u64>, LineError> {
    let bad = || LineError::BadValue {
        field,
        value: v.to_string(),
    };
    let inner = v
        .strip_prefix('{')
        .and_then(|s| s.strip_suffix('}'))
        .ok_or_else(bad)?;
    if inner.is_empty() {
        return Ok(Vec::new());
    }
    inner
        .split(',')
        .map(|x| {
            if is_hex || x.starts_with("0x") {
                hex(x, field)
            } else {
                dec(x, field)
            }
        })
        .collect()
}

fn dir_of(fields: &str, event: &'static str) -> Result<Dir, LineError> {
    let v = need(fields, event, "dir")?;
    Dir::parse(v).ok_or_else(|| LineError::BadValue {
        field: "dir",
        value: v.to_string(),
    })
}

/// The static name of a known event (for error messages).
fn known(name: &str) -> Option<&'static str> {
    const NAMES: [&str; 22] = [
        "dma_map_page",
        "dma_map_phys",
        "dma_unmap_page",
        "dma_unmap_phys",
        "dma_map_sg",
        "dma_unmap_sg",
        "dma_alloc",
        "dma_alloc_pages",
        "dma_alloc_sgt",
        "dma_free",
        "dma_free_pages",
        "dma_free_sgt",
        "dma_sync_single_for_cpu",
        "dma_sync_single_for_device",
        "dma_sync_sg_for_cpu",
        "dma_sync_sg_for_device",
        "swiotlb_bounced",
        "dma_map_resource",
        "dma_unmap_resource",
        "dma_alloc_sgt_err",
        "dma_map_sg_err",
        "tracing_mark_write",
    ];
    NAMES.iter().copied().find(|n| *n == name)
}

/// Parses one event line. Call [`is_noise`] and [`lost_events`] first.
pub fn parse_line(line: &str) -> Result<Event<'_>, LineError> {
    let (cpu, ctx, rest) = split_prefix(line).ok_or(LineError::NoPrefix)?;
    let (ts, rest) = rest.split_once(' ').ok_or(LineError::NoPrefix)?;
    let ts_ns = parse_ts(ts).ok_or(LineError::NoPrefix)?;
    let rest = rest.trim_start();
    let (name, fields) = match rest.split_once(':') {
        Some((n, f)) => (n, f.trim_start()),
        None => return Err(LineError::UnknownEvent(rest.to_string())),
    };
    // trace-cmd prints `system:event` in some modes.
    let (name, fields) = match (name, fields.split_once(':')) {
        ("dma" | "swiotlb" | "ftrace", Some((n, f))) if !n.contains(' ') => (n, f.trim_start()),
        _ => (name, fields),
    };
    let ev = known(name).ok_or_else(|| LineError::UnknownEvent(name.to_string()))?;
    let mut e = Event {
        cpu,
        ctx,
        ts_ns,
        device: "",
        dir: Dir::None,
        kind: Kind::NoSlot,
    };
    if ev == "tracing_mark_write" {
        e.kind = Kind::Marker(fields.trim_end());
        return Ok(e);
    }
    if ev == "swiotlb_bounced" {
        let f = fields
            .strip_prefix("dev_name:")
            .ok_or(LineError::Missing {
                event: ev,
                field: "dev_name",
            })?
            .trim_start();
        e.device = f.split(' ').next().unwrap_or("");
        let size = dec(need(f, ev, "size")?, "size")?;
        e.kind = Kind::Bounced { size };
        return Ok(e);
    }
    let device = fields.split(' ').next().unwrap_or("");
    if device.is_empty() || device.contains('=') {
        return Err(LineError::Missing {
            event: ev,
            field: "device",
        });
    }
    e.device = device;
    let f = &fields[device.len()..];
    e.dir = dir_of(f, ev)?;
    let addr_size = |f: &str| -> Result<(u64, u64), LineError> {
        let a = hex(need(f, ev, "dma_addr")?, "dma_addr")?;
        let s = dec(need(f, ev, "size")?, "size")?;
        Ok((a, s))
    };
    e.kind = match ev {
        "dma_map_page" | "dma_map_phys" => {
            let (dma_addr, size) = addr_size(f)?;
            // The last field the event prints: without it the line was cut.
            need(f, ev, "attrs")?;
            Kind::Map { dma_addr, size }
        }
        "dma_unmap_page" | "dma_unmap_phys" => {
            let (dma_addr, size) = addr_size(f)?;
            need(f, ev, "attrs")?;
            Kind::Unmap { dma_addr, size }
        }
        "dma_alloc" | "dma_alloc_pages" | "dma_alloc_sgt" => {
            let (dma_addr, size) = addr_size(f)?;
            need(f, ev, "attrs")?;
            Kind::Alloc { dma_addr, size }
        }
        "dma_free" | "dma_free_pages" | "dma_free_sgt" => {
            let (dma_addr, size) = addr_size(f)?;
            Kind::Free { dma_addr, size }
        }
        "dma_sync_single_for_cpu" | "dma_sync_single_for_device" => {
            let (dma_addr, size) = addr_size(f)?;
            Kind::Sync {
                for_device: ev.ends_with("device"),
                dma_addr,
                size,
            }
        }
        "dma_sync_sg_for_cpu" | "dma_sync_sg_for_device" => Kind::SyncSg {
            for_device: ev.ends_with("device"),
            dma_addrs: array(need(f, ev, "dma_addrs")?, "dma_addrs", true)?,
        },
        "dma_map_sg" => {
            let dma_addrs = array(need(f, ev, "dma_addrs")?, "dma_addrs", true)?;
            let sizes = array(need(f, ev, "sizes")?, "sizes", false)?;
            let phys_addrs = array(need(f, ev, "phys_addrs")?, "phys_addrs", true)?;
            need(f, ev, "attrs")?;
            if sizes.len() != dma_addrs.len() {
                return Err(LineError::BadValue {
                    field: "sizes",
                    value: format!("{} sizes for {} dma_addrs", sizes.len(), dma_addrs.len()),
                });
            }
            Kind::MapSg {
                dma_addrs,
                sizes,
                phys_addrs,
            }
        }
        "dma_unmap_sg" => {
            let phys_addrs = array(need(f, ev, "phys_addrs")?, "phys_addrs", true)?;
            need(f, ev, "attrs")?;
            Kind::UnmapSg { phys_addrs }
        }
        _ => Kind::NoSlot,
    };
    Ok(e)
}

#[cfg(test)]
mod tests;
