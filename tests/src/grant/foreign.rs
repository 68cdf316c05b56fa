//! MMU conformance scenarios for the foreign-frame requests (`MapForeign`,
//! `UnmapForeign`), sent straight to the MMU server: leaves created without
//! A (a fill nobody walked reports nothing accessed), the accessed report
//! after real and speculative walks and after the server dropped the
//! leaves itself, read-only mappings, a gfn moving to another frame, and
//! every error with its value. After each unmap the rig flushes only when
//! the report says accessed, and its oracle checks no pCPU still caches
//! the frame.

use super::rig::{gva_of, Rig, FIRST_DATA_GFN, FOREIGN_GFN};
use super::scenarios::GrantScenario;
use crate::machine::Res;
use abi::mmu::{MmuError, MmuReply, MmuRequest};
use abi::{DomainId, Gfn, Mfn};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Every foreign-frame scenario.
pub fn foreign_scenarios() -> Vec<GrantScenario> {
    scenario_list![
        fill_without_walk_is_not_accessed,
        walked_leaves_are_reported_accessed,
        leaves_dropped_by_a_zap_are_reported,
        read_only_foreign_frame,
        gfn_moves_to_another_frame,
        foreign_request_errors,
    ]
}

fn done(r: &Rig<'_>, got: MmuReply, what: &str) -> Res<()> {
    match got {
        MmuReply::Done { .. } => Ok(()),
        other => Err(r.fail(what, String::from("Done"), format!("{other:?}"))),
    }
}

fn error(r: &Rig<'_>, got: MmuReply, want: MmuError) -> Res<()> {
    match got {
        MmuReply::Error { reason, .. } if reason == want => Ok(()),
        other => Err(r.fail("MMU error", format!("{want:?}"), format!("{other:?}"))),
    }
}

fn accessed_is(r: &Rig<'_>, got: bool, want: bool, what: &str) -> Res<()> {
    if got == want {
        Ok(())
    } else {
        Err(r.fail(
            what,
            format!("accessed: {want}"),
            format!("accessed: {got}"),
        ))
    }
}

/// Owner `a` (vCPU on pCPU 0), mapper `b` (vCPUs on pCPUs 1..=3).
fn two(r: &mut Rig<'_>) -> Res<(usize, usize, usize, [usize; 3])> {
    let a = r.domain()?;
    let b = r.domain()?;
    let va = r.vcpu(a, 0)?;
    let vb = [r.vcpu(b, 1)?, r.vcpu(b, 2)?, r.vcpu(b, 3)?];
    Ok((a, b, va, vb))
}

fn fill_without_walk_is_not_accessed(r: &mut Rig<'_>) -> Res<()> {
    let (a, b, _, vb) = two(r)?;
    // The mapper runs elsewhere, so its dirty mask is not empty.
    r.access(vb[0], gva_of(FIRST_DATA_GFN), None)?;
    let m = r.mmu_map_foreign(b, FOREIGN_GFN, a, FIRST_DATA_GFN, true)?;
    done(r, m, "MapForeign")?;
    for &v in &vb[..2] {
        let f = r.fault_only(v, gva_of(FOREIGN_GFN), false)?;
        if !matches!(f, MmuReply::Resume { .. }) {
            return Err(r.fail("fault on a foreign gfn", "Resume".into(), format!("{f:?}")));
        }
    }
    // Leaves were made, nobody walked them: created with A clear, so the
    // unmap must say nothing was accessed.
    let acc = r.mmu_unmap_foreign(b, FOREIGN_GFN)?;
    accessed_is(
        r,
        acc,
        false,
        "shadow leaves of a foreign frame made with A clear",
    )
}

fn walked_leaves_are_reported_accessed(r: &mut Rig<'_>) -> Res<()> {
    let (a, b, _, vb) = two(r)?;
    for i in 0..3u64 {
        let m = r.mmu_map_foreign(b, FOREIGN_GFN + i, a, FIRST_DATA_GFN + i, true)?;
        done(r, m, "MapForeign")?;
    }
    for &v in &vb {
        r.access(v, gva_of(FOREIGN_GFN), None)?;
    }
    r.access(vb[1], gva_of(FOREIGN_GFN + 1), Some(5))?;
    r.fault_only(vb[2], gva_of(FOREIGN_GFN + 2), false)?;
    r.speculate(vb[2])?;
    for i in 0..3u64 {
        let acc = r.mmu_unmap_foreign(b, FOREIGN_GFN + i)?;
        accessed_is(r, acc, true, "a walked foreign leaf is reported accessed")?;
    }
    Ok(())
}

