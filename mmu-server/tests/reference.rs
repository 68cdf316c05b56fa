//! The reference server through the wire (`dispatch`) and directly, over
//! simulated memory.

use abi::mmu::{MemoryMap, Resource};
use abi::*;
use mmu_server::reference::Reference;
use mmu_server::sim::{GuestTables, SimMem};
use mmu_server::walk::*;
use mmu_server::{registry, shadow, Config};

const D: DomainId = DomainId(1);
const V0: VcpuId = VcpuId(10);
const V1: VcpuId = VcpuId(11);
const P0: PcpuId = PcpuId(0);
const P1: PcpuId = PcpuId(1);
const MODE: PagingMode = PagingMode(PagingMode::WP | PagingMode::NXE);
const W: u32 = PfErrorCode::W;
const U: u32 = PfErrorCode::U;

mod common;
use common::{memory, send};

struct World<'a> {
    mem: &'a SimMem,
    s: Reference<'a, SimMem>,
    t: GuestTables<'a>,
    pml4: Gfn,
}

fn world<'a>(mem: &'a SimMem, map: &MemoryMap) -> World<'a> {
    world_with(mem, map, Config::default())
}

fn world_with<'a>(mem: &'a SimMem, map: &MemoryMap, config: Config) -> World<'a> {
    let s = Reference::new(mem, config);
    let mut t = GuestTables::new(mem, map.clone(), Gfn(0x300));
    let pml4 = t.alloc_table();
    let w = World { mem, s, t, pml4 };
    assert_eq!(
        send(
            &w.s,
            MmuRequest::Hello {
                version: PROTOCOL_VERSION
            }
        ),
        MmuReply::Welcome {
            version: PROTOCOL_VERSION
        }
    );
    assert_eq!(
        send(
            &w.s,
            MmuRequest::CreateDomain {
                domain: D,
                memory: map.clone()
            }
        ),
        MmuReply::Done { flush: None }
    );
    for v in [V0, V1] {
        assert_eq!(
            send(&w.s, MmuRequest::CreateVcpu { domain: D, vcpu: v }),
            MmuReply::Done { flush: None }
        );
    }
    w
}

impl World<'_> {
    /// Schedules `v` on `p` and points it at the world's PML4.
    fn start(&self, v: VcpuId, p: PcpuId) -> Hpa {
        let MmuReply::LoadShadowRoot { root, vcpu, .. } =
            send(&self.s, MmuRequest::VcpuScheduled { vcpu: v, pcpu: p })
        else {
            panic!("VcpuScheduled must load a root")
        };
        assert_eq!(vcpu, v);
        send(
            &self.s,
            MmuRequest::SetPagingMode {
                vcpu: v,
                pcpu: p,
                mode: MODE,
            },
        );
        let r = send(
            &self.s,
            MmuRequest::WriteCr3 {
                vcpu: v,
                pcpu: p,
                cr3: GuestCr3(self.pml4.base().0),
            },
        );
        let MmuReply::LoadShadowRoot { root: r2, .. } = r else {
            panic!("WriteCr3 must load a root: {r:?}")
        };
        assert_eq!(root, r2);
        root
    }

    fn fault(&self, v: VcpuId, p: PcpuId, gva: u64, code: u32) -> MmuReply {
        send(
            &self.s,
            MmuRequest::PageFault {
                vcpu: v,
                pcpu: p,
                gva: Gva(gva),
                error_code: PfErrorCode(code),
            },
        )
    }

    fn leaf(&self, v: VcpuId, gva: u64) -> Option<u64> {
        shadow::lookup(self.mem, self.s.shadow_root(v).unwrap(), Gva(gva)).unwrap()
    }

    fn map4k(&mut self, gva: u64, gpa: u64, flags: u64) -> Gpa {
        self.t
            .map(self.pml4, Gva(gva), Gpa(gpa), PageSize::Size4K, flags)
    }
}

fn resume() -> MmuReply {
    MmuReply::Resume { flush: None }
}

fn flush(cpus: &[PcpuId], scope: FlushScope) -> Option<FlushObligation> {
    Some(FlushObligation {
        cpus: cpus.iter().copied().collect(),
        scope,
    })
}

#[test]
fn registry_lists_and_creates_reference() {
    assert!(registry::NAMES.contains(&"reference"));
    let (mem, _) = memory();
    for name in registry::NAMES {
        let s = registry::create(name, &mem).unwrap();
        assert_eq!(s.name(), *name);
    }
    let err = registry::create("nope", &mem).err().unwrap();
    assert_eq!(err, registry::UnknownImpl("nope"));
    assert!(err.to_string().contains("nope") && err.to_string().contains("reference"));
}

#[test]
fn demand_fault_maps_the_guest_frame_read_only_until_dirty() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    let leaf_gpa = w.map4k(0x40_0000, 0x5000, PTE_RW | PTE_US);
    w.start(V0, P0);
    assert_eq!(w.fault(V0, P0, 0x40_0010, U), resume());
    let e = w.leaf(V0, 0x40_0000).unwrap();
    assert_eq!(e & PTE_ADDR_MASK, (1024 + 5) << 12);
    assert_eq!(
        e & (PTE_P | PTE_US | PTE_RW),
        PTE_P | PTE_US,
        "read-only until D"
    );
    assert_eq!(w.t.read(leaf_gpa) & (PTE_A | PTE_D), PTE_A);
    // The write: the guest's D gets set and the shadow becomes writable; the
    // old read-only entry may be cached on P0, so P0 flushes the page.
    assert_eq!(
        w.fault(V0, P0, 0x40_0010, W | U | PfErrorCode::P),
        MmuReply::Resume {
            flush: flush(&[P0], FlushScope::Page(Gva(0x40_0010)))
        }
    );
    assert_ne!(w.leaf(V0, 0x40_0000).unwrap() & PTE_RW, 0);
    assert_eq!(w.t.read(leaf_gpa) & (PTE_A | PTE_D), PTE_A | PTE_D);
    // Other vCPUs' trees are untouched.
    assert_eq!(w.leaf(V1, 0x40_0000), None);
}

