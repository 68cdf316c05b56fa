//! Foreign frames (grant mappings) in the fast server: `MapForeign`,
//! `UnmapForeign`, and the bookkeeping that makes the unmap's accessed
//! report exact.
//!
//! # Rules
//! - A foreign frame is mapped at a gfn outside the domain's memory map
//!   (`Domain::foreign`); the guest walk may end in it, never walk a page
//!   table in it (see [`super::walk`]).
//! - **F1 leaves**: every present leaf of a foreign frame is listed in
//!   `Domain::fleaves` under its mfn, and only those (checked by the audit).
//!   Foreign leaves are not in the gfn rmaps (whose gfn is derived from the
//!   mfn through the memory map, which never changes) and are not prefetched.
//! - **F2 created unaccessed**: a foreign leaf is installed with A and D
//!   clear, writable only if the mapping, the guest's entry (and its D bit)
//!   allow it, and **never lockless-writable** ([`SPTE_FAST_W`] clear): the
//!   lockless fast page fault acts only on entries with that bit, and
//!   derives a gfn only through the memory map (a foreign mfn has none), so
//!   a foreign mapping that comes and goes (gfn -> mfn changing under a
//!   fast fault, the ABA the fast-page-fault review worried about) can
//!   never be seen by it. `mmu-server/tests/fast_loom.rs` models the race
//!   and shows what breaks if either rule is dropped.
//! - **F3 accessed is never lost**: `UnmapForeign` clears the leaves with an
//!   atomic swap and ORs their A bits; any other path that drops a foreign
//!   leaf (zap, replacement, obsolete page cleanup) while it has A set
//!   records it in the mapping (`dropped`, with the dirty mask then), so
//!   the unmap reports it even if that path's flush is not yet carried out.

use super::lockless::{needs_flush, SPTE_NX, SPTE_U};
use super::lockless::{update_leaf, SPTE_A, SPTE_FAST_W, SPTE_P};
use super::policy::L4Policy;
use super::rmap::Head;
use super::walk::Walk;
use super::walk::{gfn_to_mfn, mfn_to_gfn};
use super::{entry_at, spte_frame, BTreeMap, BTreeSet, Domain, FlushScope, Inner, PhysCell};
use abi::mmu::{MmuError, MmuReply, Resource};
use abi::{CpuSet, DomainId, Gfn, Hpa, Mfn, PhysMem};

/// Guest frames at or above this cannot hold a foreign mapping.
const MAX_GUEST_FRAME: u64 = 1 << 40;

/// A foreign frame mapped into a domain.
#[derive(Debug, Clone, Copy)]
pub(super) struct Foreign {
    owner: u32,
    pub(super) mfn: Mfn,
    pub(super) writable: bool,
    /// Leaves of the frame dropped with A set before the unmap, and the
    /// pCPUs that may cache them (F3).
    dropped: Option<CpuSet>,
}

/// The foreign state of one domain.
#[derive(Debug, Default)]
pub(super) struct ForeignMaps {
    /// gfn -> mapping.
    pub(super) by_gfn: BTreeMap<u64, Foreign>,
    /// mfn -> the host addresses of the leaves mapping it (F1).
    pub(super) leaves: BTreeMap<u64, BTreeSet<u64>>,
}

impl ForeignMaps {
    /// The frame mapped at `gfn` and whether it is writable.
    pub(super) fn at(&self, gfn: Gfn) -> Option<(Mfn, bool)> {
        self.by_gfn.get(&gfn.0).map(|f| (f.mfn, f.writable))
    }
}

/// The present leaf `old` at `at` of domain `d` was dropped or replaced (by
/// any path but the unmap): takes it out of its gfn's rmap (R1) or, for a
/// foreign frame, out of the foreign leaves (F1), remembering its A bit
/// (F3).
pub(super) fn forget_leaf(d: &mut Domain, at: Hpa, old: u64) {
    let mfn = spte_frame(old);
    if old & SPTE_P == 0 {
        return;
    }
    if let Some(g) = mfn_to_gfn(&d.shared.memory, mfn) {
        if let Some(h) = d.rmap.get_mut(&g.0) {
            d.pool.remove(h, at);
            if *h == Head::Empty {
                d.rmap.remove(&g.0);
            }
        }
        return;
    }
    let f = &mut d.foreign;
    if let Some(set) = f.leaves.get_mut(&mfn.0) {
        set.remove(&at.0);
        if set.is_empty() {
            f.leaves.remove(&mfn.0);
        }
    }
    if old & SPTE_A != 0 {
        let mask = d.dirty_mask;
        for m in f.by_gfn.values_mut().filter(|m| m.mfn == mfn) {
            m.dropped = Some(m.dropped.unwrap_or(CpuSet::EMPTY).union(mask));
        }
    }
}

/// The leaf bits for foreign frame `mfn` (F2): A, D and the lockless W
/// clear; W only if `writable`.
pub(super) fn leaf_bits(mfn: Mfn, writable: bool) -> u64 {
    let w = if writable { super::lockless::SPTE_W } else { 0 };
    (mfn.base().0 | SPTE_P | w) & !(SPTE_A | SPTE_FAST_W)
}

