//! The scripted grant scenarios: permissions and lifetimes, the TLB model
//! around unmaps, and every bad-input class (each checks the error it gets;
//! the rig checks after every step that nothing leaked and that no domain
//! can still reach a frame it lost).

use super::rig::{gva_of, Access, Rig, FIRST_DATA_GFN, FOREIGN_GFN};
use crate::machine::Res;
use abi::grant::{CopyDirection, GrantError, GrantRef, GrantReply, MapHandle, MAX_UNMAP_BATCH};
use abi::mmu::MmuError;
use abi::{DomainId, Gfn};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// One scripted scenario.
pub struct GrantScenario {
    /// Its name.
    pub name: &'static str,
    /// The script.
    pub run: fn(&mut Rig<'_>) -> Res<()>,
}

/// Every scripted grant scenario.
pub fn grant_scenarios() -> Vec<GrantScenario> {
    scenario_list![
        map_write_read_unmap,
        unaccessed_batch,
        accessed_on_several_pcpus,
        speculative_walks,
        mixed_batch_with_bad_entry,
        read_only_grant,
        end_access_while_mapped,
        double_unmap_and_stale_handles,
        another_domains_handle,
        bad_references,
        destroy_mapper_while_mapped,
        destroy_granter_while_mapped,
        copy_bounds,
        maps_per_grant_and_maptrack_exhaustion,
        hostile_bytes_and_counts,
        gfn_collisions,
        remap_gfn_to_another_frame,
    ]
}

/// A granting domain `a` (vCPU on pCPU 0) and a mapping domain `b`
/// (vCPUs on pCPUs 1, 2, 3).
struct Pair {
    a: usize,
    b: usize,
    va: usize,
    vb: [usize; 3],
}

fn pair(r: &mut Rig<'_>) -> Res<Pair> {
    let a = r.domain()?;
    let b = r.domain()?;
    let va = r.vcpu(a, 0)?;
    let vb = [r.vcpu(b, 1)?, r.vcpu(b, 2)?, r.vcpu(b, 3)?];
    Ok(Pair { a, b, va, vb })
}

fn data(i: u64) -> u64 {
    FIRST_DATA_GFN + i
}

fn fgfn(i: u64) -> u64 {
    FOREIGN_GFN + i
}

fn expect<T>(
    r: &Rig<'_>,
    got: GrantReply,
    what: &str,
    ok: impl Fn(&GrantReply) -> Option<T>,
) -> Res<T> {
    ok(&got).ok_or_else(|| r.fail(what, String::from(what), format!("{got:?}")))
}

fn done(r: &Rig<'_>, got: GrantReply) -> Res<()> {
    expect(r, got, "Done", |g| {
        matches!(g, GrantReply::Done { .. }).then_some(())
    })
}

fn copied(r: &Rig<'_>, got: GrantReply) -> Res<()> {
    expect(r, got, "CopyPlan", |g| {
        matches!(g, GrantReply::CopyPlan { .. }).then_some(())
    })
}

fn not_granted(r: &Rig<'_>, got: GrantReply, granter: usize, gref: u32) -> Res<()> {
    r.expect_error(
        got,
        GrantError::NotGranted {
            granter: r.id(granter),
            gref: GrantRef(gref),
        },
    )
}

fn map_write_read_unmap(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 1, p.b, data(0), false)?;
    let h = r.map_ok(p.b, p.a, 1, fgfn(0), true)?;
    r.access(p.vb[0], gva_of(fgfn(0)), Some(0x1234_5678))?;
    let got = r.access(p.va, gva_of(data(0)), None)?;
    r.expect_read(got, 0x1234_5678, "the granter sees the mapper's write")?;
    let back = r.access(p.vb[1], gva_of(fgfn(0)), None)?;
    r.expect_read(
        back,
        0x1234_5678,
        "the mapper reads it back on another pCPU",
    )?;
    r.unmap(p.b, &[h])?;
    let after = r.access(p.vb[0], gva_of(fgfn(0)), None)?;
    r.expect_fault(after, "access after unmap")?;
    let e = r.end_access(p.a, 1)?;
    done(r, e)
}

