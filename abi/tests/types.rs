//! Address newtypes, CpuSet, paging helpers and flush merging.

use abi::*;

#[test]
fn address_helpers() {
    let g = Gva(0x7f12_3456_7abc);
    assert_eq!(g.page_offset(), 0xabc);
    assert_eq!(g.page_base(), Gva(0x7f12_3456_7000));
    assert_eq!(g.align_down(PageSize::Size2M), Gva(0x7f12_3440_0000));
    assert_eq!(g.offset_in(PageSize::Size1G), 0x3456_7abc);
    assert_eq!(g.table_index(4), 0xfe);
    assert_eq!(g.table_index(3), 0x48);
    assert_eq!(g.table_index(2), 0x1a2);
    assert_eq!(g.table_index(1), 0x167);
    assert!(g.is_canonical());
    assert!(Gva(0xffff_8000_0000_0000).is_canonical());
    assert!(!Gva(0x0000_8000_0000_0000).is_canonical());
    assert_eq!(Gpa(0x12_3456).frame(), Gfn(0x123));
    assert_eq!(Gfn(0x123).base(), Gpa(0x12_3000));
    assert_eq!(Mfn(0x5).at(0x1234), Hpa(0x5234));
    assert_eq!(Mfn::from(Hpa(0x5fff)), Mfn(5));
    assert_eq!(Gfn(u64::MAX).checked_add(1), None);
    assert!(Hpa(0x1008).is_aligned(8) && !Hpa(0x1004).is_aligned(8));
    assert_eq!(PageSize::Size2M.frames(), 512);
    assert_eq!(PageSize::Size1G.level(), 3);
    assert_eq!(format!("{:?}", Gpa(0x1000)), "Gpa(0x1000)");
}

#[test]
fn cpu_set() {
    let mut s = CpuSet::EMPTY;
    assert!(s.insert(PcpuId(0)) && s.insert(PcpuId(63)) && s.insert(PcpuId(5)));
    assert!(!s.insert(PcpuId(64)));
    assert_eq!(s.len(), 3);
    assert_eq!(
        s.iter().collect::<Vec<_>>(),
        vec![PcpuId(0), PcpuId(5), PcpuId(63)]
    );
    assert!(s.contains(PcpuId(63)) && !s.contains(PcpuId(64)) && !s.contains(PcpuId(4)));
    s.remove(PcpuId(5));
    assert_eq!(s, CpuSet((1 << 63) | 1));
    assert_eq!(CpuSet::first(8), CpuSet(0xff));
    assert_eq!(CpuSet::first(64), CpuSet(u64::MAX));
    assert!(CpuSet(0b0101).is_subset(CpuSet(0b0111)));
    assert_eq!(CpuSet(0b0110).difference(CpuSet(0b0100)), CpuSet(0b0010));
    let c: CpuSet = [PcpuId(1), PcpuId(2), PcpuId(99)].into_iter().collect();
    assert_eq!(c, CpuSet(0b110));
    assert_eq!(format!("{c:?}"), "{1, 2}");
}

#[test]
fn paging_helpers() {
    let cr3 = GuestCr3(0x8000_0000_0012_3005);
    assert_eq!(cr3.table(), Gpa(0x12_3000));
    assert_eq!(cr3.pcid(), 5);
    assert!(cr3.no_flush());
    let e = PfErrorCode(PfErrorCode::P | PfErrorCode::W | PfErrorCode::RSVD);
    assert!(e.is_write() && !e.is_user() && !e.is_fetch());
    assert_eq!(e.access(), PfErrorCode(PfErrorCode::W));
    assert!(PagingMode(PagingMode::WP).wp() && !PagingMode(PagingMode::WP).nxe());
    let off = PagingMode(PagingMode::OFF | PagingMode::WP);
    assert!(!off.paging() && off.mmio() && off.wp());
    let long = PagingMode(PagingMode::WP | PagingMode::NXE);
    assert!(long.paging() && !long.mmio());
    assert!(PagingMode(PagingMode::MMIO).paging() && PagingMode(PagingMode::MMIO).mmio());
    assert_eq!(PagingMode::ALL & PagingMode::OFF, PagingMode::OFF);
    assert_eq!(PagingMode::ALL & PagingMode::MMIO, PagingMode::MMIO);
}

