//! The grant protocol: grant tables between domains (grant, map, batched
//! unmap, copy, end access), the [`GrantServer`] trait and the one
//! [`grant_dispatch`] from bytes to trait calls.
//!
//! # Model (Xen's grant tables)
//! A domain (the granter) grants another domain (the grantee) access to one
//! of its guest frames under a grant reference ([`GrantRequest::Grant`]),
//! read-only or writable. The grantee maps the reference at one of its own
//! guest frames ([`GrantRequest::Map`], which gets a [`MapHandle`]), unmaps
//! singly or in batches of up to [`MAX_UNMAP_BATCH`] handles
//! ([`GrantRequest::Unmap`], one status per entry), or copies bytes through
//! the reference without mapping it ([`GrantRequest::Copy`]). The granter
//! ends access ([`GrantRequest::EndAccess`]); this is **refused while the
//! reference is mapped** (as Xen refuses), so a granter that gets `Done`
//! knows no domain can reach the frame any more. The `domain` field of every
//! request is the calling domain, filled in by the kernel from the vCPU that
//! made the hypercall (never by the guest).
//!
//! The mapping itself is the MMU server's (see
//! [`MmuRequest::MapForeign`](crate::MmuRequest::MapForeign)); the grant
//! server owns references, permissions and lifetimes, and turns the MMU
//! server's accessed report into the unmap's flush obligation.
//!
//! # Wire format and compatibility
//! As for the MMU protocol (see [`crate::mmu`]): postcard, positional,
//! **append-only** enums and structs, [`GRANT_PROTOCOL_VERSION`] bumped for
//! any change, exact bytes pinned in `tests/pinned.rs`, every message within
//! [`MAX_MESSAGE`]. A batch longer than
//! [`MAX_UNMAP_BATCH`] does not decode (`Malformed`).
//!
//! # The kernel's obligations (the reply contract)
//! A reply is carried out completely, on the requesting pCPU, before that
//! pCPU sends its next grant request and before the requesting vCPU
//! re-enters the guest. A grant reply's flush obligation always has scope
//! [`FlushScope::All`](crate::FlushScope::All) and means **every guest
//! translation cached on the named pCPUs** (any domain: a revocation at
//! `DestroyDomain` concerns the mappers' domains, not the requester's), and
//! the kernel waits for every remote pCPU to acknowledge. Per reply:
//! - [`GrantReply::Welcome`]: the server speaks `version`.
//! - [`GrantReply::Done`]: the request is complete.
//! - [`GrantReply::Mapped`]: the frame is mapped at the requested guest
//!   frame; hand `handle` to the guest.
//! - [`GrantReply::Unmapped`]: `status[i]` is the outcome of `handles[i]`
//!   (one bad entry does not stop the good ones); after the flush no pCPU
//!   caches a translation to any frame whose entry is `Ok`.
//! - [`GrantReply::CopyPlan`]: copy `len` bytes from host-physical `src` to
//!   host-physical `dst` (each range lies within one 4 KiB frame the server
//!   checked the caller may read, respectively write), then complete the
//!   hypercall.
//! - [`GrantReply::Counters`]: the server's counts.
//! - [`GrantReply::Error`]: refused, nothing changed except as `flush` says.

use crate::addr::{Gfn, Gpa, Hpa};
use crate::ids::DomainId;
use crate::mmu::{FlushObligation, MemoryMap, MmuError};
use crate::wire::{self, DecodeError, MAX_MESSAGE};
use core::fmt;
use serde::{Deserialize, Serialize};

/// The grant protocol version spoken by this `abi`.
pub const GRANT_PROTOCOL_VERSION: u32 = 1;

/// The most handles in one [`GrantRequest::Unmap`] (Xen's
/// `GNTTAB_UNMAP_BATCH_SIZE`): one flush obligation at most per batch.
pub const MAX_UNMAP_BATCH: usize = 32;

/// A grant reference: an index into the granter's grant table.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct GrantRef(pub u32);

/// A map handle (Xen's maptrack handle): names one mapping of the domain
/// that made it. Opaque to the guest; servers may encode a generation in it
/// so that a stale handle is refused even after its slot is reused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MapHandle(pub u32);

/// The status of one entry of an unmap batch.
pub type UnmapStatus = Result<(), GrantError>;

