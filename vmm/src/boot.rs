//! 64-bit boot of the guest: validating and loading its ELF image (and zeroing .bss), the
//! identity page tables, the GDT, the boot-info page and command line, and the initial vCPU
//! registers. Everything is written into private guest memory before the first KVM_RUN; the
//! layout is `memconv::abi`'s.

use std::io::Cursor;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
use linux_loader::loader::{Elf, KernelLoader};
use memconv::abi::{self, BootInfo, DeviceInfo};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

/// Errors while preparing guest memory for boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The image is not a 64-bit little-endian x86-64 executable ELF.
    #[error("the guest image is not an x86-64 ELF executable: {0}")]
    NotElf(&'static str),
    /// A loadable segment lies outside guest RAM or below the image base.
    #[error(
        "the guest image does not fit in RAM: segment at {start:#x}..{end:#x} must lie in \
         {base:#x}..{ram:#x} (raise --mem or link the guest at {base:#x})"
    )]
    DoesNotFit {
        /// Segment start.
        start: u64,
        /// Segment end.
        end: u64,
        /// Lowest address a segment may use (the image base).
        base: u64,
        /// RAM size.
        ram: u64,
    },
    /// linux-loader refused the image.
    #[error("loading the guest ELF failed: {0}")]
    Load(#[from] linux_loader::loader::Error),
    /// Writing guest memory failed.
    #[error("writing guest memory at {gpa:#x} failed: {source}")]
    Memory {
        /// Where the write went.
        gpa: u64,
        /// What failed.
        source: vm_memory::GuestMemoryError,
    },
}

/// Where the image landed.
#[derive(Clone, Copy, Debug)]
pub struct LoadedImage {
    /// ELF entry point.
    pub entry: u64,
    /// Lowest loaded address.
    pub start: u64,
    /// One past the highest loaded byte, including .bss.
    pub end: u64,
}

// Page-table entry bits.
const PTE_PRESENT: u64 = 1 << 0;
const PTE_WRITE: u64 = 1 << 1;
/// U/S=1 at every level: kvm_pvm's native mode requires it.
const PTE_USER: u64 = 1 << 2;
const PTE_PWT: u64 = 1 << 3;
const PTE_PCD: u64 = 1 << 4;
const PTE_HUGE: u64 = 1 << 7;
const TABLE_FLAGS: u64 = PTE_PRESENT | PTE_WRITE | PTE_USER;

// Control-register and EFER bits.
const CR0_PE: u64 = 1 << 0;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// GDT: null, 64-bit code (selector 0x8), data (selector 0x10).
const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
const CODE_SELECTOR: u16 = 0x8;
const DATA_SELECTOR: u16 = 0x10;
const GIB: u64 = 1 << 30;

fn write_obj<T: ByteValued>(mem: &GuestMemoryMmap, gpa: u64, value: T) -> Result<(), BootError> {
    mem.write_obj(value, GuestAddress(gpa))
        .map_err(|source| BootError::Memory { gpa, source })
}

