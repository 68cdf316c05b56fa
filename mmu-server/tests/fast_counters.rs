//! `GetCounters` of the fast servers through the wire: exact counts for a
//! scripted sequence (demand faults, an injected fault, an emulated write,
//! a dirty-log round fixed by the lockless fast path, a zap, a destroyed
//! domain), frames in use against the simulator, and agreement with the
//! reference on the fault counts of the same sequence.

use abi::*;
use mmu_server::registry;
use mmu_server::sim::GuestTables;
use mmu_server::walk::*;
use std::cell::Cell;

const D: DomainId = DomainId(1);
const D2: DomainId = DomainId(2);
const V0: VcpuId = VcpuId(10);
const V2: VcpuId = VcpuId(20);
const P0: PcpuId = PcpuId(0);
const P1: PcpuId = PcpuId(1);
const MODE: PagingMode = PagingMode(PagingMode::WP | PagingMode::NXE);
const P: u32 = PfErrorCode::P;
const W: u32 = PfErrorCode::W;
const U: u32 = PfErrorCode::U;
/// Demand faults fixed, then write faults of the dirty-log round.
const N: u64 = 5;
const BASE: u64 = 0x40_0000;

mod common;
use common::{memory, send};

fn get(s: &dyn MmuServer, domain: Option<DomainId>) -> ServerCounters {
    match send(s, MmuRequest::GetCounters { domain }) {
        MmuReply::Counters { counters, flush } => {
            assert_eq!(flush, None);
            counters
        }
        other => panic!("{}: GetCounters({domain:?}) answered {other:?}", s.name()),
    }
}

fn fault(vcpu: VcpuId, pcpu: PcpuId, gva: u64, code: u32) -> MmuRequest {
    MmuRequest::PageFault {
        vcpu,
        pcpu,
        gva: Gva(gva),
        error_code: PfErrorCode(code),
    }
}

/// What one run of the script saw and ended with.
struct Run {
    /// Domain D's counters just before the zap, and the flushes (count,
    /// CPUs) of replies about D the script saw up to then.
    before_zap: (ServerCounters, (u64, u64)),
    /// Domain D's counters at the end, with the flush tally about D.
    d: (ServerCounters, (u64, u64)),
    /// D2's counters just before its destruction.
    d2: ServerCounters,
    /// The whole server before D2's destruction and at the end.
    total_before: ServerCounters,
    total: ServerCounters,
    /// Frames in use in the simulator at the end.
    frames_in_use: usize,
}

