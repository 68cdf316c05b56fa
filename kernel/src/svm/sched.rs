//! Running vCPUs under a scheduler server: its door, the per-pCPU loop that asks it what to run, the decisions the kernel refuses, and the record of what ran.
//!
//! The kernel reports events and carries out decisions (see `abi::sched`,
//! "The kernel's obligations"); which vCPU runs where and for how long is
//! the server's. Every `Run` answer is checked against the kernel's own
//! [`VcpuTable`] before anything runs: an unknown vCPU, one running on
//! another pCPU, a blocked one or a bad slice is refused, reported (the
//! first few, then counted), handed back to the server
//! ([`VcpuTable::undo`]) and the pCPU idles until its next tick. A vCPU is
//! also behind its own lock while it runs, so even a table bug could not run
//! it twice. A scheduler that stops (a task that faults, panics or hangs)
//! stops every domain: nothing can be scheduled any more.
//!
//! Guests here have no wake-up sources, so HLT is reported as a yield
//! (`Yielded`); a vCPU that ends is stopped `Blocked` and destroyed.

use super::door::svm;
use super::stats::bump;
use super::vcpu::{PcpuState, Slice, Vcpu};
use super::{enable_on_this_cpu, host};
use crate::task::{Stop, Task};
use abi::sched::{
    Decision, Micros, SchedError, SchedReply, SchedRequest, SchedServer, StopReason, VcpuTable,
};
use abi::task::Op;
use abi::{DomainId, PcpuId, VcpuId, MAX_MESSAGE};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use spin::Mutex;

/// How the kernel reaches the scheduler server (the same two transports
/// as the MMU server's).
pub enum SchedTransport {
    /// The server runs in ring 3 as a task.
    Task(&'static Task),
    /// The server is linked into the kernel.
    Direct(Box<dyn SchedServer>),
}

/// Slices recorded per pCPU for the timeline (the first ones of the run).
const MAX_TRACE: usize = 4096;
/// Refused decisions reported in full (the rest are counted).
const MAX_REFUSALS_SHOWN: usize = 8;

/// One slice: which vCPU ran on a pCPU, from when to when (µs since the
/// run began).
#[derive(Clone, Copy, Debug)]
pub struct TraceSlice {
    /// The vCPU.
    pub vcpu: VcpuId,
    /// Its domain.
    pub domain: DomainId,
    /// Start, µs since the run began.
    pub start_us: u64,
    /// End.
    pub end_us: u64,
}

/// What ran, per vCPU (indexed by wire id).
#[derive(Default)]
pub struct VcpuRecord {
    /// CPU time, µs.
    pub cpu_us: AtomicU64,
    /// CPU time inside its domain's measurement window, µs.
    pub window_us: AtomicU64,
    /// Slices run.
    pub slices: AtomicU64,
    /// Runs on another pCPU than the previous one.
    pub migrations: AtomicU64,
}

/// What ran, per pCPU.
#[derive(Default)]
pub struct PcpuRecord {
    /// Time spent running vCPUs, µs.
    pub busy_us: AtomicU64,
    /// Slices run.
    pub slices: AtomicU64,
    /// The slices, for the timeline.
    pub trace: Mutex<Vec<TraceSlice>>,
}

/// A scheduler server and the kernel's side of scheduling one run.
pub struct Scheduler {
    transport: SchedTransport,
    /// The policy's registered name.
    pub policy: String,
    table: Mutex<VcpuTable<(), 256>>,
    /// Each vCPU (by wire id) while it exists; its lock is held while it runs.
    vcpus: Vec<Mutex<Option<Vcpu>>>,
    /// Each vCPU's weight (by wire id).
    pub weights: Vec<AtomicU32>,
    kicks: Vec<AtomicBool>,
    live: AtomicUsize,
    down: AtomicBool,
    /// Decisions refused.
    pub refused: AtomicU64,
    /// Per-vCPU record (by wire id).
    pub per_vcpu: Vec<VcpuRecord>,
    /// Per-pCPU record.
    pub per_pcpu: Vec<PcpuRecord>,
    /// TSC at the start of the run.
    start: AtomicU64,
}

impl Scheduler {
    /// A scheduler for up to `vcpus` vCPUs on `pcpus` pCPUs.
    pub fn new(transport: SchedTransport, policy: &str, vcpus: usize, pcpus: usize) -> Scheduler {
        Scheduler {
            transport,
            policy: policy.into(),
            table: Mutex::new(VcpuTable::new()),
            vcpus: (0..vcpus).map(|_| Mutex::new(None)).collect(),
            weights: (0..vcpus).map(|_| AtomicU32::new(0)).collect(),
            kicks: (0..pcpus).map(|_| AtomicBool::new(false)).collect(),
            live: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            refused: AtomicU64::new(0),
            per_vcpu: (0..vcpus).map(|_| VcpuRecord::default()).collect(),
            per_pcpu: (0..pcpus).map(|_| PcpuRecord::default()).collect(),
            start: AtomicU64::new(0),
        }
    }

