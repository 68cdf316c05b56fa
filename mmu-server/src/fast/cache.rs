//! The shadow page cache: lookup and creation by (gfn, role), linking,
//! zapping (one entry, one page, everything by generation) and the lazy,
//! acknowledged freeing of frames.

use super::*;

impl<P: L4Policy> Inner<P> {
    pub(super) fn dom(&mut self, d: DomainId) -> Result<&mut Domain, MmuError> {
        self.domains.get_mut(&d.0).ok_or(MmuError::UnknownDomain(d))
    }

    /// Whether every pCPU a pending batch waits for has made a later request.
    pub(super) fn acked(&self, p: &Pending) -> bool {
        p.need.iter().all(|c| self.last_seq[c.0 as usize] > p.seq)
    }

    /// Queues `sps` (already cleaned, or obsolete with `pt`) for freeing
    /// once the current request's flush is acknowledged.
    pub(super) fn defer(
        &mut self,
        did: u32,
        sps: BTreeSet<u32>,
        cleaned: bool,
        pt: BTreeMap<u64, u32>,
    ) {
        let need = match self.requester {
            Some(p) => CpuSet::single(p),
            None => self.flush.0.map_or(CpuSet::EMPTY, |f| f.cpus),
        };
        let seq = self.seq;
        if let Some(d) = self.domains.get_mut(&did) {
            d.pending.push_back(Pending {
                seq,
                need,
                sps,
                cleaned,
                pt,
            });
        }
    }

    /// Frees up to `budget` acknowledged pending pages of `did`; returns how
    /// many frames went back to the pool.
    pub(super) fn reclaim(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        did: u32,
        mut budget: usize,
    ) -> usize {
        let mut freed = 0;
        let mut synced = false;
        loop {
            let Some(d) = self.domains.get(&did) else {
                return freed;
            };
            let Some(front) = d.pending.front() else {
                return freed;
            };
            if budget == 0 || !self.acked(front) {
                return freed;
            }
            if !synced {
                // G1: no fast fault may still walk a frame we free.
                d.shared.gate.synchronize(core::hint::spin_loop);
                synced = true;
            }
            let d = self.domains.get_mut(&did).expect("checked above");
            let front = d.pending.front_mut().expect("checked above");
            // Drop obsolete page-table counts in bounded steps too.
            for _ in 0..RECLAIM_BATCH {
                if front.pt.pop_first().is_none() {
                    break;
                }
            }
            let Some(id) = front.sps.pop_first() else {
                if front.pt.is_empty() {
                    d.pending.pop_front();
                }
                continue;
            };
            let cleaned = front.cleaned;
            budget -= 1;
            let sp = &self.sps[id as usize];
            let (frame, key, level) = (sp.frame, (sp.gen, sp.gfn, sp.role), sp.role.level());
            if !cleaned {
                if level == 1 {
                    for i in 0..ENTRIES {
                        let at = entry_at(frame, i);
                        let v = mem.read_u64(at).unwrap_or(0);
                        if v & SPTE_P != 0 {
                            let dbits = self.dirty_mode == DirtyMode::DirtyBits;
                            if dbits && v & SPTE_D != 0 && d.shared.logging.load(Ordering::SeqCst) {
                                if let Some(g) = mfn_to_gfn(&d.shared.memory, spte_frame(v)) {
                                    d.shared.mark(g.0);
                                }
                            }
                            foreign::forget_leaf(d, at, v);
                        }
                    }
                }
                if d.cache.get(&key) == Some(&id) {
                    d.cache.remove(&key);
                }
                let mut parents = self.sps[id as usize].parents;
                d.pool.clear(&mut parents);
            }
            self.by_frame.remove(&frame.0);
            // P2: a vCPU still naming this (obsolete) page as its root must
            // not find it again once the id is reused by a new page: it
            // would take the new page for the root it already pins.
            if self.sps[id as usize].roots > 0 {
                for v in self.vcpus.values_mut() {
                    if v.root == Some(id) {
                        v.root = None;
                    }
                }
                self.sps[id as usize].roots = 0;
            }
            self.sps[id as usize].live = false;
            self.sps[id as usize].parents = Head::Empty;
            self.free_ids.push(id);
            if mem.free_frame(frame).is_ok() {
                freed += 1;
                stats.sp_freed.fetch_add(1, Ordering::Relaxed);
                self.count(did, |c| &c.shadow_pages_freed);
            }
        }
    }

