//! The grant suite against the registered grant servers (over the
//! reference MMU server), and proof that it can fail: broken grant servers
//! (wrappers existing only here) must each be caught.

use abi::grant::{CopyDirection, GrantRef, GrantReply, GrantServer, MapHandle};
use abi::mmu::MemoryMap;
use abi::{DomainId, Gfn, Gpa};
use conformance::grant::{grant_scenarios, run_grant_scenario, GrantFactory, RegisteredGrant};
use conformance::{Ram, RAM_FRAMES};
use grant_server::MmuPort;
use std::sync::atomic::AtomicU64;

const RAM_BASE: u64 = 0x10_0000_0000;
const MMU: &str = "reference";

fn ram_words() -> Vec<AtomicU64> {
    (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect()
}

/// Runs every scenario; returns the names of those that failed (with the
/// first failure's text) and the summed flush counts.
fn run_all(make: &dyn GrantFactory) -> (Vec<String>, u64, u64) {
    let mut failed = Vec::new();
    let (mut flushes, mut avoided) = (0, 0);
    for sc in grant_scenarios() {
        let words = ram_words();
        match run_grant_scenario(&sc, MMU, make, Ram::new(RAM_BASE, &words)) {
            Ok((_, c)) => {
                flushes += c.flushes;
                avoided += c.flushes_avoided;
            }
            Err(f) => failed.push(format!("{f}")),
        }
    }
    (failed, flushes, avoided)
}

#[test]
fn registered_grant_servers_pass() {
    for name in grant_server::registry::NAMES {
        let (failed, flushes, avoided) = run_all(&RegisteredGrant(name));
        assert!(failed.is_empty(), "{name} failed:\n{}", failed.join("\n"));
        assert!(flushes > 0, "{name}: the scenarios unmap accessed frames");
        match *name {
            grant_server::registry::ALWAYS_FLUSH => assert_eq!(avoided, 0, "{name}"),
            grant_server::registry::ACCESSED_HINT => assert!(avoided > 0, "{name}"),
            other => panic!("unexpected registered name {other}"),
        }
    }
}

/// The block path: a batch of grants never touched by the mapper needs no
/// flush with the accessed-bit hint, and one flush without it.
#[test]
fn unaccessed_batch_flushes_only_without_the_hint() {
    let sc = grant_scenarios()
        .into_iter()
        .find(|s| s.name == "unaccessed_batch")
        .expect("scenario");
    for (name, want_flushes, want_avoided) in [
        (grant_server::registry::ALWAYS_FLUSH, 1, 0),
        (grant_server::registry::ACCESSED_HINT, 0, 1),
    ] {
        let words = ram_words();
        let (stats, c) =
            run_grant_scenario(&sc, MMU, &RegisteredGrant(name), Ram::new(RAM_BASE, &words))
                .unwrap_or_else(|f| panic!("{f}"));
        assert_eq!(
            (c.flushes, c.flushes_avoided),
            (want_flushes, want_avoided),
            "{name}"
        );
        assert_eq!(c.batches, 1, "{name}");
        assert_eq!(c.unmaps, 8, "{name}");
        assert_eq!(stats.stale, 0);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Bug {
    None,
    /// Drops the flush obligation of every unmap reply.
    SkipFlush,
    /// Makes every grant writable (a read-only grant can be written).
    WritableReadOnly,
    /// Ends access even while the reference is mapped (by unmapping
    /// nothing and forgetting the grant): as if the status were cleared
    /// too early.
    EndAccessWhileMapped,
}

struct Broken<'a> {
    inner: Box<dyn GrantServer + 'a>,
    bug: Bug,
}

impl GrantServer for Broken<'_> {
    fn name(&self) -> &'static str {
        "broken"
    }
    fn create_domain(&self, d: DomainId, m: &MemoryMap) -> GrantReply {
        self.inner.create_domain(d, m)
    }
    fn destroy_domain(&self, d: DomainId) -> GrantReply {
        self.inner.destroy_domain(d)
    }
    fn grant(&self, d: DomainId, g: GrantRef, to: DomainId, gfn: Gfn, ro: bool) -> GrantReply {
        let ro = ro && self.bug != Bug::WritableReadOnly;
        self.inner.grant(d, g, to, gfn, ro)
    }
    fn end_access(&self, d: DomainId, g: GrantRef) -> GrantReply {
        let r = self.inner.end_access(d, g);
        if self.bug == Bug::EndAccessWhileMapped {
            if let GrantReply::Error { .. } = r {
                return GrantReply::Done { flush: None };
            }
        }
        r
    }
    fn map(&self, d: DomainId, g: DomainId, r: GrantRef, gfn: Gfn, w: bool) -> GrantReply {
        self.inner.map(d, g, r, gfn, w)
    }
    fn unmap(&self, d: DomainId, h: &[MapHandle]) -> GrantReply {
        match self.inner.unmap(d, h) {
            GrantReply::Unmapped { status, .. } if self.bug == Bug::SkipFlush => {
                GrantReply::Unmapped {
                    status,
                    flush: None,
                }
            }
            other => other,
        }
    }
    fn copy(
        &self,
        d: DomainId,
        g: DomainId,
        r: GrantRef,
        off: u16,
        local: Gpa,
        len: u16,
        dir: CopyDirection,
    ) -> GrantReply {
        self.inner.copy(d, g, r, off, local, len, dir)
    }
    fn counters(&self, d: Option<DomainId>) -> GrantReply {
        self.inner.counters(d)
    }
}

struct BrokenFactory(&'static str, Bug);

impl GrantFactory for BrokenFactory {
    fn make<'a>(&self, port: &'a dyn MmuPort) -> Result<Box<dyn GrantServer + 'a>, String> {
        let inner = grant_server::registry::create(self.0, port).map_err(|e| format!("{e}"))?;
        Ok(Box::new(Broken { inner, bug: self.1 }))
    }
}

#[test]
fn the_unbroken_wrapper_passes() {
    for name in grant_server::registry::NAMES {
        let (failed, ..) = run_all(&BrokenFactory(name, Bug::None));
        assert!(failed.is_empty(), "{name}:\n{}", failed.join("\n"));
    }
}

#[test]
fn a_server_that_skips_a_needed_flush_is_caught() {
    for name in grant_server::registry::NAMES {
        let (failed, ..) = run_all(&BrokenFactory(name, Bug::SkipFlush));
        assert!(
            !failed.is_empty(),
            "{name}: skipping flushes went unnoticed"
        );
        assert!(
            failed
                .iter()
                .any(|f| f.contains("TLB holds a translation its domain may not use")),
            "{name}: caught, but not by the TLB model:\n{}",
            failed.join("\n")
        );
    }
}

#[test]
fn a_server_that_lets_a_read_only_grant_be_written_is_caught() {
    for name in grant_server::registry::NAMES {
        let (failed, ..) = run_all(&BrokenFactory(name, Bug::WritableReadOnly));
        assert!(
            failed
                .iter()
                .any(|f| f.contains("read-only grant mapped writable")),
            "{name}:\n{}",
            failed.join("\n")
        );
    }
}

#[test]
fn a_server_that_ends_access_while_mapped_is_caught() {
    for name in grant_server::registry::NAMES {
        let (failed, ..) = run_all(&BrokenFactory(name, Bug::EndAccessWhileMapped));
        assert!(
            failed
                .iter()
                .any(|f| f.contains("ending access while mapped")),
            "{name}:\n{}",
            failed.join("\n")
        );
    }
}