/// Which direction a [`GrantRequest::Copy`] moves bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CopyDirection {
    /// From the granted frame into the caller's memory (a read grant
    /// suffices).
    FromGrant,
    /// From the caller's memory into the granted frame (needs a writable
    /// grant).
    ToGrant,
}

/// A request to the grant server. Append-only.
// Messages are fixed-size values (no alloc): the big variant is the point.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantRequest {
    /// Handshake: the protocol version the kernel speaks.
    Hello {
        /// Must be [`GRANT_PROTOCOL_VERSION`].
        version: u32,
    },
    /// A domain exists with this guest-physical memory map (the frames it
    /// may grant and copy to or from).
    CreateDomain {
        /// The domain.
        domain: DomainId,
        /// Its memory map (as given to the MMU server).
        memory: MemoryMap,
    },
    /// The domain is going away: every mapping it holds is unmapped, every
    /// mapping of its grants held by other domains is revoked (unmapped),
    /// and its grants end. The reply's flush covers what was accessed.
    DestroyDomain {
        /// The domain.
        domain: DomainId,
    },
    /// `domain` grants `grantee` access to its guest frame `gfn` under
    /// reference `gref` (which must be free).
    Grant {
        /// The granter (the caller).
        domain: DomainId,
        /// The reference.
        gref: GrantRef,
        /// Who may map or copy it.
        grantee: DomainId,
        /// The granter's frame.
        gfn: Gfn,
        /// Whether the grantee may only read.
        readonly: bool,
    },
    /// `domain` ends access through `gref` (refused while it is mapped).
    EndAccess {
        /// The granter (the caller).
        domain: DomainId,
        /// The reference.
        gref: GrantRef,
    },
    /// `domain` maps `granter`'s reference `gref` at its own guest frame
    /// `gfn`.
    Map {
        /// The grantee (the caller).
        domain: DomainId,
        /// Whose reference.
        granter: DomainId,
        /// The reference.
        gref: GrantRef,
        /// Where in the caller's guest-physical space (outside its memory
        /// map).
        gfn: Gfn,
        /// Whether the caller wants to write.
        writable: bool,
    },
    /// `domain` unmaps a batch of its mappings.
    Unmap {
        /// The caller.
        domain: DomainId,
        /// Up to [`MAX_UNMAP_BATCH`] handles.
        handles: heapless::Vec<MapHandle, MAX_UNMAP_BATCH>,
    },
    /// `domain` copies `len` bytes between `granter`'s reference `gref` (at
    /// byte `offset` of the granted frame) and its own guest-physical
    /// address `local`; neither side may cross its frame.
    Copy {
        /// The grantee (the caller).
        domain: DomainId,
        /// Whose reference.
        granter: DomainId,
        /// The reference.
        gref: GrantRef,
        /// Byte offset in the granted frame.
        offset: u16,
        /// The caller's side.
        local: Gpa,
        /// Bytes to copy.
        len: u16,
        /// Which way.
        direction: CopyDirection,
    },
    /// Report the server's counters for one domain (as mapper and granter)
    /// or, with `None`, for the whole server.
    GetCounters {
        /// The domain, or `None`.
        domain: Option<DomainId>,
    },
}

impl GrantRequest {
    /// The request's variant index on the wire (its first byte).
    pub const fn variant_index(&self) -> u8 {
        match self {
            GrantRequest::Hello { .. } => 0,
            GrantRequest::CreateDomain { .. } => 1,
            GrantRequest::DestroyDomain { .. } => 2,
            GrantRequest::Grant { .. } => 3,
            GrantRequest::EndAccess { .. } => 4,
            GrantRequest::Map { .. } => 5,
            GrantRequest::Unmap { .. } => 6,
            GrantRequest::Copy { .. } => 7,
            GrantRequest::GetCounters { .. } => 8,
        }
    }
}

/// What a grant server counts. Every field counts events since the domain
/// (or server) was created except the three levels `grants_active`,
/// `maps_active`, `handles_in_use`, read at the time of the reply. A
/// domain's figures count it as mapper (maps, unmaps, batches, flushes) and
/// as granter (grants). Append-only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GrantCounters {
    /// Successful [`GrantRequest::Grant`]s.
    pub grants: u64,
    /// Successful [`GrantRequest::Map`]s.
    pub maps: u64,
    /// Entries unmapped (`Ok` statuses, and revocations).
    pub unmaps: u64,
    /// Unmap batches (requests, and revocations) that unmapped at least one
    /// entry.
    pub batches: u64,
    /// Of those, batches whose reply carried a flush obligation.
    pub flushes: u64,
    /// Batches that needed no flush because nothing was accessed.
    pub flushes_avoided: u64,
    /// pCPUs named by those obligations, summed.
    pub flush_cpus: u64,
    /// Successful copies.
    pub copies: u64,
    /// Grants in the table now.
    pub grants_active: u64,
    /// Mappings in place now.
    pub maps_active: u64,
    /// Map handles allocated now (equals `maps_active` in a correct server).
    pub handles_in_use: u64,
}

