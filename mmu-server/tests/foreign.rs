//! Foreign frames (grant mappings) on every registered MMU server, through
//! the wire: leaves created with A clear, the unmap's accessed report
//! (atomic, and kept across zaps), read-only mappings, every error with its
//! value, and nothing leaked. The fast servers are audited (F1, F2 and the
//! rest) after every step.

mod common;

use abi::mmu::{MemRegion, MemoryMap, MmuError, MmuReply, MmuRequest, Resource};
use abi::{
    DomainId, Gfn, GuestCr3, Gva, Hpa, Mfn, MmuServer, PagingMode, PcpuId, PfErrorCode, PhysMem,
    VcpuId,
};
use common::send;
use mmu_server::fast::policy::{PerPcpuCopies, SharedRoots};
use mmu_server::fast::{DirtyMode, FastServer};
use mmu_server::reference::Reference;
use mmu_server::sim::SimMem;
use mmu_server::{Config, MAX_FOREIGN_PER_DOMAIN};

const OWNER_BASE: u64 = 1024;
const MAPPER_BASE: u64 = 1100;
const FRAMES: u64 = 64;
const WINDOW: u64 = 0x4000_0000;
const FOREIGN: u64 = 0x100;
const P: u64 = 1;
const RW: u64 = 2;
const US: u64 = 4;
const A: u64 = 1 << 5;
const D: u64 = 1 << 6;
const OWNER: DomainId = DomainId(1);
const MAPPER: DomainId = DomainId(2);
const V: VcpuId = VcpuId(7);
const PC: PcpuId = PcpuId(3);

fn gva(gfn: u64) -> Gva {
    Gva(WINDOW + gfn * 4096)
}

fn map_of(base: u64) -> MemoryMap {
    let mut m = MemoryMap::new();
    m.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(base),
        pages: FRAMES,
    })
    .unwrap();
    m
}

/// Memory with the mapper's guest tables: WINDOW + g * 4 KiB -> gfn g for
/// g < 0x200, writable, user, A and D set.
fn memory() -> SimMem {
    let mem = SimMem::new(4096, 3072..4096);
    let t = |g: u64| Hpa((MAPPER_BASE + g) << 12);
    mem.write_u64(t(0), (1 << 12) | P | RW | US).unwrap();
    mem.write_u64(Hpa(t(1).0 + 8), (2 << 12) | P | RW | US)
        .unwrap();
    mem.write_u64(t(2), (3 << 12) | P | RW | US).unwrap();
    for g in 0..0x200u64 {
        mem.write_u64(Hpa(t(3).0 + 8 * g), (g << 12) | P | RW | US | A | D)
            .unwrap();
    }
    mem
}

/// A server under test and its audit (a no-op for the reference).
struct Under<'m> {
    srv: &'m dyn MmuServer,
    audit: Box<dyn Fn() -> Result<(), String> + 'm>,
}

/// Every registered implementation over `mem` (leaked: a test's lifetime).
fn servers(mem: &SimMem) -> Vec<Under<'_>> {
    let c = Config::default();
    let reference: &Reference<'_, SimMem> = Box::leak(Box::new(Reference::new(mem, c)));
    let shared: &FastServer<'_, SharedRoots> =
        Box::leak(Box::new(FastServer::new("fast-shared", mem, c)));
    let percpu: &FastServer<'_, PerPcpuCopies> =
        Box::leak(Box::new(FastServer::new("fast-percpu", mem, c)));
    let dbit: &FastServer<'_, SharedRoots> = Box::leak(Box::new(FastServer::with_dirty_mode(
        "fast-dbit",
        mem,
        c,
        DirtyMode::DirtyBits,
    )));
    vec![
        Under {
            srv: reference,
            audit: Box::new(|| Ok(())),
        },
        Under {
            srv: shared,
            audit: Box::new(move || shared.audit()),
        },
        Under {
            srv: percpu,
            audit: Box::new(move || percpu.audit()),
        },
        Under {
            srv: dbit,
            audit: Box::new(move || dbit.audit()),
        },
    ]
}

