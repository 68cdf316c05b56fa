//! Address newtypes: one type per address space, so a guest-virtual address can
//! never be passed where a host-physical one is expected.
//!
//! `Gva` guest-virtual, `Gpa` guest-physical, `Gfn` guest frame number,
//! `Hpa` host-physical, `Mfn` machine (host) frame number. Frames are 4 KiB.

use core::fmt;
use serde::{Deserialize, Serialize};

/// log2 of the base page size (4 KiB).
pub const PAGE_SHIFT: u32 = 12;
/// The base page size in bytes (4 KiB).
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Mask of the offset bits inside a 4 KiB page.
pub const PAGE_OFFSET_MASK: u64 = PAGE_SIZE - 1;

/// The page sizes of x86-64 long mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PageSize {
    /// 4 KiB, mapped by a level-1 entry (PTE).
    Size4K,
    /// 2 MiB, mapped by a level-2 entry (PDE) with PS set.
    Size2M,
    /// 1 GiB, mapped by a level-3 entry (PDPTE) with PS set.
    Size1G,
}

impl PageSize {
    /// Size in bytes.
    pub const fn bytes(self) -> u64 {
        match self {
            PageSize::Size4K => 1 << 12,
            PageSize::Size2M => 1 << 21,
            PageSize::Size1G => 1 << 30,
        }
    }

    /// log2 of the size in bytes.
    pub const fn shift(self) -> u32 {
        match self {
            PageSize::Size4K => 12,
            PageSize::Size2M => 21,
            PageSize::Size1G => 30,
        }
    }

    /// Number of 4 KiB frames in one page of this size.
    pub const fn frames(self) -> u64 {
        self.bytes() >> PAGE_SHIFT
    }

    /// Paging level whose entry maps a page of this size (1 = PTE ... 3 = PDPTE).
    pub const fn level(self) -> u8 {
        match self {
            PageSize::Size4K => 1,
            PageSize::Size2M => 2,
            PageSize::Size1G => 3,
        }
    }
}

macro_rules! address {
    ($(#[$doc:meta])* $name:ident, $frame:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw address.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// Offset inside its 4 KiB page.
            pub const fn page_offset(self) -> u64 {
                self.0 & PAGE_OFFSET_MASK
            }
            /// Offset inside a page of `size`.
            pub const fn offset_in(self, size: PageSize) -> u64 {
                self.0 & (size.bytes() - 1)
            }
            /// The address rounded down to its 4 KiB page.
            pub const fn page_base(self) -> Self {
                Self(self.0 & !PAGE_OFFSET_MASK)
            }
            /// The address rounded down to a page of `size`.
            pub const fn align_down(self, size: PageSize) -> Self {
                Self(self.0 & !(size.bytes() - 1))
            }
            /// Whether the address is aligned to `align` bytes (a power of two).
            pub const fn is_aligned(self, align: u64) -> bool {
                self.0 & (align.wrapping_sub(1)) == 0
            }
            /// The frame holding this address.
            pub const fn frame(self) -> $frame {
                $frame(self.0 >> PAGE_SHIFT)
            }
            /// `self + bytes`, or `None` on overflow.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

macro_rules! frame {
    ($(#[$doc:meta])* $name:ident, $addr:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl $name {
            /// The raw frame number.
            pub const fn raw(self) -> u64 {
                self.0
            }
            /// The address of the first byte of the frame (saturates for
            /// frame numbers that cannot be addressed).
            pub const fn base(self) -> $addr {
                $addr(self.0.saturating_mul(PAGE_SIZE))
            }
            /// The address `offset` bytes into the frame (`offset` is masked to
            /// the page).
            pub const fn at(self, offset: u64) -> $addr {
                $addr(self.0.saturating_mul(PAGE_SIZE) | (offset & PAGE_OFFSET_MASK))
            }
            /// `self + frames`, or `None` on overflow.
            pub const fn checked_add(self, frames: u64) -> Option<Self> {
                match self.0.checked_add(frames) {
                    Some(v) => Some(Self(v)),
                    None => None,
                }
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "({:#x})"), self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }

        impl From<$addr> for $name {
            fn from(a: $addr) -> Self {
                a.frame()
            }
        }
    };
}

address!(
    /// A guest-virtual address (what the guest's page tables translate).
    Gva,
    GvPage
);
address!(
    /// A guest-physical address (an address in the guest's memory map).
    Gpa,
    Gfn
);
address!(
    /// A host-physical address (what the shadow tables and the MMU see).
    Hpa,
    Mfn
);

frame!(
    /// A guest frame number: a 4 KiB frame of guest-physical memory.
    Gfn,
    Gpa
);
frame!(
    /// A machine frame number: a 4 KiB frame of host-physical memory.
    Mfn,
    Hpa
);
frame!(
    /// A guest-virtual page number (`Gva >> 12`).
    GvPage,
    Gva
);

impl Gva {
    /// Index into the page table of `level` (4 = PML4 ... 1 = PT) for this
    /// address: bits `12 + 9 * (level - 1)` and up, 9 bits wide. Levels outside
    /// 1..=4 are clamped.
    pub const fn table_index(self, level: u8) -> usize {
        let level = if level < 1 {
            1
        } else if level > 4 {
            4
        } else {
            level
        };
        ((self.0 >> (12 + 9 * (level as u32 - 1))) & 0x1ff) as usize
    }

    /// Whether the address is canonical for 48-bit virtual addresses (bits
    /// 63..47 all equal).
    pub const fn is_canonical(self) -> bool {
        let top = self.0 >> 47;
        top == 0 || top == 0x1_ffff
    }
}
