//! The simulated machine: the suite plays the kernel (the vCPU table and the
//! decision check of `abi::sched`), the pCPUs (a clock, slices, kicks, an
//! idle timer) and the guests (the [`Behaviour`]s), and talks to the policy
//! only through encoded messages.
//!
//! Time advances from event to event (a vCPU's wake-up, the end of a run,
//! a pCPU asking), in a fixed order, so every run is reproducible.

use super::scenarios::{Behaviour, Scenario};
use super::verdict::{Failure, Violation};
use abi::sched::{
    dispatch, request, Decision, Guarantees, Micros, SchedError, SchedReply, SchedRequest,
    SchedServer, StopReason, VcpuState, VcpuTable, MAX_VCPUS, PROTOCOL_VERSION,
};
use abi::{CpuSet, PcpuId, VcpuId};
use alloc::vec::Vec;

/// An idle pCPU's timer: it asks again after this long even without a kick.
pub const TICK: Micros = Micros(1_000);

/// The most events one run may take (a policy that makes no progress).
const MAX_EVENTS: u64 = 20_000_000;

/// xorshift64*: small, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// `d` jittered to `[d/2, 3d/2]`, at least 1.
    fn jitter(&mut self, d: Micros) -> u64 {
        (d.0 / 2 + self.next() % (d.0 + 1)).max(1)
    }
}

/// What the suite knows of one vCPU.
#[derive(Clone, Debug)]
pub struct SimVcpu {
    /// Its id (1, 2, ... in scenario order).
    pub id: VcpuId,
    /// Its weight.
    pub weight: u32,
    /// Its hint.
    pub hint: PcpuId,
    behaviour: Behaviour,
    /// CPU time left in the current burst (`u64::MAX`: CPU bound).
    burst: u64,
    wake_at: Option<u64>,
    waiting_since: Option<u64>,
    /// Alive (created, not yet destroyed).
    pub alive: bool,
    /// CPU time over the whole run.
    pub cpu: u64,
    /// CPU time after the warm-up (the window shares are judged on).
    pub window: u64,
    /// Runs it was given.
    pub runs: u64,
    /// Runs on another pCPU than its previous run.
    pub migrations: u64,
    /// The longest it waited runnable.
    pub max_wait: u64,
}

/// One run in progress on a pCPU.
#[derive(Clone, Copy, Debug)]
struct Run {
    vcpu: usize,
    started: u64,
    end: u64,
    preempted: bool,
}

#[derive(Clone, Copy, Debug, Default)]
struct SimPcpu {
    run: Option<Run>,
    ask_at: Option<u64>,
    busy: u64,
}

/// The machine of one scenario around one server.
pub struct Machine<'a> {
    sc: &'a Scenario,
    server: &'a dyn SchedServer,
    /// What the policy promised in its `Welcome`.
    pub guarantees: Guarantees,
    now: u64,
    warmup: u64,
    /// The vCPUs.
    pub vcpus: Vec<SimVcpu>,
    pcpus: Vec<SimPcpu>,
    table: VcpuTable<(), MAX_VCPUS>,
    rng: Rng,
    /// The longest slice the policy handed out.
    pub max_slice: u64,
    /// The bound a runnable vCPU's wait was last held to.
    pub bound: u64,
}

/// Which event comes next (ties: wakes, then stops, then asks; lower index
/// first).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    Wake(usize),
    Stop(usize),
    Ask(usize),
}

impl<'a> Machine<'a> {
    /// Says `Hello` and creates every vCPU of `sc` on `server`.
    pub fn new(sc: &'a Scenario, server: &'a dyn SchedServer) -> Result<Self, Failure> {
        let mut m = Machine {
            sc,
            server,
            guarantees: Guarantees::default(),
            now: 0,
            warmup: sc.length.0 / 10,
            vcpus: Vec::new(),
            pcpus: alloc::vec![SimPcpu::default(); sc.pcpus as usize],
            table: VcpuTable::new(),
            rng: Rng(sc.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1),
            max_slice: 1,
            bound: 0,
        };
        match m.send(SchedRequest::Hello {
            version: PROTOCOL_VERSION,
        }) {
            SchedReply::Welcome { guarantees, .. } => m.guarantees = guarantees,
            other => return Err(m.fail(Violation::Handshake(other))),
        }
        for (i, spec) in sc.vcpus.iter().enumerate() {
            let id = VcpuId(i as u32 + 1);
            let mut v = SimVcpu {
                id,
                weight: spec.weight,
                hint: spec.hint,
                behaviour: spec.behaviour,
                burst: 0,
                wake_at: None,
                waiting_since: Some(0),
                alive: true,
                cpu: 0,
                window: 0,
                runs: 0,
                migrations: 0,
                max_wait: 0,
            };
            v.burst = m.new_burst(&v.behaviour);
            m.vcpus.push(v);
            m.table
                .insert(id, ())
                .map_err(|e| m.fail(Violation::Refused("CreateVcpu", e)))?;
            let reply = m.send(SchedRequest::CreateVcpu {
                vcpu: id,
                domain: spec.domain,
                weight: spec.weight,
                hint: spec.hint,
            });
            m.event_reply("CreateVcpu", reply)?;
        }
        for p in &mut m.pcpus {
            p.ask_at = Some(0);
        }
        Ok(m)
    }

