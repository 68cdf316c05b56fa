//! The x86-64 architecture as the oracle sees it: PTE bits, access rights,
//! page-fault error codes and an independent 4-level page walker.
//!
//! Nothing here knows about any MMU server: the walker reads memory through
//! a closure and never writes, so it can walk the guest's tables at any
//! moment of the past (see `history`) or the shadow tables.

/// PTE bit: present.
pub const P: u64 = 1 << 0;
/// PTE bit: writable.
pub const RW: u64 = 1 << 1;
/// PTE bit: user accessible.
pub const US: u64 = 1 << 2;
/// PTE bit: accessed.
pub const A: u64 = 1 << 5;
/// PTE bit: dirty (leaf entries only).
pub const D: u64 = 1 << 6;
/// PTE bit: page size (a leaf at level 3 or 2).
pub const PS: u64 = 1 << 7;
/// PTE bit: no-execute (reserved when EFER.NXE is clear).
pub const NX: u64 = 1 << 63;

/// Physical-address width the oracle assumes (bits at and above it, up to
/// bit 51, are reserved in every paging entry). It must match the servers'
/// (`mmu_server::Config::default().maxphyaddr`, pinned by a test): with 52,
/// bits 48..51 are address bits, and an entry using them names memory
/// outside the guest.
pub const MAXPHYADDR: u32 = 52;

/// Page-fault error code bit: the translation was present (protection or
/// reserved-bit fault).
pub const PF_P: u64 = 1 << 0;
/// Page-fault error code bit: the access was a write.
pub const PF_W: u64 = 1 << 1;
/// Page-fault error code bit: the access came from user mode.
pub const PF_U: u64 = 1 << 2;
/// Page-fault error code bit: a reserved bit was set in a paging entry.
pub const PF_RSVD: u64 = 1 << 3;
/// Page-fault error code bit: instruction fetch (reported when EFER.NXE is set).
pub const PF_I: u64 = 1 << 4;

/// Bytes in a 4 KiB page.
pub const PAGE: u64 = 4096;

/// The address bits of a paging entry (bits 12 up to MAXPHYADDR-1).
pub const ADDR_MASK: u64 = ((1u64 << MAXPHYADDR) - 1) & !0xfff;

/// Reserved bits common to every level: MAXPHYADDR..=51.
const RSVD_HIGH: u64 = ((1u64 << 52) - 1) & !((1u64 << MAXPHYADDR) - 1);

/// A page size the guest and the shadows may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Size {
    /// 4 KiB, a level-1 leaf.
    K4,
    /// 2 MiB, a level-2 leaf.
    M2,
    /// 1 GiB, a level-3 leaf.
    G1,
}

impl Size {
    /// Bytes in a page of this size.
    pub const fn bytes(self) -> u64 {
        match self {
            Size::K4 => 1 << 12,
            Size::M2 => 1 << 21,
            Size::G1 => 1 << 30,
        }
    }
    /// The size of a leaf at `level` (1..=3).
    pub const fn of_level(level: u32) -> Size {
        match level {
            1 => Size::K4,
            2 => Size::M2,
            _ => Size::G1,
        }
    }
}

/// One guest (or shadow) memory access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    /// A write (else a read or a fetch).
    pub write: bool,
    /// From CPL 3.
    pub user: bool,
    /// An instruction fetch.
    pub fetch: bool,
}

impl Access {
    /// A supervisor read.
    pub const READ: Access = Access {
        write: false,
        user: false,
        fetch: false,
    };
    /// A supervisor write.
    pub const WRITE: Access = Access {
        write: true,
        user: false,
        fetch: false,
    };
    /// A user read.
    pub const UREAD: Access = Access {
        write: false,
        user: true,
        fetch: false,
    };
    /// A user write.
    pub const UWRITE: Access = Access {
        write: true,
        user: true,
        fetch: false,
    };
    /// A supervisor fetch.
    pub const FETCH: Access = Access {
        write: false,
        user: false,
        fetch: true,
    };
    /// A user fetch.
    pub const UFETCH: Access = Access {
        write: false,
        user: true,
        fetch: true,
    };
    /// All six kinds of access, for comparing rights.
    pub const ALL: [Access; 6] = [
        Access::READ,
        Access::WRITE,
        Access::UREAD,
        Access::UWRITE,
        Access::FETCH,
        Access::UFETCH,
    ];
    /// Short name used in failure reports.
    pub fn name(self) -> &'static str {
        match (self.user, self.write, self.fetch) {
            (false, false, false) => "read",
            (false, true, _) => "write",
            (true, false, false) => "user-read",
            (true, true, _) => "user-write",
            (false, false, true) => "fetch",
            (true, false, true) => "user-fetch",
        }
    }
}

