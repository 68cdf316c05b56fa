//! The reference MMU server: simple and obviously correct, the oracle that
//! faster servers are compared against.
//!
//! # Design
//! - One `spin::Mutex` around all state; every request runs under it.
//! - **One shadow tree per vCPU**, rooted in a frame allocated at
//!   `CreateVcpu`. A vCPU's tree behaves exactly like that vCPU's TLB: it
//!   only ever holds translations produced by a full guest walk for an
//!   access of that vCPU, and it is emptied whenever the vCPU's TLB would be
//!   (CR3 write, INVLPG, paging-mode change) and on zap-all. Emptying a
//!   tree is always allowed (dropping translations never widens anything).
//! - **No write-protection of guest page tables.** Because a vCPU's tree is
//!   a TLB that is emptied on every CR3 write and INVLPG, a guest write to its
//!   page tables may leave stale shadow entries exactly where a real TLB may
//!   keep stale entries, until the guest invalidates. So guest page-table
//!   pages are mapped like data; this server never answers `EmulateWrite`,
//!   and an `EmulatedWrite` it receives anyway is treated as a plain guest
//!   store (written with compare-exchange, logged dirty; shadows untouched).
//! - **Leaves are 4 KiB only**: 2 MiB and 1 GiB guest pages are shadowed one
//!   4 KiB frame at a time. Non-leaf shadow entries are P|RW|US|A; the leaf
//!   carries the combined guest permissions: U/S if U/S at every level, R/W
//!   only if R/W at every level **and** the guest's D bit is set (so the
//!   first write faults and the walker sets D) **and** (dirty logging off
//!   or this fault is the logged write), NX if EFER.NXE and NX at some
//!   level. A supervisor write allowed only by CR0.WP = 0 gets a
//!   supervisor-only writable leaf (U/S clear), so user accesses fault and
//!   are re-checked.
//! - Guest frames come only from the domain's memory map; a walk that
//!   leaves it injects #PF with P | RSVD (see [`crate::walk`]), except that
//!   an allowed access to a final frame outside it is answered `Mmio` when
//!   the mode asks for MMIO emulation.
//! - **Paging off** ([`PagingMode::OFF`]): the vCPU's tree is an identity
//!   shadow of the memory map (and foreign frames), filled by faults like
//!   any other: leaves P|RW|US (read-only until written under dirty
//!   logging), no NX. A gfn that is not RAM gets `Mmio`. A change of
//!   paging on/off empties the tree like any mode change and answers
//!   `LoadShadowRoot` with it.
//!
//! # Flushes and frame reuse
//! Per vCPU the server tracks `ran_on` (pCPUs whose TLB may hold entries of
//! its tree since it was last emptied) and `must_flush` (pCPUs to flush
//! before the vCPU next runs there, because they may still cache entries of
//! an emptied tree whose frames were reused). Emptying a tree yields a flush
//! of `ran_on` and `must_flush` (scope All) and adds `ran_on` to
//! `must_flush`; any later request from the vCPU on a pCPU in `must_flush`
//! (including `VcpuScheduled`) gets a flush of that pCPU merged into its
//! reply, and only that removes the pCPU from the set. The tree's frames are
//! freed at once when the vCPU is out of the guest (the request is its own,
//! or it is descheduled); otherwise they are kept, unhooked, until its next
//! request or `VcpuDescheduled`. So a frame is reused only when no pCPU can
//! walk it before a flush.
//!
//! Invariant: on the pCPUs of `ran_on`, the TLB never holds, for a vCPU, a
//! translation wider than that vCPU's current shadow tree (replacing a
//! present leaf flushes the page on `ran_on`; write-protecting flushes
//! `ran_on`; emptying the tree moves `ran_on` into `must_flush`). Dirty
//! logging depends on it: write-protecting for the log flushes `ran_on` (if
//! a leaf changed) and `must_flush` (always).
//!
//! # Counters
//! [`MmuRequest::GetCounters`](abi::MmuRequest::GetCounters) is answered
//! from plain counts kept under the lock, with the meanings documented on
//! [`ServerCounters`]: events of a vCPU's requests (faults, shadow frames
//! taken and freed, emulated writes, reclaims, flushes) are counted on the
//! vCPU, domain-level events (zaps, dirty-log flushes) on the domain; a
//! domain's counters are its own plus its vCPUs', and when a domain is
//! destroyed they move into the server's `retired` counts, so the
//! whole-server figures cover every domain ever created.
//! `shadow_pages_in_use` is `shadow_pages_created - shadow_pages_freed`
//! (frames unhooked but not yet freed count as in use); `shadow_pages_peak`
//! (per domain and for the server) is the highest such level seen at the end
//! of a request that took frames (a fault that ran the pool dry and zapped to
//! retry is measured after its retry, so the moment the pool was empty is not
//! seen). This server has no
//! lockless path, never unsyncs, never unshadows and never asks for an
//! emulated write, so those counters stay 0 by design.
//!
//! # Foreign frames (grant mappings)
//! `MapForeign` records (domain, gfn) -> (owner, mfn, writable) beside the
//! memory map; a guest walk may end in such a frame (its page tables may
//! not live there). Its shadow leaves are made with A and D clear, writable
//! only if the mapping and the guest allow it; a write the mapping forbids
//! gets #PF (P | W) injected. `UnmapForeign` clears every leaf mapping the
//! frame in the domain's trees with an atomic swap and reports whether any
//! had A set. A leaf of a foreign frame dropped with A set by anything else
//! (a tree emptied, a leaf replaced) may still be cached somewhere and its
//! flush may not have been carried out yet when the unmap comes, so the
//! mapping remembers it (`dropped_accessed`, with the pCPUs) and the unmap
//! reports it as accessed. A domain whose frames are foreign-mapped by
//! another cannot be destroyed (`FramesMapped`).
//!
//! # Out of shadow frames
//! A fault that finds the pool empty empties the vCPU's own tree and
//! retries; then empties every other vCPU's tree (all domains; frames of
//! running vCPUs are only freed later) and retries; then answers
//! `OutOfShadowMemory` with the flush of everything it emptied in the
//! domain. Emptying another domain's trees needs no flush now: no guest
//! translation changed, and frame reuse is covered by those vCPUs'
//! `must_flush`, paid in their own replies.

