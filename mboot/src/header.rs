//! Finding and reading the Multiboot v1 header: magic, checksum, flags, a.out kludge addresses.

use crate::{LoadError, HEADER_MAGIC, HEADER_SEARCH_BYTES};

/// Header flag bit 0: modules must be page-aligned (always honoured).
pub const FLAG_PAGE_ALIGN: u32 = 1 << 0;
/// Header flag bit 1: the kernel needs memory information (always honoured).
pub const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// Header flag bit 2: the kernel asks for a video mode (refused).
pub const FLAG_VIDEO_MODE: u32 = 1 << 2;
/// Header flag bit 16: the header carries the load addresses (a.out kludge).
pub const FLAG_AOUT_KLUDGE: u32 = 1 << 16;

/// Bits 0..15 are requirements: a loader must refuse one it cannot meet.
const REQUIRED_BITS: u32 = 0xFFFF;
/// The required bits this loader meets.
const HONOURED: u32 = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO;

/// Size of magic, flags and checksum.
const BASE_BYTES: usize = 12;
/// Size of the header up to and including `entry_addr` (the a.out kludge).
const AOUT_BYTES: usize = 32;

/// The header's address fields, present when flag bit 16 is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AoutAddresses {
    /// Physical address the header itself is loaded at.
    pub header_addr: u32,
    /// Physical address of the start of the text: the file is loaded from
    /// `header offset - (header_addr - load_addr)` on.
    pub load_addr: u32,
    /// Physical end of the data to load; 0 means up to the end of the file.
    pub load_end_addr: u32,
    /// Physical end of the bss (zero-filled after the data); 0 means none.
    pub bss_end_addr: u32,
    /// Physical address the kernel is entered at.
    pub entry_addr: u32,
}

/// A Multiboot v1 header found in a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Byte offset of the magic in the file.
    pub offset: usize,
    /// The header's flags word.
    pub flags: u32,
    /// The load addresses, with flag bit 16.
    pub aout: Option<AoutAddresses>,
}

/// What a header flag bit asks for, for error messages.
pub(crate) fn flag_name(bit: u32) -> &'static str {
    match bit {
        0 => "page-aligned modules",
        1 => "memory information",
        2 => "video mode",
        16 => "a.out kludge",
        _ => "a requirement this loader does not know",
    }
}

/// Reads a little-endian `u32` at `at`, if the file holds it.
pub(crate) fn le32(image: &[u8], at: usize) -> Option<u32> {
    let bytes = image.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
}

impl Header {
    /// Finds the first 4-byte aligned header in the first 8192 bytes whose
    /// checksum is right, and checks its flags. When only headers with a bad
    /// checksum are found, the first one is reported.
    pub fn find(image: &[u8]) -> Result<Header, LoadError> {
        let window = &image[..image.len().min(HEADER_SEARCH_BYTES)];
        let mut first_bad = None;
        for offset in (0..window.len().saturating_sub(BASE_BYTES - 1)).step_by(4) {
            let (Some(magic), Some(flags), Some(checksum)) = (
                le32(window, offset),
                le32(window, offset + 4),
                le32(window, offset + 8),
            ) else {
                break;
            };
            if magic != HEADER_MAGIC {
                continue;
            }
            if magic.wrapping_add(flags).wrapping_add(checksum) != 0 {
                first_bad.get_or_insert(LoadError::BadChecksum {
                    offset,
                    flags,
                    checksum,
                });
                continue;
            }
            return Header::read(window, offset, flags);
        }
        Err(first_bad.unwrap_or(LoadError::NoHeader))
    }

    /// Checks the flags of the header at `offset` and reads its a.out
    /// addresses if it has them (`window` is the first 8192 bytes at most).
    fn read(window: &[u8], offset: usize, flags: u32) -> Result<Header, LoadError> {
        let refused = flags & REQUIRED_BITS & !HONOURED;
        if refused != 0 {
            let bit = refused.trailing_zeros();
            return Err(LoadError::UnsupportedFlag {
                bit,
                name: flag_name(bit),
            });
        }
        let mut header = Header {
            offset,
            flags,
            aout: None,
        };
        if flags & FLAG_AOUT_KLUDGE != 0 {
            let field = |i: usize| {
                le32(window, offset + BASE_BYTES + 4 * i).ok_or(LoadError::HeaderTruncated {
                    offset,
                    needed: AOUT_BYTES,
                })
            };
            header.aout = Some(AoutAddresses {
                header_addr: field(0)?,
                load_addr: field(1)?,
                load_end_addr: field(2)?,
                bss_end_addr: field(3)?,
                entry_addr: field(4)?,
            });
        }
        Ok(header)
    }
}
