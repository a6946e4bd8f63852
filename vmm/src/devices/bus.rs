//! The device bus: one routing table per address space (port I/O and MMIO) from an address to
//! the device that owns it, so a vCPU routes every port and MMIO exit the same way. A device
//! sees only its offset inside its window; what a write asks the vCPU to do comes back as a
//! [`BusEffect`].

use std::sync::Arc;

/// Errors building the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// A window overlaps one already on the bus, or is empty or wraps around.
    #[error("{space:?} window {base:#x}+{len:#x} overlaps another device or is empty")]
    Overlap {
        /// The address space.
        space: Space,
        /// Window start.
        base: u64,
        /// Window length.
        len: u64,
    },
}

/// An address space of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// x86 I/O ports (`in`/`out`).
    Pio,
    /// Memory-mapped I/O (guest physical addresses with no RAM).
    Mmio,
}

/// What kind of device owns a window (the vCPU counts some kinds separately).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// The serial console.
    Serial,
    /// The memconv doorbell.
    Doorbell,
    /// A virtio-mmio device.
    Virtio,
    /// Anything else.
    Other,
}

/// What a device write asks of the vCPU that made it.
#[derive(Clone, Debug, PartialEq)]
pub enum BusEffect {
    /// Nothing: enter the guest again.
    None,
    /// The guest asked to end with this exit code.
    GuestExit(u64),
    /// The guest reported its pool statistics.
    PoolReport(memconv::stats::PoolReportSnapshot),
    /// The doorbell was rung with a value other than the writing vCPU's index: refused.
    DoorbellRefused,
}

/// A device on the bus.
pub trait BusDevice: Send + Sync {
    /// vCPU `cpu` reads `data.len()` bytes at `offset` in the device's window; false if the
    /// device does not decode reads (the access then counts as one no device owns).
    fn read(&self, cpu: u32, offset: u64, data: &mut [u8]) -> bool;
    /// vCPU `cpu` writes `data` at `offset` in the device's window.
    fn write(&self, cpu: u32, offset: u64, data: &[u8]) -> BusEffect;
}

struct Entry {
    base: u64,
    len: u64,
    kind: DeviceKind,
    dev: Arc<dyn BusDevice>,
}

/// The routing tables of one VM.
#[derive(Default)]
pub struct Bus {
    pio: Vec<Entry>,
    mmio: Vec<Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    fn table(&self, space: Space) -> &[Entry] {
        match space {
            Space::Pio => &self.pio,
            Space::Mmio => &self.mmio,
        }
    }

    /// Puts `dev` at `[base, base + len)` of `space`.
    pub fn insert(
        &mut self,
        space: Space,
        base: u64,
        len: u64,
        kind: DeviceKind,
        dev: Arc<dyn BusDevice>,
    ) -> Result<(), BusError> {
        let overlap = BusError::Overlap { space, base, len };
        let Some(end) = base.checked_add(len).filter(|_| len > 0) else {
            return Err(overlap);
        };
        if self
            .table(space)
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(overlap);
        }
        let table = match space {
            Space::Pio => &mut self.pio,
            Space::Mmio => &mut self.mmio,
        };
        table.push(Entry {
            base,
            len,
            kind,
            dev,
        });
        Ok(())
    }

    fn route(&self, space: Space, addr: u64) -> Option<(&Entry, u64)> {
        self.table(space).iter().find_map(|e| {
            let off = addr.checked_sub(e.base)?;
            (off < e.len).then_some((e, off))
        })
    }

    /// Routes a read; the owner's kind, or None if no device decodes it.
    pub fn read(&self, space: Space, cpu: u32, addr: u64, data: &mut [u8]) -> Option<DeviceKind> {
        let (e, off) = self.route(space, addr)?;
        e.dev.read(cpu, off, data).then_some(e.kind)
    }

    /// Routes a write; the owner's kind and what it asks, or None if no device owns it.
    pub fn write(
        &self,
        space: Space,
        cpu: u32,
        addr: u64,
        data: &[u8],
    ) -> Option<(DeviceKind, BusEffect)> {
        let (e, off) = self.route(space, addr)?;
        Some((e.kind, e.dev.write(cpu, off, data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo;
    impl BusDevice for Echo {
        fn read(&self, _cpu: u32, offset: u64, data: &mut [u8]) -> bool {
            data.fill(offset as u8);
            true
        }
        fn write(&self, _cpu: u32, offset: u64, _data: &[u8]) -> BusEffect {
            BusEffect::GuestExit(offset)
        }
    }

    #[test]
    fn routes_by_window_and_refuses_overlaps() {
        let mut bus = Bus::new();
        bus.insert(Space::Pio, 0x10, 4, DeviceKind::Other, Arc::new(Echo))
            .unwrap();
        assert!(bus
            .insert(Space::Pio, 0x13, 1, DeviceKind::Other, Arc::new(Echo))
            .is_err());
        assert!(bus
            .insert(Space::Pio, 0x20, 0, DeviceKind::Other, Arc::new(Echo))
            .is_err());
        bus.insert(Space::Mmio, 0x13, 1, DeviceKind::Virtio, Arc::new(Echo))
            .unwrap();
        let mut b = [0u8; 2];
        assert_eq!(
            bus.read(Space::Pio, 0, 0x12, &mut b),
            Some(DeviceKind::Other)
        );
        assert_eq!(b, [2, 2]);
        assert_eq!(bus.read(Space::Pio, 0, 0x14, &mut b), None);
        assert_eq!(
            bus.write(Space::Mmio, 0, 0x13, &[1]),
            Some((DeviceKind::Virtio, BusEffect::GuestExit(0)))
        );
        assert_eq!(bus.write(Space::Mmio, 0, 0x14, &[1]), None);
    }
}
