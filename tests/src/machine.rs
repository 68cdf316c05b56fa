//! The simulated machine: plays the kernel and the hardware around one MMU
//! server, speaking to it only in encoded messages, and judges it with the
//! oracle after every step.
//!
//! Hardware model: a guest access on a pCPU first consults that pCPU's TLB
//! model (entries tagged with the vCPU, as with one ASID per vCPU); on a miss
//! it walks the shadow tables from the root the server handed out, setting
//! shadow A/D bits as the MMU does, and caches the result. A fault goes to
//! the server as `PageFault`; its reply is carried out (flush, resume, inject,
//! emulate the write). Flushes happen only when an obligation says so, or
//! for the faulting address when a fault is taken on a TLB entry.
//!
//! Oracle (checked after every step, see [`Machine::check`]):
//! - every translation a running vCPU could use, through its pCPU's TLB or
//!   through the shadow tables under its root, is one the guest's own tables
//!   allow now or allowed at some moment since that vCPU last flushed that
//!   address (a real TLB may still hold it); rights never wider; the frame is
//!   the one the memory map gives;
//! - an injected #PF is one the guest tables give, with the exact error code;
//! - the server wrote guest memory only to set A/D bits on the path of the
//!   access being served (D only on its leaf, only for a write), or to carry
//!   out an emulated write exactly;
//! - after an access through a translation whose guest entries did not change
//!   since the vCPU's last flush, the guest's A bits are set on every level
//!   and D on the leaf for a write;
//! - dirty logging is exact: every guest frame whose bytes changed since the
//!   previous harvest (by anyone: guest stores, the server's A/D updates in
//!   guest page tables, emulated writes) is in the next bitmap, compared by
//!   a digest of each frame's contents taken at every harvest; frames in
//!   the bitmap that did not change are allowed, counted ([`Stats`]) and
//!   listed ([`Machine::last_harvest`]); every frame the guest wrote (even
//!   with the value it held) is in it too;
//! - shadow tables live only in pool frames the server holds.

use crate::arch::{self, fault_code, walk, Access, Ctrl, Rights, Size, Walk, PF_P};
use crate::history::History;
use crate::ram::{Ram, SuitePhys};
use crate::tlb::{Entry, Tlb};
use abi::{
    CpuSet, DomainId, FlushObligation, FlushScope, Gfn, Gpa, GuestCr3, Gva, MemRegion, MemoryMap,
    MmuError, MmuReply, MmuRequest, MmuServer, PagingMode, PcpuId, PfErrorCode, VcpuId,
    MAX_MESSAGE,
};
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::Ordering;

/// How many times one access is retried after `Resume` before the server is
/// judged to make no progress.
pub const MAX_RETRY: usize = 8;

/// Guest-virtual base of the guest's direct map of its own memory (the guest
/// edits its page tables through it, as a real kernel does).
pub const DIRECT: u64 = 0xffff_8800_0000_0000;

/// What the suite found wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The scenario (or random seed) it happened in.
    pub scenario: String,
    /// The step number within the run.
    pub step: u64,
    /// The operation of that step.
    pub op: String,
    /// What was checked.
    pub what: String,
    /// The guest-virtual address concerned, if any.
    pub gva: Option<u64>,
    /// What the architecture allows.
    pub expected: String,
    /// What the server did.
    pub observed: String,
    /// The steps before it, oldest first (up to [`RECENT`]).
    pub recent: Vec<String>,
}

/// How many earlier steps a failure report lists.
pub const RECENT: usize = 16;

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} step {} ({}): {}",
            self.scenario, self.step, self.op, self.what
        )?;
        if let Some(g) = self.gva {
            write!(f, " at gva {g:#x}")?;
        }
        write!(
            f,
            "\n    expected: {}\n    observed: {}",
            self.expected, self.observed
        )?;
        if !self.recent.is_empty() {
            write!(f, "\n    steps before it:")?;
            for (i, r) in self.recent.iter().enumerate() {
                let n = self.step as usize + i - self.recent.len();
                write!(f, "\n      {n}: {r}")?;
            }
        }
        Ok(())
    }
}

/// What every suite operation returns: a value, or the failure found.
pub type Res<T> = Result<T, Box<Failure>>;

/// The result of one guest access.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The access completed; for a read, the value read.
    Ok(u64),
    /// The server injected #PF with this error code.
    Fault(u64),
    /// The server answered the fault with an error.
    Refused(MmuError),
}

/// Counters of one run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Steps run.
    pub steps: u64,
    /// Guest accesses.
    pub accesses: u64,
    /// Page faults sent to the server.
    pub faults: u64,
    /// Faults injected into the guest.
    pub injected: u64,
    /// Emulated writes.
    pub emulated: u64,
    /// Flush obligations carried out (per pCPU).
    pub flushes: u64,
    /// The most shadow-pool frames the server held at once.
    pub peak_pool: u64,
    /// Dirty-log harvests checked (whole get-and-clear rounds).
    pub harvests: u64,
    /// Guest frames whose bytes changed between two harvests (each one had
    /// to be, and was, in the bitmap).
    pub dirty_changed: u64,
    /// Guest frames a bitmap reported whose bytes had not changed since the
    /// previous harvest (allowed: a write of the same value, or a server
    /// that logs conservatively).
    pub dirty_extra: u64,
}

/// What the exact dirty-log check found at one harvest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Harvest {
    /// Guest frames whose bytes changed since the previous harvest.
    pub changed: BTreeSet<u64>,
    /// Frames the bitmap reported that did not change.
    pub extra: BTreeSet<u64>,
}

/// Who changed a guest frame while dirty logging was on (for reports).
const BY_GUEST: u8 = 1;
const BY_EMULATION: u8 = 2;
const BY_SERVER_AD: u8 = 4;