#[test]
fn permissions_are_never_wider_than_the_guest() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.map4k(0x1000, 0x5000, PTE_D); // supervisor, read-only, dirty
    w.map4k(0x2000, 0x6000, PTE_US | PTE_NX | PTE_RW | PTE_D); // user, no-exec
    w.start(V0, P0);
    assert_eq!(w.fault(V0, P0, 0x1000, 0), resume());
    let e = w.leaf(V0, 0x1000).unwrap();
    assert_eq!(e & (PTE_RW | PTE_US | PTE_NX), 0);
    assert_eq!(w.fault(V0, P0, 0x2000, U), resume());
    let e = w.leaf(V0, 0x2000).unwrap();
    assert_eq!(e & (PTE_RW | PTE_US | PTE_NX), PTE_RW | PTE_US | PTE_NX);
    // User access to the supervisor page and a write to the RO page fault.
    assert_eq!(
        w.fault(V0, P0, 0x1000, U | PfErrorCode::P),
        MmuReply::InjectPageFault {
            error_code: PfErrorCode(PfErrorCode::P | U),
            address: Gva(0x1000),
            flush: None
        }
    );
    assert!(matches!(
        w.fault(V0, P0, 0x1000, W | PfErrorCode::P),
        MmuReply::InjectPageFault { error_code, .. } if error_code == PfErrorCode(PfErrorCode::P | W)
    ));
    assert!(matches!(
        w.fault(V0, P0, 0x2000, U | PfErrorCode::I),
        MmuReply::InjectPageFault { error_code, .. }
            if error_code == PfErrorCode(PfErrorCode::P | U | PfErrorCode::I)
    ));
}

#[test]
fn wp0_supervisor_write_gets_a_supervisor_only_writable_leaf() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.map4k(0x1000, 0x5000, PTE_US); // user read-only
    w.start(V0, P0);
    send(
        &w.s,
        MmuRequest::SetPagingMode {
            vcpu: V0,
            pcpu: P0,
            mode: PagingMode(PagingMode::NXE),
        },
    );
    assert_eq!(w.fault(V0, P0, 0x1000, W), resume());
    let e = w.leaf(V0, 0x1000).unwrap();
    assert_eq!(
        e & (PTE_RW | PTE_US),
        PTE_RW,
        "writable for the supervisor only"
    );
    // V0 moves to P1; a user read there re-checks and gets the user
    // read-only leaf back. The supervisor-writable leaf may still be cached
    // on P0, so the page is flushed on both.
    send(&w.s, MmuRequest::VcpuDescheduled { vcpu: V0, pcpu: P0 });
    send(&w.s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu: P1 });
    assert_eq!(
        w.fault(V0, P1, 0x1000, U | PfErrorCode::P),
        MmuReply::Resume {
            flush: flush(&[P0, P1], FlushScope::Page(Gva(0x1000)))
        }
    );
    assert_eq!(w.leaf(V0, 0x1000).unwrap() & (PTE_RW | PTE_US), PTE_US);
}

#[test]
fn large_guest_pages_are_shadowed_by_4k_leaves() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.t.map(
        w.pml4,
        Gva(0x4000_0000),
        Gpa(0x20_0000),
        PageSize::Size2M,
        PTE_RW,
    );
    w.t.map(
        w.pml4,
        Gva(0x80_0000_0000),
        Gpa(0),
        PageSize::Size1G,
        PTE_RW,
    );
    w.start(V0, P0);
    assert_eq!(w.fault(V0, P0, 0x4001_2345, W), resume());
    let e = w.leaf(V0, 0x4001_2000).unwrap();
    assert_eq!(e & PTE_ADDR_MASK, (1024 + 0x212) << 12);
    assert_eq!(
        w.leaf(V0, 0x4001_3000),
        None,
        "only the faulting 4 KiB frame"
    );
    assert_eq!(w.fault(V0, P0, 0x80_0030_0000, 0), resume());
    assert_eq!(
        w.leaf(V0, 0x80_0030_0000).unwrap() & PTE_ADDR_MASK,
        (1024 + 0x300) << 12
    );
    // The 1 GiB page reaches beyond guest memory: no mapping there, a fault.
    assert!(matches!(
        w.fault(V0, P0, 0x80_2000_0000, 0),
        MmuReply::InjectPageFault { error_code, .. }
            if error_code == PfErrorCode(PfErrorCode::P | PfErrorCode::RSVD)
    ));
    assert_eq!(w.leaf(V0, 0x80_2000_0000), None);
}

#[test]
fn ptes_outside_guest_memory_never_map() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    // Leaf to gfn 2000 (host frame 3024... but not in the map).
    w.map4k(0x1000, 2000 << 12, PTE_RW);
    // A PDE naming a table outside the guest.
    w.map4k(0x40_0000, 0x5000, PTE_RW);
    let pde = w.t.entry(w.pml4, Gva(0x40_0000), 2).unwrap();
    w.t.write(pde, (1500 << 12) | PTE_P | PTE_RW);
    w.start(V0, P0);
    for gva in [0x1000, 0x40_0000] {
        assert_eq!(
            w.fault(V0, P0, gva, W),
            MmuReply::InjectPageFault {
                error_code: PfErrorCode(PfErrorCode::P | PfErrorCode::RSVD | W),
                address: Gva(gva),
                flush: None
            }
        );
        assert_eq!(w.leaf(V0, gva), None);
    }
}

