//! The MMU protocol: requests from the kernel, replies from the MMU server,
//! the [`MmuServer`] trait and the one [`dispatch`] from bytes to trait calls.
//!
//! # Wire format and compatibility
//! Messages are postcard-encoded. postcard is positional: an enum variant is
//! encoded as its index and struct fields in declaration order. Therefore
//! every enum and struct here is **append-only**: never reorder, remove or
//! retype a variant or field; add new variants at the end (and bump
//! [`PROTOCOL_VERSION`] for any change). `tests/pinned.rs` pins the exact
//! bytes of every variant. Every encoded message fits in [`MAX_MESSAGE`]
//! bytes; decoding rejects longer input, trailing bytes and any malformed
//! byte with a [`DecodeError`], never a panic.
//!
//! # Handshake
//! The kernel's first message to a server is [`MmuRequest::Hello`] with
//! [`PROTOCOL_VERSION`]; the server answers [`MmuReply::Welcome`] or an
//! [`MmuError::VersionMismatch`] error, after which the kernel must not use it.
//!
//! # The kernel's obligations (the reply contract)
//! Every reply is carried out **completely, on the pCPU that sent the
//! request, before that pCPU sends its next request to the server and before
//! the requesting vCPU re-enters the guest**. A server may therefore treat the
//! next request from a pCPU as the acknowledgement of everything it asked of
//! that pCPU before (for example to free shadow pages a flush made
//! unreachable).
//!
//! Every reply except `Welcome` carries `flush: Option<FlushObligation>`.
//! For a flush obligation the kernel must, on every pCPU in `cpus` (the
//! requesting one included if it is in the set), invalidate the domain's
//! cached translations named by `scope` (a wider flush is always allowed),
//! and wait until every remote pCPU has acknowledged. With
//! [`FlushScope::AllReloadRoots`] every shadow root previously handed out for
//! the domain is void: each vCPU of the domain must, before it next enters
//! the guest, send [`MmuRequest::VcpuScheduled`] again and load the root that
//! the reply names (the kernel forces running vCPUs out with the flush IPI).
//!
//! Further kernel obligations:
//! - Before a vCPU first enters the guest, and whenever it enters it on a
//!   pCPU after [`MmuRequest::VcpuDescheduled`], the kernel sends
//!   [`MmuRequest::VcpuScheduled`] and loads the root it is given; it sends
//!   `VcpuDescheduled` when it takes the vCPU off the pCPU (the server may
//!   then reuse shadow frames only that vCPU could reach).
//! - Translations cached for one vCPU are used only by that vCPU: an ASID
//!   per vCPU, or a flush when a pCPU switches between vCPUs.
//! - A domain is destroyed only when none of its vCPUs is scheduled.
//! - While a guest runs on shadow tables the hardware CR0.WP is 1, whatever
//!   the guest's CR0.WP (the kernel intercepts CR0 and reports the guest's
//!   value with [`MmuRequest::SetPagingMode`]). Shadow leaves are read-only
//!   to catch first writes (guest D bits, dirty logging); a server emulates
//!   the guest's CR0.WP = 0 in its shadow entries, not through hardware.
//! - Hardware EFER.NXE may be 1 even when the guest's is 0 (servers never set
//!   NX in a shadow entry for a guest with EFER.NXE = 0). SMEP/SMAP are off.
//! - Requests naming a vCPU are sent from the pCPU it runs on, while it is
//!   out of the guest (in an exit).
//!
//! Per reply (after the flush):
//! - [`MmuReply::Welcome`]: the server speaks `version`.
//! - [`MmuReply::Done`]: the control request or the guest's CR3 / INVLPG /
//!   mode change is complete; for an intercepted instruction the kernel
//!   completes it (advances RIP).
//! - [`MmuReply::Resume`]: re-enter the guest at the faulting instruction
//!   (the shadow entry is fixed or was already fixed by another pCPU).
//! - [`MmuReply::InjectPageFault`]: inject #PF with `error_code`, set the
//!   guest's CR2 to `address`, re-enter the guest.
//! - [`MmuReply::LoadShadowRoot`]: put `root` in the vCPU's VMCB CR3 (it
//!   takes effect on the next VMRUN), then complete the intercepted
//!   instruction if there was one.
//! - [`MmuReply::EmulateWrite`]: the faulting write targets a guest frame
//!   the server write-protects (a guest page table). The kernel decodes the
//!   instruction, sends [`MmuRequest::EmulatedWrite`] with `gpa` (the
//!   faulting byte's guest-physical address, as named here) and the value and
//!   size it decoded, and after [`MmuReply::WriteDone`] advances RIP. A write
//!   that crosses the page must be split by the kernel.
//! - [`MmuReply::WriteDone`]: the emulated write is in guest memory; advance
//!   RIP past the writing instruction.
//! - [`MmuReply::DirtyBitmap`]: one chunk of the dirty log; if `next` is
//!   `Some`, ask again from there to get the rest.
//! - [`MmuReply::Counters`]: the server's counters (see [`ServerCounters`]);
//!   nothing to do but the flush. A server that does not count answers
//!   [`MmuError::Unsupported`] with [`MmuRequest::GET_COUNTERS`].
//! - [`MmuReply::ForeignUnmapped`]: the foreign frame is unmapped from every
//!   shadow table; `accessed` says whether any shadow entry that mapped it
//!   had A set when it was cleared (or was cleared earlier with A set, see
//!   [`MmuRequest::UnmapForeign`]). The MMU server asks no flush for it
//!   itself: the requester (the grant server) must have the pCPUs of `cpus`
//!   flushed (scope All) before the frame is reused if `accessed` is true.
//!   If it is false no pCPU can cache a translation to the frame, because
//!   the CPU sets A in the entry before it caches a translation from it.
//! - [`MmuReply::Error`]: the request was refused or failed, with the reason
//!   and the offending value. The guest-visible state is unchanged except as
//!   the flush (if any) says. For a guest exit the kernel treats the vCPU as
//!   failed (it may retry, e.g. after freeing memory, or stop the domain).
//! - [`MmuReply::Mmio`] (version 5, only while the vCPU's mode has
//!   [`PagingMode::MMIO`] or [`PagingMode::OFF`]): the faulting access
//!   targets guest-physical `gpa`, which is not RAM (neither in the memory
//!   map nor a foreign frame). No shadow entry maps it, now or later. The
//!   kernel emulates the access (a device register, or all-ones reads and
//!   ignored writes where no device is) and advances RIP; the guest's A/D
//!   bits for the walk are already set. In long mode this is sent only for
//!   an access the guest tables allow (a forbidden one gets its #PF); with
//!   paging off for any access outside RAM, and for a write to a read-only
//!   foreign frame (dropped, as a write to ROM: there is no #PF to give).
//!
//! # Paging modes (version 5)
//! [`MmuRequest::SetPagingMode`] reports the guest's mode. A change that
//! keeps [`PagingMode::OFF`] as it was is answered `Done` or
//! `LoadShadowRoot`, as before. A change of `OFF` (either way) is always
//! answered [`MmuReply::LoadShadowRoot`]: the translation source changes
//! (the memory map vs the guest tables at the vCPU's recorded CR3), so the
//! vCPU's previous root is void for it and the reply names the root to load
//! before it re-enters the guest. Its flush obligation covers every pCPU
//! that may cache translations of the vCPU from before the change (at least
//! the requesting pCPU, scope `All` or wider): as on hardware, where a
//! CR0.PG change flushes the whole TLB, no translation of the old mode may
//! be used after it.
//! - **OFF -> long mode** (the guest set CR4.PAE, wrote CR3, set EFER.LME
//!   and then CR0.PG): the new root shadows the guest tables at the CR3 the
//!   last `WriteCr3` recorded (sent while paging was off; the kernel sends
//!   `WriteCr3` again if the guest writes CR3 later). No identity
//!   translation survives the flush.
//! - **long mode -> OFF**: the new root is an identity shadow of the memory
//!   map, built on demand by page faults; no translation of the guest
//!   tables survives the flush.
//!
//! `WriteCr3` while paging is off only records the value (the reply is
//! still `LoadShadowRoot`); `Invlpg` while paging is off flushes nothing the
//! guest can see.

