//! The fast MMU server: cached shadows with rmaps, zap generations, a
//! lockless fast page fault and a swappable shadow-L4 policy.
//!
//! # Design
//! - **Shadow page cache** keyed by `(zap generation, guest frame, role)`;
//!   the role packs the level, "direct" (the split of a guest large page),
//!   the access accumulated from the upper guest levels (W, U, NX) and the
//!   paging-mode bits that change leaf permissions (CR0.WP, EFER.NXE, SMEP,
//!   SMAP). Shadows stay cached across CR3 switches: switching back to a
//!   process whose tables did not change finds its root and the whole tree
//!   below it.
//! - **Coherence by write protection, not unsync/OOS.** Every guest frame
//!   shadowed as a page table (an indirect shadow page exists for it) is
//!   mapped read-only everywhere; a guest write to it comes back as
//!   `EmulateWrite`, and `EmulatedWrite` zaps exactly the shadow entries that
//!   shadow the written guest entries (in every role). Why not OOS: the
//!   protocol's TLB contract (flush obligations, checked against a per-pCPU
//!   TLB model) is much easier to keep exact when the shadows never lag the
//!   guest tables; resync at CR3 write / INVLPG would make those requests
//!   O(out-of-sync pages) and reintroduce the reference's cost on the very
//!   paths (CR3 switching) this server exists to make cheap. The price is one
//!   exit per guest PTE write, bounded by write-flood detection: a shadow
//!   page written [`FLOOD_LIMIT`] times without being used by a fault in
//!   between is unshadowed (the frame is probably not a page table anymore).
//! - **Reverse maps** ([`rmap`]) from gfn to every leaf shadow entry mapping
//!   it, and from each shadow page to its parent entries, in bounded
//!   descriptors with an inline single entry.
//! - **Zap generations** (seed 004): `ZapAll` bumps the domain's generation
//!   and moves the list of live shadow pages, unseen, to an obsolete batch:
//!   O(1). Every vCPU reloads its root (`AllReloadRoots`). Obsolete pages are
//!   freed later, at most [`RECLAIM_BATCH`] per request, only once the flush
//!   of the zap is acknowledged (see below) and after a fast-fault grace
//!   period.
//! - **Fast page fault** ([`lockless`], seed 001): a write fault on a
//!   present leaf that is read-only only because of dirty logging is fixed
//!   without the main lock, with one CAS, and the page is logged dirty. The
//!   race proofs (ABA on gfn -> mfn, lost W/D) are `loom` models in
//!   `mmu-server/tests/fast_loom.rs`. Here the gfn of a leaf is derived from
//!   the mfn in the entry through the domain's memory map, which never
//!   changes for the domain's life (a new map is a new domain), so the ABA
//!   of seed 001 can only arise through frame reuse: shadow frames are freed
//!   only after a grace period of the [`lockless::FastGate`] (G1).
//! - **Dirty logging** is a constructor argument ([`DirtyMode`]): write
//!   protection + the fast page fault (seed 001; what the registry's servers
//!   use), or harvesting the hardware D bits of the shadow leaves through the
//!   rmaps (no exit per written page; measured side by side in the benches).
//! - **Shadow-L4 policy** ([`policy`]): shared roots or per-pCPU copies,
//!   chosen by the type parameter `P` in the registry.
//! - **Flush obligations**: every request accumulates its flushes in one
//!   [`Flush`] and returns one obligation; only pCPUs in the domain's dirty
//!   mask (where its vCPUs ran since their last full flush), and for L4
//!   changes under per-pCPU copies only the pCPUs holding a copy.
//!
//! # When a flush is acknowledged
//! The abi's reply contract says a pCPU carries out a reply (flush included,
//! remote acknowledgements awaited) before it sends its next request. So an
//! obligation returned to a request from pCPU `p` is acknowledged by the
//! next request from `p`. Requests without a pCPU (`ZapAll`, dirty log,
//! domain control) name no requester: their obligation is taken as
//! acknowledged once every pCPU in its CPU set has sent a later request
//! (each was forced out by the flush IPI before it could run the guest
//! again), and at once if the set is empty.
//!
//! # Invariants (checked by [`FastServer::audit`] in the tests)
//! - **P1 parents**: a live shadow page's `parents` list holds exactly the
//!   present non-leaf shadow entries (of live pages of the current
//!   generation) that point at its frame.
//! - **P2 pinning**: a shadow page is freed only when it has no parents and
//!   no vCPU uses it as root; roots without users stay cached (for CR3
//!   switching) until a zap.
//! - **R1 rmap**: the rmap of a gfn holds exactly the present leaf entries
//!   of live current-generation pages that map it (obsolete pages' entries
//!   stay until their lazy free removes them).
//! - **W1 write protection**: no present leaf of the current generation is
//!   writable (or lockless-writable) while its gfn has an indirect shadow.
//! - **G1/G2**: see [`lockless`].
//! - **Z1**: a current-generation page only links current-generation pages.

