//! Guest exits that build shadows: the slow page fault, loading roots,
//! running out of frames, and emulated writes to shadowed page tables.

use super::*;

impl<P: L4Policy> FastServer<'_, P> {
    pub(super) fn fast_page_fault(
        &self,
        vcpu: VcpuId,
        gva: Gva,
        ec: PfErrorCode,
    ) -> Option<MmuReply> {
        let want = PfErrorCode::P | PfErrorCode::W;
        if ec.0 & (want | PfErrorCode::RSVD | PfErrorCode::I) != want || !gva.is_canonical() {
            return None;
        }
        let map = self.fast.read();
        let v = map.get(&vcpu.0)?;
        let root = v.root.load(Ordering::SeqCst);
        if root == 0 {
            return None;
        }
        let mem: &dyn PhysMem = self.mem;
        let locate = || {
            let mut table = Mfn(root >> 12);
            for level in (2..=4u8).rev() {
                let e = mem
                    .read_u64(entry_at(table, gva.table_index(level) as u64))
                    .ok()?;
                if e & SPTE_P == 0 {
                    return None;
                }
                table = spte_frame(e);
            }
            let at = entry_at(table, gva.table_index(1) as u64);
            let e = mem.read_u64(at).ok()?;
            if ec.is_user() && e & SPTE_U == 0 {
                return None;
            }
            Some(PhysCell { mem, at })
        };
        let memory = &v.dom.memory;
        let out = fast_fix_write(
            &v.dom.gate,
            locate,
            |e| mfn_to_gfn(memory, spte_frame(e)).map(|g| g.0),
            &*v.dom,
        );
        match out {
            // Counted on the domain's own counter line (relaxed).
            FastOutcome::Fixed { .. } | FastOutcome::AlreadyWritable => {
                v.dom.counters.fast_fix();
                Some(MmuReply::Resume { flush: None })
            }
            FastOutcome::NotFast | FastOutcome::Raced => None,
        }
    }
}

impl<P: L4Policy> Inner<P> {
    /// The root page for `vcpu` in the current generation (pinning it).
    pub(super) fn vcpu_root(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        vcpu: u32,
    ) -> Result<u32, MmuError> {
        let v = &self.vcpus[&vcpu];
        let (did, cr3, mode, old) = (v.domain, v.cr3, v.mode, v.root);
        // Paging off: one identity root per domain and mode (a direct page
        // of the whole guest-physical space, keyed by frame 0).
        let (gfn, role) = if mode.paging() {
            (
                cr3.table().frame().0,
                Role::new(4, false, true, true, false, mode),
            )
        } else {
            (0, Role::new(4, true, true, true, false, mode))
        };
        let id = self.get_sp(mem, stats, did, gfn, role)?;
        if old != Some(id) {
            if let Some(o) = old {
                let sp = &mut self.sps[o as usize];
                sp.roots = sp.roots.saturating_sub(1);
            }
            self.sps[id as usize].roots += 1;
            self.vcpus.get_mut(&vcpu).expect("exists").root = Some(id);
        }
        Ok(id)
    }

    /// Loads the vCPU's root on its pCPU: the reply to a schedule, CR3 write
    /// or mode change.
    pub(super) fn load_root(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        vcpu: VcpuId,
        pcpu: PcpuId,
    ) -> MmuReply {
        let id = match self.vcpu_root(mem, stats, vcpu.0) {
            Ok(id) => id,
            Err(e) => return self.fail(vcpu.0, e),
        };
        let r = self.root_ref(id);
        let root = match self.policy.root(mem, pcpu, r) {
            Ok(h) => h,
            Err(e) => return MmuReply::error(e),
        };
        let v = self.vcpus.get_mut(&vcpu.0).expect("exists");
        v.pcpu = Some(pcpu);
        v.fast.store(root.0, Ordering::SeqCst);
        let did = v.domain;
        let epoch = v.epoch;
        if let Some(d) = self.domains.get_mut(&did) {
            d.dirty_mask.insert(pcpu);
        }
        let p = pcpu.0 as usize;
        if self.last_on_pcpu[p] != Some((vcpu.0, epoch)) {
            self.flush.add(CpuSet::single(pcpu), FlushScope::All);
            self.last_on_pcpu[p] = Some((vcpu.0, epoch));
        }
        MmuReply::LoadShadowRoot {
            vcpu,
            root,
            flush: None,
        }
    }

    /// Out of shadow memory: zap the domain (recovery once acknowledged).
    pub(super) fn fail(&mut self, vcpu: u32, e: MmuError) -> MmuReply {
        if let (MmuError::OutOfShadowMemory(_), Some(v)) = (e, self.vcpus.get(&vcpu)) {
            let did = v.domain;
            self.zap_all(did);
            self.count(did, |c| &c.reclaims);
        }
        MmuReply::error(e)
    }