use crate::shadow::{self, InstallError};
use crate::walk::{
    self, GuestMem, WalkError, PTE_A, PTE_ADDR_MASK, PTE_D, PTE_NX, PTE_P, PTE_RW, PTE_US,
};
use crate::Config;
use abi::mmu::{MemoryMap, Resource, DIRTY_CHUNK_BYTES, DIRTY_CHUNK_PAGES};
use abi::{
    CpuSet, DirtyChunk, DomainId, FlushObligation, FlushScope, Gfn, Gpa, GuestCr3, Gva, Hpa, Mfn,
    MmuError, MmuReply, MmuServer, PagingMode, PcpuId, PfErrorCode, PhysMem, ServerCounters,
    VcpuId, PAGE_SIZE,
};
use alloc::vec::Vec;
use spin::Mutex;

/// The registry name of this implementation.
pub const NAME: &str = "reference";

/// Paging-mode bits this server implements (the rest are refused).
pub const SUPPORTED_MODE: u32 = PagingMode::WP
    | PagingMode::NXE
    | PagingMode::PGE
    | PagingMode::PCIDE
    | PagingMode::OFF
    | PagingMode::MMIO;

/// With paging off, guest-virtual addresses are 32-bit.
const PAGING_OFF_LIMIT: u64 = 1 << 32;

/// The reference server over host memory `M`.
pub struct Reference<'m, M: PhysMem + ?Sized> {
    mem: &'m M,
    config: Config,
    state: Mutex<State>,
}

struct State {
    domains: Vec<Domain>,
    vcpus: Vec<Vcpu>,
    foreign: Vec<Foreign>,
    /// Counts of destroyed domains (and their vCPUs).
    retired: ServerCounters,
    /// The most shadow frames the server held at once (the whole-server
    /// `shadow_pages_peak`).
    peak: u64,
}

/// Guest frames at or above this are out of range for a foreign mapping
/// (52-bit guest-physical addresses).
const MAX_GUEST_FRAME: u64 = 1 << 40;

/// A foreign frame mapped into a domain (a grant mapping).
struct Foreign {
    domain: DomainId,
    gfn: Gfn,
    owner: DomainId,
    mfn: Mfn,
    writable: bool,
    /// Set when a shadow leaf of the frame was dropped with A set before
    /// the unmap: the pCPUs that may still cache it.
    dropped_accessed: Option<CpuSet>,
}

/// Notes, for every leaf in `v`'s tree that maps a foreign frame of its
/// domain with A set, that the frame was accessed (the tree is about to be
/// emptied). Scans only if the domain has foreign frames.
fn note_dropped<M: PhysMem + ?Sized>(
    mem: &M,
    foreign: &mut [Foreign],
    v: &Vcpu,
) -> Result<(), MmuError> {
    if !foreign.iter().any(|f| f.domain == v.domain) {
        return Ok(());
    }
    let cpus = v.ran_on.union(v.must_flush);
    shadow::for_each_leaf(mem, v.root, &mut |leaf| {
        if leaf & PTE_A != 0 {
            note_leaf(foreign, v.domain, leaf, cpus);
        }
    })
    .map_err(MmuError::Memory)
}

/// Records that `leaf` (with A set), if it maps a foreign frame of
/// `domain`, was dropped while `cpus` may cache it.
fn note_leaf(foreign: &mut [Foreign], domain: DomainId, leaf: u64, cpus: CpuSet) {
    let mfn = Mfn((leaf & PTE_ADDR_MASK) >> 12);
    for f in foreign
        .iter_mut()
        .filter(|f| f.domain == domain && f.mfn == mfn)
    {
        f.dropped_accessed = Some(f.dropped_accessed.unwrap_or(CpuSet::EMPTY).union(cpus));
    }
}

/// Dirty bitmap: one `Vec<u64>` per memory-map region.
type DirtyLog = Vec<Vec<u64>>;

struct Domain {
    id: DomainId,
    memory: MemoryMap,
    dirty: Option<DirtyLog>,
    /// Domain-level events (its vCPUs count their own).
    counters: ServerCounters,
    /// The most shadow frames the domain (its vCPUs) held at once.
    peak: u64,
}

struct Vcpu {
    id: VcpuId,
    domain: DomainId,
    cr3: GuestCr3,
    mode: PagingMode,
    root: Mfn,
    running_on: Option<PcpuId>,
    ran_on: CpuSet,
    must_flush: CpuSet,
    deferred: Vec<Mfn>,
    /// Events of this vCPU's requests (`shadow_pages_in_use` unused).
    counters: ServerCounters,
}

