//! `pinned`: each vCPU stays on the pCPU named when it was created; each
//! pCPU round-robins its own vCPUs (the kernel's behaviour before the
//! scheduler server existed).
//!
//! # Algorithm
//! One FIFO run queue per pCPU (the vCPUs whose `hint` is that pCPU, in the
//! order they became runnable). `PickNext` on pCPU p runs the head of p's
//! queue for a full slice; a vCPU that stops runnable goes to the tail. A
//! vCPU that becomes runnable kicks its pCPU if that pCPU is idle. Weights
//! are ignored.
//!
//! # Guarantees
//! - No migration, ever: a vCPU runs only on its `hint` pCPU
//!   ([`Guarantees::pinned`]), so its shadow state stays on one pCPU.
//! - A runnable vCPU runs within `(k − 1) × slice` of becoming runnable,
//!   where `k` is the number of vCPUs sharing its pCPU.
//! - Fair within a pCPU (equal shares for vCPUs that stay runnable), not
//!   across pCPUs: balance is the caller's choice of hints.

use crate::server::{oldest_runnable, Policy, Table, VcpuInfo};
use crate::Config;
use abi::sched::{Guarantees, Micros};
use abi::{PcpuId, VcpuId};

/// The registry name.
pub const NAME: &str = "pinned";

/// The pinned policy (no state beyond the shared table).
#[derive(Clone, Copy, Debug, Default)]
pub struct Pinned;

impl Policy for Pinned {
    const NAME: &'static str = NAME;
    const GUARANTEES: Guarantees = Guarantees {
        weighted: false,
        pinned: true,
    };

    fn pick(
        &mut self,
        table: &mut Table,
        pcpu: PcpuId,
        config: &Config,
    ) -> Option<(VcpuId, Micros)> {
        oldest_runnable(table, |info| info.hint == pcpu).map(|v| (v, config.slice()))
    }

    fn home(&self, info: &VcpuInfo) -> Option<PcpuId> {
        Some(info.hint)
    }
}
