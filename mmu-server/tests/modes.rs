//! Paging modes on every registered server through the wire: paging off from
//! creation (identity faults, `Mmio` outside RAM, 4 GiB refused), switches to
//! long mode and back (always `LoadShadowRoot`, with a flush of the
//! requesting pCPU), unsupported bits still refused, and exact shadow-frame
//! accounting: `GetCounters` agrees with the simulator after every cycle and
//! nothing is left once the domain is destroyed.

use abi::*;
use mmu_server::registry;
use mmu_server::sim::GuestTables;
use mmu_server::walk::{PTE_RW, PTE_US};

mod common;
use common::{memory, send};

const D: DomainId = DomainId(1);
const V0: VcpuId = VcpuId(3);
const P0: PcpuId = PcpuId(0);
const P1: PcpuId = PcpuId(1);
const OFF: PagingMode = PagingMode(PagingMode::OFF | PagingMode::MMIO | PagingMode::WP);
const LONG: PagingMode = PagingMode(PagingMode::WP | PagingMode::NXE | PagingMode::MMIO);
const W: u32 = PfErrorCode::W;
const BASE: u64 = 0x40_0000;
/// A guest frame past the memory map (1024 frames).
const NOT_RAM: u64 = 0x50_0000;

/// A page fault of `V0` on `pcpu`, through the wire.
fn fault(s: &dyn MmuServer, pcpu: PcpuId, gva: u64, code: u32) -> MmuReply {
    send(
        s,
        MmuRequest::PageFault {
            vcpu: V0,
            pcpu,
            gva: Gva(gva),
            error_code: PfErrorCode(code),
        },
    )
}

/// Sets the mode and demands `LoadShadowRoot` with a flush of `pcpu`.
fn switch(s: &dyn MmuServer, pcpu: PcpuId, mode: PagingMode) -> Hpa {
    match send(
        s,
        MmuRequest::SetPagingMode {
            vcpu: V0,
            pcpu,
            mode,
        },
    ) {
        MmuReply::LoadShadowRoot {
            vcpu,
            root,
            flush: Some(f),
        } if vcpu == V0
            && f.cpus.contains(pcpu)
            && matches!(f.scope, FlushScope::All | FlushScope::AllReloadRoots) =>
        {
            root
        }
        other => panic!(
            "{}: SetPagingMode {mode:?} answered {other:?}, want LoadShadowRoot with a flush of pCPU {}",
            s.name(),
            pcpu.0
        ),
    }
}

fn counters(s: &dyn MmuServer, domain: Option<DomainId>) -> ServerCounters {
    match send(s, MmuRequest::GetCounters { domain }) {
        MmuReply::Counters { counters, .. } => counters,
        other => panic!("{}: GetCounters answered {other:?}", s.name()),
    }
}

fn expect_resume(s: &dyn MmuServer, r: MmuReply, what: &str) {
    assert!(
        matches!(r, MmuReply::Resume { .. }),
        "{}: {what}: {r:?}",
        s.name()
    );
}