    /// Sends one request and decodes the answer. A scheduler that stops is
    /// reported once, every domain is stopped, and `None` comes back.
    fn call(&self, req: &SchedRequest) -> Option<SchedReply> {
        if self.down.load(Ordering::Acquire) {
            return None;
        }
        let mut buf = [0u8; MAX_MESSAGE];
        let n = abi::encode(req, &mut buf).ok()?;
        let mut out = [0u8; MAX_MESSAGE];
        let m = match &self.transport {
            SchedTransport::Direct(s) => abi::sched::dispatch(&**s, &buf[..n], &mut out),
            SchedTransport::Task(t) => match t.call(Op::Request, &buf[..n], &mut out) {
                Ok(m) => m,
                Err(stop) => {
                    self.scheduler_down(req, stop);
                    return None;
                }
            },
        };
        Some(
            abi::decode::<SchedReply>(&out[..m]).unwrap_or_else(|e| SchedReply::Error {
                reason: SchedError::Malformed(e),
            }),
        )
    }

    fn scheduler_down(&self, req: &SchedRequest, stop: Stop) {
        self.down.store(true, Ordering::Release);
        if stop != Stop::AlreadyStopped {
            crate::kprintln!(
                "sched: scheduler `{}` STOPPED on pcpu {} while serving {req:?}: {stop}",
                self.policy,
                host::cpu_index()
            );
        }
        for d in svm().domains() {
            d.stop("scheduler stopped", 0);
        }
        self.kick_all();
    }

    /// Carries out the kicks of a `Done` answer.
    fn kick(&self, reply: &SchedReply) {
        if let SchedReply::Done { kick } = reply {
            for p in kick.iter() {
                let p = p.0 as usize;
                if p < self.kicks.len() {
                    self.kicks[p].store(true, Ordering::Release);
                    host::wake(p);
                }
            }
        }
    }

    fn kick_all(&self) {
        for (p, k) in self.kicks.iter().enumerate() {
            k.store(true, Ordering::Release);
            host::wake(p);
        }
    }

    /// The handshake; false if the server refused it.
    pub fn hello(&self) -> bool {
        matches!(
            self.call(&SchedRequest::Hello {
                version: abi::sched::PROTOCOL_VERSION
            }),
            Some(SchedReply::Welcome { .. })
        )
    }

    /// Gives the scheduler a new vCPU (runnable), first to run on `hint`.
    pub fn add(&self, vcpu: Vcpu, weight: u32, hint: PcpuId) -> Result<(), &'static str> {
        let id = vcpu.id();
        let domain = vcpu.domain().id;
        let slot = self
            .vcpus
            .get(id.0 as usize)
            .ok_or("vCPU id beyond the scheduler's table")?;
        self.table
            .lock()
            .insert(id, ())
            .map_err(|_| "the kernel's vCPU table refused a new vCPU")?;
        *slot.lock() = Some(vcpu);
        if let Some(w) = self.weights.get(id.0 as usize) {
            w.store(weight, Ordering::Relaxed);
        }
        self.live.fetch_add(1, Ordering::AcqRel);
        let reply = self.call(&SchedRequest::CreateVcpu {
            vcpu: id,
            domain,
            weight,
            hint,
        });
        match reply {
            Some(r @ SchedReply::Done { .. }) => {
                self.kick(&r);
                Ok(())
            }
            Some(other) => {
                crate::kprintln!("sched: CreateVcpu {id:?}: {other:?}");
                Err("the scheduler refused a vCPU")
            }
            None => Err("the scheduler stopped"),
        }
    }

    /// Marks the start of the run (the timeline's zero).
    pub fn begin(&self) {
        self.start.store(crate::apic::tsc(), Ordering::Relaxed);
    }

    fn since_start_us(&self, tsc: u64) -> u64 {
        crate::apic::tsc_to_us(tsc.saturating_sub(self.start.load(Ordering::Relaxed)))
    }