/// Both domains, the mapper's vCPU running on `PC` with its tables loaded;
/// returns the shadow root.
fn setup(u: &Under<'_>) -> u64 {
    let s = u.srv;
    for (d, base) in [(OWNER, OWNER_BASE), (MAPPER, MAPPER_BASE)] {
        let r = send(
            s,
            MmuRequest::CreateDomain {
                domain: d,
                memory: map_of(base),
            },
        );
        assert!(matches!(r, MmuReply::Done { .. }), "{r:?}");
    }
    send(
        s,
        MmuRequest::CreateVcpu {
            domain: MAPPER,
            vcpu: V,
        },
    );
    send(s, MmuRequest::VcpuScheduled { vcpu: V, pcpu: PC });
    send(
        s,
        MmuRequest::SetPagingMode {
            vcpu: V,
            pcpu: PC,
            mode: PagingMode(PagingMode::WP | PagingMode::NXE),
        },
    );
    root(s)
}

fn root(s: &dyn MmuServer) -> u64 {
    match send(
        s,
        MmuRequest::WriteCr3 {
            vcpu: V,
            pcpu: PC,
            cr3: GuestCr3(0),
        },
    ) {
        MmuReply::LoadShadowRoot { root, .. } => root.0,
        other => panic!("{}: {other:?}", s.name()),
    }
}

/// The shadow leaf's address and value for `gva` under `root`, if present.
fn leaf(mem: &SimMem, root: u64, gva: Gva) -> Option<(Hpa, u64)> {
    let mut table = root & !0xfff;
    for level in (1..=4u8).rev() {
        let at = Hpa(table + 8 * gva.table_index(level) as u64);
        let e = mem.read_u64(at).unwrap();
        if e & P == 0 {
            return None;
        }
        if level == 1 {
            return Some((at, e));
        }
        table = e & 0x000f_ffff_ffff_f000;
    }
    None
}

fn fault(s: &dyn MmuServer, gfn: u64, write: bool) -> MmuReply {
    let mut ec = PfErrorCode::U;
    if write {
        ec |= PfErrorCode::W;
    }
    send(
        s,
        MmuRequest::PageFault {
            vcpu: V,
            pcpu: PC,
            gva: gva(gfn),
            error_code: PfErrorCode(ec),
        },
    )
}

fn map(s: &dyn MmuServer, gfn: u64, owner_gfn: u64, writable: bool) -> MmuReply {
    send(
        s,
        MmuRequest::MapForeign {
            domain: MAPPER,
            gfn: Gfn(gfn),
            owner: OWNER,
            mfn: Mfn(OWNER_BASE + owner_gfn),
            writable,
        },
    )
}

fn unmap(s: &dyn MmuServer, gfn: u64) -> MmuReply {
    send(
        s,
        MmuRequest::UnmapForeign {
            domain: MAPPER,
            gfn: Gfn(gfn),
        },
    )
}

fn accessed(r: &MmuReply) -> bool {
    match r {
        MmuReply::ForeignUnmapped {
            accessed,
            flush: None,
            ..
        } => *accessed,
        other => panic!("expected ForeignUnmapped without a flush, got {other:?}"),
    }
}

