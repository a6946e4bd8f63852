//! The virtio-mmio transport (virtio 1.x, register layout version 2): the register file, the
//! device-status state machine (reset, feature negotiation, DRIVER_OK, DEVICE_NEEDS_RESET)
//! and the per-queue setup registers, over virtio-queue's [`Queue`]. It decodes register
//! accesses and tells its owner what happened ([`Event`]); the device-specific parts
//! (features, configuration space, activation) belong to the device.
//!
//! Registers are 32 bits wide and must be accessed as such (other widths read as 0 and are
//! ignored on write); the configuration space at 0x100 accepts 1/2/4/8-byte accesses.

use virtio_queue::{Queue, QueueT};

/// "virt".
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Register layout version 2 (virtio 1.x, non-legacy).
pub const VERSION: u32 = 2;
/// Our vendor id: "MCVM".
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"MCVM");

/// Register offsets.
pub mod reg {
    /// Magic value (R).
    pub const MAGIC: u64 = 0x000;
    /// Version (R).
    pub const VERSION: u64 = 0x004;
    /// Device id (R).
    pub const DEVICE_ID: u64 = 0x008;
    /// Vendor id (R).
    pub const VENDOR_ID: u64 = 0x00c;
    /// Device features, 32 bits selected by DEVICE_FEATURES_SEL (R).
    pub const DEVICE_FEATURES: u64 = 0x010;
    /// Device feature word selector (W).
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    /// Driver features, 32 bits selected by DRIVER_FEATURES_SEL (W).
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// Driver feature word selector (W).
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// Queue selector (W).
    pub const QUEUE_SEL: u64 = 0x030;
    /// Largest queue size of the selected queue, 0 if it does not exist (R).
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    /// Size of the selected queue (W).
    pub const QUEUE_NUM: u64 = 0x038;
    /// Selected queue ready (RW).
    pub const QUEUE_READY: u64 = 0x044;
    /// Queue notification: the doorbell (W, value = queue index).
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// Interrupt status (R): always 0, this VM has no interrupts.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// Interrupt acknowledge (W).
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Device status (RW; writing 0 resets).
    pub const STATUS: u64 = 0x070;
    /// Descriptor table address, low/high (W).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    /// See QUEUE_DESC_LOW.
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    /// Driver (available) ring address, low/high (W).
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    /// See QUEUE_DRIVER_LOW.
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    /// Device (used) ring address, low/high (W).
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    /// See QUEUE_DEVICE_LOW.
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    /// Configuration generation (R).
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    /// Start of the device configuration space.
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
pub mod status {
    /// The guest found the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready: the device may use its queues.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation done.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up.
    pub const FAILED: u32 = 128;
}

/// Feature bit: virtio 1.x.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the device accesses memory through the platform's DMA path (bounce buffers in
/// a confidential VM).
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Feature bit: used_event / avail_event notification suppression.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// What a register access asks the owner to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Nothing beyond the register update.
    None,
    /// The driver wrote QueueNotify for this queue.
    Notify(u32),
    /// The driver set DRIVER_OK: validate and start the queues.
    DriverOk,
    /// The driver wrote 0 to the status: everything is back to its initial state.
    Reset,
}

/// The transport's register state and queues.
pub struct MmioTransport {
    device_id: u32,
    device_features: u64,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    /// The queues (index = queue number).
    pub queues: Vec<Queue>,
}

fn read_u32(data: &[u8]) -> Option<u32> {
    <[u8; 4]>::try_from(data).ok().map(u32::from_le_bytes)
}

impl MmioTransport {
    /// A transport for device `device_id` offering `features`, with `num_queues` queues of at
    /// most `max_queue_size` entries (a power of two, at most 32768).
    pub fn new(
        device_id: u32,
        features: u64,
        num_queues: usize,
        max_queue_size: u16,
    ) -> Result<Self, virtio_queue::Error> {
        let queues = (0..num_queues)
            .map(|_| Queue::new(max_queue_size))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(MmioTransport {
            device_id,
            device_features: features | 1 << VIRTIO_F_VERSION_1,
            driver_features: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            queues,
        })
    }