fn unaccessed_batch(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    // The mapper's vCPUs run (so its dirty mask is not empty) but never
    // touch the grants: the block path.
    for &v in &p.vb {
        r.access(v, gva_of(data(1)), Some(7))?;
    }
    let mut hs = Vec::new();
    for i in 0..8 {
        r.grant_ok(p.a, i as u32, p.b, data(i), false)?;
        hs.push(r.map_ok(p.b, p.a, i as u32, fgfn(i), true)?);
    }
    r.unmap(p.b, &hs)?;
    for i in 0..8 {
        let e = r.end_access(p.a, i as u32)?;
        done(r, e)?;
    }
    Ok(())
}

fn accessed_on_several_pcpus(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 2, p.b, data(2), false)?;
    r.grant_ok(p.a, 3, p.b, data(3), true)?;
    let h2 = r.map_ok(p.b, p.a, 2, fgfn(2), true)?;
    let h3 = r.map_ok(p.b, p.a, 3, fgfn(3), false)?;
    for &v in &p.vb {
        r.access(v, gva_of(fgfn(2)), None)?;
    }
    r.access(p.vb[2], gva_of(fgfn(3)), None)?;
    // Unmap singly: the first batch was accessed on three pCPUs.
    r.unmap(p.b, &[h2])?;
    r.unmap(p.b, &[h3])?;
    for &v in &p.vb {
        let a = r.access(v, gva_of(fgfn(2)), None)?;
        r.expect_fault(a, "access after unmap")?;
    }
    Ok(())
}

fn speculative_walks(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 4, p.b, data(4), false)?;
    r.grant_ok(p.a, 5, p.b, data(5), false)?;
    let h4 = r.map_ok(p.b, p.a, 4, fgfn(4), true)?;
    let h5 = r.map_ok(p.b, p.a, 5, fgfn(5), true)?;
    // vCPU 0 makes shadow leaves for both; vCPU 1 only walks them
    // speculatively (setting A, as a CPU does before caching).
    r.access(p.vb[0], gva_of(fgfn(4)), None)?;
    r.access(p.vb[0], gva_of(fgfn(5)), None)?;
    r.speculate(p.vb[0])?;
    r.speculate(p.vb[1])?;
    r.unmap(p.b, &[h4, h5])?;
    Ok(())
}

fn mixed_batch_with_bad_entry(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    let mut hs = Vec::new();
    for i in 0..(MAX_UNMAP_BATCH as u64 - 1) {
        r.grant_ok(p.a, i as u32, p.b, data(i % 40), i % 3 == 0)?;
        hs.push(r.map_ok(p.b, p.a, i as u32, fgfn(i), i % 3 != 0)?);
    }
    // Touch every fourth one, from varying pCPUs.
    for (i, _) in hs.iter().enumerate().filter(|(i, _)| i % 4 == 1) {
        r.access(p.vb[i % 3], gva_of(fgfn(i as u64)), None)?;
    }
    let mut batch = hs.clone();
    batch.insert(13, MapHandle(0xdead_beef));
    r.unmap(p.b, &batch)?;
    for i in 0..(MAX_UNMAP_BATCH as u32 - 1) {
        let e = r.end_access(p.a, i)?;
        done(r, e)?;
    }
    Ok(())
}

fn read_only_grant(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.access(p.va, gva_of(data(6)), Some(0xfeed))?;
    r.grant_ok(p.a, 6, p.b, data(6), true)?;
    let w = r.map(p.b, p.a, 6, fgfn(6), true)?;
    r.expect_error(w, GrantError::ReadOnly(GrantRef(6)))?;
    let h = r.map_ok(p.b, p.a, 6, fgfn(6), false)?;
    let got = r.access(p.vb[0], gva_of(fgfn(6)), None)?;
    r.expect_read(got, 0xfeed, "read through a read-only mapping")?;
    let wr = r.access(p.vb[1], gva_of(fgfn(6)), Some(0xbad))?;
    r.expect_fault(wr, "write through a read-only mapping")?;
    let mfn = r.mfn(p.a, data(6));
    if r.frame_word(mfn, 0) != 0xfeed {
        return Err(r.fail(
            "read-only frame unchanged",
            "0xfeed".into(),
            format!("{:#x}", r.frame_word(mfn, 0)),
        ));
    }
    let c = r.copy(p.b, p.a, 6, 0, data(7) << 12, 8, CopyDirection::ToGrant)?;
    r.expect_error(c, GrantError::ReadOnly(GrantRef(6)))?;
    let c = r.copy(p.b, p.a, 6, 0, data(7) << 12, 8, CopyDirection::FromGrant)?;
    copied(r, c)?;
    let got = r.access(p.vb[0], gva_of(data(7)), None)?;
    r.expect_read(got, 0xfeed, "grant copy from a read-only grant")?;
    r.unmap(p.b, &[h])?;
    Ok(())
}