pub mod lockless;
pub mod policy;
pub mod rmap;
pub mod walk;

pub(crate) use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
pub(crate) use alloc::sync::Arc;
pub(crate) use alloc::vec::Vec;

use abi::mem::PhysMem;
use abi::mmu::{
    DirtyChunk, FlushObligation, FlushScope, MemoryMap, MmuError, MmuReply, MmuServer,
    DIRTY_CHUNK_PAGES,
};
use abi::paging::{GuestCr3, PagingMode, PfErrorCode};
use abi::{CpuSet, DomainId, Gfn, Gpa, Gva, Hpa, Mfn, PcpuId, VcpuId};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use lockless::{
    fast_fix_write, needs_flush, update_leaf, Cell64, DirtyLog, FastGate, FastOutcome, Gate,
    SPTE_A, SPTE_ADDR, SPTE_D, SPTE_FAST_W, SPTE_NX, SPTE_P, SPTE_U, SPTE_W,
};
use policy::{L4Policy, RootRef};
use rmap::Head;
use walk::{gfn_to_mfn, mfn_to_gfn, WalkError};

/// Emulated writes to a shadowed frame, without a fault using its shadow in
/// between, after which the frame is unshadowed.
pub const FLOOD_LIMIT: u8 = 3;
/// Obsolete shadow pages freed per request at most.
pub const RECLAIM_BATCH: usize = 64;

/// Paging-mode bits this server implements (the rest are refused).
pub const SUPPORTED_MODE: u32 =
    PagingMode::WP | PagingMode::NXE | PagingMode::PGE | PagingMode::PCIDE;

/// Entries per table.
const ENTRIES: u64 = 512;
/// Present non-leaf shadow entry bits (permissive: the leaf decides).
const LINK_BITS: u64 = SPTE_P | SPTE_W | SPTE_U | SPTE_A;

/// How the server logs written pages (a constructor argument, so both are
/// measured side by side by the benches).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtyMode {
    /// Seed 001: get-and-clear write-protects the pages it reports; the next
    /// write faults and the lockless fast page fault restores W with one CAS
    /// and logs the page. The registered servers use this.
    WriteProtect,
    /// Hardware D bits: leaves stay writable; get-and-clear harvests and
    /// clears the D bit of every leaf mapping a frame of the chunk (through
    /// the rmaps) and flushes the TLBs that may cache a dirty entry. The
    /// guest's writes take no exit at all.
    DirtyBits,
}

/// Counters a benchmark or test can read.
#[derive(Debug, Default)]
pub struct Stats {
    /// Shadow pages created.
    pub sp_created: AtomicU64,
    /// Shadow pages freed (frames returned).
    pub sp_freed: AtomicU64,
    /// Faults handled under the lock.
    pub slow_faults: AtomicU64,
    /// Frames unshadowed by write-flood detection.
    pub unshadowed: AtomicU64,
}

/// A shadow page role (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Role(u32);

impl Role {
    const DIRECT: u32 = 1 << 3;
    const W: u32 = 1 << 4;
    const U: u32 = 1 << 5;
    const NX: u32 = 1 << 6;
    fn new(level: u8, direct: bool, w: bool, u: bool, nx: bool, mode: PagingMode) -> Role {
        let mode_bits =
            mode.0 & (PagingMode::WP | PagingMode::NXE | PagingMode::SMEP | PagingMode::SMAP);
        Role(
            level as u32
                | if direct { Self::DIRECT } else { 0 }
                | if w { Self::W } else { 0 }
                | if u { Self::U } else { 0 }
                | if nx { Self::NX } else { 0 }
                | (mode_bits << 8),
        )
    }
    fn level(self) -> u8 {
        (self.0 & 7) as u8
    }
    fn direct(self) -> bool {
        self.0 & Self::DIRECT != 0
    }
}

/// One shadow page.
#[derive(Debug)]
struct Sp {
    live: bool,
    frame: Mfn,
    gfn: u64,
    role: Role,
    gen: u64,
    domain: u32,
    parents: Head,
    /// vCPUs using this page as their root (P2).
    roots: u32,
    flood: u8,
}