/// The script, on the registered server `name`.
fn run(name: &str) -> Run {
    let (mem, map) = memory();
    let s = registry::create(name, &mem).unwrap();
    let s: &dyn MmuServer = &*s;
    let mut t = GuestTables::new(&mem, map.clone(), Gfn(0x300));
    let pml4 = t.alloc_table();
    for i in 0..N {
        t.map(
            pml4,
            Gva(BASE + i * 0x1000),
            Gpa(0x5000 + i * 0x1000),
            PageSize::Size4K,
            PTE_RW | PTE_US,
        );
    }
    // Replies about D: their flushes are tallied.
    let tally = Cell::new((0u64, 0u64));
    let sent = |req: MmuRequest| {
        let r = send(s, req);
        if let Some(f) = r.flush() {
            let (n, c) = tally.get();
            tally.set((n + 1, c + u64::from(f.cpus.0.count_ones())));
        }
        r
    };
    let ok = |r: MmuReply| assert!(!matches!(r, MmuReply::Error { .. }), "{name}: {r:?}");
    let start = |v: VcpuId, p: PcpuId, sent: &dyn Fn(MmuRequest) -> MmuReply| {
        ok(sent(MmuRequest::VcpuScheduled { vcpu: v, pcpu: p }));
        ok(sent(MmuRequest::SetPagingMode {
            vcpu: v,
            pcpu: p,
            mode: MODE,
        }));
        ok(sent(MmuRequest::WriteCr3 {
            vcpu: v,
            pcpu: p,
            cr3: GuestCr3(pml4.base().0),
        }));
    };
    ok(send(
        s,
        MmuRequest::CreateDomain {
            domain: D,
            memory: map.clone(),
        },
    ));
    ok(sent(MmuRequest::CreateVcpu {
        domain: D,
        vcpu: V0,
    }));
    start(V0, P0, &sent);
    // N demand write faults: fixed (Resume), the leaves writable and dirty.
    for i in 0..N {
        let r = sent(fault(V0, P0, BASE + i * 0x1000, W | U));
        assert!(matches!(r, MmuReply::Resume { .. }), "{name}: {r:?}");
    }
    // One injected fault (nothing mapped there).
    let r = sent(fault(V0, P0, 0x80_0000, U));
    assert!(
        matches!(r, MmuReply::InjectPageFault { .. }),
        "{name}: {r:?}"
    );
    // A fault of an unknown vCPU and one from an invalid pCPU: the first
    // counts nowhere, the second is a page fault of V0 (not fixed).
    let r = send(s, fault(VcpuId(99), P0, BASE, U));
    assert_eq!(r, MmuReply::error(MmuError::UnknownVcpu(VcpuId(99))));
    let r = sent(fault(V0, PcpuId(64), BASE, U));
    assert_eq!(r, MmuReply::error(MmuError::InvalidPcpu(PcpuId(64))));
    // One emulated write to a frame that is no page table.
    let r = sent(MmuRequest::EmulatedWrite {
        vcpu: V0,
        pcpu: P0,
        gpa: Gpa(0x9000),
        value: 7,
        size: 8,
    });
    assert!(matches!(r, MmuReply::WriteDone { .. }), "{name}: {r:?}");
    // A dirty-log round: the N pages are write-protected; their next
    // writes fault (present, write) and are fixed.
    ok(sent(MmuRequest::EnableDirtyLog { domain: D }));
    for i in 0..N {
        let r = sent(fault(V0, P0, BASE + i * 0x1000, P | W | U));
        assert!(matches!(r, MmuReply::Resume { .. }), "{name}: {r:?}");
    }
    let r = sent(MmuRequest::GetAndClearDirty {
        domain: D,
        start: Gfn(0),
    });
    let MmuReply::DirtyBitmap { chunk, .. } = r else {
        panic!("{name}: {r:?}")
    };
    for i in 0..N {
        assert!(
            chunk.is_dirty(Gfn(5 + i)),
            "{name}: gfn {} not logged",
            5 + i
        );
    }
    let before_zap = (get(s, Some(D)), tally.get());
    // A zap, then V0 back on P0 and one more demand fault.
    ok(sent(MmuRequest::ZapAll { domain: D }));
    ok(sent(MmuRequest::VcpuDescheduled { vcpu: V0, pcpu: P0 }));
    ok(sent(MmuRequest::VcpuScheduled { vcpu: V0, pcpu: P0 }));
    let r = sent(fault(V0, P0, BASE, U));
    assert!(matches!(r, MmuReply::Resume { .. }), "{name}: {r:?}");
    let d = (get(s, Some(D)), tally.get());

    // A second domain, on the same guest tables, then destroyed: its counts
    // stay in the whole server's.
    ok(send(
        s,
        MmuRequest::CreateDomain {
            domain: D2,
            memory: map.clone(),
        },
    ));
    ok(send(
        s,
        MmuRequest::CreateVcpu {
            domain: D2,
            vcpu: V2,
        },
    ));
    let quiet = |req: MmuRequest| send(s, req);
    start(V2, P1, &quiet);
    for i in 0..2 {
        let r = send(s, fault(V2, P1, BASE + i * 0x1000, U));
        assert!(matches!(r, MmuReply::Resume { .. }), "{name}: {r:?}");
    }
    ok(send(s, MmuRequest::VcpuDescheduled { vcpu: V2, pcpu: P1 }));
    let d2 = get(s, Some(D2));
    let total_before = get(s, None);
    ok(send(s, MmuRequest::DestroyDomain { domain: D2 }));
    assert_eq!(
        send(s, MmuRequest::GetCounters { domain: Some(D2) }),
        MmuReply::error(MmuError::UnknownDomain(D2)),
        "{name}"
    );
    Run {
        before_zap,
        d,
        d2,
        total_before,
        total: get(s, None),
        frames_in_use: mem.frames_in_use(),
    }
}