impl GrantCounters {
    /// Field-wise sum (saturating).
    pub fn sum(&self, o: &GrantCounters) -> GrantCounters {
        GrantCounters {
            grants: self.grants.saturating_add(o.grants),
            maps: self.maps.saturating_add(o.maps),
            unmaps: self.unmaps.saturating_add(o.unmaps),
            batches: self.batches.saturating_add(o.batches),
            flushes: self.flushes.saturating_add(o.flushes),
            flushes_avoided: self.flushes_avoided.saturating_add(o.flushes_avoided),
            flush_cpus: self.flush_cpus.saturating_add(o.flush_cpus),
            copies: self.copies.saturating_add(o.copies),
            grants_active: self.grants_active.saturating_add(o.grants_active),
            maps_active: self.maps_active.saturating_add(o.maps_active),
            handles_in_use: self.handles_in_use.saturating_add(o.handles_in_use),
        }
    }
}

/// Which grant-server table ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GrantResource {
    /// Domains.
    Domains,
    /// Map handles of one domain (Xen's maptrack).
    MapHandles,
    /// Mappings of one grant reference.
    MapsPerGrant,
}

/// Why a grant request (or one unmap entry) failed, with the offending
/// value. Append-only.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum GrantError {
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
    /// The reference is not below the grant table's size.
    RefOutOfRange {
        /// The reference.
        gref: GrantRef,
        /// The table's size.
        limit: u32,
    },
    /// The reference is already in use (end access first).
    RefInUse(GrantRef),
    /// The granter has no grant under this reference.
    NotGranted {
        /// The granter named.
        granter: DomainId,
        /// The reference.
        gref: GrantRef,
    },
    /// The reference is granted to another domain than the caller.
    NotGrantedTo {
        /// The reference.
        gref: GrantRef,
        /// The caller.
        domain: DomainId,
    },
    /// Write access asked through a read-only grant.
    ReadOnly(GrantRef),
    /// Ending access refused: the reference is mapped this many times.
    StillMapped {
        /// The reference.
        gref: GrantRef,
        /// Its mappings.
        maps: u32,
    },
    /// Not a live map handle of the caller (never made, already unmapped,
    /// or another domain's).
    BadHandle(MapHandle),
    /// The guest frame is not in the domain's memory map.
    GfnNotInMemory(Gfn),
    /// The copy does not fit in its frame: `offset + len` passes 4096.
    CopyCrossesPage {
        /// The starting offset in the frame.
        offset: u16,
        /// The length.
        len: u16,
    },
    /// A fixed-size table is full.
    CapacityExceeded {
        /// Which.
        what: GrantResource,
        /// Its capacity.
        limit: u32,
    },
    /// The MMU server refused the mapping change. Never
    /// [`MmuError::BadRegion`] (a memory-map error no foreign-mapping
    /// request can cause, and too big for a full batch of statuses to fit
    /// [`MAX_MESSAGE`]): a server reports that as [`GrantError::MmuProtocol`].
    Mmu(MmuError),
    /// The MMU server answered with another reply than the protocol says
    /// (its variant index).
    MmuProtocol(u8),
    /// A domain granting to, mapping from or copying with itself.
    SelfGrant(DomainId),
}

