//! The guest page walker: 4-level long mode with 4 KiB, 2 MiB and 1 GiB pages,
//! setting the guest's Accessed and Dirty bits as hardware does.
//!
//! # The rules (the conformance oracle must agree with them)
//! - Levels 4 (PML4E) to 1 (PTE); the PML4 is at `cr3.table()`. A PDPTE or
//!   PDE with PS (bit 7) set maps a 1 GiB or 2 MiB page.
//! - A not-present entry (P = 0) stops the walk: #PF with P = 0.
//! - Reserved bits in a present entry stop the walk: #PF with P | RSVD. They
//!   are: bits 51..MAXPHYADDR at every level; bit 63 (NX) when EFER.NXE = 0;
//!   bit 7 of a PML4E; bits 29..13 of a 1 GiB PDPTE; bits 20..13 of a 2 MiB
//!   PDE.
//! - A paging-structure frame outside the domain's memory map stops the
//!   walk: #PF with P | RSVD (the guest sees a reserved-bit fault; no
//!   mapping is ever made to a frame outside the guest). So does the final
//!   4 KiB frame outside it, found while walking, before permissions —
//!   unless the mode has MMIO emulation ([`PagingMode::mmio`]): then the
//!   permissions decide as for RAM, and an allowed access sets A/D like any
//!   successful walk and ends in [`WalkError::Mmio`] (the kernel emulates
//!   the access; still no mapping is made).
//! - Permissions combine all levels: user access needs U/S at every level;
//!   a write needs R/W at every level, except a supervisor write with
//!   CR0.WP = 0; with EFER.NXE = 1 a fetch faults if any level has NX.
//!   Violation: #PF with P set. SMEP/SMAP are not modelled.
//! - Error codes carry the access's W and U bits, and I only when
//!   EFER.NXE = 1 (as on AMD and Intel).
//! - Only a successful translation sets A/D: A in every entry walked, D in
//!   the leaf on a write, each with a compare-exchange; if an entry changed
//!   under the walker, the walk starts over (at most [`MAX_WALK_RETRIES`]
//!   times, then [`WalkError::Contended`]). A faulting walk writes nothing.
//! - A non-canonical address gives #PF with P = 0 (hardware would raise #GP
//!   before walking; the kernel never forwards such a fault).

use abi::mmu::MemoryMap;
use abi::{
    Gfn, Gpa, GuestCr3, Gva, Hpa, MemError, Mfn, PageSize, PagingMode, PfErrorCode, PhysMem,
};

/// Present.
pub const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// User-accessible.
pub const PTE_US: u64 = 1 << 2;
/// Accessed.
pub const PTE_A: u64 = 1 << 5;
/// Dirty (leaf entries).
pub const PTE_D: u64 = 1 << 6;
/// Page size (large page) in PDPTEs and PDEs.
pub const PTE_PS: u64 = 1 << 7;
/// Global (leaf entries).
pub const PTE_G: u64 = 1 << 8;
/// No-execute (with EFER.NXE).
pub const PTE_NX: u64 = 1 << 63;
/// Address bits 51..12 of an entry.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// How often a walk is restarted when its A/D update races with a writer.
pub const MAX_WALK_RETRIES: u32 = 8;

/// The guest's physical memory: the domain's memory map over [`PhysMem`].
pub struct GuestMem<'a, M: PhysMem + ?Sized> {
    /// Host memory.
    pub mem: &'a M,
    /// The domain's gfn -> mfn map.
    pub map: &'a MemoryMap,
}

impl<M: PhysMem + ?Sized> GuestMem<'_, M> {
    /// The host frame backing `gfn`, if the memory map holds it.
    pub fn mfn(&self, gfn: Gfn) -> Option<Mfn> {
        self.map.iter().find_map(|r| r.translate(gfn))
    }

    /// The host-physical address of `gpa`, if in guest memory.
    pub fn hpa(&self, gpa: Gpa) -> Option<Hpa> {
        self.mfn(gpa.frame()).map(|m| m.at(gpa.page_offset()))
    }
}

/// A successful translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The 4 KiB guest frame holding the address.
    pub gfn: Gfn,
    /// The host frame backing it.
    pub mfn: Mfn,
    /// The guest's page size.
    pub size: PageSize,
    /// R/W set at every level.
    pub writable: bool,
    /// U/S set at every level.
    pub user: bool,
    /// Execution forbidden (EFER.NXE and NX at some level).
    pub nx: bool,
    /// The leaf's D bit after the walk.
    pub dirty: bool,
    /// The leaf's G bit.
    pub global: bool,
    /// The guest-physical address of the leaf entry.
    pub leaf: Gpa,
}

/// Why a walk did not produce a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The guest must see a #PF with this error code.
    Fault(PfErrorCode),
    /// The A/D update lost its race [`MAX_WALK_RETRIES`] times; the caller
    /// lets the guest retry the access.
    Contended,
    /// Host memory failed (the memory map names frames that do not exist).
    Memory(MemError),
    /// With MMIO emulation: the access is allowed and targets this
    /// guest-physical address, which is not RAM (A/D are set).
    Mmio(Gpa),
}

impl From<MemError> for WalkError {
    fn from(e: MemError) -> Self {
        WalkError::Memory(e)
    }
}

/// Reserved-bit mask of a present entry at `level` (4..1), `large` if PS is
/// set on a level-3 or level-2 entry.
pub fn reserved_mask(level: u8, large: bool, mode: PagingMode, maxphyaddr: u8) -> u64 {
    let m = u32::from(maxphyaddr.clamp(32, 52));
    let mut r = if m < 52 {
        ((1u64 << 52) - 1) & !((1u64 << m) - 1)
    } else {
        0
    };
    if !mode.nxe() {
        r |= PTE_NX;
    }
    match (level, large) {
        (4, _) => r |= PTE_PS,
        (3, true) => r |= 0x3fff_e000, // bits 29..13
        (2, true) => r |= 0x1f_e000,   // bits 20..13
        _ => {}
    }
    r
}