/// Checks the ELF header and program headers before anything is written, so that a bad image
/// gets a precise error rather than a partial load.
fn validate_elf(image: &[u8], ram_size: u64) -> Result<Vec<Elf64_Phdr>, BootError> {
    let mut ehdr = Elf64_Ehdr::default();
    let ehdr_len = std::mem::size_of::<Elf64_Ehdr>();
    if image.len() < ehdr_len {
        return Err(BootError::NotElf("file shorter than an ELF header"));
    }
    ehdr.as_mut_slice().copy_from_slice(&image[..ehdr_len]);
    if ehdr.e_ident[..4] != *b"\x7fELF" {
        return Err(BootError::NotElf("no ELF magic"));
    }
    if ehdr.e_ident[4] != 2 || ehdr.e_ident[5] != 1 {
        return Err(BootError::NotElf("not a 64-bit little-endian ELF"));
    }
    if ehdr.e_machine != 62 {
        return Err(BootError::NotElf("machine is not x86-64"));
    }
    if ehdr.e_type != 2 {
        return Err(BootError::NotElf(
            "not an executable (ET_EXEC); link it static, no PIE",
        ));
    }
    let phdr_len = std::mem::size_of::<Elf64_Phdr>();
    if usize::from(ehdr.e_phentsize) != phdr_len {
        return Err(BootError::NotElf("unexpected program header size"));
    }
    let mut phdrs = Vec::with_capacity(usize::from(ehdr.e_phnum));
    for i in 0..usize::from(ehdr.e_phnum) {
        let off = usize::try_from(ehdr.e_phoff)
            .ok()
            .and_then(|o| o.checked_add(i * phdr_len))
            .ok_or(BootError::NotElf("program headers out of the file"))?;
        let bytes = image
            .get(off..off + phdr_len)
            .ok_or(BootError::NotElf("program headers out of the file"))?;
        let mut phdr = Elf64_Phdr::default();
        phdr.as_mut_slice().copy_from_slice(bytes);
        if phdr.p_type != PT_LOAD || phdr.p_memsz == 0 {
            continue;
        }
        let end = phdr.p_paddr.checked_add(phdr.p_memsz);
        let file_end = phdr.p_offset.checked_add(phdr.p_filesz);
        if phdr.p_filesz > phdr.p_memsz || file_end.is_none_or(|e| e > image.len() as u64) {
            return Err(BootError::NotElf(
                "segment extends past the end of the file",
            ));
        }
        match end {
            Some(end) if phdr.p_paddr >= abi::IMAGE_BASE_GPA && end <= ram_size => {}
            _ => {
                return Err(BootError::DoesNotFit {
                    start: phdr.p_paddr,
                    end: end.unwrap_or(u64::MAX),
                    base: abi::IMAGE_BASE_GPA,
                    ram: ram_size,
                })
            }
        }
        phdrs.push(phdr);
    }
    if phdrs.is_empty() {
        return Err(BootError::NotElf("no loadable segment"));
    }
    let entry_ok = phdrs
        .iter()
        .any(|p| ehdr.e_entry >= p.p_paddr && ehdr.e_entry < p.p_paddr + p.p_memsz);
    if !entry_ok {
        return Err(BootError::NotElf(
            "entry point outside every loadable segment",
        ));
    }
    Ok(phdrs)
}

/// One past the last byte the image occupies once loaded (validated as for loading).
pub fn image_end(image: &[u8], ram_size: u64) -> Result<u64, BootError> {
    let phdrs = validate_elf(image, ram_size)?;
    Ok(phdrs
        .iter()
        .map(|p| p.p_paddr + p.p_memsz)
        .max()
        .unwrap_or(abi::IMAGE_BASE_GPA))
}

/// Validates, loads (linux-loader) and zeroes the .bss of the guest image.
pub fn load_image(
    mem: &GuestMemoryMmap,
    image: &[u8],
    ram_size: u64,
) -> Result<LoadedImage, BootError> {
    let phdrs = validate_elf(image, ram_size)?;
    let loaded = Elf::load(
        mem,
        None,
        &mut Cursor::new(image),
        Some(GuestAddress(abi::IMAGE_BASE_GPA)),
    )?;
    let mut start = u64::MAX;
    let mut end = 0;
    for phdr in &phdrs {
        // linux-loader copies p_filesz bytes; the rest of the segment (.bss) must read zero.
        let bss_start = phdr.p_paddr + phdr.p_filesz;
        let bss_len = phdr.p_memsz - phdr.p_filesz;
        if bss_len > 0 {
            let zeros = vec![0u8; usize::try_from(bss_len).unwrap_or(usize::MAX)];
            mem.write_slice(&zeros, GuestAddress(bss_start))
                .map_err(|source| BootError::Memory {
                    gpa: bss_start,
                    source,
                })?;
        }
        start = start.min(phdr.p_paddr);
        end = end.max(phdr.p_paddr + phdr.p_memsz);
    }
    Ok(LoadedImage {
        entry: loaded.kernel_load.0,
        start,
        end,
    })
}

/// Writes identity page tables over all RAM (2 MiB pages) plus the MMIO window, and the GDT.
pub fn write_page_tables(mem: &GuestMemoryMmap, ram_size: u64) -> Result<(), BootError> {
    write_obj(mem, abi::PML4_GPA, abi::PDPT_GPA | TABLE_FLAGS)?;
    let gibs = ram_size.div_ceil(GIB);
    for g in 0..gibs {
        let pd = abi::PD_BASE_GPA + g * 4096;
        write_obj(mem, abi::PDPT_GPA + g * 8, pd | TABLE_FLAGS)?;
        let chunks = ((ram_size - g * GIB).min(GIB)) / abi::HUGE_PAGE_SIZE;
        let entries: Vec<u8> = (0..chunks)
            .flat_map(|i| {
                ((g * GIB + i * abi::HUGE_PAGE_SIZE) | TABLE_FLAGS | PTE_HUGE).to_le_bytes()
            })
            .collect();
        mem.write_slice(&entries, GuestAddress(pd))
            .map_err(|source| BootError::Memory { gpa: pd, source })?;
    }
    // The MMIO window: its own page directory, uncached.
    let mmio_g = abi::MMIO_BASE_GPA / GIB;
    let mmio_pd = abi::PD_BASE_GPA + mmio_g * 4096;
    write_obj(mem, abi::PDPT_GPA + mmio_g * 8, mmio_pd | TABLE_FLAGS)?;
    write_obj(
        mem,
        mmio_pd,
        abi::MMIO_BASE_GPA | TABLE_FLAGS | PTE_HUGE | PTE_PCD | PTE_PWT,
    )?;
    write_obj(mem, abi::GDT_GPA, GDT)?;
    Ok(())
}