#[test]
fn leaves_start_unaccessed_and_the_unmap_reports_a() {
    let mem = memory();
    for u in servers(&mem) {
        let s = u.srv;
        let name = s.name();
        let root = setup(&u);
        assert_eq!(
            map(s, FOREIGN, 5, true),
            MmuReply::Done { flush: None },
            "{name}"
        );
        let r = fault(s, FOREIGN, false);
        assert!(matches!(r, MmuReply::Resume { .. }), "{name}: {r:?}");
        (u.audit)().unwrap();
        let (at, e) = leaf(&mem, root, gva(FOREIGN)).expect("a leaf after the fault");
        assert_eq!(
            (e >> 12) & 0xff_ffff_ffff,
            OWNER_BASE + 5,
            "{name}: maps the owner's frame"
        );
        assert_eq!(e & (A | D), 0, "{name}: created with A and D clear: {e:#x}");
        // Nothing accessed: the unmap says so, with the dirty mask.
        let r = unmap(s, FOREIGN);
        assert!(!accessed(&r), "{name}");
        let MmuReply::ForeignUnmapped { mfn, cpus, .. } = r else {
            unreachable!()
        };
        assert_eq!(mfn, Mfn(OWNER_BASE + 5), "{name}");
        assert!(cpus.contains(PC), "{name}: dirty mask {cpus:?}");
        assert_eq!(mem.read_u64(at).unwrap() & P, 0, "{name}: the leaf is gone");
        (u.audit)().unwrap();
        // Again, and the hardware sets A before caching: reported.
        assert_eq!(
            map(s, FOREIGN, 6, true),
            MmuReply::Done { flush: None },
            "{name}"
        );
        fault(s, FOREIGN, true);
        let (at, e) = leaf(&mem, root, gva(FOREIGN)).expect("a leaf");
        assert_eq!(
            (e >> 12) & 0xff_ffff_ffff,
            OWNER_BASE + 6,
            "{name}: the new frame"
        );
        mem.compare_exchange_u64(at, e, e | A).unwrap().unwrap();
        assert!(accessed(&unmap(s, FOREIGN)), "{name}");
        (u.audit)().unwrap();
        // The gfn is free again (nothing leaked), the frame unreachable.
        let r = fault(s, FOREIGN, false);
        assert!(
            matches!(r, MmuReply::InjectPageFault { .. }),
            "{name}: {r:?}"
        );
        assert_eq!(
            map(s, FOREIGN, 6, false),
            MmuReply::Done { flush: None },
            "{name}"
        );
        assert!(!accessed(&unmap(s, FOREIGN)), "{name}");
    }
}

#[test]
fn an_accessed_leaf_dropped_before_the_unmap_is_still_reported() {
    let mem = memory();
    for u in servers(&mem) {
        let s = u.srv;
        let name = s.name();
        let root = setup(&u);
        map(s, FOREIGN + 1, 7, false);
        fault(s, FOREIGN + 1, false);
        let (at, e) = leaf(&mem, root, gva(FOREIGN + 1)).expect("a leaf");
        mem.compare_exchange_u64(at, e, e | A).unwrap().unwrap();
        // Every shadow of the domain goes (its flush may still be in
        // flight when the unmap comes).
        let z = send(s, MmuRequest::ZapAll { domain: MAPPER });
        assert!(matches!(z, MmuReply::Done { .. }), "{name}: {z:?}");
        (u.audit)().unwrap();
        // The zap's flush is acknowledged and the next faults clean the
        // obsolete shadows (the fast server frees them lazily): the leaf is
        // gone from memory before the unmap looks for it.
        send(s, MmuRequest::VcpuScheduled { vcpu: V, pcpu: PC });
        for g in 8..40 {
            fault(s, g, false);
        }
        (u.audit)().unwrap();
        let r = unmap(s, FOREIGN + 1);
        assert!(
            accessed(&r),
            "{name}: the A bit of the zapped leaf was lost"
        );
        let MmuReply::ForeignUnmapped { cpus, .. } = r else {
            unreachable!()
        };
        assert!(cpus.contains(PC), "{name}: {cpus:?}");
        (u.audit)().unwrap();
    }
}

