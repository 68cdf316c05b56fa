//! `cargo xtask compare`: boot each chosen combination, print one table per workload, write results; `--diff`.

use crate::image::{boot_with, build_kernel, Ending, Outcome};
use crate::prereq;
use crate::results::diff::diff;
use crate::results::parse::{parse_console, ParseError};
use crate::results::sched::{overview_table, summary_tables};
use crate::results::table::tables;
use crate::results::write::{load, results_root, write_dir};
use crate::results::{labels, EndingKind, Report, Results, Run, Selectors};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Kernel-server transports (`transport=`): the ring-3 server task (the
/// default) and the in-kernel direct call.
pub const TRANSPORTS: &[&str] = &["task", "direct"];
/// Grant servers (`grant=`): `grant-server`'s registry.
pub const GRANTS: &[&str] = grant_server::registry::NAMES;
/// vCPU schedulers (`sched=`), as `sched`'s registry names them.
pub const SCHEDS: &[&str] = &["pinned", "global-rr", "credit"];

/// How often a running boot reports that it is still running.
const HEARTBEAT: Duration = Duration::from_secs(20);

/// Options of `cargo xtask compare`.
#[derive(clap::Args)]
pub struct CompareArgs {
    /// MMU servers to compare: a registered name, several separated by
    /// commas, or `all`.
    #[arg(long, default_value = "all")]
    pub mmu: String,
    /// Number of CPUs QEMU gives the machine (1 to 64).
    #[arg(long, default_value_t = 8)]
    pub smp: u32,
    /// Count instructions: QEMU `-icount shift=0,align=off,sleep=off` and the
    /// kernel word `icount` (instructions per forwarded exit and per server
    /// request). Slower: all vCPUs on one host thread.
    #[arg(long)]
    pub icount: bool,
    /// Kernel-server transport(s) (`task`, `direct`, comma list, or `all`),
    /// passed as `transport=`; the kernel's default when not given.
    #[arg(long)]
    pub transport: Option<String>,
    /// Grant server(s) (`always-flush`, `accessed-hint`, comma list, or
    /// `all`), passed as `grant=`.
    #[arg(long)]
    pub grant: Option<String>,
    /// vCPU scheduler(s) (`pinned`, `global-rr`, `credit`, comma list, or
    /// `all`), passed as `sched=`.
    #[arg(long)]
    pub sched: Option<String>,
    /// Build the image in debug mode.
    #[arg(long)]
    pub debug: bool,
    /// Seconds before one boot that has not ended is killed and failed.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Do not boot: print the change per metric from results directory
    /// DIR_A to DIR_B (each holding a results.json).
    #[arg(long, num_args = 2, value_names = ["DIR_A", "DIR_B"])]
    pub diff: Option<Vec<PathBuf>>,
    /// More kernel command-line words, passed to every boot.
    #[arg(last = true)]
    pub kernel_args: Vec<String>,
}

/// The values `given` selects from `known`: `all`, one name, or a comma
/// list; an unknown name is an error naming it and the known ones.
pub fn expand(flag: &str, given: &str, known: &[&str]) -> Result<Vec<String>> {
    if given == "all" {
        return Ok(known.iter().map(|s| s.to_string()).collect());
    }
    let mut out: Vec<String> = Vec::new();
    for name in given.split(',').map(str::trim) {
        if !known.contains(&name) {
            bail!(
                "--{flag} {name:?}: not one of {} (or `all`)",
                known.join(", ")
            );
        }
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    Ok(out)
}

/// The values an optional selector chooses: `[None]` (not given: no
/// kernel word, the kernel's default) or each of [`expand`]'s.
pub fn choices(flag: &str, given: &Option<String>, known: &[&str]) -> Result<Vec<Option<String>>> {
    Ok(match given {
        None => vec![None],
        Some(v) => expand(flag, v, known)?.into_iter().map(Some).collect(),
    })
}

/// Prints the per-policy scheduler tables of `results` (none when no run
/// printed `sched:` lines), then the overview across groups when there are
/// several.
pub fn print_sched_summary(results: &Results) {
    for t in summary_tables(results)
        .iter()
        .chain(&overview_table(results))
    {
        println!("{}", t.render());
    }
}

/// Every combination the options select, in the order they will run (MMU
/// server slowest-changing).
pub fn combinations(args: &CompareArgs) -> Result<Vec<Selectors>> {
    if !(1..=64).contains(&args.smp) {
        bail!(
            "--smp {} is out of range: Umbra runs 1 to 64 CPUs",
            args.smp
        );
    }
    let mmus = expand("mmu", &args.mmu, mmu_server::registry::NAMES)?;
    let transports = choices("transport", &args.transport, TRANSPORTS)?;
    let grants = choices("grant", &args.grant, GRANTS)?;
    let scheds = choices("sched", &args.sched, SCHEDS)?;
    let mut out = Vec::new();
    for mmu in &mmus {
        for transport in &transports {
            for grant in &grants {
                for sched in &scheds {
                    out.push(Selectors {
                        mmu: mmu.clone(),
                        smp: args.smp,
                        icount: args.icount,
                        transport: transport.clone(),
                        grant: grant.clone(),
                        sched: sched.clone(),
                    });
                }
            }
        }
    }
    Ok(out)
}

/// The kernel command line of one combination: `mmu=`, the chosen
/// `transport=`/`grant=`/`sched=`, `icount`, then `extra`.
pub fn kernel_line(s: &Selectors, extra: &[String]) -> String {
    let mut words = Vec::new();
    if !s.mmu.is_empty() {
        words.push(format!("mmu={}", s.mmu));
    }
    for (k, v) in [
        ("transport", &s.transport),
        ("grant", &s.grant),
        ("sched", &s.sched),
    ] {
        if let Some(v) = v {
            words.push(format!("{k}={v}"));
        }
    }
    if s.icount {
        words.push("icount".into());
    }
    words.extend(extra.iter().cloned());
    words.join(" ")
}

/// The selectors of a `cargo xtask run` boot: its MMU server and CPUs, and
/// the `transport=`, `grant=`, `sched=` and `icount` words among the kernel
/// arguments given after `--`.
pub fn run_selectors(mmu: &str, smp: u32, kernel_args: &[String]) -> Selectors {
    let words: Vec<&str> = kernel_args
        .iter()
        .flat_map(|a| a.split_whitespace())
        .collect();
    let value = |key: &str| {
        words
            .iter()
            .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
            .map(String::from)
    };
    Selectors {
        mmu: mmu.to_string(),
        smp,
        icount: words.contains(&"icount"),
        transport: value("transport"),
        grant: value("grant"),
        sched: value("sched"),
    }
}

/// A boot's outcome as a [`Run`]; the report is empty (and the parse
/// error returned beside it) when the console did not parse.
pub fn to_run(
    label: String,
    selectors: Selectors,
    kernel_args: String,
    out: &Outcome,
    wall: Duration,
) -> (Run, Option<ParseError>) {
    let (ending, exit_status) = match &out.ending {
        Ending::Success => (EndingKind::Success, Some(crate::image::EXIT_SUCCESS)),
        Ending::Failure => (EndingKind::Failure, Some(crate::image::EXIT_FAILURE)),
        Ending::TripleFault => (EndingKind::TripleFault, Some(0)),
        Ending::Other(code) => (EndingKind::Other, *code),
        Ending::Timeout(_) => (EndingKind::Timeout, None),
    };
    let (report, error) = match parse_console(&out.lines) {
        Ok(r) => (r, None),
        Err(e) => (Report::default(), Some(e)),
    };
    let run = Run {
        label,
        selectors,
        kernel_args,
        ending,
        exit_status,
        wall_seconds: wall.as_secs_f64(),
        report,
    };
    (run, error)
}

/// Writes `runs` of `command` under `target/umbra/results/` and says where.
pub fn save(command: &str, created: String, runs: Vec<Run>) -> Result<PathBuf> {
    let mut results = Results::new(command);
    results.created = created;
    results.runs = runs;
    let dir = write_dir(&results, &results_root())?;
    eprintln!(
        "xtask: results in {} (results.json, a CSV per table, pcpu-exits.csv, comparison.svg; \
         with a scheduler: sched-<group>.csv and timeline-<run>.svg)",
        dir.display()
    );
    Ok(dir)
}

/// `1:05` for 65 seconds.
fn clock(d: Duration) -> String {
    let s = d.as_secs();
    format!("{}:{:02}", s / 60, s % 60)
}

/// `elapsed 1:30, about 3:00 left; then: b, c` before boot `done` (0-based)
/// of `names`: the estimate is the mean boot so far times the boots left.
pub fn progress(elapsed: Duration, done: usize, names: &[String]) -> String {
    let left = names.len().saturating_sub(done);
    let eta = match done {
        0 => String::new(),
        _ => format!(
            ", about {} left",
            clock(elapsed / done as u32 * left as u32)
        ),
    };
    let then = match names.get(done + 1..) {
        Some(rest) if !rest.is_empty() => rest.join(", "),
        _ => "nothing".into(),
    };
    format!("elapsed {}{eta}; then: {then}", clock(elapsed))
}

/// Boots `image` in a thread, printing a line every [`HEARTBEAT`] while it
/// runs.
fn boot_watched(
    image: &Path,
    s: &Selectors,
    append: &str,
    timeout: Duration,
    what: &str,
) -> Result<Outcome> {
    let qemu = crate::image::icount_args(s.icount);
    let start = Instant::now();
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::channel();
        scope.spawn(move || {
            let _ = tx.send(boot_with(image, s.smp, append, timeout, false, &qemu));
        });
        loop {
            match rx.recv_timeout(HEARTBEAT) {
                Ok(out) => return out,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    eprintln!("compare: {what} still running, {}", clock(start.elapsed()))
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the boot thread died"),
            }
        }
    })
}