fn end_access_while_mapped(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 9, p.b, data(9), false)?;
    let h = r.map_ok(p.b, p.a, 9, fgfn(9), true)?;
    r.access(p.vb[0], gva_of(fgfn(9)), Some(3))?;
    let e = r.end_access(p.a, 9)?;
    r.expect_error(
        e,
        GrantError::StillMapped {
            gref: GrantRef(9),
            maps: 1,
        },
    )?;
    r.unmap(p.b, &[h])?;
    let e = r.end_access(p.a, 9)?;
    done(r, e)?;
    let m = r.map(p.b, p.a, 9, fgfn(9), false)?;
    not_granted(r, m, p.a, 9)?;
    let e = r.end_access(p.a, 9)?;
    not_granted(r, e, p.a, 9)
}

fn double_unmap_and_stale_handles(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 10, p.b, data(10), false)?;
    let h = r.map_ok(p.b, p.a, 10, fgfn(10), true)?;
    r.access(p.vb[0], gva_of(fgfn(10)), None)?;
    r.unmap(p.b, &[h])?;
    // The second unmap of the same handle: BadHandle (checked by the rig).
    r.unmap(p.b, &[h])?;
    // The slot is reused; the old handle must still be refused.
    let h2 = r.map_ok(p.b, p.a, 10, fgfn(11), true)?;
    r.unmap(p.b, &[h])?;
    let got = r.access(p.vb[1], gva_of(fgfn(11)), Some(5))?;
    r.expect_read(got, 5, "the new mapping survives a stale unmap")?;
    // The same handle twice in one batch: Ok, then BadHandle.
    r.unmap(p.b, &[h2, h2])?;
    Ok(())
}

fn another_domains_handle(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    let c = r.domain()?;
    let vc = r.vcpu(c, 4)?;
    r.access(vc, gva_of(data(0)), None)?;
    r.grant_ok(p.a, 12, p.b, data(12), false)?;
    let h = r.map_ok(p.b, p.a, 12, fgfn(12), true)?;
    r.access(p.vb[0], gva_of(fgfn(12)), Some(12))?;
    // Domain c unmaps b's handle: refused, b's mapping untouched.
    r.unmap(c, &[h])?;
    let got = r.access(p.vb[2], gva_of(fgfn(12)), None)?;
    r.expect_read(got, 12, "the owner's mapping survives")?;
    // Domain c maps b's grant: not granted to it.
    let m = r.map(c, p.a, 12, fgfn(12), false)?;
    r.expect_error(
        m,
        GrantError::NotGrantedTo {
            gref: GrantRef(12),
            domain: r.id(c),
        },
    )?;
    let cp = r.copy(c, p.a, 12, 0, data(1) << 12, 8, CopyDirection::FromGrant)?;
    r.expect_error(
        cp,
        GrantError::NotGrantedTo {
            gref: GrantRef(12),
            domain: r.id(c),
        },
    )?;
    r.unmap(p.b, &[h])?;
    Ok(())
}

