//! Random operation sequences from a seeded PRNG (reproducible: a failure
//! names its seed): two domains, six vCPUs moving over eight pCPUs, four
//! processes per domain, mixing accesses of every kind, hostile page-table
//! edits (through the guest's own direct map), INVLPG, CR3 switches,
//! migrations, paging-mode changes (CR0.WP, EFER.NXE, MMIO emulation, and
//! paging off and on again: a vCPU with paging off accesses its own
//! guest-physical addresses until it turns paging back on), dirty-log rounds
//! and zap-all. The machine checks the oracle after every step.

use crate::arch::{self, Access, Ctrl, Size, NX, P, PS, RW, US};
use crate::machine::{Machine, Outcome, Res, DIRECT};
use crate::scenarios::USER;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// A small, fast, seedable PRNG (SplitMix64).
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A number below `n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `pct` percent.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
    /// A random element of `xs` (non-empty).
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

const RAM: u64 = 1024;
const LARGE_GPA: u64 = 0x20_0000;
const FULL: u64 = P | RW | US;

struct Dom {
    d: usize,
    vcpus: Vec<usize>,
    procs: Vec<u64>,
    data: Vec<u64>,
    tables: Vec<u64>,
    /// Per process: its user page-table entries as set up (gpa, value), the
    /// upper levels first, for repairs.
    orig: Vec<Vec<(u64, u64)>>,
}

fn slot(r: &mut Rng) -> u64 {
    match r.below(10) {
        0..=4 => USER + r.below(32) * 4096,
        5..=7 => USER + 0x20_0000 + r.below(32) * 4096,
        _ => USER + 0x40_0000 + r.below(512) * 4096,
    }
}

fn flags(r: &mut Rng) -> u64 {
    let mut f = P;
    if r.chance(70) {
        f |= RW;
    }
    if r.chance(70) {
        f |= US;
    }
    if r.chance(15) {
        f |= NX;
    }
    if r.chance(20) {
        f |= arch::A;
    }
    if r.chance(10) {
        f |= arch::D;
    }
    f
}

fn setup(m: &mut Machine<'_>, r: &mut Rng, first_pcpu: usize, nvcpu: usize) -> Res<Dom> {
    let d = m.create_domain(&[(0, RAM)])?;
    let master = m.new_space(d, None)?;
    let slot_k = arch::index(DIRECT, 4) * 8;
    let kernel = m.peek(d, master + slot_k).unwrap_or(0);
    let data: Vec<u64> = (0..48).map(|_| m.alloc_gfn(d)).collect();
    let mut procs = Vec::new();
    let mut tables = Vec::new();
    let mut orig = Vec::new();
    for _ in 0..4 {
        let cr3 = m.alloc_gfn(d) << 12;
        m.setup_write(d, cr3 + slot_k, kernel)?;
        for i in 0..32u64 {
            let g = r.pick(&data);
            m.map(d, None, cr3, USER + i * 4096, g << 12, Size::K4, FULL)?;
            let g = r.pick(&data);
            m.map(
                d,
                None,
                cr3,
                USER + 0x20_0000 + i * 4096,
                g << 12,
                Size::K4,
                flags(r),
            )?;
        }
        m.map(d, None, cr3, USER + 0x40_0000, LARGE_GPA, Size::M2, FULL)?;
        tables.push(cr3 >> 12);
        for level in 1..=3 {
            for va in [USER, USER + 0x20_0000] {
                if let Some(ea) = m.entry_addr(d, cr3, va, level) {
                    tables.push(ea >> 12);
                }
            }
        }
        let mut o = Vec::new();
        for (va, level) in [
            (USER, 4),
            (USER, 3),
            (USER, 2),
            (USER + 0x20_0000, 2),
            (USER + 0x40_0000, 2),
        ] {
            if let Some(ea) = m.entry_addr(d, cr3, va, level) {
                o.push((ea, m.peek(d, ea).unwrap_or(0)));
            }
        }
        for i in 0..32u64 {
            for va in [USER + i * 4096, USER + 0x20_0000 + i * 4096] {
                if let Some(ea) = m.entry_addr(d, cr3, va, 1) {
                    o.push((ea, m.peek(d, ea).unwrap_or(0)));
                }
            }
        }
        orig.push(o);
        procs.push(cr3);
    }
    tables.sort_unstable();
    tables.dedup();
    let mut vcpus = Vec::new();
    for i in 0..nvcpu {
        let v = m.create_vcpu(d, Ctrl::DEFAULT)?;
        m.schedule(v, first_pcpu + i)?;
        let p = r.pick(&procs);
        m.write_cr3(v, p)?;
        vcpus.push(v);
    }
    Ok(Dom {
        d,
        vcpus,
        procs,
        data,
        tables,
        orig,
    })
}

fn ensure_running(m: &mut Machine<'_>, r: &mut Rng, v: usize) -> Res<()> {
    if m.running_on(v).is_none() {
        let p = r.below(m.pcpu_count() as u64) as usize;
        m.schedule(v, p)?;
    }
    Ok(())
}

fn judge(m: &Machine<'_>, o: Outcome, gva: u64) -> Res<()> {
    match o {
        Outcome::Refused(e) => Err(m.fail(
            "no refusal with an unlimited pool",
            Some(gva),
            String::from("Ok or #PF"),
            format!("Refused({e:?})"),
        )),
        _ => Ok(()),
    }
}

/// One step of vCPU `v` while its paging is off: mostly an access to its
/// own guest-physical address (RAM, or just past it: `Mmio`), now and then
/// a CR3 write (only recorded) or the switch back to long mode.
fn paging_off_step(m: &mut Machine<'_>, r: &mut Rng, dom: &Dom, v: usize) -> Res<()> {
    match r.below(12) {
        0 => {
            let ctrl = Ctrl {
                wp: !r.chance(30),
                nxe: !r.chance(20),
                paging: true,
                mmio: !r.chance(30),
            };
            m.set_mode(v, ctrl)
        }
        1 => {
            let p = r.pick(&dom.procs);
            m.write_cr3(v, p)
        }
        _ => {
            let gfn = if r.chance(85) {
                r.pick(&dom.data)
            } else if r.chance(50) {
                r.below(RAM)
            } else {
                RAM + r.below(64)
            };
            let gpa = (gfn << 12) + (r.below(512) << 3);
            let acc = r.pick(&Access::ALL);
            // Writes through the identity stay off the page tables mostly
            // (they are the other vCPUs' hostile edits otherwise).
            if acc.write && dom.tables.contains(&gfn) && !r.chance(10) {
                return Ok(());
            }
            let o = m.access(v, gpa, acc, r.next_u64() & 0xffff_ffff)?;
            judge(m, o, gpa)
        }
    }
}

fn edit(m: &mut Machine<'_>, r: &mut Rng, dom: &Dom, v: usize) -> Res<()> {
    let cr3 = r.pick(&dom.procs);
    let va = slot(r);
    let large = va >= USER + 0x40_0000;
    let level = match r.below(20) {
        0 => 3,
        1..=2 => 2,
        _ if large => 2,
        _ => 1,
    };
    let Some(ea) = m.entry_addr(dom.d, cr3, va, level) else {
        return Ok(());
    };
    if ea >= RAM << 12 {
        // A clobbered table pointer led outside guest RAM (and maybe to a
        // non-canonical direct-map address): nothing the guest can edit.
        return Ok(());
    }
    let old = m.peek(dom.d, ea).unwrap_or(0);
    let new = match r.below(20) {
        0..=6 if level == 1 => r.pick(&dom.data) << 12 | flags(r),
        0..=6 if level == 2 && r.chance(50) => LARGE_GPA | PS | flags(r),
        0..=6 => old | arch::A,
        7..=9 => 0,
        10..=12 => old ^ r.pick(&[RW, US, NX, P]),
        13 => r.pick(&dom.tables) << 12 | flags(r),
        14 => old | 1 << r.pick(&[48u64, 50, 51]),
        15 => (RAM + r.below(1 << 20)) << 12 | FULL,
        16 if level > 1 => old | PS,
        _ => old & !(arch::A | arch::D) | (r.next_u64() & (arch::A | arch::D)),
    };
    let o = m.access(v, DIRECT + ea, Access::WRITE, new)?;
    judge(m, o, DIRECT + ea)
}

/// One random run of `steps` operations from `seed` on machine `m`.
pub fn random_run(m: &mut Machine<'_>, seed: u64, steps: u64) -> Res<()> {
    let mut r = Rng::new(seed);
    let pc = m.pcpu_count();
    let na = (pc / 2).clamp(1, 4);
    let doms = [
        setup(m, &mut r, 0, na)?,
        setup(m, &mut r, na, (pc - na).clamp(1, 2))?,
    ];
    let mut recents: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..steps {
        let which = if r.chance(65) { 0 } else { 1 };
        let dom = &doms[which];
        let recent = &mut recents[which];
        let v = r.pick(&dom.vcpus);
        ensure_running(m, &mut r, v)?;
        if !m.ctrl(v).paging {
            paging_off_step(m, &mut r, dom, v)?;
            continue;
        }
        match r.below(104) {
            0..=49 => {
                let gva = if r.chance(4) {
                    // The kernel reading (or writing) its page tables.
                    DIRECT + (r.pick(&dom.tables) << 12) + (r.below(512) << 3)
                } else if r.chance(5) {
                    DIRECT + (r.below(RAM * 512) << 3)
                } else {
                    slot(&mut r) + (r.below(512) << 3)
                };
                let mut acc = r.pick(&Access::ALL);
                if r.chance(60) {
                    // Mostly an access the guest tables allow, so that
                    // translations live long enough to go stale.
                    if let arch::Walk::Ok(l) = m.guest_walk_now(v, gva) {
                        let ctrl = m.ctrl(v);
                        let ok: Vec<Access> = Access::ALL
                            .iter()
                            .copied()
                            .filter(|&a| l.rights.allows(a, ctrl))
                            .collect();
                        if !ok.is_empty() {
                            acc = r.pick(&ok);
                        }
                    }
                }
                let value = if r.chance(30) {
                    r.pick(&dom.data) << 12 | flags(&mut r)
                } else {
                    r.next_u64() & 0xffff_ffff
                };
                // Plain data writes stay off the page tables most of the
                // time so that the address spaces live long.
                if acc.write && gva >= DIRECT && !r.chance(20) {
                    continue;
                }
                let o = m.access(v, gva, acc, value)?;
                judge(m, o, gva)?;
                if gva < DIRECT && matches!(o, Outcome::Ok(_)) {
                    if recent.len() == 8 {
                        recent.remove(0);
                    }
                    recent.push(gva & !0xfff);
                }
            }
            50..=66 => edit(m, &mut r, dom, v)?,
            67..=71 => {
                // The guest repairs one process: its upper levels and a few
                // leaves get their first values back.
                let o = &dom.orig[r.below(dom.orig.len() as u64) as usize];
                let mut fix: Vec<(u64, u64)> = o.iter().take(5).copied().collect();
                for _ in 0..8 {
                    fix.push(r.pick(o));
                }
                for (ea, val) in fix {
                    let out = m.access(v, DIRECT + ea, Access::WRITE, val)?;
                    judge(m, out, DIRECT + ea)?;
                }
            }
            72..=81 => {
                let va = slot(&mut r);
                m.invlpg(v, va)?;
            }
            82..=88 => {
                let p = r.pick(&dom.procs);
                m.write_cr3(v, p)?;
            }
            89..=92 => {
                let p = r.below(pc as u64) as usize;
                m.schedule(v, p)?;
            }
            93..=96 => {
                if !m.dirty_on(dom.d) {
                    m.enable_dirty(dom.d)?;
                } else if r.chance(80) {
                    m.get_dirty(dom.d)?;
                } else {
                    m.disable_dirty(dom.d)?;
                }
            }
            97 => m.zap_all(dom.d)?,
            98 => {
                let ctrl = Ctrl {
                    wp: !r.chance(30),
                    nxe: !r.chance(20),
                    paging: !r.chance(25),
                    mmio: r.chance(30),
                };
                m.set_mode(v, ctrl)?;
            }
            99..=102 if !recent.is_empty() => {
                // mprotect / munmap / remap of a page just used, then a
                // shootdown: every running vCPU of the domain flushes it and
                // touches it again.
                let va = r.pick(recent);
                if let Some(ea) = m
                    .entry_addr(dom.d, m.cr3(v), va, 1)
                    .filter(|&ea| ea < RAM << 12)
                {
                    let old = m.peek(dom.d, ea).unwrap_or(0);
                    let new = match r.below(3) {
                        0 => old & !RW,
                        1 => 0,
                        _ => r.pick(&dom.data) << 12 | flags(&mut r),
                    };
                    let o = m.access(v, DIRECT + ea, Access::WRITE, new)?;
                    judge(m, o, DIRECT + ea)?;
                    for &w in &dom.vcpus {
                        if m.running_on(w).is_some() {
                            m.invlpg(w, va)?;
                            let o = m.access(w, va, Access::WRITE, r.next_u64() & 0xffff)?;
                            judge(m, o, va)?;
                        }
                    }
                }
            }
            _ => {
                // A guest shootdown: every vCPU of the domain flushes one page.
                let va = slot(&mut r);
                for &w in &dom.vcpus {
                    if m.running_on(w).is_some() {
                        m.invlpg(w, va)?;
                    }
                }
            }
        }
    }
    for dom in &doms {
        if m.dirty_on(dom.d) {
            m.get_dirty(dom.d)?;
        }
    }
    Ok(())
}
