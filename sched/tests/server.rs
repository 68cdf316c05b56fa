//! The shared server machinery through the wire: every event is checked
//! against the vCPU state machine with errors naming the offending value,
//! kicks go to idle pCPUs that may run the vCPU, and the policies' orders.

use abi::sched::{
    dispatch, request, Guarantees, Micros, SchedError, SchedReply, SchedRequest, SchedServer,
    StopReason, DEFAULT_WEIGHT, MAX_SLICE, MAX_WEIGHT, PROTOCOL_VERSION,
};
use abi::{CpuSet, DomainId, PcpuId, VcpuId};
use sched::registry::{create, create_with, NAMES};
use sched::{Config, DEFAULT_SLICE};

struct Wire(Box<dyn SchedServer>);

impl Wire {
    fn new(name: &str) -> Wire {
        Wire(create(name).expect("registered"))
    }
    fn send(&self, req: SchedRequest) -> SchedReply {
        request(&req, |bytes, out| dispatch(&*self.0, bytes, out))
    }
    fn create(&self, vcpu: u32, weight: u32, hint: u32) -> SchedReply {
        self.send(SchedRequest::CreateVcpu {
            vcpu: VcpuId(vcpu),
            domain: DomainId(1),
            weight,
            hint: PcpuId(hint),
        })
    }
    fn pick(&self, pcpu: u32) -> SchedReply {
        self.send(SchedRequest::PickNext { pcpu: PcpuId(pcpu) })
    }
    fn stop(&self, vcpu: u32, pcpu: u32, why: StopReason) -> SchedReply {
        self.send(SchedRequest::Stopped {
            vcpu: VcpuId(vcpu),
            pcpu: PcpuId(pcpu),
            ran: Micros(1000),
            why,
        })
    }
    fn wake(&self, vcpu: u32) -> SchedReply {
        self.send(SchedRequest::Wake { vcpu: VcpuId(vcpu) })
    }
    fn runs(&self, pcpu: u32) -> Option<u32> {
        match self.pick(pcpu) {
            SchedReply::Run { vcpu, slice } => {
                assert!(slice.0 > 0 && slice <= MAX_SLICE);
                Some(vcpu.0)
            }
            SchedReply::Idle => None,
            other => panic!("PickNext answered {other:?}"),
        }
    }
}

fn err(reason: SchedError) -> SchedReply {
    SchedReply::error(reason)
}

fn kick(pcpus: &[u32]) -> SchedReply {
    SchedReply::Done {
        kick: pcpus.iter().map(|&p| PcpuId(p)).collect::<CpuSet>(),
    }
}

#[test]
fn every_policy_refuses_bad_events_naming_the_value() {
    for &name in NAMES {
        let w = Wire::new(name);
        assert!(matches!(
            w.send(SchedRequest::Hello {
                version: PROTOCOL_VERSION
            }),
            SchedReply::Welcome { .. }
        ));
        assert_eq!(w.create(1, 0, 0), err(SchedError::BadWeight(0)), "{name}");
        assert_eq!(
            w.create(1, MAX_WEIGHT + 1, 0),
            err(SchedError::BadWeight(MAX_WEIGHT + 1))
        );
        assert_eq!(
            w.create(1, 256, 64),
            err(SchedError::InvalidPcpu(PcpuId(64)))
        );
        assert!(matches!(
            w.create(1, DEFAULT_WEIGHT, 0),
            SchedReply::Done { .. }
        ));
        assert_eq!(w.create(1, 256, 0), err(SchedError::VcpuExists(VcpuId(1))));
        assert_eq!(w.wake(9), err(SchedError::UnknownVcpu(VcpuId(9))));
        assert_eq!(w.pick(64), err(SchedError::InvalidPcpu(PcpuId(64))));
        assert_eq!(w.runs(0), Some(1), "{name}");
        assert_eq!(
            w.pick(0),
            err(SchedError::PcpuBusy {
                pcpu: PcpuId(0),
                vcpu: VcpuId(1)
            })
        );
        assert_eq!(
            w.stop(1, 1, StopReason::Yielded),
            err(SchedError::NotRunningHere {
                vcpu: VcpuId(1),
                pcpu: PcpuId(1)
            })
        );
        assert_eq!(
            w.send(SchedRequest::DestroyVcpu { vcpu: VcpuId(1) }),
            err(SchedError::VcpuRunning {
                vcpu: VcpuId(1),
                pcpu: PcpuId(0)
            })
        );
        assert_eq!(w.stop(1, 0, StopReason::Blocked), SchedReply::DONE);
        // Blocked: never picked until woken.
        assert_eq!(w.runs(0), None, "{name}");
        assert_eq!(w.runs(1), None, "{name}");
        assert_eq!(
            w.send(SchedRequest::DestroyVcpu { vcpu: VcpuId(1) }),
            SchedReply::DONE
        );
        assert_eq!(w.wake(1), err(SchedError::UnknownVcpu(VcpuId(1))));
        assert_eq!(
            w.send(SchedRequest::Hello { version: 0 }),
            err(SchedError::VersionMismatch {
                requested: 0,
                supported: PROTOCOL_VERSION
            })
        );
    }
}

