//! The vCPU state table both sides keep, and the decision check the kernel
//! applies to every answer of the scheduler.
//!
//! One state machine (runnable, running on a pCPU, blocked; see the
//! [`crate::sched`] module docs), written once: a server keeps its view of the
//! vCPUs in a [`VcpuTable`] with its own per-vCPU data, and the kernel keeps
//! the truth in another and refuses, through [`VcpuTable::decide`], any
//! decision that would run an unknown vCPU, a blocked one, or one already
//! running (here or elsewhere), or that names a bad slice. Pure: no locks,
//! no clock; the caller serialises access (the kernel holds one lock across
//! `decide`, so two pCPUs can never both start the same vCPU).

use super::{Micros, SchedError, SchedReply, SchedRequest, StopReason, MAX_SLICE};
use crate::ids::{PcpuId, VcpuId};

/// Where a vCPU is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VcpuState {
    /// Can run, is not running.
    Runnable,
    /// Running on this pCPU.
    Running(PcpuId),
    /// Halted; waits for [`super::SchedRequest::Wake`].
    Blocked,
}

/// One vCPU in a [`VcpuTable`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry<T> {
    /// The vCPU.
    pub vcpu: VcpuId,
    /// Its state.
    pub state: VcpuState,
    /// A `Wake` arrived while it ran: its next `Blocked` stop leaves it
    /// runnable.
    pub wake_pending: bool,
    /// The pCPU it last ran on (`None` before its first run).
    pub last_pcpu: Option<PcpuId>,
    /// The owner's data (a policy's weight and credit; `()` in the kernel).
    pub data: T,
}

/// What the kernel does with an accepted answer to `PickNext`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run `vcpu` for at most `slice`; `migrated` when its previous run was
    /// on another pCPU (the MMU server must hear `VcpuScheduled`).
    Run {
        /// The vCPU, now marked running on the pCPU.
        vcpu: VcpuId,
        /// The slice.
        slice: Micros,
        /// Its last run was on another pCPU.
        migrated: bool,
    },
    /// Run nothing.
    Idle,
}

/// At most `N` vCPUs with their state and the owner's data `T`, looked up by
/// a linear scan (tables are small; no allocation).
#[derive(Clone, Debug)]
pub struct VcpuTable<T, const N: usize> {
    entries: heapless::Vec<Entry<T>, N>,
}

impl<T, const N: usize> Default for VcpuTable<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> VcpuTable<T, N> {
    /// An empty table.
    pub const fn new() -> Self {
        VcpuTable {
            entries: heapless::Vec::new(),
        }
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The vCPU's entry.
    pub fn get(&self, vcpu: VcpuId) -> Option<&Entry<T>> {
        self.entries.iter().find(|e| e.vcpu == vcpu)
    }

    /// The vCPU's entry, mutable.
    pub fn get_mut(&mut self, vcpu: VcpuId) -> Option<&mut Entry<T>> {
        self.entries.iter_mut().find(|e| e.vcpu == vcpu)
    }

    /// The vCPU's entry, or [`SchedError::UnknownVcpu`].
    pub fn entry(&self, vcpu: VcpuId) -> Result<&Entry<T>, SchedError> {
        self.get(vcpu).ok_or(SchedError::UnknownVcpu(vcpu))
    }

    /// Every vCPU, in creation order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry<T>> {
        self.entries.iter()
    }