#[test]
fn fast_servers_count_exactly_through_the_wire() {
    for name in [registry::FAST_SHARED, registry::FAST_PERCPU] {
        let r = run(name);
        let (c, (obligations, cpus)) = r.before_zap;
        // 5 demand + 1 injected + 1 invalid pCPU + 5 dirty-log faults.
        assert_eq!(
            (c.page_faults, c.faults_fixed, c.faults_injected),
            (2 * N + 2, 2 * N, 1),
            "{name}: {c:?}"
        );
        assert_eq!(
            c.fast_path_fixes, N,
            "{name}: every dirty-log write fault is fixed by the fast path: {c:?}"
        );
        // Three roots (cached by guest frame and role: CR3 0 in mode 0,
        // CR3 0 in MODE, the PML4 in MODE), then L3, L2, L1 for BASE.
        assert_eq!(
            (
                c.shadow_pages_created,
                c.shadow_pages_freed,
                c.shadow_pages_in_use
            ),
            (6, 0, 6),
            "{name}: {c:?}"
        );
        assert_eq!(c.shadow_pages_peak, 6, "{name}: nothing freed yet: {c:?}");
        assert_eq!(
            (
                c.emulated_writes,
                c.emulate_write_replies,
                c.zaps,
                c.reclaims
            ),
            (1, 0, 0, 0),
            "{name}: {c:?}"
        );
        assert_eq!(
            (c.flush_obligations, c.flush_cpus),
            (obligations, cpus),
            "{name}: the flushes the script saw"
        );
        assert!(obligations > 0, "{name}: CR3 writes flush");
        // By design: no out-of-sync shadows, no write flooding here.
        assert_eq!((c.unsyncs, c.resyncs, c.unshadowed), (0, 0, 0), "{name}");

        let (c, (obligations, cpus)) = r.d;
        assert_eq!(
            (
                c.page_faults,
                c.faults_fixed,
                c.faults_injected,
                c.fast_path_fixes,
                c.zaps
            ),
            (2 * N + 3, 2 * N + 1, 1, N, 1),
            "{name}: {c:?}"
        );
        assert_eq!(
            (c.flush_obligations, c.flush_cpus),
            (obligations, cpus),
            "{name}: the flushes the script saw"
        );
        // A new root, L3, L2, L1 after the zap; the zapped ones are freed
        // (acknowledged by P0's later requests) or still pending.
        assert_eq!(c.shadow_pages_created, 10, "{name}: {c:?}");
        // The 6 held before the zap, plus at most the 4 new ones if the
        // zapped pages were still pending when those were taken.
        assert!(
            (6..=10).contains(&c.shadow_pages_peak) && c.shadow_pages_peak >= c.shadow_pages_in_use,
            "{name}: {c:?}"
        );
        assert_eq!(
            c.shadow_pages_in_use,
            c.shadow_pages_created - c.shadow_pages_freed,
            "{name}"
        );

        assert_eq!(
            (r.d2.page_faults, r.d2.faults_fixed, r.d2.fast_path_fixes),
            (2, 2, 0),
            "{name}: {:?}",
            r.d2
        );
        assert!(r.d2.shadow_pages_in_use >= 4, "{name}: {:?}", r.d2);
        // The whole server before the destruction: D + D2 (+ the per-pCPU
        // copies of fast-percpu, which belong to no domain).
        let t = r.total_before;
        assert_eq!(t.page_faults, c.page_faults + r.d2.page_faults, "{name}");
        assert_eq!(t.faults_fixed, c.faults_fixed + r.d2.faults_fixed, "{name}");
        // The server held D's and D2's frames at once: its peak is at least
        // each domain's and the level then.
        assert!(
            t.shadow_pages_peak >= c.shadow_pages_peak.max(r.d2.shadow_pages_peak)
                && t.shadow_pages_peak >= t.shadow_pages_in_use
                && t.shadow_pages_peak >= c.shadow_pages_in_use + r.d2.shadow_pages_in_use,
            "{name}: {t:?}"
        );
        // After: D2's counts are kept; its frames are freed.
        let t = r.total;
        assert_eq!(
            (t.page_faults, t.faults_fixed, t.faults_injected, t.zaps),
            (
                c.page_faults + r.d2.page_faults,
                c.faults_fixed + r.d2.faults_fixed,
                1,
                1
            ),
            "{name}: {t:?}"
        );
        assert_eq!(
            t.shadow_pages_created, r.total_before.shadow_pages_created,
            "{name}"
        );
        assert_eq!(
            t.shadow_pages_freed,
            r.total_before.shadow_pages_freed + r.d2.shadow_pages_in_use,
            "{name}: every frame of D2 is freed and counted"
        );
        assert!(
            t.flush_obligations >= c.flush_obligations + r.d2.flush_obligations,
            "{name}"
        );
        assert_eq!(
            t.shadow_pages_in_use as usize, r.frames_in_use,
            "{name}: the server's frames in use are the simulator's: {t:?}"
        );
        assert_eq!(
            t.shadow_pages_peak, r.total_before.shadow_pages_peak,
            "{name}: destroying D2 freed frames; the server's peak stays"
        );
    }
}

#[test]
fn fast_and_reference_agree_on_fault_counts() {
    let reference = run(mmu_server::reference::NAME);
    for name in [registry::FAST_SHARED, registry::FAST_PERCPU] {
        let fast = run(name);
        for (what, f, r) in [
            ("D before zap", fast.before_zap.0, reference.before_zap.0),
            ("D", fast.d.0, reference.d.0),
            ("D2", fast.d2, reference.d2),
            ("total", fast.total, reference.total),
        ] {
            assert_eq!(
                (f.page_faults, f.faults_fixed, f.faults_injected),
                (r.page_faults, r.faults_fixed, r.faults_injected),
                "{name} vs reference, {what}"
            );
        }
        // Peaks are not compared: the servers legitimately hold different
        // frames (the reference one root per vCPU, the fast ones roots
        // cached per CR3 and mode, per-pCPU copies, lazy frees); each is
        // checked against its own frames in use.
        for (c, what) in [(&fast.total, name), (&reference.total, "reference")] {
            assert!(
                c.shadow_pages_peak >= c.shadow_pages_in_use,
                "{what}: {c:?}"
            );
        }
        assert_eq!(reference.d.0.fast_path_fixes, 0);
        assert_eq!(fast.d.0.fast_path_fixes, N, "{name}");
        assert_eq!(
            reference.total.shadow_pages_in_use as usize,
            reference.frames_in_use
        );
    }
}
