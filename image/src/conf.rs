//! The MMU conformance suite's scripted scenarios in the image: the same `no_std` scripts as on the host,
//! run against an MMU implementation over
//! real frames (a contiguous block reached through the identity map).

use conformance::{run_scenario, scenarios, Ram, Registered, RAM_FRAMES};
use core::sync::atomic::AtomicU64;
use kernel::kprintln;
use kernel::svm::host;

/// Runs every scripted scenario against implementation `name`, printing one
/// `test conf-<name>-<scenario> ... ok|FAILED` line each; returns (passed,
/// failed).
pub fn run_all(name: &'static str) -> (u32, u32) {
    let base = match host::alloc_zeroed(RAM_FRAMES) {
        Ok(b) => b,
        Err(e) => {
            kprintln!("test conf-{name}-setup ... FAILED: {e}");
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
        match run_scenario(sc, &Registered(name), Ram::new(base, words)) {
            Ok(_) => {
                passed += 1;
                kprintln!("test conf-{name}-{} ... ok", sc.name);
            }
            Err(f) => {
                failed += 1;
                kprintln!("test conf-{name}-{} ... FAILED: {f}", sc.name);
            }
        }
    }
    host::free(base, RAM_FRAMES);
    (passed, failed)
}
