//! The kernel driver: sends the server requests and carries out its replies.
//!
//! It sends `Hello` first, `VcpuScheduled` before a vCPU runs on a pCPU (and
//! again after `AllReloadRoots` voids its root), `VcpuDescheduled` when it
//! leaves, `SetPagingMode` after the first scheduling, and requests naming a
//! vCPU from the pCPU it runs on. Every reply's flush obligation is carried
//! out on the pCPU TLB models it names.

use super::{Dom, Machine, Res, Vcpu};
use crate::arch::Ctrl;
use crate::history::History;
use abi::{
    DomainId, FlushObligation, FlushScope, Gfn, GuestCr3, Gva, MemRegion, MemoryMap, MmuReply,
    MmuRequest, PagingMode, PcpuId, VcpuId, MAX_MESSAGE,
};
use alloc::collections::{BTreeMap, BTreeSet};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

impl<'m> Machine<'m> {
    // ---- the wire ----------------------------------------------------------

    /// Sends raw bytes to the server and decodes its reply.
    pub fn call_raw(&mut self, bytes: &[u8]) -> Res<MmuReply> {
        let mut out = [0u8; MAX_MESSAGE];
        let n = abi::dispatch(self.server, bytes, &mut out);
        if n == 0 || n > MAX_MESSAGE {
            return Err(self.fail(
                "reply length",
                None,
                format!("1..={MAX_MESSAGE} bytes"),
                format!("{n} bytes"),
            ));
        }
        abi::decode::<MmuReply>(&out[..n]).map_err(|e| {
            self.fail(
                "reply decodes",
                None,
                String::from("a well-formed MmuReply"),
                format!("{e:?} for bytes {:02x?}", &out[..n]),
            )
        })
    }

    /// Sends `req` encoded and decodes the reply.
    pub fn call(&mut self, req: &MmuRequest) -> Res<MmuReply> {
        let mut buf = [0u8; MAX_MESSAGE];
        let n = abi::encode(req, &mut buf).map_err(|e| {
            self.fail(
                "request encodes",
                None,
                String::from("fits"),
                format!("{e:?}"),
            )
        })?;
        self.call_raw(&buf[..n])
    }

    pub(super) fn flush(&mut self, dom: usize, f: Option<FlushObligation>) {
        let Some(f) = f else { return };
        self.epoch += 1;
        let mine: Vec<u32> = (0..self.vcpus.len())
            .filter(|&v| self.vcpus[v].dom == dom)
            .map(|v| self.key(v))
            .collect();
        for p in 0..self.pcpus.len() {
            if !f.cpus.contains(PcpuId(p as u32)) {
                continue;
            }
            self.stats.flushes += 1;
            // (All: a full flush of every guest ASID on the pCPU.)
            self.pcpus[p]
                .tlb
                .flush_scope(f.scope, &|v| mine.contains(&v));
        }
        if f.scope == FlushScope::AllReloadRoots {
            for v in self.vcpus.iter_mut().filter(|v| v.dom == dom) {
                // The flush IPI forces out the vCPUs on the named pCPUs; the
                // others run on (with the old root) until their next exit.
                match v.pcpu {
                    Some(p) if !f.cpus.contains(PcpuId(p as u32)) => v.stale_root = true,
                    _ => {
                        v.need_root = true;
                        v.stale_root = false;
                    }
                }
            }
        }
    }

    fn expect_done(&mut self, dom: usize, reply: MmuReply, what: &str) -> Res<()> {
        match reply {
            MmuReply::Done { flush } => {
                self.flush(dom, flush);
                Ok(())
            }
            other => {
                self.flush(dom, other.flush());
                Err(self.fail(what, None, String::from("Done"), format!("{other:?}")))
            }
        }
    }

    pub(super) fn take_root(&mut self, v: usize, reply: MmuReply, what: &str) -> Res<()> {
        let dom = self.vcpus[v].dom;
        match reply {
            MmuReply::LoadShadowRoot { vcpu, root, flush } if vcpu == self.vcpus[v].id => {
                self.flush(dom, flush);
                self.vcpus[v].root = Some(root.0);
                self.vcpus[v].need_root = false;
                self.vcpus[v].stale_root = false;
                self.epoch += 1;
                Ok(())
            }
            MmuReply::Done { flush } if what == "WriteCr3" => {
                self.flush(dom, flush);
                Ok(())
            }
            other => {
                self.flush(dom, other.flush());
                Err(self.fail(
                    what,
                    None,
                    format!("LoadShadowRoot for vCPU {}", self.vcpus[v].id.0),
                    format!("{other:?}"),
                ))
            }
        }
    }

    // ---- control operations ------------------------------------------------

