//! The grant table state machine: references, permissions, map handles and
//! lifetimes, one lock, the mapping itself asked of the MMU server.
//!
//! # Design
//! - One `spin::Mutex` around all state; every request runs under it,
//!   MMU requests included (the MMU server never calls back, so this cannot
//!   deadlock), so an unmap can never race a map or another unmap of the
//!   same handle: the unmap races and double frees of Xen's advisories have
//!   no window here.
//! - Per domain: a grant table of [`Config::grant_entries`] references
//!   (granter side, each with a pin count of its mappings) and a maptrack of
//!   at most [`Config::map_handles`] slots (mapper side). A handle is the
//!   slot index plus the slot's generation (bumped at every unmap), so a
//!   stale handle (double unmap, unmap after revocation) is refused even
//!   after the slot is reused.
//! - Ending access is refused while the reference is mapped
//!   (`StillMapped`, as Xen refuses): a granter that got `Done` knows no
//!   domain can reach the frame.
//! - Destroying a domain unmaps its mappings and revokes (unmaps) every
//!   mapping of its grants held by other domains, with the flush those
//!   unmaps need: no domain keeps access to a frame of a dead peer. The
//!   kernel sends `DestroyDomain` to the grant server before the MMU server
//!   (which refuses to destroy a domain whose frames are still mapped).
//! - Flushes: each unmap asks the MMU server, which reports whether any
//!   shadow entry of the frame had A set and the mapping domain's dirty mask.
//!   The policy `P` decides whether the batch needs a flush; if so the reply
//!   carries ONE obligation (scope All) to the union of the masks.
//!
//! # Invariants
//! - A reference's pin count equals the number of live handles (any domain)
//!   naming it; a reference with pins is never freed.
//! - A live handle corresponds to exactly one foreign mapping in the MMU
//!   server, at the handle's gfn.

use crate::policy::FlushPolicy;
use crate::port::MmuPort;
use abi::grant::{
    CopyDirection, GrantCounters, GrantError, GrantRef, GrantReply, GrantResource, GrantServer,
    MapHandle, UnmapStatus, MAX_UNMAP_BATCH,
};
use abi::mmu::{MemoryMap, MmuError, MmuReply, MmuRequest};
use abi::{CpuSet, DecodeError, DomainId, FlushObligation, FlushScope, Gfn, Gpa, Mfn, PAGE_SIZE};
use alloc::vec::Vec;
use core::marker::PhantomData;
use spin::Mutex;

/// Limits of a grant server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The most domains at once.
    pub max_domains: u32,
    /// Grant references per domain (valid references are below it).
    pub grant_entries: u32,
    /// Map handles per domain (Xen's maptrack limit), at most 4096.
    pub map_handles: u32,
    /// Mappings of one reference at once.
    pub maps_per_grant: u32,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_domains: 64,
            grant_entries: 512,
            map_handles: 1024,
            maps_per_grant: 16,
        }
    }
}

/// Bits of a handle that hold the slot index (the rest: its generation).
const SLOT_BITS: u32 = 12;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;

/// A grant server with flush policy `P`, reaching the MMU server by `port`.
pub struct GrantTable<'p, P: FlushPolicy> {
    port: &'p dyn MmuPort,
    config: Config,
    state: Mutex<State>,
    _policy: PhantomData<P>,
}

struct State {
    domains: Vec<Domain>,
    /// Counts of destroyed domains.
    retired: GrantCounters,
}

struct Grant {
    grantee: DomainId,
    /// The grantee was destroyed: nobody may use the grant (a new domain
    /// with the same id included); the granter may still end it.
    orphaned: bool,
    mfn: Mfn,
    readonly: bool,
    /// Live mappings of this reference.
    pins: u32,
}

#[derive(Clone, Copy)]
struct Mapping {
    granter: DomainId,
    gref: GrantRef,
    gfn: Gfn,
}

struct Slot {
    generation: u32,
    mapping: Option<Mapping>,
}

struct Domain {
    id: DomainId,
    memory: MemoryMap,
    grants: Vec<Option<Grant>>,
    slots: Vec<Slot>,
    /// Event counts (levels are computed when asked).
    counters: GrantCounters,
}