/// Everything the boot-info page needs from the VMM.
pub struct BootInfoParams<'a> {
    /// Number of vCPUs.
    pub cpus: u32,
    /// Guest RAM size.
    pub ram_size: u64,
    /// The guest command line.
    pub cmdline: &'a str,
    /// `abi::BOOT_FLAG_*`.
    pub flags: u32,
    /// Where the image landed.
    pub image: LoadedImage,
    /// Devices in the MMIO window.
    pub devices: &'a [DeviceInfo],
    /// TSC frequency in kHz, 0 if unknown.
    pub tsc_khz: u32,
    /// End of host-filled regions after the image (the replay op stream), 0 if none:
    /// `free_start` comes after it.
    pub reserved_end: u64,
}

/// Writes the boot-info page and the command line.
pub fn write_boot_info(mem: &GuestMemoryMmap, p: &BootInfoParams<'_>) -> Result<(), BootError> {
    let mut devices = [DeviceInfo::default(); abi::MAX_DEVICES];
    for (slot, dev) in devices.iter_mut().zip(p.devices) {
        *slot = *dev;
    }
    let info = BootInfo {
        magic: abi::BOOT_INFO_MAGIC,
        version: abi::BOOT_INFO_VERSION,
        cpu_count: p.cpus,
        ram_size: p.ram_size,
        cmdline_gpa: abi::CMDLINE_GPA,
        cmdline_len: p.cmdline.len() as u32,
        flags: p.flags,
        mailbox_gpa: abi::MAILBOX_BASE_GPA,
        doorbell_port: abi::DOORBELL_PORT,
        serial_port: abi::SERIAL_PORT,
        tsc_khz: p.tsc_khz,
        image_start: p.image.start,
        image_end: p.image.end,
        free_start: p
            .image
            .end
            .max(p.reserved_end)
            .next_multiple_of(abi::HUGE_PAGE_SIZE),
        mmio_base: abi::MMIO_BASE_GPA,
        mmio_size: abi::MMIO_SIZE,
        device_count: p.devices.len().min(abi::MAX_DEVICES) as u32,
        reserved1: 0,
        devices,
    };
    let bytes = boot_info_bytes(&info);
    mem.write_slice(bytes, GuestAddress(abi::BOOT_INFO_GPA))
        .map_err(|source| BootError::Memory {
            gpa: abi::BOOT_INFO_GPA,
            source,
        })?;
    mem.write_slice(p.cmdline.as_bytes(), GuestAddress(abi::CMDLINE_GPA))
        .map_err(|source| BootError::Memory {
            gpa: abi::CMDLINE_GPA,
            source,
        })
}

fn boot_info_bytes(info: &BootInfo) -> &[u8] {
    // SAFETY: BootInfo is repr(C), made only of integers and arrays of repr(C) integer structs
    // with explicit reserved fields; viewing it as bytes for copying into guest memory is sound.
    unsafe {
        std::slice::from_raw_parts(
            (info as *const BootInfo).cast::<u8>(),
            std::mem::size_of::<BootInfo>(),
        )
    }
}

