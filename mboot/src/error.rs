//! Why a kernel was refused, with the value at fault.

use abi::Gpa;
use core::fmt;

/// A refusal to load a kernel. [`Display`](fmt::Display) names the reason
/// and the offending value; `Debug` carries the same fields.
#[derive(Debug)]
#[non_exhaustive]
pub enum LoadError {
    /// No 4-byte aligned magic `0x1BADB002` with room for the header in the
    /// first 8192 bytes.
    NoHeader,
    /// The first header found has magic + flags + checksum != 0.
    BadChecksum {
        /// File offset of the header.
        offset: usize,
        /// Its flags word.
        flags: u32,
        /// Its checksum word.
        checksum: u32,
    },
    /// The header has flag bit 16 but ends before its `entry_addr` field.
    HeaderTruncated {
        /// File offset of the header.
        offset: usize,
        /// Bytes the header needs.
        needed: usize,
    },
    /// A required header flag (bits 0..15) this loader cannot honour.
    UnsupportedFlag {
        /// The bit number.
        bit: u32,
        /// What the bit asks for.
        name: &'static str,
    },
    /// a.out kludge: `load_addr` is above `header_addr`.
    HeaderBelowLoad {
        /// The header's `header_addr`.
        header_addr: u32,
        /// The header's `load_addr`.
        load_addr: u32,
    },
    /// a.out kludge: the text would start before the file's first byte.
    LoadBeforeFile {
        /// The header's `load_addr`.
        load_addr: u32,
        /// The header's `header_addr`.
        header_addr: u32,
        /// File offset of the header.
        header_offset: usize,
    },
    /// a.out kludge: `load_end_addr` is below `load_addr`.
    LoadEndBeforeLoad {
        /// The header's `load_end_addr`.
        load_end_addr: u32,
        /// The header's `load_addr`.
        load_addr: u32,
    },
    /// a.out kludge: the data to load runs past the end of the file.
    LoadPastFile {
        /// The header's `load_end_addr`.
        load_end_addr: u32,
        /// File offset the text starts at.
        offset: u64,
        /// Bytes to load from there.
        needed: u64,
        /// The file's length.
        file_len: usize,
    },
    /// a.out kludge: `bss_end_addr` is below the end of the loaded data.
    BssEndBeforeLoadEnd {
        /// The header's `bss_end_addr`.
        bss_end_addr: u32,
        /// The end of the loaded data.
        load_end: Gpa,
    },
    /// Without the a.out kludge the file must be ELF; it is not.
    NotElf {
        /// The file's first four bytes.
        magic: [u8; 4],
    },
    /// `e_ident[EI_CLASS]` is neither 1 (ELF32) nor 2 (ELF64).
    ElfClass {
        /// The class byte.
        class: u8,
    },
    /// `e_ident[EI_DATA]` is not 1 (little-endian, as x86 is).
    ElfEndian {
        /// The data-encoding byte.
        data: u8,
    },
    /// ELF32 not for x86 (`EM_386`, 3), or ELF64 not for x86-64 (`EM_X86_64`, 62).
    ElfMachine {
        /// The ELF class (1 or 2).
        class: u8,
        /// `e_machine`.
        machine: u16,
    },
    /// `e_type` is not `ET_EXEC` (2).
    ElfType {
        /// `e_type`.
        e_type: u16,
    },
    /// The ELF headers are malformed (truncated, offsets out of the file).
    ElfMalformed(elf::parse::ParseError),
    /// A `PT_LOAD` has more bytes in the file than in memory.
    FileSizeAboveMemSize {
        /// Index in the program header table.
        index: usize,
        /// `p_filesz`.
        filesz: u64,
        /// `p_memsz`.
        memsz: u64,
    },
    /// A segment's bytes run past the end of the file.
    SegmentPastFile {
        /// Index in the program header table.
        index: usize,
        /// `p_offset`.
        offset: u64,
        /// `p_filesz`.
        filesz: u64,
        /// The file's length.
        file_len: usize,
    },
    /// A segment's guest-physical range passes 2^64.
    SegmentWraps {
        /// `p_paddr`.
        gpa: Gpa,
        /// `p_memsz`.
        len: u64,
    },
    /// More than [`MAX_SEGMENTS`](crate::MAX_SEGMENTS) loadable segments.
    TooManySegments {
        /// How many `PT_LOAD` entries the file has.
        count: usize,
    },
    /// Nothing to load: no `PT_LOAD` with bytes, or an empty a.out range.
    NoSegments,
    /// Two segments share guest-physical bytes.
    SegmentsOverlap {
        /// One segment (address, bytes).
        first: (Gpa, u64),
        /// The other (address, bytes).
        second: (Gpa, u64),
    },
    /// The entry point is not a 32-bit address.
    EntryAbove4G {
        /// The entry point.
        entry: Gpa,
    },
    /// The entry point lies in no loaded segment.
    EntryOutside {
        /// The entry point.
        entry: Gpa,
    },
    /// The domain's memory does not reach past 1 MiB.
    MemoryTooSmall {
        /// The domain's memory in bytes.
        mem_bytes: u64,
    },
    /// A segment (address, bytes) ends past the domain's memory.
    SegmentPastMemory {
        /// The segment (address, bytes).
        seg: (Gpa, u64),
        /// The domain's memory in bytes.
        mem_bytes: u64,
    },
    /// A segment overlaps the loader's low area.
    SegmentInLowArea {
        /// The segment (address, bytes).
        seg: (Gpa, u64),
    },
    /// A segment overlaps 640 KiB .. 1 MiB, which the memory map leaves out.
    SegmentInLegacyHole {
        /// The segment (address, bytes).
        seg: (Gpa, u64),
    },
    /// More than [`MAX_MODULES`](crate::MAX_MODULES) modules.
    TooManyModules {
        /// How many were given.
        count: usize,
    },
    /// A module, placed after the kernel, ends past the domain's memory (or 4 GiB).
    ModulePastMemory {
        /// The module's index.
        index: usize,
        /// Where it would start.
        gpa: Gpa,
        /// Its length.
        len: u64,
        /// The domain's memory in bytes.
        mem_bytes: u64,
    },
    /// The command line (`module` None) or a module's string has a NUL byte.
    NulInString {
        /// The module whose string it is, or None for the command line.
        module: Option<usize>,
        /// Offset of the NUL.
        at: usize,
    },
    /// The info, memory map, module list and strings need more than the low area.
    LowAreaFull {
        /// Bytes needed from the info's start.
        needed: u64,
        /// Bytes the low area has.
        room: u64,
    },
    /// A write to guest memory past its end.
    WriteOutside {
        /// Where the write starts.
        gpa: Gpa,
        /// Its length.
        len: u64,
        /// The guest memory's size.
        mem_bytes: u64,
    },
}