fn leaves_dropped_by_a_zap_are_reported(r: &mut Rig<'_>) -> Res<()> {
    let (a, b, _, vb) = two(r)?;
    let m = r.mmu_map_foreign(b, FOREIGN_GFN, a, FIRST_DATA_GFN, false)?;
    done(r, m, "MapForeign")?;
    r.access(vb[0], gva_of(FOREIGN_GFN), None)?;
    r.access(vb[1], gva_of(FOREIGN_GFN), None)?;
    let z = r.mmu_request(b, &MmuRequest::ZapAll { domain: r.id(b) })?;
    done(r, z, "ZapAll")?;
    // More faults, so a lazy server cleans what the zap left.
    for g in 0..8 {
        r.access(vb[0], gva_of(FIRST_DATA_GFN + g), None)?;
    }
    let acc = r.mmu_unmap_foreign(b, FOREIGN_GFN)?;
    accessed_is(r, acc, true, "an accessed leaf dropped before the unmap")
}

fn read_only_foreign_frame(r: &mut Rig<'_>) -> Res<()> {
    let (a, b, va, vb) = two(r)?;
    r.access(va, gva_of(FIRST_DATA_GFN + 1), Some(0x77))?;
    let m = r.mmu_map_foreign(b, FOREIGN_GFN, a, FIRST_DATA_GFN + 1, false)?;
    done(r, m, "MapForeign")?;
    let got = r.access(vb[0], gva_of(FOREIGN_GFN), None)?;
    r.expect_read(got, 0x77, "read through a read-only foreign mapping")?;
    let w = r.access(vb[1], gva_of(FOREIGN_GFN), Some(1))?;
    r.expect_fault(w, "write through a read-only foreign mapping")?;
    r.mmu_unmap_foreign(b, FOREIGN_GFN)?;
    Ok(())
}

fn gfn_moves_to_another_frame(r: &mut Rig<'_>) -> Res<()> {
    let (a, b, va, vb) = two(r)?;
    for i in 0..4u64 {
        r.access(va, gva_of(FIRST_DATA_GFN + i), Some(0x100 + i))?;
    }
    for round in 0..8u64 {
        let i = round % 4;
        let m = r.mmu_map_foreign(b, FOREIGN_GFN, a, FIRST_DATA_GFN + i, round % 2 == 0)?;
        done(r, m, "MapForeign")?;
        if round % 3 != 2 {
            let got = r.access(vb[(round % 3) as usize], gva_of(FOREIGN_GFN), None)?;
            r.expect_read(got, 0x100 + i, "the frame mapped now")?;
        }
        r.mmu_unmap_foreign(b, FOREIGN_GFN)?;
    }
    Ok(())
}

fn foreign_request_errors(r: &mut Rig<'_>) -> Res<()> {
    let (a, b, _, vb) = two(r)?;
    let (ida, idb) = (r.id(a), r.id(b));
    let m = r.mmu_map_foreign(b, FIRST_DATA_GFN, a, FIRST_DATA_GFN, true)?;
    error(r, m, MmuError::GfnInUse(Gfn(FIRST_DATA_GFN)))?;
    let m = r.mmu_map_foreign(b, FOREIGN_GFN, a, FIRST_DATA_GFN, true)?;
    done(r, m, "MapForeign")?;
    let m = r.mmu_map_foreign(b, FOREIGN_GFN, a, FIRST_DATA_GFN + 1, true)?;
    error(r, m, MmuError::GfnInUse(Gfn(FOREIGN_GFN)))?;
    // b's own frame named as a's.
    let theirs = Mfn(r.mfn(b, FIRST_DATA_GFN));
    let req = MmuRequest::MapForeign {
        domain: idb,
        gfn: Gfn(FOREIGN_GFN + 1),
        owner: ida,
        mfn: theirs,
        writable: false,
    };
    let m = r.mmu_request(b, &req)?;
    error(
        r,
        m,
        MmuError::NotOwnedBy {
            mfn: theirs,
            owner: ida,
        },
    )?;
    let req = MmuRequest::UnmapForeign {
        domain: idb,
        gfn: Gfn(FOREIGN_GFN + 1),
    };
    let u = r.mmu_request(b, &req)?;
    error(r, u, MmuError::NotForeignMapped(Gfn(FOREIGN_GFN + 1)))?;
    let req = MmuRequest::UnmapForeign {
        domain: DomainId(0x7777),
        gfn: Gfn(FOREIGN_GFN),
    };
    let u = r.mmu_request(b, &req)?;
    error(r, u, MmuError::UnknownDomain(DomainId(0x7777)))?;
    // The owner cannot be destroyed while its frame is mapped.
    let req = MmuRequest::DestroyDomain { domain: ida };
    let d = r.mmu_request(a, &req)?;
    error(
        r,
        d,
        MmuError::FramesMapped {
            mapper: idb,
            gfn: Gfn(FOREIGN_GFN),
        },
    )?;
    r.access(vb[0], gva_of(FOREIGN_GFN), Some(9))?;
    r.mmu_unmap_foreign(b, FOREIGN_GFN)?;
    Ok(())
}
