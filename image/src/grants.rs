//! The grant part of a run's report: the grant server's counters per split-driver pair, the flush goals, and the check that every grant and mapping was given back.
//!
//! The counts come from the grant server itself over the protocol
//! (`GrantRequest::GetCounters`, per domain), the shootdown IPIs and pCPUs
//! flushed from the kernel (which carried out the flushes), so two grant
//! servers are compared on the same terms.

use abi::grant::{GrantCounters, GrantReply, GrantRequest};
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::Ordering::Relaxed;
use kernel::kprintln;
use kernel::svm::domain::Domain;
use kernel::svm::Svm;

/// The share of unmap batches `accessed-hint` must spare a flush, per pair
/// (by the prefix of its workloads' names): the block path never touches
/// its mappings (the device moves the data), the net path reads some
/// payloads through them.
const GOALS: &[(&str, f64)] = &[("blk", 99.0), ("net", 80.0)];

/// The grant server whose every batch flushes (Xen upstream).
const ALWAYS_FLUSH: &str = grant_server::registry::ALWAYS_FLUSH;

/// One split-driver pair: its name and its two domains.
struct Pair<'d> {
    name: &'d str,
    doms: Vec<&'d Domain>,
}

/// The run's pairs, in domain order (a pair is named by the prefix its
/// workloads share, `blk` for `blk-front` and `blk-back`).
fn pairs(svm: &Svm) -> Vec<Pair<'_>> {
    let mut out: Vec<Pair> = Vec::new();
    for d in svm.domains().iter().filter(|d| d.spec.peer.is_some()) {
        let name = d.spec.name.split('-').next().unwrap_or(d.spec.name);
        match out.iter_mut().find(|p| p.name == name) {
            Some(p) => p.doms.push(d),
            None => out.push(Pair {
                name,
                doms: alloc::vec![d],
            }),
        }
    }
    out
}

/// The grant server's counters for `d` (as mapper and granter).
fn counters(svm: &Svm, d: &Domain) -> Result<GrantCounters, String> {
    match svm.grant(None, &GrantRequest::GetCounters { domain: Some(d.id) }) {
        Ok(GrantReply::Counters { counters, .. }) => Ok(counters),
        Ok(other) => Err(format!("GetCounters answered {other:?}")),
        Err(_) => Err("the grant server was stopped".into()),
    }
}

/// Prints the grant table and the `grant:` lines; in test mode, one test
/// line per pair for its flush goal and one for the given-back check.
/// Returns (passed, failed) test lines. Nothing for a run without a grant
/// server.
pub fn report(svm: &Svm, test_mode: bool) -> (u32, u32) {
    let Some(door) = &svm.grant else {
        return (0, 0);
    };
    let grant = door.name.as_str();
    let label = format!("{}-{}-{grant}", svm.name, svm.transport());
    kprintln!(
        "svm: ---- grant server `{grant}` (MMU server `{}`), per split-driver pair ----",
        svm.name
    );
    kprintln!(
        "pair    maps  unmaps batches flushes avoided avoided%   ipis pcpus-flushed copies  calls refused"
    );
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut test = |ok: bool, name: String, why: String| {
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
        if test_mode {
            match ok {
                true => kprintln!("test grant-{label}-{name} ... ok"),
                false => kprintln!("test grant-{label}-{name} ... FAILED: {why}"),
            }
        }
    };
    for pair in pairs(svm) {
        let mut c = GrantCounters::default();
        let mut why_none = None;
        for d in &pair.doms {
            match counters(svm, d) {
                Ok(x) => c = c.sum(&x),
                Err(e) => why_none = Some(e),
            }
        }
        let sum = |f: fn(&Domain) -> u64| pair.doms.iter().map(|d| f(d)).sum::<u64>();
        let ipis = sum(|d| d.grant_ipis.load(Relaxed));
        let flushed = sum(|d| d.grant_cpus_flushed.load(Relaxed));
        let calls = sum(|d| d.grant_calls.load(Relaxed));
        let refused = sum(|d| d.grant_errors.load(Relaxed));
        if let Some(why) = why_none {
            kprintln!("{:<6} {why}", pair.name);
            test(false, format!("{}-counted", pair.name), why);
            continue;
        }
        let avoided_pct = match c.batches {
            0 => 0.0,
            b => 100.0 * c.flushes_avoided as f64 / b as f64,
        };
        kprintln!(
            "{:<6}{:>6}{:>8}{:>8}{:>8}{:>8}{:>8.1}%{:>7}{:>14}{:>7}{:>7}{:>8}",
            pair.name,
            c.maps,
            c.unmaps,
            c.batches,
            c.flushes,
            c.flushes_avoided,
            avoided_pct,
            ipis,
            flushed,
            c.copies,
            calls,
            refused
        );
        kprintln!(
            "grant: v=1 mmu={} transport={} grant={grant} pair={} maps={} unmaps={} batches={} \
             flushes={} flushes_avoided={} avoided_pct={avoided_pct:.1} shootdown_ipis={ipis} \
             pcpus_flushed={flushed} copies={} grant_calls={calls} refused={refused}",
            svm.name,
            svm.transport(),
            pair.name,
            c.maps,
            c.unmaps,
            c.batches,
            c.flushes,
            c.flushes_avoided,
            c.copies
        );
        // The flush goal: always-flush spares none; accessed-hint meets
        // the pair's share.
        let goal = if grant == ALWAYS_FLUSH {
            Some(0.0)
        } else {
            GOALS.iter().find(|(p, _)| *p == pair.name).map(|g| g.1)
        };
        if let Some(goal) = goal {
            let ok = c.batches > 0
                && if goal == 0.0 {
                    c.flushes_avoided == 0 && c.flushes == c.batches
                } else {
                    avoided_pct >= goal
                };
            test(
                ok,
                format!("{}-flush-goal", pair.name),
                format!(
                    "{} of {} batches spared a flush ({avoided_pct:.1}%), goal {}",
                    c.flushes_avoided,
                    c.batches,
                    if goal == 0.0 {
                        String::from("none")
                    } else {
                        format!(">= {goal}%")
                    }
                ),
            );
        }
        // Everything given back: the workloads ended every grant and
        // unmapped every mapping, and the server's levels agree.
        let left = c.grants_active + c.maps_active + c.handles_in_use;
        test(
            left == 0,
            format!("{}-all-given-back", pair.name),
            format!(
                "{} grants, {} mappings, {} map handles still held",
                c.grants_active, c.maps_active, c.handles_in_use
            ),
        );
    }
    (passed, failed)
}

/// The grant fields of a domain's `result:` line (empty for a run without
/// a grant server): the server's counts for it as mapper and granter, and
/// the flushes the kernel carried out for its calls.
pub fn result_fields(svm: &Svm, d: &Domain) -> String {
    if svm.grant.is_none() {
        return String::new();
    }
    let kernel = format!(
        " grant_calls={} grant_refused={} grant_shootdown_ipis={} grant_pcpus_flushed={}",
        d.grant_calls.load(Relaxed),
        d.grant_errors.load(Relaxed),
        d.grant_ipis.load(Relaxed),
        d.grant_cpus_flushed.load(Relaxed)
    );
    match counters(svm, d) {
        Ok(c) => format!(
            " grants={} grant_maps={} grant_unmaps={} grant_batches={} grant_flushes={} \
             grant_flushes_avoided={} grant_copies={}{kernel}",
            c.grants, c.maps, c.unmaps, c.batches, c.flushes, c.flushes_avoided, c.copies
        ),
        Err(_) => kernel,
    }
}
