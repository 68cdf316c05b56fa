//! `global-rr`: one run queue for the whole machine; vCPUs migrate to
//! whichever pCPU asks first.
//!
//! # Algorithm
//! One FIFO run queue of every runnable vCPU, in the order they became
//! runnable. `PickNext` on any pCPU runs the head for a full slice; a vCPU
//! that stops runnable goes to the tail. A vCPU that becomes runnable kicks
//! the lowest-numbered idle pCPU, if any. Weights and hints are ignored.
//!
//! # Guarantees
//! - Work-conserving: no pCPU is idle while a runnable vCPU waits (up to the
//!   kick's delivery).
//! - A runnable vCPU runs within `ceil((m − 1) / n) × slice` of becoming
//!   runnable (`m` runnable vCPUs, `n` pCPUs asking): at most `m − 1` vCPUs
//!   are ahead of it and every pCPU takes one per slice.
//! - Equal shares for vCPUs that stay runnable, whatever their weights
//!   (Jain's index near 1). Migrations are frequent: this is the policy to
//!   measure what migration costs the MMU server.

use crate::server::{oldest_runnable, Policy, Table};
use crate::Config;
use abi::sched::{Guarantees, Micros};
use abi::{PcpuId, VcpuId};

/// The registry name.
pub const NAME: &str = "global-rr";

/// The global round-robin policy (no state beyond the shared table).
#[derive(Clone, Copy, Debug, Default)]
pub struct GlobalRr;

impl Policy for GlobalRr {
    const NAME: &'static str = NAME;
    const GUARANTEES: Guarantees = Guarantees {
        weighted: false,
        pinned: false,
    };

    fn pick(
        &mut self,
        table: &mut Table,
        _pcpu: PcpuId,
        config: &Config,
    ) -> Option<(VcpuId, Micros)> {
        oldest_runnable(table, |_| true).map(|v| (v, config.slice()))
    }
}
