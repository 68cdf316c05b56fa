//! The suite proves it can fail: deliberately broken servers (wrappers
//! around the reference, through the `MmuServer` trait, existing only here)
//! must each be caught, and the unbroken wrapper must pass.

use abi::mmu::DIRTY_CHUNK_PAGES;
use abi::{
    CpuSet, DirtyChunk, DomainId, FlushObligation, Gfn, Gpa, GuestCr3, Gva, Hpa, MemoryMap,
    MmuReply, MmuServer, PagingMode, PcpuId, PfErrorCode, PhysMem, VcpuId,
};
use conformance::arch::{ADDR_MASK, P, PS, RW, US};
use conformance::{
    run_random, run_scenario, scenarios, Factory, Ram, SuitePhys, GUEST_FRAMES, RAM_FRAMES,
};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// No bug: the wrapper must pass.
    None,
    /// Drops the flush obligation of every INVLPG reply.
    SkipFlush,
    /// Makes every shadow path it just filled writable and user-accessible.
    WidenPermission,
    /// Clears the first dirty bit of every dirty-log chunk.
    LoseDirty,
    /// Points every leaf it just filled at a frame outside the guest.
    OutsideFrame,
    /// Flushes only the requesting pCPU (forgets where a vCPU ran before),
    /// and never when a vCPU comes back to a pCPU.
    FlushOnlyHere,
    /// Leaves out of every bitmap chunk the first frame that changed only in
    /// A/D bits since the previous harvest (a server that forgets one of its
    /// own A/D updates in guest page tables).
    LoseAdOnly,
    /// When the guest turns paging on, keeps the identity root of paging off
    /// (the mode change never reaches the reference; the reply names the
    /// old root and flushes nothing).
    KeepIdentity,
}

/// A memory region as (gfn, mfn, pages).
type Region = (u64, u64, u64);

struct Broken<'a> {
    inner: Box<dyn MmuServer + 'a>,
    phys: &'a SuitePhys<'a>,
    bug: Bug,
    roots: Mutex<BTreeMap<u32, u64>>,
    /// Per domain: its memory map as (gfn, mfn, pages).
    maps: Mutex<BTreeMap<u32, Vec<Region>>>,
    /// Per (domain, gfn): the frame's words at the previous harvest.
    copies: Mutex<BTreeMap<(u32, u64), Vec<u64>>>,
    /// The vCPUs whose paging is off, as last told.
    paging_off: Mutex<std::collections::BTreeSet<u32>>,
}

fn only_here(r: MmuReply, pcpu: PcpuId) -> MmuReply {
    r.flush().map_or(r.clone(), |f| {
        let f = FlushObligation {
            cpus: f.cpus.intersection(CpuSet::single(pcpu)),
            scope: f.scope,
        };
        match r {
            MmuReply::Done { .. } => MmuReply::Done { flush: Some(f) },
            MmuReply::Resume { .. } => MmuReply::Resume { flush: Some(f) },
            MmuReply::LoadShadowRoot { vcpu, root, .. } => MmuReply::LoadShadowRoot {
                vcpu,
                root,
                flush: Some(f),
            },
            other => other,
        }
    })
}

fn without_flush(r: MmuReply) -> MmuReply {
    match r {
        MmuReply::Done { .. } => MmuReply::Done { flush: None },
        MmuReply::LoadShadowRoot { vcpu, root, .. } => MmuReply::LoadShadowRoot {
            vcpu,
            root,
            flush: None,
        },
        other => other,
    }
}

