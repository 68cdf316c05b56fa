//! Concurrent grant traffic over every registered MMU server: one granter,
//! several mapping domains, each on its own host thread (its own pCPU),
//! mapping batches of grants, faulting them in, "accessing" some (setting A
//! in the shadow leaf as the CPU would) and unmapping the batch. The flush
//! decision must match what was touched in every batch (accessed-hint:
//! flush iff some leaf had A; always-flush: always), every status is `Ok`,
//! and afterwards nothing is left; the fast servers pass their audit.

use abi::mmu::{MemRegion, MemoryMap, MmuReply, MmuServer};
use abi::{
    DomainId, GrantRef, GrantReply, GrantServer, GuestCr3, Gva, Hpa, MapHandle, Mfn, PagingMode,
    PcpuId, PfErrorCode, PhysMem, VcpuId,
};
use grant_server::{registry, DispatchPort};
use mmu_server::fast::policy::{L4Policy, PerPcpuCopies, SharedRoots};
use mmu_server::fast::FastServer;
use mmu_server::reference::Reference;
use mmu_server::sim::SimMem;
use mmu_server::Config;

const FRAMES: u64 = 64;
const GRANTER: DomainId = DomainId(1);
const MAPPERS: u32 = 3;
const BATCH: u64 = 8;
const ROUNDS: u64 = 60;
const WINDOW: u64 = 0x4000_0000;
const FOREIGN: u64 = 0x100;
const A: u64 = 1 << 5;

fn base(d: u32) -> u64 {
    1024 + u64::from(d) * FRAMES
}

fn map_of(d: u32) -> MemoryMap {
    let mut m = MemoryMap::new();
    m.push(MemRegion {
        gfn: abi::Gfn(0),
        mfn: Mfn(base(d)),
        pages: FRAMES,
    })
    .unwrap();
    m
}

/// Guest tables of domain `d`: WINDOW + g * 4 KiB -> gfn g, g < 0x200.
fn tables(mem: &SimMem, d: u32) {
    let t = |g: u64| Hpa((base(d) + g) << 12);
    mem.write_u64(t(0), (1 << 12) | 7).unwrap();
    mem.write_u64(Hpa(t(1).0 + 8), (2 << 12) | 7).unwrap();
    mem.write_u64(t(2), (3 << 12) | 7).unwrap();
    for g in 0..0x200u64 {
        mem.write_u64(Hpa(t(3).0 + 8 * g), (g << 12) | 0x67)
            .unwrap();
    }
}

