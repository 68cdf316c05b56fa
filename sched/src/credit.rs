//! `credit`: proportional share by weight, after Xen's credit2: credits
//! burn in inverse proportion to weight, the richest runnable vCPU runs.
//!
//! # Algorithm
//! Every vCPU holds a credit balance in microseconds "at the reference
//! weight" ([`DEFAULT_WEIGHT`]). Running for `t` burns `t × 256 / weight`:
//! a weight-512 vCPU burns half as fast, so it runs twice as long on the
//! same credit. `PickNext` on any pCPU runs the runnable vCPU with the most
//! credit (ties: the one runnable longest), or rather one that last ran on
//! this pCPU if its credit is within a quarter slice of the most (migration
//! resistance: fewer moves of cache and shadow state). Its slice is the
//! time until its credit would fall to the next-richest waiting vCPU's,
//! clamped to
//! `[slice / 4, slice]` (credit2's way of keeping the order without a timer
//! per vCPU). When the chosen vCPU has no credit left (`<= 0`), every vCPU
//! is topped up by [`CREDIT_PER_RESET`] slices' worth, capped at that amount
//! (debts carry over, unused credit of a vCPU that could not use it, e.g. a
//! blocked one or one capped at one pCPU, does not pile up). A vCPU that
//! becomes runnable kicks the lowest-numbered idle pCPU.
//!
//! # Guarantees
//! - Over any window long compared with a reset period, vCPUs that stay
//!   runnable get CPU time in proportion to their weights, except that none
//!   gets more than one pCPU (the rest is shared by weight): the shares of
//!   [`abi::sched::expected_shares`], within a few percent
//!   ([`Guarantees::weighted`]).
//! - Equal weights give equal shares (Jain's index near 1).
//! - A runnable vCPU waits at most about one reset period: the others' top-up
//!   (`CREDIT_PER_RESET × slice × Σ weight / 256`) spread over the pCPUs, plus
//!   a slice; the conformance suite holds it to `(m − 1) × r × slice` (`m`
//!   vCPUs, `r` the ratio of the largest to the smallest weight).
//! - Work-conserving like `global-rr`; vCPUs migrate, far less often than
//!   under `global-rr` (migration resistance).

use crate::server::{Policy, Table, VcpuInfo};
use crate::Config;
use abi::sched::{Guarantees, Micros, VcpuState, DEFAULT_WEIGHT};
use abi::{PcpuId, VcpuId};

/// The registry name.
pub const NAME: &str = "credit";

/// The top-up at each reset (and the cap), in slices at the reference
/// weight.
pub const CREDIT_PER_RESET: i64 = 2;

/// The credit policy (no state beyond the balances in the table).
#[derive(Clone, Copy, Debug, Default)]
pub struct Credit;

/// The credit `ran` burns for a vCPU of `weight` (at least 1 when it ran).
fn burn(ran: Micros, weight: u32) -> i64 {
    let w = weight.max(1) as u128;
    let b = (ran.0 as u128 * DEFAULT_WEIGHT as u128).div_ceil(w);
    i64::try_from(b).unwrap_or(i64::MAX)
}

/// The runnable vCPU `pcpu` should run: the one with the most credit (ties:
/// runnable longest), unless one that last ran on `pcpu` is within
/// `resistance` of it (migration resistance, as in credit2: a small credit
/// difference is not worth moving a vCPU's cache and shadow state). Also
/// the most credit among the other runnable vCPUs.
fn choose(table: &Table, pcpu: PcpuId, resistance: i64) -> Option<(VcpuId, i64, Option<i64>)> {
    let key = |i: &VcpuInfo| (i.credit, core::cmp::Reverse(i.queued));
    let runnable = || table.iter().filter(|e| e.state == VcpuState::Runnable);
    let richest = runnable().max_by_key(|e| key(&e.data))?;
    let local = runnable()
        .filter(|e| e.last_pcpu == Some(pcpu))
        .max_by_key(|e| key(&e.data))
        .filter(|e| e.data.credit >= richest.data.credit.saturating_sub(resistance));
    let best = local.unwrap_or(richest);
    let next = runnable()
        .filter(|e| e.vcpu != best.vcpu)
        .map(|e| e.data.credit)
        .max();
    Some((best.vcpu, best.data.credit, next))
}

impl Policy for Credit {
    const NAME: &'static str = NAME;
    const GUARANTEES: Guarantees = Guarantees {
        weighted: true,
        pinned: false,
    };

    fn pick(
        &mut self,
        table: &mut Table,
        pcpu: PcpuId,
        config: &Config,
    ) -> Option<(VcpuId, Micros)> {
        let slice = config.slice();
        let min = (slice.0 / 4).max(1);
        let resistance = min as i64;
        let (mut vcpu, mut credit, mut next) = choose(table, pcpu, resistance)?;
        if credit <= 0 {
            let top_up = CREDIT_PER_RESET.saturating_mul(slice.0 as i64);
            for e in table.iter_mut() {
                e.data.credit = e.data.credit.saturating_add(top_up).min(top_up);
            }
            (vcpu, credit, next) = choose(table, pcpu, resistance)?;
        }
        let weight = table.get(vcpu).map_or(DEFAULT_WEIGHT, |e| e.data.weight);
        let len = match next {
            // Until its credit falls to the next-richest one's.
            Some(n) => {
                let lead = credit.saturating_sub(n).max(0) as u128;
                let t = lead * weight as u128 / DEFAULT_WEIGHT as u128;
                (t.min(slice.0 as u128) as u64).max(min)
            }
            None => slice.0,
        };
        Some((vcpu, Micros(len)))
    }

    fn charge(&mut self, info: &mut VcpuInfo, ran: Micros) {
        info.credit = info.credit.saturating_sub(burn(ran, info.weight));
    }
}

#[cfg(test)]
mod tests {
    use super::burn;
    use abi::Micros;

    #[test]
    fn credit_burns_in_inverse_proportion_to_weight() {
        assert_eq!(burn(Micros(1000), 256), 1000);
        assert_eq!(burn(Micros(1000), 512), 500);
        assert_eq!(burn(Micros(1000), 128), 2000);
        assert_eq!(burn(Micros(1), 1024), 1, "a run always costs something");
        assert_eq!(burn(Micros(0), 256), 0);
        assert_eq!(burn(Micros(u64::MAX), 1), i64::MAX);
    }
}
