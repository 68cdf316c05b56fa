//! Dirty logging and flush targeting: write protection, D-bit harvesting,
//! get-and-clear, and shrinking a domain's dirty mask after full flushes.

use super::*;

impl<P: L4Policy> Inner<P> {
    /// Minimal flushes: after a full flush of the request's domain on some
    /// pCPUs, those that run none of its vCPUs hold none of its
    /// translations any more and leave its dirty mask (until one of its
    /// vCPUs is scheduled there again).
    pub(super) fn shrink_dirty_mask(&mut self, about: About, flush: Option<FlushObligation>) {
        let Some(f) = flush else { return };
        if !matches!(f.scope, FlushScope::All | FlushScope::AllReloadRoots) {
            return;
        }
        let did = match about {
            About::Domain(d) => d.0,
            About::Vcpu(v) => match self.vcpus.get(&v.0) {
                Some(v) => v.domain,
                None => return,
            },
        };
        let Some(d) = self.domains.get(&did) else {
            return;
        };
        let mut running = CpuSet::EMPTY;
        for v in &d.vcpus {
            if let Some(p) = self.vcpus.get(v).and_then(|v| v.pcpu) {
                running.insert(p);
            }
        }
        let gone = f.cpus.difference(running);
        let d = self.domains.get_mut(&did).expect("looked up above");
        d.dirty_mask = d.dirty_mask.difference(gone);
    }

    /// A present leaf `old` was replaced: with D-bit logging, its D bit is
    /// the only record of writes through it, so it goes to the log.
    pub(super) fn leaf_gone(&self, did: u32, old: u64) {
        if self.dirty_mode != DirtyMode::DirtyBits || old & (SPTE_P | SPTE_D) != SPTE_P | SPTE_D {
            return;
        }
        if let Some(d) = self.domains.get(&did) {
            if d.shared.logging.load(Ordering::SeqCst) {
                if let Some(g) = mfn_to_gfn(&d.shared.memory, spte_frame(old)) {
                    d.shared.mark(g.0);
                }
            }
        }
    }

    /// Clears the D bit of every leaf mapping a frame in `gfns` (D-bit
    /// logging); returns the frames that had one set. Flushes if any.
    pub(super) fn harvest(
        &mut self,
        mem: &dyn PhysMem,
        did: u32,
        gfns: core::ops::Range<u64>,
    ) -> Vec<u64> {
        let mut found = Vec::new();
        let Some(d) = self.domains.get(&did) else {
            return found;
        };
        for (&gfn, head) in d.rmap.range(gfns) {
            let mut hit = false;
            d.pool.for_each(head, |at| {
                let cell = PhysCell { mem, at };
                if cell.load() & SPTE_D != 0 {
                    hit |= update_leaf(&cell, |v| v & !SPTE_D) & SPTE_D != 0;
                }
            });
            if hit {
                found.push(gfn);
            }
        }
        if !found.is_empty() {
            let mask = d.dirty_mask;
            self.flush.add(mask, FlushScope::All);
        }
        found
    }

    /// Write-protects every leaf mapping `gfn` (clearing also the lockless
    /// permission when `for_table`); flushes what was writable.
    pub(super) fn write_protect(&mut self, mem: &dyn PhysMem, did: u32, gfn: u64, for_table: bool) {
        let Some(d) = self.domains.get(&did) else {
            return;
        };
        let Some(head) = d.rmap.get(&gfn) else { return };
        let clear = if for_table {
            SPTE_W | SPTE_FAST_W
        } else {
            SPTE_W
        };
        let mut flush = false;
        d.pool.for_each(head, |at| {
            let cell = PhysCell { mem, at };
            if cell.load() & clear == 0 {
                return;
            }
            let old = update_leaf(&cell, |v| v & !clear);
            flush |= needs_flush(old, old & !clear);
        });
        if flush {
            let mask = d.dirty_mask;
            self.flush.add(mask, FlushScope::All);
        }
    }

    pub(super) fn get_and_clear(&mut self, mem: &dyn PhysMem, did: u32, start: Gfn) -> MmuReply {
        let Some(d) = self.domains.get(&did) else {
            return MmuReply::error(MmuError::UnknownDomain(DomainId(did)));
        };
        if !d.shared.logging.load(Ordering::SeqCst) {
            return MmuReply::error(MmuError::DirtyLogDisabled(DomainId(did)));
        }
        let shared = d.shared.clone();
        // The chunk covers gfns [start, start + DIRTY_CHUNK_PAGES) across
        // regions (the reference's layout, so bitmaps compare exactly).
        let mut bits: heapless::Vec<u8, { abi::mmu::DIRTY_CHUNK_BYTES }> = heapless::Vec::new();
        let _ = bits.resize(abi::mmu::DIRTY_CHUNK_BYTES, 0);
        let end = start.0.saturating_add(DIRTY_CHUNK_PAGES);
        let mut base = 0u64;
        for r in shared.memory.iter() {
            let lo = r.gfn.0.max(start.0);
            let hi = (r.gfn.0 + r.pages).min(end);
            let mut g = lo;
            while g < hi {
                let b = base + (g - r.gfn.0);
                let (word, bit) = ((b / 64) as usize, b % 64);
                let take = (64 - bit).min(hi - g);
                let mask = if take == 64 {
                    u64::MAX
                } else {
                    ((1u64 << take) - 1) << bit
                };
                // Take the bits, then write-protect exactly the taken pages.
                let old = shared.dirty[word].fetch_and(!mask, Ordering::SeqCst) & mask;
                let mut rest = old;
                while rest != 0 {
                    let t = rest.trailing_zeros() as u64;
                    rest &= rest - 1;
                    let gfn = g + (t - bit);
                    let j = gfn - start.0;
                    bits[(j / 8) as usize] |= 1 << (j % 8);
                    if self.dirty_mode == DirtyMode::WriteProtect {
                        self.write_protect(mem, did, gfn, false);
                    }
                }
                g += take;
            }
            base += r.pages;
        }
        if self.dirty_mode == DirtyMode::DirtyBits {
            for gfn in self.harvest(mem, did, start.0..end) {
                if shared.bit_of(gfn).is_some() {
                    let j = gfn - start.0;
                    bits[(j / 8) as usize] |= 1 << (j % 8);
                }
            }
        }
        let next = shared
            .memory
            .iter()
            .filter_map(|r| {
                let last = r.gfn.0 + r.pages;
                (end < last).then(|| r.gfn.0.max(end))
            })
            .min()
            .map(Gfn);
        MmuReply::DirtyBitmap {
            chunk: DirtyChunk { start, bits, next },
            flush: None,
        }
    }
}