/// A 64-bit digest of the 4 KiB frame `mfn` (0 if unreadable): the exact
/// dirty-log check compares frames by it, so it keeps 8 bytes per frame
/// (the image runs the same check over real frames, with a small heap).
fn frame_digest(ram: Ram<'_>, mfn: u64) -> u64 {
    let mut h = 0x243f_6a88_85a3_08d3u64;
    for i in 0..512u64 {
        let w = ram.read((mfn << 12) + 8 * i).unwrap_or(0);
        h = (h.rotate_left(29) ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    // SplitMix64's finaliser: every input bit reaches every output bit.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

struct Dom {
    id: DomainId,
    /// (gfn, mfn, pages).
    regions: Vec<(u64, u64, u64)>,
    hist: History,
    dirty_on: bool,
    dirty_pending: BTreeSet<u64>,
    /// While logging: the digest of every guest frame (in region order) at
    /// the previous harvest (or at EnableDirtyLog).
    dirty_digest: Vec<u64>,
    /// While logging: who changed which frame since the previous harvest
    /// (`BY_*` bits; for failure reports only, the check is by digest).
    dirty_by: BTreeMap<u64, u8>,
    started: bool,
    next_gfn: u64,
    alive: bool,
}

impl Dom {
    fn mfn(&self, gfn: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| gfn >= r.0 && gfn - r.0 < r.2)
            .map(|r| r.1 + (gfn - r.0))
    }
    /// The position of guest frame `gfn` in region order.
    fn index(&self, gfn: u64) -> Option<usize> {
        let mut base = 0;
        for r in &self.regions {
            if gfn >= r.0 && gfn - r.0 < r.2 {
                return Some((base + gfn - r.0) as usize);
            }
            base += r.2;
        }
        None
    }
    fn gfn_of(&self, mfn: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| mfn >= r.1 && mfn - r.1 < r.2)
            .map(|r| r.0 + (mfn - r.1))
    }
    /// Guest frames mapped contiguously from `gfn` on, up to `pages`.
    fn contiguous(&self, gfn: u64, pages: u64) -> Option<(u64, u64)> {
        let r = self
            .regions
            .iter()
            .find(|r| gfn >= r.0 && gfn - r.0 < r.2)?;
        Some((r.1 + (gfn - r.0), (r.0 + r.2 - gfn).min(pages)))
    }
}

struct Vcpu {
    id: VcpuId,
    dom: usize,
    cr3: u64,
    ctrl: Ctrl,
    pcpu: Option<usize>,
    root: Option<u64>,
    need_root: bool,
    /// Its root was voided (`AllReloadRoots`) while it ran on a pCPU the
    /// obligation did not name: it runs on the old root until its next exit.
    stale_root: bool,
    /// SetPagingMode was sent (after the first VcpuScheduled).
    mode_sent: bool,
    /// History state at the vCPU's last full flush (CR3 write, mode change).
    flush_seq: usize,
    /// History state at the last INVLPG per 4 KiB page.
    invl: BTreeMap<u64, usize>,
}

#[derive(Default)]
struct Pcpu {
    tlb: Tlb,
    vcpu: Option<usize>,
    checked: Option<(u64, u64)>,
}

/// The simulated machine around one server.
pub struct Machine<'m> {
    server: &'m dyn MmuServer,
    phys: &'m SuitePhys<'m>,
    ram: Ram<'m>,
    name: String,
    step: u64,
    op: String,
    doms: Vec<Dom>,
    vcpus: Vec<Vcpu>,
    pcpus: Vec<Pcpu>,
    next_mfn: u64,
    end_mfn: u64,
    cache: BTreeMap<(usize, u64, u64, u8), (usize, Size)>,
    epoch: u64,
    /// The access being served this step (for judging guest A/D writes).
    cur_access: Option<(usize, u64, Access)>,
    /// The guest walk's path for it when it began, and whether it ended in
    /// a leaf (the last entry).
    cur_path: (Vec<u64>, bool),
    /// Emulated writes of this step: (dom, gpa, value).
    cur_emulated: Vec<(usize, u64, u64)>,
    recent: VecDeque<String>,
    last_harvest: Option<Harvest>,
    /// Counters.
    pub stats: Stats,
}

fn rights_key(r: Rights) -> u8 {
    r.write as u8 | (r.user as u8) << 1 | (r.nx as u8) << 2
}