#[test]
fn cr3_write_and_invlpg_empty_the_tree_and_free_frames() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.map4k(0x1000, 0x5000, PTE_RW | PTE_D);
    w.map4k(5 << 39, 0x6000, PTE_RW | PTE_D);
    w.start(V0, P0);
    let roots = mem.frames_in_use();
    assert_eq!(roots, 2, "one root per vCPU");
    w.fault(V0, P0, 0x1000, 0);
    w.fault(V0, P0, 5 << 39, 0);
    assert_eq!(mem.frames_in_use(), 2 + 3 + 3);
    let r = send(
        &w.s,
        MmuRequest::Invlpg {
            vcpu: V0,
            pcpu: P0,
            gva: Gva(0x1000),
        },
    );
    assert_eq!(
        r,
        MmuReply::Done {
            flush: flush(&[P0], FlushScope::All)
        }
    );
    assert_eq!(mem.frames_in_use(), 2);
    assert_eq!(w.leaf(V0, 0x1000), None);
    w.fault(V0, P0, 0x1000, 0);
    let r = send(
        &w.s,
        MmuRequest::WriteCr3 {
            vcpu: V0,
            pcpu: P0,
            cr3: GuestCr3(w.pml4.base().0),
        },
    );
    assert!(
        matches!(r, MmuReply::LoadShadowRoot { flush: f, .. } if f == flush(&[P0], FlushScope::All))
    );
    assert_eq!(mem.frames_in_use(), 2);
}

#[test]
fn flushes_follow_the_vcpu_across_pcpus() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.map4k(0x1000, 0x5000, PTE_RW | PTE_D);
    w.start(V0, P0);
    w.fault(V0, P0, 0x1000, 0);
    send(&w.s, MmuRequest::VcpuDescheduled { vcpu: V0, pcpu: P0 });
    // V0 moves to P1: P0 may still cache its entries.
    let r = send(&w.s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu: P1 });
    assert!(matches!(r, MmuReply::LoadShadowRoot { flush: None, .. }));
    w.fault(V0, P1, 0x1000, 0);
    let r = send(
        &w.s,
        MmuRequest::Invlpg {
            vcpu: V0,
            pcpu: P1,
            gva: Gva(0x1000),
        },
    );
    assert_eq!(
        r,
        MmuReply::Done {
            flush: flush(&[P0, P1], FlushScope::All)
        }
    );
    // Back on P0: it must flush before V0 runs there, even if the obligation
    // above has not reached it yet (the tree's frames were reused).
    send(&w.s, MmuRequest::VcpuDescheduled { vcpu: V0, pcpu: P1 });
    let r = send(&w.s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu: P0 });
    assert!(
        matches!(r, MmuReply::LoadShadowRoot { flush: f, .. } if f == flush(&[P0], FlushScope::All))
    );
    // ...only once.
    let r = send(&w.s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu: P0 });
    assert!(matches!(r, MmuReply::LoadShadowRoot { flush: None, .. }));
    // Zap-all flushes where V0 may have cached entries since its last
    // flush (P1 conservatively: it ran there after the INVLPG); V1 never
    // ran anywhere.
    let r = send(&w.s, MmuRequest::ZapAll { domain: D });
    assert_eq!(
        r,
        MmuReply::Done {
            flush: flush(&[P0, P1], FlushScope::All)
        }
    );
}

#[test]
fn zap_all_defers_frames_of_running_vcpus() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.map4k(0x1000, 0x5000, PTE_RW | PTE_D);
    w.start(V0, P0);
    w.start(V1, P1);
    w.fault(V0, P0, 0x1000, 0);
    w.fault(V1, P1, 0x1000, 0);
    assert_eq!(mem.frames_in_use(), 2 + 6);
    // Zap-all from elsewhere while both run: unhooked now, freed when each is out
    // of the guest.
    let r = send(&w.s, MmuRequest::ZapAll { domain: D });
    assert_eq!(
        r,
        MmuReply::Done {
            flush: flush(&[P0, P1], FlushScope::All)
        }
    );
    assert_eq!(w.leaf(V0, 0x1000), None);
    assert_eq!(mem.frames_in_use(), 8, "running vCPUs may still walk them");
    // V0 exits on P0 (after P0's flush): its frames go back; P0 owes no
    // second flush because the first reached it before this request.
    let r = w.fault(V0, P0, 0x1000, 0);
    assert_eq!(
        r,
        MmuReply::Resume {
            flush: flush(&[P0], FlushScope::All)
        }
    );
    assert_eq!(mem.frames_in_use(), 2 + 3 + 3);
    send(&w.s, MmuRequest::VcpuDescheduled { vcpu: V1, pcpu: P1 });
    assert_eq!(mem.frames_in_use(), 2 + 3);
}