#[test]
fn read_only_mappings_refuse_writes() {
    let mem = memory();
    for u in servers(&mem) {
        let s = u.srv;
        let name = s.name();
        let root = setup(&u);
        map(s, FOREIGN + 2, 8, false);
        let r = fault(s, FOREIGN + 2, true);
        let MmuReply::InjectPageFault {
            error_code,
            address,
            ..
        } = r
        else {
            panic!("{name}: {r:?}");
        };
        assert_eq!(address, gva(FOREIGN + 2), "{name}");
        assert_eq!(
            error_code.0 & (PfErrorCode::P | PfErrorCode::W),
            PfErrorCode::P | PfErrorCode::W,
            "{name}: a protection fault on write"
        );
        fault(s, FOREIGN + 2, false);
        let (_, e) = leaf(&mem, root, gva(FOREIGN + 2)).expect("a read leaf");
        assert_eq!(e & RW, 0, "{name}: read-only leaf");
        (u.audit)().unwrap();
        unmap(s, FOREIGN + 2);
    }
}

#[test]
fn bad_foreign_requests_get_errors_and_leak_nothing() {
    let mem = memory();
    for u in servers(&mem) {
        let s = u.srv;
        let name = s.name();
        setup(&u);
        let e = |r: MmuReply| match r {
            MmuReply::Error { reason, .. } => reason,
            other => panic!("{name}: expected an error, got {other:?}"),
        };
        // A gfn inside the mapper's memory, or taken twice.
        assert_eq!(e(map(s, 3, 5, true)), MmuError::GfnInUse(Gfn(3)), "{name}");
        map(s, FOREIGN, 5, true);
        assert_eq!(
            e(map(s, FOREIGN, 6, true)),
            MmuError::GfnInUse(Gfn(FOREIGN)),
            "{name}"
        );
        // A frame the owner does not have.
        let r = send(
            s,
            MmuRequest::MapForeign {
                domain: MAPPER,
                gfn: Gfn(FOREIGN + 9),
                owner: OWNER,
                mfn: Mfn(MAPPER_BASE + 1),
                writable: false,
            },
        );
        assert_eq!(
            e(r),
            MmuError::NotOwnedBy {
                mfn: Mfn(MAPPER_BASE + 1),
                owner: OWNER
            },
            "{name}"
        );
        // Unknown domains, gfns not mapped, out of range.
        let r = send(
            s,
            MmuRequest::MapForeign {
                domain: DomainId(99),
                gfn: Gfn(FOREIGN),
                owner: OWNER,
                mfn: Mfn(OWNER_BASE),
                writable: false,
            },
        );
        assert_eq!(e(r), MmuError::UnknownDomain(DomainId(99)), "{name}");
        assert_eq!(
            e(unmap(s, FOREIGN + 50)),
            MmuError::NotForeignMapped(Gfn(FOREIGN + 50)),
            "{name}"
        );
        assert!(
            matches!(e(map(s, u64::MAX, 5, false)), MmuError::GpaNotInMemory(_)),
            "{name}"
        );
        // The owner cannot go while its frame is mapped.
        assert_eq!(
            e(send(s, MmuRequest::DestroyDomain { domain: OWNER })),
            MmuError::FramesMapped {
                mapper: MAPPER,
                gfn: Gfn(FOREIGN)
            },
            "{name}"
        );
        unmap(s, FOREIGN);
        // Capacity: a bound, then all of it back.
        let mut n = 0u64;
        let reason = loop {
            match map(s, 0x1000 + n, n % FRAMES, n.is_multiple_of(2)) {
                MmuReply::Done { .. } => n += 1,
                other => break e(other),
            }
            assert!(n <= 4096, "{name}: no bound on foreign maps");
        };
        assert_eq!(
            reason,
            MmuError::CapacityExceeded {
                what: Resource::ForeignMaps,
                limit: MAX_FOREIGN_PER_DOMAIN
            },
            "{name}"
        );
        assert_eq!(n, u64::from(MAX_FOREIGN_PER_DOMAIN), "{name}");
        for i in 0..n {
            fault(s, 0x1000 + i, false);
            assert!(!accessed(&unmap(s, 0x1000 + i)), "{name}");
        }
        (u.audit)().unwrap();
        assert_eq!(
            map(s, 0x1000, 0, false),
            MmuReply::Done { flush: None },
            "{name}"
        );
        unmap(s, 0x1000);
        // Now both can go; the mapper first with a live mapping of its own.
        map(s, FOREIGN, 5, true);
        send(s, MmuRequest::VcpuDescheduled { vcpu: V, pcpu: PC });
        let r = send(s, MmuRequest::DestroyDomain { domain: MAPPER });
        assert!(matches!(r, MmuReply::Done { .. }), "{name}: {r:?}");
        let r = send(s, MmuRequest::DestroyDomain { domain: OWNER });
        assert!(matches!(r, MmuReply::Done { .. }), "{name}: {r:?}");
    }
}