    /// One pCPU's share of the run: ask, check, run, report, until every
    /// vCPU has ended (or the run's deadline passed, or the scheduler
    /// stopped).
    pub fn pcpu_loop(&self) -> Result<(), &'static str> {
        let host_vmcb = enable_on_this_cpu()?;
        let me = host::cpu_index();
        let p = PcpuId(me as u32);
        let mut pcpu = PcpuState {
            host_vmcb,
            pending: 0,
            last: None,
        };
        let mut shown = 0usize;
        while self.live.load(Ordering::Acquire) > 0
            && !self.down.load(Ordering::Acquire)
            && !super::past_deadline()
        {
            self.kicks[me].store(false, Ordering::Release);
            let Some(reply) = self.call(&SchedRequest::PickNext { pcpu: p }) else {
                break;
            };
            let decision = self.table.lock().decide(p, &reply);
            match decision {
                Ok(Decision::Run {
                    vcpu,
                    slice,
                    migrated,
                }) => self.run_one(&mut pcpu, me, vcpu, slice, migrated),
                Ok(Decision::Idle) => self.idle(me),
                Err(why) => {
                    bump(&self.refused);
                    if shown < MAX_REFUSALS_SHOWN {
                        shown += 1;
                        crate::kprintln!(
                            "sched: pcpu {me}: refused the decision {reply:?} of `{}`: {why:?}",
                            self.policy
                        );
                    }
                    let undo = self.table.lock().undo(p, &reply);
                    if let Some(undo) = undo {
                        let _ = self.call(&undo);
                    }
                    self.idle(me);
                }
            }
        }
        // Let the others see the end (or the deadline) too.
        self.kick_all();
        Ok(())
    }

    /// Runs `vcpu` on this pCPU for at most `slice`, then reports.
    fn run_one(
        &self,
        pcpu: &mut PcpuState,
        me: usize,
        vcpu: VcpuId,
        slice: Micros,
        migrated: bool,
    ) {
        let p = PcpuId(me as u32);
        let Some(mut guard) = self.vcpus.get(vcpu.0 as usize).and_then(|m| m.try_lock()) else {
            // Its lock is held: it runs elsewhere after all. Never run it twice.
            bump(&self.refused);
            crate::kprintln!("sched: pcpu {me}: {vcpu:?} is locked by another pCPU; not run");
            self.hand_back(p, vcpu, StopReason::Preempted);
            return;
        };
        let Some(v) = guard.as_mut() else {
            bump(&self.refused);
            self.hand_back(p, vcpu, StopReason::Blocked);
            return;
        };
        if migrated {
            v.mark_migrated();
            bump(&self.per_vcpu[vcpu.0 as usize].migrations);
        }
        let budget = slice.0 * crate::apic::tsc_per_ms() / 1000;
        let t0 = crate::apic::tsc();
        let (ended, why) = v.run_for(pcpu, budget.max(1), &self.kicks[me]);
        let t1 = crate::apic::tsc();
        let ran = crate::apic::tsc_to_us(t1 - t0);
        let rec = &self.per_vcpu[vcpu.0 as usize];
        rec.cpu_us.fetch_add(ran, Ordering::Relaxed);
        let (w0, w1) = (
            v.domain().window.load(Ordering::Relaxed),
            v.domain().window_end.load(Ordering::Acquire),
        );
        if w1 != 0 {
            let inside = t1.min(w1).saturating_sub(t0.max(w0));
            rec.window_us
                .fetch_add(crate::apic::tsc_to_us(inside), Ordering::Relaxed);
        }
        bump(&rec.slices);
        let prec = &self.per_pcpu[me];
        prec.busy_us.fetch_add(ran, Ordering::Relaxed);
        bump(&prec.slices);
        {
            let mut t = prec.trace.lock();
            if t.len() < MAX_TRACE {
                t.push(TraceSlice {
                    vcpu,
                    domain: v.domain().id,
                    start_us: self.since_start_us(t0),
                    end_us: self.since_start_us(t1),
                });
            }
        }
        let dom = v.domain();
        if ended == Slice::Done {
            *guard = None;
        }
        // Let go of the vCPU before the table and the server hear it
        // stopped: from then on another pCPU may be told to run it.
        drop(guard);
        let _ = self.table.lock().stop(vcpu, p, why);
        let reply = self.call(&SchedRequest::Stopped {
            vcpu,
            pcpu: p,
            ran: Micros(ran),
            why,
        });
        match &reply {
            Some(r @ SchedReply::Done { .. }) => self.kick(r),
            Some(other) => {
                bump(&self.refused);
                crate::kprintln!("sched: pcpu {me}: Stopped {vcpu:?} ({why:?}) answered {other:?}");
            }
            None => {}
        }
        if ended == Slice::Done {
            let _ = self.table.lock().remove(vcpu);
            if let Some(r) = self.call(&SchedRequest::DestroyVcpu { vcpu }) {
                self.kick(&r);
            }
            dom.ended.fetch_add(1, Ordering::AcqRel);
            if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
                self.kick_all();
            }
        }
    }

    /// A `Run` that passed the table but cannot be carried out: marks the
    /// vCPU stopped again in the table and tells the server, with no time
    /// run.
    fn hand_back(&self, p: PcpuId, vcpu: VcpuId, why: StopReason) {
        let _ = self.table.lock().stop(vcpu, p, why);
        let _ = self.call(&SchedRequest::Stopped {
            vcpu,
            pcpu: p,
            ran: Micros::ZERO,
            why,
        });
    }

    /// Waits for a kick or the next timer tick, without losing a kick that
    /// arrives between the check and the halt.
    fn idle(&self, me: usize) {
        x86_64::instructions::interrupts::disable();
        if self.kicks[me].load(Ordering::Acquire) {
            x86_64::instructions::interrupts::enable();
            return;
        }
        host::serve_shootdowns();
        // STI;HLT: an interrupt (kick IPI, timer, shootdown) between the two
        // is taken after the HLT begins, so it wakes it.
        x86_64::instructions::interrupts::enable_and_hlt();
    }

    /// µs since the run began.
    pub fn elapsed_us(&self) -> u64 {
        self.since_start_us(crate::apic::tsc())
    }

    /// Whether the scheduler was stopped during the run.
    pub fn stopped(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }
}
