//! The suite proves it can fail: deliberately broken servers (wrappers
//! around the reference, through the `MmuServer` trait, existing only here)
//! must each be caught, and the unbroken wrapper must pass.

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
}

struct Broken<'a> {
    inner: Box<dyn MmuServer + 'a>,
    phys: &'a SuitePhys<'a>,
    bug: Bug,
    roots: Mutex<BTreeMap<u32, u64>>,
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
        self.inner.create_domain(domain, memory)
    }
    fn destroy_domain(&self, domain: DomainId) -> MmuReply {
        self.inner.destroy_domain(domain)
    }
    fn create_vcpu(&self, domain: DomainId, vcpu: VcpuId) -> MmuReply {
        self.inner.create_vcpu(domain, vcpu)
    }
    fn vcpu_scheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        self.note(self.inner.vcpu_scheduled(vcpu, pcpu))
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
        self.note(self.inner.write_cr3(vcpu, pcpu, cr3))
    }
    fn set_paging_mode(&self, vcpu: VcpuId, pcpu: PcpuId, mode: PagingMode) -> MmuReply {
        self.note(self.inner.set_paging_mode(vcpu, pcpu, mode))
    }
    fn invlpg(&self, vcpu: VcpuId, pcpu: PcpuId, gva: Gva) -> MmuReply {
        let r = self.note(self.inner.invlpg(vcpu, pcpu, gva));
        if self.bug == Bug::SkipFlush {
            without_flush(r)
        } else {
            r
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
        self.inner.enable_dirty_log(domain)
    }
    fn disable_dirty_log(&self, domain: DomainId) -> MmuReply {
        self.inner.disable_dirty_log(domain)
    }
    fn get_and_clear_dirty(&self, domain: DomainId, start: Gfn) -> MmuReply {
        let r = self.inner.get_and_clear_dirty(domain, start);
        match (self.bug, r) {
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
        if let Err(f) = run_random(seed, 1500, &make, Ram::new(0x10_0000_0000, &words)) {
            out.push(f.to_string());
        }
    }
    out
}

const SOME: &[&str] = &[
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
    // And it is caught by a short random run as well.
    let r = failures(bug, &[], 3);
    assert!(!r.is_empty(), "{bug:?} not caught by the random runs");
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
fn a_frame_outside_the_guest_is_caught() {
    caught(
        Bug::OutsideFrame,
        &["demand_paging"],
        "not a frame of this guest",
    );
}

#[test]
fn cpu_set_is_used() {
    // Keep the abi imports honest: a flush obligation names a CPU set.
    let f = FlushObligation {
        cpus: CpuSet::single(PcpuId(3)),
        scope: abi::FlushScope::All,
    };
    assert!(f.cpus.contains(PcpuId(3)));
}