/// A batch of shadow pages waiting for a flush acknowledgement.
#[derive(Debug)]
struct Pending {
    /// Global request number of the reply that carried the flush.
    seq: u64,
    /// pCPUs that must have sent a request after `seq`.
    need: CpuSet,
    /// Obsolete pages still to clean (rmaps) and free (moved here whole by
    /// a zap: O(1)).
    sps: BTreeSet<u32>,
    /// Whether the pages were already cleaned (individually zapped).
    cleaned: bool,
    /// Obsolete page-table counts, dropped in bounded steps.
    pt: BTreeMap<u64, u32>,
}

/// What the lockless path needs of a domain.
#[derive(Debug)]
struct DomShared {
    gate: FastGate<AtomicU64>,
    memory: MemoryMap,
    /// Bit per guest frame, in memory-map order.
    dirty: Vec<AtomicU64>,
    logging: AtomicBool,
}

impl DomShared {
    fn bit_of(&self, gfn: u64) -> Option<u64> {
        let mut base = 0;
        for r in &self.memory {
            if gfn >= r.gfn.0 && gfn - r.gfn.0 < r.pages {
                return Some(base + gfn - r.gfn.0);
            }
            base += r.pages;
        }
        None
    }
}

impl DirtyLog for DomShared {
    fn mark(&self, gfn: u64) {
        if let Some(b) = self.bit_of(gfn) {
            if let Some(w) = self.dirty.get((b / 64) as usize) {
                w.fetch_or(1 << (b % 64), Ordering::SeqCst);
            }
        }
    }
}

#[derive(Debug)]
struct Domain {
    shared: Arc<DomShared>,
    gen: u64,
    cache: BTreeMap<(u64, u64, Role), u32>,
    /// gfn -> number of current-generation indirect shadows of it.
    pt: BTreeMap<u64, u32>,
    rmap: BTreeMap<u64, Head>,
    pool: rmap::Pool,
    active: BTreeSet<u32>,
    pending: VecDeque<Pending>,
    dirty_mask: CpuSet,
    vcpus: Vec<u32>,
}

#[derive(Debug)]
struct Vcpu {
    domain: u32,
    cr3: GuestCr3,
    mode: PagingMode,
    pcpu: Option<PcpuId>,
    root: Option<u32>,
    fast: Arc<AtomicU64>,
    /// Bumped by every full flush of the vCPU's own translations (CR3
    /// write, mode change): entries its ASID cached on other pCPUs before
    /// are stale there.
    epoch: u64,
}

/// The lockless view of a vCPU.
#[derive(Debug, Clone)]
struct VcpuFast {
    root: Arc<AtomicU64>,
    dom: Arc<DomShared>,
}

/// What a request is about (for the dirty mask of its domain).
#[derive(Clone, Copy, Debug)]
enum About {
    Vcpu(VcpuId),
    Domain(DomainId),
}

/// A flush accumulated over one request (one obligation per reply).
#[derive(Debug, Default, Clone, Copy)]
struct Flush(Option<FlushObligation>);

impl Flush {
    fn add(&mut self, cpus: CpuSet, scope: FlushScope) {
        if cpus.is_empty() && scope != FlushScope::AllReloadRoots {
            return;
        }
        self.0 = FlushObligation::merge(self.0, Some(FlushObligation { cpus, scope }));
    }
}

/// Everything behind the main lock.
struct Inner<P> {
    domains: BTreeMap<u32, Domain>,
    vcpus: BTreeMap<u32, Vcpu>,
    sps: Vec<Sp>,
    free_ids: Vec<u32>,
    by_frame: BTreeMap<u64, u32>,
    seq: u64,
    last_seq: [u64; 64],
    /// (vCPU, its epoch) last loaded on each pCPU: the pCPU's TLB holds no
    /// stale entry of that vCPU only while this matches.
    last_on_pcpu: [Option<(u32, u64)>; 64],
    policy: P,
    flush: Flush,
    /// pCPU of the request being served (None for control requests).
    requester: Option<PcpuId>,
    maxphyaddr: u8,
    dirty_mode: DirtyMode,
}

/// The fast server over physical memory `mem` with shadow-L4 policy `P`.
pub struct FastServer<'m, P> {
    name: &'static str,
    config: crate::Config,
    mem: &'m dyn PhysMem,
    inner: spin::Mutex<Inner<P>>,
    fast: spin::RwLock<BTreeMap<u32, VcpuFast>>,
    stats: Stats,
}