fn all(cpus: CpuSet) -> Option<FlushObligation> {
    FlushObligation::merge(
        None,
        Some(FlushObligation {
            cpus,
            scope: FlushScope::All,
        }),
    )
}

fn add(acc: &mut Option<FlushObligation>, f: Option<FlushObligation>) {
    *acc = FlushObligation::merge(*acc, f);
}

/// Counts the flush obligation a reply carries, if any.
fn count_flush(c: &mut ServerCounters, reply: &MmuReply) {
    if let Some(f) = reply.flush() {
        c.flush_obligations += 1;
        c.flush_cpus += u64::from(f.cpus.0.count_ones());
    }
}

fn finish(r: Result<MmuReply, MmuError>, flush: Option<FlushObligation>) -> MmuReply {
    match r {
        Ok(reply) => reply.add_flush(flush),
        Err(reason) => MmuReply::Error { reason, flush },
    }
}

fn mark_dirty(dirty: &mut Option<DirtyLog>, map: &MemoryMap, gfn: Gfn) {
    let Some(log) = dirty else { return };
    for (r, bits) in map.iter().zip(log.iter_mut()) {
        if r.translate(gfn).is_some() {
            let i = (gfn.0 - r.gfn.0) as usize;
            bits[i / 64] |= 1 << (i % 64);
        }
    }
}

fn find_vcpu(vcpus: &mut [Vcpu], id: VcpuId) -> Result<&mut Vcpu, MmuError> {
    vcpus
        .iter_mut()
        .find(|v| v.id == id)
        .ok_or(MmuError::UnknownVcpu(id))
}

impl State {
    fn vcpu(&mut self, id: VcpuId) -> Result<&mut Vcpu, MmuError> {
        self.vcpus
            .iter_mut()
            .find(|v| v.id == id)
            .ok_or(MmuError::UnknownVcpu(id))
    }

    fn domain_index(&self, id: DomainId) -> Result<usize, MmuError> {
        self.domains
            .iter()
            .position(|d| d.id == id)
            .ok_or(MmuError::UnknownDomain(id))
    }

    /// Counts a reply's flush on the vCPU (if it exists).
    fn count_vcpu_reply(&mut self, id: VcpuId, reply: &MmuReply) {
        if let Ok(v) = self.vcpu(id) {
            count_flush(&mut v.counters, reply);
        }
    }

    /// Counts a reply's flush on the domain (if it exists).
    fn count_domain_reply(&mut self, id: DomainId, reply: &MmuReply) {
        if let Ok(di) = self.domain_index(id) {
            count_flush(&mut self.domains[di].counters, reply);
        }
    }

    /// A domain's counters: its own plus its vCPUs', with the level of
    /// frames in use.
    fn domain_counters(&self, d: &Domain) -> ServerCounters {
        let mut c = self
            .vcpus
            .iter()
            .filter(|v| v.domain == d.id)
            .fold(d.counters, |acc, v| acc.sum(&v.counters));
        c.shadow_pages_in_use = c.shadow_pages_created.saturating_sub(c.shadow_pages_freed);
        c.shadow_pages_peak = d.peak.max(c.shadow_pages_in_use);
        c
    }

    /// Raises the peaks of `domain` and of the server to the levels now
    /// (called after every request that took shadow frames; frees only
    /// lower the levels).
    fn note_peak(&mut self, domain: DomainId) {
        if let Ok(di) = self.domain_index(domain) {
            let level = self.domain_counters(&self.domains[di]).shadow_pages_in_use;
            let d = &mut self.domains[di];
            d.peak = d.peak.max(level);
        }
        self.peak = self.peak.max(self.total_counters().shadow_pages_in_use);
    }

    /// The whole server's counters: destroyed domains plus live ones.
    fn total_counters(&self) -> ServerCounters {
        let mut c = self
            .domains
            .iter()
            .fold(self.retired, |acc, d| acc.sum(&self.domain_counters(d)));
        c.shadow_pages_in_use = c.shadow_pages_created.saturating_sub(c.shadow_pages_freed);
        c.shadow_pages_peak = self.peak.max(c.shadow_pages_in_use);
        c
    }
}

impl<'m, M: PhysMem + ?Sized> Reference<'m, M> {
    /// A reference server with no domains over `mem`.
    pub fn new(mem: &'m M, config: Config) -> Self {
        Reference {
            mem,
            config,
            state: Mutex::new(State {
                domains: Vec::new(),
                vcpus: Vec::new(),
                foreign: Vec::new(),
                retired: ServerCounters::default(),
                peak: 0,
            }),
        }
    }

    /// The root of a vCPU's shadow tree (for tests and diagnostics).
    pub fn shadow_root(&self, vcpu: VcpuId) -> Option<Mfn> {
        self.state.lock().vcpu(vcpu).ok().map(|v| v.root)
    }

    /// Gives `frames` back to the pool, adding each one freed to `freed`.
    fn free_all(&self, frames: &mut Vec<Mfn>, freed: &mut u64) -> Result<(), MmuError> {
        let mut first = Ok(());
        for f in frames.drain(..) {
            match self.mem.free_frame(f) {
                Ok(()) => *freed += 1,
                Err(e) => first = first.and(Err(MmuError::Memory(e))),
            }
        }
        first
    }