impl Domain {
    fn mfn(&self, gfn: Gfn) -> Option<Mfn> {
        self.memory.iter().find_map(|r| r.translate(gfn))
    }

    fn handle(&self, i: usize) -> MapHandle {
        MapHandle((self.slots[i].generation << SLOT_BITS) | i as u32)
    }

    /// The slot index of a live handle of this domain.
    fn slot_of(&self, h: MapHandle) -> Result<usize, GrantError> {
        let i = (h.0 & SLOT_MASK) as usize;
        match self.slots.get(i) {
            Some(s) if s.mapping.is_some() && s.generation == h.0 >> SLOT_BITS => Ok(i),
            _ => Err(GrantError::BadHandle(h)),
        }
    }

    fn levels(&self) -> GrantCounters {
        let mut c = self.counters;
        c.grants_active = self.grants.iter().filter(|g| g.is_some()).count() as u64;
        c.maps_active = self
            .grants
            .iter()
            .flatten()
            .map(|g| u64::from(g.pins))
            .sum();
        c.handles_in_use = self.slots.iter().filter(|s| s.mapping.is_some()).count() as u64;
        c
    }
}

/// A grant found for a caller: the caller's and granter's indices and the
/// grant's fields.
struct Found {
    di: usize,
    gi: usize,
    mfn: Mfn,
    readonly: bool,
    pins: u32,
}

/// What the unmaps of one batch found.
#[derive(Default)]
struct Batch {
    unmapped: u64,
    accessed: bool,
    cpus: CpuSet,
    mmu_flush: Option<FlushObligation>,
}

impl State {
    fn index(&self, id: DomainId) -> Result<usize, GrantError> {
        self.domains
            .iter()
            .position(|d| d.id == id)
            .ok_or(GrantError::UnknownDomain(id))
    }
}

fn mmu_error(reply: &MmuReply) -> GrantError {
    match reply {
        // Too big for a full batch of statuses (see `GrantError::Mmu`),
        // and no foreign-mapping request can cause it.
        MmuReply::Error {
            reason: MmuError::BadRegion(_),
            ..
        } => GrantError::MmuProtocol(variant(reply)),
        MmuReply::Error { reason, .. } => GrantError::Mmu(*reason),
        other => GrantError::MmuProtocol(variant(other)),
    }
}

fn variant(r: &MmuReply) -> u8 {
    match r {
        MmuReply::Welcome { .. } => 0,
        MmuReply::Done { .. } => 1,
        MmuReply::Resume { .. } => 2,
        MmuReply::InjectPageFault { .. } => 3,
        MmuReply::LoadShadowRoot { .. } => 4,
        MmuReply::EmulateWrite { .. } => 5,
        MmuReply::WriteDone { .. } => 6,
        MmuReply::DirtyBitmap { .. } => 7,
        MmuReply::Error { .. } => 8,
        MmuReply::Counters { .. } => 9,
        MmuReply::ForeignUnmapped { .. } => 10,
        MmuReply::Mmio { .. } => 11,
    }
}

impl<'p, P: FlushPolicy> GrantTable<'p, P> {
    /// A grant server with no domains.
    pub fn new(port: &'p dyn MmuPort, config: Config) -> Self {
        GrantTable {
            port,
            config: Config {
                map_handles: config.map_handles.min(SLOT_MASK + 1),
                ..config
            },
            state: Mutex::new(State {
                domains: Vec::new(),
                retired: GrantCounters::default(),
            }),
            _policy: PhantomData,
        }
    }

    /// Checks that the caller `grantee` exists and is not `granter`, and
    /// that `gref` is in range and granted by `granter` to it.
    fn granted(
        &self,
        st: &State,
        grantee: DomainId,
        granter: DomainId,
        gref: GrantRef,
    ) -> Result<Found, GrantError> {
        let di = st.index(grantee)?;
        if granter == grantee {
            return Err(GrantError::SelfGrant(grantee));
        }
        let gi = st.index(granter)?;
        if gref.0 >= self.config.grant_entries {
            return Err(GrantError::RefOutOfRange {
                gref,
                limit: self.config.grant_entries,
            });
        }
        match &st.domains[gi].grants[gref.0 as usize] {
            None => Err(GrantError::NotGranted { granter, gref }),
            Some(g) if g.grantee != grantee || g.orphaned => Err(GrantError::NotGrantedTo {
                gref,
                domain: grantee,
            }),
            Some(g) => Ok(Found {
                di,
                gi,
                mfn: g.mfn,
                readonly: g.readonly,
                pins: g.pins,
            }),
        }
    }