use crate::addr::{Gfn, Gpa, Gva, Hpa, Mfn};
use crate::ids::{CpuSet, DomainId, PcpuId, VcpuId};
use crate::mem::MemError;
use crate::paging::{GuestCr3, PagingMode, PfErrorCode};
use crate::wire::{self, DecodeError, MAX_MESSAGE};
use core::fmt;
use serde::{Deserialize, Serialize};

/// The protocol version spoken by this `abi` (2: `GetCounters` / `Counters`
/// appended; 3: `MapForeign` / `UnmapForeign` / `ForeignUnmapped` appended,
/// with the errors and resource they need; 4: `ServerCounters::shadow_pages_peak`
/// appended; 5: paging modes for unmodified guests: `PagingMode::OFF` and
/// `PagingMode::MMIO`, the `Mmio` reply and the `FaultOutsideMode` error
/// appended, `SetPagingMode` changing `OFF` answered `LoadShadowRoot`).
pub const PROTOCOL_VERSION: u32 = 5;

/// The largest number of regions in a domain's memory map.
pub const MAX_REGIONS: usize = 16;

/// Bytes of dirty bitmap in one [`DirtyChunk`].
pub const DIRTY_CHUNK_BYTES: usize = 512;

/// Guest frames covered by one [`DirtyChunk`] (one bit each).
pub const DIRTY_CHUNK_PAGES: u64 = DIRTY_CHUNK_BYTES as u64 * 8;

/// One region of a domain's memory map: guest frames `gfn .. gfn + pages` are
/// host frames `mfn .. mfn + pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemRegion {
    /// The first guest frame.
    pub gfn: Gfn,
    /// The host frame backing `gfn`.
    pub mfn: Mfn,
    /// Number of 4 KiB frames (at least 1).
    pub pages: u64,
}

impl MemRegion {
    /// The host frame backing `gfn`, if the region holds it.
    pub const fn translate(&self, gfn: Gfn) -> Option<Mfn> {
        if gfn.0 >= self.gfn.0 && gfn.0 - self.gfn.0 < self.pages {
            match self.mfn.0.checked_add(gfn.0 - self.gfn.0) {
                Some(m) => Some(Mfn(m)),
                None => None,
            }
        } else {
            None
        }
    }

    /// Whether the region is well-formed: non-empty and neither its guest nor
    /// its host frame range overflows 52-bit physical addresses.
    pub const fn is_valid(&self) -> bool {
        const MAX_FRAME: u64 = 1 << 40;
        self.pages > 0
            && self.gfn.0 < MAX_FRAME
            && self.mfn.0 < MAX_FRAME
            && self.pages <= MAX_FRAME - self.gfn.0
            && self.pages <= MAX_FRAME - self.mfn.0
    }
}

/// A domain's guest-physical memory map, at most [`MAX_REGIONS`] regions.
pub type MemoryMap = heapless::Vec<MemRegion, MAX_REGIONS>;

