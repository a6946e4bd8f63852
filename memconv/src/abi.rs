//! The guest <-> host wire contract (`no_std`): guest physical layout, the boot-info page, the
//! per-vCPU mailbox and its doorbell, request codes, attribute bits and error codes.
//!
//! # Guest physical layout
//!
//! ```text
//! 0x0000_0000  chunk 0 (2 MiB), private, never convertible ("boot area"):
//!              0x1000 PML4, 0x2000 PDPT, 0x3000 GDT, 0x8000 BootInfo, 0x9000 cmdline (4 KiB),
//!              0x10000.. page directories (one 4 KiB page per GiB of RAM, up to 64),
//!              0x80000.. one spare page per vCPU for the kvm_pvm native-mode MSR (host only).
//! 0x0020_0000  chunk 1 (2 MiB), shared from boot, never convertible: vCPU i's mailbox page at
//!              MAILBOX_BASE_GPA + i * 4096.
//! 0x0040_0000  the guest image (ELF linked here), then RAM up to `ram_size`; private at boot.
//!              `BootInfo::free_start` (2 MiB aligned, after the image) starts allocatable RAM.
//! 64 GiB       MMIO window (`MMIO_BASE_GPA`, `MMIO_SIZE`): devices, never RAM.
//! ```
//!
//! # Entry
//!
//! Every vCPU enters the image's ELF entry point in 64-bit long mode with paging on (identity
//! map of RAM and the MMIO window, 2 MiB pages, U/S=1 at every level), interrupts off,
//! `rdi` = `BOOT_INFO_GPA`, `rsi` = the vCPU index (0 is the boot vCPU), `rsp` = 0 (the guest
//! sets up its own stack).
//!
//! # Requests (mailbox + doorbell)
//!
//! vCPU i owns the shared page `MAILBOX_BASE_GPA + i * 4096`: a [`MailboxHeader`] followed by
//! up to [`MAILBOX_MAX_ENTRIES`] [`MailboxEntry`] (for `OP_CONVERT` / `OP_ACCEPT`) or a
//! payload (for `OP_REPORT`). The guest fills it, then writes its vCPU index (u32) to
//! `DOORBELL_PORT`; the host checks that value: any other (another vCPU's index, an index out of
//! range) is refused without touching any mailbox and counted (`doorbell_mismatch`). The host processes entries `cur_entry..end_entry`, writes each entry's
//! `status`, advances `cur_entry` past the entries it processed and sets the header `status`
//! (`STATUS_OK`, or the first error). The host may stop before `end_entry`; the guest rings
//! again until `cur_entry == end_entry`. One doorbell can carry up to 169 ranges.
//!
//! `OP_CONVERT` entries mirror KVM_HC_MAP_GPA_RANGE: `npages` counts 4 KiB pages, `attrs` bit 4
//! set = to private ("encrypted"), clear = to shared; bits 0..3 = page size hint (0 4K, 1 2M,
//! 2 1G). `OP_ACCEPT` entries: `gpa`/`npages` in 4 KiB pages, 4 KiB aligned, private pages
//! only; `attrs` 0 (accept) or `ACCEPT_FLAG_RESCIND` (rescind). See "Acceptance" below. `OP_EXIT`: `arg` is the exit code. `OP_REPORT`: `arg` is the payload length and
//! the payload (a [`PoolReport`]) follows the header.
//!
//! # Acceptance (`BOOT_FLAG_PLATFORM_SNP` clear: TDX, set: SEV-SNP)
//!
//! Private RAM after the image starts unaccepted: it has no host backing and is not in the
//! guest's memslots, so a touch stops the VM (the host counts an `unaccepted_access`). The
//! boot area and the image are accepted by the host before the first instruction. An ACCEPT
//! of private, unaccepted pages makes them usable (the host backs them; they read zero);
//! accepting an accepted page is `ERR_DOUBLE_ACCEPT`, a shared one `ERR_ACCEPT_SHARED`.
//! A conversion to shared drops acceptance (TDX) or is refused with `ERR_MUST_RESCIND` while
//! a page is still validated (SNP: rescind first). A page converted back to private is
//! unaccepted again on both: the guest accepts it again (not a double accept).

