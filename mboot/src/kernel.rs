//! The parsed kernel: its segments and entry, the fit check against a domain, and the copy into guest memory.

use abi::Gpa;

use crate::header::AoutAddresses;
use crate::{
    elf_file, GuestMemory, Header, LoadError, HIGH_MEMORY_START, LOW_AREA_END, LOW_AREA_START,
    LOW_MEMORY_END, MAX_SEGMENTS,
};

/// How the kernel said where it goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Header flag bit 16: the header's own addresses.
    AoutKludge,
    /// An x86 ELF32 executable.
    Elf32,
    /// An x86-64 ELF64 executable.
    Elf64,
}

/// One piece of the kernel: `file_len` bytes of the file from `file_offset`
/// go to `gpa`, and the rest of `mem_len` (the bss) is zero-filled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Offset of the segment's bytes in the file.
    pub file_offset: usize,
    /// How many bytes come from the file (at most `mem_len`).
    pub file_len: usize,
    /// Guest-physical address of the segment's first byte.
    pub gpa: Gpa,
    /// Bytes the segment occupies in guest memory.
    pub mem_len: u64,
}

impl Segment {
    /// The first guest-physical address past the segment.
    pub fn end(&self) -> u64 {
        // `parse` refuses a segment whose end does not fit a u64.
        self.gpa.0.saturating_add(self.mem_len)
    }

    /// Bytes zero-filled after the file's bytes.
    pub fn zero_len(&self) -> u64 {
        self.mem_len.saturating_sub(self.file_len as u64)
    }

    /// Whether the segment shares a byte with `start..end`.
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.gpa.0 < end && start < self.end()
    }
}

/// A Multiboot v1 kernel, parsed: where each segment goes and where it starts.
/// Made only by [`parse`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The header it was found by.
    pub header: Header,
    /// How the load addresses were given.
    pub format: Format,
    /// Guest-physical address of the first instruction (EIP at entry).
    pub entry: Gpa,
    /// The loadable segments (at least one; none empty; no two overlap;
    /// each within the file): private, so only [`parse`] makes them.
    segments: heapless::Vec<Segment, MAX_SEGMENTS>,
}

/// Parses a Multiboot v1 kernel image. See the crate documentation for what
/// is accepted; everything else is a [`LoadError`] naming the value at fault.
pub fn parse(image: &[u8]) -> Result<Kernel, LoadError> {
    let header = Header::find(image)?;
    let (format, entry, segments) = match header.aout {
        Some(aout) => {
            let segment = aout_segment(image, header.offset, &aout)?;
            let mut segments = heapless::Vec::new();
            // One segment always fits.
            let _ = segments.push(segment);
            (Format::AoutKludge, u64::from(aout.entry_addr), segments)
        }
        None => {
            let elf = elf_file::parse(image)?;
            (elf.format, elf.entry, elf.segments)
        }
    };
    if segments.is_empty() {
        return Err(LoadError::NoSegments);
    }
    for (i, a) in segments.iter().enumerate() {
        if let Some(b) = segments[i + 1..]
            .iter()
            .find(|b| a.overlaps(b.gpa.0, b.end()))
        {
            return Err(LoadError::SegmentsOverlap {
                first: (a.gpa, a.mem_len),
                second: (b.gpa, b.mem_len),
            });
        }
    }
    if entry > u64::from(u32::MAX) {
        return Err(LoadError::EntryAbove4G { entry: Gpa(entry) });
    }
    if !segments.iter().any(|s| s.overlaps(entry, entry + 1)) {
        return Err(LoadError::EntryOutside { entry: Gpa(entry) });
    }
    Ok(Kernel {
        header,
        format,
        entry: Gpa(entry),
        segments,
    })
}