    /// Unmaps the mapping in slot `si` of domain `di` through the MMU
    /// server, releasing the slot and the reference's pin on success. An
    /// MMU server that no longer knows the mapper has already dropped (and
    /// flushed, at its `DestroyDomain`) every shadow of it: that counts as
    /// unmapped, not accessed.
    fn unmap_slot(&self, st: &mut State, di: usize, si: usize, batch: &mut Batch) -> UnmapStatus {
        let d = &st.domains[di];
        let Some(m) = d.slots[si].mapping else {
            return Err(GrantError::BadHandle(d.handle(si)));
        };
        let reply = self.port.call(&MmuRequest::UnmapForeign {
            domain: d.id,
            gfn: m.gfn,
        });
        match reply {
            MmuReply::ForeignUnmapped {
                accessed,
                cpus,
                flush,
                ..
            } => {
                batch.accessed |= accessed;
                batch.cpus = batch.cpus.union(cpus);
                batch.mmu_flush = FlushObligation::merge(batch.mmu_flush, flush);
            }
            MmuReply::Error {
                reason: MmuError::UnknownDomain(x),
                flush,
            } if x == d.id => {
                batch.mmu_flush = FlushObligation::merge(batch.mmu_flush, flush);
            }
            other => {
                batch.mmu_flush = FlushObligation::merge(batch.mmu_flush, other.flush());
                return Err(mmu_error(&other));
            }
        }
        let slot = &mut st.domains[di].slots[si];
        slot.mapping = None;
        slot.generation = (slot.generation + 1) & (u32::MAX >> SLOT_BITS);
        if let Ok(gi) = st.index(m.granter) {
            if let Some(g) = st.domains[gi].grants[m.gref.0 as usize].as_mut() {
                g.pins = g.pins.saturating_sub(1);
            }
        }
        batch.unmapped += 1;
        st.domains[di].counters.unmaps += 1;
        Ok(())
    }

    /// The batch's flush (the policy's decision merged with what the MMU
    /// server asked), counted on domain `di`'s counters (if it still
    /// exists; else on the retired counts).
    fn finish_batch(
        &self,
        st: &mut State,
        di: Option<usize>,
        b: &Batch,
    ) -> Option<FlushObligation> {
        let mut flush = b.mmu_flush;
        if b.unmapped == 0 {
            return flush;
        }
        let c = match di {
            Some(i) => &mut st.domains[i].counters,
            None => &mut st.retired,
        };
        c.batches += 1;
        if P::needs_flush(b.accessed) {
            c.flushes += 1;
            c.flush_cpus += u64::from(b.cpus.len());
            flush = FlushObligation::merge(
                flush,
                Some(FlushObligation {
                    cpus: b.cpus,
                    scope: FlushScope::All,
                }),
            );
        } else {
            c.flushes_avoided += 1;
        }
        flush
    }
}

