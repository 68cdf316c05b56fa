//! `cargo xtask`: the one way to build, run, test and bench Umbra.
//!
//! Each subcommand's doc comment below is its `--help` text.

mod bench;
mod compare;
mod conformance;
mod guest;
mod image;
mod prereq;
mod results;
mod test;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Build, run, test and bench Umbra.
#[derive(Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the boot image and boot it under QEMU (TCG, q35), streaming the
    /// serial console. Exits 0 only when the image reports success. Writes
    /// the parsed report as results.json (with CSV tables and an SVG) under
    /// target/umbra/results/<timestamp>/, as `compare` does. With `--sched`,
    /// one boot per policy, a per-policy scheduler table at the end and a
    /// timeline-<run>.svg per run whose kernel printed a trace. With
    /// `--guest FILE`, checks an unmodified Multiboot kernel instead (see
    /// `--guest`; running one is not built yet).
    Run(image::RunArgs),
    /// Run every host test, the conformance suite and the in-image tests.
    /// The last line is `N passed, M failed` over everything that ran.
    Test(test::TestArgs),
    /// Run the MMU conformance suite against every registered MMU server
    /// implementation; one `<name>: N passed, M failed` line each.
    Conformance(conformance::ConformanceArgs),
    /// Benchmark the MMU servers on the host (release build): dirty-logging
    /// rounds, zap-all latency, CR3 switching, page-fault throughput and the
    /// wire round trip, each for the fast servers and the reference, ending
    /// with a `<figure>: fast <x> vs reference <y> = <ratio>x` summary.
    Bench(bench::BenchArgs),
    /// Boot the guest workloads once per chosen combination (MMU server,
    /// transport, grant server, scheduler; `all` for each), showing progress,
    /// then print one table per workload: implementations as columns,
    /// metrics as rows, the best value of each row marked `*`, verdicts
    /// last. Writes results.json, a CSV per table and comparison.svg under
    /// target/umbra/results/<timestamp>/. `--diff DIR_A DIR_B` prints the
    /// change per metric between two such directories instead.
    Compare(compare::CompareArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => image::run(&args),
        Command::Test(args) => test::test(&args),
        Command::Conformance(args) => conformance::conformance(&args).map(|_| ()),
        Command::Bench(args) => bench::bench(&args),
        Command::Compare(args) => compare::compare(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}