/// A leaf shadow entry in a frame, as a [`Cell64`].
struct PhysCell<'a> {
    mem: &'a dyn PhysMem,
    at: Hpa,
}

impl Cell64 for PhysCell<'_> {
    fn load(&self) -> u64 {
        self.mem.read_u64(self.at).unwrap_or(0)
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<u64, u64> {
        match self.mem.compare_exchange_u64(self.at, current, new) {
            Ok(r) => r,
            // An unreadable entry never matches: the caller falls back.
            Err(_) => Err(!current),
        }
    }
}

fn entry_at(frame: Mfn, idx: u64) -> Hpa {
    Hpa(frame.base().0 + 8 * idx)
}

fn spte_frame(v: u64) -> Mfn {
    Mfn((v & SPTE_ADDR) >> 12)
}

impl<'m, P: L4Policy> FastServer<'m, P> {
    /// A server named `name` (its registry name) over `mem`, logging dirty
    /// pages by write protection and the lockless fast page fault.
    pub fn new(name: &'static str, mem: &'m dyn PhysMem, config: crate::Config) -> Self {
        Self::with_dirty_mode(name, mem, config, DirtyMode::WriteProtect)
    }

    /// Like [`FastServer::new`] with the given way of logging dirty pages.
    pub fn with_dirty_mode(
        name: &'static str,
        mem: &'m dyn PhysMem,
        config: crate::Config,
        dirty_mode: DirtyMode,
    ) -> Self {
        Self {
            name,
            config,
            mem,
            inner: spin::Mutex::new(Inner {
                domains: BTreeMap::new(),
                vcpus: BTreeMap::new(),
                sps: Vec::new(),
                free_ids: Vec::new(),
                by_frame: BTreeMap::new(),
                seq: 0,
                last_seq: [0; 64],
                last_on_pcpu: [None; 64],
                policy: P::new(),
                flush: Flush::default(),
                requester: None,
                maxphyaddr: config.maxphyaddr,
                dirty_mode,
            }),
            fast: spin::RwLock::new(BTreeMap::new()),
            stats: Stats::default(),
        }
    }

