//! The machinery every policy shares: the vCPU table (validation of every
//! event against the state machine of [`abi::sched`]), the set of idle
//! pCPUs, whom to kick, and the lock; a [`Policy`] only picks and charges.

use crate::Config;
use abi::sched::{
    Guarantees, Micros, SchedError, SchedReply, SchedServer, StopReason, VcpuState, VcpuTable,
    MAX_VCPUS, MAX_WEIGHT,
};
use abi::{CpuSet, DomainId, PcpuId, VcpuId};
use spin::Mutex;

/// What the server keeps per vCPU for its policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuInfo {
    /// Its domain.
    pub domain: DomainId,
    /// Its weight (`1..=MAX_WEIGHT`).
    pub weight: u32,
    /// The pCPU named at creation.
    pub hint: PcpuId,
    /// When it last became runnable, as a sequence number (FIFO order).
    pub queued: u64,
    /// The credit policy's balance (unused by the others).
    pub credit: i64,
}

/// The server's vCPU table.
pub type Table = VcpuTable<VcpuInfo, MAX_VCPUS>;

/// A scheduling policy: the part that differs between schedulers.
pub trait Policy: Send + 'static {
    /// The registry name.
    const NAME: &'static str;
    /// What it promises.
    const GUARANTEES: Guarantees;
    /// The runnable vCPU `pcpu` runs next and for how long (at most
    /// `config.slice()`), or `None` to leave it idle. Only runnable vCPUs
    /// may be named (the server refuses anything else as a policy bug).
    fn pick(
        &mut self,
        table: &mut Table,
        pcpu: PcpuId,
        config: &Config,
    ) -> Option<(VcpuId, Micros)>;
    /// Accounts `ran` of CPU time to a vCPU that just stopped.
    fn charge(&mut self, info: &mut VcpuInfo, ran: Micros) {
        let _ = (info, ran);
    }
    /// The only pCPU that may run this vCPU, if the policy pins it.
    fn home(&self, info: &VcpuInfo) -> Option<PcpuId> {
        let _ = info;
        None
    }
}

struct Inner<P> {
    table: Table,
    /// pCPUs whose last `PickNext` was answered `Idle`.
    idle: CpuSet,
    /// The next FIFO sequence number.
    seq: u64,
    policy: P,
}

/// A scheduler server running policy `P`.
pub struct Server<P: Policy> {
    config: Config,
    inner: Mutex<Inner<P>>,
}

impl<P: Policy> Server<P> {
    /// A server with no vCPUs.
    pub fn new(policy: P, config: Config) -> Self {
        Server {
            config,
            inner: Mutex::new(Inner {
                table: Table::new(),
                idle: CpuSet::EMPTY,
                seq: 0,
                policy,
            }),
        }
    }
}

impl<P: Policy> Inner<P> {
    /// `vcpu` just became runnable: queue it last and kick an idle pCPU
    /// that may run it.
    fn runnable(&mut self, vcpu: VcpuId) -> CpuSet {
        let seq = self.seq;
        self.seq += 1;
        let Some(e) = self.table.get_mut(vcpu) else {
            return CpuSet::EMPTY;
        };
        e.data.queued = seq;
        let target = match self.policy.home(&e.data) {
            Some(home) if self.idle.contains(home) => Some(home),
            Some(_) => None,
            None => self.idle.iter().next(),
        };
        match target {
            Some(p) => {
                self.idle.remove(p);
                CpuSet::single(p)
            }
            None => CpuSet::EMPTY,
        }
    }
}

fn reply(result: Result<CpuSet, SchedError>) -> SchedReply {
    match result {
        Ok(kick) => SchedReply::Done { kick },
        Err(reason) => SchedReply::error(reason),
    }
}

impl<P: Policy> SchedServer for Server<P> {
    fn name(&self) -> &'static str {
        P::NAME
    }

    fn guarantees(&self) -> Guarantees {
        P::GUARANTEES
    }

    fn create_vcpu(&self, vcpu: VcpuId, domain: DomainId, weight: u32, hint: PcpuId) -> SchedReply {
        if weight == 0 || weight > MAX_WEIGHT {
            return SchedReply::error(SchedError::BadWeight(weight));
        }
        if !hint.is_valid() {
            return SchedReply::error(SchedError::InvalidPcpu(hint));
        }
        let mut s = self.inner.lock();
        let info = VcpuInfo {
            domain,
            weight,
            hint,
            queued: 0,
            credit: 0,
        };
        reply(s.table.insert(vcpu, info).map(|()| s.runnable(vcpu)))
    }

    fn destroy_vcpu(&self, vcpu: VcpuId) -> SchedReply {
        reply(self.inner.lock().table.remove(vcpu).map(|_| CpuSet::EMPTY))
    }

    fn wake(&self, vcpu: VcpuId) -> SchedReply {
        let mut s = self.inner.lock();
        reply(s.table.wake(vcpu).map(|woke| {
            if woke {
                s.runnable(vcpu)
            } else {
                CpuSet::EMPTY
            }
        }))
    }

    fn stopped(&self, vcpu: VcpuId, pcpu: PcpuId, ran: Micros, why: StopReason) -> SchedReply {
        let mut s = self.inner.lock();
        let s = &mut *s;
        let state = match s.table.stop(vcpu, pcpu, why) {
            Ok(state) => state,
            Err(e) => return SchedReply::error(e),
        };
        if let Some(e) = s.table.get_mut(vcpu) {
            s.policy.charge(&mut e.data, ran);
        }
        reply(Ok(if state == VcpuState::Runnable {
            s.runnable(vcpu)
        } else {
            CpuSet::EMPTY
        }))
    }

    fn pick_next(&self, pcpu: PcpuId) -> SchedReply {
        let mut s = self.inner.lock();
        let s = &mut *s;
        if let Err(e) = s.table.check_idle(pcpu) {
            return SchedReply::error(e);
        }
        match s.policy.pick(&mut s.table, pcpu, &self.config) {
            Some((vcpu, slice)) => {
                // The policy's choice passes the kernel's own check here
                // first: a policy bug is an error reply, never a bad Run.
                if let Err(e) = s.table.start(pcpu, vcpu, slice) {
                    return SchedReply::error(e);
                }
                s.idle.remove(pcpu);
                SchedReply::Run { vcpu, slice }
            }
            None => {
                s.idle.insert(pcpu);
                SchedReply::Idle
            }
        }
    }
}

/// The runnable vCPU (among those `eligible` accepts) that became runnable
/// first: the head of a FIFO run queue, kept as sequence numbers in the
/// table instead of a separate queue.
pub fn oldest_runnable(table: &Table, eligible: impl Fn(&VcpuInfo) -> bool) -> Option<VcpuId> {
    table
        .iter()
        .filter(|e| e.state == VcpuState::Runnable && eligible(&e.data))
        .min_by_key(|e| e.data.queued)
        .map(|e| e.vcpu)
}
