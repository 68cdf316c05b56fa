//! The guest walker against hand-built guest tables in simulated memory.

use abi::mmu::MemoryMap;
use abi::*;
use mmu_server::sim::{GuestTables, SimMem};
use mmu_server::walk::*;

const R: u32 = 0;
const W: u32 = PfErrorCode::W;
const U: u32 = PfErrorCode::U;
const I: u32 = PfErrorCode::I;
const P: u32 = PfErrorCode::P;
const RSVD: u32 = PfErrorCode::RSVD;
const NXE: PagingMode = PagingMode(PagingMode::WP | PagingMode::NXE);

mod common;
use common::memory as setup;

struct Ctx<'a> {
    t: GuestTables<'a>,
    pml4: Gfn,
}

fn ctx<'a>(mem: &'a SimMem, map: &MemoryMap) -> Ctx<'a> {
    let mut t = GuestTables::new(mem, map.clone(), Gfn(0x200));
    let pml4 = t.alloc_table();
    Ctx { t, pml4 }
}

impl Ctx<'_> {
    fn walk(&self, mode: PagingMode, gva: u64, access: u32) -> Result<Translation, WalkError> {
        self.walk_m(mode, 52, gva, access)
    }
    fn walk_m(
        &self,
        mode: PagingMode,
        maxphy: u8,
        gva: u64,
        access: u32,
    ) -> Result<Translation, WalkError> {
        let g = GuestMem {
            mem: self.t.mem,
            map: &self.t.map,
        };
        walk(
            &g,
            GuestCr3(self.pml4.base().0),
            mode,
            maxphy,
            Gva(gva),
            PfErrorCode(access),
            &mut |_| {},
        )
    }
    fn entry(&self, gva: u64, level: u8) -> u64 {
        self.t
            .read(self.t.entry(self.pml4, Gva(gva), level).unwrap())
    }
}

fn fault(code: u32) -> Result<Translation, WalkError> {
    Err(WalkError::Fault(PfErrorCode(code)))
}

#[test]
fn read_sets_accessed_on_every_level_but_not_dirty() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    c.t.map(
        c.pml4,
        Gva(0x40_1000),
        Gpa(0x5000),
        PageSize::Size4K,
        PTE_RW | PTE_US,
    );
    let t = c.walk(NXE, 0x40_1234, U).unwrap();
    assert_eq!(
        (t.gfn, t.mfn, t.size),
        (Gfn(5), Mfn(1029), PageSize::Size4K)
    );
    assert!(t.writable && t.user && !t.nx && !t.dirty);
    for level in 1..=4 {
        assert_ne!(c.entry(0x40_1000, level) & PTE_A, 0, "A at level {level}");
    }
    assert_eq!(c.entry(0x40_1000, 1) & PTE_D, 0);
    assert_eq!(c.entry(0x40_1000, 2) & PTE_D, 0, "D only in the leaf");
}

#[test]
fn write_sets_dirty_in_the_leaf() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    c.t.map(c.pml4, Gva(0x1000), Gpa(0x7000), PageSize::Size4K, PTE_RW);
    let t = c.walk(NXE, 0x1008, W).unwrap();
    assert!(t.dirty && !t.user);
    assert_ne!(c.entry(0x1000, 1) & PTE_D, 0);
}

#[test]
fn not_present_at_each_level() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    assert_eq!(c.walk(NXE, 0x1000, W | U), fault(W | U));
    c.t.map(
        c.pml4,
        Gva(0x1000),
        Gpa(0x7000),
        PageSize::Size4K,
        PTE_RW | PTE_US,
    );
    for level in 1..=4 {
        let at = c.t.entry(c.pml4, Gva(0x1000), level).unwrap();
        let old = c.t.read(at);
        c.t.write(at, old & !PTE_P);
        assert_eq!(c.walk(NXE, 0x1000, R), fault(R), "level {level}");
        c.t.write(at, old);
    }
    assert!(c.walk(NXE, 0x1000, R).is_ok());
}

#[test]
fn user_and_write_permissions_combine_all_levels() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    c.t.map(
        c.pml4,
        Gva(0x1000),
        Gpa(0x7000),
        PageSize::Size4K,
        PTE_RW | PTE_US,
    );
    // Clear U/S in the PDPTE only: user access faults, supervisor is fine.
    let pdpte = c.t.entry(c.pml4, Gva(0x1000), 3).unwrap();
    c.t.write(pdpte, c.t.read(pdpte) & !PTE_US);
    assert_eq!(c.walk(NXE, 0x1000, U), fault(P | U));
    assert!(c.walk(NXE, 0x1000, W).is_ok());
    // Clear R/W in the PDE: writes fault for users and (WP=1) supervisor.
    c.t.write(pdpte, c.t.read(pdpte) | PTE_US);
    let pde = c.t.entry(c.pml4, Gva(0x1000), 2).unwrap();
    c.t.write(pde, c.t.read(pde) & !PTE_RW);
    assert_eq!(c.walk(NXE, 0x1000, W | U), fault(P | W | U));
    assert_eq!(c.walk(NXE, 0x1000, W), fault(P | W));
    // CR0.WP = 0: the supervisor may write, the user still may not.
    let nowp = PagingMode(PagingMode::NXE);
    let t = c.walk(nowp, 0x1000, W).unwrap();
    assert!(!t.writable && t.dirty);
    assert_eq!(c.walk(nowp, 0x1000, W | U), fault(P | W | U));
    assert!(c.walk(NXE, 0x1000, U).is_ok());
}

