//! Every scripted conformance scenario against `fast-shared`, `fast-percpu`
//! and `fast-dbit` (and the reference, as a control), built through the
//! registry exactly as `cargo xtask conformance` does, plus D-bit logging
//! with per-pCPU L4 copies (not registered).

use conformance::{run_scenario, scenarios, Ram, SuitePhys, RAM_FRAMES};
use core::sync::atomic::AtomicU64;
use mmu_server::fast::policy::PerPcpuCopies;
use mmu_server::fast::{DirtyMode, FastServer};
use mmu_server::registry;

fn shared<'a>(p: &'a SuitePhys<'a>) -> Box<dyn abi::MmuServer + 'a> {
    registry::create(registry::FAST_SHARED, p).expect("registered")
}

fn percpu<'a>(p: &'a SuitePhys<'a>) -> Box<dyn abi::MmuServer + 'a> {
    registry::create(registry::FAST_PERCPU, p).expect("registered")
}

/// A server constructor as the suite's [`conformance::Factory`].
struct F(for<'a> fn(&'a SuitePhys<'a>) -> Box<dyn abi::MmuServer + 'a>);

impl conformance::Factory for F {
    fn make<'a>(&self, phys: &'a SuitePhys<'a>) -> Result<Box<dyn abi::MmuServer + 'a>, String> {
        Ok((self.0)(phys))
    }
}

/// Runs every scenario; returns the failures.
fn failures(make: conformance::MakeServer<'_>) -> Vec<(&'static str, String)> {
    let mut failed = Vec::new();
    for sc in scenarios() {
        let words: Vec<AtomicU64> = (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
        let ram = Ram::new(0x100_0000, &words);
        if let Err(f) = run_scenario(sc, make, ram) {
            failed.push((sc.name, format!("{f}")));
        }
    }
    failed
}

/// The fast server must pass every scenario the reference passes (a
/// scenario the reference fails too is a suite bug, reported by the suite's
/// own run).
fn dbits<'a>(p: &'a SuitePhys<'a>) -> Box<dyn abi::MmuServer + 'a> {
    registry::create(registry::FAST_DBIT, p).expect("registered")
}

fn dbits_percpu<'a>(p: &'a SuitePhys<'a>) -> Box<dyn abi::MmuServer + 'a> {
    Box::new(FastServer::<PerPcpuCopies>::with_dirty_mode(
        "fast-percpu-dbits",
        p,
        mmu_server::Config::default(),
        DirtyMode::DirtyBits,
    ))
}

fn suite(name: &str, make: conformance::MakeServer<'_>) {
    static CONTROL: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let control = CONTROL.get_or_init(|| failures(&F(reference)).iter().map(|f| f.0).collect());
    let failed: Vec<String> = failures(make)
        .into_iter()
        .filter(|f| !control.contains(&f.0))
        .map(|f| f.1)
        .collect();
    assert!(
        failed.is_empty(),
        "{name}: {} of {} scenarios failed:\n{}",
        failed.len(),
        scenarios().len(),
        failed.join("\n")
    );
}

#[test]
fn scenarios_fast_shared() {
    suite(registry::FAST_SHARED, &F(shared));
}

#[test]
fn scenarios_fast_percpu() {
    suite(registry::FAST_PERCPU, &F(percpu));
}

fn reference<'a>(p: &'a SuitePhys<'a>) -> Box<dyn abi::MmuServer + 'a> {
    registry::create("reference", p).expect("registered")
}

#[test]
fn scenarios_fast_dirty_bits() {
    suite(registry::FAST_DBIT, &F(dbits));
    suite("fast-percpu-dbits", &F(dbits_percpu));
}

/// Random sequences of the suite that once failed the fast servers (longer
/// than the runner's default 4000 steps): `0x5eed0071` zapped a shadow page
/// twice in one emulated write (once as the child of another page the write
/// zapped), freeing its frame twice; `0x5eed003f` built a walk whose path
/// shadowed the leaf's own frame as a table and still installed the leaf
/// writable (W1).
#[test]
fn random_regressions() {
    let names = [
        registry::FAST_SHARED,
        registry::FAST_PERCPU,
        registry::FAST_DBIT,
    ];
    for name in names {
        for seed in [0x5eed_0071, 0x5eed_003f, 0x5eed_0000] {
            let words: Vec<AtomicU64> = (0..RAM_FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
            let ram = Ram::new(0x10_0000_0000, &words);
            let r = conformance::run_random(seed, 6000, &conformance::Registered(name), ram);
            assert!(
                r.is_ok(),
                "{name}: {}",
                r.err().map(|f| f.to_string()).unwrap_or_default()
            );
        }
    }
}