/// Which translations a flush obligation invalidates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FlushScope {
    /// The 4 KiB page holding this guest-virtual address, for the vCPUs of
    /// the domain the request concerns.
    Page(Gva),
    /// `pages` consecutive 4 KiB pages starting at `start`, for the vCPUs of
    /// the domain the request concerns.
    Range {
        /// The first page.
        start: Gva,
        /// Number of pages.
        pages: u32,
    },
    /// Every translation of the domain the request concerns (all its vCPUs'
    /// ASIDs) cached on the pCPU. A full flush of every guest ASID is
    /// allowed; a server must not rely on it reaching other domains.
    All,
    /// Like `All`, and every shadow root handed out for the domain the
    /// request concerns is void: each of its vCPUs must fetch its root again
    /// (see the module docs).
    AllReloadRoots,
}

/// A TLB flush the kernel must carry out before going on (see the module
/// docs for the exact contract).
#[must_use = "a flush obligation must be carried out before the guest runs on"]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FlushObligation {
    /// The pCPUs that may cache the stale translations.
    pub cpus: CpuSet,
    /// What to invalidate on each of them.
    pub scope: FlushScope,
}

impl FlushObligation {
    /// Merges two optional obligations into one that covers both (the union
    /// of the CPU sets; the wider scope, widening differing pages to `All`).
    pub fn merge(a: Option<FlushObligation>, b: Option<FlushObligation>) -> Option<Self> {
        match (a, b) {
            (None, x) | (x, None) => {
                x.filter(|f| !f.cpus.is_empty() || f.scope == FlushScope::AllReloadRoots)
            }
            (Some(a), Some(b)) => {
                let scope = match (a.scope, b.scope) {
                    (FlushScope::AllReloadRoots, _) | (_, FlushScope::AllReloadRoots) => {
                        FlushScope::AllReloadRoots
                    }
                    (x, y) if x == y => x,
                    _ => FlushScope::All,
                };
                Some(FlushObligation {
                    cpus: a.cpus.union(b.cpus),
                    scope,
                })
            }
        }
    }
}

/// One chunk of a domain's dirty log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyChunk {
    /// The guest frame of bit 0 of byte 0.
    pub start: Gfn,
    /// Bit `i` of byte `j` set = guest frame `start + 8 * j + i` was written
    /// since the previous get-and-clear (or since logging was enabled).
    pub bits: heapless::Vec<u8, DIRTY_CHUNK_BYTES>,
    /// Where the next chunk starts (the next guest frame in the memory map
    /// after this chunk), or `None` when this was the last one.
    pub next: Option<Gfn>,
}

impl DirtyChunk {
    /// Whether `gfn` is marked dirty in this chunk.
    pub fn is_dirty(&self, gfn: Gfn) -> bool {
        let Some(off) = gfn.0.checked_sub(self.start.0) else {
            return false;
        };
        let byte = (off / 8) as usize;
        byte < self.bits.len() && self.bits[byte] & (1 << (off % 8)) != 0
    }

    /// Iterates over the dirty guest frames of the chunk.
    pub fn dirty(&self) -> impl Iterator<Item = Gfn> + '_ {
        self.bits.iter().enumerate().flat_map(move |(j, &b)| {
            (0..8u64)
                .filter(move |i| b & (1 << i) != 0)
                .map(move |i| Gfn(self.start.0 + 8 * j as u64 + i))
        })
    }
}