#[test]
fn flush_merge() {
    let page = |c, a| {
        Some(FlushObligation {
            cpus: CpuSet(c),
            scope: FlushScope::Page(Gva(a)),
        })
    };
    assert_eq!(FlushObligation::merge(None, None), None);
    assert_eq!(
        FlushObligation::merge(page(1, 0x1000), None),
        page(1, 0x1000)
    );
    // An obligation naming no CPU is no obligation.
    assert_eq!(FlushObligation::merge(page(0, 0x1000), None), None);
    assert_eq!(
        FlushObligation::merge(page(1, 0x1000), page(2, 0x1000)),
        page(3, 0x1000)
    );
    assert_eq!(
        FlushObligation::merge(page(1, 0x1000), page(2, 0x2000)),
        Some(FlushObligation {
            cpus: CpuSet(3),
            scope: FlushScope::All
        })
    );
    let reload = Some(FlushObligation {
        cpus: CpuSet(0),
        scope: FlushScope::AllReloadRoots,
    });
    assert_eq!(
        FlushObligation::merge(page(4, 0), reload).unwrap().scope,
        FlushScope::AllReloadRoots
    );
    let r = MmuReply::Resume { flush: None }.add_flush(page(8, 0x5000));
    assert_eq!(r.flush(), page(8, 0x5000));
    assert_eq!(
        MmuReply::Welcome { version: 1 }
            .add_flush(page(1, 0))
            .flush(),
        None
    );
}

#[test]
fn dirty_chunk_helpers() {
    let mut bits = heapless::Vec::new();
    bits.extend_from_slice(&[0b1000_0001, 0, 0b10]).unwrap();
    let c = DirtyChunk {
        start: Gfn(0x100),
        bits,
        next: None,
    };
    assert_eq!(
        c.dirty().collect::<Vec<_>>(),
        vec![Gfn(0x100), Gfn(0x107), Gfn(0x111)]
    );
    assert!(c.is_dirty(Gfn(0x111)) && !c.is_dirty(Gfn(0x110)) && !c.is_dirty(Gfn(0xff)));
    assert!(!c.is_dirty(Gfn(0x100 + 24)));
}

#[test]
fn memory_region_checks() {
    let r = MemRegion {
        gfn: Gfn(0x10),
        mfn: Mfn(0x1000),
        pages: 4,
    };
    assert_eq!(r.translate(Gfn(0x13)), Some(Mfn(0x1003)));
    assert_eq!(r.translate(Gfn(0x14)), None);
    assert_eq!(r.translate(Gfn(0xf)), None);
    assert!(r.is_valid());
    assert!(!MemRegion { pages: 0, ..r }.is_valid());
    assert!(!MemRegion {
        gfn: Gfn(u64::MAX),
        ..r
    }
    .is_valid());
}

/// Summing counters adds the counts but keeps the larger peak (peaks of two
/// domains need not have been at the same time).
#[test]
fn counters_sum_keeps_the_larger_peak() {
    use abi::mmu::ServerCounters;
    let a = ServerCounters {
        shadow_pages_created: 9,
        shadow_pages_in_use: 4,
        shadow_pages_peak: 7,
        ..ServerCounters::default()
    };
    let b = ServerCounters {
        shadow_pages_created: 3,
        shadow_pages_in_use: 3,
        shadow_pages_peak: 5,
        ..ServerCounters::default()
    };
    let s = a.sum(&b);
    assert_eq!(
        (
            s.shadow_pages_created,
            s.shadow_pages_in_use,
            s.shadow_pages_peak
        ),
        (12, 7, 7)
    );
    assert_eq!(b.sum(&a), s);
}