fn leaf(mem: &SimMem, root: u64, gva: Gva) -> Option<Hpa> {
    let mut table = root & !0xfff;
    for level in (1..=4u8).rev() {
        let at = Hpa(table + 8 * gva.table_index(level) as u64);
        let e = mem.read_u64(at).unwrap();
        if e & 1 == 0 {
            return None;
        }
        if level == 1 {
            return Some(at);
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    None
}

/// One mapping domain's thread.
fn mapper(mem: &SimMem, mmu: &dyn MmuServer, grant: &dyn GrantServer, m: u32, hint: bool) {
    let dom = DomainId(2 + m);
    let (v, p) = (VcpuId(10 + m), PcpuId(m));
    mmu.vcpu_scheduled(v, p);
    mmu.set_paging_mode(v, p, PagingMode(PagingMode::WP | PagingMode::NXE));
    let MmuReply::LoadShadowRoot { root, .. } = mmu.write_cr3(v, p, GuestCr3(0)) else {
        panic!("no root");
    };
    let mut x = 0x1234_5678_u64 ^ u64::from(m);
    for round in 0..ROUNDS {
        let mut hs = Vec::new();
        let mut touched = false;
        for i in 0..BATCH {
            let gref = GrantRef(m * 100 + i as u32);
            let gfn = abi::Gfn(FOREIGN + i);
            let h = match grant.map(dom, GRANTER, gref, gfn, i % 2 == 0) {
                GrantReply::Mapped { handle, .. } => handle,
                other => panic!("mapper {m} round {round}: {other:?}"),
            };
            hs.push(h);
            let r = mmu.page_fault(
                v,
                p,
                Gva(WINDOW + gfn.0 * 4096),
                PfErrorCode(PfErrorCode::U),
            );
            // (The root may have been voided by a concurrent reclaim: then
            // nothing is installed under the old one and nothing touched.)
            if !matches!(r, MmuReply::Resume { .. }) {
                continue;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if x.is_multiple_of(5) {
                if let Some(at) = leaf(mem, root.0, Gva(WINDOW + gfn.0 * 4096)) {
                    let e = mem.read_u64(at).unwrap();
                    if e & 1 != 0 && mem.compare_exchange_u64(at, e, e | A).unwrap().is_ok() {
                        touched = true;
                    }
                }
            }
        }
        let handles: Vec<MapHandle> = hs;
        let GrantReply::Unmapped { status, flush } = grant.unmap(dom, &handles) else {
            panic!("mapper {m}: unmap");
        };
        assert!(status.iter().all(|s| s.is_ok()), "mapper {m}: {status:?}");
        if hint {
            assert_eq!(
                flush.is_some(),
                touched,
                "mapper {m} round {round}: flush {flush:?}, touched {touched}"
            );
        } else {
            assert!(flush.is_some(), "mapper {m} round {round}: always-flush");
        }
    }
    mmu.vcpu_descheduled(v, p);
}

fn run(mem: &SimMem, mmu: &dyn MmuServer, audit: &dyn Fn() -> Result<(), String>) {
    for name in registry::NAMES {
        let port = DispatchPort(mmu);
        let grant = registry::create(name, &port).unwrap();
        let grant = &*grant;
        for d in 1..=1 + MAPPERS {
            assert!(matches!(
                mmu.create_domain(DomainId(d), &map_of(d)),
                MmuReply::Done { .. }
            ));
            assert!(matches!(
                grant.create_domain(DomainId(d), &map_of(d)),
                GrantReply::Done { .. }
            ));
            tables(mem, d);
        }
        for m in 0..MAPPERS {
            mmu.create_vcpu(DomainId(2 + m), VcpuId(10 + m));
            for i in 0..BATCH {
                let r = grant.grant(
                    GRANTER,
                    GrantRef(m * 100 + i as u32),
                    DomainId(2 + m),
                    abi::Gfn(8 + i),
                    false,
                );
                assert!(matches!(r, GrantReply::Done { .. }), "{r:?}");
            }
        }
        let hint = *name == registry::ACCESSED_HINT;
        std::thread::scope(|s| {
            for m in 0..MAPPERS {
                s.spawn(move || mapper(mem, mmu, grant, m, hint));
            }
        });
        audit().unwrap();
        for d in (1..=1 + MAPPERS).rev() {
            assert!(matches!(
                grant.destroy_domain(DomainId(d)),
                GrantReply::Done { .. }
            ));
            let r = mmu.destroy_domain(DomainId(d));
            assert!(matches!(r, MmuReply::Done { .. }), "{name}: {r:?}");
        }
        let GrantReply::Counters { counters: c, .. } = grant.counters(None) else {
            panic!("counters");
        };
        assert_eq!(
            (c.grants_active, c.maps_active, c.handles_in_use),
            (0, 0, 0)
        );
        assert_eq!(c.batches, ROUNDS * u64::from(MAPPERS), "{name}");
        assert_eq!(c.flushes + c.flushes_avoided, c.batches, "{name}");
    }
}

fn fast<Pol: L4Policy + Send + Sync>(name: &'static str) {
    let mem = SimMem::new(4096, 3072..4096);
    let s = FastServer::<Pol>::new(name, &mem, Config::default());
    run(&mem, &s, &|| s.audit());
}

#[test]
fn concurrent_grant_traffic_over_the_reference() {
    let mem = SimMem::new(4096, 3072..4096);
    let s = Reference::new(&mem, Config::default());
    run(&mem, &s, &|| Ok(()));
}

#[test]
fn concurrent_grant_traffic_over_fast_shared() {
    fast::<SharedRoots>("fast-shared");
}

#[test]
fn concurrent_grant_traffic_over_fast_percpu() {
    fast::<PerPcpuCopies>("fast-percpu");
}
