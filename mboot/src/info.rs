//! The Multiboot v1 info structure: where the loader puts it and the modules, and the bytes it writes.

use abi::Gpa;

use crate::{
    Kernel, LoadError, BOOTLOADER_MAGIC, HIGH_MEMORY_START, INFO_GPA, LOW_AREA_END, LOW_MEMORY_END,
    MAX_MODULES, MODULE_ALIGN,
};

/// Info flag bit 0: `mem_lower` and `mem_upper` are valid.
pub const INFO_MEMORY: u32 = 1 << 0;
/// Info flag bit 2: `cmdline` is valid.
pub const INFO_CMDLINE: u32 = 1 << 2;
/// Info flag bit 3: `mods_count` and `mods_addr` are valid.
pub const INFO_MODS: u32 = 1 << 3;
/// Info flag bit 6: `mmap_length` and `mmap_addr` are valid.
pub const INFO_MMAP: u32 = 1 << 6;

/// Size of the info structure (through the VBE fields, which stay zero).
pub const INFO_BYTES: u64 = 88;
/// Size of one memory-map entry, its own `size` word (20) included.
pub const MMAP_ENTRY_BYTES: u64 = 24;
/// Entries in the memory map: below 640 KiB, and from 1 MiB to the end.
pub const MMAP_ENTRIES: u64 = 2;
/// Size of one module-list entry (start, end, string, reserved).
pub const MODULE_ENTRY_BYTES: u64 = 16;
/// Memory-map type of RAM the kernel may use.
pub const MMAP_AVAILABLE: u32 = 1;

/// Guest memory as the loader sees it: a flat guest-physical range from 0.
pub trait GuestMemory {
    /// Bytes of guest memory (addresses `0..size`).
    fn size(&self) -> u64;
    /// Writes `bytes` at `gpa`; refuses a range past [`size`](Self::size).
    fn write(&mut self, gpa: Gpa, bytes: &[u8]) -> Result<(), LoadError>;
    /// Zeroes `len` bytes at `gpa`; refuses a range past [`size`](Self::size).
    fn zero(&mut self, gpa: Gpa, len: u64) -> Result<(), LoadError>;
}

/// A byte slice is guest memory: byte `i` is guest-physical address `i`.
impl GuestMemory for [u8] {
    fn size(&self) -> u64 {
        self.len() as u64
    }

    fn write(&mut self, gpa: Gpa, bytes: &[u8]) -> Result<(), LoadError> {
        self.span(gpa, bytes.len() as u64)?.copy_from_slice(bytes);
        Ok(())
    }

    fn zero(&mut self, gpa: Gpa, len: u64) -> Result<(), LoadError> {
        self.span(gpa, len)?.fill(0);
        Ok(())
    }
}

/// The slice `gpa..gpa + len` of a byte-slice memory, or the refusal.
trait Span {
    fn span(&mut self, gpa: Gpa, len: u64) -> Result<&mut [u8], LoadError>;
}

impl Span for [u8] {
    fn span(&mut self, gpa: Gpa, len: u64) -> Result<&mut [u8], LoadError> {
        let mem_bytes = self.len() as u64;
        let range = usize::try_from(gpa.0)
            .ok()
            .zip(usize::try_from(len).ok())
            .and_then(|(start, len)| Some(start..start.checked_add(len)?));
        range
            .and_then(|r| self.get_mut(r))
            .ok_or(LoadError::WriteOutside {
                gpa,
                len,
                mem_bytes,
            })
    }
}

/// A module the kernel is given: its bytes and its own string.
#[derive(Clone, Copy, Debug)]
pub struct Module<'a> {
    /// The module's contents, copied page-aligned into guest memory.
    pub bytes: &'a [u8],
    /// The module's string (by convention its name and arguments).
    pub string: &'a str,
}

/// Where one module and its string go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModulePlacement {
    /// Guest-physical address of the module's first byte (page-aligned).
    pub start: Gpa,
    /// The module's length in bytes (`mod_end = start + len`).
    pub len: u64,
    /// Guest-physical address of the module's NUL-terminated string.
    pub string: Gpa,
}