/// Size of a small (base) page.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a huge page / conversion chunk.
pub const HUGE_PAGE_SIZE: u64 = 2 << 20;
/// 4 KiB pages per 2 MiB chunk.
pub const PAGES_PER_CHUNK: u64 = HUGE_PAGE_SIZE / PAGE_SIZE;

/// Guest physical address of the level-4 page table.
pub const PML4_GPA: u64 = 0x1000;
/// Guest physical address of the (single) page-directory-pointer table.
pub const PDPT_GPA: u64 = 0x2000;
/// Guest physical address of the GDT the host installs.
pub const GDT_GPA: u64 = 0x3000;
/// Guest physical address of the [`BootInfo`] page.
pub const BOOT_INFO_GPA: u64 = 0x8000;
/// Guest physical address of the NUL-free command line (length in [`BootInfo`]).
pub const CMDLINE_GPA: u64 = 0x9000;
/// Longest command line, in bytes.
pub const CMDLINE_MAX: usize = 4096;
/// First page directory; page directory `g` maps GiB `g` (g < 64), `PD_BASE_GPA + g * 4096`.
pub const PD_BASE_GPA: u64 = 0x10000;
/// Spare pages the host hands to kvm_pvm for native execution, one per vCPU.
pub const PVM_SPARE_BASE_GPA: u64 = 0x80000;
/// Most vCPUs a VM can have (bounded by the spare-page and mailbox areas).
pub const MAX_CPUS: u32 = 64;
/// End of the boot area (chunk 0), which is never convertible.
pub const BOOT_AREA_END: u64 = HUGE_PAGE_SIZE;
/// Base of the per-vCPU mailbox pages (chunk 1, shared from boot, never convertible).
pub const MAILBOX_BASE_GPA: u64 = HUGE_PAGE_SIZE;
/// End of the mailbox chunk.
pub const MAILBOX_AREA_END: u64 = 2 * HUGE_PAGE_SIZE;
/// Where the guest image is linked and loaded.
pub const IMAGE_BASE_GPA: u64 = 2 * HUGE_PAGE_SIZE;
/// Smallest guest RAM: boot area, mailbox chunk and room for an image.
pub const MIN_RAM: u64 = 16 << 20;
/// Largest guest RAM (RAM must end below the MMIO window).
pub const MAX_RAM: u64 = 64 << 30;
/// Base of the device MMIO window.
pub const MMIO_BASE_GPA: u64 = 64 << 30;
/// Size of the device MMIO window (one identity-mapped 2 MiB page).
pub const MMIO_SIZE: u64 = HUGE_PAGE_SIZE;

/// I/O port the guest writes its vCPU index to after filling its mailbox.
pub const DOORBELL_PORT: u16 = 0x510;
/// I/O port of the 16550 serial console (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;

/// `BootInfo::magic`: "MCBOOT01".
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"MCBOOT01");
/// Current `BootInfo::version`.
pub const BOOT_INFO_VERSION: u32 = 1;
/// `BootInfo::flags`: the guest runs natively (hardware speed, SSE usable); when clear, it runs
/// in KVM's instruction emulator and must not execute SSE instructions.
pub const BOOT_FLAG_NATIVE: u32 = 1 << 0;
/// `BootInfo::flags`: the host only honours 2 MiB aligned and sized conversions.
pub const BOOT_FLAG_HOST_2M: u32 = 1 << 1;
/// `BootInfo::flags`: the host models SEV-SNP (rescind validation with
/// [`ACCEPT_FLAG_RESCIND`] before converting a page to shared); when clear, TDX.
pub const BOOT_FLAG_PLATFORM_SNP: u32 = 1 << 2;