impl Broken<'_> {
    /// The words of guest frame `gfn` of `domain` now.
    fn frame(&self, domain: DomainId, gfn: u64) -> Option<Vec<u64>> {
        let maps = self.maps.lock().unwrap();
        let &(g, m, _) = maps
            .get(&domain.0)?
            .iter()
            .find(|&&(g, _, n)| gfn >= g && gfn - g < n)?;
        let base = (m + gfn - g) << 12;
        (0..512u64)
            .map(|i| self.phys.read_u64(Hpa(base + 8 * i)).ok())
            .collect()
    }

    /// Records the words of `domain`'s frames in `gfns` (the previous
    /// harvest's state, for [`Bug::LoseAdOnly`]).
    fn copy(&self, domain: DomainId, gfns: std::ops::Range<u64>) {
        let frames: Vec<u64> = {
            let maps = self.maps.lock().unwrap();
            let Some(map) = maps.get(&domain.0) else {
                return;
            };
            map.iter()
                .flat_map(|&(g, _, n)| g..g + n)
                .filter(|g| gfns.contains(g))
                .collect()
        };
        for g in frames {
            if let Some(words) = self.frame(domain, g) {
                self.copies.lock().unwrap().insert((domain.0, g), words);
            }
        }
    }

    /// Whether frame `gfn` changed only in A/D bits since the last copy.
    fn ad_only(&self, domain: DomainId, gfn: u64) -> bool {
        let ad = 0x60u64;
        let Some(now) = self.frame(domain, gfn) else {
            return false;
        };
        let copies = self.copies.lock().unwrap();
        let Some(old) = copies.get(&(domain.0, gfn)) else {
            return false;
        };
        now != *old && now.iter().zip(old).all(|(a, b)| (a ^ b) & !ad == 0)
    }

    fn note(&self, r: MmuReply) -> MmuReply {
        if let MmuReply::LoadShadowRoot { vcpu, root, .. } = r {
            self.roots.lock().unwrap().insert(vcpu.0, root.0);
        }
        r
    }

    /// The shadow entries on the path to `gva` from `vcpu`'s root.
    fn path(&self, vcpu: VcpuId, gva: Gva) -> Vec<(u64, u64)> {
        let Some(&root) = self.roots.lock().unwrap().get(&vcpu.0) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let mut table = root & ADDR_MASK;
        for level in (1..=4u32).rev() {
            let at = table + ((gva.0 >> (12 + 9 * (level - 1))) & 511) * 8;
            let Ok(e) = self.phys.read_u64(Hpa(at)) else {
                break;
            };
            if e & P == 0 {
                break;
            }
            out.push((at, e));
            if level == 1 || e & PS != 0 {
                break;
            }
            table = e & ADDR_MASK;
        }
        out
    }
}

