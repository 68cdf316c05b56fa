//! The scheduler conformance suite: a black-box judge of any scheduler
//! server.
//!
//! The suite plays the kernel and the machine ([`machine`]) around a server
//! it reaches only through encoded messages (`abi::sched::dispatch` on
//! bytes), runs the scripted [`scenarios()`] (several with three to four times
//! more vCPUs than pCPUs, CPU-bound, halting, yielding and ending guests,
//! weights) and judges every decision as it is made and the shares at the
//! end ([`verdict`]):
//!
//! - no vCPU runs on two pCPUs at once; a blocked or unknown vCPU never
//!   runs; every slice is in `1 us ..= MAX_SLICE` (the kernel's own decision
//!   check, `abi::sched::VcpuTable::decide`, is the judge);
//! - a runnable vCPU runs within the stated bound `(m − 1) × r × s + TICK`
//!   (`m` live vCPUs, `r` = largest / smallest weight rounded up, `s` the
//!   longest slice handed out, [`machine::TICK`] the idle pCPU's timer);
//! - a policy that claims pinning never runs a vCPU away from its hint;
//! - when every vCPU stays runnable: Jain's index over equal-weight vCPUs
//!   (same pCPU too, for a pinned policy) is at least [`MIN_JAIN`], and a
//!   policy that claims weights gives every vCPU the share its weight calls
//!   for (capped at one pCPU) within [`SHARE_TOLERANCE`], over the run after
//!   a 10% warm-up.
//!
//! `no_std` + `alloc`, so the same suite can run inside the boot image.
//! `sched/tests/broken.rs` proves it can fail: broken policies (one that
//! starves a vCPU, one that runs a blocked vCPU, one that runs a vCPU on two
//! pCPUs, ...) are each caught.

pub mod machine;
pub mod scenarios;
pub mod verdict;

pub use scenarios::{random_scenario, scenarios, Behaviour, Scenario, VcpuSpec};
pub use verdict::{
    run_scenario, Failure, Report, VcpuReport, Violation, MIN_JAIN, SHARE_TOLERANCE,
};

use abi::SchedServer;
use alloc::boxed::Box;
use alloc::vec::Vec;

/// Every scenario against a fresh server from `make`: one result each, in
/// scenario order.
pub fn run_suite(make: &dyn Fn() -> Box<dyn SchedServer>) -> Vec<Result<Report, Failure>> {
    scenarios()
        .iter()
        .map(|sc| run_scenario(sc, &*make()))
        .collect()
}
