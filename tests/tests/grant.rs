//! The grant suite against the registered grant servers (over the
//! reference MMU server), and proof that it can fail: broken grant servers
//! (wrappers existing only here) must each be caught.

use abi::grant::{CopyDirection, GrantRef, GrantReply, GrantServer, MapHandle};
use abi::mmu::MemoryMap;
use abi::{DomainId, Gfn, Gpa};
use conformance::grant::{
    foreign_scenarios, grant_scenarios, run_grant_scenario, GrantFactory, RegisteredGrant,
};
use conformance::{Factory, Ram, Registered, SuitePhys, RAM_FRAMES};
use grant_server::MmuPort;
use std::sync::atomic::AtomicU64;

const RAM_BASE: u64 = 0x10_0000_0000;
const MMU: Registered = Registered("reference");

fn ram_words() -> Vec<AtomicU64> {
    (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect()
}

/// Runs every scenario over the MMU server `mmu`; returns the failures'
/// texts and the summed flush counts.
fn run_all_over(mmu: &dyn Factory, make: &dyn GrantFactory) -> (Vec<String>, u64, u64) {
    let mut failed = Vec::new();
    let (mut flushes, mut avoided) = (0, 0);
    for sc in grant_scenarios() {
        let words = ram_words();
        match run_grant_scenario(&sc, mmu, make, Ram::new(RAM_BASE, &words)) {
            Ok((_, c)) => {
                flushes += c.flushes;
                avoided += c.flushes_avoided;
            }
            Err(f) => failed.push(format!("{f}")),
        }
    }
    (failed, flushes, avoided)
}

/// [`run_all_over`] the reference MMU server.
fn run_all(make: &dyn GrantFactory) -> (Vec<String>, u64, u64) {
    run_all_over(&MMU, make)
}

#[test]
fn registered_grant_servers_pass_over_every_mmu_server() {
    for mmu in mmu_server::registry::NAMES {
        for name in grant_server::registry::NAMES {
            let (failed, flushes, avoided) = run_all_over(&Registered(mmu), &RegisteredGrant(name));
            assert!(
                failed.is_empty(),
                "{name} over {mmu} failed:\n{}",
                failed.join("\n")
            );
            assert!(
                flushes > 0,
                "{name} over {mmu}: the scenarios unmap accessed frames"
            );
            if *name == grant_server::registry::ACCESSED_HINT {
                assert!(avoided > 0, "{name} over {mmu}");
            }
        }
    }
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
        let (stats, c) = run_grant_scenario(
            &sc,
            &MMU,
            &RegisteredGrant(name),
            Ram::new(RAM_BASE, &words),
        )
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
    /// Answers `DestroyDomain` without forgetting the domain's grants and
    /// mappings (they leak).
    DestroyForgets,
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
        if self.bug == Bug::DestroyForgets {
            return GrantReply::Done { flush: None };
        }
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

/// The MMU side: the foreign-frame requests straight to every registered
/// MMU server.
#[test]
fn every_mmu_server_passes_the_foreign_frame_scenarios() {
    for mmu in mmu_server::registry::NAMES {
        for sc in foreign_scenarios() {
            let words = ram_words();
            let make = RegisteredGrant(grant_server::registry::ACCESSED_HINT);
            if let Err(f) =
                run_grant_scenario(&sc, &Registered(mmu), &make, Ram::new(RAM_BASE, &words))
            {
                panic!("{mmu}: {f}");
            }
        }
    }
}

/// An MMU server that never reports a foreign frame accessed (as if it made
/// grant leaves with A set and then ignored them, or read A non-atomically).
struct NeverAccessed<'a>(Box<dyn abi::MmuServer + 'a>);

impl abi::MmuServer for NeverAccessed<'_> {
    fn name(&self) -> &'static str {
        "never-accessed"
    }
    fn create_domain(&self, d: DomainId, m: &MemoryMap) -> abi::MmuReply {
        self.0.create_domain(d, m)
    }
    fn destroy_domain(&self, d: DomainId) -> abi::MmuReply {
        self.0.destroy_domain(d)
    }
    fn create_vcpu(&self, d: DomainId, v: abi::VcpuId) -> abi::MmuReply {
        self.0.create_vcpu(d, v)
    }
    fn vcpu_scheduled(&self, v: abi::VcpuId, p: abi::PcpuId) -> abi::MmuReply {
        self.0.vcpu_scheduled(v, p)
    }
    fn vcpu_descheduled(&self, v: abi::VcpuId, p: abi::PcpuId) -> abi::MmuReply {
        self.0.vcpu_descheduled(v, p)
    }
    fn page_fault(
        &self,
        v: abi::VcpuId,
        p: abi::PcpuId,
        g: abi::Gva,
        e: abi::PfErrorCode,
    ) -> abi::MmuReply {
        self.0.page_fault(v, p, g, e)
    }
    fn write_cr3(&self, v: abi::VcpuId, p: abi::PcpuId, c: abi::GuestCr3) -> abi::MmuReply {
        self.0.write_cr3(v, p, c)
    }
    fn set_paging_mode(&self, v: abi::VcpuId, p: abi::PcpuId, m: abi::PagingMode) -> abi::MmuReply {
        self.0.set_paging_mode(v, p, m)
    }
    fn invlpg(&self, v: abi::VcpuId, p: abi::PcpuId, g: abi::Gva) -> abi::MmuReply {
        self.0.invlpg(v, p, g)
    }
    fn emulated_write(
        &self,
        v: abi::VcpuId,
        p: abi::PcpuId,
        g: Gpa,
        x: u64,
        s: u8,
    ) -> abi::MmuReply {
        self.0.emulated_write(v, p, g, x, s)
    }
    fn enable_dirty_log(&self, d: DomainId) -> abi::MmuReply {
        self.0.enable_dirty_log(d)
    }
    fn disable_dirty_log(&self, d: DomainId) -> abi::MmuReply {
        self.0.disable_dirty_log(d)
    }
    fn get_and_clear_dirty(&self, d: DomainId, s: Gfn) -> abi::MmuReply {
        self.0.get_and_clear_dirty(d, s)
    }
    fn zap_all(&self, d: DomainId) -> abi::MmuReply {
        self.0.zap_all(d)
    }
    fn map_foreign(&self, d: DomainId, g: Gfn, o: DomainId, m: abi::Mfn, w: bool) -> abi::MmuReply {
        self.0.map_foreign(d, g, o, m, w)
    }
    fn unmap_foreign(&self, d: DomainId, g: Gfn) -> abi::MmuReply {
        match self.0.unmap_foreign(d, g) {
            abi::MmuReply::ForeignUnmapped {
                mfn, cpus, flush, ..
            } => abi::MmuReply::ForeignUnmapped {
                mfn,
                accessed: false,
                cpus,
                flush,
            },
            other => other,
        }
    }
}