/// Walks the guest tables for an access described by `access` (its W, U and
/// I bits), setting A/D on success (see the module docs for the rules).
/// `on_write` is called with the guest frame of every entry whose A/D bits
/// the walker set (for dirty logging).
pub fn walk<M: PhysMem + ?Sized>(
    guest: &GuestMem<'_, M>,
    cr3: GuestCr3,
    mode: PagingMode,
    maxphyaddr: u8,
    gva: Gva,
    access: PfErrorCode,
    on_write: &mut dyn FnMut(Gfn),
) -> Result<Translation, WalkError> {
    walk_to(
        guest,
        &|g| guest.mfn(g),
        cr3,
        mode,
        maxphyaddr,
        gva,
        access,
        on_write,
    )
}

/// [`walk`] where the final 4 KiB frame is translated by `leaf_frame`
/// instead of the memory map alone (a server with foreign mappings passes
/// the memory map plus its foreign frames; paging-structure frames still
/// come only from the memory map).
// The arguments are `walk`'s plus the leaf translation.
#[allow(clippy::too_many_arguments)]
pub fn walk_to<M: PhysMem + ?Sized>(
    guest: &GuestMem<'_, M>,
    leaf_frame: &dyn Fn(Gfn) -> Option<Mfn>,
    cr3: GuestCr3,
    mode: PagingMode,
    maxphyaddr: u8,
    gva: Gva,
    access: PfErrorCode,
    on_write: &mut dyn FnMut(Gfn),
) -> Result<Translation, WalkError> {
    let mut code = PfErrorCode(access.0 & (PfErrorCode::W | PfErrorCode::U));
    if access.is_fetch() && mode.nxe() {
        code = code.with(PfErrorCode::I);
    }
    if !gva.is_canonical() {
        return Err(WalkError::Fault(code));
    }
    'retry: for _ in 0..MAX_WALK_RETRIES {
        // (entry's host address, its value) per level walked, top first.
        let mut entries: [(Hpa, u64, Gpa); 4] = [(Hpa(0), 0, Gpa(0)); 4];
        let mut n = 0;
        let mut table = cr3.table();
        let mut writable = true;
        let mut user = true;
        let mut nx = false;
        let mut level = 4u8;
        let (frame_base, size) = loop {
            let entry_gpa = Gpa(table.0 + 8 * gva.table_index(level) as u64);
            let Some(entry_hpa) = guest.hpa(entry_gpa) else {
                return Err(WalkError::Fault(
                    code.with(PfErrorCode::P | PfErrorCode::RSVD),
                ));
            };
            let e = guest.mem.read_u64(entry_hpa)?;
            if e & PTE_P == 0 {
                return Err(WalkError::Fault(code));
            }
            let large = (level == 3 || level == 2) && e & PTE_PS != 0;
            if e & reserved_mask(level, large, mode, maxphyaddr) != 0 {
                return Err(WalkError::Fault(
                    code.with(PfErrorCode::P | PfErrorCode::RSVD),
                ));
            }
            entries[n] = (entry_hpa, e, entry_gpa);
            n += 1;
            writable &= e & PTE_RW != 0;
            user &= e & PTE_US != 0;
            nx |= mode.nxe() && e & PTE_NX != 0;
            if level == 1 || large {
                let size = match level {
                    3 => PageSize::Size1G,
                    2 => PageSize::Size2M,
                    _ => PageSize::Size4K,
                };
                let mask = PTE_ADDR_MASK & !(size.bytes() - 1);
                break (Gpa(e & mask), size);
            }
            table = Gpa(e & PTE_ADDR_MASK);
            level -= 1;
        };
        // The final frame outside guest memory counts as a reserved-bit
        // fault of the leaf, found while walking: before permissions.
        let gpa = Gpa(frame_base.0 + gva.offset_in(size));
        let gfn = gpa.frame();
        let mfn = leaf_frame(gfn);
        if mfn.is_none() && !mode.mmio() {
            return Err(WalkError::Fault(
                code.with(PfErrorCode::P | PfErrorCode::RSVD),
            ));
        }
        // Permissions over all levels.
        let is_user = access.is_user();
        let is_write = access.is_write();
        let denied = (is_user && !user)
            || (is_write && !writable && (is_user || mode.wp()))
            || (access.is_fetch() && nx);
        if denied {
            return Err(WalkError::Fault(code.with(PfErrorCode::P)));
        }
        // Success: set A everywhere, D in the leaf on a write.
        let mut leaf_value = 0;
        for (i, &(hpa, old, entry_gpa)) in entries[..n].iter().enumerate() {
            let is_leaf = i + 1 == n;
            let mut new = old | PTE_A;
            if is_leaf && is_write {
                new |= PTE_D;
            }
            if new != old {
                match guest.mem.compare_exchange_u64(hpa, old, new)? {
                    Ok(_) => on_write(entry_gpa.frame()),
                    Err(_) => continue 'retry,
                }
            }
            if is_leaf {
                leaf_value = new;
            }
        }
        let Some(mfn) = mfn else {
            return Err(WalkError::Mmio(gpa));
        };
        return Ok(Translation {
            gfn,
            mfn,
            size,
            writable,
            user,
            nx,
            dirty: leaf_value & PTE_D != 0,
            global: leaf_value & PTE_G != 0,
            leaf: entries[n - 1].2,
        });
    }
    Err(WalkError::Contended)
}