/// The paging-related control bits of one vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ctrl {
    /// CR0.WP: supervisor writes honour R/W.
    pub wp: bool,
    /// EFER.NXE: bit 63 is NX instead of reserved.
    pub nxe: bool,
    /// CR0.PG: paging on (4-level long mode); off, every address is its own
    /// guest-physical address with every right (see [`walk`]).
    pub paging: bool,
    /// The kernel emulates accesses outside RAM (`PagingMode::MMIO`): an
    /// allowed access whose frame is not guest memory gets `Mmio`, not a
    /// #PF. Implied with paging off.
    pub mmio: bool,
}

impl Ctrl {
    /// The usual setting: long mode with WP and NXE on, accesses outside
    /// RAM fault (Umbra's own guests).
    pub const DEFAULT: Ctrl = Ctrl {
        wp: true,
        nxe: true,
        paging: true,
        mmio: false,
    };
    /// Long mode with MMIO emulation, as an unmodified guest runs after it
    /// enabled paging.
    pub const LONG_MMIO: Ctrl = Ctrl {
        mmio: true,
        ..Ctrl::DEFAULT
    };
    /// Paging off, as an unmodified Multiboot guest starts (WP and NXE as
    /// it will set them; they change nothing while paging is off).
    pub const OFF: Ctrl = Ctrl {
        paging: false,
        mmio: true,
        ..Ctrl::DEFAULT
    };
    /// Whether an access outside RAM is answered `Mmio` rather than a #PF.
    pub fn emulates_mmio(self) -> bool {
        self.mmio || !self.paging
    }
}

/// The rights a translation gives, combined over all levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rights {
    /// R/W set at every level.
    pub write: bool,
    /// U/S set at every level.
    pub user: bool,
    /// NX set at some level (and NXE on).
    pub nx: bool,
}

impl Rights {
    /// Whether these rights allow `acc` under `ctrl`.
    pub fn allows(self, acc: Access, ctrl: Ctrl) -> bool {
        if acc.user && !self.user {
            return false;
        }
        if acc.write && !self.write && (acc.user || ctrl.wp) {
            return false;
        }
        if acc.fetch && ctrl.nxe && self.nx {
            return false;
        }
        true
    }
    /// Whether every access `self` allows under `ctrl`, `other` allows
    /// under `other_ctrl` too.
    pub fn within(self, ctrl: Ctrl, other: Rights, other_ctrl: Ctrl) -> bool {
        Access::ALL
            .iter()
            .all(|&a| !self.allows(a, ctrl) || other.allows(a, other_ctrl))
    }
}

impl core::fmt::Display for Rights {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{}{}{}",
            if self.write { "W" } else { "R" },
            if self.user { "U" } else { "S" },
            if self.nx { "-NX" } else { "" }
        )
    }
}

/// The error code the architecture reports for `acc` (bits W, U, I/D).
pub fn access_bits(acc: Access, ctrl: Ctrl) -> u64 {
    let mut ec = 0;
    if acc.write {
        ec |= PF_W;
    }
    if acc.user {
        ec |= PF_U;
    }
    if acc.fetch && ctrl.nxe {
        ec |= PF_I;
    }
    ec
}

/// A successful walk: the leaf and the entries read on the way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Leaf {
    /// Physical address (gpa or hpa) of the start of the page.
    pub base: u64,
    /// The page's size.
    pub size: Size,
    /// Combined rights.
    pub rights: Rights,
    /// Addresses of the entries read, top level first (`depth` of them).
    pub path: [u64; 4],
    /// Entry values read, matching `path`.
    pub vals: [u64; 4],
    /// Entries walked (2 for a 1 GiB leaf, 3 for 2 MiB, 4 for 4 KiB).
    pub depth: usize,
}

