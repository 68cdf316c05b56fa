//! Prefetching shadow leaves: on an emulated write of a guest PTE and around
//! a shadow miss (KVM's pte_prefetch), under the rules in the module docs.

use super::*;
use walk::{reserved_bits, G_A, G_ADDR, G_D, G_NX, G_P, G_U, G_W};

/// A guest leaf as a prefetch sees it: its frame and effective rights.
#[derive(Clone, Copy, Debug)]
pub(super) struct Leaf {
    pub(super) gfn: u64,
    pub(super) w: bool,
    pub(super) u: bool,
    pub(super) nx: bool,
    /// The guest's D bit is set (a writable shadow is allowed).
    pub(super) dirty: bool,
}

/// The leaf guest entry `gpte` of a table shadowed by a level-1 indirect
/// page of role `role`, if a prefetch may shadow it: present, A already
/// set (so no guest-visible A/D bit depends on it), no reserved bit, and
/// its frame inside `memory`.
pub(super) fn leaf_of(role: Role, gpte: u64, memory: &MemoryMap, maxphyaddr: u8) -> Option<Leaf> {
    if gpte & (G_P | G_A) != G_P | G_A {
        return None;
    }
    let mode = role.mode();
    if reserved_bits(1, gpte, mode, maxphyaddr) != 0 {
        return None;
    }
    let gfn = (gpte & G_ADDR) >> 12;
    gfn_to_mfn(memory, Gfn(gfn))?;
    let (w, u, nx) = role.access();
    Some(Leaf {
        gfn,
        w: w && gpte & G_W != 0,
        u: u && gpte & G_U != 0,
        nx: nx || (mode.nxe() && gpte & G_NX != 0),
        dirty: gpte & G_D != 0,
    })
}

impl<P: L4Policy> Inner<P> {
    /// Installs `leaf` at entry `idx` of the level-1 page `id` of `did` if
    /// that entry is not present (so no flush is owed): the frame must be
    /// in the memory map; writable only if the guest's D bit is set and the
    /// frame is not a page table, and then as [`FastServer`]'s install does
    /// for a read (dirty logging: read-only or D clear). Adds the entry to
    /// the rmap (R1). Returns whether it installed.
    pub(super) fn prefetch_install(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        did: u32,
        id: u32,
        idx: u64,
        leaf: Leaf,
    ) -> bool {
        let frame = self.sps[id as usize].frame;
        let dirty_mode = self.dirty_mode;
        let Some(d) = self.domains.get_mut(&did) else {
            return false;
        };
        let Some(mfn) = gfn_to_mfn(&d.shared.memory, Gfn(leaf.gfn)) else {
            return false;
        };
        let at = entry_at(frame, idx);
        let old = match mem.read_u64(at) {
            Ok(v) if v & SPTE_P == 0 => v,
            _ => return false,
        };
        let logging = d.shared.logging.load(Ordering::SeqCst);
        let is_pt = d.pt.contains_key(&leaf.gfn);
        let mut spte = mfn.base().0 | SPTE_P | SPTE_A;
        if leaf.u {
            spte |= SPTE_U;
        }
        if leaf.nx {
            spte |= SPTE_NX;
        }
        if leaf.w && leaf.dirty && !is_pt {
            spte |= SPTE_FAST_W;
            match (logging, dirty_mode) {
                (false, _) => spte |= SPTE_W | SPTE_D,
                (true, DirtyMode::DirtyBits) => spte |= SPTE_W,
                // Read-only until the first write, which the fast path
                // fixes and logs.
                (true, DirtyMode::WriteProtect) => {}
            }
        }
        if !matches!(mem.compare_exchange_u64(at, old, spte), Ok(Ok(_))) {
            return false;
        }
        let h = d.rmap.entry(leaf.gfn).or_default();
        d.pool.add(h, at);
        stats.prefetched.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// After a shadow miss filled entry `idx` of the level-1 page `id`
    /// (walk `w`), fills the other not-present entries of its aligned
    /// [`PREFETCH_WINDOW`] whose guest entries allow it ([`leaf_of`]); for
    /// a direct page (a split guest large page) the guest entry is the
    /// large one the walk just set A (and D, if dirty) on.
    pub(super) fn prefetch_neighbours(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        did: u32,
        id: u32,
        idx: u64,
        w: &walk::Walk,
    ) {
        let (role, base_gfn) = {
            let sp = &self.sps[id as usize];
            (sp.role, sp.gfn)
        };
        if role.level() != 1 {
            return;
        }
        let table = if role.direct() {
            None
        } else {
            match gfn_to_mfn(&self.domains[&did].shared.memory, w.tables[1]) {
                Some(m) => Some(m),
                None => return,
            }
        };
        let first = idx & !(PREFETCH_WINDOW - 1);
        for i in first..first + PREFETCH_WINDOW {
            if i == idx {
                continue;
            }
            let leaf = match table {
                // Every leaf of a direct page has the role's access (D1;
                // U too, which CR0.WP=0 may have taken away).
                None => Some(Leaf {
                    gfn: base_gfn + i,
                    w: role.access().0,
                    u: role.access().1,
                    nx: role.access().2,
                    dirty: w.dirty,
                }),
                Some(t) => match mem.read_u64(entry_at(t, i)) {
                    Ok(g) => leaf_of(role, g, &self.domains[&did].shared.memory, self.maxphyaddr),
                    Err(_) => None,
                },
            };
            if let Some(leaf) = leaf {
                self.prefetch_install(mem, stats, did, id, i, leaf);
            }
        }
    }
}