fn bad_references(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    let huge = u32::MAX;
    let m = r.map(p.b, p.a, huge, fgfn(0), false)?;
    expect(r, m, "RefOutOfRange naming the reference", |g| match g {
        GrantReply::Error {
            reason: GrantError::RefOutOfRange { gref, .. },
            ..
        } if gref.0 == huge => Some(()),
        _ => None,
    })?;
    let g = r.grant(p.a, huge, p.b, data(0), false)?;
    expect(r, g, "RefOutOfRange naming the reference", |g| match g {
        GrantReply::Error {
            reason: GrantError::RefOutOfRange { gref, .. },
            ..
        } if gref.0 == huge => Some(()),
        _ => None,
    })?;
    let m = r.map(p.b, p.a, 5, fgfn(0), false)?;
    not_granted(r, m, p.a, 5)?;
    r.grant_ok(p.a, 5, p.b, data(5), false)?;
    let g = r.grant(p.a, 5, p.b, data(6), false)?;
    r.expect_error(g, GrantError::RefInUse(GrantRef(5)))?;
    let g = r.grant(p.a, 6, p.b, 0x9999, false)?;
    r.expect_error(g, GrantError::GfnNotInMemory(Gfn(0x9999)))?;
    let g = r.grant(p.a, 6, p.a, data(6), false)?;
    r.expect_error(g, GrantError::SelfGrant(r.id(p.a)))?;
    let g = r.grant(p.a, 6, usize::MAX, data(6), false)?;
    r.expect_error(g, GrantError::UnknownDomain(DomainId(u32::MAX)))?;
    let m = r.map(p.b, usize::MAX, 5, fgfn(0), false)?;
    r.expect_error(m, GrantError::UnknownDomain(DomainId(u32::MAX)))?;
    let m = r.map(p.b, p.b, 5, fgfn(0), false)?;
    r.expect_error(m, GrantError::SelfGrant(r.id(p.b)))?;
    let e = r.end_access(p.a, 5)?;
    done(r, e)
}

fn destroy_mapper_while_mapped(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 1, p.b, data(1), false)?;
    r.grant_ok(p.a, 2, p.b, data(2), true)?;
    r.map_ok(p.b, p.a, 1, fgfn(1), true)?;
    r.map_ok(p.b, p.a, 2, fgfn(2), false)?;
    r.access(p.vb[0], gva_of(fgfn(1)), Some(1))?;
    r.access(p.vb[1], gva_of(fgfn(2)), None)?;
    let d = r.destroy(p.b)?;
    done(r, d)?;
    // The pins are gone: the granter may end access.
    for gref in [1, 2] {
        let e = r.end_access(p.a, gref)?;
        done(r, e)?;
    }
    let got = r.access(p.va, gva_of(data(1)), None)?;
    r.expect_read(got, 1, "the granter's frame kept the mapper's write")
}

fn destroy_granter_while_mapped(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 1, p.b, data(1), false)?;
    let h = r.map_ok(p.b, p.a, 1, fgfn(1), true)?;
    r.access(p.vb[0], gva_of(fgfn(1)), Some(9))?;
    r.access(p.vb[2], gva_of(fgfn(1)), None)?;
    let d = r.destroy(p.a)?;
    done(r, d)?;
    // The mapping was revoked: no access, the handle is dead.
    for &v in &p.vb {
        let a = r.access(v, gva_of(fgfn(1)), None)?;
        r.expect_fault(a, "access after the granter died")?;
    }
    r.unmap(p.b, &[h])?;
    Ok(())
}

fn copy_bounds(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.access(p.va, gva_of(data(3)) + 0x100, Some(0xabc))?;
    r.grant_ok(p.a, 3, p.b, data(3), false)?;
    let c = r.copy(
        p.b,
        p.a,
        3,
        4090,
        data(4) << 12,
        16,
        CopyDirection::FromGrant,
    )?;
    r.expect_error(
        c,
        GrantError::CopyCrossesPage {
            offset: 4090,
            len: 16,
        },
    )?;
    let c = r.copy(
        p.b,
        p.a,
        3,
        0,
        (data(4) << 12) + 0xff8,
        16,
        CopyDirection::FromGrant,
    )?;
    r.expect_error(
        c,
        GrantError::CopyCrossesPage {
            offset: 0xff8,
            len: 16,
        },
    )?;
    let c = r.copy(p.b, p.a, 3, 0, 0x80 << 12, 8, CopyDirection::FromGrant)?;
    r.expect_error(c, GrantError::GfnNotInMemory(Gfn(0x80)))?;
    let c = r.copy(
        p.b,
        p.a,
        3,
        u16::MAX,
        data(4) << 12,
        u16::MAX,
        CopyDirection::ToGrant,
    )?;
    r.expect_error(
        c,
        GrantError::CopyCrossesPage {
            offset: u16::MAX,
            len: u16::MAX,
        },
    )?;
    // Good copies, both ways.
    let c = r.copy(
        p.b,
        p.a,
        3,
        0x100,
        data(4) << 12,
        8,
        CopyDirection::FromGrant,
    )?;
    copied(r, c)?;
    let got = r.access(p.vb[0], gva_of(data(4)), None)?;
    r.expect_read(got, 0xabc, "copied from the grant")?;
    r.access(p.vb[0], gva_of(data(5)), Some(0x5ee))?;
    let c = r.copy(p.b, p.a, 3, 0x200, data(5) << 12, 8, CopyDirection::ToGrant)?;
    copied(r, c)?;
    let got = r.access(p.va, gva_of(data(3)) + 0x200, None)?;
    r.expect_read(got, 0x5ee, "copied into the grant")?;
    let e = r.end_access(p.a, 3)?;
    done(r, e)?;
    let c = r.copy(p.b, p.a, 3, 0, data(4) << 12, 8, CopyDirection::FromGrant)?;
    not_granted(r, c, p.a, 3)
}

