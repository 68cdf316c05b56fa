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