/// Most devices listed in [`BootInfo::devices`].
pub const MAX_DEVICES: usize = 8;
/// `rax` at a `hlt` that asks to wait, not to stop ("WAIT"): the host blocks the vCPU until
/// a device completes a request, a vCPU stops for good, the VM ends, the shared 32-bit word at
/// GPA `rbx` (4-byte aligned; 0: none) no longer holds `ecx`, or `rdx` microseconds pass (at
/// most [`HLT_WAIT_MAX_US`]); then the guest resumes after its `hlt`. Any other `rax`: the vCPU
/// is done and halts until the VM ends.
pub const HLT_WAIT_MAGIC: u64 = u32::from_le_bytes(*b"WAIT") as u64;
/// Longest `hlt` wait the host honours, in microseconds.
pub const HLT_WAIT_MAX_US: u64 = 100_000;

/// `DeviceInfo::kind` of an unused slot.
pub const DEVICE_NONE: u32 = 0;
/// `DeviceInfo::kind` of a virtio-mmio device.
pub const DEVICE_VIRTIO_MMIO: u32 = 1;
/// `DeviceInfo::kind` of the replay op stream (`vmm replay`): not a device but a host-filled
/// region of guest RAM, `[mmio_gpa, mmio_gpa + mmio_len)`, below `BootInfo::free_start`,
/// holding a [`crate::replay_ops`] stream.
pub const DEVICE_REPLAY_STREAM: u32 = 2;

/// A device the host exposes in the MMIO window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    /// `DEVICE_*`.
    pub kind: u32,
    /// Device-specific (virtio: the device id, 2 = block).
    pub id: u32,
    /// Guest physical address of its registers.
    pub mmio_gpa: u64,
    /// Size of its register window.
    pub mmio_len: u64,
}

/// The boot-info page the host writes at [`BOOT_INFO_GPA`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// Number of vCPUs started.
    pub cpu_count: u32,
    /// Bytes of guest RAM, from GPA 0.
    pub ram_size: u64,
    /// Guest physical address of the command line.
    pub cmdline_gpa: u64,
    /// Length of the command line in bytes.
    pub cmdline_len: u32,
    /// `BOOT_FLAG_*`.
    pub flags: u32,
    /// Guest physical address of vCPU 0's mailbox.
    pub mailbox_gpa: u64,
    /// Port to ring after filling the mailbox.
    pub doorbell_port: u16,
    /// Port of the serial console.
    pub serial_port: u16,
    /// TSC frequency in kHz (0 if the host does not know it): guests time with `rdtsc`.
    pub tsc_khz: u32,
    /// First byte of the loaded image.
    pub image_start: u64,
    /// One past the last byte of the loaded image (including .bss).
    pub image_end: u64,
    /// First allocatable GPA (2 MiB aligned, after the image).
    pub free_start: u64,
    /// Device MMIO window base.
    pub mmio_base: u64,
    /// Device MMIO window size.
    pub mmio_size: u64,
    /// Number of valid entries in `devices`.
    pub device_count: u32,
    /// Reserved, zero.
    pub reserved1: u32,
    /// Devices in the MMIO window.
    pub devices: [DeviceInfo; MAX_DEVICES],
}

/// `MailboxHeader::magic`: "MBX1".
pub const MAILBOX_MAGIC: u32 = u32::from_le_bytes(*b"MBX1");

/// Mailbox operation: convert ranges (KVM_HC_MAP_GPA_RANGE semantics), entries follow.
pub const OP_CONVERT: u32 = 1;
/// Mailbox operation: accept (validate) private pages, or rescind their acceptance
/// ([`ACCEPT_FLAG_RESCIND`] in an entry's `attrs`), entries follow.
pub const OP_ACCEPT: u32 = 2;
/// Mailbox operation: report guest pool statistics, a [`PoolReport`] follows.
pub const OP_REPORT: u32 = 3;
/// Mailbox operation: end the VM with exit code `arg`.
pub const OP_EXIT: u32 = 4;