    /// The handshake.
    pub fn hello(&mut self, version: u32) -> Res<MmuReply> {
        self.begin(format!("Hello {{ version: {version} }}"));
        let r = self.call(&MmuRequest::Hello { version })?;
        self.check()?;
        Ok(r)
    }

    /// Creates a domain with guest RAM regions `(gfn, pages)`, backed by
    /// fresh zeroed host frames; returns its index.
    pub fn create_domain(&mut self, regions: &[(u64, u64)]) -> Res<usize> {
        let id = DomainId(self.doms.len() as u32 + 1);
        self.begin(format!("CreateDomain {} {regions:x?}", id.0));
        let mut map = MemoryMap::new();
        let mut regs = Vec::new();
        for &(gfn, pages) in regions {
            if self.next_mfn + pages > self.end_mfn {
                return Err(self.fail(
                    "guest RAM",
                    None,
                    format!("{pages} more frames"),
                    format!("{} left", self.end_mfn - self.next_mfn),
                ));
            }
            for f in self.next_mfn..self.next_mfn + pages {
                self.ram.zero(f);
            }
            regs.push((gfn, self.next_mfn, pages));
            let _ = map.push(MemRegion {
                gfn: Gfn(gfn),
                mfn: abi::Mfn(self.next_mfn),
                pages,
            });
            self.next_mfn += pages;
        }
        let first = regs.first().map_or(0, |r| r.0);
        self.doms.push(Dom {
            id,
            regions: regs,
            hist: History::default(),
            dirty_on: false,
            dirty_pending: BTreeSet::new(),
            dirty_digest: Vec::new(),
            dirty_by: BTreeMap::new(),
            started: false,
            next_gfn: first,
            alive: true,
        });
        let d = self.doms.len() - 1;
        let r = self.call(&MmuRequest::CreateDomain {
            domain: id,
            memory: map,
        })?;
        self.expect_done(d, r, "CreateDomain")?;
        self.check()?;
        Ok(d)
    }

    /// Destroys domain `d` (its vCPUs must be descheduled).
    pub fn destroy_domain(&mut self, d: usize) -> Res<()> {
        self.begin(format!("DestroyDomain {}", self.doms[d].id.0));
        let r = self.call(&MmuRequest::DestroyDomain {
            domain: self.doms[d].id,
        })?;
        self.expect_done(d, r, "DestroyDomain")?;
        self.doms[d].alive = false;
        for v in 0..self.vcpus.len() {
            if self.vcpus[v].dom == d {
                if let Some(p) = self.vcpus[v].pcpu.take() {
                    self.pcpus[p].vcpu = None;
                }
                self.vcpus[v].root = None;
            }
        }
        self.check()
    }

    /// Creates a vCPU in domain `d` with paging mode `ctrl` (sent when it is
    /// first scheduled); returns its index.
    pub fn create_vcpu(&mut self, d: usize, ctrl: Ctrl) -> Res<usize> {
        // The smallest id no live vCPU has: ids (and so ASIDs, the TLB
        // model's tags) of destroyed domains are reused, so a server that
        // does not flush on destroy is caught.
        let id = VcpuId(
            (1..)
                .find(|&i| {
                    !self
                        .vcpus
                        .iter()
                        .any(|vc| vc.id.0 == i && self.doms[vc.dom].alive)
                })
                .unwrap_or(u32::MAX),
        );
        self.begin(format!(
            "CreateVcpu {} in domain {}",
            id.0, self.doms[d].id.0
        ));
        let r = self.call(&MmuRequest::CreateVcpu {
            domain: self.doms[d].id,
            vcpu: id,
        })?;
        self.expect_done(d, r, "CreateVcpu")?;
        self.vcpus.push(Vcpu {
            id,
            dom: d,
            cr3: 0,
            ctrl,
            pcpu: None,
            root: None,
            need_root: true,
            stale_root: false,
            mode_sent: false,
            flush_seq: self.doms[d].hist.now(),
            invl: BTreeMap::new(),
        });
        let v = self.vcpus.len() - 1;
        self.check()?;
        Ok(v)
    }

    fn mode_bits(ctrl: Ctrl) -> PagingMode {
        let mut m = 0;
        if ctrl.wp {
            m |= PagingMode::WP;
        }
        if ctrl.nxe {
            m |= PagingMode::NXE;
        }
        if !ctrl.paging {
            m |= PagingMode::OFF;
        }
        if ctrl.mmio {
            m |= PagingMode::MMIO;
        }
        PagingMode(m)
    }

    /// vCPU `v` leaves the guest (an intercept): a root voided while it
    /// ran is dropped now and fetched again before it re-enters.
    pub(super) fn exit(&mut self, v: usize) {
        if self.vcpus[v].stale_root {
            self.vcpus[v].stale_root = false;
            self.vcpus[v].need_root = true;
        }
    }

