//! Zap generations (seed 004) on the raw server API: zap-all is one
//! generation bump, the obsolete frames are freed lazily in bounded batches
//! only after the zap's flush was acknowledged, nothing leaks, and destroying
//! the domain returns every frame.

use abi::mmu::{MemRegion, MemoryMap};
use abi::{
    DomainId, FlushScope, Gfn, GuestCr3, Gva, Hpa, Mfn, MmuReply, MmuServer, PcpuId, PfErrorCode,
    PhysMem, VcpuId,
};
use mmu_server::fast::policy::SharedRoots;
use mmu_server::fast::{FastServer, RECLAIM_BATCH};
use mmu_server::sim::SimMem;

const BASE: u64 = 16;
const TABLES: u64 = 300;

#[test]
fn zap_all_is_lazy_acknowledged_bounded_and_leak_free() {
    // Guest: PML4 (gfn 0) -> PDPT (1) -> PD (2) -> TABLES page tables
    // (gfn 3..), each mapping one page (gfn 3 + TABLES) at its index 0.
    let guest = TABLES + 8;
    let mem = SimMem::new(BASE + guest + 1024, BASE + guest..BASE + guest + 1024);
    let g = |gfn: u64| Hpa((BASE + gfn) << 12);
    mem.write_u64(g(0), (1 << 12) | 7).unwrap();
    mem.write_u64(g(1), (2 << 12) | 7).unwrap();
    let data = 3 + TABLES;
    for t in 0..TABLES {
        mem.write_u64(Hpa(g(2).0 + 8 * t), ((3 + t) << 12) | 7)
            .unwrap();
        mem.write_u64(g(3 + t), (data << 12) | 0x67).unwrap();
    }
    let srv = FastServer::<SharedRoots>::new("fast-shared", &mem, mmu_server::Config::default());
    let mut map = MemoryMap::new();
    map.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(BASE),
        pages: guest,
    })
    .unwrap();
    let d = DomainId(1);
    let (v, p) = (VcpuId(0), PcpuId(0));
    assert!(matches!(srv.create_domain(d, &map), MmuReply::Done { .. }));
    assert!(matches!(srv.create_vcpu(d, v), MmuReply::Done { .. }));
    srv.vcpu_scheduled(v, p);
    srv.write_cr3(v, p, GuestCr3(0));
    let touch_all = || {
        for t in 0..TABLES {
            let r = srv.page_fault(v, p, Gva(t << 21), PfErrorCode(0));
            assert!(matches!(r, MmuReply::Resume { .. }), "{r:?}");
        }
    };
    touch_all();
    let live = srv.shadow_pages(d);
    assert_eq!(live as u64, TABLES + 3, "PML4 + PDPT + PD + one per table");
    assert_eq!(mem.frames_in_use(), live);

    // Zap: O(1), nothing freed yet, every root void.
    let r = srv.zap_all(d);
    let MmuReply::Done { flush: Some(f) } = r else {
        panic!("{r:?}")
    };
    assert_eq!(f.scope, FlushScope::AllReloadRoots);
    assert!(f.cpus.contains(p));
    assert_eq!(srv.shadow_pages(d), 0);
    assert_eq!(
        mem.frames_in_use(),
        live,
        "nothing is freed before the flush is acknowledged"
    );

    // The next request from pCPU 0 acknowledges the flush; each request
    // frees at most RECLAIM_BATCH obsolete pages.
    let r = srv.vcpu_scheduled(v, p);
    assert!(matches!(r, MmuReply::LoadShadowRoot { .. }), "{r:?}");
    let mut before = mem.frames_in_use();
    let mut requests = 0;
    while srv
        .stats()
        .sp_freed
        .load(core::sync::atomic::Ordering::Relaxed)
        < live as u64
    {
        srv.page_fault(v, p, Gva(0), PfErrorCode(0));
        let now = mem.frames_in_use();
        assert!(
            before.saturating_sub(now) <= RECLAIM_BATCH,
            "a bounded batch per request"
        );
        before = now;
        requests += 1;
        assert!(requests < 100, "obsolete pages are freed eventually");
    }
    assert!(
        requests > 1,
        "freeing {live} pages took more than one request"
    );
    touch_all();
    assert_eq!(
        mem.frames_in_use(),
        srv.shadow_pages(d),
        "no leak after a zap"
    );

    // Destroying the domain returns everything.
    srv.vcpu_descheduled(v, p);
    assert!(matches!(srv.destroy_domain(d), MmuReply::Done { .. }));
    assert_eq!(mem.frames_in_use(), 0, "every frame back in the pool");
}
