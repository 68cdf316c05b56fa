//! The suite proves it can fail: deliberately broken policies (wrappers
//! around registered ones, through the `SchedServer` trait, existing only
//! here) must each be caught with the right violation, and the unbroken
//! wrapper must pass.

use abi::sched::{Guarantees, Micros, SchedReply, SchedServer, StopReason};
use abi::{DomainId, PcpuId, VcpuId};
use sched::conformance::{run_scenario, run_suite, scenarios, Failure, Scenario, Violation};
use sched::registry::create;
use std::collections::BTreeMap;
use std::sync::Mutex;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    /// No bug: the wrapper must pass.
    None,
    /// Never runs vCPU 1: puts it back each time the policy picks it.
    Starve,
    /// Runs a vCPU that stopped blocked (and was not woken) when it can.
    RunBlocked,
    /// Runs a vCPU that is running on another pCPU when it can.
    TwoPcpus,
    /// Runs vCPU 1 for full slices and every other for a quarter.
    Unfair,
    /// Claims weights it does not honour (global-rr says "weighted").
    ClaimsWeights,
    /// Claims pinning it does not honour (global-rr says "pinned").
    ClaimsPinning,
    /// Hands out a slice over `MAX_SLICE`.
    LongSlice,
}

#[derive(Default)]
struct Seen {
    /// vCPUs that stopped blocked and have not been woken since.
    blocked: Vec<VcpuId>,
    /// What each pCPU runs, as far as the wrapper's own decisions go.
    running: BTreeMap<u32, VcpuId>,
}

struct Broken {
    inner: Box<dyn SchedServer>,
    bug: Bug,
    seen: Mutex<Seen>,
}

impl Broken {
    fn new(policy: &str, bug: Bug) -> Self {
        Broken {
            inner: create(policy).expect("registered"),
            bug,
            seen: Mutex::new(Seen::default()),
        }
    }
}

impl SchedServer for Broken {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn guarantees(&self) -> Guarantees {
        let g = self.inner.guarantees();
        match self.bug {
            Bug::ClaimsWeights => Guarantees {
                weighted: true,
                ..g
            },
            Bug::ClaimsPinning => Guarantees { pinned: true, ..g },
            _ => g,
        }
    }
    fn create_vcpu(&self, vcpu: VcpuId, d: DomainId, weight: u32, hint: PcpuId) -> SchedReply {
        self.inner.create_vcpu(vcpu, d, weight, hint)
    }
    fn destroy_vcpu(&self, vcpu: VcpuId) -> SchedReply {
        self.inner.destroy_vcpu(vcpu)
    }
    fn wake(&self, vcpu: VcpuId) -> SchedReply {
        self.seen.lock().unwrap().blocked.retain(|&v| v != vcpu);
        self.inner.wake(vcpu)
    }
    fn stopped(&self, vcpu: VcpuId, pcpu: PcpuId, ran: Micros, why: StopReason) -> SchedReply {
        let mut seen = self.seen.lock().unwrap();
        seen.running.remove(&pcpu.0);
        if why == StopReason::Blocked {
            seen.blocked.push(vcpu);
        }
        self.inner.stopped(vcpu, pcpu, ran, why)
    }
    fn pick_next(&self, pcpu: PcpuId) -> SchedReply {
        let mut seen = self.seen.lock().unwrap();
        let forged = match self.bug {
            Bug::RunBlocked => seen.blocked.first().copied(),
            Bug::TwoPcpus => seen.running.values().next().copied(),
            _ => None,
        };
        if let Some(vcpu) = forged {
            return SchedReply::Run {
                vcpu,
                slice: Micros(1000),
            };
        }
        let mut reply = self.inner.pick_next(pcpu);
        if self.bug == Bug::Starve {
            // Put the victim back (it "ran" for nothing) and pick again.
            for _ in 0..4 {
                match reply {
                    SchedReply::Run { vcpu, .. } if vcpu == VcpuId(1) => {
                        self.inner
                            .stopped(vcpu, pcpu, Micros(0), StopReason::Yielded);
                        reply = self.inner.pick_next(pcpu);
                    }
                    _ => break,
                }
            }
            if matches!(
                reply,
                SchedReply::Run {
                    vcpu: VcpuId(1),
                    ..
                }
            ) {
                self.inner
                    .stopped(VcpuId(1), pcpu, Micros(0), StopReason::Yielded);
                reply = SchedReply::Idle;
            }
        }
        if let SchedReply::Run { vcpu, slice } = &mut reply {
            match self.bug {
                Bug::Unfair if *vcpu != VcpuId(1) => slice.0 = (slice.0 / 4).max(1),
                Bug::LongSlice => slice.0 = 200_000,
                _ => {}
            }
            seen.running.insert(pcpu.0, *vcpu);
        }
        reply
    }
}