#[test]
fn dirty_logging_catches_every_write_and_reprotects() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    let pte = w.map4k(0x1000, 0x5000, PTE_RW | PTE_A | PTE_D);
    w.map4k(0x2000, 0x6000, PTE_RW | PTE_A | PTE_D);
    w.start(V0, P0);
    assert_eq!(
        send(
            &w.s,
            MmuRequest::GetAndClearDirty {
                domain: D,
                start: Gfn(0)
            }
        ),
        MmuReply::error(MmuError::DirtyLogDisabled(D))
    );
    w.fault(V0, P0, 0x1000, W);
    assert_ne!(w.leaf(V0, 0x1000).unwrap() & PTE_RW, 0);
    let r = send(&w.s, MmuRequest::EnableDirtyLog { domain: D });
    assert_eq!(
        r,
        MmuReply::Done {
            flush: flush(&[P0], FlushScope::All)
        }
    );
    assert_eq!(w.leaf(V0, 0x1000).unwrap() & PTE_RW, 0);
    // A read keeps it read-only; the write marks gfn 5 and makes it writable.
    w.fault(V0, P0, 0x2000, 0);
    assert_eq!(w.leaf(V0, 0x2000).unwrap() & PTE_RW, 0);
    w.fault(V0, P0, 0x1000, W | PfErrorCode::P);
    assert_ne!(w.leaf(V0, 0x1000).unwrap() & PTE_RW, 0);
    let r = send(
        &w.s,
        MmuRequest::GetAndClearDirty {
            domain: D,
            start: Gfn(0),
        },
    );
    let MmuReply::DirtyBitmap { chunk, flush: f } = r else {
        panic!("{r:?}")
    };
    assert_eq!(chunk.dirty().collect::<Vec<_>>(), vec![Gfn(5)]);
    assert_eq!(chunk.next, None, "1024 frames fit one chunk");
    assert_eq!(f, flush(&[P0], FlushScope::All));
    assert_eq!(w.leaf(V0, 0x1000).unwrap() & PTE_RW, 0, "re-protected");
    // Nothing written since: empty, no flush.
    let r = send(
        &w.s,
        MmuRequest::GetAndClearDirty {
            domain: D,
            start: Gfn(0),
        },
    );
    let MmuReply::DirtyBitmap { chunk, flush: f } = r else {
        panic!()
    };
    assert_eq!(chunk.dirty().count(), 0);
    assert_eq!(f, None);
    // The walker's A/D writes dirty the page-table frames too.
    w.t.write(pte, w.t.read(pte) & !PTE_D);
    send(
        &w.s,
        MmuRequest::Invlpg {
            vcpu: V0,
            pcpu: P0,
            gva: Gva(0x1000),
        },
    );
    w.fault(V0, P0, 0x1000, W);
    let r = send(
        &w.s,
        MmuRequest::GetAndClearDirty {
            domain: D,
            start: Gfn(0),
        },
    );
    let MmuReply::DirtyBitmap { chunk, .. } = r else {
        panic!()
    };
    assert_eq!(chunk.dirty().collect::<Vec<_>>(), vec![Gfn(5), pte.frame()]);
    assert_eq!(
        send(&w.s, MmuRequest::DisableDirtyLog { domain: D }),
        MmuReply::Done { flush: None }
    );
}

#[test]
fn dirty_bitmap_chunks_cover_sparse_memory() {
    let mem = SimMem::new(12288, 10240..12288);
    let mut map = MemoryMap::new();
    map.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(1024),
        pages: 512,
    })
    .unwrap();
    map.push(MemRegion {
        gfn: Gfn(0x10_0000),
        mfn: Mfn(1536),
        pages: 8000,
    })
    .unwrap();
    let s = Reference::new(&mem, Config::default());
    send(
        &s,
        MmuRequest::CreateDomain {
            domain: D,
            memory: map.clone(),
        },
    );
    send(
        &s,
        MmuRequest::CreateVcpu {
            domain: D,
            vcpu: V0,
        },
    );
    send(&s, MmuRequest::EnableDirtyLog { domain: D });
    send(&s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu: P0 });
    let gfns = [Gfn(3), Gfn(0x10_0000), Gfn(0x10_0000 + 4096 + 7)];
    for g in gfns {
        let r = send(
            &s,
            MmuRequest::EmulatedWrite {
                vcpu: V0,
                pcpu: P0,
                gpa: g.base(),
                value: 1,
                size: 1,
            },
        );
        assert_eq!(r, MmuReply::WriteDone { flush: None });
    }
    let mut found = Vec::new();
    let mut next = Some(Gfn(0));
    let mut chunks = 0;
    while let Some(start) = next {
        let r = send(&s, MmuRequest::GetAndClearDirty { domain: D, start });
        let MmuReply::DirtyBitmap { chunk, .. } = r else {
            panic!("{r:?}")
        };
        found.extend(chunk.dirty());
        next = chunk.next;
        chunks += 1;
    }
    assert_eq!(found, gfns.to_vec());
    assert_eq!(chunks, 3, "the hole between the regions is skipped");
}

#[test]
fn emulated_writes_land_in_guest_memory() {
    let (mem, map) = memory();
    let w = world(&mem, &map);
    w.start(V0, P0);
    let ew = |gpa: u64, value: u64, size: u8| {
        send(
            &w.s,
            MmuRequest::EmulatedWrite {
                vcpu: V0,
                pcpu: P0,
                gpa: Gpa(gpa),
                value,
                size,
            },
        )
    };
    assert_eq!(
        ew(0x5003, 0x1122_3344_5566_7788, 8),
        MmuReply::WriteDone { flush: None }
    );
    let mut b = [0u8; 8];
    mem.read_bytes(Hpa(((1024 + 5) << 12) + 3), &mut b).unwrap();
    assert_eq!(u64::from_le_bytes(b), 0x1122_3344_5566_7788);
    assert_eq!(w.t.read(Gpa(0x5000)), 0x4455_6677_8800_0000);
    assert_eq!(ew(0x5000, 0xaa, 1), MmuReply::WriteDone { flush: None });
    assert_eq!(w.t.read(Gpa(0x5000)), 0x4455_6677_8800_00aa);
    assert_eq!(ew(0x5000, 0, 3), MmuReply::error(MmuError::BadWriteSize(3)));
    assert_eq!(
        ew(0x5ffe, 0, 4),
        MmuReply::error(MmuError::WriteCrossesPage(Gpa(0x5ffe)))
    );
    assert_eq!(
        ew(0x40_0000_0000, 0, 4),
        MmuReply::error(MmuError::GpaNotInMemory(Gpa(0x40_0000_0000)))
    );
}