impl GrantError {
    /// The error's number in a guest's `GrantCall` status
    /// (`abi::guest::grant_status`): its variant index plus one, so 0 stays
    /// success.
    pub const fn code(&self) -> u32 {
        1 + match self {
            GrantError::Malformed(_) => 0,
            GrantError::VersionMismatch { .. } => 1,
            GrantError::UnknownDomain(_) => 2,
            GrantError::DomainExists(_) => 3,
            GrantError::RefOutOfRange { .. } => 4,
            GrantError::RefInUse(_) => 5,
            GrantError::NotGranted { .. } => 6,
            GrantError::NotGrantedTo { .. } => 7,
            GrantError::ReadOnly(_) => 8,
            GrantError::StillMapped { .. } => 9,
            GrantError::BadHandle(_) => 10,
            GrantError::GfnNotInMemory(_) => 11,
            GrantError::CopyCrossesPage { .. } => 12,
            GrantError::CapacityExceeded { .. } => 13,
            GrantError::Mmu(_) => 14,
            GrantError::MmuProtocol(_) => 15,
            GrantError::SelfGrant(_) => 16,
        }
    }
}

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantError::Malformed(e) => write!(f, "malformed grant request: {e}"),
            GrantError::VersionMismatch {
                requested,
                supported,
            } => write!(
                f,
                "grant protocol version {requested} requested, server speaks {supported}"
            ),
            GrantError::UnknownDomain(d) => write!(f, "no domain {}", d.0),
            GrantError::DomainExists(d) => write!(f, "domain {} already exists", d.0),
            GrantError::RefOutOfRange { gref, limit } => {
                write!(f, "grant reference {} is not below {limit}", gref.0)
            }
            GrantError::RefInUse(r) => write!(f, "grant reference {} is in use", r.0),
            GrantError::NotGranted { granter, gref } => write!(
                f,
                "domain {} has no grant under reference {}",
                granter.0, gref.0
            ),
            GrantError::NotGrantedTo { gref, domain } => write!(
                f,
                "grant reference {} is not granted to domain {}",
                gref.0, domain.0
            ),
            GrantError::ReadOnly(r) => write!(f, "grant reference {} is read-only", r.0),
            GrantError::StillMapped { gref, maps } => write!(
                f,
                "grant reference {} is still mapped {maps} time(s)",
                gref.0
            ),
            GrantError::BadHandle(h) => write!(f, "map handle {:#x} is not the caller's", h.0),
            GrantError::GfnNotInMemory(g) => write!(f, "gfn {g} is not in the memory map"),
            GrantError::CopyCrossesPage { offset, len } => {
                write!(
                    f,
                    "copy of {len} bytes at offset {offset} crosses its frame"
                )
            }
            GrantError::CapacityExceeded { what, limit } => {
                write!(f, "too many {what:?}: the limit is {limit}")
            }
            GrantError::Mmu(e) => write!(f, "MMU server: {e}"),
            GrantError::MmuProtocol(v) => {
                write!(f, "MMU server answered an unexpected reply (variant {v})")
            }
            GrantError::SelfGrant(d) => write!(f, "domain {} names itself as its peer", d.0),
        }
    }
}