fn maps_per_grant_and_maptrack_exhaustion(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    // One reference mapped again and again, at distinct gfns.
    r.grant_ok(p.a, 0, p.b, data(0), false)?;
    let mut hs = Vec::new();
    let mut next_gfn = 0;
    let refused = loop {
        if next_gfn > 4096 {
            return Err(r.fail(
                "a bound on mappings of one reference",
                "CapacityExceeded".into(),
                "4096 mappings accepted".into(),
            ));
        }
        match r.map(p.b, p.a, 0, fgfn(next_gfn), false)? {
            GrantReply::Mapped { handle, .. } => hs.push(handle),
            other => break other,
        }
        next_gfn += 1;
    };
    expect(r, refused, "CapacityExceeded", |g| match g {
        GrantReply::Error {
            reason:
                GrantError::CapacityExceeded { .. } | GrantError::Mmu(MmuError::CapacityExceeded { .. }),
            ..
        } => Some(()),
        _ => None,
    })?;
    // Then many references until the maptrack (or the MMU server) is full.
    let mut gref = 1u32;
    let refused = loop {
        if next_gfn > 8192 {
            return Err(r.fail(
                "a bound on map handles",
                "CapacityExceeded".into(),
                "8192 mappings accepted".into(),
            ));
        }
        if !r
            .grant(p.a, gref, p.b, data(u64::from(gref) % 40), true)?
            .is_done()
        {
            break r.grant(p.a, gref, p.b, data(0), true)?;
        }
        let mut full = None;
        for _ in 0..4 {
            match r.map(p.b, p.a, gref, fgfn(next_gfn), false)? {
                GrantReply::Mapped { handle, .. } => hs.push(handle),
                other => {
                    full = Some(other);
                    break;
                }
            }
            next_gfn += 1;
        }
        if let Some(f) = full {
            break f;
        }
        gref += 1;
    };
    expect(
        r,
        refused,
        "CapacityExceeded or RefOutOfRange",
        |g| match g {
            GrantReply::Error {
                reason:
                    GrantError::CapacityExceeded { .. }
                    | GrantError::Mmu(MmuError::CapacityExceeded { .. })
                    | GrantError::RefOutOfRange { .. },
                ..
            } => Some(()),
            _ => None,
        },
    )?;
    // Touch a few, then unmap everything in batches; all levels go back.
    for i in (0..hs.len()).step_by(97) {
        r.access(p.vb[i % 3], gva_of(fgfn(i as u64 % 0x100)), None)?;
    }
    for chunk in hs.chunks(MAX_UNMAP_BATCH) {
        r.unmap(p.b, chunk)?;
    }
    for g in 0..=gref {
        r.end_access(p.a, g)?;
    }
    Ok(())
}

trait IsDone {
    fn is_done(&self) -> bool;
}

impl IsDone for GrantReply {
    fn is_done(&self) -> bool {
        matches!(self, GrantReply::Done { .. })
    }
}