    /// The vCPU sent a request from `pcpu` (it is out of the guest there):
    /// free its unhooked frames, owe `pcpu` a flush if it must get one.
    fn enter(
        &self,
        v: &mut Vcpu,
        pcpu: PcpuId,
        flush: &mut Option<FlushObligation>,
    ) -> Result<(), MmuError> {
        if !pcpu.is_valid() {
            return Err(MmuError::InvalidPcpu(pcpu));
        }
        if v.must_flush.contains(pcpu) {
            v.must_flush.remove(pcpu);
            add(flush, all(CpuSet::single(pcpu)));
        }
        v.running_on = Some(pcpu);
        v.ran_on.insert(pcpu);
        self.free_all(&mut v.deferred, &mut v.counters.shadow_pages_freed)
    }

    /// Empties the vCPU's tree. `current`: the pCPU the vCPU is out of the
    /// guest on (its own request), which this very reply flushes.
    fn zap(
        &self,
        v: &mut Vcpu,
        foreign: &mut [Foreign],
        current: Option<PcpuId>,
        flush: &mut Option<FlushObligation>,
    ) -> Result<(), MmuError> {
        note_dropped(self.mem, foreign, v)?;
        let mut frames = Vec::new();
        let collected = shadow::collect(self.mem, v.root, &mut frames);
        // `must_flush` pCPUs may still cache entries of an earlier tree
        // (emptied without a flush, see pool exhaustion): a zap-all for a
        // memory-map change must reach them too.
        add(flush, all(v.ran_on.union(v.must_flush)));
        v.must_flush = v.must_flush.union(v.ran_on);
        v.ran_on = CpuSet::EMPTY;
        if let Some(p) = current {
            v.must_flush.remove(p);
            v.ran_on.insert(p);
        }
        if current.is_some() || v.running_on.is_none() {
            self.free_all(&mut frames, &mut v.counters.shadow_pages_freed)?;
        } else {
            v.deferred.append(&mut frames);
        }
        collected.map_err(MmuError::Memory)
    }

    /// Write-protects every shadow leaf of the domain's vCPUs.
    fn write_protect_domain(
        &self,
        st: &mut State,
        domain: DomainId,
        flush: &mut Option<FlushObligation>,
    ) -> Result<(), MmuError> {
        for v in st.vcpus.iter().filter(|v| v.domain == domain) {
            // On `ran_on` the TLB holds nothing wider than the tree, so it
            // needs a flush only if a leaf lost R/W. On `must_flush` it may
            // still hold entries of an emptied tree (writable ones too).
            let changed = shadow::write_protect(self.mem, v.root)?;
            let cpus = if changed { v.ran_on } else { CpuSet::EMPTY };
            add(flush, all(cpus.union(v.must_flush)));
        }
        Ok(())
    }

