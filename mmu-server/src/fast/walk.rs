//! The guest page walker: 4-level long mode, 4 KiB / 2 MiB / 1 GiB pages,
//! permissions, reserved bits, and the guest's own A/D bits set as the
//! hardware would.

use abi::mem::{MemError, PhysMem};
use abi::mmu::MemoryMap;
use abi::paging::{GuestCr3, PagingMode, PfErrorCode};
use abi::{Gfn, Gpa, Gva, Hpa, Mfn};

/// Guest entry: present.
pub const G_P: u64 = 1 << 0;
/// Guest entry: writable.
pub const G_W: u64 = 1 << 1;
/// Guest entry: user.
pub const G_U: u64 = 1 << 2;
/// Guest entry: accessed.
pub const G_A: u64 = 1 << 5;
/// Guest entry: dirty.
pub const G_D: u64 = 1 << 6;
/// Guest entry: page size (levels 2 and 3).
pub const G_PS: u64 = 1 << 7;
/// Guest entry: no execute.
pub const G_NX: u64 = 1 << 63;
/// Guest entry: address bits.
pub const G_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// The guest frame backing `gfn` in `memory`.
pub fn gfn_to_mfn(memory: &MemoryMap, gfn: Gfn) -> Option<Mfn> {
    memory.iter().find_map(|r| r.translate(gfn))
}

/// The guest frame that `mfn` backs in `memory` (the map is a bijection).
pub fn mfn_to_gfn(memory: &MemoryMap, mfn: Mfn) -> Option<Gfn> {
    memory.iter().find_map(|r| {
        (mfn.0 >= r.mfn.0 && mfn.0 - r.mfn.0 < r.pages).then(|| Gfn(r.gfn.0 + (mfn.0 - r.mfn.0)))
    })
}

fn addr_mask(maxphyaddr: u8) -> u64 {
    if maxphyaddr >= 52 {
        u64::MAX
    } else {
        (1u64 << maxphyaddr) - 1
    }
}

/// Reserved bits of a present guest entry at `level` (with PS as given).
/// `maxphyaddr` is the guest's physical-address width.
pub fn reserved_bits(level: u8, pte: u64, mode: PagingMode, maxphyaddr: u8) -> u64 {
    let addr_high = if maxphyaddr >= 52 {
        0
    } else {
        ((1u64 << 52) - 1) & !((1u64 << maxphyaddr) - 1)
    };
    let mut rsvd = addr_high;
    if !mode.nxe() {
        rsvd |= G_NX;
    }
    let ps = pte & G_PS != 0;
    match level {
        4 => rsvd |= G_PS,
        3 if ps => rsvd |= 0x3fff_e000, // bits 29:13
        2 if ps => rsvd |= 0x001f_e000, // bits 20:13
        _ => {}
    }
    pte & rsvd
}

/// The result of a successful walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walk {
    /// The guest frame of the 4 KiB page holding the address.
    pub gfn: Gfn,
    /// The level of the leaf (1, or 2 / 3 for large pages; 4 for the
    /// identity of paging off, which has no guest entry at all).
    pub leaf_level: u8,
    /// The guest frame of each table walked, by level (index 4..=1; entries
    /// below the leaf are unused).
    pub tables: [Gfn; 5],
    /// Effective writability (AND of W over the levels).
    pub w: bool,
    /// Effective user access (AND of U).
    pub u: bool,
    /// Effective no-execute (OR of NX, with EFER.NXE).
    pub nx: bool,
    /// The leaf's D bit after the walk.
    pub dirty: bool,
    /// Levels (bit `l`) whose guest entry the walk changed (A or D set).
    pub changed: u8,
    /// Access accumulated down to and including level `l`: (W, U, NX).
    pub acc: [(bool, bool, bool); 5],
}

/// Why a walk did not produce a translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WalkError {
    /// The guest sees this #PF error code.
    Fault(PfErrorCode),
    /// A table or frame the guest named is outside its memory: the guest
    /// gets a #PF with P | RSVD (this error code), never a mapping.
    OutsideMemory(PfErrorCode),
    /// Physical memory failed.
    Mem(MemError),
    /// Guest entries kept changing under the walker (it restarts the walk
    /// when setting A/D finds an entry changed).
    Contended,
    /// The mode has MMIO emulation ([`PagingMode::mmio`]) and the access,
    /// allowed by the guest, targets this guest-physical address outside
    /// RAM and foreign frames. The walk (whose A/D updates the caller logs
    /// like any walk's) is the one that got there.
    Mmio(Gpa, Walk),
}

impl From<MemError> for WalkError {
    fn from(e: MemError) -> Self {
        WalkError::Mem(e)
    }
}

/// Walks the guest tables for `gva` with the access in `access` (W/U/I
/// bits). On success sets A on every level and D on the leaf for a write,
/// as hardware does.
/// `foreign` says which gfns outside the memory map hold a foreign frame:
/// a walk may end in one (never read a guest table from one).
// The arguments are the walk's inputs, none of them a natural group.
#[allow(clippy::too_many_arguments)]
pub fn walk(
    mem: &dyn PhysMem,
    memory: &MemoryMap,
    foreign: &dyn Fn(Gfn) -> bool,
    maxphyaddr: u8,
    cr3: GuestCr3,
    mode: PagingMode,
    gva: Gva,
    access: PfErrorCode,
) -> Result<Walk, WalkError> {
    for _ in 0..MAX_WALK_RETRIES {
        match walk_once(mem, memory, foreign, maxphyaddr, cr3, mode, gva, access) {
            Err(WalkError::Contended) => continue,
            r => return r,
        }
    }
    Err(WalkError::Contended)
}