    /// The slow page fault.
    pub(super) fn page_fault(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gva: Gva,
        ec: PfErrorCode,
    ) -> MmuReply {
        let Some(v) = self.vcpus.get(&vcpu.0) else {
            return MmuReply::error(MmuError::UnknownVcpu(vcpu));
        };
        let (did, cr3, mode, cur_root) = (v.domain, v.cr3, v.mode, v.root);
        self.reclaim(mem, stats, did, RECLAIM_BATCH);
        stats.slow_faults.fetch_add(1, Ordering::Relaxed);
        let d = &self.domains[&did];
        let gen = d.gen;
        let shared = d.shared.clone();
        // A root from before a zap: hand out the new one first.
        if cur_root.is_none_or(|r| self.sps[r as usize].gen != gen || !self.sps[r as usize].live) {
            return self.load_root(mem, stats, vcpu, pcpu);
        }
        let root = cur_root.expect("checked above");
        if !gva.is_canonical() {
            return MmuReply::InjectPageFault {
                error_code: ec.access(),
                address: gva,
                flush: None,
            };
        }
        if !mode.paging() && gva.0 >= PAGING_OFF_LIMIT {
            return MmuReply::error(MmuError::FaultOutsideMode(gva));
        }
        let maps = &self.domains[&did].foreign;
        let foreign = |g: Gfn| maps.at(g).is_some();
        let walked = if mode.paging() {
            walk::walk(
                mem,
                &shared.memory,
                &foreign,
                self.maxphyaddr,
                cr3,
                mode,
                gva,
                ec,
            )
        } else {
            walk::identity(&shared.memory, &foreign, gva)
        };
        let logging = shared.logging.load(Ordering::SeqCst);
        let log_walk = |w: &walk::Walk| {
            if logging {
                for l in w.leaf_level..=4 {
                    if w.changed & (1 << l) != 0 {
                        shared.mark(w.tables[l as usize].0);
                    }
                }
            }
        };
        let w = match walked {
            Ok(w) => w,
            Err(WalkError::Mmio(gpa, w)) => {
                log_walk(&w);
                return MmuReply::Mmio {
                    gpa,
                    write: ec.is_write(),
                    flush: None,
                };
            }
            Err(WalkError::Fault(code)) | Err(WalkError::OutsideMemory(code)) => {
                return MmuReply::InjectPageFault {
                    error_code: code,
                    address: gva,
                    flush: Some(FlushObligation {
                        cpus: CpuSet::single(pcpu),
                        scope: FlushScope::Page(gva),
                    }),
                }
            }
            Err(WalkError::Mem(e)) => return MmuReply::error(e.into()),
            // The guest keeps rewriting its entries: let it retry.
            Err(WalkError::Contended) => return MmuReply::Resume { flush: None },
        };
        log_walk(&w);
        if let Some((_, false)) = self.domains[&did].foreign.at(w.gfn) {
            if ec.is_write() && !mode.paging() {
                // No #PF without paging: the write is dropped, as to ROM.
                return MmuReply::Mmio {
                    gpa: Gpa(w.gfn.base().0 | gva.page_offset()),
                    write: true,
                    flush: None,
                };
            }
            if ec.is_write() {
                // A write the foreign mapping does not allow (a read-only
                // grant): the guest gets a protection fault.
                return MmuReply::InjectPageFault {
                    error_code: ec.access().with(PfErrorCode::P),
                    address: gva,
                    flush: None,
                };
            }
        }
        let is_pt = self.domains[&did].pt.contains_key(&w.gfn.0);
        if ec.is_write() && is_pt {
            return MmuReply::EmulateWrite {
                gpa: Gpa(w.gfn.base().0 | gva.page_offset()),
                flush: None,
            };
        }
        match self.install(mem, stats, did, root, &w, gva, ec, mode, logging, is_pt) {
            Ok(()) => MmuReply::Resume { flush: None },
            Err(MmuError::OutOfShadowMemory(_))
                if self.emergency_reclaim(mem, stats, did, pcpu) =>
            {
                // Everything of the domain was zapped and freed: hand out
                // the new root; the access faults again and is served.
                self.load_root(mem, stats, vcpu, pcpu)
            }
            Err(e) => self.fail(vcpu.0, e),
        }
    }