impl MmuServer for Broken<'_> {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> MmuReply {
        let map = memory.iter().map(|r| (r.gfn.0, r.mfn.0, r.pages)).collect();
        self.maps.lock().unwrap().insert(domain.0, map);
        self.inner.create_domain(domain, memory)
    }
    fn destroy_domain(&self, domain: DomainId) -> MmuReply {
        self.inner.destroy_domain(domain)
    }
    fn create_vcpu(&self, domain: DomainId, vcpu: VcpuId) -> MmuReply {
        self.inner.create_vcpu(domain, vcpu)
    }
    fn vcpu_scheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        let r = self.note(self.inner.vcpu_scheduled(vcpu, pcpu));
        if self.bug == Bug::FlushOnlyHere {
            without_flush(r)
        } else {
            r
        }
    }
    fn vcpu_descheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        self.inner.vcpu_descheduled(vcpu, pcpu)
    }
    fn page_fault(&self, vcpu: VcpuId, pcpu: PcpuId, gva: Gva, ec: PfErrorCode) -> MmuReply {
        let r = self.note(self.inner.page_fault(vcpu, pcpu, gva, ec));
        if !matches!(r, MmuReply::Resume { .. }) {
            return r;
        }
        let path = self.path(vcpu, gva);
        match self.bug {
            Bug::WidenPermission => {
                for &(at, e) in &path {
                    let _ = self.phys.write_u64(Hpa(at), e | RW | US);
                }
            }
            Bug::OutsideFrame => {
                if let Some(&(at, e)) = path.last() {
                    // The last frame of the guest area: no domain owns it.
                    let ram = self.phys.ram();
                    let bad = ram.first_mfn() + GUEST_FRAMES - 1;
                    let _ = self.phys.write_u64(Hpa(at), (e & !ADDR_MASK) | bad << 12);
                }
            }
            _ => {}
        }
        r
    }
    fn write_cr3(&self, vcpu: VcpuId, pcpu: PcpuId, cr3: GuestCr3) -> MmuReply {
        let r = self.note(self.inner.write_cr3(vcpu, pcpu, cr3));
        if self.bug == Bug::FlushOnlyHere {
            only_here(r, pcpu)
        } else {
            r
        }
    }
    fn set_paging_mode(&self, vcpu: VcpuId, pcpu: PcpuId, mode: PagingMode) -> MmuReply {
        let was_off = if mode.paging() {
            self.paging_off.lock().unwrap().remove(&vcpu.0)
        } else {
            self.paging_off.lock().unwrap().insert(vcpu.0);
            false
        };
        let root = self.roots.lock().unwrap().get(&vcpu.0).copied();
        match (self.bug, was_off, root) {
            (Bug::KeepIdentity, true, Some(root)) => MmuReply::LoadShadowRoot {
                vcpu,
                root: Hpa(root),
                flush: None,
            },
            _ => self.note(self.inner.set_paging_mode(vcpu, pcpu, mode)),
        }
    }
    fn invlpg(&self, vcpu: VcpuId, pcpu: PcpuId, gva: Gva) -> MmuReply {
        let r = self.note(self.inner.invlpg(vcpu, pcpu, gva));
        match self.bug {
            Bug::SkipFlush => without_flush(r),
            Bug::FlushOnlyHere => only_here(r, pcpu),
            _ => r,
        }
    }
    fn emulated_write(
        &self,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gpa: Gpa,
        value: u64,
        size: u8,
    ) -> MmuReply {
        self.inner.emulated_write(vcpu, pcpu, gpa, value, size)
    }
    fn enable_dirty_log(&self, domain: DomainId) -> MmuReply {
        if self.bug == Bug::LoseAdOnly {
            self.copy(domain, 0..u64::MAX);
        }
        self.inner.enable_dirty_log(domain)
    }
    fn disable_dirty_log(&self, domain: DomainId) -> MmuReply {
        self.inner.disable_dirty_log(domain)
    }
    fn get_and_clear_dirty(&self, domain: DomainId, start: Gfn) -> MmuReply {
        let r = self.inner.get_and_clear_dirty(domain, start);
        match (self.bug, r) {
            (Bug::LoseAdOnly, MmuReply::DirtyBitmap { mut chunk, flush }) => {
                let lost: Vec<u64> = chunk
                    .dirty()
                    .map(|g| g.0)
                    .filter(|&g| self.ad_only(domain, g))
                    .take(1)
                    .collect();
                for g in lost {
                    let j = g - chunk.start.0;
                    chunk.bits[(j / 8) as usize] &= !(1 << (j % 8));
                }
                self.copy(domain, start.0..start.0 + DIRTY_CHUNK_PAGES);
                MmuReply::DirtyBitmap { chunk, flush }
            }
            (Bug::LoseDirty, MmuReply::DirtyBitmap { mut chunk, flush }) => {
                if let Some(b) = chunk.bits.iter_mut().find(|b| **b != 0) {
                    *b &= *b - 1;
                }
                MmuReply::DirtyBitmap {
                    chunk: DirtyChunk { ..chunk },
                    flush,
                }
            }
            (_, r) => r,
        }
    }
    fn zap_all(&self, domain: DomainId) -> MmuReply {
        self.inner.zap_all(domain)
    }
}

struct MakeBroken(Bug);

impl Factory for MakeBroken {
    fn make<'a>(&self, phys: &'a SuitePhys<'a>) -> Result<Box<dyn MmuServer + 'a>, String> {
        let inner = mmu_server::registry::create("reference", phys).map_err(|e| e.to_string())?;
        Ok(Box::new(Broken {
            inner,
            phys,
            bug: self.0,
            roots: Mutex::new(BTreeMap::new()),
            maps: Mutex::new(BTreeMap::new()),
            copies: Mutex::new(BTreeMap::new()),
            paging_off: Mutex::new(Default::default()),
        }))
    }
}

