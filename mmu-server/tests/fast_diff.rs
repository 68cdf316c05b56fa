//! Differential test: the same random operation sequences on the reference
//! server and on each fast server, each inside the conformance suite's
//! simulated machine (which also judges both with its oracle), comparing
//! everything the guest can observe after every operation: access outcomes
//! (values read, injected faults with their error codes, refusals), dirty
//! bitmaps, and the whole of guest memory (so the guest's A/D bits and every
//! emulated write too), plus the guest entries each access walked through.
//!
//! Two guest profiles: [`PLAIN`] (PTEs written with A and D clear, spread
//! over 24 pages) and [`PREFETCH`] (PTEs written with random A and D bits
//! over 8 pages, so emulated writes and shadow misses prefetch and accesses
//! often follow the map of their PTE).

use conformance::arch::{Access, Ctrl, Size, A, D, NX, P, RW, US};
use conformance::machine::{Machine, Outcome};
use conformance::ram::{Ram, SuitePhys};
use core::sync::atomic::AtomicU64;
use mmu_server::registry;

const FRAMES: u64 = 4096;
const GUEST: u64 = 1024;
const REGIONS: [(u64, u64); 2] = [(0, 512), (0x1000, 256)];

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

/// One operation, applied identically to both machines.
#[derive(Clone, Copy, Debug)]
enum Op {
    Map {
        v: usize,
        va: u64,
        data: usize,
        flags: u64,
        size: Size,
    },
    Cr3 {
        v: usize,
        space: usize,
    },
    Invlpg {
        v: usize,
        va: u64,
    },
    Mode {
        v: usize,
        wp: bool,
        nxe: bool,
    },
    DirtyOn,
    DirtyOff,
    GetDirty,
    Zap,
    Migrate {
        v: usize,
    },
    Access {
        v: usize,
        va: u64,
        acc: usize,
        value: u64,
    },
}

/// What the random guest does and how long it runs.
struct Profile {
    /// Pages the guest maps and touches.
    pages: u64,
    /// The A/D bits a PTE write may carry (one chosen at random).
    ad: &'static [u64],
    /// Operations per seed.
    steps: usize,
    /// Seeds run when `FAST_SEED` does not name one.
    seeds: u64,
}

/// PTEs written with A and D clear: every first access faults.
const PLAIN: Profile = Profile {
    pages: 24,
    ad: &[0],
    steps: 250,
    seeds: 5,
};

/// PTEs written with random A/D bits over few pages: prefetch happens.
const PREFETCH: Profile = Profile {
    pages: 8,
    ad: &[0, A, A, A | D],
    steps: 400,
    seeds: 12,
};

fn gen(rng: &mut Rng, pr: &Profile, vcpus: usize, spaces: usize, data: usize) -> Op {
    let v = rng.below(vcpus as u64) as usize;
    let va = 0x4000_0000 + rng.below(pr.pages) * 0x1000 + [0, 0, 0x20_0000][rng.below(3) as usize];
    match rng.below(24) {
        0..=4 => {
            let flags = P
                | [0, RW][rng.below(2) as usize]
                | [0, US][rng.below(2) as usize]
                | [0, NX][rng.below(2) as usize]
                | pr.ad[rng.below(pr.ad.len() as u64) as usize];
            let flags = if rng.below(8) == 0 { 0 } else { flags };
            let size = if rng.below(10) == 0 {
                Size::M2
            } else {
                Size::K4
            };
            Op::Map {
                v,
                va,
                data: rng.below(data as u64) as usize,
                flags,
                size,
            }
        }
        5 => Op::Cr3 {
            v,
            space: rng.below(spaces as u64) as usize,
        },
        6 => Op::Invlpg { v, va },
        // EFER.NXE stays on: the direct map the guest edits its tables
        // through is NX.
        7 => Op::Mode {
            v,
            wp: rng.below(4) != 0,
            nxe: true,
        },
        8 => Op::DirtyOn,
        9 => [Op::DirtyOff, Op::GetDirty, Op::GetDirty][rng.below(3) as usize],
        10 => Op::Zap,
        11 => Op::Migrate { v },
        _ => Op::Access {
            v,
            va,
            acc: rng.below(6) as usize,
            value: rng.next(),
        },
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Unit,
    /// The outcome and the guest entries of the access's walk (levels 4..1),
    /// so an A or D bit a prefetch failed to leave to a fault shows at once.
    Access(Outcome, Vec<Option<u64>>),
    Dirty(Vec<u64>),
}

struct Side<'m> {
    m: Machine<'m>,
    d: usize,
    vs: Vec<usize>,
    spaces: Vec<u64>,
    data: Vec<u64>,
}