    /// Device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver accepted (meaningful once FEATURES_OK is set).
    pub fn driver_features(&self) -> u64 {
        self.driver_features
    }

    /// Whether the driver accepted feature `bit`.
    pub fn has_feature(&self, bit: u32) -> bool {
        bit < 64 && self.driver_features & (1 << bit) != 0
    }

    /// Whether the device is live (DRIVER_OK set, no reset needed, not failed).
    pub fn active(&self) -> bool {
        self.status & status::DRIVER_OK != 0
            && self.status & (status::DEVICE_NEEDS_RESET | status::FAILED) == 0
    }

    /// Raise DEVICE_NEEDS_RESET: the device stops using its queues until the driver resets it.
    pub fn set_needs_reset(&mut self) {
        if self.status & status::DRIVER_OK != 0 {
            self.status |= status::DEVICE_NEEDS_RESET;
            self.config_generation = self.config_generation.wrapping_add(1);
        }
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Whether queue registers may be written now (after FEATURES_OK, before DRIVER_OK).
    fn queue_setup_allowed(&self) -> bool {
        self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0
    }

    /// Reads a register (offset < `reg::CONFIG`); non-32-bit accesses read 0.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if data.len() != 4 {
            return;
        }
        let value = match offset {
            reg::MAGIC => MAGIC_VALUE,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_id,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device_features as u32,
                1 => (self.device_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => 0,
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// Writes a register (offset < `reg::CONFIG`); non-32-bit accesses are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Event {
        let Some(v) = read_u32(data) else {
            return Event::None;
        };
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (v as u64) << 32
                    }
                    _ => {}
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NOTIFY => return Event::Notify(v),
            reg::INTERRUPT_ACK => {}
            reg::STATUS => return self.write_status(v),
            reg::QUEUE_NUM
            | reg::QUEUE_READY
            | reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_DRIVER_LOW
            | reg::QUEUE_DRIVER_HIGH
            | reg::QUEUE_DEVICE_LOW
            | reg::QUEUE_DEVICE_HIGH => {
                if !self.queue_setup_allowed() {
                    return Event::None;
                }
                let Some(q) = self.selected_queue() else {
                    return Event::None;
                };
                match offset {
                    reg::QUEUE_NUM => {
                        if let Ok(size) = u16::try_from(v) {
                            // An invalid size (not a power of two, too big) leaves the queue
                            // unusable: is_valid fails at DRIVER_OK.
                            let _ = q.try_set_size(size);
                        }
                    }
                    reg::QUEUE_READY => q.set_ready(v == 1),
                    reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
                    reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
                    reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
                    reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
                    reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
                    _ => q.set_used_ring_address(None, Some(v)),
                }
            }
            _ => {}
        }
        Event::None
    }

    fn write_status(&mut self, v: u32) -> Event {
        if v == 0 {
            self.reset();
            return Event::Reset;
        }
        let old = self.status;
        // Bits the driver may not clear without a reset stay set.
        let mut new = v | (old & status::DEVICE_NEEDS_RESET);
        if new & status::FEATURES_OK != 0 && old & status::FEATURES_OK == 0 {
            let ok = self.driver_features & !self.device_features == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if !ok {
                // The driver reads FEATURES_OK back and finds it clear: negotiation failed.
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && new & status::FEATURES_OK == 0 {
            // DRIVER_OK without successful negotiation: refuse to go live.
            new &= !status::DRIVER_OK;
            new |= status::FAILED;
        }
        self.status = new;
        if new & status::DRIVER_OK != 0 && old & status::DRIVER_OK == 0 {
            let event_idx = self.has_feature(VIRTIO_RING_F_EVENT_IDX);
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            return Event::DriverOk;
        }
        Event::None
    }

    /// Back to the initial state (status 0, queues reset).
    pub fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.config_generation = self.config_generation.wrapping_add(1);
        for q in &mut self.queues {
            q.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rd(t: &MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) -> Event {
        t.write(off, &v.to_le_bytes())
    }

    #[test]
    fn identification_and_features() {
        let t = MmioTransport::new(2, 1 << 9, 2, 256).unwrap();
        assert_eq!(rd(&t, reg::MAGIC), MAGIC_VALUE);
        assert_eq!(rd(&t, reg::VERSION), 2);
        assert_eq!(rd(&t, reg::DEVICE_ID), 2);
        assert_eq!(rd(&t, reg::DEVICE_FEATURES), 1 << 9);
        let mut t = t;
        wr(&mut t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&t, reg::DEVICE_FEATURES), 1);
        // Odd widths read zero.
        let mut b = [0xffu8; 2];
        t.read(reg::MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
    }

    #[test]
    fn negotiation_refuses_unknown_features_and_legacy_drivers() {
        let mut t = MmioTransport::new(2, 1 << 9, 1, 256).unwrap();
        wr(&mut t, reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        // No VERSION_1: FEATURES_OK does not stick.
        wr(&mut t, reg::DRIVER_FEATURES, 1 << 9);
        wr(&mut t, reg::STATUS, 3 | status::FEATURES_OK);
        assert_eq!(rd(&t, reg::STATUS) & status::FEATURES_OK, 0);
        wr(&mut t, reg::STATUS, 0);
        wr(&mut t, reg::STATUS, 3);
        wr(&mut t, reg::DRIVER_FEATURES, 1 << 10);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::STATUS, 3 | status::FEATURES_OK);
        assert_eq!(rd(&t, reg::STATUS) & status::FEATURES_OK, 0);
        // DRIVER_OK without FEATURES_OK fails the device.
        assert_eq!(wr(&mut t, reg::STATUS, 3 | status::DRIVER_OK), Event::None);
        assert_ne!(rd(&t, reg::STATUS) & status::FAILED, 0);
        assert!(!t.active());
    }

    #[test]
    fn queue_setup_and_driver_ok() {
        let mut t = MmioTransport::new(2, 0, 2, 256).unwrap();
        wr(&mut t, reg::STATUS, 3);
        wr(&mut t, reg::DRIVER_FEATURES_SEL, 1);
        wr(&mut t, reg::DRIVER_FEATURES, 1);
        wr(&mut t, reg::STATUS, 3 | status::FEATURES_OK);
        assert_ne!(rd(&t, reg::STATUS) & status::FEATURES_OK, 0);
        wr(&mut t, reg::QUEUE_SEL, 1);
        assert_eq!(rd(&t, reg::QUEUE_NUM_MAX), 256);
        wr(&mut t, reg::QUEUE_NUM, 64);
        wr(&mut t, reg::QUEUE_DESC_LOW, 0x1000);
        wr(&mut t, reg::QUEUE_DESC_HIGH, 1);
        wr(&mut t, reg::QUEUE_READY, 1);
        assert_eq!(rd(&t, reg::QUEUE_READY), 1);
        assert_eq!(t.queues[1].size(), 64);
        assert_eq!(t.queues[1].desc_table(), 0x1_0000_1000);
        wr(&mut t, reg::QUEUE_SEL, 7);
        assert_eq!(rd(&t, reg::QUEUE_NUM_MAX), 0);
        assert_eq!(wr(&mut t, reg::QUEUE_NOTIFY, 1), Event::Notify(1));
        assert_eq!(wr(&mut t, reg::STATUS, 0xf), Event::DriverOk);
        assert!(t.active());
        // Queue registers are frozen once live.
        wr(&mut t, reg::QUEUE_SEL, 1);
        wr(&mut t, reg::QUEUE_NUM, 32);
        assert_eq!(t.queues[1].size(), 64);
        t.set_needs_reset();
        assert!(!t.active());
        assert_ne!(rd(&t, reg::STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(wr(&mut t, reg::STATUS, 0), Event::Reset);
        assert_eq!(rd(&t, reg::STATUS), 0);
        assert!(!t.queues[1].ready());
    }
}
