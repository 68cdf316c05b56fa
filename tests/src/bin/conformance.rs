//! Host runner: the conformance suite against every registered MMU server.
//!
//! Prints one line `<name>: N passed, M failed` per implementation (after
//! the failures' details), then the grant suite's lines:
//! `<mmu>/foreign: ...` per MMU server (its foreign-frame requests) and
//! `grant/<name>: ...` per grant server (over every MMU server). Options: `--impl NAME` (only that one),
//! `--seeds N` and `--steps S` (random sequences: N seeds of S steps),
//! `--seed X` (one seed, for reproducing), `--only NAME` (one scenario).
//! Exit status 1 if anything failed.

use conformance::{run_random, run_scenario, scenarios, Ram, Registered, RAM_FRAMES};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

/// Host-physical address of the simulated memory block (far from guest
/// physical addresses, so confusing the two is caught).
const RAM_BASE: u64 = 0x10_0000_0000;

struct Opts {
    only_impl: Option<String>,
    only_scenario: Option<String>,
    seeds: Vec<u64>,
    steps: u64,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        only_impl: None,
        only_scenario: None,
        seeds: Vec::new(),
        steps: 4000,
    };
    let mut nseeds = 24u64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |what: &str| args.next().ok_or(format!("{a} needs {what}"));
        let num = |s: String| -> Result<u64, String> {
            let r = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            r.map_err(|e| format!("bad number {s:?}: {e}"))
        };
        match a.as_str() {
            "--impl" => o.only_impl = Some(val("a name")?),
            "--only" => o.only_scenario = Some(val("a scenario name")?),
            "--seeds" => nseeds = num(val("a count")?)?,
            "--seed" => o.seeds.push(num(val("a seed")?)?),
            "--steps" => o.steps = num(val("a count")?)?,
            _ => return Err(format!("unknown option {a:?} (see the module docs)")),
        }
    }
    if o.seeds.is_empty() {
        o.seeds = (0..nseeds).map(|i| 0x5eed_0000 + i).collect();
    }
    Ok(o)
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| String::from("(non-string panic)"))
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("conformance: {e}");
            return ExitCode::from(2);
        }
    };
    let mut any_failed = false;
    for &name in mmu_server::registry::NAMES {
        if opts.only_impl.as_deref().is_some_and(|n| n != name) {
            continue;
        }
        let make = Registered(name);
        let (mut passed, mut failed) = (0u64, 0u64);
        let (mut peak, mut steps) = (0u64, 0u64);
        let mut counts = [0u64; 7];
        let mut dirty = [0u64; 3];
        let mut details = Vec::new();
        let start = Instant::now();
        let mut run =
            |label: String, f: &mut dyn FnMut(Ram<'_>) -> conformance::Res<conformance::Stats>| {
                let words: Vec<AtomicU64> =
                    (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
                let ram = Ram::new(RAM_BASE, &words);
                match catch_unwind(AssertUnwindSafe(|| f(ram))) {
                    Ok(Ok(s)) => {
                        passed += 1;
                        peak = peak.max(s.peak_pool);
                        steps += s.steps;
                        counts[0] += s.faults;
                        counts[1] += s.injected;
                        counts[2] += s.emulated;
                        counts[3] += s.flushes;
                        counts[4] += s.accesses;
                        counts[5] += s.mmio;
                        counts[6] += s.paging_switches;
                        dirty[0] += s.harvests;
                        dirty[1] += s.dirty_changed;
                        dirty[2] += s.dirty_extra;
                    }
                    Ok(Err(fail)) => {
                        failed += 1;
                        details.push(format!("{name}: FAILED {fail}"));
                    }
                    Err(p) => {
                        failed += 1;
                        details.push(format!(
                            "{name}: FAILED {label}: panicked: {}",
                            panic_text(&*p)
                        ));
                    }
                }
            };
        for sc in scenarios() {
            if opts.only_scenario.as_deref().is_some_and(|n| n != sc.name) {
                continue;
            }
            run(sc.name.to_string(), &mut |ram| run_scenario(sc, &make, ram));
        }
        let scripted = start.elapsed();
        if opts.only_scenario.is_none() {
            for &seed in &opts.seeds {
                run(format!("random seed {seed:#x}"), &mut |ram| {
                    run_random(seed, opts.steps, &make, ram)
                });
            }
        }
        for d in &details {
            println!("{d}");
        }
        eprintln!(
            "conformance: {name}: {steps} steps checked ({} guest accesses, {} page faults, {} injected, \
             {} emulated writes, {} Mmio, {} paging on/off switches, {} pCPU flushes), peak shadow pool {peak} frames; \
             dirty log: {} harvests, {} changed frames all reported, {} reported unchanged; \
             scripted {:.2?}, random {} x {} steps {:.2?}",
            counts[4],
            counts[0],
            counts[1],
            counts[2],
            counts[5],
            counts[6],
            counts[3],
            dirty[0],
            dirty[1],
            dirty[2],
            scripted,
            if opts.only_scenario.is_none() {
                opts.seeds.len()
            } else {
                0
            },
            opts.steps,
            start.elapsed() - scripted
        );
        println!("{name}: {passed} passed, {failed} failed");
        any_failed |= failed > 0;
    }
    any_failed |= grant_suites(&opts);
    if any_failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// The grant suite: `<mmu>/foreign: N passed, M failed` per MMU server (the
/// foreign-frame requests straight to it), then `grant/<name>: ...` per
/// grant server (every grant scenario over every MMU server). Returns
/// whether anything failed.
fn grant_suites(opts: &Opts) -> bool {
    use conformance::grant::{foreign_scenarios, grant_scenarios, run_grant_scenario};
    use conformance::grant::{GrantFactory, GrantScenario, RegisteredGrant};
    let mmus: Vec<&'static str> = mmu_server::registry::NAMES
        .iter()
        .copied()
        .filter(|n| opts.only_impl.as_deref().is_none_or(|o| o == *n))
        .collect();
    let wanted = |sc: &GrantScenario| opts.only_scenario.as_deref().is_none_or(|o| o == sc.name);
    let run = |sc: &GrantScenario, mmu: &'static str, grant: &dyn GrantFactory| {
        let words: Vec<AtomicU64> = (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
        let ram = Ram::new(RAM_BASE, &words);
        match catch_unwind(AssertUnwindSafe(|| {
            run_grant_scenario(sc, &Registered(mmu), grant, ram)
        })) {
            Ok(Ok((_, c))) => Ok(c),
            Ok(Err(f)) => Err(format!("{f}")),
            Err(p) => Err(format!(
                "{} over {mmu}: panicked: {}",
                sc.name,
                panic_text(&*p)
            )),
        }
    };
    let mut any_failed = false;
    let hint = RegisteredGrant(grant_server::registry::ACCESSED_HINT);
    for &mmu in &mmus {
        let (mut passed, mut failed) = (0u64, 0u64);
        for sc in foreign_scenarios().iter().filter(|s| wanted(s)) {
            match run(sc, mmu, &hint) {
                Ok(_) => passed += 1,
                Err(f) => {
                    failed += 1;
                    println!("{mmu}/foreign: FAILED {f}");
                }
            }
        }
        println!("{mmu}/foreign: {passed} passed, {failed} failed");
        any_failed |= failed > 0;
    }
    for &name in grant_server::registry::NAMES {
        let (mut passed, mut failed) = (0u64, 0u64);
        let mut totals = abi::GrantCounters::default();
        for &mmu in &mmus {
            for sc in grant_scenarios().iter().filter(|s| wanted(s)) {
                match run(sc, mmu, &RegisteredGrant(name)) {
                    Ok(c) => {
                        passed += 1;
                        totals = totals.sum(&c);
                    }
                    Err(f) => {
                        failed += 1;
                        println!("grant/{name}: FAILED {f}");
                    }
                }
            }
        }
        eprintln!(
            "conformance: grant/{name} over {mmus:?}: {} maps, {} unmaps in {} batches, \
             {} flushes ({} pCPUs), {} flushes avoided",
            totals.maps,
            totals.unmaps,
            totals.batches,
            totals.flushes,
            totals.flush_cpus,
            totals.flushes_avoided
        );
        println!("grant/{name}: {passed} passed, {failed} failed");
        any_failed |= failed > 0;
    }
    any_failed
}