type R<T> = Result<T, String>;

fn setup(m: Machine<'_>) -> R<Side<'_>> {
    let mut m = m;
    let e = |f: Box<conformance::machine::Failure>| format!("{f}");
    let d = m.create_domain(&REGIONS).map_err(e)?;
    let vs = (0..3)
        .map(|_| m.create_vcpu(d, Ctrl::DEFAULT))
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)?;
    let spaces = (0..3)
        .map(|_| m.new_space(d, None))
        .collect::<Result<Vec<_>, _>>()
        .map_err(e)?;
    // Data frames: 16 single frames and one 2 MiB-aligned run for large pages.
    let data: Vec<u64> = (0..16).map(|_| m.alloc_gfn(d)).collect();
    for (i, &v) in vs.iter().enumerate() {
        m.schedule(v, i).map_err(e)?;
        m.write_cr3(v, spaces[i]).map_err(e)?;
    }
    Ok(Side {
        m,
        d,
        vs,
        spaces,
        data,
    })
}

fn apply(s: &mut Side<'_>, op: Op) -> R<Seen> {
    let e = |f: Box<conformance::machine::Failure>| format!("{f}");
    let m = &mut s.m;
    Ok(match op {
        Op::Map {
            v,
            va,
            data,
            flags,
            size,
        } => {
            let v = s.vs[v];
            let gpa = match size {
                Size::K4 => s.data[data] << 12,
                // The first 2 MiB of guest memory, read-only (it holds the
                // guest's own tables: a random store there would break the
                // direct map the scenario edits tables through).
                _ => 0,
            };
            let cr3 = m.cr3(v);
            let va = if size == Size::M2 {
                va & !0x1f_ffff
            } else {
                va
            };
            let flags = if size == Size::M2 { flags & !RW } else { flags };
            m.map(s.d, Some(v), cr3, va, gpa, size, flags).map_err(e)?;
            // Shoot the old translation down everywhere (a CR3 reload on
            // every vCPU), as a guest kernel does after changing a mapping:
            // without it, which stale translation a TLB (or the reference's
            // TLB-like shadows) still uses is not determined.
            for &x in &s.vs {
                let c = m.cr3(x);
                m.write_cr3(x, c).map_err(e)?;
            }
            Seen::Unit
        }
        Op::Cr3 { v, space } => {
            m.write_cr3(s.vs[v], s.spaces[space]).map_err(e)?;
            Seen::Unit
        }
        Op::Invlpg { v, va } => {
            m.invlpg(s.vs[v], va).map_err(e)?;
            Seen::Unit
        }
        Op::Mode { v, wp, nxe } => {
            m.set_mode(
                s.vs[v],
                Ctrl {
                    wp,
                    nxe,
                    ..Ctrl::DEFAULT
                },
            )
            .map_err(e)?;
            Seen::Unit
        }
        Op::DirtyOn => {
            if !m.dirty_on(s.d) {
                m.enable_dirty(s.d).map_err(e)?;
            }
            Seen::Unit
        }
        Op::DirtyOff => {
            if m.dirty_on(s.d) {
                m.disable_dirty(s.d).map_err(e)?;
            }
            Seen::Unit
        }
        Op::GetDirty => {
            if m.dirty_on(s.d) {
                Seen::Dirty(m.get_dirty(s.d).map_err(e)?.into_iter().collect())
            } else {
                Seen::Unit
            }
        }
        Op::Zap => {
            m.zap_all(s.d).map_err(e)?;
            Seen::Unit
        }
        Op::Migrate { v } => {
            let busy: Vec<usize> = s.vs.iter().filter_map(|&x| m.running_on(x)).collect();
            let p = (0..4).find(|p| !busy.contains(p)).expect("a free pCPU");
            m.schedule(s.vs[v], p).map_err(e)?;
            Seen::Unit
        }
        Op::Access { v, va, acc, value } => {
            let o = m.access(s.vs[v], va, Access::ALL[acc], value).map_err(e)?;
            let cr3 = m.cr3(s.vs[v]);
            let entries = (1..=4)
                .rev()
                .map(|l| {
                    m.entry_addr(s.d, cr3, va, l)
                        .and_then(|gpa| m.peek(s.d, gpa))
                })
                .collect();
            Seen::Access(o, entries)
        }
    })
}