    fn send(&self, req: SchedRequest) -> SchedReply {
        let server = self.server;
        request(&req, |bytes, out| dispatch(server, bytes, out))
    }

    fn fail(&self, violation: Violation) -> Failure {
        Failure {
            scenario: self.sc.name,
            at: Micros(self.now),
            violation,
        }
    }

    fn new_burst(&mut self, b: &Behaviour) -> u64 {
        match *b {
            Behaviour::CpuBound => u64::MAX,
            Behaviour::Periodic { run, .. } | Behaviour::Yielder { run } => self.rng.jitter(run),
            Behaviour::Finite { work } => work.0.max(1),
        }
    }

    /// An event's reply must be `Done`; its kicks are carried out.
    fn event_reply(&mut self, what: &'static str, reply: SchedReply) -> Result<(), Failure> {
        match reply {
            SchedReply::Done { kick } => {
                self.kick(kick);
                Ok(())
            }
            SchedReply::Error { reason } => Err(self.fail(Violation::Refused(what, reason))),
            other => Err(self.fail(Violation::UnexpectedReply(what, other))),
        }
    }

    /// An idle pCPU asks now; a running one stops its vCPU now (its next
    /// exit). pCPUs the machine does not have are ignored, as a kernel does.
    fn kick(&mut self, kick: CpuSet) {
        let now = self.now;
        for p in kick.iter() {
            let Some(pc) = self.pcpus.get_mut(p.0 as usize) else {
                continue;
            };
            match &mut pc.run {
                Some(run) => {
                    run.end = now;
                    run.preempted = true;
                }
                None => pc.ask_at = Some(now),
            }
        }
    }

    /// The stated bound on a runnable vCPU's wait: `(m − 1) × r × s + TICK`
    /// with `m` live vCPUs, `r` the largest weight over the smallest (rounded
    /// up) and `s` the longest slice the policy has handed out.
    fn wait_bound(&self) -> u64 {
        let live = self.vcpus.iter().filter(|v| v.alive);
        let (lo, hi, m) = live.fold((u32::MAX, 1u32, 0u64), |(lo, hi, m), v| {
            (lo.min(v.weight), hi.max(v.weight), m + 1)
        });
        let r = hi.div_ceil(lo.max(1)) as u64;
        m.saturating_sub(1).max(1) * r * self.max_slice + TICK.0
    }

    fn check_waits(&mut self) -> Result<(), Failure> {
        self.bound = self.wait_bound();
        for v in &self.vcpus {
            if let Some(since) = v.waiting_since {
                if self.now - since > self.bound {
                    return Err(self.fail(Violation::Starved {
                        vcpu: v.id,
                        waited: Micros(self.now - since),
                        bound: Micros(self.bound),
                    }));
                }
            }
        }
        Ok(())
    }

    fn next_event(&self) -> Option<(u64, Event)> {
        let wakes = self
            .vcpus
            .iter()
            .enumerate()
            .filter_map(|(i, v)| v.wake_at.map(|t| (t, Event::Wake(i))));
        let pcpus = self
            .pcpus
            .iter()
            .enumerate()
            .filter_map(|(i, p)| match p.run {
                Some(run) => Some((run.end, Event::Stop(i))),
                None => p.ask_at.map(|t| (t, Event::Ask(i))),
            });
        wakes.chain(pcpus).min()
    }

    /// Runs the scenario to its end.
    pub fn run(&mut self) -> Result<(), Failure> {
        for _ in 0..MAX_EVENTS {
            match self.next_event() {
                Some((t, ev)) if t <= self.sc.length.0 => {
                    self.now = t;
                    self.check_waits()?;
                    match ev {
                        Event::Wake(i) => self.wake(i)?,
                        Event::Stop(p) => self.stop(p)?,
                        Event::Ask(p) => self.ask(p)?,
                    }
                }
                _ => {
                    self.now = self.sc.length.0;
                    self.check_waits()?;
                    self.finish();
                    return Ok(());
                }
            }
        }
        Err(self.fail(Violation::NoProgress))
    }

    fn wake(&mut self, i: usize) -> Result<(), Failure> {
        let id = self.vcpus[i].id;
        self.vcpus[i].wake_at = None;
        self.vcpus[i].waiting_since = Some(self.now);
        let b = self.vcpus[i].behaviour;
        self.vcpus[i].burst = self.new_burst(&b);
        self.table
            .wake(id)
            .map_err(|e| self.fail(Violation::Refused("Wake", e)))?;
        let reply = self.send(SchedRequest::Wake { vcpu: id });
        self.event_reply("Wake", reply)
    }

    /// Accounts a run's CPU time up to now.
    fn account(&mut self, p: usize, run: &Run) -> u64 {
        let ran = self.now - run.started;
        let in_window = self.now - run.started.max(self.warmup).min(self.now);
        let v = &mut self.vcpus[run.vcpu];
        v.cpu += ran;
        v.window += in_window;
        v.burst = v.burst.saturating_sub(ran);
        self.pcpus[p].busy += ran;
        ran
    }