    /// Every vCPU, mutable, in creation order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Entry<T>> {
        self.entries.iter_mut()
    }

    /// The vCPU running on `pcpu`, if any.
    pub fn running_on(&self, pcpu: PcpuId) -> Option<VcpuId> {
        self.entries
            .iter()
            .find(|e| e.state == VcpuState::Running(pcpu))
            .map(|e| e.vcpu)
    }

    /// Adds a runnable vCPU. Refuses a duplicate ([`SchedError::VcpuExists`])
    /// and a full table ([`SchedError::TooManyVcpus`]).
    pub fn insert(&mut self, vcpu: VcpuId, data: T) -> Result<(), SchedError> {
        if self.get(vcpu).is_some() {
            return Err(SchedError::VcpuExists(vcpu));
        }
        self.entries
            .push(Entry {
                vcpu,
                state: VcpuState::Runnable,
                wake_pending: false,
                last_pcpu: None,
                data,
            })
            .map_err(|_| SchedError::TooManyVcpus(N as u32))
    }

    /// Removes a vCPU that is not running and returns its data.
    pub fn remove(&mut self, vcpu: VcpuId) -> Result<T, SchedError> {
        let i = self
            .entries
            .iter()
            .position(|e| e.vcpu == vcpu)
            .ok_or(SchedError::UnknownVcpu(vcpu))?;
        if let VcpuState::Running(pcpu) = self.entries[i].state {
            return Err(SchedError::VcpuRunning { vcpu, pcpu });
        }
        Ok(self.entries.remove(i).data)
    }

    /// Records a `Wake`: returns whether the vCPU went from blocked to
    /// runnable (a running vCPU keeps the wake for its next `Blocked` stop;
    /// a runnable one is unchanged).
    pub fn wake(&mut self, vcpu: VcpuId) -> Result<bool, SchedError> {
        let e = self.get_mut(vcpu).ok_or(SchedError::UnknownVcpu(vcpu))?;
        Ok(match e.state {
            VcpuState::Blocked => {
                e.state = VcpuState::Runnable;
                true
            }
            VcpuState::Running(_) => {
                e.wake_pending = true;
                false
            }
            VcpuState::Runnable => false,
        })
    }

    /// Records a `Stopped` from `pcpu`: the vCPU must be running there
    /// ([`SchedError::NotRunningHere`] otherwise). Returns its new state.
    pub fn stop(
        &mut self,
        vcpu: VcpuId,
        pcpu: PcpuId,
        why: StopReason,
    ) -> Result<VcpuState, SchedError> {
        let e = self.get_mut(vcpu).ok_or(SchedError::UnknownVcpu(vcpu))?;
        if e.state != VcpuState::Running(pcpu) {
            return Err(SchedError::NotRunningHere { vcpu, pcpu });
        }
        e.state = if why.stays_runnable() || e.wake_pending {
            VcpuState::Runnable
        } else {
            VcpuState::Blocked
        };
        e.wake_pending = false;
        Ok(e.state)
    }

    /// Whether `pcpu` may ask for work now: a valid id running nothing
    /// ([`SchedError::InvalidPcpu`], [`SchedError::PcpuBusy`]).
    pub fn check_idle(&self, pcpu: PcpuId) -> Result<(), SchedError> {
        if !pcpu.is_valid() {
            return Err(SchedError::InvalidPcpu(pcpu));
        }
        match self.running_on(pcpu) {
            Some(vcpu) => Err(SchedError::PcpuBusy { pcpu, vcpu }),
            None => Ok(()),
        }
    }

    /// The decision check: may `pcpu` (running nothing) run `vcpu` for
    /// `slice`? Refuses an invalid or busy pCPU, an unknown vCPU, a running
    /// one (here or elsewhere: [`SchedError::VcpuRunning`] names where), a
    /// blocked one, and a slice of zero or over [`MAX_SLICE`]. Changes
    /// nothing.
    pub fn check(&self, pcpu: PcpuId, vcpu: VcpuId, slice: Micros) -> Result<(), SchedError> {
        self.check_idle(pcpu)?;
        match self.entry(vcpu)?.state {
            VcpuState::Running(on) => return Err(SchedError::VcpuRunning { vcpu, pcpu: on }),
            VcpuState::Blocked => return Err(SchedError::VcpuBlocked(vcpu)),
            VcpuState::Runnable => {}
        }
        if slice.0 == 0 || slice > MAX_SLICE {
            return Err(SchedError::BadSlice(slice));
        }
        Ok(())
    }

    /// [`check`](Self::check), then marks `vcpu` running on `pcpu`.
    /// Returns whether its previous run was on another pCPU.
    pub fn start(&mut self, pcpu: PcpuId, vcpu: VcpuId, slice: Micros) -> Result<bool, SchedError> {
        self.check(pcpu, vcpu, slice)?;
        let e = self.get_mut(vcpu).ok_or(SchedError::UnknownVcpu(vcpu))?;
        let migrated = e.last_pcpu.is_some_and(|p| p != pcpu);
        e.state = VcpuState::Running(pcpu);
        e.last_pcpu = Some(pcpu);
        Ok(migrated)
    }

    /// The kernel's one call on an answer to `PickNext` from `pcpu`: `Run`
    /// passes [`start`](Self::start) (and the vCPU is then marked running),
    /// `Idle` is idle, an `Error` gives its reason and any other reply
    /// [`SchedError::UnexpectedReply`]. On `Err` nothing changed: the kernel
    /// reports the reason and treats the answer as `Idle`.
    pub fn decide(&mut self, pcpu: PcpuId, reply: &SchedReply) -> Result<Decision, SchedError> {
        match *reply {
            SchedReply::Run { vcpu, slice } => {
                let migrated = self.start(pcpu, vcpu, slice)?;
                Ok(Decision::Run {
                    vcpu,
                    slice,
                    migrated,
                })
            }
            SchedReply::Idle => {
                self.check_idle(pcpu)?;
                Ok(Decision::Idle)
            }
            SchedReply::Error { reason } => Err(reason),
            other => Err(SchedError::UnexpectedReply(other.variant_index())),
        }
    }
}