fn memory(s: &Side<'_>) -> Vec<u64> {
    REGIONS
        .iter()
        .flat_map(|&(g, n)| (g..g + n).flat_map(move |f| (0..512).map(move |w| (f << 12) + 8 * w)))
        .map(|gpa| s.m.peek(s.d, gpa).unwrap_or(0))
        .collect()
}

fn differential(fast: &'static str, pr: &Profile) {
    differential_with(fast, pr, &|name, p| registry::create(name, p).unwrap())
}

type Make = dyn for<'a> Fn(&'static str, &'a SuitePhys<'a>) -> Box<dyn abi::MmuServer + 'a>;

fn differential_with(fast: &'static str, pr: &Profile, make: &Make) {
    for seed in seeds(pr) {
        differential_seed(fast, pr, seed, make);
    }
}

fn differential_seed(fast: &'static str, pr: &Profile, seed: u64, make: &Make) {
    let mk = || -> Vec<AtomicU64> { (0..FRAMES * 512).map(|_| AtomicU64::new(0)).collect() };
    let (wa, wb) = (mk(), mk());
    let (ra, rb) = (Ram::new(0x10_0000, &wa), Ram::new(0x10_0000, &wb));
    let (pa, pb) = (
        SuitePhys::new(ra, ra.first_mfn() + GUEST),
        SuitePhys::new(rb, rb.first_mfn() + GUEST),
    );
    let sa = registry::create("reference", &pa).unwrap();
    let sb = make(fast, &pb);
    let run = || -> R<()> {
        let mut a = setup(Machine::new("reference", &*sa, &pa, GUEST, 4))?;
        let mut b = setup(Machine::new(fast, &*sb, &pb, GUEST, 4))?;
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        for step in 0..pr.steps {
            let op = gen(&mut rng, pr, a.vs.len(), a.spaces.len(), a.data.len());
            // A sequence the reference itself cannot complete (the random
            // page-table edits broke the guest's own direct map) ends here:
            // the differential test compares servers, not scripts.
            let Ok(x) = apply(&mut a, op) else {
                eprintln!("seed {seed}: sequence ends at step {step} ({op:?}): the reference cannot run it");
                return Ok(());
            };
            let y =
                apply(&mut b, op).map_err(|f| format!("{fast} failed the suite at {op:?}: {f}"))?;
            if x != y {
                return Err(format!(
                    "step {step} {op:?}: reference saw {x:?}, {fast} saw {y:?}"
                ));
            }
            if step % 32 == 31 || matches!(op, Op::GetDirty) {
                let (ma, mb) = (memory(&a), memory(&b));
                if let Some(i) = (0..ma.len()).find(|&i| ma[i] != mb[i]) {
                    return Err(format!(
                        "step {step} {op:?}: guest memory differs at word {i}: reference {:#x}, {fast} {:#x}",
                        ma[i], mb[i]
                    ));
                }
            }
        }
        Ok(())
    };
    if let Err(f) = run() {
        panic!("differential {fast} seed {seed}: {f}");
    }
}

fn seeds(pr: &Profile) -> std::ops::RangeInclusive<u64> {
    match std::env::var("FAST_SEED").ok().and_then(|s| s.parse().ok()) {
        Some(s) => s..=s,
        None => 1..=pr.seeds,
    }
}

#[test]
fn differential_fast_shared() {
    differential(registry::FAST_SHARED, &PLAIN);
}

#[test]
fn differential_fast_percpu() {
    differential(registry::FAST_PERCPU, &PLAIN);
}

#[test]
fn differential_fast_dirty_bits() {
    differential(registry::FAST_DBIT, &PLAIN);
}

#[test]
fn prefetch_differential_fast_shared() {
    differential(registry::FAST_SHARED, &PREFETCH);
}

#[test]
fn prefetch_differential_fast_percpu() {
    differential(registry::FAST_PERCPU, &PREFETCH);
}

#[test]
fn prefetch_differential_fast_dirty_bits() {
    differential(registry::FAST_DBIT, &PREFETCH);
}