impl<P: L4Policy> Inner<P> {
    /// Installs the leaf for a walk `w` that ended in a foreign frame, in
    /// level-1 shadow page `sp` (F1, F2). `wr`, `u`: the access the guest's
    /// entries give.
    // The arguments are `install`'s.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install_foreign(
        &mut self,
        mem: &dyn PhysMem,
        did: u32,
        sp: u32,
        w: &Walk,
        gva: abi::Gva,
        wr: bool,
        u: bool,
    ) -> Result<(), MmuError> {
        let at = entry_at(self.sps[sp as usize].frame, gva.table_index(1) as u64);
        let d = self
            .domains
            .get_mut(&did)
            .ok_or(MmuError::UnknownDomain(DomainId(did)))?;
        let (mfn, may_write) = d
            .foreign
            .at(w.gfn)
            .ok_or(MmuError::GpaNotInMemory(w.gfn.base()))?;
        let mut spte = leaf_bits(mfn, wr && w.dirty && may_write);
        if u {
            spte |= SPTE_U;
        }
        if w.nx {
            spte |= SPTE_NX;
        }
        let old = update_leaf(&PhysCell { mem, at }, |_| spte);
        if old & SPTE_P != 0 {
            self.leaf_gone(did, old);
        }
        let d = self
            .domains
            .get_mut(&did)
            .ok_or(MmuError::UnknownDomain(DomainId(did)))?;
        forget_leaf(d, at, old);
        d.foreign.leaves.entry(mfn.0).or_default().insert(at.0);
        let mask = d.dirty_mask;
        if needs_flush(old, spte) {
            self.flush.add(mask, FlushScope::Page(gva));
        }
        Ok(())
    }

    /// `MapForeign`.
    pub(super) fn map_foreign(
        &mut self,
        domain: DomainId,
        gfn: Gfn,
        owner: DomainId,
        mfn: Mfn,
        writable: bool,
    ) -> MmuReply {
        let Some(o) = self.domains.get(&owner.0) else {
            return MmuReply::error(MmuError::UnknownDomain(owner));
        };
        if mfn_to_gfn(&o.shared.memory, mfn).is_none() {
            return MmuReply::error(MmuError::NotOwnedBy { mfn, owner });
        }
        let Some(d) = self.domains.get_mut(&domain.0) else {
            return MmuReply::error(MmuError::UnknownDomain(domain));
        };
        if gfn.0 >= MAX_GUEST_FRAME {
            return MmuReply::error(MmuError::GpaNotInMemory(gfn.base()));
        }
        if gfn_to_mfn(&d.shared.memory, gfn).is_some() || d.foreign.by_gfn.contains_key(&gfn.0) {
            return MmuReply::error(MmuError::GfnInUse(gfn));
        }
        if d.foreign.by_gfn.len() >= crate::MAX_FOREIGN_PER_DOMAIN as usize {
            return MmuReply::error(MmuError::CapacityExceeded {
                what: Resource::ForeignMaps,
                limit: crate::MAX_FOREIGN_PER_DOMAIN,
            });
        }
        d.foreign.by_gfn.insert(
            gfn.0,
            Foreign {
                owner: owner.0,
                mfn,
                writable,
                dropped: None,
            },
        );
        MmuReply::Done { flush: None }
    }

    /// `UnmapForeign`: swaps every leaf of the frame to 0 (F3).
    pub(super) fn unmap_foreign(
        &mut self,
        mem: &dyn PhysMem,
        domain: DomainId,
        gfn: Gfn,
    ) -> MmuReply {
        let Some(d) = self.domains.get_mut(&domain.0) else {
            return MmuReply::error(MmuError::UnknownDomain(domain));
        };
        let Some(f) = d.foreign.by_gfn.remove(&gfn.0) else {
            return MmuReply::error(MmuError::NotForeignMapped(gfn));
        };
        let mut accessed = f.dropped.is_some();
        let mut cpus = d.dirty_mask.union(f.dropped.unwrap_or(CpuSet::EMPTY));
        // Every leaf of the frame goes, also those made for another gfn
        // mapping the same frame (they refault): dropping shadow entries
        // is always allowed, and the report stays conservative.
        for at in d.foreign.leaves.remove(&f.mfn.0).unwrap_or_default() {
            let old = update_leaf(&PhysCell { mem, at: Hpa(at) }, |_| 0);
            if old & SPTE_P != 0 {
                accessed |= old & SPTE_A != 0;
            }
        }
        // Other gfns mapping the frame lost their leaves with their A bits:
        // they inherit this report.
        if accessed {
            for m in d.foreign.by_gfn.values_mut().filter(|m| m.mfn == f.mfn) {
                m.dropped = Some(m.dropped.unwrap_or(CpuSet::EMPTY).union(d.dirty_mask));
            }
        }
        cpus = cpus.union(d.dirty_mask);
        MmuReply::ForeignUnmapped {
            mfn: f.mfn,
            accessed,
            cpus,
            flush: None,
        }
    }

    /// The first domain other than `owner` mapping one of `owner`'s frames
    /// (what `DestroyDomain` of `owner` refuses while it lasts).
    pub(super) fn mapper_of(&self, owner: u32) -> Option<(DomainId, Gfn)> {
        self.domains.iter().find_map(|(&did, d)| {
            (did != owner)
                .then(|| {
                    d.foreign
                        .by_gfn
                        .iter()
                        .find(|(_, f)| f.owner == owner)
                        .map(|(&g, _)| (DomainId(did), Gfn(g)))
                })
                .flatten()
        })
    }
}