    fn stop(&mut self, p: usize) -> Result<(), Failure> {
        let Some(run) = self.pcpus[p].run.take() else {
            return Ok(());
        };
        let ran = self.account(p, &run);
        let v = &self.vcpus[run.vcpu];
        let (id, behaviour) = (v.id, v.behaviour);
        let burst_done = v.burst == 0;
        let why = match behaviour {
            Behaviour::Periodic { .. } | Behaviour::Finite { .. } if burst_done => {
                StopReason::Blocked
            }
            Behaviour::Yielder { .. } if burst_done => StopReason::Yielded,
            _ if run.preempted => StopReason::Preempted,
            _ => StopReason::SliceExpired,
        };
        let pcpu = PcpuId(p as u32);
        let state = self
            .table
            .stop(id, pcpu, why)
            .map_err(|e| self.fail(Violation::Refused("Stopped", e)))?;
        let reply = self.send(SchedRequest::Stopped {
            vcpu: id,
            pcpu,
            ran: Micros(ran),
            why,
        });
        self.event_reply("Stopped", reply)?;
        self.pcpus[p].ask_at = Some(self.now);
        match (behaviour, state) {
            (Behaviour::Finite { .. }, VcpuState::Blocked) => {
                self.table
                    .remove(id)
                    .map_err(|e| self.fail(Violation::Refused("DestroyVcpu", e)))?;
                self.vcpus[run.vcpu].alive = false;
                let reply = self.send(SchedRequest::DestroyVcpu { vcpu: id });
                self.event_reply("DestroyVcpu", reply)
            }
            (Behaviour::Periodic { sleep, .. }, VcpuState::Blocked) => {
                let t = self.now + self.rng.jitter(sleep);
                self.vcpus[run.vcpu].wake_at = Some(t);
                Ok(())
            }
            _ => {
                if burst_done {
                    self.vcpus[run.vcpu].burst = self.new_burst(&behaviour);
                }
                self.vcpus[run.vcpu].waiting_since = Some(self.now);
                Ok(())
            }
        }
    }

    fn ask(&mut self, p: usize) -> Result<(), Failure> {
        self.pcpus[p].ask_at = None;
        let pcpu = PcpuId(p as u32);
        let reply = self.send(SchedRequest::PickNext { pcpu });
        let decision = self.table.decide(pcpu, &reply).map_err(|e| {
            let violation = match (reply, e) {
                (SchedReply::Run { .. }, SchedError::VcpuRunning { vcpu, pcpu: on }) => {
                    Violation::TwoPcpus {
                        vcpu,
                        running_on: on,
                        asked_by: pcpu,
                    }
                }
                (SchedReply::Run { .. }, SchedError::VcpuBlocked(vcpu)) => {
                    Violation::RanBlocked { vcpu, pcpu }
                }
                (SchedReply::Run { .. }, SchedError::UnknownVcpu(vcpu)) => {
                    Violation::UnknownVcpu(vcpu)
                }
                (SchedReply::Run { .. }, SchedError::BadSlice(s)) => Violation::BadSlice(s),
                (SchedReply::Error { .. }, e) => Violation::Refused("PickNext", e),
                (other, _) => Violation::UnexpectedReply("PickNext", other),
            };
            self.fail(violation)
        })?;
        let (vcpu, slice, migrated) = match decision {
            Decision::Idle => {
                self.pcpus[p].ask_at = Some(self.now + TICK.0);
                return Ok(());
            }
            Decision::Run {
                vcpu,
                slice,
                migrated,
            } => (vcpu, slice, migrated),
        };
        // The table accepted it, so the vCPU is one of ours.
        let i = self.vcpus.iter().position(|v| v.id == vcpu).unwrap_or(0);
        let v = &mut self.vcpus[i];
        if self.guarantees.pinned && v.hint != pcpu {
            let hint = v.hint;
            return Err(self.fail(Violation::Migrated { vcpu, hint, pcpu }));
        }
        let wait = self.now - v.waiting_since.take().unwrap_or(self.now);
        v.max_wait = v.max_wait.max(wait);
        v.runs += 1;
        v.migrations += migrated as u64;
        self.max_slice = self.max_slice.max(slice.0);
        let end = self.now + slice.0.min(v.burst);
        self.pcpus[p].run = Some(Run {
            vcpu: i,
            started: self.now,
            end,
            preempted: false,
        });
        Ok(())
    }

    /// Accounts the runs still going at the end.
    fn finish(&mut self) {
        for p in 0..self.pcpus.len() {
            if let Some(run) = self.pcpus[p].run.take() {
                self.account(p, &run);
            }
        }
    }

    /// Busy time per pCPU.
    pub fn busy(&self) -> Vec<Micros> {
        self.pcpus.iter().map(|p| Micros(p.busy)).collect()
    }

    /// The failure to report at the end of the run (after [`Machine::run`]).
    pub fn failure(&self, violation: Violation) -> Failure {
        self.fail(violation)
    }
}