/// A request from the kernel (or a test playing the kernel) to an MMU server.
///
/// Append-only (see the module docs). `pcpu` is the physical CPU the vCPU
/// runs on when the request is sent.
// Messages are fixed-size values (no alloc): the big variant is the point.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmuRequest {
    /// Handshake: the protocol version the kernel speaks.
    Hello {
        /// Must be [`PROTOCOL_VERSION`].
        version: u32,
    },
    /// Create a domain with its guest-physical memory map (regions must not
    /// overlap in guest frames).
    CreateDomain {
        /// The new domain.
        domain: DomainId,
        /// Its memory map.
        memory: MemoryMap,
    },
    /// Destroy a domain, its vCPUs and all its shadows.
    DestroyDomain {
        /// The domain.
        domain: DomainId,
    },
    /// Create a vCPU in a domain (guest CR3 0, paging mode 0 until told).
    CreateVcpu {
        /// The domain.
        domain: DomainId,
        /// The new vCPU (unique across domains).
        vcpu: VcpuId,
    },
    /// The kernel is about to run `vcpu` on `pcpu`; answered with
    /// [`MmuReply::LoadShadowRoot`].
    VcpuScheduled {
        /// The vCPU.
        vcpu: VcpuId,
        /// Where it will run.
        pcpu: PcpuId,
    },
    /// `vcpu` stopped running on `pcpu`.
    VcpuDescheduled {
        /// The vCPU.
        vcpu: VcpuId,
        /// Where it ran.
        pcpu: PcpuId,
    },
    /// The guest took a #PF intercept (#VMEXIT 0x4E).
    PageFault {
        /// The vCPU.
        vcpu: VcpuId,
        /// Where it runs.
        pcpu: PcpuId,
        /// The faulting address (EXITINFO2).
        gva: Gva,
        /// The hardware error code (EXITINFO1) for the shadow tables.
        error_code: PfErrorCode,
    },
    /// The guest wrote CR3.
    WriteCr3 {
        /// The vCPU.
        vcpu: VcpuId,
        /// Where it runs.
        pcpu: PcpuId,
        /// The value written.
        cr3: GuestCr3,
    },
    /// The guest changed CR0.WP, CR0.PG, CR4 paging bits or EFER.NXE (or
    /// the kernel's MMIO emulation, [`PagingMode::MMIO`]). Answered `Done`
    /// or `LoadShadowRoot`; always `LoadShadowRoot` when [`PagingMode::OFF`]
    /// changes (see "Paging modes" in the module docs).
    SetPagingMode {
        /// The vCPU.
        vcpu: VcpuId,
        /// Where it runs.
        pcpu: PcpuId,
        /// The new mode.
        mode: PagingMode,
    },
    /// The guest executed INVLPG.
    Invlpg {
        /// The vCPU.
        vcpu: VcpuId,
        /// Where it runs.
        pcpu: PcpuId,
        /// The operand.
        gva: Gva,
    },
    /// A guest write the server asked to emulate ([`MmuReply::EmulateWrite`]).
    EmulatedWrite {
        /// The vCPU.
        vcpu: VcpuId,
        /// Where it runs.
        pcpu: PcpuId,
        /// The guest-physical address of the first byte written.
        gpa: Gpa,
        /// The value (its low `size` bytes are written, little-endian).
        value: u64,
        /// 1, 2, 4 or 8; the write must not cross a 4 KiB page.
        size: u8,
    },
    /// Start logging written guest frames.
    EnableDirtyLog {
        /// The domain.
        domain: DomainId,
    },
    /// Stop logging written guest frames.
    DisableDirtyLog {
        /// The domain.
        domain: DomainId,
    },
    /// Return and clear the dirty bits from `start` on (one chunk).
    GetAndClearDirty {
        /// The domain.
        domain: DomainId,
        /// The first guest frame of the chunk.
        start: Gfn,
    },
    /// Drop every shadow of the domain (e.g. its memory map changed).
    ZapAll {
        /// The domain.
        domain: DomainId,
    },
    /// Report the server's counters ([`MmuReply::Counters`]); changes
    /// nothing. Version 2.
    GetCounters {
        /// One domain's counters, or `None` for the whole server (every
        /// domain since the server was created, destroyed ones included).
        domain: Option<DomainId>,
    },
    /// Map host frame `mfn`, owned by domain `owner` (it is in `owner`'s
    /// memory map), at guest frame `gfn` of `domain`, a frame outside
    /// `domain`'s memory map and not foreign-mapped already. Sent by the
    /// grant server (through the kernel) for a grant mapping. Shadow entries
    /// for the frame are created with A clear (and D clear), writable only
    /// if `writable`, so that [`MmuRequest::UnmapForeign`] can tell whether
    /// any pCPU may cache a translation to it. Guest page tables are never
    /// read from a foreign frame (a walk through one injects #PF | RSVD).
    /// Answered `Done`. Version 3.
    MapForeign {
        /// The domain that maps.
        domain: DomainId,
        /// Where in its guest-physical space.
        gfn: Gfn,
        /// The domain that owns the frame.
        owner: DomainId,
        /// The frame.
        mfn: Mfn,
        /// Whether `domain` may write it.
        writable: bool,
    },
    /// Unmap the foreign frame at `gfn` of `domain`: clear every shadow
    /// entry that maps it, reading each entry's A bit atomically as it is
    /// cleared (swap). Answered [`MmuReply::ForeignUnmapped`], whose
    /// `accessed` also counts entries for the frame that the server dropped
    /// earlier (zap, reclaim, replacement) while they had A set. Version 3.
    UnmapForeign {
        /// The domain that mapped it.
        domain: DomainId,
        /// Where.
        gfn: Gfn,
    },
}

impl MmuRequest {
    /// The variant index of [`MmuRequest::GetCounters`] (what
    /// [`MmuError::Unsupported`] names when a server does not count).
    pub const GET_COUNTERS: u8 = 15;
    /// The variant index of [`MmuRequest::MapForeign`].
    pub const MAP_FOREIGN: u8 = 16;
    /// The variant index of [`MmuRequest::UnmapForeign`].
    pub const UNMAP_FOREIGN: u8 = 17;

    /// The request's variant index on the wire (its first byte), as
    /// [`MmuError::Unsupported`] names it.
    pub const fn variant_index(&self) -> u8 {
        match self {
            MmuRequest::Hello { .. } => 0,
            MmuRequest::CreateDomain { .. } => 1,
            MmuRequest::DestroyDomain { .. } => 2,
            MmuRequest::CreateVcpu { .. } => 3,
            MmuRequest::VcpuScheduled { .. } => 4,
            MmuRequest::VcpuDescheduled { .. } => 5,
            MmuRequest::PageFault { .. } => 6,
            MmuRequest::WriteCr3 { .. } => 7,
            MmuRequest::SetPagingMode { .. } => 8,
            MmuRequest::Invlpg { .. } => 9,
            MmuRequest::EmulatedWrite { .. } => 10,
            MmuRequest::EnableDirtyLog { .. } => 11,
            MmuRequest::DisableDirtyLog { .. } => 12,
            MmuRequest::GetAndClearDirty { .. } => 13,
            MmuRequest::ZapAll { .. } => 14,
            MmuRequest::GetCounters { .. } => Self::GET_COUNTERS,
            MmuRequest::MapForeign { .. } => Self::MAP_FOREIGN,
            MmuRequest::UnmapForeign { .. } => Self::UNMAP_FOREIGN,
        }
    }
}