/// `OP_ACCEPT` entry `attrs`: rescind the acceptance (SNP: PVALIDATE with validate=0) of the
/// private pages of the range instead of accepting them; shared pages in it are left alone.
pub const ACCEPT_FLAG_RESCIND: u32 = 1 << 0;

/// KVM_HC_MAP_GPA_RANGE attribute: bit 4 set = to private (encrypted), clear = to shared.
pub const ATTR_ENCRYPTED: u32 = 1 << 4;
/// Mask of the page-size hint in `attrs`.
pub const ATTR_PAGE_SIZE_MASK: u32 = 0xf;
/// Page-size hint: 4 KiB.
pub const ATTR_PAGE_SIZE_4K: u32 = 0;
/// Page-size hint: 2 MiB.
pub const ATTR_PAGE_SIZE_2M: u32 = 1;
/// Page-size hint: 1 GiB.
pub const ATTR_PAGE_SIZE_1G: u32 = 2;
/// Every attribute bit the host understands.
pub const ATTR_KNOWN_MASK: u32 = ATTR_ENCRYPTED | ATTR_PAGE_SIZE_MASK;

/// KVM's hypercall number for KVM_HC_MAP_GPA_RANGE (standard path, same handler).
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;

/// Status: done.
pub const STATUS_OK: u32 = 0;
/// Error: `gpa` not 4 KiB aligned.
pub const ERR_UNALIGNED: u32 = 1;
/// Error: the range does not lie inside guest RAM (or overflows).
pub const ERR_OUT_OF_RAM: u32 = 2;
/// Error: the range overlaps the boot area, the mailboxes or the MMIO window.
pub const ERR_RESERVED: u32 = 3;
/// Error: the host runs with 2 MiB granularity and the range is not 2 MiB aligned and sized.
pub const ERR_REQUIRES_2M: u32 = 4;
/// Error: the target store could not allocate (e.g. the huge-page pool is exhausted).
pub const ERR_NO_MEMORY: u32 = 5;
/// Error: a page in an ACCEPT was already accepted (TDX double accept, SNP double
/// validation: a security violation).
pub const ERR_DOUBLE_ACCEPT: u32 = 6;
/// Error: unknown attribute bits or page-size hint.
pub const ERR_INVALID_ATTRS: u32 = 7;
/// Error: malformed request (bad magic, unknown op, bad cur/end, zero pages, bad length).
pub const ERR_BAD_REQUEST: u32 = 8;
/// Error: the host failed internally; the range is left as it was.
pub const ERR_INTERNAL: u32 = 9;
/// Error: a device access to the range was still in flight after the host's bounded wait
/// (the DMA fence); nothing changed, retry.
pub const ERR_BUSY: u32 = 10;
/// Error: an ACCEPT covers a shared page (a shared chunk, or a mixed one): only private
/// memory can be accepted.
pub const ERR_ACCEPT_SHARED: u32 = 11;
/// Error (SNP): a conversion to shared covers a page that is still validated; rescind it
/// first ([`ACCEPT_FLAG_RESCIND`]).
pub const ERR_MUST_RESCIND: u32 = 12;
/// Number of distinct status codes (for per-code counters).
pub const STATUS_COUNT: usize = 13;

/// Human-readable name of a status code.
pub const fn status_name(status: u32) -> &'static str {
    match status {
        STATUS_OK => "ok",
        ERR_UNALIGNED => "unaligned",
        ERR_OUT_OF_RAM => "out_of_ram",
        ERR_RESERVED => "reserved",
        ERR_REQUIRES_2M => "requires_2m",
        ERR_NO_MEMORY => "no_memory",
        ERR_DOUBLE_ACCEPT => "double_accept",
        ERR_INVALID_ATTRS => "invalid_attrs",
        ERR_BAD_REQUEST => "bad_request",
        ERR_INTERNAL => "internal",
        ERR_BUSY => "busy",
        ERR_ACCEPT_SHARED => "accept_shared",
        ERR_MUST_RESCIND => "must_rescind",
        _ => "unknown",
    }
}