#[test]
fn out_of_shadow_frames_recovers_by_zapping_then_errors_cleanly() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    for i in 0..4u64 {
        // Each in its own PML4 slot: 3 tables per mapping.
        w.map4k(i << 39, 0x5000 + (i << 12), PTE_RW | PTE_D);
    }
    w.start(V0, P0);
    w.fault(V0, P0, 0, 0);
    w.fault(V0, P0, 1 << 39, 0);
    assert_eq!(mem.frames_in_use(), 2 + 6);
    mem.set_frame_limit(10);
    // Needs 3 frames, only 2 left: zap own tree (6 frames back), retry.
    assert_eq!(
        w.fault(V0, P0, 2 << 39, 0),
        MmuReply::Resume {
            flush: flush(&[P0], FlushScope::All)
        }
    );
    assert!(w.leaf(V0, 2 << 39).is_some());
    assert_eq!(w.leaf(V0, 0), None);
    // Only the roots fit: even zapping everything does not help.
    mem.set_frame_limit(2);
    let r = w.fault(V0, P0, 3 << 39, 0);
    assert_eq!(
        r,
        MmuReply::Error {
            reason: MmuError::OutOfShadowMemory(D),
            flush: flush(&[P0], FlushScope::All)
        }
    );
    // Creating a vCPU without a root frame fails cleanly too.
    assert_eq!(
        send(
            &w.s,
            MmuRequest::CreateVcpu {
                domain: D,
                vcpu: VcpuId(99)
            }
        ),
        MmuReply::error(MmuError::OutOfShadowMemory(D))
    );
    mem.set_frame_limit(usize::MAX);
    assert_eq!(w.fault(V0, P0, 3 << 39, 0), resume());
}

#[test]
fn destroy_domain_frees_everything() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.map4k(0x1000, 0x5000, PTE_RW | PTE_D);
    w.start(V0, P0);
    w.start(V1, P1);
    w.fault(V0, P0, 0x1000, 0);
    w.fault(V1, P1, 0x1000, 0);
    assert_eq!(
        send(&w.s, MmuRequest::DestroyDomain { domain: D }),
        MmuReply::error(MmuError::VcpuRunning(V0))
    );
    send(&w.s, MmuRequest::VcpuDescheduled { vcpu: V0, pcpu: P0 });
    send(&w.s, MmuRequest::VcpuDescheduled { vcpu: V1, pcpu: P1 });
    assert_eq!(
        send(&w.s, MmuRequest::DestroyDomain { domain: D }),
        MmuReply::Done {
            flush: flush(&[P0, P1], FlushScope::All)
        }
    );
    assert_eq!(mem.frames_in_use(), 0);
    assert_eq!(
        send(&w.s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu: P0 }),
        MmuReply::error(MmuError::UnknownVcpu(V0))
    );
    assert_eq!(
        send(&w.s, MmuRequest::ZapAll { domain: D }),
        MmuReply::error(MmuError::UnknownDomain(D))
    );
}

#[test]
fn bad_requests_get_errors_with_the_offending_value() {
    let (mem, map) = memory();
    let w = world(&mem, &map);
    let s: &dyn MmuServer = &w.s;
    assert_eq!(
        send(
            s,
            MmuRequest::CreateDomain {
                domain: D,
                memory: map.clone()
            }
        ),
        MmuReply::error(MmuError::DomainExists(D))
    );
    assert_eq!(
        send(
            s,
            MmuRequest::CreateVcpu {
                domain: D,
                vcpu: V0
            }
        ),
        MmuReply::error(MmuError::VcpuExists(V0))
    );
    assert_eq!(
        send(
            s,
            MmuRequest::CreateVcpu {
                domain: DomainId(7),
                vcpu: VcpuId(70)
            }
        ),
        MmuReply::error(MmuError::UnknownDomain(DomainId(7)))
    );
    assert_eq!(
        send(
            s,
            MmuRequest::VcpuScheduled {
                vcpu: V0,
                pcpu: PcpuId(64)
            }
        ),
        MmuReply::error(MmuError::InvalidPcpu(PcpuId(64)))
    );
    assert_eq!(
        send(
            s,
            MmuRequest::SetPagingMode {
                vcpu: V0,
                pcpu: P0,
                mode: PagingMode(PagingMode::SMAP)
            }
        ),
        MmuReply::error(MmuError::UnsupportedPagingMode(PagingMode(
            PagingMode::SMAP
        )))
    );
    let mut overlapping = MemoryMap::new();
    overlapping
        .push(MemRegion {
            gfn: Gfn(0),
            mfn: Mfn(0),
            pages: 10,
        })
        .unwrap();
    overlapping
        .push(MemRegion {
            gfn: Gfn(5),
            mfn: Mfn(100),
            pages: 10,
        })
        .unwrap();
    assert_eq!(
        send(
            s,
            MmuRequest::CreateDomain {
                domain: DomainId(2),
                memory: overlapping
            }
        ),
        MmuReply::error(MmuError::OverlappingRegions(Gfn(5)))
    );
    let mut empty = MemoryMap::new();
    let bad = MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(0),
        pages: 0,
    };
    empty.push(bad).unwrap();
    assert_eq!(
        send(
            s,
            MmuRequest::CreateDomain {
                domain: DomainId(2),
                memory: empty
            }
        ),
        MmuReply::error(MmuError::BadRegion(bad))
    );
    let mut huge = MemoryMap::new();
    huge.push(MemRegion {
        gfn: Gfn(0),
        mfn: Mfn(0),
        pages: 1 << 30,
    })
    .unwrap();
    assert_eq!(
        send(
            s,
            MmuRequest::CreateDomain {
                domain: DomainId(2),
                memory: huge
            }
        ),
        MmuReply::error(MmuError::CapacityExceeded {
            what: Resource::GuestFrames,
            limit: 1 << 24
        })
    );
    // Garbage through the wire.
    let mut out = [0u8; MAX_MESSAGE];
    let n = dispatch(s, &[6, 1, 2], &mut out);
    assert_eq!(
        decode::<MmuReply>(&out[..n]).unwrap(),
        MmuReply::error(MmuError::Malformed(DecodeError::UnexpectedEnd))
    );
}

#[test]
fn capacity_limits_hold() {
    let (mem, map) = memory();
    let cfg = Config {
        max_domains: 1,
        max_vcpus: 2,
        ..Config::default()
    };
    let w = world_with(&mem, &map, cfg);
    assert_eq!(
        send(
            &w.s,
            MmuRequest::CreateVcpu {
                domain: D,
                vcpu: VcpuId(12)
            }
        ),
        MmuReply::error(MmuError::CapacityExceeded {
            what: Resource::Vcpus,
            limit: 2
        })
    );
    assert_eq!(
        send(
            &w.s,
            MmuRequest::CreateDomain {
                domain: DomainId(2),
                memory: map.clone()
            }
        ),
        MmuReply::error(MmuError::CapacityExceeded {
            what: Resource::Domains,
            limit: 1
        })
    );
}