/// What a server counts, for one domain or for the whole server
/// ([`MmuRequest::GetCounters`]). Append-only like every wire type.
///
/// Every field is a count of events since the domain was created (for the
/// whole server: since the server was created, summed over every domain,
/// destroyed ones included), except `shadow_pages_in_use`, a level at the
/// time of the reply. The meanings are exact so that two implementations
/// count the same thing; an event a server's design never produces (e.g.
/// `unsyncs` in a server that keeps shadows in sync by write protection) is
/// counted as 0, which is then the truth.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServerCounters {
    /// [`MmuRequest::PageFault`] requests received for a known vCPU of the
    /// domain, whatever the outcome.
    pub page_faults: u64,
    /// Page faults answered [`MmuReply::Resume`]: the server fixed the
    /// shadow entry, or found it already fixed (another pCPU raced).
    pub faults_fixed: u64,
    /// Page faults answered [`MmuReply::InjectPageFault`] (the guest's own
    /// tables do not allow the access).
    pub faults_injected: u64,
    /// The part of `faults_fixed` fixed on a lockless fast path, without
    /// the server's main lock (seed 001's fast page fault). 0 for a server
    /// without one.
    pub fast_path_fixes: u64,
    /// Frames taken from the shadow pool for shadow page tables (roots and
    /// per-pCPU copies included).
    pub shadow_pages_created: u64,
    /// Shadow frames given back to the pool.
    pub shadow_pages_freed: u64,
    /// Shadow frames taken and not yet given back at the time of the reply
    /// (frames unhooked but awaiting a flush, or obsolete but awaiting a lazy
    /// free, included). For the whole server: every frame it holds.
    pub shadow_pages_in_use: u64,
    /// [`MmuRequest::ZapAll`] requests completed.
    pub zaps: u64,
    /// Times the server dropped shadows on its own to get frames back
    /// because the shadow pool ran dry (counted once per emptying step,
    /// whichever domain's shadows it dropped; attributed to the domain whose
    /// request ran out).
    pub reclaims: u64,
    /// [`MmuReply::EmulateWrite`] replies: guest writes to write-protected
    /// guest page tables sent back to the kernel to be emulated.
    pub emulate_write_replies: u64,
    /// [`MmuRequest::EmulatedWrite`] requests completed
    /// ([`MmuReply::WriteDone`]).
    pub emulated_writes: u64,
    /// Shadow pages let go out of sync with their guest table (Xen OOS /
    /// KVM unsync) instead of write-protecting it.
    pub unsyncs: u64,
    /// Out-of-sync shadow pages brought back in sync (at CR3 write /
    /// INVLPG).
    pub resyncs: u64,
    /// Guest frames unshadowed because of write flooding (frequent writes to
    /// a frame that is probably no longer a page table).
    pub unshadowed: u64,
    /// Replies (to requests about the domain) that carried a flush
    /// obligation.
    pub flush_obligations: u64,
    /// The pCPUs named by those obligations, summed (the popcount of each
    /// obligation's CPU set): the shootdown work the server asked for.
    pub flush_cpus: u64,
    /// The most shadow pages the domain held at once (created - freed) since
    /// it was created (version 4); in the whole-server answer: the most the
    /// server held at once over all domains (not the sum of the domains'
    /// peaks, which were not necessarily at the same time). A level like
    /// `shadow_pages_in_use`, never below it.
    pub shadow_pages_peak: u64,
}

impl ServerCounters {
    /// Field-wise sum (saturating), for totals over domains, except
    /// `shadow_pages_peak`: the larger of the two, a lower bound of the
    /// total's peak (a server that answers for the whole server tracks its
    /// own peak and sets the field itself).
    pub fn sum(&self, o: &ServerCounters) -> ServerCounters {
        ServerCounters {
            page_faults: self.page_faults.saturating_add(o.page_faults),
            faults_fixed: self.faults_fixed.saturating_add(o.faults_fixed),
            faults_injected: self.faults_injected.saturating_add(o.faults_injected),
            fast_path_fixes: self.fast_path_fixes.saturating_add(o.fast_path_fixes),
            shadow_pages_created: self
                .shadow_pages_created
                .saturating_add(o.shadow_pages_created),
            shadow_pages_freed: self.shadow_pages_freed.saturating_add(o.shadow_pages_freed),
            shadow_pages_in_use: self
                .shadow_pages_in_use
                .saturating_add(o.shadow_pages_in_use),
            zaps: self.zaps.saturating_add(o.zaps),
            reclaims: self.reclaims.saturating_add(o.reclaims),
            emulate_write_replies: self
                .emulate_write_replies
                .saturating_add(o.emulate_write_replies),
            emulated_writes: self.emulated_writes.saturating_add(o.emulated_writes),
            unsyncs: self.unsyncs.saturating_add(o.unsyncs),
            resyncs: self.resyncs.saturating_add(o.resyncs),
            unshadowed: self.unshadowed.saturating_add(o.unshadowed),
            flush_obligations: self.flush_obligations.saturating_add(o.flush_obligations),
            flush_cpus: self.flush_cpus.saturating_add(o.flush_cpus),
            shadow_pages_peak: self.shadow_pages_peak.max(o.shadow_pages_peak),
        }
    }
}

/// Which table or resource ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Resource {
    /// Domains.
    Domains,
    /// vCPUs (in total or per domain).
    Vcpus,
    /// Guest frames of one domain's memory map.
    GuestFrames,
    /// Foreign frames mapped into one domain (version 3).
    ForeignMaps,
}

