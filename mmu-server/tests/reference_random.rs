//! Random operation sequences against the reference server over hostile,
//! constantly rewritten guest tables. After every step: no shadow leaf maps
//! a frame outside the guest; every table frame is a live pool frame; and
//! while a vCPU's guest tables are unchanged since its last flush point,
//! every shadow leaf is backed by the guest's current translation with no
//! wider permissions (checked by an independent side-effect-free walker).
//! At the end, destroying the domain frees every frame.

use abi::mmu::MemoryMap;
use abi::*;
use mmu_server::reference::Reference;
use mmu_server::sim::SimMem;
use mmu_server::walk::*;
use mmu_server::Config;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const GUEST_BASE: u64 = 1024; // host frame of gfn 0
const GUEST_FRAMES: u64 = 512;
const TABLES: std::ops::Range<u64> = 0x100..0x120; // gfns used as tables
const ROOTS: [u64; 3] = [0x100, 0x101, 0x102];
const D: DomainId = DomainId(1);

fn gva_pool(i: u64) -> Gva {
    // 48 addresses: the first page table's range (mapped at start), PML4
    // slot 1 in 2 MiB steps, and the top slot in 1 GiB steps.
    match i {
        0..=23 => Gva(i << 12),
        24..=35 => Gva((1 << 39) | ((i - 24) << 21) | 0x3000),
        _ => Gva(0xffff_ff80_0000_0000 | ((i - 36) << 30) | ((i - 36) << 12)),
    }
}

/// The guest's current translation without side effects: (gfn, writable,
/// user, nx, dirty) or None if the access could fault for any reason.
fn oracle(
    mem: &SimMem,
    cr3: u64,
    mode: PagingMode,
    gva: Gva,
) -> Option<(u64, bool, bool, bool, bool)> {
    let read = |gpa: u64| -> Option<u64> {
        let gfn = gpa >> 12;
        (gfn < GUEST_FRAMES).then(|| {
            mem.read_u64(Hpa(((GUEST_BASE + gfn) << 12) | (gpa & 0xfff)))
                .unwrap()
        })
    };
    let mut table = cr3 & PTE_ADDR_MASK;
    let (mut w, mut u, mut nx) = (true, true, false);
    for level in (1..=4u8).rev() {
        let e = read(table + 8 * gva.table_index(level) as u64)?;
        if e & PTE_P == 0 {
            return None;
        }
        let large = (level == 2 || level == 3) && e & PTE_PS != 0;
        // Reserved: NX without NXE, PS in PML4E, large-page low bits.
        if (!mode.nxe() && e & PTE_NX != 0)
            || (level == 4 && e & PTE_PS != 0)
            || (level == 3 && large && e & 0x3fff_e000 != 0)
            || (level == 2 && large && e & 0x1f_e000 != 0)
        {
            return None;
        }
        w &= e & PTE_RW != 0;
        u &= e & PTE_US != 0;
        nx |= mode.nxe() && e & PTE_NX != 0;
        if level == 1 || large {
            let size = 1u64 << (12 + 9 * (level as u32 - 1));
            let gpa = (e & PTE_ADDR_MASK & !(size - 1)) | (gva.0 & (size - 1));
            let gfn = gpa >> 12;
            return (gfn < GUEST_FRAMES).then_some((gfn, w, u, nx, e & PTE_D != 0));
        }
        table = e & PTE_ADDR_MASK;
    }
    None
}

fn random_entry(r: &mut Rng, level: u8) -> u64 {
    let flags = r.next() & (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D) | PTE_P;
    let nx = if r.below(4) == 0 { PTE_NX } else { 0 };
    match r.below(10) {
        // Point at another table (maybe itself, maybe a loop).
        0..=4 if level > 1 => {
            (TABLES.start + r.below(TABLES.end - TABLES.start)) << 12 | flags | nx
        }
        // A large page or a 4K data page inside the guest.
        0..=6 => {
            let ps = if (level == 2 || level == 3) && r.below(2) == 0 {
                PTE_PS
            } else {
                0
            };
            let base = if ps != 0 && level == 3 {
                0
            } else if ps != 0 {
                r.below(2) << 21
            } else {
                r.below(GUEST_FRAMES) << 12
            };
            base | flags | nx | ps
        }
        // Outside the guest.
        7 => (GUEST_FRAMES + r.below(4000)) << 12 | flags,
        // Reserved-bit garbage or not present.
        8 => r.next(),
        _ => 0,
    }
}