    pub(super) fn alloc_frame(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        did: u32,
    ) -> Result<Mfn, MmuError> {
        if let Some(f) = mem.alloc_frame() {
            return Ok(f);
        }
        let ids: Vec<u32> = self.domains.keys().copied().collect();
        for d in core::iter::once(did).chain(ids) {
            if self.reclaim(mem, stats, d, usize::MAX) > 0 {
                self.count(did, |c| &c.reclaims);
                if let Some(f) = mem.alloc_frame() {
                    return Ok(f);
                }
            }
        }
        // Private L4 copies of pCPUs that run nothing (or only the
        // requester, which walks nothing while in the exit).
        let mut idle = CpuSet(u64::MAX);
        for v in self.vcpus.values() {
            if let Some(p) = v.pcpu {
                if Some(p) != self.requester {
                    idle.remove(p);
                }
            }
        }
        if self.policy.release_idle(mem, idle) > 0 {
            self.count(did, |c| &c.reclaims);
            if let Some(f) = mem.alloc_frame() {
                return Ok(f);
            }
        }
        Err(MmuError::OutOfShadowMemory(DomainId(did)))
    }

    /// Finds or creates the shadow page `(gfn, role)` of `did`.
    pub(super) fn get_sp(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        did: u32,
        gfn: u64,
        role: Role,
    ) -> Result<u32, MmuError> {
        let d = self.dom(DomainId(did))?;
        let gen = d.gen;
        if let Some(&id) = d.cache.get(&(gen, gfn, role)) {
            self.sps[id as usize].flood = 0;
            return Ok(id);
        }
        let frame = self.alloc_frame(mem, stats, did)?;
        if let Err(e) = mem.zero_frame(frame) {
            let _ = mem.free_frame(frame);
            return Err(e.into());
        }
        let sp = Sp {
            live: true,
            frame,
            gfn,
            role,
            gen,
            domain: did,
            parents: Head::Empty,
            roots: 0,
            flood: 0,
        };
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.sps[id as usize] = sp;
                id
            }
            None => {
                self.sps.push(sp);
                (self.sps.len() - 1) as u32
            }
        };
        self.by_frame.insert(frame.0, id);
        stats.sp_created.fetch_add(1, Ordering::Relaxed);
        self.count_created(did);
        let d = self.dom(DomainId(did))?;
        d.cache.insert((gen, gfn, role), id);
        d.active.insert(id);
        if !role.direct() {
            let c = d.pt.entry(gfn).or_insert(0);
            *c += 1;
            if *c == 1 {
                self.write_protect(mem, did, gfn, true);
            }
        }
        Ok(id)
    }

    pub(super) fn root_ref(&self, id: u32) -> RootRef {
        let sp = &self.sps[id as usize];
        RootRef {
            sp: id,
            gen: sp.gen,
            domain: sp.domain,
            frame: sp.frame,
        }
    }

    /// Sets entry `idx` of non-leaf page `pid` (`value` 0 to clear),
    /// keeping per-pCPU L4 copies in sync; returns the replaced value.
    pub(super) fn set_link(&mut self, mem: &dyn PhysMem, pid: u32, idx: u64, value: u64) -> u64 {
        let sp = &self.sps[pid as usize];
        let at = entry_at(sp.frame, idx);
        let old = update_leaf(&PhysCell { mem, at }, |_| value);
        if sp.role.level() == 4 {
            let r = self.root_ref(pid);
            let copies = self.policy.l4_written(mem, r, idx as usize, value);
            if needs_flush(old, value) && !copies.is_empty() {
                let mask = self
                    .domains
                    .get(&r.domain)
                    .map_or(CpuSet::EMPTY, |d| d.dirty_mask);
                self.flush.add(copies.intersection(mask), FlushScope::All);
            }
        }
        old
    }

    /// Clears entry `idx` of page `id` and undoes what it referenced.
    pub(super) fn zap_entry(&mut self, mem: &dyn PhysMem, id: u32, idx: u64) {
        let (frame, level, did) = {
            let sp = &self.sps[id as usize];
            (sp.frame, sp.role.level(), sp.domain)
        };
        let at = entry_at(frame, idx);
        if mem.read_u64(at).unwrap_or(0) & SPTE_P == 0 {
            return;
        }
        let old = if level == 1 {
            update_leaf(&PhysCell { mem, at }, |_| 0)
        } else {
            self.set_link(mem, id, idx, 0)
        };
        if old & SPTE_P == 0 {
            return;
        }
        if level == 1 {
            self.leaf_gone(did, old);
        }
        let Some(d) = self.domains.get_mut(&did) else {
            return;
        };
        let mask = d.dirty_mask;
        self.flush.add(mask, FlushScope::All);
        if level == 1 {
            foreign::forget_leaf(d, at, old);
        } else if let Some(&child) = self.by_frame.get(&spte_frame(old).0) {
            let d = self.domains.get_mut(&did).expect("looked up above");
            let c = &mut self.sps[child as usize];
            d.pool.remove(&mut c.parents, at);
            if c.parents == Head::Empty && c.roots == 0 && c.role.level() < 4 {
                self.zap_sp(mem, child);
            }
        }
    }

    /// Unshadows page `id`: clears its entries, unlinks it from its parents
    /// and queues its frame for freeing after the flush is acknowledged.
    /// The page stops being live at once, so a second zap of it (a page
    /// zapped as the child of another one that an emulated write zaps in
    /// the same request) does nothing: queued twice, its frame would be
    /// freed twice.
    pub(super) fn zap_sp(&mut self, mem: &dyn PhysMem, id: u32) {
        if !self.sps[id as usize].live {
            return;
        }
        self.sps[id as usize].live = false;
        for i in 0..ENTRIES {
            self.zap_entry(mem, id, i);
        }
        let (did, key, direct, frame) = {
            let sp = &self.sps[id as usize];
            (
                sp.domain,
                (sp.gen, sp.gfn, sp.role),
                sp.role.direct(),
                sp.frame,
            )
        };
        let Some(d) = self.domains.get_mut(&did) else {
            return;
        };
        let parents = d.pool.collect(&self.sps[id as usize].parents);
        for at in parents {
            if let Some(&pid) = self.by_frame.get(&(at.0 >> 12)) {
                self.set_link(mem, pid, (at.0 & 0xfff) / 8, 0);
            }
        }
        let d = self.domains.get_mut(&did).expect("looked up above");
        let mut parents = self.sps[id as usize].parents;
        d.pool.clear(&mut parents);
        self.sps[id as usize].parents = Head::Empty;
        let mask = d.dirty_mask;
        d.cache.remove(&key);
        d.active.remove(&id);
        if !direct {
            if let Some(c) = d.pt.get_mut(&key.1) {
                *c -= 1;
                if *c == 0 {
                    d.pt.remove(&key.1);
                }
            }
        }
        let _ = frame;
        self.flush.add(mask, FlushScope::All);
        self.defer(did, BTreeSet::from([id]), true, BTreeMap::new());
    }

    /// O(1) zap of every shadow of `did` (seed 004).
    pub(super) fn zap_all(&mut self, did: u32) {
        let Some(d) = self.domains.get_mut(&did) else {
            return;
        };
        d.gen += 1;
        let sps = core::mem::take(&mut d.active);
        let pt = core::mem::take(&mut d.pt);
        let mask = d.dirty_mask;
        self.policy.forget_domain(did);
        self.flush.add(mask, FlushScope::AllReloadRoots);
        self.defer(did, sps, false, pt);
    }
}