/// Why a request failed. Every reason carries the offending value.
/// Append-only (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MmuError {
    /// The request bytes did not decode.
    Malformed(DecodeError),
    /// The kernel speaks another protocol version.
    VersionMismatch {
        /// The version in the Hello.
        requested: u32,
        /// The version this server speaks.
        supported: u32,
    },
    /// No such domain.
    UnknownDomain(DomainId),
    /// The domain already exists.
    DomainExists(DomainId),
    /// No such vCPU.
    UnknownVcpu(VcpuId),
    /// The vCPU already exists.
    VcpuExists(VcpuId),
    /// The pCPU id is not below [`CpuSet::MAX_CPUS`].
    InvalidPcpu(PcpuId),
    /// A memory-map region is empty or out of range.
    BadRegion(MemRegion),
    /// Two memory-map regions share this guest frame.
    OverlappingRegions(Gfn),
    /// A fixed-size table is full.
    CapacityExceeded {
        /// What ran out.
        what: Resource,
        /// Its capacity.
        limit: u32,
    },
    /// The shadow pool is empty even after zapping the domain's shadows.
    OutOfShadowMemory(DomainId),
    /// A physical-memory access failed (e.g. the memory map names frames
    /// that do not exist).
    Memory(MemError),
    /// An emulated write size other than 1, 2, 4 or 8.
    BadWriteSize(u8),
    /// An emulated write that crosses a 4 KiB page, starting here.
    WriteCrossesPage(Gpa),
    /// The guest-physical address is not in the domain's memory map.
    GpaNotInMemory(Gpa),
    /// The server does not implement these paging-mode bits.
    UnsupportedPagingMode(PagingMode),
    /// The operation needs dirty logging, which is off for this domain.
    DirtyLogDisabled(DomainId),
    /// The server does not implement this request (its variant index,
    /// [`MmuRequest::variant_index`]; e.g. [`MmuRequest::GET_COUNTERS`] from
    /// a server that does not count).
    Unsupported(u8),
    /// The vCPU is scheduled (between `VcpuScheduled` and
    /// `VcpuDescheduled`), which the request does not allow.
    VcpuRunning(VcpuId),
    /// The guest frame is in the domain's memory map or already has a
    /// foreign frame mapped (version 3).
    GfnInUse(Gfn),
    /// No foreign frame is mapped at this guest frame (version 3).
    NotForeignMapped(Gfn),
    /// The frame is not in the named owner's memory map (version 3).
    NotOwnedBy {
        /// The frame.
        mfn: Mfn,
        /// The domain named as its owner.
        owner: DomainId,
    },
    /// The domain's frames are still foreign-mapped by `mapper` at `gfn`:
    /// it cannot be destroyed before they are unmapped (version 3).
    FramesMapped {
        /// The domain mapping one of them.
        mapper: DomainId,
        /// Where.
        gfn: Gfn,
    },
    /// A page fault at an address the vCPU's paging mode cannot produce:
    /// with paging off ([`PagingMode::OFF`]), at or above 4 GiB (version 5).
    FaultOutsideMode(Gva),
}

impl fmt::Display for MmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MmuError::Malformed(e) => write!(f, "malformed request: {e}"),
            MmuError::VersionMismatch {
                requested,
                supported,
            } => write!(
                f,
                "protocol version {requested} requested, server speaks {supported}"
            ),
            MmuError::UnknownDomain(d) => write!(f, "no domain {}", d.0),
            MmuError::DomainExists(d) => write!(f, "domain {} already exists", d.0),
            MmuError::UnknownVcpu(v) => write!(f, "no vCPU {}", v.0),
            MmuError::VcpuExists(v) => write!(f, "vCPU {} already exists", v.0),
            MmuError::InvalidPcpu(p) => write!(f, "pCPU {} is not below {}", p.0, CpuSet::MAX_CPUS),
            MmuError::BadRegion(r) => write!(f, "bad memory region {r:?}"),
            MmuError::OverlappingRegions(g) => write!(f, "memory regions overlap at gfn {g}"),
            MmuError::CapacityExceeded { what, limit } => {
                write!(f, "too many {what:?}: the limit is {limit}")
            }
            MmuError::OutOfShadowMemory(d) => {
                write!(f, "shadow pool empty even after zapping domain {}", d.0)
            }
            MmuError::Memory(e) => write!(f, "{e}"),
            MmuError::BadWriteSize(s) => write!(f, "emulated write of {s} bytes (want 1, 2, 4, 8)"),
            MmuError::WriteCrossesPage(g) => write!(f, "emulated write at {g} crosses a page"),
            MmuError::GpaNotInMemory(g) => write!(f, "guest-physical {g} is not in the memory map"),
            MmuError::UnsupportedPagingMode(m) => {
                write!(f, "unsupported paging mode bits {:#x}", m.0)
            }
            MmuError::DirtyLogDisabled(d) => write!(f, "dirty logging is off for domain {}", d.0),
            MmuError::Unsupported(MmuRequest::GET_COUNTERS) => write!(
                f,
                "request variant {} (GetCounters) is not implemented: the server does not report counters",
                MmuRequest::GET_COUNTERS
            ),
            MmuError::Unsupported(t) => write!(f, "request variant {t} is not implemented"),
            MmuError::VcpuRunning(v) => write!(f, "vCPU {} is still scheduled", v.0),
            MmuError::GfnInUse(g) => {
                write!(f, "gfn {g} is in the memory map or already foreign-mapped")
            }
            MmuError::NotForeignMapped(g) => write!(f, "no foreign frame is mapped at gfn {g}"),
            MmuError::NotOwnedBy { mfn, owner } => {
                write!(f, "frame {mfn} is not in domain {}'s memory map", owner.0)
            }
            MmuError::FramesMapped { mapper, gfn } => write!(
                f,
                "the domain's frames are still mapped by domain {} at gfn {gfn}",
                mapper.0
            ),
            MmuError::FaultOutsideMode(g) => write!(
                f,
                "page fault at {g}, which paging off (32-bit addresses) cannot produce"
            ),
        }
    }
}

impl From<MemError> for MmuError {
    fn from(e: MemError) -> Self {
        MmuError::Memory(e)
    }
}