struct NeverAccessedFactory;

impl Factory for NeverAccessedFactory {
    fn make<'a>(&self, phys: &'a SuitePhys<'a>) -> Result<Box<dyn abi::MmuServer + 'a>, String> {
        let inner = mmu_server::registry::create("reference", phys).map_err(|e| format!("{e}"))?;
        Ok(Box::new(NeverAccessed(inner)))
    }
}

#[test]
fn an_mmu_server_that_hides_accesses_is_caught() {
    let mut caught = Vec::new();
    for sc in foreign_scenarios() {
        let words = ram_words();
        let make = RegisteredGrant(grant_server::registry::ACCESSED_HINT);
        if let Err(f) = run_grant_scenario(
            &sc,
            &NeverAccessedFactory,
            &make,
            Ram::new(RAM_BASE, &words),
        ) {
            caught.push(format!("{f}"));
        }
    }
    assert!(
        caught
            .iter()
            .any(|f| f.contains("TLB holds a translation its domain may not use")),
        "the TLB model must catch it: {caught:#?}"
    );
    // The accessed-hint grant server over it fails the grant suite too.
    let (failed, ..) = run_all_over(
        &NeverAccessedFactory,
        &RegisteredGrant(grant_server::registry::ACCESSED_HINT),
    );
    assert!(!failed.is_empty());
}

#[test]
fn a_server_that_leaks_a_dead_domains_grants_is_caught() {
    for name in grant_server::registry::NAMES {
        let (failed, ..) = run_all(&BrokenFactory(name, Bug::DestroyForgets));
        assert!(
            failed.iter().any(|f| f.contains("nothing leaked")),
            "{name}:\n{}",
            failed.join("\n")
        );
    }
}
