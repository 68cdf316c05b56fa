//! The per-pCPU L4 policy (seed 000) on the raw server API: a guest L4
//! write reaches every pCPU's copy of that L4, and the flush it needs goes
//! only to pCPUs in the domain's dirty mask.

use abi::mmu::{MemRegion, MemoryMap};
use abi::{
    CpuSet, DomainId, FlushScope, Gfn, Gpa, GuestCr3, Gva, Hpa, Mfn, MmuReply, MmuServer, PcpuId,
    PfErrorCode, PhysMem, VcpuId,
};
use mmu_server::fast::policy::PerPcpuCopies;
use mmu_server::fast::FastServer;
use mmu_server::sim::SimMem;

const BASE: u64 = 16;
const VA: u64 = 0x80_4000_0000; // PML4 index 1

fn region(gfn: u64, mfn: u64) -> MemoryMap {
    let mut m = MemoryMap::new();
    m.push(MemRegion {
        gfn: Gfn(gfn),
        mfn: Mfn(mfn),
        pages: 16,
    })
    .unwrap();
    m
}

fn root(r: MmuReply) -> u64 {
    match r {
        MmuReply::LoadShadowRoot { root, .. } => root.0,
        r => panic!("expected a root: {r:?}"),
    }
}

#[test]
fn l4_write_updates_every_copy_and_flushes_only_the_dirty_mask() {
    let mem = SimMem::new(128, 64..128);
    let g = |gfn: u64| Hpa((BASE + gfn) << 12);
    // Domain 1: PML4 (gfn 0)[1] -> PDPT (1)[1] -> PD (2)[0] -> PT (3)[0] -> gfn 4.
    mem.write_u64(Hpa(g(0).0 + 8), (1 << 12) | 7).unwrap();
    mem.write_u64(Hpa(g(1).0 + 8), (2 << 12) | 7).unwrap();
    mem.write_u64(g(2), (3 << 12) | 7).unwrap();
    mem.write_u64(g(3), (4 << 12) | 0x67).unwrap();
    let srv = FastServer::<PerPcpuCopies>::new("fast-percpu", &mem, mmu_server::Config::default());
    assert!(matches!(
        srv.create_domain(DomainId(1), &region(0, BASE)),
        MmuReply::Done { .. }
    ));
    assert!(matches!(
        srv.create_domain(DomainId(2), &region(0, BASE + 16)),
        MmuReply::Done { .. }
    ));
    for (v, d) in [(0, 1), (1, 1), (2, 2)] {
        assert!(matches!(
            srv.create_vcpu(DomainId(d), VcpuId(v)),
            MmuReply::Done { .. }
        ));
    }
    let mut roots = Vec::new();
    for v in 0..3u32 {
        root(srv.vcpu_scheduled(VcpuId(v), PcpuId(v)));
        roots.push(root(srv.write_cr3(VcpuId(v), PcpuId(v), GuestCr3(0))));
    }
    assert_ne!(roots[0], roots[1], "each pCPU runs on its own copy");
    for v in 0..2u32 {
        let r = srv.page_fault(VcpuId(v), PcpuId(v), Gva(VA), PfErrorCode(0));
        assert!(matches!(r, MmuReply::Resume { .. }), "{r:?}");
    }
    let slot = |r: u64| mem.read_u64(Hpa(r + 8)).unwrap();
    assert_ne!(slot(roots[0]) & 1, 0, "pCPU 0's copy links the L3");
    assert_eq!(slot(roots[0]), slot(roots[1]), "the copies agree");
    // The guest clears its PML4 entry 1 (an emulated write: the PML4 is
    // write-protected as a page table).
    let r = srv.emulated_write(VcpuId(0), PcpuId(0), Gpa(8), 0, 8);
    let MmuReply::WriteDone { flush: Some(f) } = r else {
        panic!("expected WriteDone with a flush: {r:?}")
    };
    assert_eq!(slot(roots[0]), 0, "pCPU 0's copy synced");
    assert_eq!(slot(roots[1]), 0, "pCPU 1's copy synced");
    assert_eq!(f.scope, FlushScope::All);
    let mut mask = CpuSet::EMPTY;
    mask.insert(PcpuId(0));
    mask.insert(PcpuId(1));
    assert_eq!(
        f.cpus, mask,
        "only the domain's dirty mask flushes (not pCPU 2)"
    );
    srv.audit().unwrap();
    // And the guest now faults where the entry was.
    let r = srv.page_fault(VcpuId(1), PcpuId(1), Gva(VA), PfErrorCode(0));
    assert!(matches!(r, MmuReply::InjectPageFault { .. }), "{r:?}");
}