/// Where everything the loader writes goes, for one kernel, command line and
/// module list in a domain of `mem_bytes` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The domain's memory size in bytes.
    pub mem_bytes: u64,
    /// The info structure ([`INFO_GPA`]).
    pub info: Gpa,
    /// The memory map, right after the info.
    pub mmap: Gpa,
    /// The module list, right after the memory map.
    pub mods: Gpa,
    /// The NUL-terminated command line, right after the module list; the
    /// modules' strings follow it.
    pub cmdline: Gpa,
    /// First byte of the low area past the last string.
    pub low_end: Gpa,
    /// Each module, in order: from the first page boundary at or above both
    /// the kernel's end and 1 MiB, each on the next page boundary.
    pub modules: heapless::Vec<ModulePlacement, MAX_MODULES>,
}

/// The registers a Multiboot v1 kernel is entered with (32-bit protected
/// mode, paging off).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Where execution starts.
    pub eip: Gpa,
    /// [`BOOTLOADER_MAGIC`].
    pub eax: u32,
    /// The info structure's address.
    pub ebx: Gpa,
}

/// Rounds `x` up to the next multiple of [`MODULE_ALIGN`] (None on overflow).
fn align_up(x: u64) -> Option<u64> {
    Some(x.checked_add(MODULE_ALIGN - 1)? & !(MODULE_ALIGN - 1))
}

/// Refuses a string with a NUL inside (it would be cut short in the guest).
fn check_string(text: &str, module: Option<usize>) -> Result<(), LoadError> {
    match text.bytes().position(|b| b == 0) {
        Some(at) => Err(LoadError::NulInString { module, at }),
        None => Ok(()),
    }
}