#[test]
fn eight_pcpus_fault_concurrently_on_one_domain() {
    let (mem, map) = memory();
    let mut t = GuestTables::new(&mem, map.clone(), Gfn(0x300));
    let pml4 = t.alloc_table();
    for i in 0..256u64 {
        t.map(
            pml4,
            Gva(0x1000_0000 + (i << 12)),
            Gpa(0x1_0000 + (i << 12)),
            PageSize::Size4K,
            PTE_RW | PTE_US,
        );
    }
    let s = registry::create("reference", &mem).unwrap();
    send(
        &*s,
        MmuRequest::CreateDomain {
            domain: D,
            memory: map.clone(),
        },
    );
    std::thread::scope(|scope| {
        for c in 0..8u32 {
            let s = &s;
            scope.spawn(move || {
                let (v, p) = (VcpuId(100 + c), PcpuId(c));
                send(&**s, MmuRequest::CreateVcpu { domain: D, vcpu: v });
                send(&**s, MmuRequest::VcpuScheduled { vcpu: v, pcpu: p });
                send(
                    &**s,
                    MmuRequest::SetPagingMode {
                        vcpu: v,
                        pcpu: p,
                        mode: MODE,
                    },
                );
                send(
                    &**s,
                    MmuRequest::WriteCr3 {
                        vcpu: v,
                        pcpu: p,
                        cr3: GuestCr3(pml4.base().0),
                    },
                );
                for i in 0..256u64 {
                    let code = if (i + c as u64).is_multiple_of(3) {
                        W | U
                    } else {
                        U
                    };
                    let r = send(
                        &**s,
                        MmuRequest::PageFault {
                            vcpu: v,
                            pcpu: p,
                            gva: Gva(0x1000_0000 + (i << 12)),
                            error_code: PfErrorCode(code),
                        },
                    );
                    assert!(matches!(r, MmuReply::Resume { .. }), "{r:?}");
                }
            });
        }
    });
    // Every guest leaf has A set, and D exactly where some vCPU wrote.
    for i in 0..256u64 {
        let gva = Gva(0x1000_0000 + (i << 12));
        let e = t.read(t.entry(pml4, gva, 1).unwrap());
        assert_ne!(e & PTE_A, 0);
        let written = (0..8u64).any(|c| (i + c).is_multiple_of(3));
        assert_eq!(e & PTE_D != 0, written);
    }
}

#[test]
fn pool_exhaustion_reclaims_other_domains_safely() {
    let mem = SimMem::new(4096, 3072..4096);
    let mut map_a = MemoryMap::new();
    map_a
        .push(MemRegion {
            gfn: Gfn(0),
            mfn: Mfn(1024),
            pages: 512,
        })
        .unwrap();
    let mut map_b = MemoryMap::new();
    map_b
        .push(MemRegion {
            gfn: Gfn(0),
            mfn: Mfn(1536),
            pages: 512,
        })
        .unwrap();
    let s = Reference::new(&mem, Config::default());
    let (da, db) = (DomainId(1), DomainId(2));
    let (va, vb) = (VcpuId(1), VcpuId(2));
    // Identical tables in both domains: gva 0x1000 -> gfn 0x10.
    let mut ta = GuestTables::new(&mem, map_a.clone(), Gfn(0x100));
    let mut tb = GuestTables::new(&mem, map_b.clone(), Gfn(0x100));
    let pa = ta.alloc_table();
    let pb = tb.alloc_table();
    ta.map(
        pa,
        Gva(0x1000),
        Gpa(0x10000),
        PageSize::Size4K,
        PTE_RW | PTE_D,
    );
    tb.map(
        pb,
        Gva(0x1000),
        Gpa(0x10000),
        PageSize::Size4K,
        PTE_RW | PTE_D,
    );
    for (d, v, map, pml4, p) in [(da, va, &map_a, pa, P0), (db, vb, &map_b, pb, P1)] {
        send(
            &s,
            MmuRequest::CreateDomain {
                domain: d,
                memory: map.clone(),
            },
        );
        send(&s, MmuRequest::CreateVcpu { domain: d, vcpu: v });
        send(&s, MmuRequest::VcpuScheduled { vcpu: v, pcpu: p });
        send(
            &s,
            MmuRequest::SetPagingMode {
                vcpu: v,
                pcpu: p,
                mode: MODE,
            },
        );
        send(
            &s,
            MmuRequest::WriteCr3 {
                vcpu: v,
                pcpu: p,
                cr3: GuestCr3(pml4.base().0),
            },
        );
    }
    assert_eq!(
        send(
            &s,
            MmuRequest::PageFault {
                vcpu: va,
                pcpu: P0,
                gva: Gva(0x1000),
                error_code: PfErrorCode(0)
            }
        ),
        resume()
    );
    // A logs dirty pages and its vCPU writes: a writable leaf, maybe cached.
    send(&s, MmuRequest::EnableDirtyLog { domain: da });
    let r = send(
        &s,
        MmuRequest::PageFault {
            vcpu: va,
            pcpu: P0,
            gva: Gva(0x1000),
            error_code: PfErrorCode(W | PfErrorCode::P),
        },
    );
    assert!(matches!(r, MmuReply::Resume { .. }));
    send(&s, MmuRequest::VcpuDescheduled { vcpu: va, pcpu: P0 });
    // Only A's frames are in use beyond the roots; B needs 3 and gets them
    // by reclaiming the parked vCPU of A.
    mem.set_frame_limit(mem.frames_in_use());
    let r = send(
        &s,
        MmuRequest::PageFault {
            vcpu: vb,
            pcpu: P1,
            gva: Gva(0x1000),
            error_code: PfErrorCode(0),
        },
    );
    assert!(matches!(r, MmuReply::Resume { .. }), "{r:?}");
    // B's reply names only B's pCPU (flushes are per domain).
    assert!(r.flush().is_none_or(|f| !f.cpus.contains(P0)), "{r:?}");
    assert_eq!(
        shadow::lookup(&mem, s.shadow_root(va).unwrap(), Gva(0x1000)).unwrap(),
        None
    );
    // A's dirty round: P0 may still cache the writable entry of the emptied
    // tree, so re-protecting flushes it (else a write would go unlogged).
    let r = send(
        &s,
        MmuRequest::GetAndClearDirty {
            domain: da,
            start: Gfn(0),
        },
    );
    let MmuReply::DirtyBitmap { chunk, flush: f } = r else {
        panic!("{r:?}")
    };
    assert_eq!(chunk.dirty().collect::<Vec<_>>(), vec![Gfn(0x10)]);
    assert!(f.is_some_and(|f| f.cpus.contains(P0)), "{f:?}");
    // A's old frames were reused: A must flush P0 before it runs there again,
    // through its own reply (the kernel flushes per domain).
    let r = send(&s, MmuRequest::VcpuScheduled { vcpu: va, pcpu: P0 });
    assert!(
        matches!(r, MmuReply::LoadShadowRoot { flush: f, .. } if f == flush(&[P0], FlushScope::All))
    );
}