#[test]
fn nx_with_and_without_nxe() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    c.t.map(
        c.pml4,
        Gva(0x1000),
        Gpa(0x7000),
        PageSize::Size4K,
        PTE_US | PTE_NX,
    );
    assert_eq!(c.walk(NXE, 0x1000, I | U), fault(P | I | U));
    let t = c.walk(NXE, 0x1000, U).unwrap();
    assert!(t.nx);
    // NXE = 0: bit 63 is reserved; the I bit is not reported.
    let nonxe = PagingMode(PagingMode::WP);
    assert_eq!(c.walk(nonxe, 0x1000, I | U), fault(P | RSVD | U));
    assert_eq!(c.walk(nonxe, 0x1000, U), fault(P | RSVD | U));
    // Fetch from an executable page with NXE = 0: fine, no I anywhere.
    c.t.map(c.pml4, Gva(0x2000), Gpa(0x8000), PageSize::Size4K, PTE_US);
    assert!(c.walk(nonxe, 0x2000, I | U).is_ok());
    assert_eq!(c.walk(nonxe, 0x3000, I | U), fault(U));
    assert_eq!(c.walk(NXE, 0x3000, I | U), fault(I | U));
}

#[test]
fn reserved_bits() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    c.t.map(c.pml4, Gva(0x1000), Gpa(0x7000), PageSize::Size4K, PTE_RW);
    // Bit 45 is reserved with MAXPHYADDR 40 but not with 52... and 52-bit
    // addresses then name frames outside the guest.
    let pte = c.t.entry(c.pml4, Gva(0x1000), 1).unwrap();
    let good = c.t.read(pte);
    c.t.write(pte, good | (1 << 45));
    assert_eq!(c.walk_m(NXE, 40, 0x1000, W), fault(P | W | RSVD));
    assert_eq!(
        c.walk_m(NXE, 52, 0x1000, W),
        fault(P | W | RSVD),
        "outside guest"
    );
    c.t.write(pte, good);
    // PS in a PML4E is reserved.
    let pml4e = c.t.entry(c.pml4, Gva(0x1000), 4).unwrap();
    c.t.write(pml4e, c.t.read(pml4e) | PTE_PS);
    assert_eq!(c.walk(NXE, 0x1000, R), fault(P | RSVD));
    let a_before = c.entry(0x1000, 1) & PTE_A;
    assert_eq!(a_before, 0, "a faulting walk sets no A bit");
    c.t.write(pml4e, c.t.read(pml4e) & !PTE_PS);
    // Large pages: bits 20..13 (2 MiB) and 29..13 (1 GiB) are reserved.
    let pde = c.t.map(
        c.pml4,
        Gva(0x20_0000),
        Gpa(0x20_0000),
        PageSize::Size2M,
        PTE_RW,
    );
    c.t.write(pde, c.t.read(pde) | (1 << 13));
    assert_eq!(c.walk(NXE, 0x20_0000, R), fault(P | RSVD));
    c.t.write(pde, c.t.read(pde) & !(1 << 13));
    assert!(c.walk(NXE, 0x20_0000, R).is_ok());
    // PAT bit 12 of a large page is not reserved.
    c.t.write(pde, c.t.read(pde) | (1 << 12));
    assert!(c.walk(NXE, 0x20_0000, R).is_ok());
    let pdpte =
        c.t.map(c.pml4, Gva(0x4000_0000), Gpa(0), PageSize::Size1G, PTE_RW);
    c.t.write(pdpte, c.t.read(pdpte) | (1 << 20));
    assert_eq!(c.walk(NXE, 0x4000_0000, R), fault(P | RSVD));
}

#[test]
fn large_pages_translate_with_offsets() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    c.t.map(
        c.pml4,
        Gva(0x8000_0000),
        Gpa(0x20_0000),
        PageSize::Size2M,
        PTE_RW,
    );
    let t = c.walk(NXE, 0x8003_4567, W).unwrap();
    assert_eq!((t.gfn, t.size), (Gfn(0x234), PageSize::Size2M));
    assert_ne!(c.entry(0x8000_0000, 2) & PTE_D, 0);
    // A 1 GiB page at guest 0: only its first 1024 frames are guest memory.
    c.t.map(
        c.pml4,
        Gva(0x40_0000_0000),
        Gpa(0),
        PageSize::Size1G,
        PTE_RW,
    );
    let t = c.walk(NXE, 0x40_0012_3456, R).unwrap();
    assert_eq!(
        (t.gfn, t.mfn, t.size),
        (Gfn(0x123), Mfn(1024 + 0x123), PageSize::Size1G)
    );
    assert_eq!(
        c.walk(NXE, 0x40_0040_0000, R),
        fault(P | RSVD),
        "beyond guest memory"
    );
}

