//! What the suite concludes from a run: the violations it reports, the
//! fairness and share checks at the end, and the per-scenario report.

use super::machine::Machine;
use super::scenarios::Scenario;
use abi::sched::{jain_by_key, weighted_shares, Micros, Ppm, SchedError, SchedReply, Share};
use abi::{PcpuId, VcpuId};
use alloc::vec::Vec;
use core::fmt;

/// Weighted shares must be within this of what the weights call for
/// (relative: 5%).
pub const SHARE_TOLERANCE: Ppm = Ppm(50_000);

/// Jain's index over vCPUs of equal weight (and, for a pinned policy, the
/// same pCPU) that stay runnable must be at least this.
pub const MIN_JAIN: Ppm = Ppm(990_000);

/// What a policy did wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Violation {
    /// `Hello` was not answered `Welcome` (the reply).
    Handshake(SchedReply),
    /// A valid event (named) was refused with this error.
    Refused(&'static str, SchedError),
    /// A reply of the wrong kind to the named request.
    UnexpectedReply(&'static str, SchedReply),
    /// A decision to run a vCPU that is running on another pCPU.
    TwoPcpus {
        /// The vCPU.
        vcpu: VcpuId,
        /// Where it runs.
        running_on: PcpuId,
        /// The pCPU told to run it too.
        asked_by: PcpuId,
    },
    /// A decision to run a blocked vCPU.
    RanBlocked {
        /// The vCPU.
        vcpu: VcpuId,
        /// The pCPU told to run it.
        pcpu: PcpuId,
    },
    /// A decision naming a vCPU that does not exist.
    UnknownVcpu(VcpuId),
    /// A decision with a slice of zero or over `MAX_SLICE`.
    BadSlice(Micros),
    /// A policy that claims to pin ran a vCPU away from its hint.
    Migrated {
        /// The vCPU.
        vcpu: VcpuId,
        /// Its hint.
        hint: PcpuId,
        /// Where it was run.
        pcpu: PcpuId,
    },
    /// A runnable vCPU waited longer than the stated bound.
    Starved {
        /// The vCPU.
        vcpu: VcpuId,
        /// How long it had waited.
        waited: Micros,
        /// The bound.
        bound: Micros,
    },
    /// A policy that claims weights gave a vCPU a share off by more than
    /// [`SHARE_TOLERANCE`].
    SharesOff {
        /// The vCPU.
        vcpu: VcpuId,
        /// What its weight calls for and what it got.
        share: Share,
    },
    /// Equal-weight vCPUs got unequal time: Jain's index under [`MIN_JAIN`].
    Unfair {
        /// The index.
        jain: Ppm,
        /// The vCPUs of the group.
        vcpus: u32,
    },
    /// The run did not reach its end within the event budget.
    NoProgress,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Violation::Handshake(r) => write!(f, "Hello answered {r:?}"),
            Violation::Refused(what, e) => write!(f, "{what} refused: {e}"),
            Violation::UnexpectedReply(what, r) => write!(f, "{what} answered {r:?}"),
            Violation::TwoPcpus {
                vcpu,
                running_on,
                asked_by,
            } => write!(
                f,
                "vCPU {} told to run on pCPU {} while running on pCPU {}",
                vcpu.0, asked_by.0, running_on.0
            ),
            Violation::RanBlocked { vcpu, pcpu } => {
                write!(f, "blocked vCPU {} told to run on pCPU {}", vcpu.0, pcpu.0)
            }
            Violation::UnknownVcpu(v) => write!(f, "told to run unknown vCPU {}", v.0),
            Violation::BadSlice(s) => write!(f, "slice {s} handed out"),
            Violation::Migrated { vcpu, hint, pcpu } => write!(
                f,
                "policy claims pinning but ran vCPU {} (hint {}) on pCPU {}",
                vcpu.0, hint.0, pcpu.0
            ),
            Violation::Starved {
                vcpu,
                waited,
                bound,
            } => write!(
                f,
                "runnable vCPU {} waited {waited} (bound {bound})",
                vcpu.0
            ),
            Violation::SharesOff { vcpu, share } => write!(
                f,
                "vCPU {} got {} of the CPU time, its weight calls for {} (off by {}, tolerance {})",
                vcpu.0,
                share.achieved,
                share.expected,
                share.deviation(),
                SHARE_TOLERANCE
            ),
            Violation::Unfair { jain, vcpus } => write!(
                f,
                "Jain's index {jain} over {vcpus} equal-weight vCPUs (at least {MIN_JAIN} wanted)"
            ),
            Violation::NoProgress => write!(f, "no progress within the event budget"),
        }
    }
}

