//! Runs the scheduler conformance suite against every registered policy (or
//! the one named with `--policy NAME`) and prints one line per scenario, then
//! `<name>: N passed, M failed` per policy. Exits 1 if anything failed.

use sched::conformance::{run_suite, scenarios, Report};
use sched::registry::{create, NAMES};
use std::process::ExitCode;

fn line(policy: &str, r: &Report) -> String {
    let cpu: u64 = r.vcpus.iter().map(|v| v.cpu.0).sum();
    let wait = r.vcpus.iter().map(|v| v.max_wait).max().unwrap_or_default();
    let opt = |p: Option<abi::sched::Ppm>| p.map_or("-".to_string(), |p| p.to_string());
    format!(
        "{policy}: {:28} ok: migrations {:6}, vCPU time {}, longest wait {wait} (bound {}), Jain {}, worst share deviation {}",
        r.scenario,
        r.migrations,
        abi::Micros(cpu),
        r.wait_bound,
        opt(r.jain),
        opt(r.worst_share),
    )
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only = match args.as_slice() {
        [] => None,
        [flag, name] if flag == "--policy" => Some(name.as_str()),
        _ => {
            eprintln!("usage: sched-conformance [--policy NAME]   (known: {NAMES:?})");
            return ExitCode::from(2);
        }
    };
    let names: Vec<&str> = NAMES
        .iter()
        .copied()
        .filter(|n| only.is_none_or(|o| o == *n))
        .collect();
    if names.is_empty() {
        eprintln!("no scheduler policy named {only:?}; known: {NAMES:?}");
        return ExitCode::from(2);
    }
    let mut any_failed = false;
    let mut totals = Vec::new();
    for name in names {
        let results = run_suite(&|| create(name).expect("registered"));
        let (mut passed, mut failed) = (0, 0);
        for (sc, r) in scenarios().iter().zip(&results) {
            match r {
                Ok(rep) => {
                    passed += 1;
                    println!("{}", line(name, rep));
                }
                Err(f) => {
                    failed += 1;
                    println!("{name}: {:28} FAILED: {f}", sc.name);
                }
            }
        }
        any_failed |= failed > 0;
        totals.push(format!("{name}: {passed} passed, {failed} failed"));
    }
    for t in totals {
        println!("{t}");
    }
    if any_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