/// A reply from an MMU server. Append-only (see the module docs, which also
/// give the kernel's obligations for each variant).
// Messages are fixed-size values (no alloc): the big variant is the point.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmuReply {
    /// Handshake accepted.
    Welcome {
        /// The protocol version the server speaks.
        version: u32,
    },
    /// The request is complete.
    Done {
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// Re-enter the guest at the faulting instruction.
    Resume {
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// Inject a #PF into the guest.
    InjectPageFault {
        /// The error code the guest sees.
        error_code: PfErrorCode,
        /// The guest's new CR2.
        address: Gva,
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// Load this shadow root for the vCPU.
    LoadShadowRoot {
        /// The vCPU.
        vcpu: VcpuId,
        /// The host-physical address of the shadow PML4 (VMCB CR3).
        root: Hpa,
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// Decode the faulting write and send [`MmuRequest::EmulatedWrite`].
    EmulateWrite {
        /// The guest-physical address of the faulting byte.
        gpa: Gpa,
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// The emulated write is done; advance RIP.
    WriteDone {
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// One chunk of the dirty log.
    DirtyBitmap {
        /// The chunk.
        chunk: DirtyChunk,
        /// Flush to carry out first (re-protection of logged pages).
        flush: Option<FlushObligation>,
    },
    /// The request failed.
    Error {
        /// Why, with the offending value.
        reason: MmuError,
        /// Flush to carry out anyway (e.g. after a zap that did not help).
        flush: Option<FlushObligation>,
    },
    /// The counters asked for with [`MmuRequest::GetCounters`]. Version 2.
    Counters {
        /// The counts.
        counters: ServerCounters,
        /// Flush to carry out first (a server may merge one owed to the
        /// requester; usually `None`).
        flush: Option<FlushObligation>,
    },
    /// The foreign frame asked for with [`MmuRequest::UnmapForeign`] is
    /// unmapped (see the module docs for what the requester owes). Version 3.
    ForeignUnmapped {
        /// The frame that was mapped.
        mfn: Mfn,
        /// Whether any shadow entry that mapped it had A set.
        accessed: bool,
        /// The pCPUs that may cache the domain's translations (its dirty
        /// mask): what to flush if `accessed`.
        cpus: CpuSet,
        /// Flush to carry out first (usually `None`: the hint is the point).
        flush: Option<FlushObligation>,
    },
    /// The faulting access targets guest-physical memory that is not RAM:
    /// emulate it (see the module docs). Version 5.
    Mmio {
        /// The guest-physical address accessed.
        gpa: Gpa,
        /// Whether the access was a write (else a read or a fetch; the
        /// exit's error code tells which).
        write: bool,
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
}

impl MmuReply {
    /// An error reply without a flush.
    pub const fn error(reason: MmuError) -> MmuReply {
        MmuReply::Error {
            reason,
            flush: None,
        }
    }

    /// The flush obligation the reply carries, if any.
    pub fn flush(&self) -> Option<FlushObligation> {
        match self {
            MmuReply::Welcome { .. } => None,
            MmuReply::Done { flush }
            | MmuReply::Resume { flush }
            | MmuReply::InjectPageFault { flush, .. }
            | MmuReply::LoadShadowRoot { flush, .. }
            | MmuReply::EmulateWrite { flush, .. }
            | MmuReply::WriteDone { flush }
            | MmuReply::DirtyBitmap { flush, .. }
            | MmuReply::Error { flush, .. }
            | MmuReply::Counters { flush, .. }
            | MmuReply::ForeignUnmapped { flush, .. }
            | MmuReply::Mmio { flush, .. } => *flush,
        }
    }

    /// Replaces the reply's flush obligation with the merge of it and
    /// `extra` (no effect on `Welcome`).
    pub fn add_flush(mut self, extra: Option<FlushObligation>) -> MmuReply {
        match &mut self {
            MmuReply::Welcome { .. } => {}
            MmuReply::Done { flush }
            | MmuReply::Resume { flush }
            | MmuReply::InjectPageFault { flush, .. }
            | MmuReply::LoadShadowRoot { flush, .. }
            | MmuReply::EmulateWrite { flush, .. }
            | MmuReply::WriteDone { flush }
            | MmuReply::DirtyBitmap { flush, .. }
            | MmuReply::Error { flush, .. }
            | MmuReply::Counters { flush, .. }
            | MmuReply::ForeignUnmapped { flush, .. }
            | MmuReply::Mmio { flush, .. } => *flush = FlushObligation::merge(*flush, extra),
        }
        self
    }
}

/// The MMU server interface: one method per request (except `Hello`, which
/// [`call`] answers). Methods take `&self` and may be called concurrently from
/// any pCPU; implementations lock internally. Object-safe, so the registry
/// hands out `Box<dyn MmuServer>`.
pub trait MmuServer: Send + Sync {
    /// The implementation's registry name.
    fn name(&self) -> &'static str;
    /// [`MmuRequest::CreateDomain`].
    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> MmuReply;
    /// [`MmuRequest::DestroyDomain`].
    fn destroy_domain(&self, domain: DomainId) -> MmuReply;
    /// [`MmuRequest::CreateVcpu`].
    fn create_vcpu(&self, domain: DomainId, vcpu: VcpuId) -> MmuReply;
    /// [`MmuRequest::VcpuScheduled`].
    fn vcpu_scheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply;
    /// [`MmuRequest::VcpuDescheduled`].
    fn vcpu_descheduled(&self, vcpu: VcpuId, pcpu: PcpuId) -> MmuReply;
    /// [`MmuRequest::PageFault`].
    fn page_fault(&self, vcpu: VcpuId, pcpu: PcpuId, gva: Gva, error_code: PfErrorCode)
        -> MmuReply;
    /// [`MmuRequest::WriteCr3`].
    fn write_cr3(&self, vcpu: VcpuId, pcpu: PcpuId, cr3: GuestCr3) -> MmuReply;
    /// [`MmuRequest::SetPagingMode`].
    fn set_paging_mode(&self, vcpu: VcpuId, pcpu: PcpuId, mode: PagingMode) -> MmuReply;
    /// [`MmuRequest::Invlpg`].
    fn invlpg(&self, vcpu: VcpuId, pcpu: PcpuId, gva: Gva) -> MmuReply;
    /// [`MmuRequest::EmulatedWrite`].
    fn emulated_write(
        &self,
        vcpu: VcpuId,
        pcpu: PcpuId,
        gpa: Gpa,
        value: u64,
        size: u8,
    ) -> MmuReply;
    /// [`MmuRequest::EnableDirtyLog`].
    fn enable_dirty_log(&self, domain: DomainId) -> MmuReply;
    /// [`MmuRequest::DisableDirtyLog`].
    fn disable_dirty_log(&self, domain: DomainId) -> MmuReply;
    /// [`MmuRequest::GetAndClearDirty`].
    fn get_and_clear_dirty(&self, domain: DomainId, start: Gfn) -> MmuReply;
    /// [`MmuRequest::ZapAll`].
    fn zap_all(&self, domain: DomainId) -> MmuReply;
    /// [`MmuRequest::GetCounters`]: [`MmuReply::Counters`] for `domain`
    /// (`None`: the whole server), or `UnknownDomain`.
    ///
    /// The default answers [`MmuError::Unsupported`]`(`[`MmuRequest::GET_COUNTERS`]`)`:
    /// an implementation that does not count says so rather than report
    /// zeros.
    fn counters(&self, domain: Option<DomainId>) -> MmuReply {
        let _ = domain;
        MmuReply::error(MmuError::Unsupported(MmuRequest::GET_COUNTERS))
    }
    /// [`MmuRequest::MapForeign`]. The default answers
    /// [`MmuError::Unsupported`]`(`[`MmuRequest::MAP_FOREIGN`]`)`.
    fn map_foreign(
        &self,
        domain: DomainId,
        gfn: Gfn,
        owner: DomainId,
        mfn: Mfn,
        writable: bool,
    ) -> MmuReply {
        let _ = (domain, gfn, owner, mfn, writable);
        MmuReply::error(MmuError::Unsupported(MmuRequest::MAP_FOREIGN))
    }
    /// [`MmuRequest::UnmapForeign`]. The default answers
    /// [`MmuError::Unsupported`]`(`[`MmuRequest::UNMAP_FOREIGN`]`)`.
    fn unmap_foreign(&self, domain: DomainId, gfn: Gfn) -> MmuReply {
        let _ = (domain, gfn);
        MmuReply::error(MmuError::Unsupported(MmuRequest::UNMAP_FOREIGN))
    }
}

/// Calls the trait method for a decoded request (and answers `Hello` itself).
pub fn call<S: MmuServer + ?Sized>(server: &S, request: &MmuRequest) -> MmuReply {
    match *request {
        MmuRequest::Hello { version } => {
            if version == PROTOCOL_VERSION {
                MmuReply::Welcome {
                    version: PROTOCOL_VERSION,
                }
            } else {
                MmuReply::error(MmuError::VersionMismatch {
                    requested: version,
                    supported: PROTOCOL_VERSION,
                })
            }
        }
        MmuRequest::CreateDomain { domain, ref memory } => server.create_domain(domain, memory),
        MmuRequest::DestroyDomain { domain } => server.destroy_domain(domain),
        MmuRequest::CreateVcpu { domain, vcpu } => server.create_vcpu(domain, vcpu),
        MmuRequest::VcpuScheduled { vcpu, pcpu } => server.vcpu_scheduled(vcpu, pcpu),
        MmuRequest::VcpuDescheduled { vcpu, pcpu } => server.vcpu_descheduled(vcpu, pcpu),
        MmuRequest::PageFault {
            vcpu,
            pcpu,
            gva,
            error_code,
        } => server.page_fault(vcpu, pcpu, gva, error_code),
        MmuRequest::WriteCr3 { vcpu, pcpu, cr3 } => server.write_cr3(vcpu, pcpu, cr3),
        MmuRequest::SetPagingMode { vcpu, pcpu, mode } => server.set_paging_mode(vcpu, pcpu, mode),
        MmuRequest::Invlpg { vcpu, pcpu, gva } => server.invlpg(vcpu, pcpu, gva),
        MmuRequest::EmulatedWrite {
            vcpu,
            pcpu,
            gpa,
            value,
            size,
        } => server.emulated_write(vcpu, pcpu, gpa, value, size),
        MmuRequest::EnableDirtyLog { domain } => server.enable_dirty_log(domain),
        MmuRequest::DisableDirtyLog { domain } => server.disable_dirty_log(domain),
        MmuRequest::GetAndClearDirty { domain, start } => server.get_and_clear_dirty(domain, start),
        MmuRequest::ZapAll { domain } => server.zap_all(domain),
        MmuRequest::GetCounters { domain } => server.counters(domain),
        MmuRequest::MapForeign {
            domain,
            gfn,
            owner,
            mfn,
            writable,
        } => server.map_foreign(domain, gfn, owner, mfn, writable),
        MmuRequest::UnmapForeign { domain, gfn } => server.unmap_foreign(domain, gfn),
    }
}

/// The one dispatch from bytes to trait calls and back: decodes `request`,
/// calls the server, encodes the reply into `reply` and returns its length.
///
/// Malformed bytes (including over-long input and trailing bytes) get an
/// [`MmuError::Malformed`] reply and a wrong `Hello` version an
/// [`MmuError::VersionMismatch`] reply; the server is not called for either.
/// Never panics. Every reply fits in [`MAX_MESSAGE`] bytes (pinned by the
/// tests), so the length is always non-zero.
pub fn dispatch<S: MmuServer + ?Sized>(
    server: &S,
    request: &[u8],
    reply: &mut [u8; MAX_MESSAGE],
) -> usize {
    let answer = match wire::decode::<MmuRequest>(request) {
        Ok(req) => call(server, &req),
        Err(e) => MmuReply::error(MmuError::Malformed(e)),
    };
    match wire::encode(&answer, reply) {
        Ok(n) => n,
        // Unreachable while every reply fits MAX_MESSAGE (tested); still
        // answer something decodable rather than panic.
        Err(_) => wire::encode(
            &MmuReply::error(MmuError::Malformed(DecodeError::TooLong(
                MAX_MESSAGE as u32,
            ))),
            reply,
        )
        .unwrap_or(0),
    }
}