fn hostile_bytes_and_counts(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 1, p.b, data(1), false)?;
    let h = r.map_ok(p.b, p.a, 1, fgfn(1), true)?;
    // 33 handles: does not decode.
    let mut msg = alloc::vec![6u8, r.id(p.b).0 as u8, 33];
    msg.extend(core::iter::repeat_n(h.0 as u8, 33));
    let x = r.grant_raw(&msg)?;
    expect(r, x, "Malformed", |g| match g {
        GrantReply::Error {
            reason: GrantError::Malformed(_),
            ..
        } => Some(()),
        _ => None,
    })?;
    // Garbage, an unknown variant, trailing bytes, an over-long message.
    for bytes in [
        &[][..],
        &[0x40][..],
        &[0x02, 0x01, 0x00][..],
        &[0xff; 2000][..],
        &[0x07, 1, 2, 3, 0xff, 0xff, 0xff, 0xff][..],
    ] {
        let x = r.grant_raw(bytes)?;
        expect(r, x, "Malformed", |g| match g {
            GrantReply::Error {
                reason: GrantError::Malformed(_),
                ..
            } => Some(()),
            _ => None,
        })?;
    }
    // Wrong protocol version.
    let x = r.grant_raw(&[0x00, 0x7f])?;
    expect(r, x, "VersionMismatch", |g| match g {
        GrantReply::Error {
            reason: GrantError::VersionMismatch {
                requested: 0x7f, ..
            },
            ..
        } => Some(()),
        _ => None,
    })?;
    // An empty batch: no statuses, nothing unmapped, no flush.
    let e = r.unmap(p.b, &[])?;
    expect(r, e, "an empty Unmapped without a flush", |g| match g {
        GrantReply::Unmapped {
            status,
            flush: None,
        } if status.is_empty() => Some(()),
        _ => None,
    })?;
    // Unknown domains as callers.
    let x = r.grant_raw(&[0x06, 0x7e, 0x01, 0x00])?;
    r.expect_error(x, GrantError::UnknownDomain(DomainId(0x7e)))?;
    let got = r.access(p.vb[0], gva_of(fgfn(1)), Some(4))?;
    r.expect_read(got, 4, "the mapping survived the garbage")?;
    r.unmap(p.b, &[h])?;
    Ok(())
}

fn gfn_collisions(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.grant_ok(p.a, 1, p.b, data(1), false)?;
    r.grant_ok(p.a, 2, p.b, data(2), false)?;
    // Inside the mapper's own memory.
    let m = r.map(p.b, p.a, 1, data(9), true)?;
    r.expect_error(m, GrantError::Mmu(MmuError::GfnInUse(Gfn(data(9)))))?;
    let h = r.map_ok(p.b, p.a, 1, fgfn(1), true)?;
    // Twice at one gfn.
    let m = r.map(p.b, p.a, 2, fgfn(1), true)?;
    r.expect_error(m, GrantError::Mmu(MmuError::GfnInUse(Gfn(fgfn(1)))))?;
    r.access(p.vb[0], gva_of(fgfn(1)), Some(0x77))?;
    let got = r.access(p.va, gva_of(data(1)), None)?;
    r.expect_read(got, 0x77, "the first mapping is the one in place")?;
    let got = r.access(p.va, gva_of(data(2)), None)?;
    r.expect_read(got, 0, "the refused mapping wrote nothing")?;
    r.unmap(p.b, &[h])?;
    Ok(())
}

fn remap_gfn_to_another_frame(r: &mut Rig<'_>) -> Res<()> {
    let p = pair(r)?;
    r.access(p.va, gva_of(data(1)), Some(0x1111))?;
    r.access(p.va, gva_of(data(2)), Some(0x2222))?;
    r.grant_ok(p.a, 1, p.b, data(1), false)?;
    r.grant_ok(p.a, 2, p.b, data(2), false)?;
    // gfn -> mfn changes under the mapper: the ABA of a lockless fault.
    for round in 0..4u64 {
        let gref = 1 + (round % 2) as u32;
        let h = r.map_ok(p.b, p.a, gref, fgfn(0), round % 3 != 0)?;
        let want = [0x1111, 0x2222][(round % 2) as usize];
        for &v in &p.vb {
            let got = r.access(v, gva_of(fgfn(0)), None)?;
            r.expect_read(got, want, "the current mapping's frame")?;
        }
        if round % 3 != 0 {
            let got = r.access(p.vb[0], gva_of(fgfn(0)), Some(want))?;
            if got != Access::Ok(want) {
                return Err(r.fail(
                    "write through a writable mapping",
                    "Ok".into(),
                    format!("{got:?}"),
                ));
            }
        }
        r.unmap(p.b, &[h])?;
    }
    Ok(())
}
