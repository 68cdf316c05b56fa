//! `cargo xtask bench`: the MMU server benchmarks (host side), every figure
//! for the fast servers and the reference in one run, ending with the
//! summary table `<figure>: fast <x> vs reference <y> = <ratio>x`.

use crate::prereq;
use anyhow::Result;

/// Options of `cargo xtask bench`.
#[derive(clap::Args, Default)]
pub struct BenchArgs {
    /// Smaller workloads (a quarter of the pages, no 100k zap): a smoke run.
    #[arg(long)]
    pub quick: bool,
}

/// `cargo xtask bench`: builds and runs `mmu-server`'s `mmu` bench in
/// release mode (`cargo bench -p mmu-server --bench mmu`).
pub fn bench(args: &BenchArgs) -> Result<()> {
    let mut cmd = prereq::cargo();
    cmd.args(["bench", "-p", "mmu-server", "--bench", "mmu", "--"]);
    if args.quick {
        cmd.arg("--quick");
    }
    prereq::run_checked(&mut cmd)
}