    /// The server's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The physical memory the server uses.
    pub fn mem(&self) -> &'m dyn PhysMem {
        self.mem
    }

    /// Live shadow pages of `domain` in its current generation.
    pub fn shadow_pages(&self, domain: DomainId) -> usize {
        self.inner
            .lock()
            .domains
            .get(&domain.0)
            .map_or(0, |d| d.active.len())
    }

    /// Runs `f` under the main lock with request bookkeeping, and attaches
    /// the accumulated flush to its reply.
    fn serve(
        &self,
        requester: Option<PcpuId>,
        about: About,
        f: impl FnOnce(&mut Inner<P>, &dyn PhysMem, &Stats) -> MmuReply,
    ) -> MmuReply {
        if let Some(p) = requester {
            if !p.is_valid() {
                return MmuReply::error(MmuError::InvalidPcpu(p));
            }
        }
        let mut inner = self.inner.lock();
        inner.seq += 1;
        let seq = inner.seq;
        if let Some(p) = requester {
            inner.last_seq[p.0 as usize] = seq;
        }
        inner.requester = requester;
        inner.flush = Flush::default();
        let reply = f(&mut inner, self.mem, &self.stats);
        let flush = core::mem::take(&mut inner.flush);
        let reply = reply.add_flush(flush.0);
        inner.shrink_dirty_mask(about, reply.flush());
        reply
    }

    /// Checks invariants P1, P2 (parents), R1 (rmaps), W1 (write protection)
    /// and Z1 (generations) over every domain; returns the first violation.
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
                        let gfn = mfn_to_gfn(&d.shared.memory, spte_frame(v)).ok_or_else(|| {
                            format!("sp {id} entry {i} maps {v:#x} outside the guest")
                        })?;
                        rmaps.entry(gfn.0).or_default().insert(at.0);
                        if v & (SPTE_W | SPTE_FAST_W) != 0 && d.pt.contains_key(&gfn.0) {
                            return Err(format!(
                                "W1: sp {id} entry {i} writable to page table gfn {}",
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

    fn fast_page_fault(&self, vcpu: VcpuId, gva: Gva, ec: PfErrorCode) -> Option<MmuReply> {
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
            // (Not counted: a shared counter would bounce its cache line
            // between the pCPUs this path exists to keep apart.)
            FastOutcome::Fixed { .. } | FastOutcome::AlreadyWritable => {
                Some(MmuReply::Resume { flush: None })
            }
            FastOutcome::NotFast | FastOutcome::Raced => None,
        }
    }
}

impl<P: L4Policy> Inner<P> {
    /// Minimal flushes: after a full flush of the request's domain on some
    /// pCPUs, those that run none of its vCPUs hold none of its
    /// translations any more and leave its dirty mask (until one of its
    /// vCPUs is scheduled there again).
    fn shrink_dirty_mask(&mut self, about: About, flush: Option<FlushObligation>) {
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

    fn dom(&mut self, d: DomainId) -> Result<&mut Domain, MmuError> {
        self.domains.get_mut(&d.0).ok_or(MmuError::UnknownDomain(d))
    }

    /// Whether every pCPU a pending batch waits for has made a later request.
    fn acked(&self, p: &Pending) -> bool {
        p.need.iter().all(|c| self.last_seq[c.0 as usize] > p.seq)
    }

    /// Queues `sps` (already cleaned, or obsolete with `pt`) for freeing
    /// once the current request's flush is acknowledged.
    fn defer(&mut self, did: u32, sps: BTreeSet<u32>, cleaned: bool, pt: BTreeMap<u64, u32>) {
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
    fn reclaim(&mut self, mem: &dyn PhysMem, stats: &Stats, did: u32, mut budget: usize) -> usize {
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
                            if let Some(g) = mfn_to_gfn(&d.shared.memory, spte_frame(v)) {
                                if let Some(h) = d.rmap.get_mut(&g.0) {
                                    d.pool.remove(h, at);
                                    if *h == Head::Empty {
                                        d.rmap.remove(&g.0);
                                    }
                                }
                            }
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
            self.sps[id as usize].live = false;
            self.sps[id as usize].parents = Head::Empty;
            self.free_ids.push(id);
            if mem.free_frame(frame).is_ok() {
                freed += 1;
                stats.sp_freed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn alloc_frame(&mut self, mem: &dyn PhysMem, stats: &Stats, did: u32) -> Result<Mfn, MmuError> {
        if let Some(f) = mem.alloc_frame() {
            return Ok(f);
        }
        let ids: Vec<u32> = self.domains.keys().copied().collect();
        for d in core::iter::once(did).chain(ids) {
            if self.reclaim(mem, stats, d, usize::MAX) > 0 {
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
            if let Some(f) = mem.alloc_frame() {
                return Ok(f);
            }
        }
        Err(MmuError::OutOfShadowMemory(DomainId(did)))
    }

    /// A present leaf `old` was replaced: with D-bit logging, its D bit is
    /// the only record of writes through it, so it goes to the log.
    fn leaf_gone(&self, did: u32, old: u64) {
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
    fn harvest(&mut self, mem: &dyn PhysMem, did: u32, gfns: core::ops::Range<u64>) -> Vec<u64> {
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
    fn write_protect(&mut self, mem: &dyn PhysMem, did: u32, gfn: u64, for_table: bool) {
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

    /// Finds or creates the shadow page `(gfn, role)` of `did`.
    fn get_sp(
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

    fn root_ref(&self, id: u32) -> RootRef {
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
    fn set_link(&mut self, mem: &dyn PhysMem, pid: u32, idx: u64, value: u64) -> u64 {
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
    fn zap_entry(&mut self, mem: &dyn PhysMem, id: u32, idx: u64) {
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
            if let Some(g) = mfn_to_gfn(&d.shared.memory, spte_frame(old)) {
                if let Some(h) = d.rmap.get_mut(&g.0) {
                    d.pool.remove(h, at);
                    if *h == Head::Empty {
                        d.rmap.remove(&g.0);
                    }
                }
            }
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
    fn zap_sp(&mut self, mem: &dyn PhysMem, id: u32) {
        if !self.sps[id as usize].live {
            return;
        }
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
    fn zap_all(&mut self, did: u32) {
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

    /// The root page for `vcpu` in the current generation (pinning it).
    fn vcpu_root(&mut self, mem: &dyn PhysMem, stats: &Stats, vcpu: u32) -> Result<u32, MmuError> {
        let v = &self.vcpus[&vcpu];
        let (did, cr3, mode, old) = (v.domain, v.cr3, v.mode, v.root);
        let role = Role::new(4, false, true, true, false, mode);
        let id = self.get_sp(mem, stats, did, cr3.table().frame().0, role)?;
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
    fn load_root(
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
    fn fail(&mut self, vcpu: u32, e: MmuError) -> MmuReply {
        if let (MmuError::OutOfShadowMemory(_), Some(v)) = (e, self.vcpus.get(&vcpu)) {
            let did = v.domain;
            self.zap_all(did);
        }
        MmuReply::error(e)
    }

    /// The slow page fault.
    fn page_fault(
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
        let w = match walk::walk(mem, &shared.memory, self.maxphyaddr, cr3, mode, gva, ec) {
            Ok(w) => w,
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
        let logging = shared.logging.load(Ordering::SeqCst);
        if logging {
            for l in w.leaf_level..=4 {
                if w.changed & (1 << l) != 0 {
                    shared.mark(w.tables[l as usize].0);
                }
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
    fn emergency_reclaim(
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
        true
    }

    /// Builds the shadow path for a successful walk and installs the leaf.
    #[allow(clippy::too_many_arguments)]
    fn install(
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
                // below this entry.
                let span = 1u64 << (9 * (child_level as u32));
                let base = w.gfn.0 & !(span - 1);
                (base, Role::new(child_level, true, w.w, w.u, w.nx, mode))
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
        // The leaf.
        let mfn = gfn_to_mfn(&self.domains[&did].shared.memory, w.gfn)
            .ok_or(MmuError::GpaNotInMemory(w.gfn.base()))?;
        let (mut wr, mut u) = (w.w, w.u);
        if !w.w && !mode.wp() && ec.is_write() && !ec.is_user() {
            // CR0.WP=0: a supervisor write to a read-only page is allowed;
            // map it writable for the supervisor only (as KVM does).
            wr = true;
            u = false;
        }
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
                if let Some(g) = mfn_to_gfn(&d.shared.memory, spte_frame(old)) {
                    if let Some(h) = d.rmap.get_mut(&g.0) {
                        d.pool.remove(h, at);
                        if *h == Head::Empty {
                            d.rmap.remove(&g.0);
                        }
                    }
                }
            }
            let h = d.rmap.entry(w.gfn.0).or_default();
            d.pool.add(h, at);
        }
        if needs_flush(old, spte) {
            self.flush.add(mask, FlushScope::Page(gva));
        }
        Ok(())
    }

    fn emulated_write(
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
            let sp = &mut self.sps[id as usize];
            if sp.role.direct() || !sp.live {
                continue;
            }
            sp.flood = sp.flood.saturating_add(1);
            if sp.flood >= FLOOD_LIMIT && sp.role.level() < 4 && sp.roots == 0 {
                stats.unshadowed.fetch_add(1, Ordering::Relaxed);
                self.zap_sp(mem, id);
                continue;
            }
            for idx in first..=last {
                self.zap_entry(mem, id, idx);
            }
        }
        MmuReply::WriteDone { flush: None }
    }

    fn get_and_clear(&mut self, mem: &dyn PhysMem, did: u32, start: Gfn) -> MmuReply {
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
            let mut total = 0u64;
            for (i, r) in memory.iter().enumerate() {
                if !r.is_valid() {
                    return MmuReply::error(MmuError::BadRegion(*r));
                }
                for o in &memory[..i] {
                    if r.gfn.0 < o.gfn.0 + o.pages && o.gfn.0 < r.gfn.0 + r.pages {
                        return MmuReply::error(MmuError::OverlappingRegions(Gfn(r
                            .gfn
                            .0
                            .max(o.gfn.0))));
                    }
                }
                total = total.saturating_add(r.pages);
            }
            if total > config.max_guest_frames {
                return MmuReply::error(MmuError::CapacityExceeded {
                    what: abi::mmu::Resource::GuestFrames,
                    limit: u32::try_from(config.max_guest_frames).unwrap_or(u32::MAX),
                });
            }
            let words = total.div_ceil(64) as usize;
            let mut dirty = Vec::new();
            dirty.resize_with(words, || AtomicU64::new(0));
            let shared = Arc::new(DomShared {
                gate: FastGate::new(AtomicU64::new(0), AtomicU64::new(0)),
                memory: memory.clone(),
                dirty,
                logging: AtomicBool::new(false),
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
        if pcpu.is_valid() {
            if let Some(r) = self.fast_page_fault(vcpu, gva, error_code) {
                return r;
            }
        }
        self.serve(Some(pcpu), About::Vcpu(vcpu), |inner, mem, stats| {
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
            MmuReply::Done { flush: None }
        })
    }
}
