//! The simulated machine around a grant server and the MMU server it maps
//! through: plays the kernel (carries out replies, flushes, copy plans) and
//! the hardware (shadow walks that set A/D, a TLB model per pCPU), speaking
//! to both servers only in encoded messages, and judges after every step.
//!
//! Hardware model: as in the MMU suite ([`crate::machine`]), a guest access
//! on a pCPU consults that pCPU's TLB model, else walks the shadow tables
//! from the root the MMU server handed out, **setting A on every entry it
//! walks (D on the leaf for a write) before it caches the translation**, as
//! the CPU does. A speculative walk ([`Rig::speculate`]) does the same for
//! every translation reachable under a vCPU's root. Entries leave a TLB only
//! through flush obligations (MMU replies: per their scope; grant replies:
//! every guest translation on the named pCPUs, see `abi::grant`) or when an
//! access faults on them.
//!
//! Oracle (after every step): no pCPU's TLB and no shadow leaf of a vCPU
//! holds a translation to a frame its domain may not reach (its own frames,
//! and granted frames it has a live mapping of, with write only through a
//! writable mapping); every access through a foreign gfn reaches exactly
//! the frame of a live mapping, and a write through a read-only one faults;
//! the grant server's levels (grants, pins, handles) equal the suite's.

use crate::arch::{self, Ctrl, Rights, Size, Walk, A, ADDR_MASK, D, P, PF_P, PF_W, RW, US};
use crate::machine::{Failure, Res, RECENT};
use crate::ram::{Ram, SuitePhys};
use crate::tlb::{Entry, Tlb};
use abi::grant::{
    grant_dispatch, CopyDirection, GrantCounters, GrantError, GrantRef, GrantReply, GrantRequest,
    GrantServer, MapHandle, MAX_UNMAP_BATCH,
};
use abi::mmu::{MemRegion, MemoryMap, MmuReply, MmuRequest, MmuServer};
use abi::{
    DomainId, FlushObligation, FlushScope, Gfn, GuestCr3, Gva, Mfn, PagingMode, PcpuId,
    PfErrorCode, VcpuId, MAX_MESSAGE,
};
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

/// Guest frames of each domain (gfn 0 up).
pub const DOM_FRAMES: u64 = 64;
/// The first gfn of a domain that holds data (below: its page tables).
pub const FIRST_DATA_GFN: u64 = 8;
/// The first gfn where a domain maps foreign frames (outside its memory).
pub const FOREIGN_GFN: u64 = 0x100;
/// Foreign gfns the guest page tables cover (from [`FOREIGN_GFN`]).
pub const FOREIGN_SLOTS: u64 = 0x100;
/// Guest-virtual base of the guest's linear map: gfn `g` is at
/// `WINDOW + g * 4096` for every `g < FOREIGN_GFN + FOREIGN_SLOTS`.
pub const WINDOW: u64 = 0x4000_0000;

/// The guest-virtual address of gfn `g` in every domain's linear map.
pub const fn gva_of(g: u64) -> u64 {
    WINDOW + g * 4096
}

/// The result of one guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Done; for a read, the value read.
    Ok(u64),
    /// #PF injected with this error code.
    Fault(u64),
}

/// Counts of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GrantStats {
    /// Unmap batches whose reply carried a flush.
    pub flushed_batches: u64,
    /// Unmap batches that unmapped something without a flush.
    pub unflushed_batches: u64,
    /// pCPU flushes carried out for grant replies.
    pub grant_pcpu_flushes: u64,
    /// Translations to unmapped frames found in a TLB model right after an
    /// unmap (always 0 when the run passes).
    pub stale: u64,
}

struct Dom {
    id: DomainId,
    first_mfn: u64,
    alive: bool,
}

struct Vcpu {
    id: VcpuId,
    dom: usize,
    pcpu: usize,
    root: Option<u64>,
    started: bool,
}

/// A grant the suite made and the server accepted.
#[derive(Clone, Copy, Debug)]
struct GrantRec {
    grantee: usize,
    mfn: u64,
    readonly: bool,
}

/// A mapping the server made.
#[derive(Clone, Copy, Debug)]
struct MapRec {
    granter: usize,
    gref: GrantRef,
    gfn: u64,
    mfn: u64,
    writable: bool,
}

/// The rig: the two servers, the memory, domains, vCPUs and TLBs.
pub struct Rig<'m> {
    mmu: &'m dyn MmuServer,
    grant: &'m dyn GrantServer,
    phys: &'m SuitePhys<'m>,
    ram: Ram<'m>,
    name: String,
    step: u64,
    op: String,
    recent: VecDeque<String>,
    doms: Vec<Dom>,
    vcpus: Vec<Vcpu>,
    tlbs: Vec<Tlb>,
    running: Vec<Option<usize>>,
    next_mfn: u64,
    end_mfn: u64,
    grants: BTreeMap<(usize, u32), GrantRec>,
    maps: BTreeMap<(usize, u32), MapRec>,
    /// Foreign mappings made directly with the MMU server: (domain, gfn).
    direct: BTreeMap<(usize, u64), MapRec>,
    /// Counters.
    pub stats: GrantStats,
}

fn ctrl() -> Ctrl {
    Ctrl::DEFAULT
}