    pub(super) fn pcpu_of(&self, v: usize) -> Res<usize> {
        self.vcpus[v].pcpu.ok_or_else(|| {
            self.fail(
                "scenario",
                None,
                format!("vCPU {} scheduled", self.vcpus[v].id.0),
                String::from("not running"),
            )
        })
    }

    /// Runs vCPU `v` on pCPU `p` (descheduling whatever ran there).
    pub fn schedule(&mut self, v: usize, p: usize) -> Res<()> {
        if let Some(old) = self.pcpus[p].vcpu {
            if old != v {
                self.deschedule(old)?;
            }
        }
        if let Some(q) = self.vcpus[v].pcpu {
            if q != p {
                self.deschedule(v)?;
            }
        }
        self.begin(format!("VcpuScheduled {} on pCPU {p}", self.vcpus[v].id.0));
        self.doms[self.vcpus[v].dom].started = true;
        let r = self.call(&MmuRequest::VcpuScheduled {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
        })?;
        self.vcpus[v].pcpu = Some(p);
        self.pcpus[p].vcpu = Some(v);
        self.take_root(v, r, "VcpuScheduled")?;
        self.check()?;
        if !self.vcpus[v].mode_sent {
            self.vcpus[v].mode_sent = true;
            let ctrl = self.vcpus[v].ctrl;
            // The server's mode until told: 0 (long mode, no bit set).
            self.vcpus[v].ctrl = Ctrl {
                wp: false,
                nxe: false,
                paging: true,
                mmio: false,
            };
            self.set_mode(v, ctrl)?;
        }
        Ok(())
    }

    /// Takes vCPU `v` off its pCPU.
    pub fn deschedule(&mut self, v: usize) -> Res<()> {
        let p = self.pcpu_of(v)?;
        self.begin(format!(
            "VcpuDescheduled {} from pCPU {p}",
            self.vcpus[v].id.0
        ));
        let r = self.call(&MmuRequest::VcpuDescheduled {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
        })?;
        self.vcpus[v].pcpu = None;
        self.pcpus[p].vcpu = None;
        self.epoch += 1;
        let d = self.vcpus[v].dom;
        self.expect_done(d, r, "VcpuDescheduled")?;
        self.check()
    }

    /// The guest changes CR0.WP / EFER.NXE (a full TLB flush for it).
    pub fn set_mode(&mut self, v: usize, ctrl: Ctrl) -> Res<()> {
        let p = self.pcpu_of(v)?;
        self.begin(format!("SetPagingMode {} {ctrl:?}", self.vcpus[v].id.0));
        self.exit(v);
        let r = self.call(&MmuRequest::SetPagingMode {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
            mode: Self::mode_bits(ctrl),
        })?;
        let d = self.vcpus[v].dom;
        let switched = self.vcpus[v].ctrl.paging != ctrl.paging;
        self.stats.paging_switches += u64::from(switched);
        self.vcpus[v].ctrl = ctrl;
        self.new_window(v);
        match r {
            MmuReply::LoadShadowRoot { .. } => self.take_root(v, r, "SetPagingMode")?,
            // Paging switched on or off: the abi demands the new root.
            r if switched => self.take_root(v, r, "SetPagingMode (paging on/off)")?,
            r => self.expect_done(d, r, "SetPagingMode")?,
        }
        self.check()
    }

    /// The guest writes CR3 (a full flush of its non-global translations).
    pub fn write_cr3(&mut self, v: usize, cr3: u64) -> Res<()> {
        let p = self.pcpu_of(v)?;
        self.begin(format!("WriteCr3 {} <- {cr3:#x}", self.vcpus[v].id.0));
        self.exit(v);
        let r = self.call(&MmuRequest::WriteCr3 {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
            cr3: GuestCr3(cr3),
        })?;
        self.vcpus[v].cr3 = cr3;
        self.new_window(v);
        self.take_root(v, r, "WriteCr3")?;
        self.check()
    }

    /// vCPU `v` flushed all its translations (CR3 write, mode change): only
    /// translations of the guest's state from now on may be used, and the
    /// oracle's verdicts on its translations so far are void (the tables or
    /// the mode they were judged under may be gone even if no guest write
    /// happened since).
    fn new_window(&mut self, v: usize) {
        let d = self.vcpus[v].dom;
        self.vcpus[v].flush_seq = self.doms[d].hist.now();
        self.vcpus[v].invl.clear();
        self.cache.retain(|k, _| k.0 != v);
        self.epoch += 1;
    }

