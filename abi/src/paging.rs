//! Guest paging state carried on the wire: the guest's CR3 value, its paging
//! mode bits (CR0.WP, EFER.NXE, ...) and #PF error codes.

use crate::addr::Gpa;
use core::fmt;
use serde::{Deserialize, Serialize};

/// The value the guest wrote to CR3, unmodified.
///
/// Bits 51..12 are the guest-physical address of the PML4; bits 11..0 are
/// the PCID (CR4.PCIDE=1) or PWT/PCD (CR4.PCIDE=0); bit 63 is the PCID
/// no-flush hint.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct GuestCr3(pub u64);

impl GuestCr3 {
    /// Mask of the PML4 address bits (51..12).
    pub const TABLE_MASK: u64 = 0x000f_ffff_ffff_f000;

    /// The guest-physical address of the guest's PML4.
    pub const fn table(self) -> Gpa {
        Gpa(self.0 & Self::TABLE_MASK)
    }

    /// The low 12 bits: PCID when CR4.PCIDE=1.
    pub const fn pcid(self) -> u16 {
        (self.0 & 0xfff) as u16
    }

    /// Bit 63: with CR4.PCIDE=1 the guest asked not to flush the PCID.
    pub const fn no_flush(self) -> bool {
        self.0 & (1 << 63) != 0
    }
}

impl fmt::Debug for GuestCr3 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GuestCr3({:#x})", self.0)
    }
}

/// The guest's paging-relevant control bits, as a bit set (new bits may be
/// appended; a server answers `UnsupportedPagingMode` for bits it does not
/// implement). Without [`PagingMode::OFF`] the guest is in 4-level long
/// mode; with it, paging is off (see [`PagingMode::OFF`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct PagingMode(pub u32);

impl PagingMode {
    /// CR0.WP: supervisor writes honour read-only pages.
    pub const WP: u32 = 1 << 0;
    /// EFER.NXE: bit 63 of paging entries is NX (else it is reserved).
    pub const NXE: u32 = 1 << 1;
    /// CR4.PGE: global pages survive CR3 writes (a server may ignore it and
    /// drop global translations too; dropping is always allowed).
    pub const PGE: u32 = 1 << 2;
    /// CR4.SMEP: supervisor instruction fetches from user pages fault.
    pub const SMEP: u32 = 1 << 3;
    /// CR4.SMAP: supervisor data accesses to user pages fault (unless
    /// RFLAGS.AC).
    pub const SMAP: u32 = 1 << 4;
    /// CR4.PCIDE: the low 12 bits of CR3 are a PCID.
    pub const PCIDE: u32 = 1 << 5;
    /// CR0.PG = 0 (version 5): paging is off. Guest-virtual equals
    /// guest-physical, no guest page table is walked, CR3 (still recorded by
    /// `WriteCr3`) does not affect translation, and every access to guest
    /// RAM is allowed (read, write, fetch; user and supervisor). The other
    /// bits are kept for the switch to long mode but change nothing while
    /// this one is set. Addresses are 32-bit: a fault at or above 4 GiB is
    /// refused ([`MmuError::FaultOutsideMode`](crate::MmuError::FaultOutsideMode)).
    /// The kernel runs such a guest in long mode's compatibility mode on a
    /// 4-level shadow that identity-maps the guest's memory map; an access
    /// outside it is answered [`MmuReply::Mmio`](crate::MmuReply::Mmio)
    /// (there is no #PF to give).
    pub const OFF: u32 = 1 << 6;
    /// The kernel emulates guest-physical accesses outside RAM (version 5):
    /// in long mode, an access the guest tables allow whose final frame is
    /// neither in the memory map nor a foreign frame is answered
    /// [`MmuReply::Mmio`](crate::MmuReply::Mmio) (after the walk set the
    /// guest's A/D bits, as hardware does before a device access) instead of
    /// an injected #PF with P | RSVD. Without it (the version-4 behaviour,
    /// for guests that expect such accesses to fault) the #PF is injected.
    /// Implied by [`PagingMode::OFF`].
    pub const MMIO: u32 = 1 << 7;
    /// Every bit defined in this version of the protocol.
    pub const ALL: u32 = Self::WP
        | Self::NXE
        | Self::PGE
        | Self::SMEP
        | Self::SMAP
        | Self::PCIDE
        | Self::OFF
        | Self::MMIO;

    /// Whether every bit of `bits` is set.
    pub const fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }

    /// CR0.WP.
    pub const fn wp(self) -> bool {
        self.has(Self::WP)
    }

    /// EFER.NXE.
    pub const fn nxe(self) -> bool {
        self.has(Self::NXE)
    }

    /// Paging is on (CR0.PG = 1): not [`PagingMode::OFF`].
    pub const fn paging(self) -> bool {
        !self.has(Self::OFF)
    }

    /// Accesses outside RAM are answered `Mmio`: [`PagingMode::MMIO`] or
    /// [`PagingMode::OFF`].
    pub const fn mmio(self) -> bool {
        self.0 & (Self::MMIO | Self::OFF) != 0
    }
}

impl fmt::Debug for PagingMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PagingMode({:#x})", self.0)
    }
}

/// A #PF error code, as pushed by the CPU and reported in EXITINFO1.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct PfErrorCode(pub u32);

impl PfErrorCode {
    /// P: the fault was a protection violation (0: a not-present entry).
    pub const P: u32 = 1 << 0;
    /// W/R: the access was a write.
    pub const W: u32 = 1 << 1;
    /// U/S: the access was a user-mode (CPL 3) access.
    pub const U: u32 = 1 << 2;
    /// RSVD: a reserved bit was set in a paging entry.
    pub const RSVD: u32 = 1 << 3;
    /// I/D: the access was an instruction fetch.
    pub const I: u32 = 1 << 4;
    /// The bits describing the access itself (W, U, I).
    pub const ACCESS_MASK: u32 = Self::W | Self::U | Self::I;

    /// Whether every bit of `bits` is set.
    pub const fn has(self, bits: u32) -> bool {
        self.0 & bits == bits
    }

    /// The access was a write.
    pub const fn is_write(self) -> bool {
        self.has(Self::W)
    }

    /// The access was from user mode.
    pub const fn is_user(self) -> bool {
        self.has(Self::U)
    }

    /// The access was an instruction fetch.
    pub const fn is_fetch(self) -> bool {
        self.has(Self::I)
    }

    /// Only the access bits (W, U, I) of this code.
    pub const fn access(self) -> PfErrorCode {
        PfErrorCode(self.0 & Self::ACCESS_MASK)
    }

    /// This code with `bits` added.
    pub const fn with(self, bits: u32) -> PfErrorCode {
        PfErrorCode(self.0 | bits)
    }
}

impl fmt::Debug for PfErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PfErrorCode({:#x})", self.0)
    }
}