#[test]
fn a_wake_kicks_an_idle_pcpu_that_may_run_the_vcpu() {
    // pinned: only the hint pCPU, and only when it is idle.
    let w = Wire::new("pinned");
    assert_eq!(w.create(1, 256, 2), kick(&[]), "no pCPU has asked yet");
    assert_eq!(w.runs(2), Some(1));
    assert_eq!(w.runs(0), None);
    assert_eq!(w.stop(1, 2, StopReason::Blocked), kick(&[]));
    assert_eq!(w.runs(2), None);
    assert_eq!(
        w.wake(1),
        kick(&[2]),
        "pCPU 0 is idle too, but not its home"
    );
    // global-rr and credit: the lowest idle pCPU, each kicked once.
    for name in ["global-rr", "credit"] {
        let w = Wire::new(name);
        assert_eq!(w.runs(3), None);
        assert_eq!(w.runs(1), None);
        assert_eq!(w.create(1, 256, 0), kick(&[1]), "{name}");
        assert_eq!(w.create(2, 256, 0), kick(&[3]), "{name}");
        assert_eq!(w.create(3, 256, 0), kick(&[]), "{name}: nobody idle left");
    }
}

#[test]
fn a_wake_racing_a_halt_leaves_the_vcpu_runnable() {
    for &name in NAMES {
        let w = Wire::new(name);
        w.create(1, 256, 0);
        assert_eq!(w.runs(0), Some(1));
        assert_eq!(w.wake(1), SchedReply::DONE);
        w.stop(1, 0, StopReason::Blocked);
        assert_eq!(w.runs(0), Some(1), "{name}: the wake was not lost");
    }
}

#[test]
fn pinned_round_robins_its_pcpu_and_never_migrates() {
    let w = Wire::new("pinned");
    for v in 1..=4 {
        w.create(v, 256, v % 2);
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        let v = w.runs(0).unwrap();
        order.push(v);
        w.stop(v, 0, StopReason::SliceExpired);
    }
    assert_eq!(order, [2, 4, 2, 4]);
    // pCPU 1's vCPUs stay there: another idle pCPU does not take vCPU 3.
    assert_eq!(w.runs(1), Some(1));
    assert_eq!(
        w.pick(1),
        err(SchedError::PcpuBusy {
            pcpu: PcpuId(1),
            vcpu: VcpuId(1)
        })
    );
    assert_eq!(w.runs(2), None);
    assert_eq!(w.runs(0), Some(2));
}

#[test]
fn global_rr_is_one_fifo_queue_for_every_pcpu() {
    let w = Wire::new("global-rr");
    for v in 1..=3 {
        w.create(v, 256, 0);
    }
    assert_eq!(w.runs(5), Some(1));
    assert_eq!(w.runs(6), Some(2));
    w.stop(1, 5, StopReason::Yielded);
    assert_eq!(w.runs(5), Some(3));
    assert_eq!(w.runs(7), Some(1), "vCPU 1 migrates to pCPU 7");
}

#[test]
fn credit_runs_heavier_vcpus_longer_and_slices_stay_in_bounds() {
    let w = Wire(
        create_with(
            "credit",
            Config {
                slice: Micros(4000),
            },
        )
        .unwrap(),
    );
    w.create(1, 256, 0);
    w.create(2, 1024, 0);
    let mut ran = [0u64; 3];
    for _ in 0..400 {
        let SchedReply::Run { vcpu, slice } = w.pick(0) else {
            panic!("credit left a runnable vCPU waiting");
        };
        assert!(slice.0 >= 1000 && slice.0 <= 4000, "{slice}");
        ran[vcpu.0 as usize] += slice.0;
        w.send(SchedRequest::Stopped {
            vcpu,
            pcpu: PcpuId(0),
            ran: slice,
            why: StopReason::SliceExpired,
        });
    }
    // One pCPU, weights 1:4: vCPU 2 gets 80% within 5%.
    let share = ran[2] * 1000 / (ran[1] + ran[2]);
    assert!((760..=840).contains(&share), "vCPU 2 got {share} per mille");
    assert_eq!(
        w.0.guarantees(),
        Guarantees {
            weighted: true,
            pinned: false
        }
    );
}

#[test]
fn config_slices_are_clamped_to_what_the_kernel_accepts() {
    assert_eq!(Config::default().slice(), DEFAULT_SLICE);
    assert_eq!(Config { slice: Micros(0) }.slice(), Micros(1));
    assert_eq!(
        Config {
            slice: Micros(u64::MAX)
        }
        .slice(),
        MAX_SLICE
    );
    let w = Wire(create_with("global-rr", Config { slice: Micros(0) }).unwrap());
    w.create(1, 256, 0);
    assert_eq!(
        w.pick(0),
        SchedReply::Run {
            vcpu: VcpuId(1),
            slice: Micros(1)
        }
    );
}

#[test]
fn a_decision_the_kernel_refused_and_handed_back_frees_the_pcpu() {
    use abi::sched::VcpuTable;
    for &name in NAMES {
        let w = Wire::new(name);
        w.create(1, 256, 0);
        // The kernel's table does not know vCPU 1 (say, it lost it): the
        // decision is refused and handed back.
        let kernel: VcpuTable<(), 4> = VcpuTable::new();
        let reply = w.pick(0);
        assert_eq!(
            kernel.clone().decide(PcpuId(0), &reply),
            Err(SchedError::UnknownVcpu(VcpuId(1)))
        );
        let undo = kernel
            .undo(PcpuId(0), &reply)
            .expect("a Run is handed back");
        assert_eq!(w.send(undo), SchedReply::DONE, "{name}");
        // pCPU 0 is not stuck "busy": it gets vCPU 1 again.
        assert_eq!(w.runs(0), Some(1), "{name}");
    }
}