    // The arguments are the request's fields plus the locked state.
    #[allow(clippy::too_many_arguments)]
    fn page_fault_locked(
        &self,
        st: &mut State,
        flush: &mut Option<FlushObligation>,
        tables_taken: &mut u64,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gva: Gva,
        error_code: PfErrorCode,
    ) -> Result<MmuReply, MmuError> {
        let v = st.vcpu(vcpu)?;
        let (domain, cr3, mode, root) = (v.domain, v.cr3, v.mode, v.root);
        self.enter(v, pcpu, flush)?;
        let di = st.domain_index(domain)?;
        let Domain { memory, dirty, .. } = &mut st.domains[di];
        let foreign = &st.foreign;
        let guest = GuestMem {
            mem: self.mem,
            map: memory,
        };
        let foreign_at = |g: Gfn| {
            foreign
                .iter()
                .find(|f| f.domain == domain && f.gfn == g)
                .map(|f| (f.mfn, f.writable))
        };
        let access = error_code.access();
        let write = access.is_write();
        let walked = if mode.paging() {
            walk::walk_to(
                &guest,
                &|g| guest.mfn(g).or_else(|| foreign_at(g).map(|f| f.0)),
                cr3,
                mode,
                self.config.maxphyaddr,
                gva,
                access,
                &mut |g| mark_dirty(dirty, memory, g),
            )
        } else if gva.0 >= PAGING_OFF_LIMIT {
            return Err(MmuError::FaultOutsideMode(gva));
        } else {
            // Paging off: the identity, every access allowed (as a walk
            // through entries with R/W, U/S and D set).
            let gfn = Gfn(gva.0 >> 12);
            match guest.mfn(gfn).or_else(|| foreign_at(gfn).map(|f| f.0)) {
                Some(mfn) => Ok(walk::Translation {
                    gfn,
                    mfn,
                    size: abi::PageSize::Size4K,
                    writable: true,
                    user: true,
                    nx: false,
                    dirty: true,
                    global: false,
                    leaf: Gpa(0),
                }),
                None => Err(WalkError::Mmio(Gpa(gva.0))),
            }
        };
        let t = match walked {
            Ok(t) => t,
            Err(WalkError::Fault(code)) => {
                return Ok(MmuReply::InjectPageFault {
                    error_code: code,
                    address: gva,
                    flush: None,
                })
            }
            Err(WalkError::Mmio(gpa)) => {
                return Ok(MmuReply::Mmio {
                    gpa,
                    write,
                    flush: None,
                })
            }
            Err(WalkError::Contended) => return Ok(MmuReply::Resume { flush: None }),
            Err(WalkError::Memory(e)) => return Err(MmuError::Memory(e)),
        };
        let mut user = t.user;
        let mut writable = t.writable && t.dirty;
        if write && !access.is_user() && !t.writable && !mode.wp() {
            // CR0.WP = 0 lets the supervisor write; keep users out.
            writable = true;
            user = false;
        }
        if dirty.is_some() {
            if write {
                mark_dirty(dirty, memory, t.gfn);
            } else {
                writable = false;
            }
        }
        let foreign_leaf = if guest.mfn(t.gfn).is_none() {
            foreign_at(t.gfn)
        } else {
            None
        };
        let mut leaf = t.mfn.base().0 | PTE_P;
        match foreign_leaf {
            // A foreign frame: A and D clear (the unmap's flush hint), and
            // never writable against the mapping.
            Some((_, may_write)) => {
                if write && !may_write && !mode.paging() {
                    // No #PF without paging: the write is dropped, as to ROM.
                    return Ok(MmuReply::Mmio {
                        gpa: Gpa(t.gfn.base().0 | gva.page_offset()),
                        write,
                        flush: None,
                    });
                }
                if write && !may_write {
                    return Ok(MmuReply::InjectPageFault {
                        error_code: PfErrorCode(error_code.0 & PfErrorCode::U)
                            .with(PfErrorCode::P | PfErrorCode::W),
                        address: gva,
                        flush: None,
                    });
                }
                if writable && may_write {
                    leaf |= PTE_RW;
                }
            }
            None => {
                leaf |= PTE_A;
                if writable {
                    leaf |= PTE_RW | PTE_D;
                }
            }
        }
        if user {
            leaf |= PTE_US;
        }
        if t.nx {
            leaf |= PTE_NX;
        }
        // Install, emptying trees when the pool runs dry.
        for attempt in 0..3 {
            match shadow::install(self.mem, root, gva, leaf, tables_taken) {
                Ok(old) => {
                    if old & PTE_P != 0 && old & PTE_A != 0 {
                        let v = st.vcpu(vcpu)?;
                        let cpus = v.ran_on.union(v.must_flush);
                        note_leaf(&mut st.foreign, domain, old, cpus);
                    }
                    if old & PTE_P != 0 {
                        // The old leaf may be cached wherever the vCPU ran
                        // since its tree was last emptied, and may be wider
                        // in some way (U/S vs R/W under CR0.WP = 0): flush
                        // it everywhere, so caches never hold more than the
                        // tree (dirty logging relies on it).
                        let ran_on = st.vcpu(vcpu)?.ran_on;
                        add(
                            flush,
                            Some(FlushObligation {
                                cpus: ran_on,
                                scope: FlushScope::Page(gva),
                            }),
                        );
                    }
                    return Ok(MmuReply::Resume { flush: None });
                }
                Err(InstallError::Memory(e)) => return Err(MmuError::Memory(e)),
                Err(InstallError::OutOfPool) => match attempt {
                    0 => {
                        let State { vcpus, foreign, .. } = &mut *st;
                        let v = vcpus
                            .iter_mut()
                            .find(|v| v.id == vcpu)
                            .ok_or(MmuError::UnknownVcpu(vcpu))?;
                        v.counters.reclaims += 1;
                        self.zap(v, foreign, Some(pcpu), flush)?
                    }
                    1 => {
                        st.vcpu(vcpu)?.counters.reclaims += 1;
                        for v in st.vcpus.iter_mut().filter(|v| v.id != vcpu) {
                            // Emptying a tree changes nothing the guest can
                            // see; only frame reuse needs flushes, and those
                            // reach each vCPU through its `must_flush` in its
                            // own domain's replies. So other domains' pCPUs
                            // are not named here (flushes are per domain).
                            let mut theirs = None;
                            let f = if v.domain == domain {
                                &mut *flush
                            } else {
                                &mut theirs
                            };
                            self.zap(v, &mut st.foreign, None, f)?;
                        }
                    }
                    _ => {}
                },
            }
        }
        Err(MmuError::OutOfShadowMemory(domain))
    }

    // The arguments are the request's fields plus the locked state.
    #[allow(clippy::too_many_arguments)]
    fn emulated_write_locked(
        &self,
        st: &mut State,
        flush: &mut Option<FlushObligation>,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gpa: Gpa,
        value: u64,
        size: u8,
    ) -> Result<MmuReply, MmuError> {
        let v = st.vcpu(vcpu)?;
        let domain = v.domain;
        self.enter(v, pcpu, flush)?;
        if !matches!(size, 1 | 2 | 4 | 8) {
            return Err(MmuError::BadWriteSize(size));
        }
        if gpa.page_offset() + u64::from(size) > PAGE_SIZE {
            return Err(MmuError::WriteCrossesPage(gpa));
        }
        let di = st.domain_index(domain)?;
        let Domain { memory, dirty, .. } = &mut st.domains[di];
        let guest = GuestMem {
            mem: self.mem,
            map: memory,
        };
        let hpa = guest.hpa(gpa).ok_or(MmuError::GpaNotInMemory(gpa))?;
        // Write byte by byte into the (one or two) words the store covers,
        // each word with a compare-exchange loop (a concurrent guest store to
        // the same word makes progress each time ours fails).
        let bytes = value.to_le_bytes();
        let mut k = 0usize;
        while k < usize::from(size) {
            let a = hpa.0 + k as u64;
            let word = Hpa(a & !7);
            let first = (a & 7) as usize;
            let n = (8 - first).min(usize::from(size) - k);
            loop {
                let old = self.mem.read_u64(word)?;
                let mut b = old.to_le_bytes();
                b[first..first + n].copy_from_slice(&bytes[k..k + n]);
                if self
                    .mem
                    .compare_exchange_u64(word, old, u64::from_le_bytes(b))?
                    .is_ok()
                {
                    break;
                }
            }
            k += n;
        }
        mark_dirty(dirty, memory, gpa.frame());
        Ok(MmuReply::WriteDone { flush: None })
    }