fn segment(selector: u16, code: bool) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: 0,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts `sregs` in 64-bit long mode with paging on the boot page tables.
pub fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = segment(CODE_SELECTOR, true);
    let data = segment(DATA_SELECTOR, false);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = abi::GDT_GPA;
    sregs.gdt.limit = (std::mem::size_of_val(&GDT) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = abi::PML4_GPA;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// The general registers at entry: rip = entry, rdi = boot info, rsi = vCPU index.
pub fn entry_regs(entry: u64, cpu: u32) -> kvm_regs {
    kvm_regs {
        rip: entry,
        rdi: abi::BOOT_INFO_GPA,
        rsi: u64::from(cpu),
        rflags: 0x2,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal_elf(paddr: u64, filesz: u64, memsz: u64) -> Vec<u8> {
        let mut ehdr = Elf64_Ehdr::default();
        ehdr.e_ident[..4].copy_from_slice(b"\x7fELF");
        ehdr.e_ident[4] = 2;
        ehdr.e_ident[5] = 1;
        ehdr.e_ident[6] = 1;
        ehdr.e_type = 2;
        ehdr.e_machine = 62;
        ehdr.e_version = 1;
        ehdr.e_entry = paddr;
        ehdr.e_phoff = 64;
        ehdr.e_ehsize = 64;
        ehdr.e_phentsize = 56;
        ehdr.e_phnum = 1;
        let phdr = Elf64_Phdr {
            p_type: PT_LOAD,
            p_flags: 5,
            p_offset: 0x1000,
            p_vaddr: paddr,
            p_paddr: paddr,
            p_filesz: filesz,
            p_memsz: memsz,
            p_align: 0x1000,
        };
        let mut image = vec![0u8; 0x1000 + filesz as usize];
        image[..64].copy_from_slice(ehdr.as_slice());
        image[64..120].copy_from_slice(phdr.as_slice());
        for (i, b) in image[0x1000..].iter_mut().enumerate() {
            *b = (i as u8) | 1;
        }
        image
    }

    fn memory(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size as usize)]).unwrap()
    }

    #[test]
    fn loads_segments_and_zeroes_bss() {
        let ram = 16 << 20;
        let mem = memory(ram);
        // Dirty the would-be .bss first: the loader must zero it.
        mem.write_slice(&[0xee; 64], GuestAddress(abi::IMAGE_BASE_GPA + 0x100))
            .unwrap();
        let image = minimal_elf(abi::IMAGE_BASE_GPA, 0x100, 0x2000);
        let loaded = load_image(&mem, &image, ram).unwrap();
        assert_eq!(loaded.entry, abi::IMAGE_BASE_GPA);
        assert_eq!(loaded.end, abi::IMAGE_BASE_GPA + 0x2000);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, GuestAddress(abi::IMAGE_BASE_GPA + 0x100))
            .unwrap();
        assert_eq!(buf, [0u8; 64]);
        let first: u8 = mem.read_obj(GuestAddress(abi::IMAGE_BASE_GPA)).unwrap();
        assert_eq!(first, 1);
    }

    #[test]
    fn rejects_non_elf_and_misplaced_images() {
        let ram = 16 << 20;
        let mem = memory(ram);
        assert!(matches!(
            load_image(&mem, b"#!/bin/sh\necho hi\n", ram),
            Err(BootError::NotElf(_))
        ));
        let below_base = minimal_elf(0x1000, 0x100, 0x100);
        assert!(matches!(
            load_image(&mem, &below_base, ram),
            Err(BootError::DoesNotFit { .. })
        ));
        let too_big = minimal_elf(abi::IMAGE_BASE_GPA, 0x100, 32 << 20);
        assert!(matches!(
            load_image(&mem, &too_big, ram),
            Err(BootError::DoesNotFit { .. })
        ));
    }

    #[test]
    fn page_tables_identity_map_ram_with_user_bit() {
        let ram = 3 * GIB / 2;
        let mem = memory(4 << 20);
        write_page_tables(&mem, ram).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(abi::PML4_GPA)).unwrap();
        assert_eq!(pml4, abi::PDPT_GPA | TABLE_FLAGS);
        let pdpt1: u64 = mem.read_obj(GuestAddress(abi::PDPT_GPA + 8)).unwrap();
        assert_eq!(pdpt1, (abi::PD_BASE_GPA + 4096) | TABLE_FLAGS);
        // GiB 1 holds 256 chunks (0.5 GiB): entry 255 mapped, entry 256 not.
        let last: u64 = mem
            .read_obj(GuestAddress(abi::PD_BASE_GPA + 4096 + 255 * 8))
            .unwrap();
        assert_eq!(
            last,
            (GIB + 255 * abi::HUGE_PAGE_SIZE) | TABLE_FLAGS | PTE_HUGE
        );
        let unmapped: u64 = mem
            .read_obj(GuestAddress(abi::PD_BASE_GPA + 4096 + 256 * 8))
            .unwrap();
        assert_eq!(unmapped, 0);
    }
}
