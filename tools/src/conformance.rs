//! `cargo xtask conformance`: the MMU conformance suite.
//! (Filled by the MMU protocol issue.)

use crate::test::Tally;
use anyhow::{bail, Result};

/// Options of `cargo xtask conformance`.
#[derive(clap::Args)]
pub struct ConformanceArgs {}

/// `cargo xtask conformance`.
pub fn conformance(_args: &ConformanceArgs) -> Result<Tally> {
    run_suite()
}

/// Runs the suite against every registered implementation.
pub fn run_suite() -> Result<Tally> {
    bail!("the conformance suite is not built yet")
}
