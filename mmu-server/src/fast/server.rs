//! The `MmuServer` implementation: each request under the main lock (the
//! lockless fast page fault first), one flush obligation per reply.

use super::*;

impl<P: L4Policy> MmuServer for FastServer<'_, P> {
    fn name(&self) -> &'static str {
        self.name
    }

    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> MmuReply {
        let config = self.config;
        self.serve(None, About::Domain(domain), |inner, _, _| {
            if inner.domains.contains_key(&domain.0) {
                return MmuReply::error(MmuError::DomainExists(domain));
            }
            if inner.domains.len() >= config.max_domains as usize {
                return MmuReply::error(MmuError::CapacityExceeded {
                    what: abi::mmu::Resource::Domains,
                    limit: config.max_domains,
                });
            }
            let total = match config.check_memory_map(memory) {
                Ok(total) => total,
                Err(e) => return MmuReply::error(e),
            };
            let words = total.div_ceil(64) as usize;
            let mut dirty = Vec::new();
            dirty.resize_with(words, || AtomicU64::new(0));
            let shared = Arc::new(DomShared {
                gate: FastGate::new(AtomicU64::new(0), AtomicU64::new(0)),
                memory: memory.clone(),
                dirty,
                logging: AtomicBool::new(false),
                counters: Default::default(),
            });
            inner.domains.insert(
                domain.0,
                Domain {
                    shared,
                    gen: 0,
                    cache: BTreeMap::new(),
                    pt: BTreeMap::new(),
                    rmap: BTreeMap::new(),
                    pool: rmap::Pool::new(),
                    active: BTreeSet::new(),
                    pending: VecDeque::new(),
                    dirty_mask: CpuSet::EMPTY,
                    vcpus: Vec::new(),
                    foreign: Default::default(),
                },
            );
            MmuReply::Done { flush: None }
        })
    }

    fn destroy_domain(&self, domain: DomainId) -> MmuReply {
        self.serve(None, About::Domain(domain), |inner, mem, stats| {
            let Some(d) = inner.domains.get(&domain.0) else {
                return MmuReply::error(MmuError::UnknownDomain(domain));
            };
            let vcpus = d.vcpus.clone();
            if let Some((mapper, gfn)) = inner.mapper_of(domain.0) {
                return MmuReply::error(MmuError::FramesMapped { mapper, gfn });
            }
            inner.zap_all(domain.0);
            // Nothing of the domain runs any more: free everything now.
            let d = inner.domains.get_mut(&domain.0).expect("exists");
            for p in d.pending.iter_mut() {
                p.need = CpuSet::EMPTY;
            }
            while inner.reclaim(mem, stats, domain.0, usize::MAX) > 0 {}
            let mut fast = self.fast.write();
            for v in &vcpus {
                inner.vcpus.remove(v);
                fast.remove(v);
            }
            inner.retire(domain.0);
            inner.domains.remove(&domain.0);
            MmuReply::Done { flush: None }
        })
    }

    fn create_vcpu(&self, domain: DomainId, vcpu: VcpuId) -> MmuReply {
        self.serve(None, About::Domain(domain), |inner, _, _| {
            if inner.vcpus.contains_key(&vcpu.0) {
                return MmuReply::error(MmuError::VcpuExists(vcpu));
            }
            if inner.vcpus.len() >= self.config.max_vcpus as usize {
                return MmuReply::error(MmuError::CapacityExceeded {
                    what: abi::mmu::Resource::Vcpus,
                    limit: self.config.max_vcpus,
                });
            }
            let Some(d) = inner.domains.get_mut(&domain.0) else {
                return MmuReply::error(MmuError::UnknownDomain(domain));
            };
            d.vcpus.push(vcpu.0);
            let fast = Arc::new(AtomicU64::new(0));
            self.fast.write().insert(
                vcpu.0,
                VcpuFast {
                    root: fast.clone(),
                    dom: d.shared.clone(),
                },
            );
            inner.vcpus.insert(
                vcpu.0,
                Vcpu {
                    domain: domain.0,
                    cr3: GuestCr3(0),
                    mode: PagingMode(0),
                    pcpu: None,
                    root: None,
                    fast,
                    epoch: 0,
                },
            );
            MmuReply::Done { flush: None }
        })
    }

    fn vcpu_scheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        self.serve(Some(pcpu), About::Vcpu(vcpu), |inner, mem, stats| {
            if !inner.vcpus.contains_key(&vcpu.0) {
                return MmuReply::error(MmuError::UnknownVcpu(vcpu));
            }
            inner.load_root(mem, stats, vcpu, pcpu)
        })
    }

    fn vcpu_descheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        self.serve(Some(pcpu), About::Vcpu(vcpu), |inner, _, _| {
            let Some(v) = inner.vcpus.get_mut(&vcpu.0) else {
                return MmuReply::error(MmuError::UnknownVcpu(vcpu));
            };
            v.pcpu = None;
            MmuReply::Done { flush: None }
        })
    }

    fn page_fault(
        &self,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gva: Gva,
        error_code: PfErrorCode,
    ) -> MmuReply {
        if !pcpu.is_valid() {
            self.count_fault_of(vcpu);
        } else if let Some(r) = self.fast_page_fault(vcpu, gva, error_code) {
            return r;
        }
        self.serve(Some(pcpu), About::Vcpu(vcpu), |inner, mem, stats| {
            inner.count_page_fault(vcpu);
            inner.page_fault(mem, stats, vcpu, pcpu, gva, error_code)
        })
    }

    fn write_cr3(&self, vcpu: VcpuId, pcpu: PcpuId, cr3: GuestCr3) -> MmuReply {
        self.serve(Some(pcpu), About::Vcpu(vcpu), |inner, mem, stats| {
            let Some(v) = inner.vcpus.get_mut(&vcpu.0) else {
                return MmuReply::error(MmuError::UnknownVcpu(vcpu));
            };
            v.cr3 = cr3;
            v.epoch += 1;
            // A CR3 write drops the guest's non-global translations.
            inner.flush.add(CpuSet::single(pcpu), FlushScope::All);
            inner.load_root(mem, stats, vcpu, pcpu)
        })
    }

    fn set_paging_mode(&self, vcpu: VcpuId, pcpu: PcpuId, mode: PagingMode) -> MmuReply {
        // SMEP/SMAP would need the hardware's (off, see the abi) or faults
        // the shadows cannot express: refused, as by the reference.
        if mode.0 & !SUPPORTED_MODE != 0 {
            return MmuReply::error(MmuError::UnsupportedPagingMode(mode));
        }
        self.serve(Some(pcpu), About::Vcpu(vcpu), |inner, mem, stats| {
            let Some(v) = inner.vcpus.get_mut(&vcpu.0) else {
                return MmuReply::error(MmuError::UnknownVcpu(vcpu));
            };
            v.mode = mode;
            v.epoch += 1;
            inner.flush.add(CpuSet::single(pcpu), FlushScope::All);
            inner.load_root(mem, stats, vcpu, pcpu)
        })
    }

    fn invlpg(&self, vcpu: VcpuId, pcpu: PcpuId, gva: Gva) -> MmuReply {
        self.serve(Some(pcpu), About::Vcpu(vcpu), |inner, _, _| {
            if !inner.vcpus.contains_key(&vcpu.0) {
                return MmuReply::error(MmuError::UnknownVcpu(vcpu));
            }
            // Shadows are kept coherent by write protection: only this
            // pCPU's TLB entry goes.
            inner.flush.add(CpuSet::single(pcpu), FlushScope::Page(gva));
            MmuReply::Done { flush: None }
        })
    }

    fn emulated_write(
        &self,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gpa: Gpa,
        value: u64,
        size: u8,
    ) -> MmuReply {
        self.serve(Some(pcpu), About::Vcpu(vcpu), |inner, mem, stats| {
            inner.emulated_write(mem, stats, vcpu, gpa, value, size)
        })
    }

    fn enable_dirty_log(&self, domain: DomainId) -> MmuReply {
        self.serve(None, About::Domain(domain), |inner, mem, _| {
            let Some(d) = inner.domains.get(&domain.0) else {
                return MmuReply::error(MmuError::UnknownDomain(domain));
            };
            for w in &d.shared.dirty {
                w.store(0, Ordering::SeqCst);
            }
            d.shared.logging.store(true, Ordering::SeqCst);
            match inner.dirty_mode {
                DirtyMode::WriteProtect => {
                    let gfns: Vec<u64> = d.rmap.keys().copied().collect();
                    for g in gfns {
                        inner.write_protect(mem, domain.0, g, false);
                    }
                }
                // Forget writes from before: only D bits set from now count.
                DirtyMode::DirtyBits => {
                    inner.harvest(mem, domain.0, 0..u64::MAX);
                }
            }
            MmuReply::Done { flush: None }
        })
    }

    fn disable_dirty_log(&self, domain: DomainId) -> MmuReply {
        self.serve(None, About::Domain(domain), |inner, _, _| {
            let Some(d) = inner.domains.get(&domain.0) else {
                return MmuReply::error(MmuError::UnknownDomain(domain));
            };
            d.shared.logging.store(false, Ordering::SeqCst);
            MmuReply::Done { flush: None }
        })
    }

    fn get_and_clear_dirty(&self, domain: DomainId, start: Gfn) -> MmuReply {
        self.serve(None, About::Domain(domain), |inner, mem, _| {
            inner.get_and_clear(mem, domain.0, start)
        })
    }

    fn zap_all(&self, domain: DomainId) -> MmuReply {
        self.serve(None, About::Domain(domain), |inner, _, _| {
            if !inner.domains.contains_key(&domain.0) {
                return MmuReply::error(MmuError::UnknownDomain(domain));
            }
            inner.zap_all(domain.0);
            inner.count(domain.0, |c| &c.zaps);
            MmuReply::Done { flush: None }
        })
    }

    fn map_foreign(
        &self,
        domain: DomainId,
        gfn: Gfn,
        owner: DomainId,
        mfn: Mfn,
        writable: bool,
    ) -> MmuReply {
        self.serve(None, About::Domain(domain), |inner, _, _| {
            inner.map_foreign(domain, gfn, owner, mfn, writable)
        })
    }

    fn unmap_foreign(&self, domain: DomainId, gfn: Gfn) -> MmuReply {
        self.serve(None, About::Domain(domain), |inner, mem, _| {
            inner.unmap_foreign(mem, domain, gfn)
        })
    }

    fn counters(&self, domain: Option<DomainId>) -> MmuReply {
        self.counters_reply(domain)
    }
}