/// A memory size as people write it: whole MiB as "N MiB", else hex bytes.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        if self.0 != 0 && self.0.is_multiple_of(MIB) {
            write!(f, "{} MiB", self.0 / MIB)
        } else {
            write!(f, "{:#x} bytes", self.0)
        }
    }
}

/// A segment as "at 0x... of 0x... bytes".
struct Seg((Gpa, u64));

impl fmt::Display for Seg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (gpa, len) = self.0;
        write!(f, "segment at {:#x} of {len:#x} bytes", gpa.0)
    }
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use LoadError as E;
        match self {
            E::NoHeader => write!(f, "no Multiboot header in the first 8192 bytes"),
            E::BadChecksum {
                offset,
                flags,
                checksum,
            } => write!(
                f,
                "Multiboot header at offset {offset:#x}: checksum {checksum:#010x} does not sum to 0 \
                 with magic 0x1badb002 and flags {flags:#010x}"
            ),
            E::HeaderTruncated { offset, needed } => write!(
                f,
                "Multiboot header at offset {offset:#x} has the a.out kludge flag but not its \
                 {needed} bytes inside the file's first 8192"
            ),
            E::UnsupportedFlag { bit, name } => {
                write!(f, "Multiboot header flag bit {bit} ({name}) is not supported")
            }
            E::HeaderBelowLoad {
                header_addr,
                load_addr,
            } => write!(
                f,
                "a.out kludge: load_addr {load_addr:#x} is above header_addr {header_addr:#x}"
            ),
            E::LoadBeforeFile {
                load_addr,
                header_addr,
                header_offset,
            } => write!(
                f,
                "a.out kludge: load_addr {load_addr:#x} is {:#x} bytes before header_addr \
                 {header_addr:#x}, but the header is at file offset {header_offset:#x}",
                header_addr.wrapping_sub(*load_addr)
            ),
            E::LoadEndBeforeLoad {
                load_end_addr,
                load_addr,
            } => write!(
                f,
                "a.out kludge: load_end_addr {load_end_addr:#x} is below load_addr {load_addr:#x}"
            ),
            E::LoadPastFile {
                load_end_addr,
                offset,
                needed,
                file_len,
            } => write!(
                f,
                "a.out kludge: load_end_addr {load_end_addr:#x} needs {needed:#x} bytes from file \
                 offset {offset:#x}, but the file has {file_len:#x} bytes"
            ),
            E::BssEndBeforeLoadEnd {
                bss_end_addr,
                load_end,
            } => write!(
                f,
                "a.out kludge: bss_end_addr {bss_end_addr:#x} is below the loaded data's end {:#x}",
                load_end.0
            ),
            E::NotElf { magic } => write!(
                f,
                "not an ELF file (starts {:02x} {:02x} {:02x} {:02x}) and the Multiboot header \
                 has no a.out kludge (flag bit 16)",
                magic[0], magic[1], magic[2], magic[3]
            ),
            E::ElfClass { class } => {
                write!(f, "ELF class {class} unknown (1 is ELF32, 2 is ELF64)")
            }
            E::ElfEndian { data } => {
                write!(f, "ELF data encoding {data} is not little-endian (1), as x86 is")
            }
            E::ElfMachine { class, machine } => write!(
                f,
                "ELF{} machine {machine} is not {}",
                if *class == 1 { 32 } else { 64 },
                if *class == 1 { "x86 (3)" } else { "x86-64 (62)" }
            ),
            E::ElfType { e_type } => {
                write!(f, "ELF type {e_type} is not an executable (ET_EXEC, 2)")
            }
            E::ElfMalformed(e) => write!(f, "malformed ELF: {e}"),
            E::FileSizeAboveMemSize {
                index,
                filesz,
                memsz,
            } => write!(
                f,
                "program header {index}: p_filesz {filesz:#x} is above p_memsz {memsz:#x}"
            ),
            E::SegmentPastFile {
                index,
                offset,
                filesz,
                file_len,
            } => write!(
                f,
                "segment {index}: {filesz:#x} bytes at file offset {offset:#x} pass the file's \
                 end {file_len:#x}"
            ),
            E::SegmentWraps { gpa, len } => write!(
                f,
                "{} passes the top of the address space",
                Seg((*gpa, *len))
            ),
            E::TooManySegments { count } => write!(
                f,
                "{count} loadable segments; at most {} are supported",
                crate::MAX_SEGMENTS
            ),
            E::NoSegments => write!(f, "nothing to load: no segment has any bytes"),
            E::SegmentsOverlap { first, second } => {
                write!(f, "{} overlaps {}", Seg(*first), Seg(*second))
            }
            E::EntryAbove4G { entry } => {
                write!(f, "entry point {:#x} is not a 32-bit address", entry.0)
            }
            E::EntryOutside { entry } => {
                write!(f, "entry point {:#x} lies in no loaded segment", entry.0)
            }
            E::MemoryTooSmall { mem_bytes } => write!(
                f,
                "the domain's {} of memory do not reach past 1 MiB",
                Size(*mem_bytes)
            ),
            E::SegmentPastMemory { seg, mem_bytes } => write!(
                f,
                "{} passes the domain's {}",
                Seg(*seg),
                Size(*mem_bytes)
            ),
            E::SegmentInLowArea { seg } => write!(
                f,
                "{} overlaps the loader's low area {:#x}..{:#x} (info, memory map, module list, \
                 strings)",
                Seg(*seg),
                crate::LOW_AREA_START.0,
                crate::LOW_AREA_END.0
            ),
            E::SegmentInLegacyHole { seg } => write!(
                f,
                "{} overlaps 640 KiB..1 MiB, which the memory map leaves out",
                Seg(*seg)
            ),
            E::TooManyModules { count } => write!(
                f,
                "{count} modules; at most {} are supported",
                crate::MAX_MODULES
            ),
            E::ModulePastMemory {
                index,
                gpa,
                len,
                mem_bytes,
            } => write!(
                f,
                "module {index} of {len:#x} bytes, placed at {:#x} after the kernel, passes the \
                 domain's {} (or 4 GiB)",
                gpa.0,
                Size(*mem_bytes)
            ),
            E::NulInString { module: None, at } => {
                write!(f, "the command line has a NUL byte at offset {at}")
            }
            E::NulInString {
                module: Some(index),
                at,
            } => write!(f, "module {index}'s string has a NUL byte at offset {at}"),
            E::LowAreaFull { needed, room } => write!(
                f,
                "the info, memory map, module list and strings need {needed} bytes; the loader's \
                 low area has {room}"
            ),
            E::WriteOutside {
                gpa,
                len,
                mem_bytes,
            } => write!(
                f,
                "a write of {len:#x} bytes at {:#x} passes guest memory's {}",
                gpa.0,
                Size(*mem_bytes)
            ),
        }
    }
}
