//! Results built from the console fixtures, shared by the tests of the results modules.

use crate::results::parse::parse_console;
use crate::results::{EndingKind, Results, Run, Selectors, Value};

/// The real `--mmu reference` console (`tests/fixtures/run-reference.txt`).
pub const REFERENCE: &str = include_str!("../../tests/fixtures/run-reference.txt");

/// A successful run of `mmu` on 8 CPUs with the report of `console`.
pub fn run_from(console: &str, mmu: &str) -> Run {
    let lines: Vec<&str> = console.lines().collect();
    Run {
        label: mmu.into(),
        selectors: Selectors {
            mmu: mmu.into(),
            smp: 8,
            ..Selectors::default()
        },
        kernel_args: format!("mmu={mmu}"),
        ending: EndingKind::Success,
        exit_status: Some(33),
        wall_seconds: 42.5,
        report: parse_console(&lines).expect("the fixture parses"),
    }
}

/// Two runs: the real reference report, and the same report relabelled
/// `fast-shared` with fewer exits on demand-64M (10000 fewer, 3.00 per
/// demand fault) and one more exit on pCPU 3.
pub fn two_runs() -> Results {
    let a = run_from(REFERENCE, "reference");
    let mut b = run_from(REFERENCE, "fast-shared");
    let demand = &mut b.report.workloads[0];
    demand.metrics.insert("exits".into(), Value::Count(54281));
    demand
        .metrics
        .insert("exits_per_demand_fault".into(), Value::Ratio(3.0));
    *b.report.pcpus[3].exits.get_mut("hlt").expect("hlt column") += 1;
    let mut r = Results::new("compare");
    r.runs = vec![a, b];
    r
}

/// Rewrites `tests/fixtures/results-before` and `results-after` (the
/// `--diff` fixtures): the reference run, and the same with demand-64M at
/// 10000 fewer exits (3.00 per demand fault) and smp-8 failed. Run with
/// `cargo test -p tools -- --ignored regenerate_diff_fixtures`.
#[test]
#[ignore]
fn regenerate_diff_fixtures() {
    use crate::results::Verdict;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut before = Results::new("run");
    before.created = "2026-12-01T06:20:00Z".into();
    before.runs = vec![run_from(REFERENCE, "reference")];
    let mut after = before.clone();
    after.created = "2026-12-01T07:00:00Z".into();
    let w = &mut after.runs[0].report.workloads;
    w[0].metrics.insert("exits".into(), Value::Count(54281));
    w[0].metrics
        .insert("exits_per_demand_fault".into(), Value::Ratio(3.0));
    let smp = w.iter_mut().find(|w| w.name == "smp-8").expect("smp-8");
    smp.verdict = Verdict::Fail;
    for (name, r) in [("results-before", &before), ("results-after", &after)] {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        let json = serde_json::to_string_pretty(r).unwrap();
        std::fs::write(dir.join(name).join("results.json"), json + "\n").unwrap();
    }
}

/// A synthetic 2-pCPU console with `sched:` and `trace:` lines under the
/// `credit` policy (`tests/fixtures/run-sched.txt`).
pub const SCHED: &str = include_str!("../../tests/fixtures/run-sched.txt");

/// Three runs with scheduler lines: `reference` under `credit` (the
/// fixture) and under `pinned` (the fixture renamed, with no migrations and
/// `-` for Jain's index), and `fast-shared` under `credit`; labelled
/// against each other.
pub fn sched_runs() -> Results {
    let pinned = SCHED
        .replace("policy=credit", "policy=pinned")
        .replace(
            "summary migrations=11 migration_flushes=22",
            "summary migrations=0 migration_flushes=0",
        )
        .replace("jain_equal=0.996294", "jain_equal=-");
    let mut runs = Vec::new();
    for (console, mmu, sched) in [
        (SCHED.to_string(), "reference", "credit"),
        (pinned, "reference", "pinned"),
        (SCHED.to_string(), "fast-shared", "credit"),
    ] {
        let mut run = run_from(&console, mmu);
        run.selectors.sched = Some(sched.into());
        run.kernel_args = format!("mmu={mmu} sched={sched}");
        runs.push(run);
    }
    let selectors: Vec<Selectors> = runs.iter().map(|r| r.selectors.clone()).collect();
    for (run, label) in runs.iter_mut().zip(crate::results::labels(&selectors)) {
        run.label = label;
    }
    let mut r = Results::new("run");
    r.runs = runs;
    r
}