/// `GetCounters` through the wire: exact counts for a scripted sequence,
/// per domain and for the whole server, against what the test itself saw
/// (replies, flushes) and the simulator's frames in use.
#[test]
fn counters_through_the_wire_count_exactly() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    for i in 0..5u64 {
        w.map4k(0x40_0000 + i * 0x1000, 0x5000 + i * 0x1000, PTE_RW | PTE_US);
    }
    // Every request about D goes through here; it tallies the flushes the
    // test saw so the server's flush counts can be checked against them.
    let tally = std::cell::Cell::new((0u64, 0u64));
    let sent = |s: &dyn MmuServer, req: MmuRequest| {
        let r = send(s, req);
        if let Some(f) = r.flush() {
            let (n, c) = tally.get();
            tally.set((n + 1, c + u64::from(f.cpus.0.count_ones())));
        }
        r
    };
    let get = |s: &dyn MmuServer, domain: Option<DomainId>| match send(
        s,
        MmuRequest::GetCounters { domain },
    ) {
        MmuReply::Counters { counters, flush } => {
            assert_eq!(flush, None);
            counters
        }
        other => panic!("GetCounters({domain:?}) answered {other:?}"),
    };
    let fresh = get(&w.s, Some(D));
    assert_eq!(
        fresh,
        ServerCounters {
            shadow_pages_created: 2,
            shadow_pages_in_use: 2,
            shadow_pages_peak: 2,
            ..ServerCounters::default()
        },
        "two vCPUs, one root each"
    );
    sent(&w.s, MmuRequest::VcpuScheduled { vcpu: V0, pcpu: P0 });
    sent(
        &w.s,
        MmuRequest::SetPagingMode {
            vcpu: V0,
            pcpu: P0,
            mode: MODE,
        },
    );
    sent(
        &w.s,
        MmuRequest::WriteCr3 {
            vcpu: V0,
            pcpu: P0,
            cr3: GuestCr3(w.pml4.base().0),
        },
    );
    // N = 5 demand faults in one guest L1 table: 3 new shadow tables.
    for i in 0..5u64 {
        let r = sent(
            &w.s,
            MmuRequest::PageFault {
                vcpu: V0,
                pcpu: P0,
                gva: Gva(0x40_0000 + i * 0x1000),
                error_code: PfErrorCode(U),
            },
        );
        assert_eq!(r, resume());
    }
    // One fault on an unmapped page is injected.
    let r = sent(
        &w.s,
        MmuRequest::PageFault {
            vcpu: V0,
            pcpu: P0,
            gva: Gva(0x80_0000),
            error_code: PfErrorCode(U),
        },
    );
    assert!(matches!(r, MmuReply::InjectPageFault { .. }), "{r:?}");
    // A fault of an unknown vCPU counts nowhere.
    let r = w.fault(VcpuId(99), P0, 0x40_0000, U);
    assert_eq!(r, MmuReply::error(MmuError::UnknownVcpu(VcpuId(99))));
    // One emulated write.
    let r = sent(
        &w.s,
        MmuRequest::EmulatedWrite {
            vcpu: V0,
            pcpu: P0,
            gpa: Gpa(0x9000),
            value: 7,
            size: 8,
        },
    );
    assert!(matches!(r, MmuReply::WriteDone { .. }), "{r:?}");
    let c = get(&w.s, Some(D));
    assert_eq!(c.shadow_pages_in_use as usize, mem.frames_in_use());
    let (obligations, cpus) = tally.get();
    assert_eq!(
        c,
        ServerCounters {
            page_faults: 6,
            faults_fixed: 5,
            faults_injected: 1,
            shadow_pages_created: 5,
            shadow_pages_in_use: 5,
            shadow_pages_peak: 5,
            emulated_writes: 1,
            flush_obligations: obligations,
            flush_cpus: cpus,
            ..ServerCounters::default()
        }
    );
    // A zap while V0 runs: its 3 tables are unhooked but kept (in use)
    // until V0 leaves P0.
    let r = sent(&w.s, MmuRequest::ZapAll { domain: D });
    assert!(matches!(r, MmuReply::Done { .. }), "{r:?}");
    let c = get(&w.s, Some(D));
    assert_eq!((c.zaps, c.shadow_pages_in_use), (1, 5));
    assert_eq!(c.shadow_pages_in_use as usize, mem.frames_in_use());
    sent(&w.s, MmuRequest::VcpuDescheduled { vcpu: V0, pcpu: P0 });
    let c = get(&w.s, Some(D));
    assert_eq!(
        (
            c.shadow_pages_created,
            c.shadow_pages_freed,
            c.shadow_pages_in_use
        ),
        (5, 3, 2)
    );
    // The peak stays at the 5 frames held before the zap freed 3.
    assert_eq!(c.shadow_pages_peak, 5);
    assert_eq!(c.shadow_pages_in_use as usize, mem.frames_in_use());
    let (obligations, cpus) = tally.get();
    assert!(obligations >= 1, "the zap of a vCPU that ran must flush");
    assert_eq!((c.flush_obligations, c.flush_cpus), (obligations, cpus));
    // Nothing this server does not do is claimed.
    assert_eq!(
        (
            c.fast_path_fixes,
            c.unsyncs,
            c.resyncs,
            c.unshadowed,
            c.emulate_write_replies,
            c.reclaims
        ),
        (0, 0, 0, 0, 0, 0)
    );
    // A second domain is counted apart; the whole server is the sum.
    let d2 = DomainId(2);
    send(
        &w.s,
        MmuRequest::CreateDomain {
            domain: d2,
            memory: map.clone(),
        },
    );
    send(
        &w.s,
        MmuRequest::CreateVcpu {
            domain: d2,
            vcpu: VcpuId(20),
        },
    );
    let c2 = get(&w.s, Some(d2));
    assert_eq!(
        c2,
        ServerCounters {
            shadow_pages_created: 1,
            shadow_pages_in_use: 1,
            shadow_pages_peak: 1,
            ..ServerCounters::default()
        }
    );
    let total = get(&w.s, None);
    // The server's peak is the 5 frames of D before its zap, not the sum
    // of the domains' peaks (V20's root came after the zap: 3 in use).
    assert_eq!(total.shadow_pages_in_use, 3);
    assert_eq!(total.shadow_pages_peak, 5);
    assert_eq!(total, c.sum(&c2));
    assert_eq!(total.shadow_pages_in_use as usize, mem.frames_in_use());
    // Destroyed domains stay in the total; asking for one is an error.
    let r = sent(&w.s, MmuRequest::DestroyDomain { domain: D });
    assert!(matches!(r, MmuReply::Done { .. }), "{r:?}");
    assert_eq!(
        send(&w.s, MmuRequest::GetCounters { domain: Some(D) }),
        MmuReply::error(MmuError::UnknownDomain(D))
    );
    let total = get(&w.s, None);
    let (obligations, cpus) = tally.get();
    assert_eq!(total.shadow_pages_in_use, 1);
    assert_eq!(total.shadow_pages_in_use as usize, mem.frames_in_use());
    // The destroyed domain's frames are gone; the server's peak is not.
    assert_eq!(total.shadow_pages_peak, 5);
    assert_eq!(
        (
            total.page_faults,
            total.faults_fixed,
            total.zaps,
            total.shadow_pages_created,
            total.shadow_pages_freed
        ),
        (6, 5, 1, 6, 5)
    );
    assert_eq!(
        (total.flush_obligations, total.flush_cpus),
        (obligations, cpus)
    );
}