/// The one segment the a.out kludge's addresses describe, checked against
/// the file (the header at `offset` is at `header_addr` once loaded).
fn aout_segment(image: &[u8], offset: usize, a: &AoutAddresses) -> Result<Segment, LoadError> {
    let (header_addr, load_addr) = (u64::from(a.header_addr), u64::from(a.load_addr));
    if load_addr > header_addr {
        return Err(LoadError::HeaderBelowLoad {
            header_addr: a.header_addr,
            load_addr: a.load_addr,
        });
    }
    let Some(start) = (offset as u64).checked_sub(header_addr - load_addr) else {
        return Err(LoadError::LoadBeforeFile {
            load_addr: a.load_addr,
            header_addr: a.header_addr,
            header_offset: offset,
        });
    };
    let load_end = match a.load_end_addr {
        0 => load_addr + (image.len() as u64 - start),
        end if u64::from(end) < load_addr => {
            return Err(LoadError::LoadEndBeforeLoad {
                load_end_addr: end,
                load_addr: a.load_addr,
            })
        }
        end => u64::from(end),
    };
    let file_len = load_end - load_addr;
    if start + file_len > image.len() as u64 {
        return Err(LoadError::LoadPastFile {
            load_end_addr: a.load_end_addr,
            offset: start,
            needed: file_len,
            file_len: image.len(),
        });
    }
    let bss_end = match a.bss_end_addr {
        0 => load_end,
        end if u64::from(end) < load_end => {
            return Err(LoadError::BssEndBeforeLoadEnd {
                bss_end_addr: end,
                load_end: Gpa(load_end),
            })
        }
        end => u64::from(end),
    };
    Ok(Segment {
        // Both are at most the file's length (checked above).
        file_offset: start as usize,
        file_len: file_len as usize,
        gpa: Gpa(load_addr),
        mem_len: bss_end - load_addr,
    })
}

impl Kernel {
    /// The loadable segments.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The first guest-physical address past the kernel's highest byte.
    pub fn end(&self) -> Gpa {
        Gpa(self.segments.iter().map(Segment::end).max().unwrap_or(0))
    }

    /// Refuses a kernel that does not fit a domain of `mem_bytes` bytes: a
    /// segment past the memory, in the loader's low area, or in the legacy
    /// hole (640 KiB .. 1 MiB) the memory map leaves out.
    pub fn check_fits(&self, mem_bytes: u64) -> Result<(), LoadError> {
        if mem_bytes <= HIGH_MEMORY_START.0 {
            return Err(LoadError::MemoryTooSmall { mem_bytes });
        }
        for s in &self.segments {
            let seg = (s.gpa, s.mem_len);
            if s.end() > mem_bytes {
                return Err(LoadError::SegmentPastMemory { seg, mem_bytes });
            }
            if s.overlaps(LOW_AREA_START.0, LOW_AREA_END.0) {
                return Err(LoadError::SegmentInLowArea { seg });
            }
            if s.overlaps(LOW_MEMORY_END.0, HIGH_MEMORY_START.0) {
                return Err(LoadError::SegmentInLegacyHole { seg });
            }
        }
        Ok(())
    }

    /// Copies the segments of `image` (the file this kernel was parsed from)
    /// into guest memory and zero-fills their tails. Call
    /// [`check_fits`](Self::check_fits) first: a segment outside `mem` is
    /// refused by `mem`, after the segments before it were written.
    pub fn load<M: GuestMemory + ?Sized>(
        &self,
        image: &[u8],
        mem: &mut M,
    ) -> Result<(), LoadError> {
        for (index, s) in self.segments.iter().enumerate() {
            let Some(bytes) = s
                .file_offset
                .checked_add(s.file_len)
                .and_then(|end| image.get(s.file_offset..end))
            else {
                return Err(LoadError::SegmentPastFile {
                    index,
                    offset: s.file_offset as u64,
                    filesz: s.file_len as u64,
                    file_len: image.len(),
                });
            };
            mem.write(s.gpa, bytes)?;
            mem.zero(Gpa(s.gpa.0.saturating_add(s.file_len as u64)), s.zero_len())?;
        }
        Ok(())
    }
}