impl<P: FlushPolicy> GrantServer for GrantTable<'_, P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn create_domain(&self, domain: DomainId, memory: &MemoryMap) -> GrantReply {
        let mut st = self.state.lock();
        if st.index(domain).is_ok() {
            return GrantReply::error(GrantError::DomainExists(domain));
        }
        if st.domains.len() >= self.config.max_domains as usize {
            return GrantReply::error(GrantError::CapacityExceeded {
                what: GrantResource::Domains,
                limit: self.config.max_domains,
            });
        }
        let mut grants = Vec::new();
        grants.resize_with(self.config.grant_entries as usize, || None);
        st.domains.push(Domain {
            id: domain,
            memory: memory.clone(),
            grants,
            slots: Vec::new(),
            counters: GrantCounters::default(),
        });
        GrantReply::Done { flush: None }
    }

    fn destroy_domain(&self, domain: DomainId) -> GrantReply {
        let mut st = self.state.lock();
        let di = match st.index(domain) {
            Ok(i) => i,
            Err(e) => return GrantReply::error(e),
        };
        let mut batch = Batch::default();
        let mut first_error = None;
        // Its own mappings, then every mapping of its grants by others.
        for si in 0..st.domains[di].slots.len() {
            if st.domains[di].slots[si].mapping.is_some() {
                if let Err(e) = self.unmap_slot(&mut st, di, si, &mut batch) {
                    first_error.get_or_insert(e);
                }
            }
        }
        for mi in 0..st.domains.len() {
            for si in 0..st.domains[mi].slots.len() {
                let theirs = st.domains[mi].slots[si]
                    .mapping
                    .is_some_and(|m| m.granter == domain);
                if mi != di && theirs {
                    if let Err(e) = self.unmap_slot(&mut st, mi, si, &mut batch) {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        let d = st.domains.swap_remove(di);
        for g in st
            .domains
            .iter_mut()
            .flat_map(|o| o.grants.iter_mut().flatten())
        {
            if g.grantee == domain {
                g.orphaned = true;
            }
        }
        let mut own = d.levels();
        own.grants_active = 0;
        own.maps_active = 0;
        own.handles_in_use = 0;
        st.retired = st.retired.sum(&own);
        let flush = self.finish_batch(&mut st, None, &batch);
        match first_error {
            // The domain is gone either way; a mapping the MMU server would
            // not unmap is reported (with the flush of the others).
            Some(reason) => GrantReply::Error { reason, flush },
            None => GrantReply::Done { flush },
        }
    }

    fn grant(
        &self,
        domain: DomainId,
        gref: GrantRef,
        grantee: DomainId,
        gfn: Gfn,
        readonly: bool,
    ) -> GrantReply {
        let mut st = self.state.lock();
        let r = (|| {
            let di = st.index(domain)?;
            st.index(grantee)?;
            if grantee == domain {
                return Err(GrantError::SelfGrant(domain));
            }
            if gref.0 >= self.config.grant_entries {
                return Err(GrantError::RefOutOfRange {
                    gref,
                    limit: self.config.grant_entries,
                });
            }
            let d = &mut st.domains[di];
            if d.grants[gref.0 as usize].is_some() {
                return Err(GrantError::RefInUse(gref));
            }
            let mfn = d.mfn(gfn).ok_or(GrantError::GfnNotInMemory(gfn))?;
            d.grants[gref.0 as usize] = Some(Grant {
                grantee,
                orphaned: false,
                mfn,
                readonly,
                pins: 0,
            });
            d.counters.grants += 1;
            Ok(GrantReply::Done { flush: None })
        })();
        r.unwrap_or_else(GrantReply::error)
    }

    fn end_access(&self, domain: DomainId, gref: GrantRef) -> GrantReply {
        let mut st = self.state.lock();
        let r = (|| {
            let di = st.index(domain)?;
            if gref.0 >= self.config.grant_entries {
                return Err(GrantError::RefOutOfRange {
                    gref,
                    limit: self.config.grant_entries,
                });
            }
            let slot = &mut st.domains[di].grants[gref.0 as usize];
            match slot {
                None => Err(GrantError::NotGranted {
                    granter: domain,
                    gref,
                }),
                Some(g) if g.pins > 0 => Err(GrantError::StillMapped { gref, maps: g.pins }),
                Some(_) => {
                    *slot = None;
                    Ok(GrantReply::Done { flush: None })
                }
            }
        })();
        r.unwrap_or_else(GrantReply::error)
    }

    fn map(
        &self,
        domain: DomainId,
        granter: DomainId,
        gref: GrantRef,
        gfn: Gfn,
        writable: bool,
    ) -> GrantReply {
        let mut st = self.state.lock();
        let r = (|| {
            let Found {
                di,
                gi,
                mfn,
                readonly,
                pins,
            } = self.granted(&st, domain, granter, gref)?;
            if writable && readonly {
                return Err(GrantError::ReadOnly(gref));
            }
            if pins >= self.config.maps_per_grant {
                return Err(GrantError::CapacityExceeded {
                    what: GrantResource::MapsPerGrant,
                    limit: self.config.maps_per_grant,
                });
            }
            let d = &st.domains[di];
            let free = d.slots.iter().position(|s| s.mapping.is_none());
            if free.is_none() && d.slots.len() >= self.config.map_handles as usize {
                return Err(GrantError::CapacityExceeded {
                    what: GrantResource::MapHandles,
                    limit: self.config.map_handles,
                });
            }
            let reply = self.port.call(&MmuRequest::MapForeign {
                domain,
                gfn,
                owner: granter,
                mfn,
                writable,
            });
            let MmuReply::Done { flush } = reply else {
                return Err(mmu_error(&reply));
            };
            let d = &mut st.domains[di];
            let si = match free {
                Some(i) => i,
                None => {
                    d.slots.push(Slot {
                        generation: 0,
                        mapping: None,
                    });
                    d.slots.len() - 1
                }
            };
            d.slots[si].mapping = Some(Mapping { granter, gref, gfn });
            d.counters.maps += 1;
            let handle = d.handle(si);
            if let Some(g) = st.domains[gi].grants[gref.0 as usize].as_mut() {
                g.pins += 1;
            }
            Ok(GrantReply::Mapped { handle, flush })
        })();
        r.unwrap_or_else(GrantReply::error)
    }

    fn unmap(&self, domain: DomainId, handles: &[MapHandle]) -> GrantReply {
        let mut st = self.state.lock();
        let di = match st.index(domain) {
            Ok(i) => i,
            Err(e) => return GrantReply::error(e),
        };
        if handles.len() > MAX_UNMAP_BATCH {
            // (Cannot come over the wire: such a batch does not decode.)
            return GrantReply::error(GrantError::Malformed(DecodeError::BadEncoding));
        }
        let mut batch = Batch::default();
        let mut status = heapless::Vec::<UnmapStatus, MAX_UNMAP_BATCH>::new();
        for &h in handles {
            let s = st.domains[di]
                .slot_of(h)
                .and_then(|si| self.unmap_slot(&mut st, di, si, &mut batch));
            let _ = status.push(s);
        }
        let flush = self.finish_batch(&mut st, Some(di), &batch);
        GrantReply::Unmapped { status, flush }
    }

    fn copy(
        &self,
        domain: DomainId,
        granter: DomainId,
        gref: GrantRef,
        offset: u16,
        local: Gpa,
        len: u16,
        direction: CopyDirection,
    ) -> GrantReply {
        let mut st = self.state.lock();
        let r = (|| {
            let g = self.granted(&st, domain, granter, gref)?;
            let di = g.di;
            if direction == CopyDirection::ToGrant && g.readonly {
                return Err(GrantError::ReadOnly(gref));
            }
            if u64::from(offset) + u64::from(len) > PAGE_SIZE {
                return Err(GrantError::CopyCrossesPage { offset, len });
            }
            let local_off = local.page_offset();
            if local_off + u64::from(len) > PAGE_SIZE {
                return Err(GrantError::CopyCrossesPage {
                    offset: local_off as u16,
                    len,
                });
            }
            let mine = st.domains[di]
                .mfn(local.frame())
                .ok_or(GrantError::GfnNotInMemory(local.frame()))?;
            let granted = g.mfn.at(u64::from(offset));
            let here = mine.at(local_off);
            let (src, dst) = match direction {
                CopyDirection::FromGrant => (granted, here),
                CopyDirection::ToGrant => (here, granted),
            };
            st.domains[di].counters.copies += 1;
            Ok(GrantReply::CopyPlan {
                src,
                dst,
                len,
                flush: None,
            })
        })();
        r.unwrap_or_else(GrantReply::error)
    }

    fn counters(&self, domain: Option<DomainId>) -> GrantReply {
        let st = self.state.lock();
        let counters = match domain {
            None => st
                .domains
                .iter()
                .fold(st.retired, |acc, d| acc.sum(&d.levels())),
            Some(id) => match st.index(id) {
                Ok(i) => st.domains[i].levels(),
                Err(e) => return GrantReply::error(e),
            },
        };
        GrantReply::Counters {
            counters,
            flush: None,
        }
    }
}
