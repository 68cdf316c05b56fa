//! The fast server on the conformance suite's simulated machine: random
//! guest workloads (page-table edits, CR3 switches between processes, dirty
//! logging, zaps, several vCPUs, paging switched off and on again) judged
//! by the suite's oracle after every step, with the server's own invariants
//! audited along the way.

use conformance::arch::{Access, Ctrl, Size, NX, P, PS, RW, US};
use conformance::machine::{Machine, Outcome};
use conformance::ram::{Ram, SuitePhys};
use core::sync::atomic::AtomicU64;
use mmu_server::fast::policy::{L4Policy, PerPcpuCopies, SharedRoots};
use mmu_server::fast::{DirtyMode, FastServer};

const FRAMES: u64 = 4096;
const GUEST: u64 = 1024;

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

fn run<P: L4Policy>(name: &'static str, seed: u64, steps: usize, dirty: DirtyMode) {
    let words: Vec<AtomicU64> = (0..FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
    let ram = Ram::new(0x10_0000, &words);
    let phys = SuitePhys::new(ram, ram.first_mfn() + GUEST);
    let server =
        FastServer::<P>::with_dirty_mode(name, &phys, mmu_server::Config::default(), dirty);
    let mut m = Machine::new(name, &server, &phys, GUEST, 4);
    let r = (|| -> Result<(), String> {
        let e = |f: Box<conformance::machine::Failure>| format!("{f}");
        let d = m.create_domain(&[(0, 512), (0x1000, 256)]).map_err(e)?;
        let vs: Vec<usize> = (0..3)
            .map(|_| m.create_vcpu(d, Ctrl::DEFAULT))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        let spaces: Vec<u64> = (0..4)
            .map(|_| m.new_space(d, None))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        for (i, &v) in vs.iter().enumerate() {
            m.schedule(v, i).map_err(e)?;
            m.write_cr3(v, spaces[i % spaces.len()]).map_err(e)?;
        }
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let data: Vec<u64> = (0..24).map(|_| m.alloc_gfn(d)).collect();
        for step in 0..steps {
            let v = vs[rng.below(vs.len() as u64) as usize];
            let va = 0x4000_0000 + rng.below(32) * 0x1000;
            match rng.below(20) {
                0..=3 => {
                    let cr3 = m.cr3(v);
                    let gpa = data[rng.below(data.len() as u64) as usize] << 12;
                    let flags = P
                        | [0, RW][rng.below(2) as usize]
                        | [0, US][rng.below(2) as usize]
                        | [0, NX][rng.below(2) as usize];
                    let flags = if rng.below(8) == 0 { 0 } else { flags };
                    m.map(d, Some(v), cr3, va, gpa, Size::K4, flags)
                        .map_err(e)?;
                }
                4 => {
                    let s = spaces[rng.below(spaces.len() as u64) as usize];
                    m.write_cr3(v, s).map_err(e)?;
                }
                5 => {
                    let cr3 = m.cr3(v);
                    m.invlpg(v, va).map_err(e)?;
                    let _ = cr3;
                }
                6 => {
                    if m.dirty_on(d) {
                        if rng.below(4) == 0 {
                            m.disable_dirty(d).map_err(e)?;
                        } else {
                            m.get_dirty(d).map_err(e)?;
                        }
                    } else {
                        m.enable_dirty(d).map_err(e)?;
                    }
                }
                7 if step % 5 == 0 => m.zap_all(d).map_err(e)?,
                8 => {
                    // Migrate to a free pCPU (4 pCPUs, 3 vCPUs).
                    let busy: Vec<usize> = vs.iter().filter_map(|&x| m.running_on(x)).collect();
                    let p = (0..4).find(|p| !busy.contains(p)).expect("a free pCPU");
                    m.schedule(v, p).map_err(e)?;
                }
                9 if step % 3 == 0 => {
                    // Paging off (the identity shadow) or back on.
                    let ctrl = if m.ctrl(v).paging {
                        Ctrl::OFF
                    } else {
                        Ctrl::LONG_MMIO
                    };
                    m.set_mode(v, ctrl).map_err(e)?;
                }
                _ => {
                    let acc = Access::ALL[rng.below(6) as usize];
                    // With paging off: a data frame at its own address, or
                    // the hole between the two RAM regions.
                    let va = match (m.ctrl(v).paging, rng.below(8)) {
                        (true, _) => va,
                        (false, 0) => 0x800_0000 + (va & 0xf000),
                        (false, _) => {
                            (data[rng.below(data.len() as u64) as usize] << 12) | (va & 0xff8)
                        }
                    };
                    match m.access(v, va, acc, rng.next()).map_err(e)? {
                        Outcome::Refused(r) => return Err(format!("refused: {r:?}")),
                        Outcome::Ok(_) | Outcome::Fault(_) | Outcome::Mmio(_) => {}
                    }
                }
            }
            server
                .audit()
                .map_err(|a| format!("audit after step {step}: {a}"))?;
        }
        let st = server.stats();
        let o = core::sync::atomic::Ordering::Relaxed;
        eprintln!(
            "{name} seed {seed}: sp created {} freed {} slow {} unshadowed {} | {:?}",
            st.sp_created.load(o),
            st.sp_freed.load(o),
            st.slow_faults.load(o),
            st.unshadowed.load(o),
            m.stats
        );
        Ok(())
    })();
    if let Err(f) = r {
        panic!("{name} seed {seed}: {f}");
    }
}

fn seeds() -> std::ops::RangeInclusive<u64> {
    match std::env::var("FAST_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => s..=s,
        None => 1..=10,
    }
}

#[test]
fn random_workloads_shared_roots() {
    for seed in seeds() {
        run::<SharedRoots>("fast-shared", seed, 300, DirtyMode::WriteProtect);
    }
}

#[test]
fn random_workloads_per_pcpu_copies() {
    for seed in seeds() {
        run::<PerPcpuCopies>("fast-percpu", seed, 300, DirtyMode::WriteProtect);
    }
}

/// `fast-dbit`'s configuration (shared roots, D-bit harvesting), audited.
#[test]
fn random_workloads_dirty_bits() {
    for seed in seeds() {
        run::<SharedRoots>("fast-dbit", seed, 300, DirtyMode::DirtyBits);
    }
}

/// P2 (pinning) and write-flood unshadowing: flooding a guest L1 table with
/// writes unshadows it; flooding the guest L4 that a vCPU runs on never
/// frees its pinned root; the audit holds throughout and accesses still
/// complete with the right values.
#[test]
fn flooding_unshadows_tables_but_never_a_pinned_root() {
    let words: Vec<AtomicU64> = (0..FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
    let ram = Ram::new(0x10_0000, &words);
    let phys = SuitePhys::new(ram, ram.first_mfn() + GUEST);
    let server =
        FastServer::<SharedRoots>::new("fast-shared", &phys, mmu_server::Config::default());
    let mut m = Machine::new("fast-shared", &server, &phys, GUEST, 2);
    let d = m
        .create_domain(&[(0, 512)])
        .unwrap_or_else(|f| panic!("{f}"));
    let v = m
        .create_vcpu(d, Ctrl::DEFAULT)
        .unwrap_or_else(|f| panic!("{f}"));
    let cr3 = m.new_space(d, None).unwrap_or_else(|f| panic!("{f}"));
    let data = m.alloc_gfn(d);
    m.map(d, None, cr3, 0x4000_0000, data << 12, Size::K4, P | RW | US)
        .unwrap_or_else(|f| panic!("{f}"));
    m.schedule(v, 0).unwrap_or_else(|f| panic!("{f}"));
    m.write_cr3(v, cr3).unwrap_or_else(|f| panic!("{f}"));
    m.access(v, 0x4000_0000, Access::UWRITE, 7)
        .unwrap_or_else(|f| panic!("{f}"));
    let o = core::sync::atomic::Ordering::Relaxed;
    let before = server.stats().unshadowed.load(o);
    // Flood the L1 that maps 0x4000_0000 (entries other than the one used).
    let pte = m.entry_addr(d, cr3, 0x4000_0000, 1).expect("mapped");
    for i in 1..=4u64 {
        m.guest_write(d, Some(v), pte + 8 * i, 0)
            .unwrap_or_else(|f| panic!("{f}"));
    }
    assert!(
        server.stats().unshadowed.load(o) > before,
        "a flooded L1 is unshadowed"
    );
    server.audit().unwrap();
    // Flood the L4 the vCPU runs on (an unused slot).
    let unshadowed = server.stats().unshadowed.load(o);
    for _ in 0..6 {
        m.guest_write(d, Some(v), cr3 + 8 * 300, 0)
            .unwrap_or_else(|f| panic!("{f}"));
    }
    assert_eq!(
        server.stats().unshadowed.load(o),
        unshadowed,
        "the pinned root is not unshadowed"
    );
    server.audit().unwrap();
    match m
        .access(v, 0x4000_0000, Access::UREAD, 0)
        .unwrap_or_else(|f| panic!("{f}"))
    {
        Outcome::Ok(x) => assert_eq!(x, 7),
        o => panic!("read after flooding: {o:?}"),
    }
}

/// D1 (dirty large pages): several address spaces map one 2 MiB guest page
/// through their own PDEs, clean or dirty, writable or not, while the guest
/// reads and writes through them, clears and sets their D bits, switches
/// CR3, toggles CR0.WP, logs dirty pages and zaps. The suite's oracle checks
/// after every access that the D bit of the PDE it went through is set for a
/// write (a shadow page shared with a dirty PDE must not let a write through
/// a clean one go unfaulted); the audit checks D1 and the other invariants
/// after every step.
fn run_shared_large<P: L4Policy>(name: &'static str, seed: u64, steps: usize) {
    use conformance::arch::{A, D};
    let words: Vec<AtomicU64> = (0..FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
    let ram = Ram::new(0x10_0000, &words);
    let phys = SuitePhys::new(ram, ram.first_mfn() + GUEST);
    let server = FastServer::<P>::new(name, &phys, mmu_server::Config::default());
    let mut m = Machine::new(name, &server, &phys, GUEST, 4);
    const VA: u64 = 0x8000_0000;
    // The 2 MiB page: the whole second region (tables come from the first).
    const BIG: u64 = 0x1000 << 12;
    let r = (|| -> Result<(), String> {
        let e = |f: Box<conformance::machine::Failure>| format!("{f}");
        let d = m.create_domain(&[(0, 512), (0x1000, 512)]).map_err(e)?;
        let vs: Vec<usize> = (0..2)
            .map(|_| m.create_vcpu(d, Ctrl::DEFAULT))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        let spaces: Vec<u64> = (0..3)
            .map(|_| m.new_space(d, None))
            .collect::<Result<_, _>>()
            .map_err(e)?;
        for &s in &spaces {
            m.map(d, None, s, VA, BIG, Size::M2, P | RW | US)
                .map_err(e)?;
        }
        for (i, &v) in vs.iter().enumerate() {
            m.schedule(v, i).map_err(e)?;
            m.write_cr3(v, spaces[i]).map_err(e)?;
        }
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for step in 0..steps {
            let v = vs[rng.below(vs.len() as u64) as usize];
            let va = VA + rng.below(4) * 0x1000;
            match rng.below(16) {
                0 | 1 => {
                    // Rewrite one space's PDE: D and RW at random (A kept
                    // clear or set), through the running vCPU.
                    let s = spaces[rng.below(spaces.len() as u64) as usize];
                    let pde = m.entry_addr(d, s, VA, 2).expect("mapped");
                    let flags = P
                        | US
                        | [0, RW, RW, RW][rng.below(4) as usize]
                        | [0, A][rng.below(2) as usize]
                        | [0, D][rng.below(2) as usize];
                    m.guest_write(d, Some(v), pde, BIG | PS | flags)
                        .map_err(e)?;
                    m.invlpg(v, va).map_err(e)?;
                }
                2 => {
                    let s = spaces[rng.below(spaces.len() as u64) as usize];
                    m.write_cr3(v, s).map_err(e)?;
                }
                3 => {
                    let wp = rng.below(3) != 0;
                    m.set_mode(
                        v,
                        Ctrl {
                            wp,
                            ..Ctrl::DEFAULT
                        },
                    )
                    .map_err(e)?;
                }
                4 => {
                    if m.dirty_on(d) {
                        if rng.below(4) == 0 {
                            m.disable_dirty(d).map_err(e)?;
                        } else {
                            m.get_dirty(d).map_err(e)?;
                        }
                    } else {
                        m.enable_dirty(d).map_err(e)?;
                    }
                }
                5 if step % 7 == 0 => m.zap_all(d).map_err(e)?,
                _ => {
                    let acc = [Access::READ, Access::WRITE, Access::UREAD, Access::UWRITE]
                        [rng.below(4) as usize];
                    match m.access(v, va, acc, rng.next()).map_err(e)? {
                        Outcome::Refused(r) => return Err(format!("refused: {r:?}")),
                        Outcome::Ok(_) | Outcome::Fault(_) | Outcome::Mmio(_) => {}
                    }
                }
            }
            server
                .audit()
                .map_err(|a| format!("audit after step {step}: {a}"))?;
        }
        Ok(())
    })();
    if let Err(f) = r {
        panic!("{name} seed {seed}: {f}");
    }
}

#[test]
fn shared_large_pages_keep_d_per_pde_shared_roots() {
    for seed in seeds() {
        run_shared_large::<SharedRoots>("fast-shared", seed, 400);
    }
}

#[test]
fn shared_large_pages_keep_d_per_pde_per_pcpu_copies() {
    for seed in seeds() {
        run_shared_large::<PerPcpuCopies>("fast-percpu", seed, 400);
    }
}
