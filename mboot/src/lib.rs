//! Multiboot v1 loading as mechanism: parse a kernel image, check it fits a domain, write its info.
//!
//! An unmodified Multiboot v1 kernel (kvm-unit-tests' x86 tests, any small PC
//! test kernel) is loaded in three steps, each a pure function of its inputs:
//!
//! 1. [`parse`] finds the Multiboot header (magic [`HEADER_MAGIC`], 4-byte
//!    aligned, wholly inside the first [`HEADER_SEARCH_BYTES`] bytes, with a
//!    checksum that sums to 0) and reads its flags. With flag bit 16 (the
//!    a.out kludge) the header's addresses say where the file goes; otherwise
//!    the file is parsed as a little-endian ELF32 (x86) or ELF64 (x86-64)
//!    executable and its `PT_LOAD` segments are taken by physical address
//!    (`p_paddr`), with `p_memsz - p_filesz` bytes zero-filled. The result is
//!    a [`Kernel`]: its segments (file range -> guest-physical range, zero
//!    fill) and its entry point.
//! 2. [`Kernel::check_fits`] refuses a kernel that passes the domain's memory,
//!    overlaps the low area the loader reserves ([`LOW_AREA_START`] ..
//!    [`LOW_AREA_END`]: info structure, memory map, module list, strings) or
//!    lands in the legacy hole between 640 KiB and 1 MiB that the memory map
//!    leaves out. [`plan`] also places the modules, page-aligned, after the
//!    kernel's highest byte, and refuses what does not fit.
//! 3. [`Kernel::load`] copies the segments into guest memory and zeroes their
//!    tails; [`build_info`] copies the modules and writes the info structure
//!    at [`INFO_GPA`], returning the [`Entry`] registers: EAX =
//!    [`BOOTLOADER_MAGIC`], EBX = the info's address.
//!
//! Guest memory is reached only through the [`GuestMemory`] trait (a plain
//! `[u8]` is one: byte `i` is guest-physical address `i`).
//!
//! Header flags: bit 0 (page-align modules) and bit 1 (memory information) are
//! always honoured; bit 16 selects the a.out kludge; bit 2 (video mode) and
//! any other bit below 16 (a requirement this loader does not know) are
//! refused, naming the bit. Bits 17..31 are optional by the specification and
//! ignored. The info structure carries flags 0 (`mem_lower`/`mem_upper`), 2
//! (command line, always a NUL-terminated string, possibly empty), 3 (module
//! list) and 6 (memory map: one available range `0..640 KiB`, one from 1 MiB
//! to the end of the domain's memory). No boot device, symbols, drive list,
//! loader name, APM or video information is given.
//!
//! Nothing here panics on any input: every problem is a [`LoadError`] that
//! names the value at fault.
//!
//! Users: `cargo xtask run --guest` uses [`parse`], [`Kernel::check_fits`]
//! and [`plan`] to check a kernel and its modules on the host before it
//! boots; the kernel (`kernel::svm::domain`) uses [`parse`],
//! [`Kernel::load`] and [`build_info`] to load it into the domain.
#![no_std]
#![forbid(unsafe_code)]

mod elf_file;
mod error;
mod header;
mod info;
mod kernel;

pub use error::LoadError;
pub use header::{
    AoutAddresses, Header, FLAG_AOUT_KLUDGE, FLAG_MEMORY_INFO, FLAG_PAGE_ALIGN, FLAG_VIDEO_MODE,
};
pub use info::{
    build_info, plan, Entry, GuestMemory, Layout, Module, ModulePlacement, INFO_BYTES,
    INFO_CMDLINE, INFO_MEMORY, INFO_MMAP, INFO_MODS, MMAP_AVAILABLE, MMAP_ENTRIES,
    MMAP_ENTRY_BYTES, MODULE_ENTRY_BYTES,
};
pub use kernel::{parse, Format, Kernel, Segment};

use abi::Gpa;

/// The Multiboot v1 header's magic (`0x1BADB002`).
pub const HEADER_MAGIC: u32 = 0x1BAD_B002;
/// The value a Multiboot v1 loader leaves in EAX at the kernel's entry.
pub const BOOTLOADER_MAGIC: u32 = 0x2BAD_B002;
/// The header must lie wholly inside this many bytes at the file's start.
pub const HEADER_SEARCH_BYTES: usize = 8192;
/// The most loadable segments a kernel may have.
pub const MAX_SEGMENTS: usize = 16;
/// The most modules a kernel may be given.
pub const MAX_MODULES: usize = 16;

/// Start of the low area the loader reserves for the info structure, the
/// memory map, the module list and the strings (as QEMU's loader does: the
/// info at 0x9000).
pub const LOW_AREA_START: Gpa = Gpa(0x9000);
/// End (exclusive) of the loader's low area.
pub const LOW_AREA_END: Gpa = Gpa(0x1_0000);
/// Where the info structure is written: EBX at the kernel's entry.
pub const INFO_GPA: Gpa = LOW_AREA_START;
/// End of conventional memory (640 KiB): the first available range.
pub const LOW_MEMORY_END: Gpa = Gpa(0xA_0000);
/// Start of the memory above the legacy hole (1 MiB): the second available
/// range runs from here to the end of the domain's memory.
pub const HIGH_MEMORY_START: Gpa = Gpa(0x10_0000);
/// Modules start on a page boundary (header flag bit 0 asks for 4 KiB).
pub const MODULE_ALIGN: u64 = 0x1000;