impl<T, const N: usize> VcpuTable<T, N> {
    /// After [`decide`](Self::decide) refused a `Run` from `pcpu`: the
    /// message that hands the decision back, so the server does not go on
    /// believing the vCPU runs on `pcpu` (it would then refuse the pCPU's
    /// next `PickNext` as busy). `Stopped` with `ran` 0, `Blocked` if the
    /// kernel knows the vCPU blocked, else `Preempted`. The server may refuse
    /// it (it never marked the vCPU running there): the kernel ignores that
    /// answer. `None` for any other reply.
    pub fn undo(&self, pcpu: PcpuId, refused: &SchedReply) -> Option<SchedRequest> {
        let SchedReply::Run { vcpu, .. } = *refused else {
            return None;
        };
        let blocked = self
            .get(vcpu)
            .is_some_and(|e| e.state == VcpuState::Blocked);
        Some(SchedRequest::Stopped {
            vcpu,
            pcpu,
            ran: Micros::ZERO,
            why: if blocked {
                StopReason::Blocked
            } else {
                StopReason::Preempted
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::{Decision, VcpuState, VcpuTable};
    use crate::ids::{PcpuId, VcpuId};
    use crate::sched::{Micros, SchedError, SchedReply, SchedRequest, StopReason, MAX_SLICE};

    const P0: PcpuId = PcpuId(0);
    const P1: PcpuId = PcpuId(1);
    const V1: VcpuId = VcpuId(1);
    const V2: VcpuId = VcpuId(2);
    const MS: Micros = Micros(1000);

    fn table() -> VcpuTable<(), 4> {
        let mut t = VcpuTable::new();
        t.insert(V1, ()).unwrap();
        t.insert(V2, ()).unwrap();
        t
    }

    #[test]
    fn refuses_unknown_running_and_blocked_vcpus() {
        let mut t = table();
        assert_eq!(
            t.check(P0, VcpuId(9), MS),
            Err(SchedError::UnknownVcpu(VcpuId(9)))
        );
        assert_eq!(t.start(P0, V1, MS), Ok(false));
        // Running on P0: refused on P1 (naming P0) and on P0 (P0 is busy).
        assert_eq!(
            t.check(P1, V1, MS),
            Err(SchedError::VcpuRunning { vcpu: V1, pcpu: P0 })
        );
        assert_eq!(
            t.check(P0, V2, MS),
            Err(SchedError::PcpuBusy { pcpu: P0, vcpu: V1 })
        );
        assert_eq!(t.stop(V1, P0, StopReason::Blocked), Ok(VcpuState::Blocked));
        assert_eq!(t.check(P1, V1, MS), Err(SchedError::VcpuBlocked(V1)));
        assert_eq!(t.wake(V1), Ok(true));
        assert_eq!(t.start(P1, V1, MS), Ok(true), "P0 then P1 is a migration");
    }

    #[test]
    fn refuses_bad_slices_and_pcpus() {
        let t = table();
        assert_eq!(
            t.check(P0, V1, Micros(0)),
            Err(SchedError::BadSlice(Micros(0)))
        );
        let over = MAX_SLICE.plus(Micros(1));
        assert_eq!(t.check(P0, V1, over), Err(SchedError::BadSlice(over)));
        assert_eq!(t.check(P0, V1, MAX_SLICE), Ok(()));
        assert_eq!(
            t.check(PcpuId(64), V1, MS),
            Err(SchedError::InvalidPcpu(PcpuId(64)))
        );
    }

    #[test]
    fn decide_changes_nothing_on_refusal() {
        let mut t = table();
        let run = |vcpu, slice| SchedReply::Run { vcpu, slice };
        assert_eq!(
            t.decide(P0, &run(V1, MS)),
            Ok(Decision::Run {
                vcpu: V1,
                slice: MS,
                migrated: false
            })
        );
        let before = t.get(V1).copied();
        assert!(t.decide(P1, &run(V1, MS)).is_err());
        assert_eq!(t.get(V1).copied(), before);
        assert_eq!(t.get(V2).unwrap().state, VcpuState::Runnable);
        assert_eq!(t.decide(P1, &SchedReply::Idle), Ok(Decision::Idle));
        assert_eq!(
            t.decide(P0, &SchedReply::Idle),
            Err(SchedError::PcpuBusy { pcpu: P0, vcpu: V1 })
        );
        let e = SchedError::BadWeight(0);
        assert_eq!(t.decide(P1, &SchedReply::error(e)), Err(e));
        assert_eq!(
            t.decide(P1, &SchedReply::DONE),
            Err(SchedError::UnexpectedReply(1))
        );
    }

    #[test]
    fn a_wake_racing_a_halt_is_not_lost() {
        let mut t = table();
        t.start(P0, V1, MS).unwrap();
        assert_eq!(t.wake(V1), Ok(false));
        assert_eq!(t.stop(V1, P0, StopReason::Blocked), Ok(VcpuState::Runnable));
        // The pending wake is used up: the next halt blocks.
        t.start(P0, V1, MS).unwrap();
        assert_eq!(t.stop(V1, P0, StopReason::Blocked), Ok(VcpuState::Blocked));
        // Waking a runnable vCPU changes nothing.
        assert_eq!(t.wake(V2), Ok(false));
        assert_eq!(t.get(V2).unwrap().state, VcpuState::Runnable);
    }

    #[test]
    fn stop_insert_remove_errors_name_the_value() {
        let mut t = table();
        assert_eq!(
            t.stop(V1, P0, StopReason::Yielded),
            Err(SchedError::NotRunningHere { vcpu: V1, pcpu: P0 })
        );
        assert_eq!(t.insert(V1, ()), Err(SchedError::VcpuExists(V1)));
        t.insert(VcpuId(3), ()).unwrap();
        t.insert(VcpuId(4), ()).unwrap();
        assert_eq!(t.insert(VcpuId(5), ()), Err(SchedError::TooManyVcpus(4)));
        t.start(P1, V2, MS).unwrap();
        assert_eq!(
            t.remove(V2),
            Err(SchedError::VcpuRunning { vcpu: V2, pcpu: P1 })
        );
        assert_eq!(t.remove(V1), Ok(()));
        assert_eq!(t.remove(V1), Err(SchedError::UnknownVcpu(V1)));
        assert_eq!(t.wake(V1), Err(SchedError::UnknownVcpu(V1)));
        assert_eq!(t.len(), 3);
        assert_eq!(t.running_on(P1), Some(V2));
    }

    #[test]
    fn a_refused_run_is_handed_back_to_the_server() {
        let mut t = table();
        t.start(P0, V1, MS).unwrap();
        t.stop(V1, P0, StopReason::Blocked).unwrap();
        let stopped = |vcpu, why| {
            Some(SchedRequest::Stopped {
                vcpu,
                pcpu: P1,
                ran: Micros(0),
                why,
            })
        };
        let run = |vcpu| SchedReply::Run { vcpu, slice: MS };
        assert!(t.decide(P1, &run(V1)).is_err());
        assert_eq!(t.undo(P1, &run(V1)), stopped(V1, StopReason::Blocked));
        assert_eq!(t.undo(P1, &run(V2)), stopped(V2, StopReason::Preempted));
        assert_eq!(
            t.undo(P1, &run(VcpuId(9))),
            stopped(VcpuId(9), StopReason::Preempted)
        );
        assert_eq!(t.undo(P1, &SchedReply::Idle), None);
    }
}