impl Leaf {
    /// The physical address `va` translates to through this leaf.
    pub fn phys(&self, va: u64) -> u64 {
        self.base + (va & (self.size.bytes() - 1))
    }
}

/// What a walk ends in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Walk {
    /// A translation (its rights may still refuse the access: see `check`).
    Ok(Leaf),
    /// A not-present or reserved-bit fault with its error code (without the
    /// access bits W/U/I, which `fault_code` adds).
    Fault {
        /// P and RSVD bits of the error code.
        ec: u64,
        /// Entries read before the faulting one (the faulting one included).
        path: [u64; 4],
        /// How many of `path` are valid.
        depth: usize,
    },
    /// An entry's address lies outside the memory being walked.
    Outside {
        /// The unreadable address.
        addr: u64,
        /// Entries read before it (the unreadable one included).
        path: [u64; 4],
        /// How many of `path` are valid.
        depth: usize,
    },
}

impl Walk {
    /// The entry addresses the walk read (the last one may be unreadable).
    pub fn path(&self) -> &[u64] {
        match self {
            Walk::Ok(l) => &l.path[..l.depth],
            Walk::Fault { path, depth, .. } | Walk::Outside { path, depth, .. } => &path[..*depth],
        }
    }
}

/// Walks the 4-level tables rooted at `cr3` for `va`, reading entries with
/// `read` (`None` means the address is outside memory). Never writes.
/// With paging off (`!ctrl.paging`) nothing is read: `va` is its own
/// physical address, a 4 KiB leaf of depth 0 with every right.
pub fn walk(read: &dyn Fn(u64) -> Option<u64>, cr3: u64, va: u64, ctrl: Ctrl) -> Walk {
    if !ctrl.paging {
        return Walk::Ok(Leaf {
            base: va & !(PAGE - 1),
            size: Size::K4,
            rights: Rights {
                write: true,
                user: true,
                nx: false,
            },
            path: [0; 4],
            vals: [0; 4],
            depth: 0,
        });
    }
    let mut table = cr3 & ADDR_MASK;
    let mut rights = Rights {
        write: true,
        user: true,
        nx: false,
    };
    let mut path = [0u64; 4];
    let mut vals = [0u64; 4];
    for (i, level) in (1..=4u32).rev().enumerate() {
        let idx = (va >> (12 + 9 * (level - 1))) & 511;
        let addr = table + idx * 8;
        path[i] = addr;
        let Some(e) = read(addr) else {
            return Walk::Outside {
                addr,
                path,
                depth: i + 1,
            };
        };
        vals[i] = e;
        if e & P == 0 {
            return Walk::Fault {
                ec: 0,
                path,
                depth: i + 1,
            };
        }
        let leaf = level == 1 || (level <= 3 && e & PS != 0);
        let mut rsvd = RSVD_HIGH;
        if !ctrl.nxe {
            rsvd |= NX;
        }
        if level == 4 {
            rsvd |= PS;
        }
        if leaf && level == 3 {
            rsvd |= ((1 << 30) - 1) & !0x1fff;
        }
        if leaf && level == 2 {
            rsvd |= ((1 << 21) - 1) & !0x1fff;
        }
        if e & rsvd != 0 {
            return Walk::Fault {
                ec: PF_P | PF_RSVD,
                path,
                depth: i + 1,
            };
        }
        rights.write &= e & RW != 0;
        rights.user &= e & US != 0;
        rights.nx |= ctrl.nxe && e & NX != 0;
        if leaf {
            let size = Size::of_level(level);
            return Walk::Ok(Leaf {
                base: e & ADDR_MASK & !(size.bytes() - 1),
                size,
                rights,
                path,
                vals,
                depth: i + 1,
            });
        }
        table = e & ADDR_MASK;
    }
    unreachable!("a 4-level walk ends at level 1")
}

/// The page fault `acc` at `va` takes given `w` (None: no fault).
pub fn fault_code(w: &Walk, acc: Access, ctrl: Ctrl) -> Option<u64> {
    match w {
        Walk::Ok(leaf) if leaf.rights.allows(acc, ctrl) => None,
        Walk::Ok(_) => Some(PF_P | access_bits(acc, ctrl)),
        Walk::Fault { ec, .. } => Some(ec | access_bits(acc, ctrl)),
        Walk::Outside { .. } => None,
    }
}