    fn get_and_clear_dirty_locked(
        &self,
        st: &mut State,
        flush: &mut Option<FlushObligation>,
        domain: DomainId,
        start: Gfn,
    ) -> Result<MmuReply, MmuError> {
        let di = st.domain_index(domain)?;
        let d = &mut st.domains[di];
        let Some(log) = d.dirty.as_mut() else {
            return Err(MmuError::DirtyLogDisabled(domain));
        };
        let mut bits = heapless::Vec::<u8, DIRTY_CHUNK_BYTES>::new();
        let _ = bits.resize(DIRTY_CHUNK_BYTES, 0);
        let end = start.0.saturating_add(DIRTY_CHUNK_PAGES);
        let mut any = false;
        for (r, words) in d.memory.iter().zip(log.iter_mut()) {
            let lo = r.gfn.0.max(start.0);
            let hi = (r.gfn.0 + r.pages).min(end);
            for g in lo..hi {
                let i = (g - r.gfn.0) as usize;
                if words[i / 64] & (1 << (i % 64)) != 0 {
                    words[i / 64] &= !(1 << (i % 64));
                    let j = (g - start.0) as usize;
                    bits[j / 8] |= 1 << (j % 8);
                    any = true;
                }
            }
        }
        let next = d
            .memory
            .iter()
            .filter_map(|r| {
                let last = r.gfn.0 + r.pages;
                if end >= last {
                    None
                } else {
                    Some(r.gfn.0.max(end))
                }
            })
            .min()
            .map(Gfn);
        if any {
            // Every writable leaf maps a frame whose bit was set (maybe in
            // another chunk); protecting them all keeps the invariant.
            self.write_protect_domain(st, domain, flush)?;
        }
        Ok(MmuReply::DirtyBitmap {
            chunk: DirtyChunk { start, bits, next },
            flush: None,
        })
    }
}

