//! `cargo xtask conformance`: the MMU conformance suite against every
//! implementation in `mmu_server::registry`, one result line each.

use crate::prereq;
use crate::test::Tally;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader};
use std::process::Stdio;

/// Options of `cargo xtask conformance`.
#[derive(clap::Args, Default)]
pub struct ConformanceArgs {
    /// Only this implementation (a name from `mmu_server::registry`).
    #[arg(long = "impl")]
    pub implementation: Option<String>,
    /// Number of random operation sequences per implementation.
    #[arg(long)]
    pub seeds: Option<u64>,
    /// Steps per random sequence.
    #[arg(long)]
    pub steps: Option<u64>,
    /// Reproduce one random sequence (the seed a failure names).
    #[arg(long)]
    pub seed: Option<String>,
    /// Only this scripted scenario (and no random sequences).
    #[arg(long)]
    pub only: Option<String>,
}

/// `cargo xtask conformance`: fails if any implementation failed anything.
pub fn conformance(args: &ConformanceArgs) -> Result<Tally> {
    let tally = run(args)?;
    if tally.failed > 0 {
        bail!("{} conformance check(s) failed", tally.failed);
    }
    Ok(tally)
}

/// Runs the suite (scripted scenarios and the default random sequences)
/// against every registered implementation; the totals over all of them.
pub fn run_suite() -> Result<Tally> {
    run(&ConformanceArgs::default())
}

fn run(args: &ConformanceArgs) -> Result<Tally> {
    let mut cmd = prereq::cargo();
    cmd.args([
        "run",
        "--release",
        "--quiet",
        "-p",
        "conformance",
        "--bin",
        "conformance",
        "--",
    ]);
    if let Some(i) = &args.implementation {
        cmd.args(["--impl", i]);
    }
    if let Some(n) = args.seeds {
        cmd.args(["--seeds", &n.to_string()]);
    }
    if let Some(n) = args.steps {
        cmd.args(["--steps", &n.to_string()]);
    }
    if let Some(s) = &args.seed {
        cmd.args(["--seed", s]);
    }
    if let Some(o) = &args.only {
        cmd.args(["--only", o]);
    }
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start the conformance runner")?;
    let stdout = child.stdout.take().context("runner stdout is not piped")?;
    let mut tally = Tally::default();
    let mut lines = 0;
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(t) = parse_result_line(&line) {
            tally += t;
            lines += 1;
        }
    }
    let status = child.wait()?;
    if lines == 0 {
        bail!("the conformance runner printed no result line ({status})");
    }
    if !status.success() && tally.failed == 0 {
        bail!("the conformance runner failed ({status}) without reporting a failure");
    }
    Ok(tally)
}

/// Parses `<name>: N passed, M failed`.
fn parse_result_line(line: &str) -> Option<Tally> {
    let (name, rest) = line.split_once(": ")?;
    if name.is_empty() || name.contains(' ') {
        return None;
    }
    let (p, f) = rest.split_once(", ")?;
    Some(Tally {
        passed: p.strip_suffix(" passed")?.parse().ok()?,
        failed: f.strip_suffix(" failed")?.parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_result_lines() {
        assert_eq!(
            parse_result_line("reference: 61 passed, 0 failed"),
            Some(Tally {
                passed: 61,
                failed: 0
            })
        );
        assert_eq!(
            parse_result_line("fast-shared: 3 passed, 2 failed"),
            Some(Tally {
                passed: 3,
                failed: 2
            })
        );
        assert_eq!(
            parse_result_line("reference: FAILED demand_paging step 3"),
            None
        );
        assert_eq!(parse_result_line("    expected: 1 passed, 2 failed"), None);
    }
}
