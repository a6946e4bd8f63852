//! The virtio-mmio (version 2) register layout, device status bits, feature bits the driver
//! knows, and [`Regs`], 32-bit register access (volatile MMIO in the guest; each access is a
//! VM exit, so the driver touches registers only to set up and to ring the doorbell).

/// "virt".
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// Magic value register.
pub const MAGIC: usize = 0x000;
/// Version register (2).
pub const VERSION: usize = 0x004;
/// Device id register.
pub const DEVICE_ID: usize = 0x008;
/// Device features (32 bits selected by DEVICE_FEATURES_SEL).
pub const DEVICE_FEATURES: usize = 0x010;
/// Device features word selector.
pub const DEVICE_FEATURES_SEL: usize = 0x014;
/// Driver features (32 bits selected by DRIVER_FEATURES_SEL).
pub const DRIVER_FEATURES: usize = 0x020;
/// Driver features word selector.
pub const DRIVER_FEATURES_SEL: usize = 0x024;
/// Queue selector.
pub const QUEUE_SEL: usize = 0x030;
/// Largest size of the selected queue (0: no such queue).
pub const QUEUE_NUM_MAX: usize = 0x034;
/// Size of the selected queue.
pub const QUEUE_NUM: usize = 0x038;
/// Selected queue ready.
pub const QUEUE_READY: usize = 0x044;
/// The doorbell: write the queue index.
pub const QUEUE_NOTIFY: usize = 0x050;
/// Device status.
pub const STATUS: usize = 0x070;
/// Descriptor table address (low, high).
pub const QUEUE_DESC_LOW: usize = 0x080;
/// See QUEUE_DESC_LOW.
pub const QUEUE_DESC_HIGH: usize = 0x084;
/// Available ring address (low, high).
pub const QUEUE_DRIVER_LOW: usize = 0x090;
/// See QUEUE_DRIVER_LOW.
pub const QUEUE_DRIVER_HIGH: usize = 0x094;
/// Used ring address (low, high).
pub const QUEUE_DEVICE_LOW: usize = 0x0a0;
/// See QUEUE_DEVICE_LOW.
pub const QUEUE_DEVICE_HIGH: usize = 0x0a4;
/// Device configuration space.
pub const CONFIG: usize = 0x100;

/// Status: the guest noticed the device.
pub const S_ACKNOWLEDGE: u32 = 1;
/// Status: the guest has a driver.
pub const S_DRIVER: u32 = 2;
/// Status: the driver is ready.
pub const S_DRIVER_OK: u32 = 4;
/// Status: features negotiated.
pub const S_FEATURES_OK: u32 = 8;
/// Status: the device needs a reset.
pub const S_NEEDS_RESET: u32 = 64;
/// Status: the driver gave up.
pub const S_FAILED: u32 = 128;

/// virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;
/// The device goes through the platform's DMA path (bounce buffers).
pub const F_ACCESS_PLATFORM: u64 = 1 << 33;
/// used_event / avail_event.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// 32-bit access to a device's registers.
pub trait Regs {
    /// Read the register at byte offset `off`.
    fn read32(&self, off: usize) -> u32;
    /// Write the register at byte offset `off`.
    fn write32(&self, off: usize, value: u32);
}

/// A device's register window at a guest physical (= virtual) address.
#[derive(Clone, Copy, Debug)]
pub struct MmioRegs {
    base: u64,
}

impl MmioRegs {
    /// The window at `base`.
    ///
    /// # Safety
    /// `base` is the identity-mapped register window of a virtio-mmio device (or memory that
    /// stands in for one), valid for 4 KiB.
    pub const unsafe fn new(base: u64) -> Self {
        MmioRegs { base }
    }

    /// The window's address.
    pub const fn base(&self) -> u64 {
        self.base
    }
}

impl Regs for MmioRegs {
    fn read32(&self, off: usize) -> u32 {
        let p = (self.base as usize + off) as *const u32;
        // SAFETY: `new`'s contract: the window is mapped; registers are 4-byte aligned.
        unsafe { core::ptr::read_volatile(p) }
    }

    fn write32(&self, off: usize, value: u32) {
        let p = (self.base as usize + off) as *mut u32;
        // SAFETY: as in `read32`.
        unsafe { core::ptr::write_volatile(p, value) }
    }
}
