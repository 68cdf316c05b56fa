//! The fast MMU server: cached shadows with rmaps, zap generations, a
//! lockless fast page fault and a swappable shadow-L4 policy.
//!
//! # Design
//! - **Shadow page cache** keyed by `(zap generation, guest frame, role)`;
//!   the role packs the level, "direct" (the split of a guest large page),
//!   the access accumulated from the upper guest levels (W, U, NX) and the
//!   paging-mode bits that change leaf permissions (CR0.WP, EFER.NXE; SMEP
//!   and SMAP are refused, as by the reference). For a direct page the
//!   access is that of the large page's leaves, and W is in it only if the
//!   guest large-page entry is dirty (KVM's FNAME(fetch) drops write access
//!   for a clean one): two guest entries mapping one large page, one clean
//!   and one dirty, get different direct pages, so a write through the
//!   clean one still faults and its D bit is set (D1). That fault's walk
//!   sets D, the role now has W, and the parent link is pointed at the
//!   writable-role page (the old link is zapped as any replaced link is,
//!   with its flush and parent-list update). Shadows stay cached across CR3
//!   switches: switching back to a process whose tables did not change
//!   finds its root and the whole tree below it.
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
//!   only after a grace period of the [`lockless::FastGate`] (G1). Foreign
//!   frames (grant mappings) do change gfn -> mfn, but their leaves are
//!   never lockless-writable and have no gfn in the memory map, so the fast
//!   path never acts on them (F2, see `foreign`; modelled under `loom`).
//! - **Dirty logging** is a constructor argument ([`DirtyMode`]): write
//!   protection + the fast page fault (`fast-shared`, `fast-percpu`), or
//!   harvesting the hardware D bits of the shadow leaves through the rmaps
//!   (`fast-dbit`: no exit per written page; measured side by side in the
//!   benches). Under D-bit logging a leaf for a dirty, writable guest PTE
//!   is writable at once with its shadow D clear; get-and-clear takes the
//!   software log (emulated writes, guest A/D bits the server's walks set,
//!   leaves replaced or zapped while dirty: `leaf_gone`) and then
//!   clears the D bit of every leaf of the chunk found through the rmaps,
//!   flushing the domain's dirty mask if any was set.
//! - **Paging off** ([`PagingMode::OFF`], version 5): the vCPU's root is
//!   a direct level-4 page keyed by frame 0 with OFF in its role (one per
//!   domain, shared by its vCPUs with paging off), and every page below it
//!   is direct too: the identity over the memory map (and foreign frames),
//!   built by faults like any shadow ([`walk::identity`] stands in for the
//!   guest walk), with every right and the leaf dirty, so prefetching,
//!   dirty logging, write protection of frames other vCPUs use as page
//!   tables (W1) and rmaps work unchanged. A frame that is neither RAM nor
//!   foreign gets `Mmio` and is never mapped. Switching paging on or off is
//!   a mode change like any other: the epoch bump and the flush of the
//!   requesting pCPU, and `LoadShadowRoot` with the root of the new mode;
//!   the old mode's pages stay cached until a zap (as roots of other CR3s
//!   do). With `PagingMode::MMIO` in long mode, an allowed access to a frame
//!   outside RAM ends the walk in `Mmio` instead of #PF | RSVD.
//! - **Shadow-L4 policy** ([`policy`]): shared roots or per-pCPU copies,
//!   chosen by the type parameter `P` in the registry.
//! - **Flush obligations**: every request accumulates its flushes in one
//!   `Flush` and returns one obligation, addressed to the domain's dirty
//!   mask only: the pCPUs where its vCPUs ran since their last full flush
//!   (a pCPU leaves the mask when a full flush reaches it while none of the
//!   domain's vCPUs runs there). Per-pCPU L4 copies are synced by the server
//!   itself (it writes every copy), so an L4 change needs no IPI beyond the
//!   TLB flush of the dirty mask. A vCPU scheduled on a pCPU gets a flush of
//!   that pCPU only if its translations there may be stale (another vCPU ran
//!   there since, or it changed CR3 / paging mode elsewhere: a per-vCPU
//!   flush epoch).
//!
//! # Prefetch ([`Prefetch`], module `prefetch`)
//! A guest demand fault costs the injected #PF, the emulated write of the
//! guest PTE, the miss of the handler zeroing the new page through its
//! direct map and the miss of the retried access. Prefetching removes the
//! last two where the architecture allows:
//! - **On an emulated write** of a level-1 guest table that has shadows
//!   (every role), the written entry's shadow is zapped as before and then
//!   reinstalled at once from the new guest value (KVM's
//!   `mmu_pte_write_new_pte`). Without it the retry misses.
//! - **Around a shadow miss** (KVM's `pte_prefetch`): after the faulting
//!   leaf, the other entries of its aligned [`PREFETCH_WINDOW`] of the same
//!   level-1 shadow page are filled from the guest table (or, in a direct
//!   page, from the guest large entry the walk just used).
//!
//! The rules, and why:
//! - **Guest A must already be set** in the guest leaf. Hardware sets A
//!   only on an access, and a shadow leaf lets the guest access without an
//!   exit, so shadowing an entry with A clear would leave A clear after a
//!   real access: a guest-visible difference from the reference (the
//!   differential tests compare all of guest memory). KVM's rule too
//!   (`prefetch_invalid_gpte`). The upper levels need no check: a shadow
//!   link exists only while the guest entry it shadows has A set (linked by
//!   a walk that set it; a guest write to that entry zaps the link).
//!   Consequence: a guest that writes PTEs with A clear (Umbra's test
//!   guests do; Linux writes them with A set) still takes the retry miss,
//!   which then sets A exactly as on the reference.
//! - **Writable only if the guest's D bit is set** (so no write can skip
//!   setting D), the path is writable, the frame is not shadowed as a page
//!   table (W1), and then as a fill for a read: under dirty logging by
//!   write protection read-only (the fast page fault logs the first
//!   write), under D-bit logging writable with the shadow D clear.
//!   Never wider than the guest's rights: W, U and NX are the guest leaf's
//!   combined with the access of the upper levels, which the shadow page's
//!   role holds. The CR0.WP=0 supervisor-write widening is for the
//!   faulting access only in a page-table shadow; in a direct page it is
//!   part of the role (W set, U clear, as KVM's direct access), so every
//!   leaf of the page, prefetched or not, has the role's access (D1).
//! - Only present guest entries **without reserved bits** (in the paging
//!   mode of the page's role) **whose frame is inside the domain's memory
//!   map**; anything else is left to a fault (which injects what the
//!   reference injects).
//! - Only into **not-present** shadow entries of **live pages of the
//!   current generation**, so no flush is owed (a TLB caches no
//!   not-present entry) and Z1 holds; every installed leaf goes into the
//!   gfn's rmap (R1). Only level-1 leaves: per-pCPU L4 copies are untouched.
//! - **Direct pages are writable by role only when dirty**: a direct page
//!   is shared by every guest large entry with the same frames and role,
//!   so its role carries W only if the guest large entry's D is set (as in
//!   KVM); otherwise a writable leaf filled through a dirty large entry
//!   would let a write through a clean one skip setting its D.
//! - **Write flooding**: a write that installs a prefetched leaf (a present,
//!   accessed entry to guest memory without reserved bits) resets the
//!   page's flood count instead of raising it: the frame is in use as a
//!   page table, and with prefetching no fault follows to reset it.
//!
//! # When a flush is acknowledged
//! The abi's reply contract says a pCPU carries out a reply (flush included,
//! remote acknowledgements awaited) before it sends its next request. So an
//! obligation returned to a request from pCPU `p` is acknowledged by the
//! next request from `p`. Requests without a pCPU (`ZapAll`, dirty log,
//! domain control) name no requester: their obligation is taken as
//! acknowledged once every pCPU in its CPU set has sent a later request
//! (each was forced out by the flush IPI before it could run the guest
//! again), and at once if the set is empty. One exception, when the pool
//! is empty while serving pCPU `p` and no other pCPU runs a vCPU of the
//! domain: the domain is zapped and its frames freed at once (nothing else
//! can walk them, and the zap's obligation is carried out before `p`
//! re-enters the guest).
//!
//! # Invariants (checked by [`FastServer::audit`] in the tests)
//! - **P1 parents**: a live shadow page's `parents` list holds exactly the
//!   present non-leaf shadow entries (of live pages of the current
//!   generation) that point at its frame.
//! - **P2 pinning**: within a generation, a shadow page is unshadowed only
//!   when it has no parents and no vCPU uses it as its root (`roots` counts
//!   exactly the vCPUs whose root it is); roots without users stay cached
//!   (for CR3 switching) until a zap, which obsoletes every page at once.
//!   Write flooding never unshadows an L4 or a pinned page. No hidden mode
//!   flag changes what a function does: callers pass what they mean
//!   (`for_table` to `write_protect`, the budget to `reclaim`).
//! - **R1 rmap**: the rmap of a gfn holds exactly the present leaf entries
//!   of live current-generation pages that map it (obsolete pages' entries
//!   stay until their lazy free removes them), prefetched ones included.
//! - **A1 accessed/dirty**: a present shadow leaf exists only for a guest
//!   leaf whose A bit is set (a fill sets it by walking; a prefetch requires
//!   it), and is writable (or lockless-writable) only if the guest leaf's D
//!   bit is set; a direct page's role is writable only if its guest large
//!   entry is dirty.
//! - **W1 write protection**: no present leaf of the current generation is
//!   writable (or lockless-writable) while its gfn has an indirect shadow.
//! - **G1/G2**: see [`lockless`].
//! - **D1 dirty large pages**: no present leaf of a direct page whose role
//!   lacks W is writable (or lockless-writable); a direct page's role has W
//!   only if the guest large-page entry it was linked for was dirty (and
//!   writable). A guest write clearing that D bit is an emulated write to
//!   a write-protected table and zaps the link, so a writable leaf never
//!   outlives the D bit that allowed it.
//! - **Z1**: a current-generation page only links current-generation pages.
//! - **F1, F2, F3** foreign frames (grant mappings): see `foreign`.

