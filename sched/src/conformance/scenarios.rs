//! The scripted machines the suite runs every policy on: how many pCPUs,
//! which vCPUs (weight, hint, behaviour) and for how long.

use abi::sched::{Micros, DEFAULT_WEIGHT};
use abi::{DomainId, PcpuId};
use alloc::vec::Vec;

/// How a simulated guest vCPU behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// Always runnable: uses every slice to the end.
    CpuBound,
    /// Runs about `run` of CPU time, halts (blocks) for about `sleep`, is
    /// woken, again and again (both jittered ±50% from the scenario's seed).
    Periodic {
        /// CPU time per burst.
        run: Micros,
        /// Time blocked between bursts.
        sleep: Micros,
    },
    /// Runs about `run` of CPU time, then yields (stays runnable).
    Yielder {
        /// CPU time per burst.
        run: Micros,
    },
    /// CPU bound until it has had `work` of CPU time, then ends: stopped as
    /// blocked and destroyed.
    Finite {
        /// Its total CPU time.
        work: Micros,
    },
}

/// One vCPU of a scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VcpuSpec {
    /// Its domain.
    pub domain: DomainId,
    /// Its weight.
    pub weight: u32,
    /// The pCPU hint it is created with.
    pub hint: PcpuId,
    /// What its guest does.
    pub behaviour: Behaviour,
}

/// One scripted machine.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name.
    pub name: &'static str,
    /// pCPUs of the machine.
    pub pcpus: u32,
    /// Its vCPUs (ids 1, 2, ... in this order).
    pub vcpus: Vec<VcpuSpec>,
    /// Simulated time to run.
    pub length: Micros,
    /// Seed of the behaviours' jitter.
    pub seed: u64,
}

impl Scenario {
    /// Whether every vCPU stays runnable for the whole run: then CPU shares
    /// are checked against the weights (if the policy claims them) and
    /// Jain's index over equal-weight vCPUs.
    pub fn all_cpu_bound(&self) -> bool {
        self.vcpus
            .iter()
            .all(|v| v.behaviour == Behaviour::CpuBound)
    }
}

/// `n` vCPUs with hints round robin over `pcpus`, one domain per `per_domain`
/// vCPUs, weights and behaviours from the index.
fn vcpus(
    n: u32,
    pcpus: u32,
    weight: impl Fn(u32) -> u32,
    behaviour: impl Fn(u32) -> Behaviour,
) -> Vec<VcpuSpec> {
    (0..n)
        .map(|i| VcpuSpec {
            domain: DomainId(1 + i / 4),
            weight: weight(i),
            hint: PcpuId(i % pcpus),
            behaviour: behaviour(i),
        })
        .collect()
}

const MS: u64 = 1_000;

/// Every scenario, in the order reports list them.
pub fn scenarios() -> Vec<Scenario> {
    let equal = |_| DEFAULT_WEIGHT;
    let cpu = |_| Behaviour::CpuBound;
    let mixed = |i: u32| match i % 3 {
        0 => Behaviour::CpuBound,
        1 => Behaviour::Periodic {
            run: Micros(300),
            sleep: Micros(2 * MS),
        },
        _ => Behaviour::Yielder { run: Micros(400) },
    };
    alloc::vec![
        Scenario {
            name: "cpu-bound-3x",
            pcpus: 4,
            vcpus: vcpus(12, 4, equal, cpu),
            length: Micros(2_000 * MS),
            seed: 1,
        },
        Scenario {
            name: "weighted-4x",
            pcpus: 4,
            vcpus: vcpus(16, 4, |i| DEFAULT_WEIGHT * (1 + i % 4), cpu),
            length: Micros(4_000 * MS),
            seed: 2,
        },
        Scenario {
            name: "weighted-3x-uneven",
            pcpus: 2,
            vcpus: vcpus(6, 2, |i| [128, 256, 256, 512, 640, 1024][i as usize], cpu),
            length: Micros(4_000 * MS),
            seed: 3,
        },
        Scenario {
            name: "one-vcpu-capped-at-one-pcpu",
            pcpus: 2,
            vcpus: vcpus(
                3,
                2,
                |i| if i == 2 {
                    8 * DEFAULT_WEIGHT
                } else {
                    DEFAULT_WEIGHT
                },
                cpu
            ),
            length: Micros(2_000 * MS),
            seed: 4,
        },
        Scenario {
            name: "mixed-3x",
            pcpus: 8,
            vcpus: vcpus(24, 8, |i| DEFAULT_WEIGHT * (1 + i % 2), mixed),
            length: Micros(1_000 * MS),
            seed: 5,
        },
        Scenario {
            name: "halting-4x",
            pcpus: 2,
            vcpus: vcpus(8, 2, equal, |i| Behaviour::Periodic {
                run: Micros(200 + 100 * i as u64),
                sleep: Micros(MS + 500 * i as u64),
            },),
            length: Micros(1_000 * MS),
            seed: 6,
        },
        Scenario {
            name: "vcpus-end",
            pcpus: 2,
            vcpus: vcpus(8, 2, equal, |i| match i % 2 {
                0 => Behaviour::Finite {
                    work: Micros((20 + 15 * i as u64) * MS),
                },
                _ => mixed(i),
            },),
            length: Micros(500 * MS),
            seed: 7,
        },
        Scenario {
            name: "fewer-vcpus-than-pcpus",
            pcpus: 8,
            vcpus: vcpus(3, 8, equal, mixed),
            length: Micros(300 * MS),
            seed: 8,
        },
        Scenario {
            name: "one-pcpu",
            pcpus: 1,
            vcpus: vcpus(4, 1, equal, mixed),
            length: Micros(300 * MS),
            seed: 9,
        },
    ]
}

/// A random machine from `seed`: 1 to 8 pCPUs, three to four times as many
/// vCPUs with random weights (1/2 to 4 times the default), hints and
/// behaviours, 300 ms long. The same seed gives the same scenario.
pub fn random_scenario(seed: u64) -> Scenario {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move |n: u64| {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    };
    let pcpus = 1 + next(8) as u32;
    let n = pcpus * (3 + next(2) as u32);
    let vcpus = (0..n)
        .map(|i| VcpuSpec {
            domain: DomainId(1 + i / 4),
            weight: DEFAULT_WEIGHT / 2 * (1 + next(8) as u32),
            hint: PcpuId(next(pcpus as u64) as u32),
            behaviour: match next(4) {
                0 => Behaviour::CpuBound,
                1 => Behaviour::Periodic {
                    run: Micros(50 + next(2 * MS)),
                    sleep: Micros(50 + next(5 * MS)),
                },
                2 => Behaviour::Yielder {
                    run: Micros(50 + next(2 * MS)),
                },
                _ => Behaviour::Finite {
                    work: Micros(1 + next(100 * MS)),
                },
            },
        })
        .collect();
    Scenario {
        name: "random",
        pcpus,
        vcpus,
        length: Micros(300 * MS),
        seed,
    }
}