/// Pool exhaustion is counted as reclaims on the vCPU whose fault ran dry.
#[test]
fn counters_count_reclaims() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.map4k(0x40_0000, 0x5000, PTE_RW | PTE_US);
    w.map4k(0x8000_0000, 0x6000, PTE_RW | PTE_US);
    w.start(V0, P0);
    assert_eq!(w.fault(V0, P0, 0x40_0000, U), resume());
    // Roots (2) + 3 tables in use; no room for the 3 tables of a far page.
    mem.set_frame_limit(mem.frames_in_use());
    let r = w.fault(V0, P0, 0x8000_0000, U);
    assert!(matches!(r, MmuReply::Resume { .. }), "{r:?}");
    let MmuReply::Counters { counters: c, .. } =
        send(&w.s, MmuRequest::GetCounters { domain: Some(D) })
    else {
        panic!("no counters")
    };
    assert_eq!(c.reclaims, 1, "{c:?}");
    assert_eq!(c.faults_fixed, 2);
    assert!(c.shadow_pages_peak >= c.shadow_pages_in_use, "{c:?}");
    assert_eq!(c.shadow_pages_in_use as usize, mem.frames_in_use());
}

/// The peak is the most frames held at once: N tables, a zap, then fewer
/// tables again leave it at N (+ the roots), above the level in use.
#[test]
fn counters_peak_survives_zap() {
    let (mem, map) = memory();
    let mut w = world(&mem, &map);
    w.map4k(0x40_0000, 0x5000, PTE_RW | PTE_US);
    w.map4k(0x8000_0000, 0x6000, PTE_RW | PTE_US);
    w.start(V0, P0);
    assert_eq!(w.fault(V0, P0, 0x40_0000, U), resume());
    assert_eq!(w.fault(V0, P0, 0x8000_0000, U), resume());
    let get = |w: &World, domain| match send(&w.s, MmuRequest::GetCounters { domain }) {
        MmuReply::Counters { counters, .. } => counters,
        other => panic!("GetCounters answered {other:?}"),
    };
    let held = get(&w, Some(D));
    // Two roots, the L3, two L2s and two L1s.
    assert_eq!(held.shadow_pages_in_use, 7, "{held:?}");
    assert_eq!(held.shadow_pages_peak, 7, "{held:?}");
    send(&w.s, MmuRequest::ZapAll { domain: D });
    send(&w.s, MmuRequest::VcpuDescheduled { vcpu: V0, pcpu: P0 });
    w.start(V0, P0);
    assert_eq!(w.fault(V0, P0, 0x40_0000, U), resume());
    let c = get(&w, Some(D));
    assert_eq!(c.shadow_pages_in_use, 5, "{c:?}");
    assert_eq!(c.shadow_pages_in_use as usize, mem.frames_in_use());
    assert_eq!(c.shadow_pages_peak, 7, "{c:?}");
    let t = get(&w, None);
    assert_eq!((t.shadow_pages_in_use, t.shadow_pages_peak), (5, 7));
}