#[test]
fn tables_outside_guest_memory_fault() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    c.t.map(c.pml4, Gva(0x1000), Gpa(0x7000), PageSize::Size4K, PTE_RW);
    let pde = c.t.entry(c.pml4, Gva(0x1000), 2).unwrap();
    // The PDE points at a page table outside the guest (gfn 5000).
    c.t.write(pde, 5000 << 12 | PTE_P | PTE_RW);
    assert_eq!(c.walk(NXE, 0x1000, W), fault(P | W | RSVD));
    // CR3 outside the guest.
    let g = GuestMem {
        mem: &mem,
        map: &map,
    };
    let r = walk(
        &g,
        GuestCr3(9000 << 12),
        NXE,
        52,
        Gva(0),
        PfErrorCode(0),
        &mut |_| {},
    );
    assert_eq!(r, fault(P | RSVD));
}

#[test]
fn self_referencing_tables_terminate() {
    let (mem, map) = setup();
    let c = ctx(&mem, &map);
    // PML4 slot 0x1ff points at the PML4 itself (a recursive mapping).
    let slot = Gpa(c.pml4.base().0 + 8 * 0x1ff);
    c.t.write(slot, c.pml4.base().0 | PTE_P | PTE_RW);
    // 0xffff_ffff_ffff_f000 walks the PML4 four times and maps it as data.
    let t = c.walk(NXE, 0xffff_ffff_ffff_f000, W).unwrap();
    assert_eq!(t.gfn, c.pml4);
    let e = c.t.read(slot);
    assert_ne!(e & PTE_A, 0);
    assert_ne!(e & PTE_D, 0, "the leaf is the same entry");
}

#[test]
fn non_canonical_is_not_present() {
    let (mem, map) = setup();
    let c = ctx(&mem, &map);
    assert_eq!(c.walk(NXE, 0x8000_0000_0000, W), fault(W));
}

#[test]
fn dirty_callback_names_written_table_frames() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    c.t.map(c.pml4, Gva(0x1000), Gpa(0x7000), PageSize::Size4K, PTE_RW);
    let g = GuestMem {
        mem: &mem,
        map: &map,
    };
    let mut seen = Vec::new();
    let cr3 = GuestCr3(c.pml4.base().0);
    walk(&g, cr3, NXE, 52, Gva(0x1000), PfErrorCode(W), &mut |f| {
        seen.push(f)
    })
    .unwrap();
    assert_eq!(seen.len(), 4);
    assert_eq!(seen[0], c.pml4);
    seen.clear();
    // Second read: A already set everywhere, D set: nothing written.
    walk(&g, cr3, NXE, 52, Gva(0x1000), PfErrorCode(W), &mut |f| {
        seen.push(f)
    })
    .unwrap();
    assert!(seen.is_empty());
}

#[test]
fn outside_memory_takes_priority_over_permissions() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    // Supervisor-only, read-only page at a frame outside the guest.
    c.t.map(c.pml4, Gva(0x1000), Gpa(5000 << 12), PageSize::Size4K, 0);
    assert_eq!(c.walk(NXE, 0x1000, W | U), fault(P | RSVD | W | U));
}

#[test]
fn a_leaf_outside_memory_is_rsvd_without_mmio_emulation_and_mmio_with_it() {
    let (mem, map) = setup();
    let mut c = ctx(&mem, &map);
    // Guest RAM is frames 0..1024: 0xfee0_0000 (the APIC) is outside.
    c.t.map(
        c.pml4,
        Gva(0x1000),
        Gpa(0xfee0_0000),
        PageSize::Size4K,
        PTE_US,
    );
    let mmio = PagingMode(NXE.0 | PagingMode::MMIO);
    // Without MMIO emulation: a reserved-bit fault, before permissions.
    assert_eq!(c.walk(NXE, 0x1000, W | U), fault(P | RSVD | W | U));
    assert_eq!(
        c.entry(0x1000, 1) & PTE_A,
        0,
        "a faulting walk writes nothing"
    );
    // With it: permissions first (a read-only leaf refuses the write)...
    assert_eq!(c.walk(mmio, 0x1000, W | U), fault(P | W | U));
    assert_eq!(c.entry(0x1000, 1) & PTE_A, 0);
    // ...then an allowed access ends in Mmio, with A (and D for a write) set
    // as for any completed walk.
    assert_eq!(
        c.walk(mmio, 0x10b0, U),
        Err(WalkError::Mmio(Gpa(0xfee0_00b0)))
    );
    for level in 1..=4 {
        assert_ne!(c.entry(0x1000, level) & PTE_A, 0, "A at level {level}");
    }
    assert_eq!(c.entry(0x1000, 1) & PTE_D, 0, "no D for a read");
    // A table outside memory stays a guest error with MMIO emulation.
    let at = c.t.entry(c.pml4, Gva(0x1000), 2).unwrap();
    c.t.write(at, 0xfee0_0000 | PTE_P | PTE_RW | PTE_US);
    assert_eq!(c.walk(mmio, 0x1000, R), fault(P | RSVD));
}
