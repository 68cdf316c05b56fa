//! The real server under real threads: vCPU threads write their pages
//! through the lockless fast page fault while the main thread runs dirty-log
//! sweeps. No write may be lost: a page whose write completed after sweep
//! `f` had completed (its flush included) and while sweep `s` was the last
//! one started is in the bitmap of one of the sweeps `f + 1 ..= s + 1`.
//!
//! The hardware model: a vCPU thread's walk and the write through it form
//! one "guest" section (an `RwLock` read guard); a sweep carries out its
//! flush obligation by taking the write guard once (every pCPU has left the
//! guest and dropped what it had cached, as the flush IPI's acknowledgement
//! guarantees). Faults are sent outside the section, as exits are.

use abi::mmu::{MemRegion, MemoryMap};
use abi::{
    DomainId, Gfn, GuestCr3, Gva, Hpa, Mfn, MmuReply, MmuServer, PcpuId, PfErrorCode, PhysMem,
    VcpuId,
};
use mmu_server::fast::policy::{PerPcpuCopies, SharedRoots};
use mmu_server::fast::{DirtyMode, FastServer};
use mmu_server::sim::SimMem;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const BASE: u64 = 16;
const PAGES: u64 = 64;
const THREADS: u32 = 4;
const USER: u64 = 0x4000_0000;
const DOM: DomainId = DomainId(1);

fn walk(mem: &SimMem, root: u64, va: u64) -> Result<Hpa, u32> {
    let mut t = root & 0x000f_ffff_ffff_f000;
    for level in (1..=4u32).rev() {
        let at = Hpa(t + ((va >> (12 + 9 * (level - 1))) & 511) * 8);
        let e = mem.read_u64(at).unwrap();
        if e & 1 == 0 {
            return Err(2 | 4);
        }
        if level == 1 {
            if e & 2 == 0 {
                return Err(1 | 2 | 4);
            }
            // The MMU sets A and D on a write.
            let _ = mem.compare_exchange_u64(at, e, e | 0x60);
            return Ok(Hpa((e & 0x000f_ffff_ffff_f000) + (va & 0xfff)));
        }
        t = e & 0x000f_ffff_ffff_f000;
    }
    unreachable!()
}