/// Runs `names` (and, if `seeds`, a short random run) against `bug`;
/// returns the failures' reports.
fn failures(bug: Bug, names: &[&str], seeds: u64) -> Vec<String> {
    let mut out = Vec::new();
    let make = MakeBroken(bug);
    let words: Vec<AtomicU64> = (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
    for sc in scenarios().iter().filter(|s| names.contains(&s.name)) {
        for w in &words {
            w.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        if let Err(f) = run_scenario(sc, &make, Ram::new(0x10_0000_0000, &words)) {
            out.push(f.to_string());
        }
    }
    for seed in 0..seeds {
        if let Err(f) = run_random(seed, 2500, &make, Ram::new(0x10_0000_0000, &words)) {
            out.push(f.to_string());
        }
    }
    out
}

const SOME: &[&str] = &[
    "paging_on",
    "demand_paging",
    "read_only",
    "downgrade_invlpg",
    "dirty_rounds",
    "smp_shared_l4",
];

#[test]
fn the_unbroken_wrapper_passes() {
    let f = failures(Bug::None, SOME, 2);
    assert!(f.is_empty(), "the plain wrapper failed:\n{}", f.join("\n"));
}

fn caught(bug: Bug, names: &[&str], what: &str) {
    caught_by(bug, names, what, true)
}

/// `random`: also demand that short random runs catch it.
fn caught_by(bug: Bug, names: &[&str], what: &str, random: bool) {
    let f = failures(bug, names, 0);
    assert!(!f.is_empty(), "{bug:?} was not caught by {names:?}");
    for report in &f {
        println!("{bug:?} caught: {report}");
    }
    assert!(
        f.iter().any(|r| r.contains(what)),
        "{bug:?} caught, but not as {what:?}:\n{}",
        f.join("\n")
    );
    if random {
        // And it is caught by short random runs as well.
        let r = failures(bug, &[], 3);
        assert!(!r.is_empty(), "{bug:?} not caught by the random runs");
    }
}

#[test]
fn a_skipped_flush_is_caught() {
    caught(
        Bug::SkipFlush,
        &["downgrade_invlpg"],
        "translation allowed by the guest tables (TLB",
    );
}

#[test]
fn a_widened_permission_is_caught() {
    caught(Bug::WidenPermission, &["read_only"], "rights");
}

#[test]
fn a_lost_dirty_page_is_caught() {
    caught(
        Bug::LoseDirty,
        &["dirty_rounds"],
        "dirty log holds every page",
    );
}

#[test]
fn a_frame_changed_only_by_the_servers_ad_updates_is_caught() {
    // The guest stores nothing to the lost frames (only the server's walks
    // set A/D in them): only the exact, contents-based check can see it.
    caught(
        Bug::LoseAdOnly,
        &["dirty_ad_only"],
        "dirty log holds every frame whose bytes changed since the previous harvest",
    );
    let f = failures(Bug::LoseAdOnly, &["dirty_ad_only"], 0);
    assert!(
        f.iter()
            .any(|r| r.contains("changed by the server's A/D updates")),
        "the report names the server's A/D updates as the writer:\n{}",
        f.join("\n")
    );
}

#[test]
fn a_frame_outside_the_guest_is_caught() {
    caught(
        Bug::OutsideFrame,
        &["demand_paging"],
        "not a frame of this guest",
    );
}

#[test]
fn an_identity_root_kept_after_paging_on_is_caught() {
    caught(
        Bug::KeepIdentity,
        &["paging_on"],
        "translation allowed by the guest tables (TLB",
    );
}

#[test]
fn a_flush_of_only_the_current_pcpu_is_caught() {
    // Random runs rarely catch this one against the reference: other vCPUs
    // coming to a pCPU flush it whole (`All` drops every ASID).
    caught_by(
        Bug::FlushOnlyHere,
        &["migration"],
        "translation allowed by the guest tables (TLB",
        false,
    );
}

/// A correct variant that exercises the suite's EmulateWrite path: every
/// supervisor write fault the guest tables allow is emulated (unless dirty
/// logging is on), the rest goes to the reference.
struct Emulating<'a> {
    inner: Box<dyn MmuServer + 'a>,
    /// Added to the gpa named in EmulateWrite (0: correct).
    skew: u64,
    phys: &'a SuitePhys<'a>,
    st: Mutex<EmuState>,
}

#[derive(Default)]
struct EmuState {
    maps: BTreeMap<u32, MemoryMap>,
    dom_of: BTreeMap<u32, u32>,
    cr3: BTreeMap<u32, u64>,
    mode: BTreeMap<u32, PagingMode>,
    logging: std::collections::BTreeSet<u32>,
}

impl Emulating<'_> {
    fn hpa(map: &MemoryMap, gpa: u64) -> Option<u64> {
        map.iter()
            .find_map(|r| r.translate(Gfn(gpa >> 12)))
            .map(|m| m.0 << 12 | (gpa & 0xfff))
    }
}