    /// The guest executes INVLPG `gva`.
    pub fn invlpg(&mut self, v: usize, gva: u64) -> Res<()> {
        let p = self.pcpu_of(v)?;
        self.begin(format!("Invlpg {} {gva:#x}", self.vcpus[v].id.0));
        self.exit(v);
        let r = self.call(&MmuRequest::Invlpg {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
            gva: Gva(gva),
        })?;
        let d = self.vcpus[v].dom;
        let now = self.doms[d].hist.now();
        self.vcpus[v].invl.insert(gva & !0xfff, now);
        self.epoch += 1;
        match r {
            MmuReply::LoadShadowRoot { .. } => self.take_root(v, r, "Invlpg")?,
            r => self.expect_done(d, r, "Invlpg")?,
        }
        self.check()
    }

    /// Turns dirty logging on for domain `d`.
    pub fn enable_dirty(&mut self, d: usize) -> Res<()> {
        self.begin(format!("EnableDirtyLog {}", self.doms[d].id.0));
        let r = self.call(&MmuRequest::EnableDirtyLog {
            domain: self.doms[d].id,
        })?;
        self.expect_done(d, r, "EnableDirtyLog")?;
        self.doms[d].dirty_on = true;
        self.doms[d].dirty_pending.clear();
        self.doms[d].dirty_digest = self.digests(d);
        self.doms[d].dirty_by.clear();
        self.check()
    }

    /// Turns dirty logging off for domain `d`.
    pub fn disable_dirty(&mut self, d: usize) -> Res<()> {
        self.begin(format!("DisableDirtyLog {}", self.doms[d].id.0));
        let r = self.call(&MmuRequest::DisableDirtyLog {
            domain: self.doms[d].id,
        })?;
        self.expect_done(d, r, "DisableDirtyLog")?;
        self.doms[d].dirty_on = false;
        self.doms[d].dirty_pending.clear();
        self.doms[d].dirty_digest.clear();
        self.doms[d].dirty_by.clear();
        self.check()
    }

    /// Gets and clears domain `d`'s whole dirty log (chunk by chunk) and
    /// checks it exactly: every guest frame whose bytes changed since the
    /// previous harvest (or EnableDirtyLog) must be in it, and every frame
    /// the guest wrote; frames reported that did not change are counted in
    /// [`Stats::dirty_extra`](super::Stats::dirty_extra) and listed in
    /// [`Machine::last_harvest`].
    pub fn get_dirty(&mut self, d: usize) -> Res<BTreeSet<u64>> {
        let mut set = BTreeSet::new();
        let mut start = self.doms[d].regions.first().map_or(0, |r| r.0);
        for _ in 0..1 << 16 {
            self.begin(format!(
                "GetAndClearDirty {} from gfn {start:#x}",
                self.doms[d].id.0
            ));
            let r = self.call(&MmuRequest::GetAndClearDirty {
                domain: self.doms[d].id,
                start: Gfn(start),
            })?;
            match r {
                MmuReply::DirtyBitmap { chunk, flush } => {
                    self.flush(d, flush);
                    set.extend(chunk.dirty().map(|g| g.0));
                    self.check()?;
                    match chunk.next {
                        Some(n) if n.0 > start => start = n.0,
                        Some(n) => {
                            return Err(self.fail(
                                "dirty chunks advance",
                                None,
                                format!("next > {start:#x}"),
                                format!("next = {:#x}", n.0),
                            ))
                        }
                        None => break,
                    }
                }
                other => {
                    self.flush(d, other.flush());
                    return Err(self.fail(
                        "GetAndClearDirty",
                        None,
                        String::from("DirtyBitmap"),
                        format!("{other:?}"),
                    ));
                }
            }
        }
        self.check_harvest(d, &set)?;
        let missing: Vec<u64> = self.doms[d]
            .dirty_pending
            .iter()
            .copied()
            .filter(|g| !set.contains(g))
            .collect();
        if !missing.is_empty() {
            let why = self.why_missing(d, &missing);
            return Err(self.fail(
                "dirty log holds every page written while logging",
                None,
                format!("gfns {:x?} marked", self.doms[d].dirty_pending),
                format!("gfns {missing:x?} missing from {set:x?}{why}"),
            ));
        }
        self.doms[d].dirty_pending.clear();
        Ok(set)
    }

    /// Zaps every shadow of domain `d`.
    pub fn zap_all(&mut self, d: usize) -> Res<()> {
        self.begin(format!("ZapAll {}", self.doms[d].id.0));
        let r = self.call(&MmuRequest::ZapAll {
            domain: self.doms[d].id,
        })?;
        self.expect_done(d, r, "ZapAll")?;
        self.check()
    }
}