/// A reply from the grant server. Append-only (see the module docs for the
/// kernel's obligations).
// Messages are fixed-size values (no alloc): the big variant is the point.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GrantReply {
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
    /// The reference is mapped.
    Mapped {
        /// The new mapping's handle.
        handle: MapHandle,
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// The batch is done, one status per handle, in order.
    Unmapped {
        /// The statuses.
        status: heapless::Vec<UnmapStatus, MAX_UNMAP_BATCH>,
        /// The batch's flush (none when nothing unmapped was accessed, for a
        /// server that uses the hint).
        flush: Option<FlushObligation>,
    },
    /// Copy `len` bytes from `src` to `dst` (host-physical).
    CopyPlan {
        /// Source.
        src: Hpa,
        /// Destination.
        dst: Hpa,
        /// Bytes.
        len: u16,
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// The counters asked for.
    Counters {
        /// The counts.
        counters: GrantCounters,
        /// Flush to carry out first.
        flush: Option<FlushObligation>,
    },
    /// The request failed.
    Error {
        /// Why, with the offending value.
        reason: GrantError,
        /// Flush to carry out anyway.
        flush: Option<FlushObligation>,
    },
}

impl GrantReply {
    /// An error reply without a flush.
    pub const fn error(reason: GrantError) -> GrantReply {
        GrantReply::Error {
            reason,
            flush: None,
        }
    }

    /// The flush obligation the reply carries, if any.
    pub fn flush(&self) -> Option<FlushObligation> {
        match self {
            GrantReply::Welcome { .. } => None,
            GrantReply::Done { flush }
            | GrantReply::Mapped { flush, .. }
            | GrantReply::Unmapped { flush, .. }
            | GrantReply::CopyPlan { flush, .. }
            | GrantReply::Counters { flush, .. }
            | GrantReply::Error { flush, .. } => *flush,
        }
    }
}

/// The grant server interface: one method per request (except `Hello`,
/// which [`grant_call`] answers). `&self`, callable from any pCPU at once;
/// object-safe, so a registry hands out `Box<dyn GrantServer>`.
pub trait GrantServer: Send + Sync {
    /// The implementation's registry name.
    fn name(&self) -> &'static str;
    /// [`GrantRequest::CreateDomain`].
    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> GrantReply;
    /// [`GrantRequest::DestroyDomain`].
    fn destroy_domain(&self, domain: DomainId) -> GrantReply;
    /// [`GrantRequest::Grant`].
    fn grant(
        &self,
        domain: DomainId,
        gref: GrantRef,
        grantee: DomainId,
        gfn: Gfn,
        readonly: bool,
    ) -> GrantReply;
    /// [`GrantRequest::EndAccess`].
    fn end_access(&self, domain: DomainId, gref: GrantRef) -> GrantReply;
    /// [`GrantRequest::Map`].
    fn map(
        &self,
        domain: DomainId,
        granter: DomainId,
        gref: GrantRef,
        gfn: Gfn,
        writable: bool,
    ) -> GrantReply;
    /// [`GrantRequest::Unmap`].
    fn unmap(&self, domain: DomainId, handles: &[MapHandle]) -> GrantReply;
    /// [`GrantRequest::Copy`].
    #[allow(clippy::too_many_arguments)]
    fn copy(
        &self,
        domain: DomainId,
        granter: DomainId,
        gref: GrantRef,
        offset: u16,
        local: Gpa,
        len: u16,
        direction: CopyDirection,
    ) -> GrantReply;
    /// [`GrantRequest::GetCounters`].
    fn counters(&self, domain: Option<DomainId>) -> GrantReply;
}

/// Calls the trait method for a decoded request (and answers `Hello`).
pub fn grant_call<S: GrantServer + ?Sized>(server: &S, request: &GrantRequest) -> GrantReply {
    match *request {
        GrantRequest::Hello { version } => {
            if version == GRANT_PROTOCOL_VERSION {
                GrantReply::Welcome {
                    version: GRANT_PROTOCOL_VERSION,
                }
            } else {
                GrantReply::error(GrantError::VersionMismatch {
                    requested: version,
                    supported: GRANT_PROTOCOL_VERSION,
                })
            }
        }
        GrantRequest::CreateDomain { domain, ref memory } => server.create_domain(domain, memory),
        GrantRequest::DestroyDomain { domain } => server.destroy_domain(domain),
        GrantRequest::Grant {
            domain,
            gref,
            grantee,
            gfn,
            readonly,
        } => server.grant(domain, gref, grantee, gfn, readonly),
        GrantRequest::EndAccess { domain, gref } => server.end_access(domain, gref),
        GrantRequest::Map {
            domain,
            granter,
            gref,
            gfn,
            writable,
        } => server.map(domain, granter, gref, gfn, writable),
        GrantRequest::Unmap {
            domain,
            ref handles,
        } => server.unmap(domain, handles),
        GrantRequest::Copy {
            domain,
            granter,
            gref,
            offset,
            local,
            len,
            direction,
        } => server.copy(domain, granter, gref, offset, local, len, direction),
        GrantRequest::GetCounters { domain } => server.counters(domain),
    }
}

/// The one dispatch from bytes to grant-server calls and back: decodes
/// `request`, calls the server, encodes the reply into `reply` and returns
/// its length. Malformed bytes get a [`GrantError::Malformed`] reply; never
/// panics; every reply fits [`MAX_MESSAGE`] (pinned by the tests).
pub fn grant_dispatch<S: GrantServer + ?Sized>(
    server: &S,
    request: &[u8],
    reply: &mut [u8; MAX_MESSAGE],
) -> usize {
    let answer = match wire::decode::<GrantRequest>(request) {
        Ok(req) => grant_call(server, &req),
        Err(e) => GrantReply::error(GrantError::Malformed(e)),
    };
    match wire::encode(&answer, reply) {
        Ok(n) => n,
        Err(_) => wire::encode(
            &GrantReply::error(GrantError::Malformed(DecodeError::TooLong(
                MAX_MESSAGE as u32,
            ))),
            reply,
        )
        .unwrap_or(0),
    }
}