impl MmuServer for Emulating<'_> {
    fn name(&self) -> &'static str {
        "emulating"
    }
    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> MmuReply {
        self.st
            .lock()
            .unwrap()
            .maps
            .insert(domain.0, memory.clone());
        self.inner.create_domain(domain, memory)
    }
    fn destroy_domain(&self, domain: DomainId) -> MmuReply {
        self.inner.destroy_domain(domain)
    }
    fn create_vcpu(&self, domain: DomainId, vcpu: VcpuId) -> MmuReply {
        self.st.lock().unwrap().dom_of.insert(vcpu.0, domain.0);
        self.inner.create_vcpu(domain, vcpu)
    }
    fn vcpu_scheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        self.inner.vcpu_scheduled(vcpu, pcpu)
    }
    fn vcpu_descheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        self.inner.vcpu_descheduled(vcpu, pcpu)
    }
    fn page_fault(&self, vcpu: VcpuId, pcpu: PcpuId, gva: Gva, ec: PfErrorCode) -> MmuReply {
        use conformance::arch::{walk, Access, Ctrl, Walk, A, D};
        if ec.is_write() && !ec.is_user() {
            let st = self.st.lock().unwrap();
            let d = st.dom_of.get(&vcpu.0).copied().unwrap_or(0);
            let mode = st.mode.get(&vcpu.0).copied().unwrap_or_default();
            let ctrl = Ctrl {
                wp: mode.wp(),
                nxe: mode.nxe(),
                paging: mode.paging(),
                mmio: mode.has(PagingMode::MMIO),
            };
            if let (Some(map), Some(&cr3), false) = (
                st.maps.get(&d),
                st.cr3.get(&vcpu.0),
                st.logging.contains(&d),
            ) {
                let read =
                    |gpa: u64| Self::hpa(map, gpa).and_then(|h| self.phys.read_u64(Hpa(h)).ok());
                if let Walk::Ok(l) = walk(&read, cr3, gva.0, ctrl) {
                    let gpa = l.phys(gva.0);
                    if l.rights.allows(Access::WRITE, ctrl) && Self::hpa(map, gpa).is_some() {
                        for i in 0..l.depth {
                            let bits = if i + 1 == l.depth { A | D } else { A };
                            if let Some(h) = Self::hpa(map, l.path[i]) {
                                let e = self.phys.read_u64(Hpa(h)).unwrap_or(0);
                                if e & bits != bits {
                                    let _ = self.phys.write_u64(Hpa(h), e | bits);
                                }
                            }
                        }
                        return MmuReply::EmulateWrite {
                            gpa: Gpa(gpa + self.skew),
                            flush: None,
                        };
                    }
                }
            }
        }
        self.inner.page_fault(vcpu, pcpu, gva, ec)
    }
    fn write_cr3(&self, vcpu: VcpuId, pcpu: PcpuId, cr3: GuestCr3) -> MmuReply {
        self.st.lock().unwrap().cr3.insert(vcpu.0, cr3.table().0);
        self.inner.write_cr3(vcpu, pcpu, cr3)
    }
    fn set_paging_mode(&self, vcpu: VcpuId, pcpu: PcpuId, mode: PagingMode) -> MmuReply {
        self.st.lock().unwrap().mode.insert(vcpu.0, mode);
        self.inner.set_paging_mode(vcpu, pcpu, mode)
    }
    fn invlpg(&self, vcpu: VcpuId, pcpu: PcpuId, gva: Gva) -> MmuReply {
        self.inner.invlpg(vcpu, pcpu, gva)
    }
    fn emulated_write(
        &self,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gpa: Gpa,
        value: u64,
        size: u8,
    ) -> MmuReply {
        let st = self.st.lock().unwrap();
        let d = st.dom_of.get(&vcpu.0).copied().unwrap_or(0);
        match (size, st.maps.get(&d).and_then(|m| Self::hpa(m, gpa.0))) {
            (8, Some(h)) if gpa.0.is_multiple_of(8) => {
                let _ = self.phys.write_u64(Hpa(h), value);
                MmuReply::WriteDone { flush: None }
            }
            _ => {
                drop(st);
                self.inner.emulated_write(vcpu, pcpu, gpa, value, size)
            }
        }
    }
    fn enable_dirty_log(&self, domain: DomainId) -> MmuReply {
        self.st.lock().unwrap().logging.insert(domain.0);
        self.inner.enable_dirty_log(domain)
    }
    fn disable_dirty_log(&self, domain: DomainId) -> MmuReply {
        self.st.lock().unwrap().logging.remove(&domain.0);
        self.inner.disable_dirty_log(domain)
    }
    fn get_and_clear_dirty(&self, domain: DomainId, start: Gfn) -> MmuReply {
        self.inner.get_and_clear_dirty(domain, start)
    }
    fn zap_all(&self, domain: DomainId) -> MmuReply {
        self.inner.zap_all(domain)
    }
}

