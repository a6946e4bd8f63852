//! The boot-info page the host writes at `abi::BOOT_INFO_GPA`: validation and accessors
//! (vCPU count, RAM size, flags, command line).
//!
//! Read fields through [`boot`] one at a time; never copy the whole `BootInfo` (a large struct
//! copy compiles to SSE moves, which fail in emulated mode).

use memconv::abi::{
    BootInfo, BOOT_AREA_END, BOOT_INFO_GPA, BOOT_INFO_MAGIC, BOOT_INFO_VERSION, CMDLINE_MAX,
    DOORBELL_PORT, HUGE_PAGE_SIZE, IMAGE_BASE_GPA, MAILBOX_BASE_GPA, MAX_CPUS, MAX_DEVICES,
    MAX_RAM, MIN_RAM, SERIAL_PORT,
};

/// Check what the runtime relies on. `boot_gpa` is the address the guest was handed in `rdi`;
/// `image_end` the end of the image as linked (the host must have loaded at least that).
pub fn validate(b: &BootInfo, boot_gpa: u64, image_end: u64) -> Result<(), &'static str> {
    if boot_gpa != BOOT_INFO_GPA {
        return Err("boot info not at BOOT_INFO_GPA");
    }
    if b.magic != BOOT_INFO_MAGIC {
        return Err("bad magic");
    }
    if b.version != BOOT_INFO_VERSION {
        return Err("unsupported version");
    }
    if b.cpu_count == 0 || b.cpu_count > MAX_CPUS {
        return Err("bad cpu_count");
    }
    if b.ram_size < MIN_RAM || b.ram_size > MAX_RAM {
        return Err("bad ram_size");
    }
    if b.cmdline_len as usize > CMDLINE_MAX
        || b.cmdline_gpa < BOOT_INFO_GPA
        || b.cmdline_gpa.saturating_add(b.cmdline_len as u64) > BOOT_AREA_END
    {
        return Err("bad cmdline");
    }
    if b.mailbox_gpa != MAILBOX_BASE_GPA || b.doorbell_port != DOORBELL_PORT {
        return Err("mailbox/doorbell differ from the abi constants");
    }
    if b.serial_port != SERIAL_PORT {
        return Err("serial port differs from the abi constant");
    }
    if b.image_start != IMAGE_BASE_GPA || b.image_end < image_end {
        return Err("image bounds do not match the loaded image");
    }
    if !b.free_start.is_multiple_of(HUGE_PAGE_SIZE)
        || b.free_start < b.image_end
        || b.free_start > b.ram_size
    {
        return Err("bad free_start");
    }
    if b.device_count as usize > MAX_DEVICES {
        return Err("bad device_count");
    }
    Ok(())
}

#[cfg(all(feature = "bare-metal", not(test)))]
mod access {
    use super::*;
    use crate::cmdline::Cmdline;
    use memconv::abi::{BOOT_FLAG_HOST_2M, BOOT_FLAG_NATIVE, BOOT_FLAG_PLATFORM_SNP};

    /// The boot info (validated by the runtime before `main` runs).
    pub fn boot() -> &'static BootInfo {
        // SAFETY: the host writes the page before any vCPU starts and nothing writes it
        // afterwards; it is identity mapped and suitably aligned.
        unsafe { &*(BOOT_INFO_GPA as *const BootInfo) }
    }

    /// Number of vCPUs the host started.
    pub fn cpu_count() -> u32 {
        boot().cpu_count
    }

    /// Bytes of guest RAM.
    pub fn ram_size() -> u64 {
        boot().ram_size
    }

    /// Whether the guest runs natively (SSE and `core::fmt` usable).
    pub fn native() -> bool {
        boot().flags & BOOT_FLAG_NATIVE != 0
    }

    /// Whether the host only honours 2 MiB aligned and sized conversions (boot flag).
    pub fn host_2m_flag() -> bool {
        boot().flags & BOOT_FLAG_HOST_2M != 0
    }

    /// Whether the host models SEV-SNP (rescind validation before sharing a page); TDX if
    /// not (boot flag).
    pub fn platform_snp() -> bool {
        boot().flags & BOOT_FLAG_PLATFORM_SNP != 0
    }

    /// The raw command-line bytes.
    pub fn cmdline_bytes() -> &'static [u8] {
        let b = boot();
        // SAFETY: validated to lie inside the boot area, which is RAM and never written after
        // boot.
        unsafe { core::slice::from_raw_parts(b.cmdline_gpa as *const u8, b.cmdline_len as usize) }
    }

    /// The command line (validated as printable ASCII by the runtime before `main`).
    pub fn cmdline() -> Cmdline<'static> {
        Cmdline::new(cmdline_bytes())
    }
}

#[cfg(all(feature = "bare-metal", not(test)))]
pub use access::*;

#[cfg(test)]
mod tests {
    use super::*;
    use memconv::abi::{DeviceInfo, CMDLINE_GPA};

    fn good() -> BootInfo {
        BootInfo {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            cpu_count: 2,
            ram_size: 256 << 20,
            cmdline_gpa: CMDLINE_GPA,
            cmdline_len: 10,
            flags: 0,
            mailbox_gpa: MAILBOX_BASE_GPA,
            doorbell_port: DOORBELL_PORT,
            serial_port: SERIAL_PORT,
            tsc_khz: 0,
            image_start: IMAGE_BASE_GPA,
            image_end: IMAGE_BASE_GPA + (5 << 20),
            free_start: 10 << 20,
            mmio_base: 64 << 30,
            mmio_size: 2 << 20,
            device_count: 0,
            reserved1: 0,
            devices: [DeviceInfo::default(); MAX_DEVICES],
        }
    }

    #[test]
    fn accepts_a_good_one() {
        assert_eq!(
            validate(&good(), BOOT_INFO_GPA, IMAGE_BASE_GPA + 0x1000),
            Ok(())
        );
    }

    #[test]
    fn rejects_bad_fields() {
        let end = IMAGE_BASE_GPA + 0x1000;
        type Edit = fn(&mut BootInfo);
        let cases: Vec<(&str, Edit)> = vec![
            ("magic", |b| b.magic ^= 1),
            ("version", |b| b.version = 2),
            ("cpus0", |b| b.cpu_count = 0),
            ("cpus", |b| b.cpu_count = MAX_CPUS + 1),
            ("ram small", |b| b.ram_size = MIN_RAM - 1),
            ("ram big", |b| b.ram_size = MAX_RAM + 1),
            ("cmdline len", |b| b.cmdline_len = CMDLINE_MAX as u32 + 1),
            ("cmdline gpa", |b| b.cmdline_gpa = BOOT_AREA_END),
            ("mailbox", |b| b.mailbox_gpa = 0),
            ("doorbell", |b| b.doorbell_port = 1),
            ("serial", |b| b.serial_port = 0x2f8),
            ("image start", |b| b.image_start = 0),
            ("image end", |b| b.image_end = IMAGE_BASE_GPA),
            ("free unaligned", |b| b.free_start += 4096),
            ("free before image", |b| b.free_start = 8 << 20),
            ("free past ram", |b| b.free_start = 258 << 20),
            ("devices", |b| b.device_count = MAX_DEVICES as u32 + 1),
        ];
        for (what, f) in cases {
            let mut b = good();
            f(&mut b);
            assert!(validate(&b, BOOT_INFO_GPA, end).is_err(), "{what}");
        }
        assert!(validate(&good(), 0x9000, end).is_err());
        assert!(validate(&good(), BOOT_INFO_GPA, IMAGE_BASE_GPA + (6 << 20)).is_err());
    }
}
