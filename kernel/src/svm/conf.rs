//! The conformance suite's scripted scenarios in the image: the same
//! `no_std` scripts as on the host, run against an MMU implementation over
//! real frames (a contiguous block reached through the identity map).

use super::host;
use alloc::boxed::Box;
use conformance::{run_scenario, scenarios, Ram, SuitePhys, RAM_FRAMES};
use core::sync::atomic::AtomicU64;

/// Runs every scripted scenario against implementation `name`, printing one
/// `test conf-<name>-<scenario> ... ok|FAILED` line each; returns (passed,
/// failed).
pub fn run_all(name: &str) -> (u32, u32) {
    let base = match host::alloc_zeroed(RAM_FRAMES) {
        Ok(b) => b,
        Err(e) => {
            crate::kprintln!("test conf-{name}-setup ... FAILED: {e}");
            return (0, 1);
        }
    };
    // SAFETY: the block was just taken from the frame allocator, is
    // identity-mapped, 4 KiB aligned and used only through this slice (as
    // atomics) until it is freed below.
    let words: &[AtomicU64] = unsafe {
        core::slice::from_raw_parts(
            host::va(base).cast::<AtomicU64>(),
            (RAM_FRAMES * 512) as usize,
        )
    };
    let (mut passed, mut failed) = (0, 0);
    for sc in scenarios() {
        // SAFETY: as above; no reference into the block outlives a scenario.
        unsafe { core::ptr::write_bytes(host::va(base), 0, (RAM_FRAMES * 4096) as usize) };
        let make = higher_ranked(|phys| match mmu_server::registry::create(name, phys) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        });
        match run_scenario(sc, &make, Ram::new(base, words)) {
            Ok(stats) => {
                passed += 1;
                crate::kprintln!(
                    "test conf-{name}-{} ... ok ({} steps)",
                    sc.name,
                    stats.steps
                );
            }
            Err(f) => {
                failed += 1;
                crate::kprintln!("test conf-{name}-{} ... FAILED: {f}", sc.name);
            }
        }
    }
    host::free(base, RAM_FRAMES);
    (passed, failed)
}

/// Pins a closure to the higher-ranked signature `MakeServer` wants.
fn higher_ranked<F>(f: F) -> F
where
    F: for<'a> Fn(&'a SuitePhys<'a>) -> Box<dyn abi::MmuServer + 'a>,
{
    f
}
