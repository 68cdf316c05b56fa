//! The invariant audit (P1, P2, R1, W1, D1, Z1 of the module docs), run by the
//! tests after every step.

use super::*;

impl<P: L4Policy> FastServer<'_, P> {
    /// Checks invariants P1, P2 (parents), R1 (rmaps), W1 (write protection),
    /// D1 (dirty large pages) and Z1 (generations) over every domain; returns the first violation.
    pub fn audit(&self) -> Result<(), alloc::string::String> {
        use alloc::format;
        let inner = self.inner.lock();
        let mem: &dyn PhysMem = self.mem;
        for (&did, d) in &inner.domains {
            let mut parents: BTreeMap<u32, BTreeSet<u64>> = BTreeMap::new();
            let mut rmaps: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
            for &id in &d.active {
                let sp = &inner.sps[id as usize];
                if !sp.live || sp.gen != d.gen || sp.domain != did {
                    return Err(format!(
                        "active sp {id} is dead or of another generation/domain"
                    ));
                }
                for i in 0..ENTRIES {
                    let at = entry_at(sp.frame, i);
                    let v = mem.read_u64(at).map_err(|e| format!("{e}"))?;
                    if v & SPTE_P == 0 {
                        continue;
                    }
                    if sp.role.level() == 1 {
                        let frame = spte_frame(v);
                        if mfn_to_gfn(&d.shared.memory, frame).is_none() {
                            // F1, F2: a foreign leaf, listed, never
                            // lockless-writable.
                            let listed = d
                                .foreign
                                .leaves
                                .get(&frame.0)
                                .is_some_and(|s| s.contains(&at.0));
                            if !listed || v & SPTE_FAST_W != 0 {
                                return Err(format!(
                                    "F1/F2: sp {id} entry {i} maps {v:#x} outside the guest \
                                     (listed as a foreign leaf: {listed})"
                                ));
                            }
                            continue;
                        }
                        let gfn = mfn_to_gfn(&d.shared.memory, frame).ok_or_else(|| {
                            format!("sp {id} entry {i} maps {v:#x} outside the guest")
                        })?;
                        rmaps.entry(gfn.0).or_default().insert(at.0);
                        if v & (SPTE_W | SPTE_FAST_W) != 0 && d.pt.contains_key(&gfn.0) {
                            return Err(format!(
                                "W1: sp {id} entry {i} writable to page table gfn {}",
                                gfn.0
                            ));
                        }
                        if v & (SPTE_W | SPTE_FAST_W) != 0
                            && sp.role.direct()
                            && !sp.role.access().0
                        {
                            return Err(format!(
                                "D1: sp {id} entry {i} writable in a direct page of a clean \
                                 or read-only large page (gfn {})",
                                gfn.0
                            ));
                        }
                    } else {
                        let child = *inner.by_frame.get(&spte_frame(v).0).ok_or_else(|| {
                            format!("sp {id} entry {i} links a non-shadow frame {v:#x}")
                        })?;
                        let c = &inner.sps[child as usize];
                        if !c.live || c.gen != d.gen {
                            return Err(format!(
                                "Z1: sp {id} entry {i} links dead/obsolete sp {child}"
                            ));
                        }
                        parents.entry(child).or_default().insert(at.0);
                    }
                }
            }
            for &id in &d.active {
                let sp = &inner.sps[id as usize];
                let listed: BTreeSet<u64> =
                    d.pool.collect(&sp.parents).iter().map(|h| h.0).collect();
                let real = parents.remove(&id).unwrap_or_default();
                if listed != real {
                    return Err(format!(
                        "P1: sp {id} parents {listed:x?} but linked from {real:x?}"
                    ));
                }
            }
            for (gfn, head) in &d.rmap {
                let listed: BTreeSet<u64> = d.pool.collect(head).iter().map(|h| h.0).collect();
                let real = rmaps.remove(gfn).unwrap_or_default();
                // Obsolete entries may linger in the rmap until reclaimed.
                if !real.is_subset(&listed) {
                    return Err(format!("R1: gfn {gfn} rmap {listed:x?} misses {real:x?}"));
                }
            }
            if let Some((gfn, _)) = rmaps.into_iter().find(|(_, s)| !s.is_empty()) {
                return Err(format!("R1: gfn {gfn} mapped but has no rmap"));
            }
            // F1: every listed foreign leaf is a present leaf of its frame.
            for (&mfn, set) in &d.foreign.leaves {
                for &at in set {
                    let v = mem.read_u64(Hpa(at)).map_err(|e| format!("{e}"))?;
                    if v & SPTE_P == 0 || spte_frame(v).0 != mfn {
                        return Err(format!(
                            "F1: foreign leaf {at:#x} of frame {mfn:#x} is {v:#x}"
                        ));
                    }
                }
            }
        }
        // P2: every root in use is live and pinned by exactly its users.
        let mut users: BTreeMap<u32, u32> = BTreeMap::new();
        for v in inner.vcpus.values() {
            if let Some(r) = v.root {
                *users.entry(r).or_default() += 1;
            }
        }
        for (&id, &n) in &users {
            let sp = &inner.sps[id as usize];
            let current = inner
                .domains
                .get(&sp.domain)
                .is_some_and(|d| d.gen == sp.gen);
            if current && (!sp.live || sp.roots != n) {
                return Err(format!(
                    "P2: root sp {id} live={} pinned {} times, used by {n}",
                    sp.live, sp.roots
                ));
            }
        }
        Ok(())
    }
}