impl<M: PhysMem + ?Sized> MmuServer for Reference<'_, M> {
    fn name(&self) -> &'static str {
        NAME
    }

    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> MmuReply {
        let mut st = self.state.lock();
        if st.domains.iter().any(|d| d.id == domain) {
            return MmuReply::error(MmuError::DomainExists(domain));
        }
        if st.domains.len() >= self.config.max_domains as usize {
            return MmuReply::error(MmuError::CapacityExceeded {
                what: Resource::Domains,
                limit: self.config.max_domains,
            });
        }
        if let Err(e) = self.config.check_memory_map(memory) {
            return MmuReply::error(e);
        }
        st.domains.push(Domain {
            id: domain,
            memory: memory.clone(),
            dirty: None,
            counters: ServerCounters::default(),
            peak: 0,
        });
        MmuReply::Done { flush: None }
    }

    fn destroy_domain(&self, domain: DomainId) -> MmuReply {
        let mut st = self.state.lock();
        let di = match st.domain_index(domain) {
            Ok(i) => i,
            Err(e) => return MmuReply::error(e),
        };
        if let Some(v) = st
            .vcpus
            .iter()
            .find(|v| v.domain == domain && v.running_on.is_some())
        {
            return MmuReply::error(MmuError::VcpuRunning(v.id));
        }
        if let Some(f) = st
            .foreign
            .iter()
            .find(|f| f.owner == domain && f.domain != domain)
        {
            return MmuReply::error(MmuError::FramesMapped {
                mapper: f.domain,
                gfn: f.gfn,
            });
        }
        // Its own foreign mappings go with its shadows (the flush below
        // covers every pCPU that may cache them).
        st.foreign.retain(|f| f.domain != domain);
        let mut flush = None;
        let mut result = Ok(());
        let mut i = 0;
        while i < st.vcpus.len() {
            if st.vcpus[i].domain != domain {
                i += 1;
                continue;
            }
            let mut v = st.vcpus.swap_remove(i);
            add(&mut flush, all(v.ran_on.union(v.must_flush)));
            let mut frames = core::mem::take(&mut v.deferred);
            let r = shadow::collect(self.mem, v.root, &mut frames).map_err(MmuError::Memory);
            frames.push(v.root);
            result = result
                .and(r)
                .and(self.free_all(&mut frames, &mut v.counters.shadow_pages_freed));
            st.retired = st.retired.sum(&v.counters);
        }
        let d = st.domains.swap_remove(di);
        let reply = finish(result.map(|_| MmuReply::Done { flush: None }), flush);
        let mut own = d.counters;
        count_flush(&mut own, &reply);
        st.retired = st.retired.sum(&own);
        reply
    }

    fn create_vcpu(&self, domain: DomainId, vcpu: VcpuId) -> MmuReply {
        let mut st = self.state.lock();
        if let Err(e) = st.domain_index(domain) {
            return MmuReply::error(e);
        }
        if st.vcpus.iter().any(|v| v.id == vcpu) {
            return MmuReply::error(MmuError::VcpuExists(vcpu));
        }
        if st.vcpus.len() >= self.config.max_vcpus as usize {
            return MmuReply::error(MmuError::CapacityExceeded {
                what: Resource::Vcpus,
                limit: self.config.max_vcpus,
            });
        }
        let root = match shadow::alloc_table(self.mem) {
            Ok(r) => r,
            Err(InstallError::OutOfPool) => {
                return MmuReply::error(MmuError::OutOfShadowMemory(domain))
            }
            Err(InstallError::Memory(e)) => return MmuReply::error(MmuError::Memory(e)),
        };
        st.vcpus.push(Vcpu {
            id: vcpu,
            domain,
            cr3: GuestCr3(0),
            mode: PagingMode(0),
            root,
            running_on: None,
            ran_on: CpuSet::EMPTY,
            must_flush: CpuSet::EMPTY,
            deferred: Vec::new(),
            counters: ServerCounters {
                shadow_pages_created: 1,
                ..ServerCounters::default()
            },
        });
        st.note_peak(domain);
        MmuReply::Done { flush: None }
    }

    fn vcpu_scheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let r = st.vcpu(vcpu).and_then(|v| {
            self.enter(v, pcpu, &mut flush)?;
            Ok(MmuReply::LoadShadowRoot {
                vcpu,
                root: v.root.base(),
                flush: None,
            })
        });
        let reply = finish(r, flush);
        st.count_vcpu_reply(vcpu, &reply);
        reply
    }

    fn vcpu_descheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply {
        let mut st = self.state.lock();
        let r = st.vcpu(vcpu).and_then(|v| {
            if !pcpu.is_valid() {
                return Err(MmuError::InvalidPcpu(pcpu));
            }
            v.running_on = None;
            self.free_all(&mut v.deferred, &mut v.counters.shadow_pages_freed)?;
            Ok(MmuReply::Done { flush: None })
        });
        finish(r, None)
    }

    fn page_fault(
        &self,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gva: Gva,
        error_code: PfErrorCode,
    ) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let mut taken = 0;
        let r =
            self.page_fault_locked(&mut st, &mut flush, &mut taken, vcpu, pcpu, gva, error_code);
        let reply = finish(r, flush);
        if let Ok(v) = st.vcpu(vcpu) {
            let c = &mut v.counters;
            c.page_faults += 1;
            c.shadow_pages_created += taken;
            match reply {
                MmuReply::Resume { .. } => c.faults_fixed += 1,
                MmuReply::InjectPageFault { .. } => c.faults_injected += 1,
                MmuReply::EmulateWrite { .. } => c.emulate_write_replies += 1,
                _ => {}
            }
            count_flush(c, &reply);
            let domain = v.domain;
            if taken > 0 {
                st.note_peak(domain);
            }
        }
        reply
    }

    fn write_cr3(&self, vcpu: VcpuId, pcpu: PcpuId, cr3: GuestCr3) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let State { vcpus, foreign, .. } = &mut *st;
        let r = find_vcpu(vcpus, vcpu).and_then(|v| {
            self.enter(v, pcpu, &mut flush)?;
            v.cr3 = cr3;
            self.zap(v, foreign, Some(pcpu), &mut flush)?;
            Ok(MmuReply::LoadShadowRoot {
                vcpu,
                root: v.root.base(),
                flush: None,
            })
        });
        let reply = finish(r, flush);
        st.count_vcpu_reply(vcpu, &reply);
        reply
    }

    fn set_paging_mode(&self, vcpu: VcpuId, pcpu: PcpuId, mode: PagingMode) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let State { vcpus, foreign, .. } = &mut *st;
        let r = find_vcpu(vcpus, vcpu).and_then(|v| {
            self.enter(v, pcpu, &mut flush)?;
            if mode.0 & !SUPPORTED_MODE != 0 {
                return Err(MmuError::UnsupportedPagingMode(mode));
            }
            let switched = v.mode.paging() != mode.paging();
            v.mode = mode;
            self.zap(v, foreign, Some(pcpu), &mut flush)?;
            // Paging switched on or off: the (emptied) tree now shadows the
            // other source; the protocol wants the root named.
            Ok(if switched {
                MmuReply::LoadShadowRoot {
                    vcpu,
                    root: v.root.base(),
                    flush: None,
                }
            } else {
                MmuReply::Done { flush: None }
            })
        });
        let reply = finish(r, flush);
        st.count_vcpu_reply(vcpu, &reply);
        reply
    }

    fn invlpg(&self, vcpu: VcpuId, pcpu: PcpuId, _gva: Gva) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let State { vcpus, foreign, .. } = &mut *st;
        let r = find_vcpu(vcpus, vcpu).and_then(|v| {
            self.enter(v, pcpu, &mut flush)?;
            // Simplest correct: INVLPG drops the vCPU's whole tree (a 2 MiB
            // or 1 GiB guest page is many shadow leaves anyway).
            self.zap(v, foreign, Some(pcpu), &mut flush)?;
            Ok(MmuReply::Done { flush: None })
        });
        let reply = finish(r, flush);
        st.count_vcpu_reply(vcpu, &reply);
        reply
    }

    fn emulated_write(
        &self,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gpa: Gpa,
        value: u64,
        size: u8,
    ) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let r = self.emulated_write_locked(&mut st, &mut flush, vcpu, pcpu, gpa, value, size);
        let reply = finish(r, flush);
        if let Ok(v) = st.vcpu(vcpu) {
            if matches!(reply, MmuReply::WriteDone { .. }) {
                v.counters.emulated_writes += 1;
            }
            count_flush(&mut v.counters, &reply);
        }
        reply
    }

    fn enable_dirty_log(&self, domain: DomainId) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let r = st.domain_index(domain).and_then(|di| {
            let d = &mut st.domains[di];
            if d.dirty.is_none() {
                let log = d
                    .memory
                    .iter()
                    .map(|r| alloc::vec![0u64; r.pages.div_ceil(64) as usize])
                    .collect();
                d.dirty = Some(log);
            }
            self.write_protect_domain(&mut st, domain, &mut flush)?;
            Ok(MmuReply::Done { flush: None })
        });
        let reply = finish(r, flush);
        st.count_domain_reply(domain, &reply);
        reply
    }

    fn disable_dirty_log(&self, domain: DomainId) -> MmuReply {
        let mut st = self.state.lock();
        let r = st.domain_index(domain).map(|di| {
            st.domains[di].dirty = None;
            MmuReply::Done { flush: None }
        });
        finish(r, None)
    }

    fn get_and_clear_dirty(&self, domain: DomainId, start: Gfn) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let r = self.get_and_clear_dirty_locked(&mut st, &mut flush, domain, start);
        let reply = finish(r, flush);
        st.count_domain_reply(domain, &reply);
        reply
    }

    fn zap_all(&self, domain: DomainId) -> MmuReply {
        let mut st = self.state.lock();
        let mut flush = None;
        let r = st.domain_index(domain).and_then(|_| {
            let State { vcpus, foreign, .. } = &mut *st;
            for v in vcpus.iter_mut().filter(|v| v.domain == domain) {
                self.zap(v, foreign, None, &mut flush)?;
            }
            Ok(MmuReply::Done { flush: None })
        });
        let reply = finish(r, flush);
        if let (MmuReply::Done { .. }, Ok(di)) = (&reply, st.domain_index(domain)) {
            st.domains[di].counters.zaps += 1;
        }
        st.count_domain_reply(domain, &reply);
        reply
    }

    fn map_foreign(
        &self,
        domain: DomainId,
        gfn: Gfn,
        owner: DomainId,
        mfn: Mfn,
        writable: bool,
    ) -> MmuReply {
        let mut st = self.state.lock();
        let r = (|| {
            let di = st.domain_index(domain)?;
            let oi = st.domain_index(owner)?;
            if !st.domains[oi]
                .memory
                .iter()
                .any(|r| mfn.0 >= r.mfn.0 && mfn.0 - r.mfn.0 < r.pages)
            {
                return Err(MmuError::NotOwnedBy { mfn, owner });
            }
            if gfn.0 >= MAX_GUEST_FRAME {
                return Err(MmuError::GpaNotInMemory(gfn.base()));
            }
            let in_map = st.domains[di]
                .memory
                .iter()
                .any(|r| r.translate(gfn).is_some());
            if in_map
                || st
                    .foreign
                    .iter()
                    .any(|f| f.domain == domain && f.gfn == gfn)
            {
                return Err(MmuError::GfnInUse(gfn));
            }
            let held = st.foreign.iter().filter(|f| f.domain == domain).count();
            if held >= crate::MAX_FOREIGN_PER_DOMAIN as usize {
                return Err(MmuError::CapacityExceeded {
                    what: Resource::ForeignMaps,
                    limit: crate::MAX_FOREIGN_PER_DOMAIN,
                });
            }
            st.foreign.push(Foreign {
                domain,
                gfn,
                owner,
                mfn,
                writable,
                dropped_accessed: None,
            });
            Ok(MmuReply::Done { flush: None })
        })();
        finish(r, None)
    }

    fn unmap_foreign(&self, domain: DomainId, gfn: Gfn) -> MmuReply {
        let mut st = self.state.lock();
        let r = (|| {
            st.domain_index(domain)?;
            let fi = st
                .foreign
                .iter()
                .position(|f| f.domain == domain && f.gfn == gfn)
                .ok_or(MmuError::NotForeignMapped(gfn))?;
            let mfn = st.foreign[fi].mfn;
            let mut accessed = false;
            let mut cpus = CpuSet::EMPTY;
            if let Some(c) = st.foreign[fi].dropped_accessed {
                accessed = true;
                cpus = cpus.union(c);
            }
            for v in st.vcpus.iter().filter(|v| v.domain == domain) {
                let (_, a) = shadow::unmap_frame(self.mem, v.root, mfn)?;
                accessed |= a;
                cpus = cpus.union(v.ran_on).union(v.must_flush);
            }
            st.foreign.swap_remove(fi);
            Ok(MmuReply::ForeignUnmapped {
                mfn,
                accessed,
                cpus,
                flush: None,
            })
        })();
        finish(r, None)
    }

    fn counters(&self, domain: Option<DomainId>) -> MmuReply {
        let st = self.state.lock();
        let counters = match domain {
            None => st.total_counters(),
            Some(id) => match st.domain_index(id) {
                Ok(di) => st.domain_counters(&st.domains[di]),
                Err(e) => return MmuReply::error(e),
            },
        };
        MmuReply::Counters {
            counters,
            flush: None,
        }
    }
}