/// A fault of the mapper's vCPU at guest-physical `gfn` (paging off: the
/// address is its own gpa).
fn identity_fault(s: &dyn MmuServer, gfn: u64, write: bool) -> MmuReply {
    send(
        s,
        MmuRequest::PageFault {
            vcpu: V,
            pcpu: PC,
            gva: Gva(gfn << 12),
            error_code: PfErrorCode(if write { PfErrorCode::W } else { 0 }),
        },
    )
}

#[test]
fn foreign_frames_with_paging_off() {
    let mem = memory();
    for u in servers(&mem) {
        let s = u.srv;
        let name = s.name();
        setup(&u);
        let root = match send(
            s,
            MmuRequest::SetPagingMode {
                vcpu: V,
                pcpu: PC,
                mode: PagingMode(PagingMode::OFF | PagingMode::MMIO),
            },
        ) {
            MmuReply::LoadShadowRoot { root, .. } => root.0,
            other => panic!("{name}: paging off answered {other:?}"),
        };
        assert_eq!(map(s, FOREIGN, 5, false), MmuReply::Done { flush: None });
        assert_eq!(map(s, FOREIGN + 2, 6, true), MmuReply::Done { flush: None });
        // A read of a read-only foreign frame: mapped, A clear, read-only.
        let r = identity_fault(s, FOREIGN, false);
        assert!(matches!(r, MmuReply::Resume { .. }), "{name}: {r:?}");
        (u.audit)().unwrap();
        let (at, e) = leaf(&mem, root, Gva(FOREIGN << 12)).expect("a leaf after the fault");
        assert_eq!((e >> 12) & 0xff_ffff_ffff, OWNER_BASE + 5, "{name}");
        assert_eq!(e & (A | D | RW), 0, "{name}: {e:#x}");
        // Its write has no #PF to give: dropped as to ROM (Mmio).
        match identity_fault(s, FOREIGN, true) {
            MmuReply::Mmio { gpa, write, .. } => {
                assert_eq!((gpa.0, write), (FOREIGN << 12, true), "{name}")
            }
            other => panic!("{name}: a write to a read-only foreign frame answered {other:?}"),
        }
        assert_eq!(mem.read_u64(at).unwrap() & RW, 0, "{name}: still read-only");
        // A writable one is written; a gfn with no frame is MMIO.
        let r = identity_fault(s, FOREIGN + 2, true);
        assert!(matches!(r, MmuReply::Resume { .. }), "{name}: {r:?}");
        let (_, e) = leaf(&mem, root, Gva((FOREIGN + 2) << 12)).expect("a leaf");
        assert_eq!((e >> 12) & 0xff_ffff_ffff, OWNER_BASE + 6, "{name}");
        assert_ne!(e & RW, 0, "{name}: writable as mapped: {e:#x}");
        assert!(
            matches!(identity_fault(s, FOREIGN + 1, false), MmuReply::Mmio { .. }),
            "{name}"
        );
        (u.audit)().unwrap();
        // Unmapped: the leaf goes, and the gfn is no RAM any more.
        assert!(!accessed(&unmap(s, FOREIGN)), "{name}");
        assert_eq!(mem.read_u64(at).unwrap() & P, 0, "{name}: the leaf is gone");
        assert!(
            matches!(identity_fault(s, FOREIGN, false), MmuReply::Mmio { .. }),
            "{name}"
        );
        unmap(s, FOREIGN + 2);
        (u.audit)().unwrap();
    }
}