fn run(seed: u64, steps: usize) {
    let mem = SimMem::new(4096, 2048..4096);
    let mut map = MemoryMap::new();
    map.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(GUEST_BASE),
        pages: GUEST_FRAMES,
    })
    .unwrap();
    let s = Reference::new(&mem, Config::default());
    let mut r = Rng(seed);
    let gw = |gpa: u64, v: u64| {
        mem.write_u64(Hpa(((GUEST_BASE + (gpa >> 12)) << 12) | (gpa & 0xff8)), v)
            .unwrap()
    };
    // Initial tables: each root maps a few addresses sensibly; rewrites
    // often restore one of these entries, so walks keep succeeding.
    let mut good = Vec::new();
    for (i, root) in ROOTS.iter().enumerate() {
        for l in 0..3u64 {
            let t = TABLES.start + 3 + 3 * i as u64 + l;
            let parent = if l == 0 { *root } else { t - 1 };
            good.push((parent << 12, t << 12 | PTE_P | PTE_RW | PTE_US));
        }
        let pt = TABLES.start + 5 + 3 * i as u64;
        for k in 0..16 {
            good.push(((pt << 12) + 8 * k, (k + 1) << 12 | PTE_P | PTE_RW | PTE_US));
        }
    }
    for &(gpa, val) in &good {
        gw(gpa, val);
    }
    assert_eq!(s.create_domain(D, &map), MmuReply::Done { flush: None });
    let vcpus: Vec<VcpuId> = (0..4).map(VcpuId).collect();
    // Per vCPU: cr3, mode, pCPU, and whether the tables changed since its
    // last flush point (CR3 write / INVLPG / mode change / zap-all).
    let mut cr3 = [0u64; 4];
    let mut mode = [PagingMode(0); 4];
    let mut pcpu: [Option<PcpuId>; 4] = [None; 4];
    let mut clean = [false; 4];
    for &v in &vcpus {
        assert_eq!(s.create_vcpu(D, v), MmuReply::Done { flush: None });
    }
    let mut dirty_on = false;
    let mut faults = [0u64; 3];
    for _ in 0..steps {
        let i = r.below(4) as usize;
        let v = vcpus[i];
        let reply = match (pcpu[i], r.below(20)) {
            (None, _) => {
                let p = PcpuId(r.below(8) as u32);
                pcpu[i] = Some(p);
                s.vcpu_scheduled(v, p)
            }
            (Some(p), 0) => {
                pcpu[i] = None;
                s.vcpu_descheduled(v, p)
            }
            (Some(p), 1) => {
                cr3[i] = ROOTS[r.below(3) as usize] << 12;
                clean[i] = true;
                s.write_cr3(v, p, GuestCr3(cr3[i]))
            }
            (Some(p), 2) => {
                clean[i] = true;
                s.invlpg(v, p, gva_pool(r.below(48)))
            }
            (Some(p), 3) => {
                mode[i] = PagingMode((r.below(4) as u32) & (PagingMode::WP | PagingMode::NXE));
                clean[i] = true;
                s.set_paging_mode(v, p, mode[i])
            }
            (Some(_), 4..=6) => {
                // The guest rewrites a table entry behind everyone's back.
                // Mostly entries on the walks of the address pool.
                let span = if r.below(4) == 0 { 32 } else { 12 };
                let t = TABLES.start + r.below(span);
                let slot = match r.below(4) {
                    0 => r.below(512),
                    1 => [0, 1, 0x1ff][r.below(3) as usize],
                    _ => r.below(24),
                };
                let level = 1 + r.below(4) as u8;
                if r.below(2) == 0 {
                    let (gpa, val) = good[r.below(good.len() as u64) as usize];
                    gw(gpa, val);
                } else {
                    gw((t << 12) + 8 * slot, random_entry(&mut r, level));
                }
                clean = [false; 4];
                continue;
            }
            (Some(_), 7) => {
                clean = [true; 4];
                s.zap_all(D)
            }
            (Some(_), 8) => {
                dirty_on = !dirty_on;
                if dirty_on {
                    s.enable_dirty_log(D)
                } else {
                    s.disable_dirty_log(D)
                }
            }
            (Some(_), 9) if dirty_on => s.get_and_clear_dirty(D, Gfn(0)),
            (Some(p), 10) => {
                let size = [1u8, 2, 4, 8][r.below(4) as usize];
                let gpa = Gpa(r.below(GUEST_FRAMES << 12) & !(u64::from(size) - 1));
                clean = [false; 4];
                s.emulated_write(v, p, gpa, r.next(), size)
            }
            (Some(p), _) => {
                let code = (r.next() as u32) & (PfErrorCode::W | PfErrorCode::U | PfErrorCode::I);
                let rep = s.page_fault(v, p, gva_pool(r.below(48)), PfErrorCode(code));
                faults[match rep {
                    MmuReply::Resume { .. } => 0,
                    MmuReply::InjectPageFault { .. } => 1,
                    _ => 2,
                }] += 1;
                rep
            }
        };
        assert!(!matches!(reply, MmuReply::Error { .. }), "{reply:?}");
        // Invariants over every tree.
        for (k, &v) in vcpus.iter().enumerate() {
            let root = s.shadow_root(v).unwrap();
            assert!(mem.is_allocated(root));
            for n in 0..48 {
                let gva = gva_pool(n);
                let Some(e) = mmu_server::shadow::lookup(&mem, root, gva).unwrap() else {
                    continue;
                };
                let mfn = (e & PTE_ADDR_MASK) >> 12;
                assert!(
                    (GUEST_BASE..GUEST_BASE + GUEST_FRAMES).contains(&mfn),
                    "leaf {e:#x} outside the guest"
                );
                if clean[k] {
                    let (gfn, w, u, nx, d) =
                        oracle(&mem, cr3[k], mode[k], gva).unwrap_or_else(|| {
                            panic!("vCPU {k}: leaf {e:#x} at {gva:?} but the guest faults")
                        });
                    assert_eq!(mfn, GUEST_BASE + gfn);
                    if e & PTE_RW != 0 {
                        assert!(d, "writable before the guest's D is set");
                        assert!(
                            w || (!mode[k].wp() && e & PTE_US == 0),
                            "writable beyond the guest"
                        );
                    }
                    assert!(e & PTE_US == 0 || u, "user beyond the guest");
                    assert!(e & PTE_NX != 0 || !nx, "executable beyond the guest");
                }
            }
        }
    }
    assert!(
        faults[0] > 50 && faults[1] > 50,
        "both outcomes exercised: {faults:?}"
    );
    for (i, p) in pcpu.iter().enumerate() {
        if let Some(p) = p {
            let _ = s.vcpu_descheduled(vcpus[i], *p);
        }
    }
    assert!(matches!(s.destroy_domain(D), MmuReply::Done { .. }));
    assert_eq!(mem.frames_in_use(), 0, "leaked shadow frames");
}

#[test]
fn random_sequences_keep_the_invariants() {
    for seed in 1..=6u64 {
        run(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15), 3000);
    }
}
