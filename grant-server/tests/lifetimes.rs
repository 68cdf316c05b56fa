//! Lifetimes the kernel may order either way, and handle reuse, on the
//! registered grant servers over the reference MMU server.

use abi::mmu::{MemRegion, MemoryMap, MmuReply, MmuServer};
use abi::{DomainId, Gfn, GrantError, GrantRef, GrantReply, GrantServer, MapHandle, Mfn};
use grant_server::{registry, DispatchPort};
use mmu_server::reference::Reference;
use mmu_server::sim::SimMem;
use mmu_server::Config;

const A: DomainId = DomainId(1);
const B: DomainId = DomainId(2);

fn map_of(d: DomainId) -> MemoryMap {
    let mut m = MemoryMap::new();
    m.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(1024 + 64 * u64::from(d.0)),
        pages: 64,
    })
    .unwrap();
    m
}

fn both(mmu: &dyn MmuServer, g: &dyn GrantServer) {
    for d in [A, B] {
        assert!(matches!(
            mmu.create_domain(d, &map_of(d)),
            MmuReply::Done { .. }
        ));
        assert!(matches!(
            g.create_domain(d, &map_of(d)),
            GrantReply::Done { .. }
        ));
    }
}

/// Runs `f` on each registered grant server over a fresh reference MMU
/// server, with domains `A` and `B` in both.
fn each(f: impl Fn(&str, &dyn MmuServer, &dyn GrantServer)) {
    for name in registry::NAMES {
        let mem = SimMem::new(4096, 3072..4096);
        let mmu = Reference::new(&mem, Config::default());
        let port = DispatchPort(&mmu);
        let g = registry::create(name, &port).unwrap();
        both(&mmu, &*g);
        f(name, &mmu, &*g);
    }
}

fn levels(g: &dyn GrantServer) -> (u64, u64, u64) {
    let GrantReply::Counters { counters: c, .. } = g.counters(None) else {
        panic!("counters");
    };
    (c.grants_active, c.maps_active, c.handles_in_use)
}

fn handle(r: GrantReply) -> MapHandle {
    match r {
        GrantReply::Mapped { handle, .. } => handle,
        other => panic!("{other:?}"),
    }
}

/// The MMU server forgot the mapper first (the kernel destroyed it there):
/// revoking its mappings when the granter dies still works, and nothing is
/// left once the grant server forgets the mapper too.
#[test]
fn mapper_gone_from_the_mmu_server_first() {
    each(|name, mmu, g| {
        assert!(matches!(
            g.grant(A, GrantRef(1), B, Gfn(9), false),
            GrantReply::Done { .. }
        ));
        let h = handle(g.map(B, A, GrantRef(1), Gfn(0x100), true));
        assert!(matches!(mmu.destroy_domain(B), MmuReply::Done { .. }));
        let r = g.destroy_domain(A);
        assert!(
            matches!(r, GrantReply::Done { flush: None }),
            "{name}: {r:?}"
        );
        assert_eq!(levels(g), (0, 0, 0), "{name}");
        let r = g.unmap(B, &[h]);
        let GrantReply::Unmapped { status, .. } = r else {
            panic!("{name}: {r:?}");
        };
        assert_eq!(status[0], Err(GrantError::BadHandle(h)), "{name}");
        assert!(matches!(g.destroy_domain(B), GrantReply::Done { .. }));
        assert!(
            matches!(mmu.destroy_domain(A), MmuReply::Done { .. }),
            "{name}"
        );
    });
}

/// A grant to a domain that died is dead for everyone, a new domain with
/// the same id included; the granter can still end it.
#[test]
fn grants_to_a_dead_domain_are_orphaned() {
    each(|name, mmu, g| {
        assert!(matches!(
            g.grant(A, GrantRef(3), B, Gfn(9), false),
            GrantReply::Done { .. }
        ));
        assert!(matches!(g.destroy_domain(B), GrantReply::Done { .. }));
        assert!(matches!(mmu.destroy_domain(B), MmuReply::Done { .. }));
        assert!(matches!(
            mmu.create_domain(B, &map_of(B)),
            MmuReply::Done { .. }
        ));
        assert!(matches!(
            g.create_domain(B, &map_of(B)),
            GrantReply::Done { .. }
        ));
        let r = g.map(B, A, GrantRef(3), Gfn(0x100), false);
        assert_eq!(
            r,
            GrantReply::error(GrantError::NotGrantedTo {
                gref: GrantRef(3),
                domain: B
            }),
            "{name}"
        );
        assert!(matches!(
            g.end_access(A, GrantRef(3)),
            GrantReply::Done { .. }
        ));
        assert_eq!(levels(g), (0, 0, 0), "{name}");
    });
}

/// A slot reused many times never accepts an old handle.
#[test]
fn stale_handles_stay_dead_across_slot_reuse() {
    each(|name, _, g| {
        assert!(matches!(
            g.grant(A, GrantRef(1), B, Gfn(9), true),
            GrantReply::Done { .. }
        ));
        let mut old = Vec::new();
        for _ in 0..200 {
            let h = handle(g.map(B, A, GrantRef(1), Gfn(0x100), false));
            assert!(!old.contains(&h), "{name}: {h:?} handed out again");
            let GrantReply::Unmapped { status, .. } = g.unmap(B, &[h]) else {
                panic!("{name}");
            };
            assert_eq!(status[0], Ok(()));
            old.push(h);
        }
        let live = handle(g.map(B, A, GrantRef(1), Gfn(0x100), false));
        let GrantReply::Unmapped { status, .. } = g.unmap(B, &old[..32]) else {
            panic!("{name}");
        };
        assert!(status
            .iter()
            .all(|s| matches!(s, Err(GrantError::BadHandle(_)))));
        assert_eq!(levels(g), (1, 1, 1), "{name}: the live mapping survived");
        let GrantReply::Unmapped { status, .. } = g.unmap(B, &[live]) else {
            panic!("{name}");
        };
        assert_eq!(status[0], Ok(()));
    });
}