impl<'m> Rig<'m> {
    /// A rig with `pcpus` pCPUs around the two servers; guest RAM comes
    /// from frames `phys.ram().first_mfn() .. + guest_frames`.
    pub fn new(
        name: &str,
        mmu: &'m dyn MmuServer,
        grant: &'m dyn GrantServer,
        phys: &'m SuitePhys<'m>,
        guest_frames: u64,
        pcpus: usize,
    ) -> Rig<'m> {
        let ram = phys.ram();
        Rig {
            mmu,
            grant,
            phys,
            ram,
            name: String::from(name),
            step: 0,
            op: String::from("start"),
            recent: VecDeque::new(),
            doms: Vec::new(),
            vcpus: Vec::new(),
            tlbs: (0..pcpus).map(|_| Tlb::default()).collect(),
            running: (0..pcpus).map(|_| None).collect(),
            next_mfn: ram.first_mfn(),
            end_mfn: ram.first_mfn() + guest_frames,
            grants: BTreeMap::new(),
            maps: BTreeMap::new(),
            direct: BTreeMap::new(),
            stats: GrantStats::default(),
        }
    }

    /// The memory the servers run on.
    pub fn phys(&self) -> &'m SuitePhys<'m> {
        self.phys
    }

    /// A failure at the current step.
    pub fn fail(&self, what: &str, expected: String, observed: String) -> Box<Failure> {
        Box::new(Failure {
            scenario: self.name.clone(),
            step: self.step,
            op: self.op.clone(),
            what: String::from(what),
            gva: None,
            expected,
            observed,
            recent: self.recent.iter().cloned().collect(),
        })
    }

    fn begin(&mut self, op: String) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        let last = core::mem::replace(&mut self.op, op);
        if self.step > 0 {
            self.recent.push_back(last);
        }
        self.step += 1;
    }

    // ---- the wire ----------------------------------------------------------

    fn mmu_call(&mut self, req: &MmuRequest) -> Res<MmuReply> {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = abi::encode(req, &mut buf)
            .map_err(|e| self.fail("MMU request encodes", "fits".into(), format!("{e:?}")))?;
        let mut out = [0u8; MAX_MESSAGE];
        let m = abi::dispatch(self.mmu, &buf[..n], &mut out);
        abi::decode::<MmuReply>(&out[..m])
            .map_err(|e| self.fail("MMU reply decodes", "MmuReply".into(), format!("{e:?}")))
    }

    /// Sends raw bytes to the grant server and decodes its reply.
    pub fn grant_raw(&mut self, bytes: &[u8]) -> Res<GrantReply> {
        let mut out = [0u8; MAX_MESSAGE];
        let m = grant_dispatch(self.grant, bytes, &mut out);
        if m == 0 || m > MAX_MESSAGE {
            return Err(self.fail(
                "grant reply length",
                format!("1..={MAX_MESSAGE}"),
                format!("{m}"),
            ));
        }
        let r = abi::decode::<GrantReply>(&out[..m])
            .map_err(|e| self.fail("grant reply decodes", "GrantReply".into(), format!("{e:?}")))?;
        self.grant_flush(r.flush());
        Ok(r)
    }

    /// Sends a grant request encoded, carries out the reply's flush, and
    /// returns the reply.
    pub fn grant_call(&mut self, req: &GrantRequest) -> Res<GrantReply> {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = abi::encode(req, &mut buf)
            .map_err(|e| self.fail("grant request encodes", "fits".into(), format!("{e:?}")))?;
        self.grant_raw(&buf[..n])
    }

    fn grant_flush(&mut self, f: Option<FlushObligation>) {
        let Some(f) = f else { return };
        for p in f.cpus.iter() {
            if let Some(t) = self.tlbs.get_mut(p.0 as usize) {
                t.flush_all();
                self.stats.grant_pcpu_flushes += 1;
            }
        }
    }

    fn mmu_flush(&mut self, dom: usize, f: Option<FlushObligation>) {
        let Some(f) = f else { return };
        let mine: Vec<u32> = (0..self.vcpus.len())
            .filter(|&v| self.vcpus[v].dom == dom)
            .map(|v| v as u32)
            .collect();
        for p in f.cpus.iter() {
            if let Some(t) = self.tlbs.get_mut(p.0 as usize) {
                t.flush_scope(f.scope, &|v| mine.contains(&v));
            }
        }
        if f.scope == FlushScope::AllReloadRoots {
            for v in 0..self.vcpus.len() {
                if self.vcpus[v].dom == dom {
                    self.vcpus[v].root = None;
                }
            }
        }
    }

    fn mmu_done(&mut self, dom: usize, r: MmuReply, what: &str) -> Res<()> {
        self.mmu_flush(dom, r.flush());
        match r {
            MmuReply::Done { .. } => Ok(()),
            other => Err(self.fail(what, "Done".into(), format!("{other:?}"))),
        }
    }

    // ---- domains and vCPUs -------------------------------------------------

    /// Creates a domain (in both servers) with [`DOM_FRAMES`] fresh frames
    /// and guest page tables mapping the linear window; returns its index.
    pub fn domain(&mut self) -> Res<usize> {
        let id = DomainId(self.doms.len() as u32 + 1);
        self.begin(format!("CreateDomain {}", id.0));
        if self.next_mfn + DOM_FRAMES > self.end_mfn {
            return Err(self.fail("guest RAM", "frames".into(), "none left".into()));
        }
        let first = self.next_mfn;
        self.next_mfn += DOM_FRAMES;
        for f in first..first + DOM_FRAMES {
            self.ram.zero(f);
        }
        // PML4 (gfn 0) -> PDPT (1) -> PD (2) -> PT (3): WINDOW is PDPT
        // index 1; gfns 0..512 are PT entries 0..512.
        let tbl = |g: u64| (first + g) << 12;
        let flags = P | RW | US;
        self.ram.write(tbl(0), (1 << 12) | flags);
        self.ram.write(tbl(1) + 8, (2 << 12) | flags);
        self.ram
            .write(tbl(2) + 8 * arch::index(WINDOW, 2), (3 << 12) | flags);
        for g in 0..FOREIGN_GFN + FOREIGN_SLOTS {
            self.ram.write(
                tbl(3) + 8 * arch::index(gva_of(g), 1),
                (g << 12) | flags | A | D,
            );
        }
        let mut memory = MemoryMap::new();
        let _ = memory.push(MemRegion {
            gfn: Gfn(0),
            mfn: Mfn(first),
            pages: DOM_FRAMES,
        });
        self.doms.push(Dom {
            id,
            first_mfn: first,
            alive: true,
        });
        let d = self.doms.len() - 1;
        let r = self.mmu_call(&MmuRequest::CreateDomain {
            domain: id,
            memory: memory.clone(),
        })?;
        self.mmu_done(d, r, "MMU CreateDomain")?;
        let r = self.grant_call(&GrantRequest::CreateDomain { domain: id, memory })?;
        self.expect_done(r, "grant CreateDomain")?;
        self.check()?;
        Ok(d)
    }

    /// The domain id of index `d`.
    pub fn id(&self, d: usize) -> DomainId {
        self.doms[d].id
    }

    /// The id of domain index `d`, or `DomainId(u32::MAX)` (no domain) for
    /// an index the rig does not have (scenarios pass `usize::MAX` to name
    /// an unknown domain).
    pub fn peer(&self, d: usize) -> DomainId {
        self.doms.get(d).map_or(DomainId(u32::MAX), |x| x.id)
    }

    /// The host frame of guest frame `gfn` of domain `d`.
    pub fn mfn(&self, d: usize, gfn: u64) -> u64 {
        self.doms[d].first_mfn + gfn
    }

    /// Creates a vCPU of domain `d` that runs on pCPU `pcpu`.
    pub fn vcpu(&mut self, d: usize, pcpu: usize) -> Res<usize> {
        let id = VcpuId(self.vcpus.len() as u32 + 1);
        self.begin(format!(
            "CreateVcpu {} in domain {}",
            id.0, self.doms[d].id.0
        ));
        let r = self.mmu_call(&MmuRequest::CreateVcpu {
            domain: self.doms[d].id,
            vcpu: id,
        })?;
        self.mmu_done(d, r, "CreateVcpu")?;
        self.vcpus.push(Vcpu {
            id,
            dom: d,
            pcpu,
            root: None,
            started: false,
        });
        Ok(self.vcpus.len() - 1)
    }

    fn deschedule(&mut self, v: usize) -> Res<()> {
        let p = self.vcpus[v].pcpu;
        let r = self.mmu_call(&MmuRequest::VcpuDescheduled {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
        })?;
        self.running[p] = None;
        let d = self.vcpus[v].dom;
        self.mmu_done(d, r, "VcpuDescheduled")
    }

    fn take_root(&mut self, v: usize, r: MmuReply, what: &str) -> Res<()> {
        let d = self.vcpus[v].dom;
        self.mmu_flush(d, r.flush());
        match r {
            MmuReply::LoadShadowRoot { root, .. } => {
                self.vcpus[v].root = Some(root.0);
                Ok(())
            }
            other => Err(self.fail(what, "LoadShadowRoot".into(), format!("{other:?}"))),
        }
    }

    /// Makes vCPU `v` the one running on its pCPU (scheduling it, and the
    /// first time setting its paging mode and CR3), with a valid root.
    fn run(&mut self, v: usize) -> Res<()> {
        let p = self.vcpus[v].pcpu;
        if self.running[p] != Some(v) {
            if let Some(o) = self.running[p] {
                self.deschedule(o)?;
            }
            let r = self.mmu_call(&MmuRequest::VcpuScheduled {
                vcpu: self.vcpus[v].id,
                pcpu: PcpuId(p as u32),
            })?;
            self.running[p] = Some(v);
            self.take_root(v, r, "VcpuScheduled")?;
        }
        if !self.vcpus[v].started {
            self.vcpus[v].started = true;
            let d = self.vcpus[v].dom;
            let r = self.mmu_call(&MmuRequest::SetPagingMode {
                vcpu: self.vcpus[v].id,
                pcpu: PcpuId(p as u32),
                mode: PagingMode(PagingMode::WP | PagingMode::NXE),
            })?;
            match r {
                MmuReply::LoadShadowRoot { .. } => self.take_root(v, r, "SetPagingMode")?,
                r => self.mmu_done(d, r, "SetPagingMode")?,
            }
            let r = self.mmu_call(&MmuRequest::WriteCr3 {
                vcpu: self.vcpus[v].id,
                pcpu: PcpuId(p as u32),
                cr3: GuestCr3(0),
            })?;
            self.take_root(v, r, "WriteCr3")?;
        }
        if self.vcpus[v].root.is_none() {
            let r = self.mmu_call(&MmuRequest::VcpuScheduled {
                vcpu: self.vcpus[v].id,
                pcpu: PcpuId(p as u32),
            })?;
            self.take_root(v, r, "VcpuScheduled (root reload)")?;
        }
        Ok(())
    }

    /// Destroys domain `d`: its vCPUs are descheduled, then the grant server
    /// and then the MMU server are told (the kernel's order).
    pub fn destroy(&mut self, d: usize) -> Res<GrantReply> {
        self.begin(format!("DestroyDomain {}", self.doms[d].id.0));
        for v in 0..self.vcpus.len() {
            if self.vcpus[v].dom == d && self.running[self.vcpus[v].pcpu] == Some(v) {
                self.deschedule(v)?;
            }
        }
        let r = self.grant_call(&GrantRequest::DestroyDomain {
            domain: self.doms[d].id,
        })?;
        let id = self.doms[d].id;
        let m = self.mmu_call(&MmuRequest::DestroyDomain { domain: id })?;
        self.mmu_done(d, m, "MMU DestroyDomain (after the grant server's)")?;
        self.doms[d].alive = false;
        // The suite's model: mappings held by or of `d` are gone.
        self.maps.retain(|&(m, _), rec| m != d && rec.granter != d);
        self.direct.retain(|&(m, _), _| m != d);
        self.grants.retain(|&(g, _), _| g != d);
        for g in self.grants.values_mut() {
            if g.grantee == d {
                g.grantee = usize::MAX;
            }
        }
        for v in 0..self.vcpus.len() {
            if self.vcpus[v].dom == d {
                self.vcpus[v].root = None;
            }
        }
        self.check()?;
        Ok(r)
    }

    /// Destroys every live domain (as [`Rig::destroy`]: grant server, then
    /// MMU server) and checks that nothing is left: no grant, pin or map
    /// handle in the grant server, no shadow frame held by the MMU server
    /// beyond one per pCPU.
    pub fn teardown(&mut self) -> Res<()> {
        for d in 0..self.doms.len() {
            if self.doms[d].alive {
                let r = self.destroy(d)?;
                self.expect_done(r, "DestroyDomain at teardown")?;
            }
        }
        self.begin(String::from("teardown"));
        // A server may keep per-pCPU frames of its own (per-pCPU L4
        // copies), at most one per pCPU; anything more outlived its domain.
        let held = self.phys.pool_in_use();
        if held > self.tlbs.len() {
            return Err(self.fail(
                "nothing leaked: shadow frames after every domain is gone",
                format!("at most {} (per-pCPU frames)", self.tlbs.len()),
                format!("{held}"),
            ));
        }
        self.check_levels()
    }

    // ---- grant operations ----------------------------------------------------

    fn expect_done(&self, r: GrantReply, what: &str) -> Res<()> {
        match r {
            GrantReply::Done { .. } => Ok(()),
            other => Err(self.fail(what, "Done".into(), format!("{other:?}"))),
        }
    }

    /// Domain `d` grants `grantee` its frame `gfn` under `gref`.
    pub fn grant(
        &mut self,
        d: usize,
        gref: u32,
        grantee: usize,
        gfn: u64,
        readonly: bool,
    ) -> Res<GrantReply> {
        self.begin(format!(
            "Grant {} ref {gref} to {} gfn {gfn:#x} ro {readonly}",
            self.doms[d].id.0,
            self.peer(grantee).0
        ));
        let r = self.grant_call(&GrantRequest::Grant {
            domain: self.doms[d].id,
            gref: GrantRef(gref),
            grantee: self.peer(grantee),
            gfn: Gfn(gfn),
            readonly,
        })?;
        if let GrantReply::Done { .. } = r {
            self.grants.insert(
                (d, gref),
                GrantRec {
                    grantee,
                    mfn: self.mfn(d, gfn),
                    readonly,
                },
            );
        }
        self.check()?;
        Ok(r)
    }

    /// Like [`Rig::grant`], failing unless the server accepts.
    pub fn grant_ok(
        &mut self,
        d: usize,
        gref: u32,
        grantee: usize,
        gfn: u64,
        readonly: bool,
    ) -> Res<()> {
        let r = self.grant(d, gref, grantee, gfn, readonly)?;
        self.expect_done(r, "Grant")
    }

    /// Domain `d` ends access through `gref`.
    pub fn end_access(&mut self, d: usize, gref: u32) -> Res<GrantReply> {
        self.begin(format!("EndAccess {} ref {gref}", self.doms[d].id.0));
        let r = self.grant_call(&GrantRequest::EndAccess {
            domain: self.doms[d].id,
            gref: GrantRef(gref),
        })?;
        if let GrantReply::Done { .. } = r {
            if let Some(g) = self.grants.remove(&(d, gref)) {
                if let Some(m) = self
                    .maps
                    .values()
                    .find(|m| m.granter == d && m.gref.0 == gref)
                {
                    return Err(self.fail(
                        "ending access while mapped",
                        "StillMapped".into(),
                        format!("Done, with a mapping at gfn {:#x} ({:#x})", m.gfn, g.mfn),
                    ));
                }
            }
        }
        self.check()?;
        Ok(r)
    }

    /// Domain `d` maps `granter`'s `gref` at its gfn `gfn`.
    pub fn map(
        &mut self,
        d: usize,
        granter: usize,
        gref: u32,
        gfn: u64,
        writable: bool,
    ) -> Res<GrantReply> {
        self.begin(format!(
            "Map {} <- {} ref {gref} at gfn {gfn:#x} w {writable}",
            self.doms[d].id.0,
            self.peer(granter).0
        ));
        let r = self.grant_call(&GrantRequest::Map {
            domain: self.doms[d].id,
            granter: self.peer(granter),
            gref: GrantRef(gref),
            gfn: Gfn(gfn),
            writable,
        })?;
        if let GrantReply::Mapped { handle, .. } = r {
            let Some(g) = self.grants.get(&(granter, gref)).copied() else {
                return Err(self.fail(
                    "map of a reference not granted",
                    "an error".into(),
                    format!("{r:?}"),
                ));
            };
            if g.grantee != d {
                return Err(self.fail(
                    "map by another domain than the grantee",
                    "NotGrantedTo".into(),
                    format!("{r:?}"),
                ));
            }
            if writable && g.readonly {
                return Err(self.fail(
                    "read-only grant mapped writable",
                    "ReadOnly".into(),
                    format!("{r:?}"),
                ));
            }
            if self.maps.contains_key(&(d, handle.0)) {
                return Err(self.fail(
                    "map handle unique",
                    "a handle not in use".into(),
                    format!("{handle:?} again"),
                ));
            }
            self.maps.insert(
                (d, handle.0),
                MapRec {
                    granter,
                    gref: GrantRef(gref),
                    gfn,
                    mfn: g.mfn,
                    writable,
                },
            );
        }
        self.check()?;
        Ok(r)
    }

    /// Like [`Rig::map`], returning the handle or failing.
    pub fn map_ok(
        &mut self,
        d: usize,
        granter: usize,
        gref: u32,
        gfn: u64,
        writable: bool,
    ) -> Res<MapHandle> {
        match self.map(d, granter, gref, gfn, writable)? {
            GrantReply::Mapped { handle, .. } => Ok(handle),
            other => Err(self.fail("Map", "Mapped".into(), format!("{other:?}"))),
        }
    }

    /// Domain `d` unmaps a batch of handles; checks the statuses against the
    /// suite's model and that no TLB or shadow leaf still reaches any frame
    /// unmapped.
    pub fn unmap(&mut self, d: usize, handles: &[MapHandle]) -> Res<GrantReply> {
        self.begin(format!(
            "Unmap {} {:x?}",
            self.doms[d].id.0,
            handles.iter().map(|h| h.0).collect::<Vec<_>>()
        ));
        let mut batch = heapless::Vec::<MapHandle, MAX_UNMAP_BATCH>::new();
        for &h in handles {
            if batch.push(h).is_err() {
                return Err(self.fail("scenario", "at most 32 handles".into(), "more".into()));
            }
        }
        let r = self.grant_call(&GrantRequest::Unmap {
            domain: self.doms[d].id,
            handles: batch,
        })?;
        let GrantReply::Unmapped { status, flush } = &r else {
            return Err(self.fail("Unmap", "Unmapped".into(), format!("{r:?}")));
        };
        if status.len() != handles.len() {
            return Err(self.fail(
                "one status per handle",
                format!("{}", handles.len()),
                format!("{}", status.len()),
            ));
        }
        let mut any = false;
        for (h, s) in handles.iter().zip(status.iter()) {
            let live = self.maps.contains_key(&(d, h.0));
            match (live, s) {
                (true, Ok(())) => {
                    self.maps.remove(&(d, h.0));
                    any = true;
                }
                (false, Err(GrantError::BadHandle(x))) if x == h => {}
                _ => {
                    return Err(self.fail(
                        "unmap status",
                        if live {
                            String::from("Ok")
                        } else {
                            format!("BadHandle({h:?})")
                        },
                        format!("{s:?}"),
                    ))
                }
            }
        }
        if any {
            if flush.is_some() {
                self.stats.flushed_batches += 1;
            } else {
                self.stats.unflushed_batches += 1;
            }
        }
        self.check()?;
        Ok(r)
    }

    /// Domain `d` copies through `granter`'s `gref`; a plan is checked
    /// (within the granted frame and the caller's frame, the direction
    /// right) and carried out 8 bytes at a time.
    #[allow(clippy::too_many_arguments)]
    pub fn copy(
        &mut self,
        d: usize,
        granter: usize,
        gref: u32,
        offset: u16,
        local_gpa: u64,
        len: u16,
        direction: CopyDirection,
    ) -> Res<GrantReply> {
        self.begin(format!(
            "Copy {} <-> {} ref {gref} +{offset} local {local_gpa:#x} len {len} {direction:?}",
            self.doms[d].id.0,
            self.peer(granter).0
        ));
        let r = self.grant_call(&GrantRequest::Copy {
            domain: self.doms[d].id,
            granter: self.peer(granter),
            gref: GrantRef(gref),
            offset,
            local: abi::Gpa(local_gpa),
            len,
            direction,
        })?;
        if let GrantReply::CopyPlan { src, dst, len, .. } = r {
            let g = self.grants.get(&(granter, gref)).copied();
            let Some(g) = g.filter(|g| g.grantee == d) else {
                return Err(self.fail(
                    "copy through a reference not granted to the caller",
                    "an error".into(),
                    format!("{r:?}"),
                ));
            };
            if direction == CopyDirection::ToGrant && g.readonly {
                return Err(self.fail(
                    "copy into a read-only grant",
                    "ReadOnly".into(),
                    format!("{r:?}"),
                ));
            }
            let granted = (g.mfn << 12) + u64::from(offset);
            let local = ((self.doms[d].first_mfn + (local_gpa >> 12)) << 12) + (local_gpa & 0xfff);
            let (want_src, want_dst) = match direction {
                CopyDirection::FromGrant => (granted, local),
                CopyDirection::ToGrant => (local, granted),
            };
            let fits = |a: u64| (a & 0xfff) + u64::from(len) <= 4096;
            if (src.0, dst.0) != (want_src, want_dst) || !fits(src.0) || !fits(dst.0) {
                return Err(self.fail(
                    "copy plan",
                    format!("{want_src:#x} -> {want_dst:#x} within their frames"),
                    format!("{r:?}"),
                ));
            }
            // Whole words only in this model (scenarios copy aligned words).
            for i in (0..u64::from(len)).step_by(8) {
                let v = self.ram.read(src.0 + i).unwrap_or(0);
                self.ram.write(dst.0 + i, v);
            }
        }
        self.check()?;
        Ok(r)
    }

    /// The grant server's counters (`None`: the whole server).
    pub fn counters(&mut self, d: Option<usize>) -> Res<GrantCounters> {
        let domain = d.map(|d| self.doms[d].id);
        match self.grant_call(&GrantRequest::GetCounters { domain })? {
            GrantReply::Counters { counters, .. } => Ok(counters),
            other => Err(self.fail("GetCounters", "Counters".into(), format!("{other:?}"))),
        }
    }

    // ---- the MMU server's foreign requests, directly ----------------------------

    /// Sends an MMU request as the grant server would (through the wire),
    /// carrying out the reply's flush for domain `d`.
    pub fn mmu_request(&mut self, d: usize, req: &MmuRequest) -> Res<MmuReply> {
        self.begin(format!("MMU {req:?}"));
        let r = self.mmu_call(req)?;
        self.mmu_flush(d, r.flush());
        Ok(r)
    }

    /// `MapForeign` of `owner`'s frame `owner_gfn` at `gfn` of domain `d`,
    /// straight to the MMU server; recorded in the model if `Done`.
    pub fn mmu_map_foreign(
        &mut self,
        d: usize,
        gfn: u64,
        owner: usize,
        owner_gfn: u64,
        writable: bool,
    ) -> Res<MmuReply> {
        let mfn = self.mfn(owner, owner_gfn);
        let r = self.mmu_request(
            d,
            &MmuRequest::MapForeign {
                domain: self.doms[d].id,
                gfn: Gfn(gfn),
                owner: self.doms[owner].id,
                mfn: Mfn(mfn),
                writable,
            },
        )?;
        if let MmuReply::Done { .. } = r {
            self.direct.insert(
                (d, gfn),
                MapRec {
                    granter: owner,
                    gref: GrantRef(u32::MAX),
                    gfn,
                    mfn,
                    writable,
                },
            );
        }
        self.check()?;
        Ok(r)
    }

    /// `UnmapForeign` straight to the MMU server, then what a grant server
    /// using the hint does: a full flush of `cpus` if and only if
    /// `accessed`. Returns `accessed`; the oracle then checks no pCPU still
    /// caches the frame.
    pub fn mmu_unmap_foreign(&mut self, d: usize, gfn: u64) -> Res<bool> {
        let r = self.mmu_request(
            d,
            &MmuRequest::UnmapForeign {
                domain: self.doms[d].id,
                gfn: Gfn(gfn),
            },
        )?;
        let MmuReply::ForeignUnmapped {
            mfn,
            accessed,
            cpus,
            ..
        } = r
        else {
            return Err(self.fail("UnmapForeign", "ForeignUnmapped".into(), format!("{r:?}")));
        };
        let Some(rec) = self.direct.remove(&(d, gfn)) else {
            return Err(self.fail(
                "UnmapForeign of a gfn not mapped",
                "NotForeignMapped".into(),
                format!("{r:?}"),
            ));
        };
        if mfn.0 != rec.mfn {
            return Err(self.fail(
                "UnmapForeign names the frame",
                format!("{:#x}", rec.mfn),
                format!("{:#x}", mfn.0),
            ));
        }
        if accessed {
            self.grant_flush(Some(FlushObligation {
                cpus,
                scope: FlushScope::All,
            }));
        }
        self.check()?;
        Ok(accessed)
    }

    /// vCPU `v` takes a page fault at `gva` that the MMU server fixes, but
    /// the access is not retried: nothing walks the new shadow leaf.
    pub fn fault_only(&mut self, v: usize, gva: u64, write: bool) -> Res<MmuReply> {
        self.run(v)?;
        let p = self.vcpus[v].pcpu;
        let mut ec = PfErrorCode::U;
        if write {
            ec |= PfErrorCode::W;
        }
        let req = MmuRequest::PageFault {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
            gva: Gva(gva),
            error_code: PfErrorCode(ec),
        };
        let d = self.vcpus[v].dom;
        let r = self.mmu_request(d, &req)?;
        self.check()?;
        Ok(r)
    }

    // ---- the hardware --------------------------------------------------------

    fn read_phys(&self) -> impl Fn(u64) -> Option<u64> + '_ {
        move |a| self.ram.read(a)
    }

    /// vCPU `v` reads (`write: None`) or writes the word at `gva`.
    pub fn access(&mut self, v: usize, gva: u64, write: Option<u64>) -> Res<Access> {
        self.begin(format!(
            "{} {} at {gva:#x}",
            if write.is_some() { "write" } else { "read" },
            self.vcpus[v].id.0
        ));
        self.run(v)?;
        let p = self.vcpus[v].pcpu;
        let key = v as u32;
        let mut result = None;
        for _ in 0..8 {
            if let Some(e) = self.tlbs[p].lookup(key, gva) {
                if (write.is_none() || (e.rights.write && e.dirty)) && e.rights.user {
                    let hpa = e.hpa + (gva & (e.size.bytes() - 1));
                    result = Some(hpa);
                    break;
                }
            }
            let Some(root) = self.vcpus[v].root else {
                self.run(v)?;
                continue;
            };
            let w = arch::walk(&self.read_phys(), root, gva, ctrl());
            let ok = match w {
                Walk::Ok(l) if l.rights.user && (write.is_none() || l.rights.write) => Some(l),
                _ => None,
            };
            if let Some(l) = ok {
                // The CPU sets A (and D for a write) before it caches.
                for i in 0..l.depth {
                    let mut nv = l.vals[i] | A;
                    if i + 1 == l.depth && write.is_some() {
                        nv |= D;
                    }
                    self.ram.write(l.path[i], nv);
                }
                let rights = l.rights;
                self.tlbs[p].insert(Entry {
                    vcpu: key,
                    va: gva & !(l.size.bytes() - 1),
                    size: l.size,
                    hpa: l.base,
                    rights,
                    dirty: write.is_some() || l.vals[l.depth - 1] & D != 0,
                });
                result = Some(l.phys(gva));
                break;
            }
            // A fault: to the MMU server.
            self.tlbs[p].drop_va(key, gva);
            let mut ec = PfErrorCode::U;
            if matches!(w, Walk::Ok(_)) {
                ec |= PF_P as u32;
            }
            if write.is_some() {
                ec |= PF_W as u32;
            }
            let r = self.mmu_call(&MmuRequest::PageFault {
                vcpu: self.vcpus[v].id,
                pcpu: PcpuId(p as u32),
                gva: Gva(gva),
                error_code: PfErrorCode(ec),
            })?;
            let d = self.vcpus[v].dom;
            self.mmu_flush(d, r.flush());
            match r {
                MmuReply::Resume { .. } => {}
                MmuReply::InjectPageFault { error_code, .. } => {
                    let out = Access::Fault(u64::from(error_code.0));
                    self.judge_access(v, gva, write, out, None)?;
                    return Ok(out);
                }
                other => {
                    return Err(self.fail(
                        "page fault reply",
                        "Resume or InjectPageFault".into(),
                        format!("{other:?}"),
                    ))
                }
            }
        }
        let Some(hpa) = result else {
            return Err(self.fail(
                "progress",
                "the access completes within 8 faults".into(),
                "it did not".into(),
            ));
        };
        let out = match write {
            None => Access::Ok(self.ram.read(hpa & !7).unwrap_or(0)),
            Some(val) => {
                self.ram.write(hpa & !7, val);
                Access::Ok(val)
            }
        };
        self.judge_access(v, gva, write, out, Some(hpa))?;
        self.check()?;
        Ok(out)
    }

    /// Judges an access through the linear window against the model.
    fn judge_access(
        &self,
        v: usize,
        gva: u64,
        write: Option<u64>,
        out: Access,
        hpa: Option<u64>,
    ) -> Res<()> {
        let d = self.vcpus[v].dom;
        let gfn = (gva - WINDOW) >> 12;
        let expect: Option<(u64, bool)> = if gfn < DOM_FRAMES {
            Some((self.mfn(d, gfn), true))
        } else {
            self.mappings()
                .find(|(k, m)| *k == d && m.gfn == gfn)
                .map(|(_, m)| (m.mfn, m.writable))
        };
        match (expect, out) {
            (Some((mfn, w)), Access::Ok(_)) => {
                if hpa.map(|h| h >> 12) != Some(mfn) {
                    return Err(self.fail(
                        "access reaches the mapped frame",
                        format!("frame {mfn:#x}"),
                        format!("{hpa:x?}"),
                    ));
                }
                if write.is_some() && !w {
                    return Err(self.fail(
                        "write through a read-only grant mapping",
                        "#PF".into(),
                        "the write went through".into(),
                    ));
                }
            }
            (None, Access::Ok(_)) => {
                return Err(self.fail(
                    "access to a gfn with no live mapping",
                    "#PF".into(),
                    format!("reached {hpa:x?}"),
                ))
            }
            (Some((_, true)), Access::Fault(ec)) => {
                return Err(self.fail(
                    "access through a live mapping",
                    "completes".into(),
                    format!("#PF {ec:#x}"),
                ))
            }
            (Some((_, false)), Access::Fault(_)) if write.is_none() => {
                return Err(self.fail(
                    "read through a live read-only mapping",
                    "completes".into(),
                    format!("{out:?}"),
                ))
            }
            _ => {}
        }
        Ok(())
    }

    /// Speculative walks: every translation reachable under vCPU `v`'s root
    /// is walked (A set on the way, as the CPU does) and cached.
    pub fn speculate(&mut self, v: usize) -> Res<()> {
        self.begin(format!("speculate {}", self.vcpus[v].id.0));
        self.run(v)?;
        let Some(root) = self.vcpus[v].root else {
            return Ok(());
        };
        let p = self.vcpus[v].pcpu;
        for (va, size, base, rights, path, vals, depth) in self.leaves(root) {
            for i in 0..depth {
                self.ram.write(path[i], vals[i] | A);
            }
            self.tlbs[p].insert_if_free(Entry {
                vcpu: v as u32,
                va,
                size,
                hpa: base,
                rights,
                dirty: vals[depth - 1] & D != 0,
            });
        }
        self.check()
    }

    /// Every present leaf under `root`: (va, size, base, rights, entry
    /// addresses, values, depth).
    #[allow(clippy::type_complexity)]
    fn leaves(&self, root: u64) -> Vec<(u64, Size, u64, Rights, [u64; 4], [u64; 4], usize)> {
        let mut out = Vec::new();
        let mut stack = alloc::vec![(root & ADDR_MASK, 4u32, 0u64)];
        while let Some((table, level, va)) = stack.pop() {
            for i in 0..512u64 {
                let Some(e) = self.ram.read(table + 8 * i) else {
                    continue;
                };
                if e & P == 0 {
                    continue;
                }
                let cva = arch::canonical(va | (i << (12 + 9 * (level - 1))));
                let leaf = level == 1 || (level <= 3 && e & arch::PS != 0);
                if leaf {
                    if let Walk::Ok(l) = arch::walk(&self.read_phys(), root, cva, ctrl()) {
                        out.push((cva, l.size, l.base, l.rights, l.path, l.vals, l.depth));
                    }
                } else {
                    stack.push((e & ADDR_MASK, level - 1, cva));
                }
            }
        }
        out
    }

    // ---- the oracle ------------------------------------------------------------

    /// Whether domain `d` may reach host frame `mfn` (and write it).
    fn may_reach(&self, d: usize, mfn: u64) -> Option<bool> {
        let dom = &self.doms[d];
        if dom.alive && mfn >= dom.first_mfn && mfn < dom.first_mfn + DOM_FRAMES {
            return Some(true);
        }
        self.mappings()
            .filter(|(k, m)| *k == d && m.mfn == mfn)
            .map(|(_, m)| m.writable)
            .reduce(|a, b| a || b)
    }

    /// Every live foreign mapping: (mapping domain, its record), made
    /// through the grant server or directly with the MMU server.
    fn mappings(&self) -> impl Iterator<Item = (usize, &MapRec)> {
        self.maps
            .iter()
            .map(|(k, m)| (k.0, m))
            .chain(self.direct.iter().map(|(k, m)| (k.0, m)))
    }

    /// Checks every TLB entry and every shadow leaf of every vCPU against
    /// what its domain may reach, and the grant server's levels.
    pub fn check(&mut self) -> Res<()> {
        let mut stale = 0;
        let mut first: Option<Box<Failure>> = None;
        for (p, t) in self.tlbs.iter().enumerate() {
            for e in t.all() {
                let v = e.vcpu as usize;
                let d = self.vcpus[v].dom;
                let frames = e.size.bytes() >> 12;
                for f in (e.hpa >> 12)..(e.hpa >> 12) + frames {
                    let ok = match self.may_reach(d, f) {
                        Some(w) => w || !e.rights.write,
                        None => false,
                    };
                    if !ok && first.is_none() {
                        stale += 1;
                        first = Some(self.fail(
                            "TLB holds a translation its domain may not use",
                            format!(
                                "no translation of vCPU {} to frame {f:#x} (writable: {})",
                                self.vcpus[v].id.0, e.rights.write
                            ),
                            format!("pCPU {p} caches {:#x} -> {:#x}", e.va, e.hpa),
                        ));
                    }
                }
            }
        }
        if let Some(f) = first {
            self.stats.stale += stale;
            return Err(f);
        }
        for v in 0..self.vcpus.len() {
            let d = self.vcpus[v].dom;
            let Some(root) = self.vcpus[v].root else {
                continue;
            };
            if !self.doms[d].alive {
                continue;
            }
            for (va, size, base, rights, ..) in self.leaves(root) {
                let f = base >> 12;
                let ok = size == Size::K4
                    && match self.may_reach(d, f) {
                        Some(w) => w || !rights.write,
                        None => false,
                    };
                if !ok {
                    return Err(self.fail(
                        "shadow leaf its domain may not use",
                        format!(
                            "no {size:?} leaf to frame {f:#x} (writable: {})",
                            rights.write
                        ),
                        format!("vCPU {} maps {va:#x} -> {base:#x}", self.vcpus[v].id.0),
                    ));
                }
            }
        }
        self.check_levels()
    }

    /// The grant server's levels equal the suite's model: nothing leaked.
    fn check_levels(&mut self) -> Res<()> {
        let c = match self.grant_raw(&[8, 0])? {
            GrantReply::Counters { counters, .. } => counters,
            other => return Err(self.fail("GetCounters", "Counters".into(), format!("{other:?}"))),
        };
        let grants = self.grants.len() as u64;
        let maps = self.maps.len() as u64;
        if (c.grants_active, c.maps_active, c.handles_in_use) != (grants, maps, maps) {
            return Err(self.fail(
                "nothing leaked (grants, mapping pins, map handles)",
                format!("({grants}, {maps}, {maps})"),
                format!(
                    "({}, {}, {})",
                    c.grants_active, c.maps_active, c.handles_in_use
                ),
            ));
        }
        Ok(())
    }

    /// Whether frame `mfn`'s word at `offset` holds `value` (for checking
    /// that writes through read-only mappings changed nothing).
    pub fn frame_word(&self, mfn: u64, offset: u64) -> u64 {
        self.ram.read((mfn << 12) + (offset & !7)).unwrap_or(0)
    }

    /// Expects `r` to be an error with `reason`.
    pub fn expect_error(&self, r: GrantReply, reason: GrantError) -> Res<()> {
        match r {
            GrantReply::Error { reason: got, .. } if got == reason => Ok(()),
            other => Err(self.fail(
                "error reply",
                format!("Error {{ reason: {reason:?} }}"),
                format!("{other:?}"),
            )),
        }
    }

    /// Expects an access to fault (a #PF with P | W for a write through a
    /// read-only mapping, any #PF through no mapping).
    pub fn expect_fault(&self, a: Access, what: &str) -> Res<()> {
        match a {
            Access::Fault(_) => Ok(()),
            other => Err(self.fail(what, "#PF".into(), format!("{other:?}"))),
        }
    }

    /// Expects a read to return `want`.
    pub fn expect_read(&self, a: Access, want: u64, what: &str) -> Res<()> {
        match a {
            Access::Ok(x) if x == want => Ok(()),
            other => Err(self.fail(what, format!("Ok({want:#x})"), format!("{other:?}"))),
        }
    }
}