/// The start of every mailbox page.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailboxHeader {
    /// [`MAILBOX_MAGIC`].
    pub magic: u32,
    /// `OP_*`.
    pub op: u32,
    /// First entry still to process.
    pub cur_entry: u32,
    /// One past the last entry to process.
    pub end_entry: u32,
    /// Written by the host: `STATUS_OK` or the first error code.
    pub status: u32,
    /// Reserved, zero.
    pub reserved: u32,
    /// `OP_EXIT`: exit code. `OP_REPORT`: payload length in bytes.
    pub arg: u64,
}

/// One range in a convert or accept request.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MailboxEntry {
    /// Guest physical address, 4 KiB aligned.
    pub gpa: u64,
    /// Number of 4 KiB pages.
    pub npages: u64,
    /// KVM_HC_MAP_GPA_RANGE attributes (`ATTR_*`), 0 for accept.
    pub attrs: u32,
    /// Written by the host: `STATUS_OK` or an `ERR_*` code.
    pub status: u32,
}

/// Byte offset of the first entry in a mailbox page.
pub const MAILBOX_ENTRIES_OFFSET: usize = core::mem::size_of::<MailboxHeader>();
/// Most entries in one mailbox page.
pub const MAILBOX_MAX_ENTRIES: usize =
    (PAGE_SIZE as usize - MAILBOX_ENTRIES_OFFSET) / core::mem::size_of::<MailboxEntry>();
/// Largest `OP_REPORT` payload.
pub const MAILBOX_MAX_PAYLOAD: usize = PAGE_SIZE as usize - MAILBOX_ENTRIES_OFFSET;

/// `PoolReport::version`.
pub const POOL_REPORT_VERSION: u32 = 1;
/// Longest policy name in a [`PoolReport`].
pub const POLICY_NAME_MAX: usize = 16;

/// Guest pool statistics, sent with `OP_REPORT`. Every policy reports the same fields.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolReport {
    /// [`POOL_REPORT_VERSION`].
    pub version: u32,
    /// Length of the policy name in `policy`.
    pub policy_len: u32,
    /// Policy name, ASCII, not NUL-terminated.
    pub policy: [u8; POLICY_NAME_MAX],
    /// Bytes currently mapped (handed out to drivers).
    pub used_bytes: u64,
    /// Highest `used_bytes` seen.
    pub high_water_bytes: u64,
    /// Total pool capacity in bytes (all pools).
    pub capacity_bytes: u64,
    /// Successful maps.
    pub maps: u64,
    /// Failed maps.
    pub map_failures: u64,
    /// Maps that waited (throttle).
    pub throttle_waits: u64,
    /// Total time spent waiting, nanoseconds.
    pub throttle_wait_ns: u64,
    /// Conversions issued of exactly 4 KiB.
    pub conversions_4k: u64,
    /// Conversions issued that are 2 MiB aligned and a multiple of 2 MiB.
    pub conversions_2m: u64,
    /// Other conversions (sub-2M runs larger than 4K, or unaligned).
    pub conversions_other: u64,
    /// Bytes the guest holds shared now.
    pub shared_bytes: u64,
    /// Peak of `shared_bytes`.
    pub shared_peak_bytes: u64,
    /// Transient buffers handed out (dynamic).
    pub transient_maps: u64,
    /// Pool growth steps (dynamic, refill, aligned-2m).
    pub grow_events: u64,
    /// Pool shrink steps.
    pub shrink_events: u64,
    /// I/O requests completed by the driver.
    pub io_requests: u64,
    /// I/O errors seen by the driver.
    pub io_errors: u64,
    /// `POOL_FLAG_*`: what the policy claims about itself (checked by `vmm conform`).
    pub flags: u64,
}

/// `PoolReport::flags`: the policy claims every conversion it issues is 2 MiB aligned and sized.
pub const POOL_FLAG_CLAIMS_2M: u64 = 1 << 0;