impl<'m> Machine<'m> {
    /// A machine with `pcpus` pCPUs around `server`, which must run on
    /// `phys`; guest RAM is handed out from frames below the pool.
    pub fn new(
        name: &str,
        server: &'m dyn MmuServer,
        phys: &'m SuitePhys<'m>,
        guest_frames: u64,
        pcpus: usize,
    ) -> Machine<'m> {
        let ram = phys.ram();
        Machine {
            server,
            phys,
            ram,
            name: String::from(name),
            step: 0,
            op: String::from("start"),
            doms: Vec::new(),
            vcpus: Vec::new(),
            pcpus: (0..pcpus).map(|_| Pcpu::default()).collect(),
            next_mfn: ram.first_mfn(),
            end_mfn: ram.first_mfn() + guest_frames,
            cache: BTreeMap::new(),
            epoch: 0,
            cur_access: None,
            cur_path: (Vec::new(), false),
            cur_emulated: Vec::new(),
            last_harvest: None,
            stats: Stats::default(),
            recent: VecDeque::new(),
        }
    }

    /// The memory the server runs on.
    pub fn phys(&self) -> &'m SuitePhys<'m> {
        self.phys
    }

    /// A failure at the current step.
    pub fn fail(
        &self,
        what: &str,
        gva: Option<u64>,
        expected: String,
        observed: String,
    ) -> Box<Failure> {
        Box::new(Failure {
            scenario: self.name.clone(),
            step: self.step,
            op: self.op.clone(),
            what: String::from(what),
            gva,
            expected,
            observed,
            recent: self.recent.iter().cloned().collect(),
        })
    }

    fn begin(&mut self, op: String) {
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        let last = core::mem::take(&mut self.op);
        if self.step > 0 {
            self.recent.push_back(last);
        }
        self.step += 1;
        self.stats.steps += 1;
        self.op = op;
        self.cur_access = None;
        self.cur_emulated.clear();
    }

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

    fn flush(&mut self, dom: usize, f: Option<FlushObligation>) {
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

    fn take_root(&mut self, v: usize, reply: MmuReply, what: &str) -> Res<()> {
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
        PagingMode(m)
    }

    /// vCPU `v` leaves the guest (an intercept): a root voided while it
    /// ran is dropped now and fetched again before it re-enters.
    fn exit(&mut self, v: usize) {
        if self.vcpus[v].stale_root {
            self.vcpus[v].stale_root = false;
            self.vcpus[v].need_root = true;
        }
    }

    fn pcpu_of(&self, v: usize) -> Res<usize> {
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
        self.vcpus[v].ctrl = ctrl;
        self.vcpus[v].flush_seq = self.doms[d].hist.now();
        self.vcpus[v].invl.clear();
        self.epoch += 1;
        match r {
            MmuReply::LoadShadowRoot { .. } => self.take_root(v, r, "SetPagingMode")?,
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
        let d = self.vcpus[v].dom;
        self.vcpus[v].cr3 = cr3;
        self.vcpus[v].flush_seq = self.doms[d].hist.now();
        self.vcpus[v].invl.clear();
        self.epoch += 1;
        self.take_root(v, r, "WriteCr3")?;
        self.check()
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
    /// [`Stats::dirty_extra`] and listed in [`Machine::last_harvest`].
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

    /// What the exact dirty-log check found at the last harvest.
    pub fn last_harvest(&self) -> Option<&Harvest> {
        self.last_harvest.as_ref()
    }

    /// The digest of every guest frame of domain `d`, in region order.
    fn digests(&self, d: usize) -> Vec<u64> {
        let ram = self.ram;
        self.doms[d]
            .regions
            .iter()
            .flat_map(|&(_, mfn, pages)| (mfn..mfn + pages).map(move |m| frame_digest(ram, m)))
            .collect()
    }

    /// The exact check of one harvest of domain `d` that reported `set`:
    /// compares every guest frame with its digest at the previous harvest.
    fn check_harvest(&mut self, d: usize, set: &BTreeSet<u64>) -> Res<()> {
        let now = self.digests(d);
        let dom = &self.doms[d];
        let gfns = dom
            .regions
            .iter()
            .flat_map(|&(gfn, _, pages)| gfn..gfn + pages);
        // A frame without a digest from before counts as changed.
        let changed: BTreeSet<u64> = gfns
            .zip(&now)
            .enumerate()
            .filter(|&(i, (_, now))| dom.dirty_digest.get(i) != Some(now))
            .map(|(_, (g, _))| g)
            .collect();
        let missing: Vec<u64> = changed.difference(set).copied().collect();
        let extra: BTreeSet<u64> = set.difference(&changed).copied().collect();
        self.stats.harvests += 1;
        self.stats.dirty_changed += changed.len() as u64;
        self.stats.dirty_extra += extra.len() as u64;
        if !missing.is_empty() {
            let mut who = String::new();
            for &g in &missing {
                let by = dom.dirty_by.get(&g).copied().unwrap_or(0);
                let names: Vec<&str> = [
                    (BY_GUEST, "guest stores"),
                    (BY_EMULATION, "emulated writes"),
                    (BY_SERVER_AD, "the server's A/D updates"),
                ]
                .iter()
                .filter(|(bit, _)| by & bit != 0)
                .map(|&(_, n)| n)
                .collect();
                who.push_str(&format!(
                    "; gfn {g:#x} changed by {}",
                    if names.is_empty() {
                        String::from("no recorded writer")
                    } else {
                        names.join(" and ")
                    }
                ));
            }
            let why = self.why_missing(d, &missing);
            return Err(self.fail(
                "dirty log holds every frame whose bytes changed since the previous harvest",
                None,
                format!(
                    "gfns {changed:x?} changed ({} reported unchanged)",
                    extra.len()
                ),
                format!("gfns {missing:x?} missing from {set:x?}{who}{why}"),
            ));
        }
        self.last_harvest = Some(Harvest { changed, extra });
        let dom = &mut self.doms[d];
        dom.dirty_digest = now;
        dom.dirty_by.clear();
        Ok(())
    }

    /// Where the frames `missing` from a bitmap of domain `d` are still
    /// writable without a fault (for failure reports).
    fn why_missing(&self, d: usize, missing: &[u64]) -> String {
        let mut why = String::new();
        for &g in missing {
            if let Some(mfn) = self.doms[d].mfn(g) {
                for w in self.writable_paths(mfn) {
                    why.push_str(&format!("; gfn {g:#x} writable via {w}"));
                }
            }
        }
        why
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

    // ---- guest memory --------------------------------------------------------

    /// A fresh zeroed guest frame of domain `d` (the guest's own allocator).
    pub fn alloc_gfn(&mut self, d: usize) -> u64 {
        let dom = &mut self.doms[d];
        let g = dom.next_gfn;
        let mut next = g + 1;
        if dom.mfn(next).is_none() {
            // Jump to the next region.
            next = dom
                .regions
                .iter()
                .map(|r| r.0)
                .filter(|&s| s > g)
                .min()
                .unwrap_or(next);
        }
        dom.next_gfn = next;
        g
    }

    /// The host frame behind guest frame `gfn` of domain `d`.
    pub fn mfn(&self, d: usize, gfn: u64) -> Option<u64> {
        self.doms[d].mfn(gfn)
    }

    /// Reads the guest word at `gpa` (no side effects).
    pub fn peek(&self, d: usize, gpa: u64) -> Option<u64> {
        let m = self.doms[d].mfn(gpa >> 12)?;
        self.ram.read((m << 12) | (gpa & 0xff8))
    }

    /// Writes the guest word at `gpa` before the domain ever ran (building
    /// its first tables); later writes must go through a vCPU.
    pub fn setup_write(&mut self, d: usize, gpa: u64, value: u64) -> Res<()> {
        if self.doms[d].started {
            return Err(self.fail(
                "scenario",
                None,
                String::from("setup writes only before the domain runs"),
                format!("setup write to {gpa:#x}"),
            ));
        }
        let Some(m) = self.doms[d].mfn(gpa >> 12) else {
            return Err(self.fail(
                "scenario",
                None,
                String::from("gpa in memory"),
                format!("{gpa:#x}"),
            ));
        };
        let hpa = (m << 12) | (gpa & 0xff8);
        let old = self.ram.read(hpa).unwrap_or(0);
        self.ram.write(hpa, value);
        self.doms[d].hist.record(gpa, old);
        // Not the guest's write: no harvest owes it.
        let idx = self.doms[d].index(gpa >> 12);
        if let Some(slot) = idx.and_then(|i| self.doms[d].dirty_digest.get_mut(i)) {
            *slot = frame_digest(self.ram, m);
        }
        Ok(())
    }

    // ---- guest accesses ------------------------------------------------------

    /// The TLB tag of vCPU `v` (its id: one ASID per vCPU id).
    fn key(&self, v: usize) -> u32 {
        self.vcpus[v].id.0
    }

    /// The paging controls the hardware walks the shadow tables with: the
    /// guest's EFER.NXE, and CR0.WP always set (as KVM does: a guest with
    /// WP=0 gets supervisor-writable, user-inaccessible shadow entries, so
    /// write protection of guest page tables also stops supervisor writes).
    pub fn hw_ctrl(&self, v: usize) -> Ctrl {
        Ctrl {
            wp: true,
            nxe: self.vcpus[v].ctrl.nxe,
        }
    }

    /// What the shadow hardware does for `acc` at `gva`: a host address, or
    /// the fault error code it raises.
    fn hw(&mut self, v: usize, p: usize, gva: u64, acc: Access) -> Res<Result<u64, u64>> {
        let ctrl = self.hw_ctrl(v);
        let key = self.key(v);
        if let Some(e) = self.pcpus[p].tlb.lookup(key, gva) {
            if e.rights.allows(acc, ctrl) {
                if !acc.write || e.dirty {
                    self.op.push_str(" [tlb]");
                    return Ok(Ok(e.hpa + (gva & (e.size.bytes() - 1))));
                }
            } else {
                self.pcpus[p].tlb.drop_va(key, gva);
                return Ok(Err(PF_P | arch::access_bits(acc, ctrl)));
            }
        }
        let Some(root) = self.vcpus[v].root else {
            return Err(self.fail(
                "vCPU has a shadow root",
                Some(gva),
                String::from("a root"),
                String::from("none"),
            ));
        };
        let ram = self.ram;
        let w = walk(&|a| ram.read(a), root, gva, ctrl);
        match w {
            Walk::Ok(leaf) if leaf.rights.allows(acc, ctrl) => {
                for i in 0..leaf.depth {
                    let a = leaf.path[i];
                    let mut val = ram.read(a).unwrap_or(0) | arch::A;
                    if i + 1 == leaf.depth && acc.write {
                        val |= arch::D;
                    }
                    ram.write(a, val);
                }
                let hpa = leaf.phys(gva);
                let e = Entry {
                    vcpu: key,
                    va: gva & !(leaf.size.bytes() - 1),
                    size: leaf.size,
                    hpa: leaf.base,
                    rights: leaf.rights,
                    dirty: acc.write || leaf.vals[leaf.depth - 1] & arch::D != 0,
                };
                self.check_translation(v, e.va, e.size, e.hpa, e.rights, "shadow walk")?;
                self.op.push_str(" [shadow]");
                self.pcpus[p].tlb.insert(e);
                Ok(Ok(hpa))
            }
            Walk::Outside { addr, .. } => Err(self.fail(
                "shadow tables stay in memory",
                Some(gva),
                String::from("shadow entries inside the host block"),
                format!("shadow walk from root {root:#x} reads {addr:#x}"),
            )),
            w => Ok(Err(fault_code(&w, acc, ctrl).unwrap_or(0))),
        }
    }

    /// A guest access of `acc` at `gva` on vCPU `v` (a write stores `value`).
    pub fn access(&mut self, v: usize, gva: u64, acc: Access, value: u64) -> Res<Outcome> {
        self.begin(format!(
            "{} {gva:#x}{} by vCPU {}",
            acc.name(),
            if acc.write {
                format!(" <- {value:#x}")
            } else {
                String::new()
            },
            self.vcpus[v].id.0
        ));
        self.stats.accesses += 1;
        let out = self.access_inner(v, gva, acc, value)?;
        self.check()?;
        Ok(out)
    }

    fn access_inner(&mut self, v: usize, gva: u64, acc: Access, value: u64) -> Res<Outcome> {
        let p = self.pcpu_of(v)?;
        let d = self.vcpus[v].dom;
        let gva = gva & !7;
        self.cur_access = Some((v, gva, acc));
        let w = self.guest_walk_now(v, gva);
        self.cur_path = (w.path().to_vec(), matches!(w, Walk::Ok(_)));
        for _ in 0..MAX_RETRY {
            if self.vcpus[v].need_root {
                let r = self.call(&MmuRequest::VcpuScheduled {
                    vcpu: self.vcpus[v].id,
                    pcpu: PcpuId(p as u32),
                })?;
                if let MmuReply::Error { reason, flush } = r {
                    // E.g. no pool frame for the new root: the vCPU cannot
                    // run now (the kernel would retry later).
                    self.flush(d, flush);
                    return Ok(Outcome::Refused(reason));
                }
                self.take_root(v, r, "VcpuScheduled (reload)")?;
            }
            let ec = match self.hw(v, p, gva, acc)? {
                Ok(hpa) => return self.complete(v, d, gva, acc, value, hpa),
                Err(ec) => ec,
            };
            if self.vcpus[v].stale_root {
                // The exit for this fault is where the kernel notices the
                // void root: reload it and retry before bothering the server.
                self.exit(v);
                continue;
            }
            self.stats.faults += 1;
            self.op.push_str(&format!(" [#PF {ec:#x}]"));
            let r = self.call(&MmuRequest::PageFault {
                vcpu: self.vcpus[v].id,
                pcpu: PcpuId(p as u32),
                gva: Gva(gva),
                error_code: PfErrorCode(ec as u32),
            })?;
            match r {
                MmuReply::Resume { flush } => self.flush(d, flush),
                MmuReply::LoadShadowRoot { .. } => self.take_root(v, r, "PageFault")?,
                MmuReply::InjectPageFault {
                    error_code,
                    address,
                    flush,
                } => {
                    self.flush(d, flush);
                    self.stats.injected += 1;
                    self.judge_injection(v, gva, acc, u64::from(error_code.0), address.0)?;
                    return Ok(Outcome::Fault(u64::from(error_code.0)));
                }
                MmuReply::EmulateWrite { gpa, flush } => {
                    self.flush(d, flush);
                    return self.emulate(v, d, p, gva, acc, value, gpa.0);
                }
                MmuReply::Error { reason, flush } => {
                    self.flush(d, flush);
                    return Ok(Outcome::Refused(reason));
                }
                other => {
                    self.flush(d, other.flush());
                    return Err(self.fail(
                        "PageFault reply",
                        Some(gva),
                        String::from(
                            "Resume, InjectPageFault, EmulateWrite, LoadShadowRoot or Error",
                        ),
                        format!("{other:?}"),
                    ));
                }
            }
        }
        let w = self.guest_walk_now(v, gva);
        Err(self.fail(
            "progress",
            Some(gva),
            format!("the access completes or faults within {MAX_RETRY} tries (guest walk: {w:?})"),
            format!(
                "still faulting on the shadow tables ({} access)",
                acc.name()
            ),
        ))
    }

    fn complete(
        &mut self,
        v: usize,
        d: usize,
        gva: u64,
        acc: Access,
        value: u64,
        hpa: u64,
    ) -> Res<Outcome> {
        self.check_guest_ad(v, gva, acc)?;
        if !acc.write {
            return Ok(Outcome::Ok(self.ram.read(hpa).unwrap_or(0)));
        }
        let gfn = self.doms[d].gfn_of(hpa >> 12).ok_or_else(|| {
            self.fail(
                "write lands in guest memory",
                Some(gva),
                String::from("a guest frame"),
                format!("hpa {hpa:#x}"),
            )
        })?;
        let gpa = (gfn << 12) | (hpa & 0xfff);
        let old = self.ram.read(hpa).unwrap_or(0);
        self.ram.write(hpa, value);
        self.doms[d].hist.record(gpa, old);
        self.epoch += 1;
        if self.doms[d].dirty_on {
            self.doms[d].dirty_pending.insert(gfn);
            *self.doms[d].dirty_by.entry(gfn).or_default() |= BY_GUEST;
        }
        Ok(Outcome::Ok(value))
    }

    #[allow(clippy::too_many_arguments)]
    fn emulate(
        &mut self,
        v: usize,
        d: usize,
        p: usize,
        gva: u64,
        acc: Access,
        value: u64,
        gpa: u64,
    ) -> Res<Outcome> {
        if !acc.write {
            return Err(self.fail(
                "EmulateWrite only for writes",
                Some(gva),
                String::from("no EmulateWrite for a read"),
                format!("EmulateWrite at gpa {gpa:#x}"),
            ));
        }
        // The guest's own tables must allow the write and name this gpa.
        let ctrl = self.vcpus[v].ctrl;
        let want = gpa & !7;
        let dd = &self.doms[d];
        let ok = self.search(v, gva, &mut |w| match w {
            Walk::Ok(l) => {
                l.rights.allows(acc, ctrl) && l.phys(gva) == want && dd.mfn(want >> 12).is_some()
            }
            _ => false,
        });
        if !ok {
            let w = self.guest_walk_now(v, gva);
            return Err(self.fail(
                "EmulateWrite names the gpa the guest tables give, for an allowed write",
                Some(gva),
                format!("guest walk {w:?}"),
                format!("EmulateWrite at gpa {gpa:#x}"),
            ));
        }
        let old = self.peek(d, want).unwrap_or(0);
        self.stats.emulated += 1;
        let r = self.call(&MmuRequest::EmulatedWrite {
            vcpu: self.vcpus[v].id,
            pcpu: PcpuId(p as u32),
            gpa: Gpa(want),
            value,
            size: 8,
        })?;
        match r {
            MmuReply::WriteDone { flush } => self.flush(d, flush),
            other => {
                self.flush(d, other.flush());
                return Err(self.fail(
                    "EmulatedWrite",
                    Some(gva),
                    String::from("WriteDone"),
                    format!("{other:?}"),
                ));
            }
        }
        self.cur_emulated.push((d, want, value));
        self.op.push_str(" [emulated]");
        let now = self.peek(d, want).unwrap_or(0);
        if now != value {
            return Err(self.fail(
                "emulated write lands",
                Some(gva),
                format!("{value:#x} at gpa {want:#x}"),
                format!("{now:#x}"),
            ));
        }
        self.doms[d].hist.record(want, old);
        self.epoch += 1;
        if self.doms[d].dirty_on {
            self.doms[d].dirty_pending.insert(want >> 12);
            *self.doms[d].dirty_by.entry(want >> 12).or_default() |= BY_EMULATION;
        }
        Ok(Outcome::Ok(value))
    }

    // ---- the oracle ----------------------------------------------------------

    fn guest_read(&self, d: usize, k: Option<usize>) -> impl Fn(u64) -> Option<u64> + '_ {
        let dom = &self.doms[d];
        let ram = self.ram;
        move |gpa: u64| {
            let m = dom.mfn(gpa >> 12)?;
            let cur = ram.read((m << 12) | (gpa & 0xff8))?;
            Some(match k {
                Some(k) => dom.hist.value_at(gpa, k, cur),
                None => cur,
            })
        }
    }

    fn guest_walk_at(&self, v: usize, gva: u64, k: Option<usize>) -> Walk {
        let vc = &self.vcpus[v];
        walk(&self.guest_read(vc.dom, k), vc.cr3, gva, vc.ctrl)
    }

    /// The guest walk for `gva` on vCPU `v` now.
    pub fn guest_walk_now(&self, v: usize, gva: u64) -> Walk {
        self.guest_walk_at(v, gva, None)
    }

    fn window_start(&self, v: usize, gva: u64) -> usize {
        self.window_start_sized(v, gva, Size::K4)
    }

    /// The history state from which a translation of `gva` through a guest
    /// leaf of `size` may still be cached by vCPU `v`: its last full flush,
    /// or an INVLPG of any address inside that leaf's page (INVLPG drops the
    /// entries of every page size that contain its operand).
    fn window_start_sized(&self, v: usize, gva: u64, size: Size) -> usize {
        let vc = &self.vcpus[v];
        let base = gva & !(size.bytes() - 1);
        vc.invl
            .range(base..base + size.bytes())
            .map(|(_, &s)| s)
            .max()
            .unwrap_or(0)
            .max(vc.flush_seq)
    }

    /// Whether `pred` holds for the guest walk of `gva` in some state a TLB
    /// of vCPU `v` may still hold a translation from: the current one, or one
    /// that lasted until after the vCPU last flushed that address (for the
    /// page size the walk ends in). Returns the last state the walk it held
    /// for lasted to.
    fn search_state(
        &self,
        v: usize,
        gva: u64,
        pred: &mut dyn FnMut(&Walk) -> bool,
    ) -> Option<usize> {
        let d = self.vcpus[v].dom;
        let hist = &self.doms[d].hist;
        let now = hist.now();
        if pred(&self.guest_walk_at(v, gva, None)) {
            return Some(now);
        }
        let start = self.window_start(v, gva);
        let lasted = |w: &Walk, end: usize| match w {
            Walk::Ok(l) if l.size != Size::K4 => end >= self.window_start_sized(v, gva, l.size),
            _ => true,
        };
        let mut found = None;
        let mut w = self.guest_walk_at(v, gva, Some(start));
        for s in start..now {
            let a = hist.addr_of(s);
            if w.path().contains(&a) {
                // `w` held for states up to `s`.
                if lasted(&w, s) && pred(&w) {
                    found = Some(s);
                }
                w = self.guest_walk_at(v, gva, Some(s + 1));
            }
        }
        if lasted(&w, now) && pred(&w) {
            found = Some(now);
        }
        found
    }

    fn search(&self, v: usize, gva: u64, pred: &mut dyn FnMut(&Walk) -> bool) -> bool {
        self.search_state(v, gva, pred).is_some()
    }

    /// Checks one usable translation `va` (aligned to `size`) -> `hpa` with
    /// `rights` of vCPU `v`.
    fn check_translation(
        &mut self,
        v: usize,
        va: u64,
        size: Size,
        hpa: u64,
        rights: Rights,
        via: &str,
    ) -> Res<()> {
        let ctrl = self.vcpus[v].ctrl;
        let hw = self.hw_ctrl(v);
        let d = self.vcpus[v].dom;
        if size != Size::K4 {
            // Whole-leaf fast path: the guest maps the range with a leaf at
            // least as large, contiguous in the memory map.
            if let Walk::Ok(l) = self.guest_walk_now(v, va) {
                if l.size >= size && rights.within(hw, l.rights, ctrl) {
                    let gpa = l.phys(va);
                    let pages = size.bytes() >> 12;
                    if let Some((m, n)) = self.doms[d].contiguous(gpa >> 12, pages) {
                        if n == pages && m << 12 == hpa {
                            return Ok(());
                        }
                    }
                }
            }
            let sub = if size == Size::G1 { Size::M2 } else { Size::K4 };
            for i in 0..512u64 {
                let off = i * sub.bytes();
                self.check_translation(v, va + off, sub, hpa + off, rights, via)?;
            }
            return Ok(());
        }
        let key = (v, va, hpa, rights_key(rights));
        if self
            .cache
            .get(&key)
            .is_some_and(|&(k, sz)| k >= self.window_start_sized(v, va, sz))
        {
            return Ok(());
        }
        let dom = &self.doms[d];
        let mut leaf_size = Size::K4;
        let found = self.search_state(v, va, &mut |w| match w {
            Walk::Ok(l) => {
                let ok = rights.within(hw, l.rights, ctrl)
                    && dom.mfn(l.phys(va) >> 12) == Some(hpa >> 12);
                if ok {
                    leaf_size = l.size;
                }
                ok
            }
            _ => false,
        });
        match found {
            Some(k) => {
                self.cache.insert(key, (k, leaf_size));
                Ok(())
            }
            None => {
                let w = self.guest_walk_now(v, va);
                let expected = match w {
                    Walk::Ok(l) => {
                        let gpa = l.phys(va);
                        match dom.mfn(gpa >> 12) {
                            Some(m) => format!(
                                "gpa {gpa:#x} = hpa {:#x}, rights {} at most",
                                m << 12,
                                l.rights
                            ),
                            None => format!("no mapping: gpa {gpa:#x} is outside guest memory"),
                        }
                    }
                    Walk::Fault { ec, .. } => {
                        format!("no mapping: the guest walk faults (ec {ec:#x})")
                    }
                    Walk::Outside { addr, .. } => format!(
                        "no mapping: the guest walk reads gpa {addr:#x} outside guest memory"
                    ),
                };
                Err(self.fail(
                    &format!(
                        "translation allowed by the guest tables ({via}, vCPU {})",
                        self.vcpus[v].id.0
                    ),
                    Some(va),
                    expected,
                    format!(
                        "hpa {hpa:#x}{}, rights {rights}, {size:?}",
                        if dom.gfn_of(hpa >> 12).is_none() {
                            " (not a frame of this guest)"
                        } else {
                            ""
                        }
                    ),
                ))
            }
        }
    }

    fn judge_injection(&self, v: usize, gva: u64, acc: Access, ec: u64, addr: u64) -> Res<()> {
        let ctrl = self.vcpus[v].ctrl;
        let now = self.guest_walk_now(v, gva);
        let ok = addr == gva
            && if ec & PF_P == 0 {
                fault_code(&now, acc, ctrl) == Some(ec)
                    || matches!(now, Walk::Outside { .. })
                    || matches!(now, Walk::Ok(l) if self.doms[self.vcpus[v].dom].mfn(l.phys(gva) >> 12).is_none())
            } else {
                let d = self.vcpus[v].dom;
                let dom = &self.doms[d];
                self.search(v, gva, &mut |w| {
                    fault_code(w, acc, ctrl) == Some(ec)
                        || matches!(w, Walk::Outside { .. })
                        || matches!(w, Walk::Ok(l) if dom.mfn(l.phys(gva) >> 12).is_none())
                })
            };
        if ok {
            return Ok(());
        }
        let expected = match fault_code(&now, acc, ctrl) {
            Some(e) => format!("#PF ec {e:#x} at {gva:#x}"),
            None => format!("no fault ({} allowed: {now:?})", acc.name()),
        };
        Err(self.fail(
            "injected #PF is the one the guest tables give",
            Some(gva),
            expected,
            format!("#PF ec {ec:#x} at {addr:#x}"),
        ))
    }

    /// After an access through a translation the guest tables give now and
    /// that did not change since the vCPU's last flush, the guest's A bits
    /// are set on every level and D on the leaf for a write.
    fn check_guest_ad(&self, v: usize, gva: u64, acc: Access) -> Res<()> {
        let d = self.vcpus[v].dom;
        let Walk::Ok(l) = self.guest_walk_now(v, gva) else {
            return Ok(());
        };
        if !l.rights.allows(acc, self.vcpus[v].ctrl) {
            return Ok(());
        }
        let start = self.window_start(v, gva);
        let hist = &self.doms[d].hist;
        if l.path[..l.depth]
            .iter()
            .any(|&a| hist.last_write(a).is_some_and(|s| s >= start))
        {
            return Ok(());
        }
        for i in 0..l.depth {
            let e = self.peek(d, l.path[i]).unwrap_or(0);
            let leaf = i + 1 == l.depth;
            if e & arch::A == 0 || (leaf && acc.write && e & arch::D == 0) {
                return Err(self.fail(
                    "guest A/D bits set as hardware would",
                    Some(gva),
                    format!(
                        "A{} set in the guest entry at gpa {:#x}",
                        if leaf && acc.write { " and D" } else { "" },
                        l.path[i]
                    ),
                    format!("entry {e:#x}"),
                ));
            }
        }
        Ok(())
    }

    /// Judges the server's writes to guest memory during this step.
    fn check_foreign(&mut self) -> Res<()> {
        for fw in self.phys.take_foreign() {
            let mfn = fw.hpa >> 12;
            let Some((d, gfn)) = self
                .doms
                .iter()
                .enumerate()
                .find_map(|(i, dm)| dm.gfn_of(mfn).map(|g| (i, g)))
            else {
                return Err(self.fail(
                    "server writes only shadow pool and guest frames",
                    None,
                    String::from("no write here"),
                    format!("wrote {:#x} -> {:#x} at hpa {:#x}", fw.old, fw.new, fw.hpa),
                ));
            };
            let gpa = (gfn << 12) | (fw.hpa & 0xfff);
            if self
                .cur_emulated
                .iter()
                .any(|&(ed, eg, val)| ed == d && eg == gpa && val == fw.new)
            {
                continue;
            }
            let changed = fw.old ^ fw.new;
            let ad_only = changed & !(arch::A | arch::D) == 0 && fw.new & changed == changed;
            let on_path = self.cur_access.and_then(|(v, _, acc)| {
                if self.vcpus[v].dom != d {
                    return None;
                }
                let (path, ok) = &self.cur_path;
                let pos = path.iter().rposition(|&a| a == gpa)?;
                Some(*ok && pos + 1 == path.len() && acc.write)
            });
            let ok = ad_only
                && match on_path {
                    Some(d_ok) => changed & arch::D == 0 || d_ok,
                    None => false,
                };
            if ok && self.doms[d].dirty_on {
                *self.doms[d].dirty_by.entry(gfn).or_default() |= BY_SERVER_AD;
            }
            if !ok {
                return Err(self.fail(
                    "server changes guest memory only by setting A/D on the walked path",
                    self.cur_access.map(|c| c.1),
                    String::from("A on entries of this access's walk, D on its leaf for a write"),
                    format!("gpa {gpa:#x}: {:#x} -> {:#x}", fw.old, fw.new),
                ));
            }
        }
        if let Some((hpa, what)) = self.phys.take_bad().into_iter().next() {
            return Err(self.fail(
                "server uses memory as PhysMem allows",
                None,
                String::from("writes and frees only of frames it holds or guest frames"),
                format!("{what} at hpa {hpa:#x}"),
            ));
        }
        Ok(())
    }

    fn shadow_leaves(
        &self,
        v: usize,
        root: u64,
        out: &mut Vec<(u64, Size, u64, Rights, bool)>,
    ) -> Res<()> {
        let ctrl = self.vcpus[v].ctrl;
        let rsvd_high = ((1u64 << 52) - 1) & !((1u64 << arch::MAXPHYADDR) - 1);
        let mut stack: Vec<(u64, u32, u64, Rights)> = Vec::new();
        stack.push((
            root & arch::ADDR_MASK,
            4,
            0,
            Rights {
                write: true,
                user: true,
                nx: false,
            },
        ));
        while let Some((table, level, va, r)) = stack.pop() {
            if !self.phys.holds(table >> 12) {
                return Err(self.fail(
                    "shadow tables live in pool frames the server holds",
                    Some(va),
                    String::from("a held pool frame"),
                    format!(
                        "level-{level} shadow table at hpa {table:#x} (root {root:#x}, vCPU {})",
                        self.vcpus[v].id.0
                    ),
                ));
            }
            for i in 0..512u64 {
                let e = self.ram.read(table + i * 8).unwrap_or(0);
                if e & arch::P == 0 {
                    continue;
                }
                let leaf = level == 1 || (level <= 3 && e & arch::PS != 0);
                let mut rsvd = rsvd_high;
                if !ctrl.nxe {
                    rsvd |= arch::NX;
                }
                if level == 4 {
                    rsvd |= arch::PS;
                }
                if leaf && level > 1 {
                    rsvd |= ((1u64 << (12 + 9 * (level - 1))) - 1) & !0x1fff;
                }
                if e & rsvd != 0 {
                    continue;
                }
                let nva = arch::canonical(va | i << (12 + 9 * (level - 1)));
                let nr = Rights {
                    write: r.write && e & arch::RW != 0,
                    user: r.user && e & arch::US != 0,
                    nx: r.nx || (ctrl.nxe && e & arch::NX != 0),
                };
                if leaf {
                    let size = Size::of_level(level);
                    out.push((
                        nva,
                        size,
                        e & arch::ADDR_MASK & !(size.bytes() - 1),
                        nr,
                        e & arch::D != 0,
                    ));
                    if out.len() > 1 << 20 {
                        return Err(self.fail(
                            "shadow size",
                            None,
                            String::from("at most 2^20 leaves"),
                            String::from("more"),
                        ));
                    }
                } else {
                    stack.push((e & arch::ADDR_MASK, level - 1, nva, nr));
                }
            }
        }
        Ok(())
    }

    /// Where running vCPUs can write host frame `mfn` without a fault now
    /// (for failure reports).
    fn writable_paths(&self, mfn: u64) -> Vec<String> {
        let mut out = Vec::new();
        for (p, pc) in self.pcpus.iter().enumerate() {
            let Some(v) = pc.vcpu else { continue };
            for e in pc.tlb.all() {
                if e.rights.write
                    && e.dirty
                    && mfn >= e.hpa >> 12
                    && mfn < (e.hpa + e.size.bytes()) >> 12
                {
                    out.push(format!(
                        "TLB of pCPU {p} (vCPU key {}) va {:#x}",
                        e.vcpu, e.va
                    ));
                }
            }
            let Some(root) = self.vcpus[v].root else {
                continue;
            };
            let mut leaves = Vec::new();
            if self.shadow_leaves(v, root, &mut leaves).is_ok() {
                for (va, size, hpa, r, _) in leaves {
                    if r.write && mfn >= hpa >> 12 && mfn < (hpa + size.bytes()) >> 12 {
                        out.push(format!(
                            "shadow of vCPU {} on pCPU {p} (root {root:#x}) va {va:#x} {size:?}",
                            self.vcpus[v].id.0
                        ));
                    }
                }
            }
        }
        out
    }

    /// The oracle over the whole machine (run after every step).
    pub fn check(&mut self) -> Res<()> {
        self.check_foreign()?;
        let sig = (self.phys.shadow_writes.load(Ordering::SeqCst), self.epoch);
        for p in 0..self.pcpus.len() {
            let Some(v) = self.pcpus[p].vcpu else {
                continue;
            };
            if self.pcpus[p].checked == Some(sig) {
                continue;
            }
            let key = self.key(v);
            let entries: Vec<Entry> = self.pcpus[p].tlb.of(key);
            for e in entries {
                self.check_translation(
                    v,
                    e.va,
                    e.size,
                    e.hpa,
                    e.rights,
                    &format!("TLB of pCPU {p}"),
                )?;
            }
            if let (Some(root), false) = (self.vcpus[v].root, self.vcpus[v].need_root) {
                let mut leaves = Vec::new();
                self.shadow_leaves(v, root, &mut leaves)?;
                for &(va, size, hpa, r, _) in &leaves {
                    self.check_translation(
                        v,
                        va,
                        size,
                        hpa,
                        r,
                        &format!("shadow tables of pCPU {p}"),
                    )?;
                }
                // Speculative caching: the pCPU may have cached any of them.
                for (va, size, hpa, rights, dirty) in leaves {
                    self.pcpus[p].tlb.insert_if_free(Entry {
                        vcpu: key,
                        va,
                        size,
                        hpa,
                        rights,
                        dirty,
                    });
                }
            }
            self.pcpus[p].checked = Some(sig);
        }
        Ok(())
    }

    // ---- conveniences for scenarios -----------------------------------------

    /// Maps `va` -> `gpa` with `size` and leaf `flags` in the tables at
    /// `cr3` of domain `d`, creating missing tables; writes go through vCPU
    /// `via` (its direct map) or, with `None`, are setup writes.
    #[allow(clippy::too_many_arguments)]
    pub fn map(
        &mut self,
        d: usize,
        via: Option<usize>,
        cr3: u64,
        va: u64,
        gpa: u64,
        size: Size,
        flags: u64,
    ) -> Res<()> {
        let leaf_level = match size {
            Size::K4 => 1,
            Size::M2 => 2,
            Size::G1 => 3,
        };
        let mut table = cr3 & arch::ADDR_MASK;
        for level in (leaf_level + 1..=4).rev() {
            let ea = table + arch::index(va, level) * 8;
            let e = self.peek(d, ea).unwrap_or(0);
            if e & arch::P != 0 && e & arch::PS == 0 {
                table = e & arch::ADDR_MASK;
                continue;
            }
            let t = self.alloc_gfn(d) << 12;
            self.guest_write(d, via, ea, t | arch::P | arch::RW | arch::US)?;
            table = t;
        }
        let ps = if size == Size::K4 { 0 } else { arch::PS };
        let ea = table + arch::index(va, leaf_level) * 8;
        self.guest_write(d, via, ea, gpa | flags | ps)
    }

    /// The gpa of the entry that maps `va` at `level` in tables at `cr3`.
    pub fn entry_addr(&self, d: usize, cr3: u64, va: u64, level: u32) -> Option<u64> {
        let mut table = cr3 & arch::ADDR_MASK;
        for l in (level + 1..=4).rev() {
            let e = self.peek(d, table + arch::index(va, l) * 8)?;
            if e & arch::P == 0 || e & arch::PS != 0 {
                return None;
            }
            table = e & arch::ADDR_MASK;
        }
        Some(table + arch::index(va, level) * 8)
    }

    /// Writes a guest word: a setup write (`via` None) or a supervisor write
    /// through vCPU `via`'s direct map, which must succeed.
    pub fn guest_write(&mut self, d: usize, via: Option<usize>, gpa: u64, value: u64) -> Res<()> {
        match via {
            None => self.setup_write(d, gpa, value),
            Some(v) => match self.access(v, DIRECT + gpa, Access::WRITE, value)? {
                Outcome::Ok(_) => Ok(()),
                o => Err(self.fail(
                    "guest page-table write through the direct map",
                    Some(DIRECT + gpa),
                    String::from("the write completes"),
                    format!("{o:?}"),
                )),
            },
        }
    }

    /// Adds the direct map (`DIRECT + gpa` -> gpa, supervisor RW, NX) of all
    /// of domain `d`'s memory to the tables at `cr3`. Entries of even frames
    /// are pre-dirtied (A and D set, as kernels map themselves), so a read
    /// through them may be given a writable shadow: unless the frame is a
    /// page table.
    pub fn map_direct(&mut self, d: usize, via: Option<usize>, cr3: u64) -> Res<()> {
        let regions = self.doms[d].regions.clone();
        for (gfn, _, pages) in regions {
            for g in gfn..gfn + pages {
                self.map(
                    d,
                    via,
                    cr3,
                    DIRECT + (g << 12),
                    g << 12,
                    Size::K4,
                    arch::P | arch::RW | arch::NX | if g % 2 == 0 { arch::A | arch::D } else { 0 },
                )?;
            }
        }
        Ok(())
    }

    /// A fresh address space for domain `d` with the direct map; returns its
    /// CR3 (the gpa of its PML4).
    pub fn new_space(&mut self, d: usize, via: Option<usize>) -> Res<u64> {
        let cr3 = self.alloc_gfn(d) << 12;
        self.map_direct(d, via, cr3)?;
        Ok(cr3)
    }

    /// Whether domain `d`'s dirty logging is on.
    pub fn dirty_on(&self, d: usize) -> bool {
        self.doms[d].dirty_on
    }

    /// The pCPU vCPU `v` runs on.
    pub fn running_on(&self, v: usize) -> Option<usize> {
        self.vcpus[v].pcpu
    }

    /// vCPU `v`'s paging controls (CR0.WP, EFER.NXE).
    pub fn ctrl(&self, v: usize) -> Ctrl {
        self.vcpus[v].ctrl
    }

    /// vCPU `v`'s guest CR3.
    pub fn cr3(&self, v: usize) -> u64 {
        self.vcpus[v].cr3
    }

    /// The number of pCPUs.
    pub fn pcpu_count(&self) -> usize {
        self.pcpus.len()
    }

    /// The scenario's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether domain `d` still exists.
    pub fn alive(&self, d: usize) -> bool {
        self.doms[d].alive
    }

    /// Drops a CPU set helper for scenarios: every pCPU.
    pub fn all_cpus(&self) -> CpuSet {
        CpuSet::first(self.pcpus.len() as u32)
    }
}
