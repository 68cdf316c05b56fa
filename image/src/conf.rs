//! The conformance suites' scripted scenarios in the image: the same `no_std` scripts as on the host,
//! run over real frames (a contiguous block reached through the identity
//! map): the MMU suite against an MMU implementation, and the grant suite
//! against every grant server over that MMU implementation.

use alloc::format;
use alloc::string::String;
use conformance::grant::{grant_scenarios, run_grant_scenario, RegisteredGrant};
use conformance::{run_scenario, scenarios, Ram, Registered, RAM_FRAMES};
use core::sync::atomic::AtomicU64;
use kernel::kprintln;
use kernel::svm::host;

/// Runs every scripted MMU scenario against implementation `name`, then
/// every grant scenario against each registered grant server over it,
/// printing one `test conf-<name>-<scenario> ... ok|FAILED` (MMU) or
/// `test gconf-<grant>-<name>-<scenario> ...` (grant) line each; returns
/// (passed, failed).
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
    let fresh = || {
        // SAFETY: as above; no reference into the block outlives a scenario.
        unsafe { core::ptr::write_bytes(host::va(base), 0, (RAM_FRAMES * 4096) as usize) };
        Ram::new(base, words)
    };
    let (mut passed, mut failed) = (0, 0);
    let mut line = |test: String, result: Result<(), String>| match result {
        Ok(()) => {
            passed += 1;
            kprintln!("test {test} ... ok");
        }
        Err(f) => {
            failed += 1;
            kprintln!("test {test} ... FAILED: {f}");
        }
    };
    for sc in scenarios() {
        let r = run_scenario(sc, &Registered(name), fresh());
        line(
            format!("conf-{name}-{}", sc.name),
            r.map(|_| ()).map_err(|f| format!("{f}")),
        );
    }
    for grant in grant_server::registry::NAMES {
        for sc in grant_scenarios() {
            let r = run_grant_scenario(&sc, &Registered(name), &RegisteredGrant(grant), fresh());
            line(
                format!("gconf-{grant}-{name}-{}", sc.name),
                r.map(|_| ()).map_err(|f| format!("{f}")),
            );
        }
    }
    host::free(base, RAM_FRAMES);
    (passed, failed)
}