mod audit;
mod cache;
mod counters;
mod dirty;
mod fault;
mod foreign;
pub mod lockless;
pub mod policy;
mod prefetch;
pub mod rmap;
mod server;
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
pub const SUPPORTED_MODE: u32 = PagingMode::WP
    | PagingMode::NXE
    | PagingMode::PGE
    | PagingMode::PCIDE
    | PagingMode::OFF
    | PagingMode::MMIO;

/// With paging off, guest-virtual addresses are 32-bit.
const PAGING_OFF_LIMIT: u64 = 1 << 32;

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
    /// and logs the page. `fast-shared` and `fast-percpu` use this.
    WriteProtect,
    /// Hardware D bits: leaves stay writable; get-and-clear harvests and
    /// clears the D bit of every leaf mapping a frame of the chunk (through
    /// the rmaps) and flushes the TLBs that may cache a dirty entry. The
    /// guest's writes take no exit at all. `fast-dbit` uses this.
    DirtyBits,
}

/// Shadow entries prefetched (a constructor argument, so tests and benches
/// can measure the exits prefetching saves). See the module docs, "Prefetch".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prefetch {
    /// Only the faulting access is shadowed; an emulated PTE write only zaps.
    Off,
    /// An emulated write of a present, accessed guest PTE installs its shadow
    /// leaf, and a shadow miss also fills up to [`PREFETCH_WINDOW`] - 1
    /// neighbouring leaves. The registered servers use this.
    On,
}

