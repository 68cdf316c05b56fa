//! `cargo xtask test`: host tests, the conformance suite, then the test image.

use crate::prereq;
use anyhow::{Context, Result};
use std::io::{BufRead, BufReader};
use std::process::Stdio;

/// Options of `cargo xtask test`.
#[derive(clap::Args)]
pub struct TestArgs {
    /// Skip booting the test image (host tests and conformance only).
    #[arg(long)]
    pub host_only: bool,
}

/// Passed and failed test counts, summed over everything that ran.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Tests that passed.
    pub passed: u64,
    /// Tests that failed.
    pub failed: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, other: Tally) {
        self.passed += other.passed;
        self.failed += other.failed;
    }
}

/// Runs everything; the last line printed is `N passed, M failed`.
pub fn test(args: &TestArgs) -> Result<()> {
    let mut total = Tally::default();
    let mut stages: Vec<(&str, Result<Tally>)> = Vec::new();

    eprintln!("xtask: host tests (cargo test --release)");
    stages.push(("host tests", host_tests()));
    eprintln!("xtask: conformance suite");
    stages.push(("conformance", crate::conformance::run_suite()));
    if !args.host_only {
        eprintln!("xtask: test image");
        stages.push(("test image", crate::image::test_image()));
    }

    let mut broken = Vec::new();
    for (name, result) in stages {
        match result {
            Ok(t) => {
                eprintln!("xtask: {name}: {} passed, {} failed", t.passed, t.failed);
                total += t;
            }
            Err(e) => {
                eprintln!("xtask: {name} did not complete: {e:#}");
                total.failed += 1;
                broken.push(name);
            }
        }
    }
    println!("{} passed, {} failed", total.passed, total.failed);
    if total.failed > 0 {
        anyhow::bail!(
            "{} test(s) failed{}",
            total.failed,
            if broken.is_empty() {
                String::new()
            } else {
                format!(" (stages that broke: {})", broken.join(", "))
            }
        );
    }
    Ok(())
}

/// `cargo test` over the host crates, with libtest's result lines summed.
fn host_tests() -> Result<Tally> {
    let mut child = prereq::cargo()
        .args(["test", "--release", "--color", "never"])
        .stdout(Stdio::piped())
        .spawn()
        .context("could not start cargo test")?;
    let stdout = child.stdout.take().expect("stdout is piped");
    let mut tally = Tally::default();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        println!("{line}");
        if let Some(t) = parse_libtest_result(&line) {
            tally += t;
        }
    }
    let status = child.wait()?;
    if !status.success() && tally.failed == 0 {
        // A build failure or a crashed test binary: count it as a failure.
        tally.failed += 1;
    }
    Ok(tally)
}

/// Parses libtest's `test result: ok. 3 passed; 0 failed; ...` line.
fn parse_libtest_result(line: &str) -> Option<Tally> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| -> Option<u64> {
        rest.split(';')
            .find_map(|part| {
                part.trim()
                    .trim_start_matches("ok. ")
                    .trim_start_matches("FAILED. ")
                    .strip_suffix(word)
            })
            .and_then(|n| n.trim().parse().ok())
    };
    Some(Tally {
        passed: count(" passed")?,
        failed: count(" failed")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libtest_result_lines() {
        assert_eq!(
            parse_libtest_result("test result: ok. 12 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s"),
            Some(Tally { passed: 12, failed: 0 })
        );
        assert_eq!(
            parse_libtest_result("test result: FAILED. 3 passed; 2 failed; 0 ignored"),
            Some(Tally {
                passed: 3,
                failed: 2
            })
        );
        assert_eq!(parse_libtest_result("running 3 tests"), None);
    }
}