struct MakeEmulating(u64);

impl Factory for MakeEmulating {
    fn make<'a>(&self, phys: &'a SuitePhys<'a>) -> Result<Box<dyn MmuServer + 'a>, String> {
        let inner = mmu_server::registry::create("reference", phys).map_err(|e| e.to_string())?;
        Ok(Box::new(Emulating {
            inner,
            skew: self.0,
            phys,
            st: Mutex::new(EmuState::default()),
        }))
    }
}

#[test]
fn an_emulating_server_passes() {
    let words: Vec<AtomicU64> = (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
    let mut fails = Vec::new();
    let mut emulated = 0;
    for sc in scenarios() {
        for w in &words {
            w.store(0, std::sync::atomic::Ordering::Relaxed);
        }
        match run_scenario(sc, &MakeEmulating(0), Ram::new(0x10_0000_0000, &words)) {
            Ok(s) => emulated += s.emulated,
            Err(f) => fails.push(f.to_string()),
        }
    }
    for seed in 0..2 {
        match run_random(
            seed,
            1500,
            &MakeEmulating(0),
            Ram::new(0x10_0000_0000, &words),
        ) {
            Ok(s) => emulated += s.emulated,
            Err(f) => fails.push(f.to_string()),
        }
    }
    assert!(
        fails.is_empty(),
        "the emulating server failed:\n{}",
        fails.join("\n")
    );
    assert!(emulated > 100, "only {emulated} writes were emulated");
}

#[test]
fn a_wrong_emulated_gpa_is_caught() {
    let words: Vec<AtomicU64> = (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
    let sc = scenarios()
        .iter()
        .find(|s| s.name == "demand_paging")
        .unwrap();
    let r = run_scenario(sc, &MakeEmulating(8), Ram::new(0x10_0000_0000, &words));
    let f = r.expect_err("an EmulateWrite naming the wrong gpa was not caught");
    assert!(f.what.contains("EmulateWrite names the gpa"), "{f}");
}