fn scenario(name: &str) -> Scenario {
    scenarios()
        .into_iter()
        .find(|s| s.name == name)
        .expect("scenario exists")
}

fn caught(policy: &str, bug: Bug, scenario_name: &str) -> Failure {
    let sc = scenario(scenario_name);
    match run_scenario(&sc, &Broken::new(policy, bug)) {
        Ok(_) => panic!("{bug:?} over {policy} passed {scenario_name}"),
        Err(f) => {
            println!("{bug:?} over {policy}: {f}");
            f
        }
    }
}

#[test]
fn the_unbroken_wrapper_passes_every_scenario() {
    for policy in ["pinned", "global-rr", "credit"] {
        let results = run_suite(&|| Box::new(Broken::new(policy, Bug::None)));
        for r in results {
            assert!(r.is_ok(), "{policy}: {}", r.unwrap_err());
        }
    }
}

#[test]
fn a_policy_that_starves_a_vcpu_is_caught() {
    for policy in ["pinned", "global-rr", "credit"] {
        let f = caught(policy, Bug::Starve, "cpu-bound-3x");
        assert!(
            matches!(f.violation, Violation::Starved { vcpu: VcpuId(1), waited, bound } if waited > bound),
            "{policy}: {f}"
        );
    }
}

#[test]
fn a_policy_that_runs_a_blocked_vcpu_is_caught() {
    for policy in ["pinned", "global-rr", "credit"] {
        let f = caught(policy, Bug::RunBlocked, "halting-4x");
        assert!(
            matches!(f.violation, Violation::RanBlocked { .. }),
            "{policy}: {f}"
        );
    }
}

#[test]
fn a_policy_that_runs_a_vcpu_on_two_pcpus_is_caught() {
    for policy in ["pinned", "global-rr", "credit"] {
        let f = caught(policy, Bug::TwoPcpus, "cpu-bound-3x");
        assert!(
            matches!(f.violation, Violation::TwoPcpus { running_on, asked_by, .. } if running_on != asked_by),
            "{policy}: {f}"
        );
    }
}

#[test]
fn unequal_shares_for_equal_weights_are_caught() {
    let f = caught("global-rr", Bug::Unfair, "cpu-bound-3x");
    match f.violation {
        Violation::Unfair { jain, vcpus } => {
            assert_eq!(vcpus, 12);
            assert!(jain < sched::conformance::MIN_JAIN);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn claims_a_policy_does_not_keep_are_caught() {
    let f = caught("global-rr", Bug::ClaimsWeights, "weighted-4x");
    assert!(
        matches!(f.violation, Violation::SharesOff { share, .. } if share.deviation() > sched::conformance::SHARE_TOLERANCE),
        "{f}"
    );
    // Migrations show up once vCPUs outnumber pCPUs unevenly.
    let f = caught("global-rr", Bug::ClaimsPinning, "mixed-3x");
    assert!(
        matches!(f.violation, Violation::Migrated { hint, pcpu, .. } if hint != pcpu),
        "{f}"
    );
    let f = caught("credit", Bug::LongSlice, "one-pcpu");
    assert_eq!(f.violation, Violation::BadSlice(Micros(200_000)));
}