    /// Pool empty while serving pCPU `pcpu`: if no other pCPU runs a vCPU of
    /// `did` (so none can be walking its shadows) and freeing the domain's
    /// shadows can help (more than one walk's worth), zap them and free
    /// their frames at once. Safe because the requester walks nothing while
    /// in the exit and the zap's `AllReloadRoots` obligation, carried out
    /// before it re-enters, flushes every stale cached translation.
    pub(super) fn emergency_reclaim(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        did: u32,
        pcpu: PcpuId,
    ) -> bool {
        let Some(d) = self.domains.get(&did) else {
            return false;
        };
        let others_run = d.vcpus.iter().any(|v| {
            self.vcpus
                .get(v)
                .and_then(|v| v.pcpu)
                .is_some_and(|p| p != pcpu)
        });
        let held = d.active.len() + d.pending.iter().map(|p| p.sps.len()).sum::<usize>();
        if others_run || held <= 4 {
            return false;
        }
        self.zap_all(did);
        let d = self.domains.get_mut(&did).expect("looked up above");
        for p in d.pending.iter_mut() {
            p.need = CpuSet::EMPTY;
        }
        self.reclaim(mem, stats, did, usize::MAX);
        self.count(did, |c| &c.reclaims);
        true
    }

    /// Builds the shadow path for a successful walk and installs the leaf.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn install(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        did: u32,
        root: u32,
        w: &walk::Walk,
        gva: Gva,
        ec: PfErrorCode,
        mode: PagingMode,
        logging: bool,
        is_pt: bool,
    ) -> Result<(), MmuError> {
        // The leaf's access: the guest's, except that with CR0.WP=0 a
        // supervisor write to a read-only page is allowed; it is mapped
        // writable for the supervisor only (as KVM does).
        let (mut wr, mut u) = (w.w, w.u);
        if !w.w && !mode.wp() && ec.is_write() && !ec.is_user() {
            wr = true;
            u = false;
        }
        let mut sp = root;
        self.sps[root as usize].flood = 0;
        for level in (2..=4u8).rev() {
            let idx = gva.table_index(level) as u64;
            let child_level = level - 1;
            let (gfn, role) = if child_level >= w.leaf_level {
                let a = w.acc[level as usize];
                (
                    w.tables[child_level as usize].0,
                    Role::new(child_level, false, a.0, a.1, a.2, mode),
                )
            } else {
                // Inside a guest large page: a direct page of the frames
                // below this entry. Its role is the access of the large
                // page's leaves (with the CR0.WP=0 adjustment above, so
                // every leaf of the page, filled or prefetched, has the
                // role's access). D1: W only if the guest large-page entry
                // is dirty (KVM's FNAME(fetch)), so a clean and a dirty
                // entry mapping the same large page get different shadow
                // pages: a write through the clean one faults, the walk
                // sets its D bit, and the link above is pointed at the
                // writable-role page (zapping the old link, with its
                // flush).
                let span = 1u64 << (9 * (child_level as u32));
                let base = w.gfn.0 & !(span - 1);
                let dw = wr && w.dirty;
                (base, Role::new(child_level, true, dw, u, w.nx, mode))
            };
            let child = self.get_sp(mem, stats, did, gfn, role)?;
            let frame = self.sps[child as usize].frame;
            let want = frame.base().0 | LINK_BITS;
            let at = entry_at(self.sps[sp as usize].frame, idx);
            let cur = mem.read_u64(at)?;
            if cur != want {
                if cur & SPTE_P != 0 {
                    self.zap_entry(mem, sp, idx);
                }
                self.set_link(mem, sp, idx, want);
                let d = self
                    .domains
                    .get_mut(&did)
                    .ok_or(MmuError::UnknownDomain(DomainId(did)))?;
                let c = &mut self.sps[child as usize];
                d.pool.add(&mut c.parents, at);
            }
            sp = child;
        }
        // The leaf. W1: building the path may just have shadowed the leaf's
        // own frame as a table (a guest table that maps itself, or a table
        // of this very walk), write-protecting it: then the leaf is read-only
        // too, and a write retried on it is emulated. A gfn outside the
        // memory map may be a foreign (granted) frame.
        let is_pt = is_pt || self.domains[&did].pt.contains_key(&w.gfn.0);
        let d = &self.domains[&did];
        let Some(mfn) = gfn_to_mfn(&d.shared.memory, w.gfn) else {
            return self.install_foreign(mem, did, sp, w, gva, wr, u);
        };
        let mut spte = mfn.base().0 | SPTE_P | SPTE_A;
        if u {
            spte |= SPTE_U;
        }
        if w.nx {
            spte |= SPTE_NX;
        }
        if wr && w.dirty && !is_pt {
            spte |= SPTE_FAST_W;
            match (logging, self.dirty_mode) {
                (false, _) => spte |= SPTE_W | SPTE_D,
                // The write about to happen is logged by the D bit.
                (true, DirtyMode::DirtyBits) if ec.is_write() => spte |= SPTE_W | SPTE_D,
                (true, DirtyMode::DirtyBits) => spte |= SPTE_W,
                (true, DirtyMode::WriteProtect) if ec.is_write() => {
                    spte |= SPTE_W | SPTE_D;
                    self.domains[&did].shared.mark(w.gfn.0);
                }
                // Read-only until the first write, which the fast path fixes.
                (true, DirtyMode::WriteProtect) => {}
            }
        }
        let at = entry_at(self.sps[sp as usize].frame, gva.table_index(1) as u64);
        let old = update_leaf(&PhysCell { mem, at }, |_| spte);
        if spte_frame(old) != mfn || spte & SPTE_D == 0 {
            self.leaf_gone(did, old);
        }
        let d = self.dom(DomainId(did))?;
        let mask = d.dirty_mask;
        if old & SPTE_P == 0 || spte_frame(old) != mfn {
            if old & SPTE_P != 0 {
                foreign::forget_leaf(d, at, old);
            }
            let h = d.rmap.entry(w.gfn.0).or_default();
            d.pool.add(h, at);
        }
        if needs_flush(old, spte) {
            self.flush.add(mask, FlushScope::Page(gva));
        }
        if self.prefetch == Prefetch::On {
            self.prefetch_neighbours(mem, stats, did, sp, gva.table_index(1) as u64, w);
        }
        Ok(())
    }

    pub(super) fn emulated_write(
        &mut self,
        mem: &dyn PhysMem,
        stats: &Stats,
        vcpu: VcpuId,
        gpa: Gpa,
        value: u64,
        size: u8,
    ) -> MmuReply {
        let Some(v) = self.vcpus.get(&vcpu.0) else {
            return MmuReply::error(MmuError::UnknownVcpu(vcpu));
        };
        let did = v.domain;
        if !matches!(size, 1 | 2 | 4 | 8) {
            return MmuReply::error(MmuError::BadWriteSize(size));
        }
        let off = gpa.page_offset();
        if off + size as u64 > 4096 {
            return MmuReply::error(MmuError::WriteCrossesPage(gpa));
        }
        let d = &self.domains[&did];
        let gfn = gpa.frame();
        let Some(mfn) = gfn_to_mfn(&d.shared.memory, gfn) else {
            return MmuReply::error(MmuError::GpaNotInMemory(gpa));
        };
        // Write the bytes (one or two words; atomic per word).
        let mut done = 0u64;
        while done < size as u64 {
            let byte = off + done;
            let word = byte & !7;
            let shift = (byte - word) * 8;
            let n = (8 - (byte - word)).min(size as u64 - done);
            let mask = if n == 8 {
                u64::MAX
            } else {
                ((1u64 << (n * 8)) - 1) << shift
            };
            let bits = ((value >> (done * 8)) << shift) & mask;
            let at = Hpa(mfn.base().0 + word);
            let cell = PhysCell { mem, at };
            if let Err(e) = mem.read_u64(at) {
                return MmuReply::error(e.into());
            }
            update_leaf(&cell, |old| (old & !mask) | bits);
            done += n;
        }
        if d.shared.logging.load(Ordering::SeqCst) {
            d.shared.mark(gfn.0);
        }
        // Exactly the affected shadow entries, in every role.
        let first = off / 8;
        let last = (off + size as u64 - 1) / 8;
        let gen = d.gen;
        let lo = (gen, gfn.0, Role(0));
        let hi = (gen, gfn.0, Role(u32::MAX));
        let sps: Vec<u32> = d.cache.range(lo..=hi).map(|(_, &id)| id).collect();
        for id in sps {
            let sp = &self.sps[id as usize];
            if sp.role.direct() || !sp.live {
                continue;
            }
            // The new guest leaves a prefetch may shadow (at most two words).
            let mut leaves = [None; 2];
            if self.prefetch == Prefetch::On && sp.role.level() == 1 {
                let memory = &self.domains[&did].shared.memory;
                for (slot, idx) in leaves.iter_mut().zip(first..=last) {
                    *slot = mem
                        .read_u64(entry_at(mfn, idx))
                        .ok()
                        .and_then(|g| prefetch::leaf_of(sp.role, g, memory, self.maxphyaddr))
                        .map(|l| (idx, l));
                }
            }
            let sp = &mut self.sps[id as usize];
            if leaves.iter().any(Option::is_some) {
                // A present, accessed entry to guest memory: the frame is
                // in use as a page table, not flooded.
                sp.flood = 0;
            } else {
                sp.flood = sp.flood.saturating_add(1);
                if sp.flood >= FLOOD_LIMIT && sp.role.level() < 4 && sp.roots == 0 {
                    stats.unshadowed.fetch_add(1, Ordering::Relaxed);
                    self.count(did, |c| &c.unshadowed);
                    self.zap_sp(mem, id);
                    continue;
                }
            }
            for idx in first..=last {
                self.zap_entry(mem, id, idx);
            }
            for (idx, leaf) in leaves.into_iter().flatten() {
                self.prefetch_install(mem, stats, did, id, idx, leaf);
            }
        }
        MmuReply::WriteDone { flush: None }
    }
}