fn stress(srv: &dyn MmuServer, mem: &SimMem) {
    let guest = THREADS as u64 * PAGES + 64;
    let mut map = MemoryMap::new();
    map.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(BASE),
        pages: guest,
    })
    .unwrap();
    assert!(matches!(
        srv.create_domain(DOM, &map),
        MmuReply::Done { .. }
    ));
    // Guest tables: one PML4/PDPT/PD, one PT per 512 pages.
    let g = |gfn: u64| Hpa((BASE + gfn) << 12);
    let (pml4, pdpt, pd, pt) = (0u64, 1u64, 2u64, 3u64);
    mem.write_u64(g(pml4), (pdpt << 12) | 7).unwrap();
    mem.write_u64(Hpa(g(pdpt).0 + 8), (pd << 12) | 7).unwrap();
    mem.write_u64(g(pd), (pt << 12) | 7).unwrap();
    for i in 0..THREADS as u64 * PAGES {
        // Guest D already set: the first write after a sweep is a fast fault.
        mem.write_u64(Hpa(g(pt).0 + 8 * i), ((16 + i) << 12) | 0x67)
            .unwrap();
    }
    let roots: Vec<AtomicU64> = (0..THREADS).map(|_| AtomicU64::new(0)).collect();
    for v in 0..THREADS {
        assert!(matches!(
            srv.create_vcpu(DOM, VcpuId(v)),
            MmuReply::Done { .. }
        ));
        srv.vcpu_scheduled(VcpuId(v), PcpuId(v));
        match srv.write_cr3(VcpuId(v), PcpuId(v), GuestCr3(0)) {
            MmuReply::LoadShadowRoot { root, .. } => {
                roots[v as usize].store(root.0, Ordering::SeqCst)
            }
            r => panic!("{r:?}"),
        }
    }
    assert!(matches!(srv.enable_dirty_log(DOM), MmuReply::Done { .. }));
    let started = AtomicU64::new(0);
    let finished = AtomicU64::new(0);
    let tlb = std::sync::RwLock::new(());
    let progress = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut sweeps: Vec<BTreeSet<u64>> = vec![BTreeSet::new()];
    let writes: Vec<(u64, u64, u64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|v| {
                let (started, finished, stop) = (&started, &finished, &stop);
                let (roots, tlb, progress) = (&roots, &tlb, &progress);
                s.spawn(move || {
                    let mut log = Vec::new();
                    let mut i = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let page = v as u64 * PAGES + i % PAGES;
                        let va = USER + (page << 12);
                        loop {
                            let ec = {
                                let _in_guest = tlb.read().unwrap();
                                let root = roots[v as usize].load(Ordering::SeqCst);
                                match walk(mem, root, va) {
                                    Ok(hpa) => {
                                        mem.write_u64(hpa, i).unwrap();
                                        let f = finished.load(Ordering::SeqCst);
                                        let s = started.load(Ordering::SeqCst);
                                        log.push((16 + page, f, s));
                                        progress.fetch_add(1, Ordering::SeqCst);
                                        break;
                                    }
                                    Err(ec) => ec,
                                }
                            };
                            // The exit, outside the guest section.
                            let ec = PfErrorCode(ec);
                            match srv.page_fault(VcpuId(v), PcpuId(v), Gva(va), ec) {
                                MmuReply::Resume { .. } => {}
                                MmuReply::LoadShadowRoot { root, .. } => {
                                    roots[v as usize].store(root.0, Ordering::SeqCst)
                                }
                                r => panic!("fault at {va:#x}: {r:?}"),
                            }
                        }
                        i += 1;
                    }
                    log
                })
            })
            .collect();
        for _ in 0..100 {
            // Let the vCPUs write a while between sweeps.
            let p0 = progress.load(Ordering::SeqCst);
            while progress.load(Ordering::SeqCst) < p0 + 2 * THREADS as u64 {
                std::thread::yield_now();
            }
            started.fetch_add(1, Ordering::SeqCst);
            sweeps.push(sweep(srv));
            // The sweep's flush: wait until every vCPU left the guest.
            drop(tlb.write().unwrap());
            finished.fetch_add(1, Ordering::SeqCst);
        }
        stop.store(true, Ordering::SeqCst);
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    started.fetch_add(1, Ordering::SeqCst);
    sweeps.push(sweep(srv));
    sweeps.push(BTreeSet::new());
    assert!(
        writes.len() > 1000,
        "the threads ran ({} writes)",
        writes.len()
    );
    for (gfn, f, s) in writes {
        let (f, s) = (f as usize, s as usize);
        assert!(
            (f + 1..=s + 1).any(|k| sweeps[k].contains(&gfn)),
            "gfn {gfn:#x} written after sweep {f} completed (sweep {s} started) is in none of sweeps {}..={}",
            f + 1,
            s + 1
        );
    }
}

fn sweep(srv: &dyn MmuServer) -> BTreeSet<u64> {
    match srv.get_and_clear_dirty(DOM, Gfn(0)) {
        MmuReply::DirtyBitmap { chunk, .. } => chunk.dirty().map(|g| g.0).collect(),
        r => panic!("{r:?}"),
    }
}

fn mem() -> SimMem {
    let guest = THREADS as u64 * PAGES + 64;
    SimMem::new(BASE + guest + 64, BASE + guest..BASE + guest + 64)
}

#[test]
fn no_write_is_lost_under_concurrent_fast_faults_shared() {
    let m = mem();
    stress(
        &FastServer::<SharedRoots>::new("fast-shared", &m, mmu_server::Config::default()),
        &m,
    );
}

#[test]
fn no_write_is_lost_under_concurrent_fast_faults_percpu() {
    let m = mem();
    stress(
        &FastServer::<PerPcpuCopies>::new("fast-percpu", &m, mmu_server::Config::default()),
        &m,
    );
}

#[test]
fn no_write_is_lost_with_dirty_bits() {
    let m = mem();
    let s = FastServer::<SharedRoots>::with_dirty_mode(
        "fast-dbits",
        &m,
        mmu_server::Config::default(),
        DirtyMode::DirtyBits,
    );
    stress(&s, &m);
}