/// Places the info, memory map, module list and strings in the low area and
/// the modules after the kernel, after checking the kernel fits
/// ([`Kernel::check_fits`]); refuses what does not fit, with the numbers.
pub fn plan(
    kernel: &Kernel,
    mem_bytes: u64,
    cmdline: &str,
    modules: &[Module<'_>],
) -> Result<Layout, LoadError> {
    kernel.check_fits(mem_bytes)?;
    if modules.len() > MAX_MODULES {
        return Err(LoadError::TooManyModules {
            count: modules.len(),
        });
    }
    check_string(cmdline, None)?;
    let info = INFO_GPA;
    let mmap = info.0 + INFO_BYTES;
    let mods = mmap + MMAP_ENTRIES * MMAP_ENTRY_BYTES;
    let cmdline_gpa = mods + modules.len() as u64 * MODULE_ENTRY_BYTES;
    let mut strings = cmdline_gpa + cmdline.len() as u64 + 1;
    let mut cursor = align_up(kernel.end().0.max(HIGH_MEMORY_START.0));
    let mut placed = heapless::Vec::new();
    for (index, m) in modules.iter().enumerate() {
        check_string(m.string, Some(index))?;
        let len = m.bytes.len() as u64;
        let start = cursor.unwrap_or(u64::MAX);
        let end = start
            .checked_add(len)
            .filter(|&end| end <= mem_bytes && end <= u64::from(u32::MAX));
        let Some(end) = end else {
            return Err(LoadError::ModulePastMemory {
                index,
                gpa: Gpa(start),
                len,
                mem_bytes,
            });
        };
        // At most MAX_MODULES (checked above).
        let _ = placed.push(ModulePlacement {
            start: Gpa(start),
            len,
            string: Gpa(strings),
        });
        strings += m.string.len() as u64 + 1;
        cursor = align_up(end);
    }
    if strings > LOW_AREA_END.0 {
        return Err(LoadError::LowAreaFull {
            needed: strings - info.0,
            room: LOW_AREA_END.0 - info.0,
        });
    }
    Ok(Layout {
        mem_bytes,
        info,
        mmap: Gpa(mmap),
        mods: Gpa(mods),
        cmdline: Gpa(cmdline_gpa),
        low_end: Gpa(strings),
        modules: placed,
    })
}

/// Writes a NUL-terminated string at `gpa`.
fn write_string<M: GuestMemory + ?Sized>(
    mem: &mut M,
    gpa: Gpa,
    text: &str,
) -> Result<(), LoadError> {
    mem.write(gpa, text.as_bytes())?;
    mem.write(Gpa(gpa.0 + text.len() as u64), &[0])
}

/// Stores `value` little-endian at `at` in `buf`.
fn put(buf: &mut [u8], at: usize, value: &[u8]) {
    buf[at..at + value.len()].copy_from_slice(value);
}

/// Copies the modules into guest memory and writes the info structure, the
/// memory map, the module list and the strings as [`plan`] places them for a
/// domain of `mem.size()` bytes. The kernel itself is written by
/// [`Kernel::load`]. Returns the registers to enter the kernel with.
pub fn build_info<M: GuestMemory + ?Sized>(
    mem: &mut M,
    kernel: &Kernel,
    cmdline: &str,
    modules: &[Module<'_>],
) -> Result<Entry, LoadError> {
    let layout = plan(kernel, mem.size(), cmdline, modules)?;
    let mut list = [0u8; MODULE_ENTRY_BYTES as usize];
    for (i, (m, at)) in modules.iter().zip(&layout.modules).enumerate() {
        mem.write(at.start, m.bytes)?;
        write_string(mem, at.string, m.string)?;
        // `plan` keeps every module and string below 4 GiB.
        put(&mut list, 0, &(at.start.0 as u32).to_le_bytes());
        put(&mut list, 4, &((at.start.0 + at.len) as u32).to_le_bytes());
        put(&mut list, 8, &(at.string.0 as u32).to_le_bytes());
        mem.write(Gpa(layout.mods.0 + i as u64 * MODULE_ENTRY_BYTES), &list)?;
    }
    write_string(mem, layout.cmdline, cmdline)?;

    let ranges = [
        (0, LOW_MEMORY_END.0),
        (HIGH_MEMORY_START.0, layout.mem_bytes - HIGH_MEMORY_START.0),
    ];
    let mut entry = [0u8; MMAP_ENTRY_BYTES as usize];
    for (i, (base, len)) in ranges.into_iter().enumerate() {
        put(&mut entry, 0, &(MMAP_ENTRY_BYTES as u32 - 4).to_le_bytes());
        put(&mut entry, 4, &base.to_le_bytes());
        put(&mut entry, 12, &len.to_le_bytes());
        put(&mut entry, 20, &MMAP_AVAILABLE.to_le_bytes());
        mem.write(Gpa(layout.mmap.0 + i as u64 * MMAP_ENTRY_BYTES), &entry)?;
    }

    let mem_upper = (layout.mem_bytes - HIGH_MEMORY_START.0) / 1024;
    let mut info = [0u8; INFO_BYTES as usize];
    let flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP;
    put(&mut info, 0, &flags.to_le_bytes());
    put(
        &mut info,
        4,
        &((LOW_MEMORY_END.0 / 1024) as u32).to_le_bytes(),
    );
    put(
        &mut info,
        8,
        &u32::try_from(mem_upper).unwrap_or(u32::MAX).to_le_bytes(),
    );
    // The low area lies below 64 KiB: every address in it fits a u32.
    put(&mut info, 16, &(layout.cmdline.0 as u32).to_le_bytes());
    put(&mut info, 20, &(modules.len() as u32).to_le_bytes());
    put(&mut info, 24, &(layout.mods.0 as u32).to_le_bytes());
    put(
        &mut info,
        44,
        &((MMAP_ENTRIES * MMAP_ENTRY_BYTES) as u32).to_le_bytes(),
    );
    put(&mut info, 48, &(layout.mmap.0 as u32).to_le_bytes());
    mem.write(layout.info, &info)?;

    Ok(Entry {
        eip: kernel.entry,
        eax: BOOTLOADER_MAGIC,
        ebx: layout.info,
    })
}