/// `cargo xtask compare`.
pub fn compare(args: &CompareArgs) -> Result<()> {
    if let Some(dirs) = &args.diff {
        let [a, b] = dirs.as_slice() else {
            bail!("--diff takes two directories, got {}", dirs.len());
        };
        print!("{}", diff(&load(a)?, &load(b)?).render());
        return Ok(());
    }
    let combos = combinations(args)?;
    let names = labels(&combos);
    prereq::ensure_qemu()?;
    prereq::ensure_kernel_target()?;
    let created = crate::results::write::utc_stamp(std::time::SystemTime::now()).0;
    let image = build_kernel(args.debug)?;
    let start = Instant::now();
    let mut runs = Vec::new();
    let mut failed = Vec::new();
    for (i, (s, label)) in combos.iter().zip(&names).enumerate() {
        let append = kernel_line(s, &args.kernel_args);
        let what = format!("[{}/{}] {label}", i + 1, combos.len());
        eprintln!(
            "compare: {what}: booting -smp {} \"{append}\"; {}",
            s.smp,
            progress(start.elapsed(), i, &names)
        );
        let t0 = Instant::now();
        let out = boot_watched(&image, s, &append, Duration::from_secs(args.timeout), &what)?;
        let (run, error) = to_run(label.clone(), s.clone(), append, &out, t0.elapsed());
        if let Some(e) = error {
            eprintln!("compare: {what}: the report did not parse, recorded empty: {e}");
        }
        eprintln!(
            "compare: {what}: {} in {:.1} s, {}/{} workloads passed",
            run.ending,
            run.wall_seconds,
            run.report.workloads_passed.unwrap_or(0),
            run.report.workloads_total.unwrap_or(0),
        );
        if run.ending != EndingKind::Success {
            failed.push(label.clone());
        }
        runs.push(run);
    }
    let mut results = Results::new("compare");
    results.created = created;
    results.runs = runs;
    for t in tables(&results) {
        println!("{}", t.render());
    }
    print_sched_summary(&results);
    save("compare", results.created.clone(), results.runs)?;
    if !failed.is_empty() {
        bail!(
            "{} of {} boots did not succeed: {}",
            failed.len(),
            combos.len(),
            failed.join(", ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{
        choices, combinations, expand, kernel_line, progress, run_selectors, to_run, CompareArgs,
        SCHEDS,
    };
    use crate::image::{Ending, Outcome};
    use crate::results::test_data::REFERENCE;
    use crate::results::EndingKind;
    use clap::Parser;
    use std::time::Duration;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: CompareArgs,
    }

    fn args(words: &[&str]) -> CompareArgs {
        let mut argv = vec!["compare"];
        argv.extend_from_slice(words);
        Cli::try_parse_from(argv).unwrap().args
    }

    #[test]
    fn selectors_expand_to_every_combination() {
        let all = combinations(&args(&[])).unwrap();
        assert_eq!(all.len(), mmu_server::registry::NAMES.len());
        let c = combinations(&args(&[
            "--mmu",
            "reference",
            "--sched",
            "all",
            "--smp",
            "4",
        ]))
        .unwrap();
        assert_eq!(c.len(), SCHEDS.len());
        assert!(c.iter().all(|s| s.smp == 4 && s.mmu == "reference"));
        assert_eq!(c[1].sched.as_deref(), Some(SCHEDS[1]));
        let c = combinations(&args(&[
            "--mmu",
            "all",
            "--grant",
            "always-flush,accessed-hint",
            "--icount",
        ]))
        .unwrap();
        assert_eq!(c.len(), 2 * mmu_server::registry::NAMES.len());
        assert_eq!(
            kernel_line(&c[1], &["svm-test".into()]),
            "mmu=reference grant=accessed-hint icount svm-test"
        );
    }

    #[test]
    fn grant_expands_to_every_registered_server_and_names_an_unknown_one() {
        let c = combinations(&args(&["--mmu", "reference", "--grant", "all"])).unwrap();
        let got: Vec<_> = c.iter().map(|s| s.grant.clone().unwrap()).collect();
        assert_eq!(got, grant_server::registry::NAMES);
        let e = combinations(&args(&["--grant", "sometimes-flush"])).unwrap_err();
        assert!(e.to_string().contains("sometimes-flush"), "{e}");
    }

    #[test]
    fn progress_says_elapsed_what_is_left_and_what_comes_next() {
        let names: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(
            progress(Duration::ZERO, 0, &names),
            "elapsed 0:00; then: b, c, d"
        );
        // Two boots took 100 s: the other two should take about 100 s.
        assert_eq!(
            progress(Duration::from_secs(100), 2, &names),
            "elapsed 1:40, about 1:40 left; then: d"
        );
        assert_eq!(
            progress(Duration::from_secs(90), 3, &names),
            "elapsed 1:30, about 0:30 left; then: nothing"
        );
    }

    #[test]
    fn a_run_takes_its_selectors_from_the_kernel_words() {
        let words = [
            "sched=credit test".to_string(),
            "grant=accessed-hint".into(),
        ];
        let s = run_selectors("fast-shared", 4, &words);
        assert_eq!(s.sched.as_deref(), Some("credit"));
        assert_eq!(s.grant.as_deref(), Some("accessed-hint"));
        assert_eq!((s.transport.as_deref(), s.icount, s.smp), (None, false, 4));
        assert_eq!(
            kernel_line(&s, &[]),
            "mmu=fast-shared grant=accessed-hint sched=credit"
        );
        assert!(run_selectors("", 1, &["icount".into()]).icount);
    }

    /// `SCHEDS` is the `sched` crate's registry, read from its source (the
    /// tools do not depend on the crate): `NAMES` lists `<module>::NAME`
    /// and each module defines its `NAME`.
    #[test]
    fn scheds_are_the_sched_registry_in_its_order() {
        let src = |file: &str| {
            let path = format!("{}/../sched/src/{file}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let registry = src("registry.rs");
        let list = registry
            .split("pub const NAMES: &[&str] = &[")
            .nth(1)
            .and_then(|t| t.split(']').next())
            .expect("NAMES in sched/src/registry.rs");
        let names: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|m| !m.is_empty())
            .map(|m| {
                let module = m.strip_suffix("::NAME").expect("<module>::NAME");
                let text = src(&format!("{module}.rs"));
                let tail = text
                    .split("pub const NAME: &str = \"")
                    .nth(1)
                    .expect("pub const NAME");
                tail.split('"').next().unwrap().to_string()
            })
            .collect();
        assert_eq!(names, SCHEDS);
    }

    #[test]
    fn unknown_values_are_refused_by_name() {
        let e = expand("sched", "pinned,fifo", SCHEDS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"fifo\"") && e.contains("global-rr"), "{e}");
        assert_eq!(choices("sched", &None, SCHEDS).unwrap(), [None]);
        let all = choices("sched", &Some("all".into()), SCHEDS).unwrap();
        assert_eq!(all.len(), SCHEDS.len());
        assert_eq!(all[2].as_deref(), Some("credit"));
        assert!(choices("sched", &Some("fifo".into()), SCHEDS).is_err());
        assert!(combinations(&args(&["--mmu", "nope"])).is_err());
        let e = combinations(&args(&["--smp", "65"]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("65"), "{e}");
        assert_eq!(expand("mmu", "a,a", &["a"]).unwrap(), ["a"]);
        let d = args(&["--diff", "x", "y"]).diff.unwrap();
        assert_eq!(d.len(), 2);
    }

    #[test]
    fn an_outcome_becomes_a_run_and_a_bad_console_an_empty_report() {
        let s = combinations(&args(&["--mmu", "reference"]))
            .unwrap()
            .remove(0);
        let out = Outcome {
            lines: REFERENCE.lines().map(String::from).collect(),
            ending: Ending::Success,
            online_after: None,
        };
        let (run, e) = to_run(
            "r".into(),
            s.clone(),
            "mmu=reference".into(),
            &out,
            Duration::from_secs(3),
        );
        assert!(e.is_none());
        assert_eq!(run.ending, EndingKind::Success);
        assert_eq!(run.report.workloads.len(), 11);
        let bad = Outcome {
            lines: vec!["svm: workload x d1 vcpus z PASS".into()],
            ending: Ending::Timeout(Duration::from_secs(1)),
            online_after: None,
        };
        let (run, e) = to_run("r".into(), s, String::new(), &bad, Duration::ZERO);
        assert_eq!(run.ending, EndingKind::Timeout);
        assert!(run.report.workloads.is_empty());
        assert!(e.unwrap().what.contains("`z`"));
    }
}
