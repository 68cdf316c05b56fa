//! The ELF path (no a.out kludge): an x86 ELF32 or x86-64 ELF64 executable's `PT_LOAD` segments by physical address.

use abi::Gpa;
use elf::abi::{EM_386, EM_X86_64, ET_EXEC, PT_LOAD};
use elf::endian::LittleEndian;
use elf::file::Class;
use elf::parse::ParseError;
use elf::ElfBytes;

use crate::kernel::{Format, Segment};
use crate::{LoadError, MAX_SEGMENTS};

/// The segments and the entry point of an ELF kernel.
pub(crate) struct ElfKernel {
    /// ELF32 or ELF64.
    pub format: Format,
    /// Each `PT_LOAD` with a non-zero memory size, in file order.
    pub segments: heapless::Vec<Segment, MAX_SEGMENTS>,
    /// `e_entry`, moved to its physical address when it lies in a segment's
    /// virtual range (as GRUB does): a kernel linked high still enters low.
    pub entry: u64,
}

/// Turns the ELF crate's refusals into ours, keeping the value at fault.
fn refused(e: ParseError) -> LoadError {
    match e {
        ParseError::BadMagic(magic) => LoadError::NotElf { magic },
        ParseError::UnsupportedElfClass(class) => LoadError::ElfClass { class },
        ParseError::UnsupportedElfEndianness(data) => LoadError::ElfEndian { data },
        other => LoadError::ElfMalformed(other),
    }
}

/// Parses `image` as an x86 ELF executable and takes its loadable segments.
pub(crate) fn parse(image: &[u8]) -> Result<ElfKernel, LoadError> {
    let file = ElfBytes::<LittleEndian>::minimal_parse(image).map_err(refused)?;
    let ehdr = &file.ehdr;
    let (format, class, machine) = match ehdr.class {
        Class::ELF32 => (Format::Elf32, 1, EM_386),
        Class::ELF64 => (Format::Elf64, 2, EM_X86_64),
    };
    if ehdr.e_machine != machine {
        return Err(LoadError::ElfMachine {
            class,
            machine: ehdr.e_machine,
        });
    }
    if ehdr.e_type != ET_EXEC {
        return Err(LoadError::ElfType {
            e_type: ehdr.e_type,
        });
    }
    let table = file.segments().ok_or(LoadError::NoSegments)?;
    let mut segments = heapless::Vec::new();
    let mut entry = ehdr.e_entry;
    let mut entry_moved = false;
    for (index, ph) in table.iter().enumerate() {
        if ph.p_type != PT_LOAD || ph.p_memsz == 0 {
            continue;
        }
        if ph.p_filesz > ph.p_memsz {
            return Err(LoadError::FileSizeAboveMemSize {
                index,
                filesz: ph.p_filesz,
                memsz: ph.p_memsz,
            });
        }
        let in_file = ph
            .p_offset
            .checked_add(ph.p_filesz)
            .is_some_and(|end| end <= image.len() as u64);
        if !in_file {
            return Err(LoadError::SegmentPastFile {
                index,
                offset: ph.p_offset,
                filesz: ph.p_filesz,
                file_len: image.len(),
            });
        }
        if ph.p_paddr.checked_add(ph.p_memsz).is_none() {
            return Err(LoadError::SegmentWraps {
                gpa: Gpa(ph.p_paddr),
                len: ph.p_memsz,
            });
        }
        let in_virtual = ehdr.e_entry >= ph.p_vaddr && ehdr.e_entry - ph.p_vaddr < ph.p_memsz;
        if !entry_moved && in_virtual {
            entry = ehdr.e_entry - ph.p_vaddr + ph.p_paddr;
            entry_moved = true;
        }
        segments
            .push(Segment {
                // Both are at most the file's length (checked above).
                file_offset: ph.p_offset as usize,
                file_len: ph.p_filesz as usize,
                gpa: Gpa(ph.p_paddr),
                mem_len: ph.p_memsz,
            })
            .map_err(|_| LoadError::TooManySegments {
                count: table.iter().filter(|p| p.p_type == PT_LOAD).count(),
            })?;
    }
    Ok(ElfKernel {
        format,
        segments,
        entry,
    })
}