/// With paging off ([`PagingMode::OFF`]): the identity translation of
/// `gva`, as a walk that ends above level 3 (every shadow level below the
/// root is direct) with every right and the leaf dirty, or
/// [`WalkError::Mmio`] when the frame is neither RAM nor foreign. The caller
/// refuses addresses at or above 4 GiB first.
pub fn identity(
    memory: &MemoryMap,
    foreign: &dyn Fn(Gfn) -> bool,
    gva: Gva,
) -> Result<Walk, WalkError> {
    let gfn = Gfn(gva.0 >> 12);
    let walk = Walk {
        gfn,
        leaf_level: 4,
        tables: [Gfn(0); 5],
        w: true,
        u: true,
        nx: false,
        dirty: true,
        changed: 0,
        acc: [(true, true, false); 5],
    };
    if gfn_to_mfn(memory, gfn).is_none() && !foreign(gfn) {
        return Err(WalkError::Mmio(Gpa(gva.0), walk));
    }
    Ok(walk)
}

/// Walks before giving up with [`WalkError::Contended`].
pub const MAX_WALK_RETRIES: usize = 8;

// The arguments are `walk`'s.
#[allow(clippy::too_many_arguments)]
fn walk_once(
    mem: &dyn PhysMem,
    memory: &MemoryMap,
    foreign: &dyn Fn(Gfn) -> bool,
    maxphyaddr: u8,
    cr3: GuestCr3,
    mode: PagingMode,
    gva: Gva,
    access: PfErrorCode,
) -> Result<Walk, WalkError> {
    let access = access.access();
    let fetch_bit = if mode.nxe() || mode.has(PagingMode::SMEP) {
        access.0 & PfErrorCode::I
    } else {
        0
    };
    let access_ec = PfErrorCode((access.0 & !PfErrorCode::I) | fetch_bit);
    let mut table = Gfn((cr3.0 & G_ADDR & addr_mask(maxphyaddr)) >> 12);
    let mut tables = [Gfn(0); 5];
    let mut entries = [Hpa(0); 5];
    let mut seen = [0u64; 5];
    let (mut w, mut u, mut nx) = (true, true, false);
    let mut acc = [(true, true, false); 5];
    let mut level = 4u8;
    let leaf_pte;
    loop {
        tables[level as usize] = table;
        let Some(mfn) = gfn_to_mfn(memory, table) else {
            return Err(WalkError::OutsideMemory(
                access_ec.with(PfErrorCode::P | PfErrorCode::RSVD),
            ));
        };
        let at = mfn
            .base()
            .checked_add(8 * gva.table_index(level) as u64)
            .unwrap_or(Hpa(0));
        entries[level as usize] = at;
        let pte = mem.read_u64(at)?;
        seen[level as usize] = pte;
        if pte & G_P == 0 {
            return Err(WalkError::Fault(access_ec));
        }
        if reserved_bits(level, pte, mode, maxphyaddr) != 0 {
            return Err(WalkError::Fault(
                access_ec.with(PfErrorCode::P | PfErrorCode::RSVD),
            ));
        }
        w &= pte & G_W != 0;
        u &= pte & G_U != 0;
        nx |= mode.nxe() && pte & G_NX != 0;
        acc[level as usize] = (w, u, nx);
        if level == 1 || (level <= 3 && pte & G_PS != 0) {
            leaf_pte = pte;
            break;
        }
        table = Gfn((pte & G_ADDR & addr_mask(maxphyaddr)) >> 12);
        level -= 1;
    }
    let prot = access_ec.with(PfErrorCode::P);
    let user = access.is_user();
    if user && !u {
        return Err(WalkError::Fault(prot));
    }
    if access.is_write() && !w && (user || mode.wp()) {
        return Err(WalkError::Fault(prot));
    }
    if access.is_fetch() && (nx || (!user && u && mode.has(PagingMode::SMEP))) {
        return Err(WalkError::Fault(prot));
    }
    if !user && !access.is_fetch() && u && mode.has(PagingMode::SMAP) {
        return Err(WalkError::Fault(prot));
    }
    let leaf_level = level;
    let page_frames = 1u64 << (9 * (leaf_level as u32 - 1));
    let base = (leaf_pte & G_ADDR & addr_mask(maxphyaddr)) >> 12;
    let base = base & !(page_frames - 1);
    let gfn = Gfn(base + ((gva.0 >> 12) & (page_frames - 1)));
    let outside = gfn_to_mfn(memory, gfn).is_none() && !foreign(gfn);
    if outside && !mode.mmio() {
        return Err(WalkError::OutsideMemory(
            access_ec.with(PfErrorCode::P | PfErrorCode::RSVD),
        ));
    }
    // Set A on every level walked (top down), D on the leaf for a write.
    let mut changed = 0u8;
    let mut dirty = leaf_pte & G_D != 0;
    for l in (leaf_level..=4).rev() {
        let at = entries[l as usize];
        let want = if l == leaf_level && access.is_write() {
            G_A | G_D
        } else {
            G_A
        };
        let cur = mem.read_u64(at)?;
        if cur & !(G_A | G_D) != seen[l as usize] & !(G_A | G_D) {
            return Err(WalkError::Contended);
        }
        if cur & want != want {
            match mem.compare_exchange_u64(at, cur, cur | want)? {
                Ok(_) => changed |= 1 << l,
                Err(_) => return Err(WalkError::Contended),
            }
        }
        if l == leaf_level {
            dirty |= want & G_D != 0 || cur & G_D != 0;
        }
    }
    let walk = Walk {
        gfn,
        leaf_level,
        tables,
        w,
        u,
        nx,
        dirty,
        changed,
        acc,
    };
    if outside {
        return Err(WalkError::Mmio(Gpa(gfn.base().0 | gva.page_offset()), walk));
    }
    Ok(walk)
}