/// Sign-extends a 48-bit virtual address to canonical form.
pub const fn canonical(va: u64) -> u64 {
    (((va << 16) as i64) >> 16) as u64
}

/// Index of `va` at `level` (4 = PML4).
pub const fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * (level - 1))) & 511
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn maxphyaddr_matches_the_servers() {
        assert_eq!(
            MAXPHYADDR,
            u32::from(mmu_server::Config::default().maxphyaddr)
        );
    }

    fn mem(entries: &[(u64, u64)]) -> BTreeMap<u64, u64> {
        entries.iter().copied().collect()
    }

    #[test]
    fn walks_4k_2m_1g_and_combines_rights() {
        let m = mem(&[
            (0x1000, 0x2000 | P | RW | US),
            (0x2000, 0x3000 | P | RW | US),
            (0x2008, 0x4000_0000 | P | PS | US),
            (0x3000, 0x4000 | P | US | NX),
            (0x3008, 0x20_0000 | P | RW | PS),
            (0x4000, 0x9000 | P | RW | US),
        ]);
        let r = |a| Some(*m.get(&a).unwrap_or(&0));
        let c = Ctrl::DEFAULT;
        let Walk::Ok(l) = walk(&r, 0x1000, 0x123, c) else {
            panic!()
        };
        assert_eq!((l.base, l.size, l.depth), (0x9000, Size::K4, 4));
        assert_eq!(
            l.rights,
            Rights {
                write: false,
                user: true,
                nx: true
            }
        );
        let Walk::Ok(l) = walk(&r, 0x1000, 0x20_1234, c) else {
            panic!()
        };
        assert_eq!((l.base, l.size), (0x20_0000, Size::M2));
        assert_eq!(l.phys(0x20_1234), 0x20_1234);
        let Walk::Ok(l) = walk(&r, 0x1000, 0x4000_5000, c) else {
            panic!()
        };
        assert_eq!((l.base, l.size), (0x4000_0000, Size::G1));
        assert_eq!(
            fault_code(&walk(&r, 0x1000, 0x4000_5000, c), Access::WRITE, c),
            Some(PF_P | PF_W)
        );
        // WP off: supervisor writes to read-only pages pass.
        let nowp = Ctrl {
            wp: false,
            ..Ctrl::DEFAULT
        };
        assert_eq!(
            fault_code(&walk(&r, 0x1000, 0x4000_5000, nowp), Access::WRITE, nowp),
            None
        );
        // NX with NXE off is reserved.
        let nonx = Ctrl {
            nxe: false,
            ..Ctrl::DEFAULT
        };
        assert_eq!(
            fault_code(&walk(&r, 0x1000, 0x123, nonx), Access::READ, nonx),
            Some(PF_P | PF_RSVD)
        );
        // Not present.
        assert_eq!(
            fault_code(&walk(&r, 0x1000, 0x5000, c), Access::UFETCH, c),
            Some(PF_U | PF_I)
        );
        // Reserved low bits of a 2 MiB leaf.
        let m2 = mem(&[
            (0x1000, 0x2000 | P),
            (0x2000, 0x3000 | P),
            (0x3000, 0x20_2000 | P | PS),
        ]);
        let r2 = |a| Some(*m2.get(&a).unwrap_or(&0));
        assert_eq!(
            fault_code(&walk(&r2, 0x1000, 0, c), Access::READ, c),
            Some(PF_P | PF_RSVD)
        );
        // Paging off: the identity with every right, nothing read, even
        // where the tables at CR3 would fault.
        let off = Ctrl::OFF;
        let Walk::Ok(l) = walk(&|_| None, 0x1000, 0x5123, off) else {
            panic!()
        };
        assert_eq!((l.base, l.size, l.depth), (0x5000, Size::K4, 0));
        assert_eq!(l.phys(0x5123), 0x5123);
        for acc in Access::ALL {
            assert_eq!(fault_code(&walk(&r2, 0x1000, 0, off), acc, off), None);
        }
        assert!(off.emulates_mmio() && !Ctrl::DEFAULT.emulates_mmio());
    }
}