fn cycle(name: &str) {
    let (mem, map) = memory();
    let s = registry::create(name, &mem).unwrap();
    let s: &dyn MmuServer = &*s;
    let mut t = GuestTables::new(&mem, map.clone(), Gfn(0x300));
    let pml4 = t.alloc_table();
    t.map(
        pml4,
        Gva(BASE),
        Gpa(0x5000),
        PageSize::Size4K,
        PTE_RW | PTE_US,
    );
    t.map(
        pml4,
        Gva(BASE + 0x1000),
        Gpa(NOT_RAM),
        PageSize::Size4K,
        PTE_RW | PTE_US,
    );
    let done = |r: MmuReply| assert!(matches!(r, MmuReply::Done { .. }), "{name}: {r:?}");
    done(send(
        s,
        MmuRequest::CreateDomain {
            domain: D,
            memory: map,
        },
    ));
    done(send(
        s,
        MmuRequest::CreateVcpu {
            domain: D,
            vcpu: V0,
        },
    ));
    // Bits no server implements are still refused, OFF or not.
    let smap = PagingMode(PagingMode::OFF | PagingMode::SMAP);
    match send(
        s,
        MmuRequest::SetPagingMode {
            vcpu: V0,
            pcpu: P0,
            mode: smap,
        },
    ) {
        MmuReply::Error {
            reason: MmuError::UnsupportedPagingMode(m),
            ..
        } => assert_eq!(m, smap, "{name}"),
        other => panic!("{name}: SMAP with paging off answered {other:?}"),
    }
    let mut pcpu = P0;
    assert!(matches!(
        send(s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu }),
        MmuReply::LoadShadowRoot { .. }
    ));
    for round in 0..3 {
        switch(s, pcpu, OFF);
        for i in 0..8 {
            expect_resume(
                s,
                fault(s, pcpu, 0x5000 + i * 0x1000, W),
                "RAM with paging off",
            );
        }
        match fault(s, pcpu, NOT_RAM + 0x18, W) {
            MmuReply::Mmio { gpa, write, .. } => {
                assert_eq!((gpa, write), (Gpa(NOT_RAM + 0x18), true), "{name}")
            }
            other => panic!("{name}: a write past RAM with paging off answered {other:?}"),
        }
        match fault(s, pcpu, 1 << 32, 0) {
            MmuReply::Error {
                reason: MmuError::FaultOutsideMode(g),
                ..
            } => assert_eq!(g, Gva(1 << 32), "{name}"),
            other => panic!("{name}: a fault at 4 GiB with paging off answered {other:?}"),
        }
        // CR3 written while paging is off, then paging on.
        assert!(matches!(
            send(
                s,
                MmuRequest::WriteCr3 {
                    vcpu: V0,
                    pcpu,
                    cr3: GuestCr3(pml4.base().0),
                }
            ),
            MmuReply::LoadShadowRoot { .. }
        ));
        switch(s, pcpu, LONG);
        expect_resume(s, fault(s, pcpu, BASE, W), "a mapped page in long mode");
        match fault(s, pcpu, BASE + 0x1010, 0) {
            MmuReply::Mmio { gpa, write, .. } => {
                assert_eq!((gpa, write), (Gpa(NOT_RAM + 0x10), false), "{name}")
            }
            other => panic!("{name}: a read through a leaf past RAM answered {other:?}"),
        }
        // The vCPU moves to the other pCPU between rounds.
        assert!(matches!(
            send(s, MmuRequest::VcpuDescheduled { vcpu: V0, pcpu }),
            MmuReply::Done { .. }
        ));
        pcpu = if pcpu == P0 { P1 } else { P0 };
        assert!(matches!(
            send(s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu }),
            MmuReply::LoadShadowRoot { .. }
        ));
        let total = counters(s, None);
        assert_eq!(
            total.shadow_pages_in_use as usize,
            mem.frames_in_use(),
            "{name} round {round}: the server's frames in use are the simulator's: {total:?}"
        );
        let c = counters(s, Some(D));
        assert_eq!(
            c.shadow_pages_created - c.shadow_pages_freed,
            c.shadow_pages_in_use,
            "{name} round {round}: {c:?}"
        );
    }
    assert!(matches!(
        send(s, MmuRequest::VcpuDescheduled { vcpu: V0, pcpu }),
        MmuReply::Done { .. }
    ));
    done(send(s, MmuRequest::DestroyDomain { domain: D }));
    let total = counters(s, None);
    assert_eq!(
        total.shadow_pages_in_use as usize,
        mem.frames_in_use(),
        "{name}: after destroy: {total:?}"
    );
    // Per-pCPU copies may keep one private frame per pCPU; shadows none.
    assert!(
        mem.frames_in_use() <= 2,
        "{name}: {} frames left after the domain is gone",
        mem.frames_in_use()
    );
}

#[test]
fn every_server_switches_paging_off_and_on_without_leaking() {
    for &name in registry::NAMES {
        cycle(name);
    }
}