/// A violation, where and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Failure {
    /// The scenario.
    pub scenario: &'static str,
    /// Simulated time.
    pub at: Micros,
    /// What went wrong.
    pub violation: Violation,
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}: {}", self.scenario, self.at, self.violation)
    }
}

/// One vCPU's numbers from a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuReport {
    /// The vCPU.
    pub vcpu: VcpuId,
    /// Its weight.
    pub weight: u32,
    /// CPU time over the run.
    pub cpu: Micros,
    /// Runs given.
    pub runs: u64,
    /// Runs on another pCPU than the one before.
    pub migrations: u64,
    /// The longest wait while runnable.
    pub max_wait: Micros,
}

/// What a passing run measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// The scenario.
    pub scenario: &'static str,
    /// Per vCPU.
    pub vcpus: Vec<VcpuReport>,
    /// Busy time per pCPU.
    pub busy: Vec<Micros>,
    /// Migrations in all.
    pub migrations: u64,
    /// The bound on waits at the end of the run.
    pub wait_bound: Micros,
    /// The lowest Jain's index over the equal-weight groups checked.
    pub jain: Option<Ppm>,
    /// The largest share deviation checked (weighted policies).
    pub worst_share: Option<Ppm>,
}

/// Runs `sc` against `server` and judges it: every decision as it is made
/// (two pCPUs, blocked, unknown, slice, pinning, waits), then, when every
/// vCPU is CPU bound, the fairness of equal weights and (for a policy that
/// claims weights) the shares over the window after a 10% warm-up.
pub fn run_scenario(sc: &Scenario, server: &dyn abi::SchedServer) -> Result<Report, Failure> {
    let mut m = Machine::new(sc, server)?;
    m.run()?;
    let mut jain = None;
    let mut worst_share = None;
    if sc.all_cpu_bound() {
        // Equal weights must get equal time (on the same pCPU, for a
        // policy that pins).
        let pinned = m.guarantees.pinned;
        let keys: Vec<u64> = m
            .vcpus
            .iter()
            .map(|v| (v.weight as u64) << 32 | if pinned { v.hint.0 as u64 } else { 0 })
            .collect();
        let times: Vec<u64> = m.vcpus.iter().map(|v| v.window).collect();
        if let Some((j, vcpus)) = jain_by_key(&keys, &times) {
            if j < MIN_JAIN {
                return Err(m.failure(Violation::Unfair {
                    jain: j,
                    vcpus: vcpus as u32,
                }));
            }
            jain = Some(j);
        }
        if m.guarantees.weighted {
            let weights: Vec<u32> = m.vcpus.iter().map(|v| v.weight).collect();
            let mut shares = alloc::vec![Share::default(); weights.len()];
            weighted_shares(&weights, &times, sc.pcpus, &mut shares);
            for (v, share) in m.vcpus.iter().zip(&shares) {
                let d = share.deviation();
                if d > SHARE_TOLERANCE {
                    return Err(m.failure(Violation::SharesOff {
                        vcpu: v.id,
                        share: *share,
                    }));
                }
                worst_share = Some(worst_share.map_or(d, |x: Ppm| x.max(d)));
            }
        }
    }
    Ok(Report {
        scenario: sc.name,
        vcpus: m
            .vcpus
            .iter()
            .map(|v| VcpuReport {
                vcpu: v.id,
                weight: v.weight,
                cpu: Micros(v.cpu),
                runs: v.runs,
                migrations: v.migrations,
                max_wait: Micros(v.max_wait),
            })
            .collect(),
        busy: m.busy(),
        migrations: m.vcpus.iter().map(|v| v.migrations).sum(),
        wait_bound: Micros(m.bound),
        jain,
        worst_share,
    })
}
