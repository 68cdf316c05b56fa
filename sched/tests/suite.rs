//! Every registered policy passes every scenario of the conformance suite.

use sched::conformance::{run_suite, scenarios};
use sched::registry::{create, NAMES};

#[test]
fn every_registered_policy_passes_the_suite() {
    let mut failed = Vec::new();
    for &name in NAMES {
        let results = run_suite(&|| create(name).expect("registered"));
        for (sc, r) in scenarios().iter().zip(&results) {
            match r {
                Ok(rep) => println!(
                    "{name:10} {:28} migrations {:6} jain {:?} worst share {:?} max wait {} (bound {})",
                    sc.name,
                    rep.migrations,
                    rep.jain.map(|j| j.to_string()),
                    rep.worst_share.map(|j| j.to_string()),
                    rep.vcpus.iter().map(|v| v.max_wait).max().unwrap_or_default(),
                    rep.wait_bound,
                ),
                Err(f) => {
                    println!("{name:10} FAIL {f}");
                    failed.push(format!("{name}: {f}"));
                }
            }
        }
    }
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn every_registered_policy_passes_random_machines() {
    use sched::conformance::{random_scenario, run_scenario};
    let mut shapes = std::collections::BTreeSet::new();
    for seed in 1..=40u64 {
        let sc = random_scenario(seed);
        assert!(sc.vcpus.len() >= 3 * sc.pcpus as usize);
        shapes.insert((sc.pcpus, sc.vcpus.len()));
        for &name in NAMES {
            let server = create(name).expect("registered");
            if let Err(f) = run_scenario(&sc, &*server) {
                panic!("{name}, seed {seed}: {f}");
            }
        }
    }
    assert!(
        shapes.len() >= 8,
        "the seeds cover few machine shapes: {shapes:?}"
    );
}
