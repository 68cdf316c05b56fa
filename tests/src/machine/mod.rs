//! The simulated machine: plays the kernel and the hardware around one MMU
//! server, speaking to it only in encoded messages, and judges it with the
//! oracle after every step.
//!
//! One file per job, each adding its own `impl Machine` block:
//! - `driver.rs`: the kernel driver, which sends the control requests to the
//!   server and carries out its replies (flush obligations, shadow roots);
//! - `hardware.rs`: the hardware model, a TLB per pCPU and the shadow walk
//!   behind it, which forwards faults and carries out the fault replies;
//! - `oracle.rs`: the oracle, run after every step (see [`Machine::check`]),
//!   including the exact dirty-log check at every harvest;
//! - `guest.rs`: the guest builder, the guest's own allocator and page-table
//!   writes (through its direct map at [`DIRECT`] once it runs).
//!
//! This file holds what they share: the machine's state (domains, vCPUs,
//! pCPUs), failure reports, counters and step bookkeeping.

use crate::arch::{Access, Ctrl, Size};
use crate::history::History;
use crate::ram::{Ram, SuitePhys};
use crate::tlb::Tlb;
use abi::{CpuSet, DomainId, MmuError, MmuServer, VcpuId};
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

mod driver;
mod guest;
mod hardware;
mod oracle;

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
    /// The server answered `Mmio` for this guest-physical address (the
    /// kernel would emulate the access; nothing is read or written).
    Mmio(u64),
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
    /// Accesses answered `Mmio` (not RAM, emulated by the kernel).
    pub mmio: u64,
    /// `SetPagingMode` requests that switched paging on or off.
    pub paging_switches: u64,
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

    /// What the exact dirty-log check found at the last harvest.
    pub fn last_harvest(&self) -> Option<&Harvest> {
        self.last_harvest.as_ref()
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