/// Aligned window of leaf entries a shadow miss fills (KVM's pte_prefetch
/// uses 8; 16 halves the direct-map misses of page zeroing once more).
pub const PREFETCH_WINDOW: u64 = 16;

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
    /// Shadow leaves installed by prefetching (emulated write or neighbour).
    pub prefetched: AtomicU64,
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
        let mode_bits = mode.0
            & (PagingMode::WP
                | PagingMode::NXE
                | PagingMode::SMEP
                | PagingMode::SMAP
                | PagingMode::OFF);
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
    /// The access (W, U, NX) accumulated above the page's entries.
    fn access(self) -> (bool, bool, bool) {
        (
            self.0 & Self::W != 0,
            self.0 & Self::U != 0,
            self.0 & Self::NX != 0,
        )
    }
    /// The paging-mode bits the page was built for.
    fn mode(self) -> PagingMode {
        PagingMode(self.0 >> 8)
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
    /// `GetCounters` counts (see [`counters`]).
    counters: counters::DomCounters,
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
    /// Foreign frames mapped into the domain and their leaves
    /// ([`foreign`]).
    foreign: foreign::ForeignMaps,
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
    /// Counts of destroyed domains (see [`counters`]).
    retired: abi::mmu::ServerCounters,
    /// The most shadow frames the server held at once (see [`counters`]).
    peak: u64,
    prefetch: Prefetch,
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
        Self::with_options(name, mem, config, dirty_mode, Prefetch::On)
    }

    /// Like [`FastServer::with_dirty_mode`], prefetching as `prefetch` says.
    pub fn with_options(
        name: &'static str,
        mem: &'m dyn PhysMem,
        config: crate::Config,
        dirty_mode: DirtyMode,
        prefetch: Prefetch,
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
                retired: Default::default(),
                peak: 0,
                prefetch,
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
        inner.count_reply(about, &reply);
        inner.shrink_dirty_mask(about, reply.flush());
        reply
    }
}
