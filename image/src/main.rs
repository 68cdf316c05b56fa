//! The boot image: the kernel, the server tasks, the guests, the in-image harness and the run report, assembled in one place.
//!
//! This crate is the only one that depends on everything, and it has no
//! privileged code of its own: it links the kernel (`kernel`, which owns
//! the boot entry, the allocator and the panic handler), embeds the MMU
//! server task (built by `cargo xtask`, see `build.rs`), links the guest
//! workloads (`guests`), and defines `umbra_image_main`, the one hook the
//! kernel calls once every CPU is online.
//!
//! - [`harness`]: what a boot runs (servers, transports, test lines).
//! - [`report`]: the run's report and verdicts.
//! - [`grants`]: the grant server's table, goals and leak check.
//! - [`conf`]: the MMU conformance scenarios on real frames.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod conf;
#[cfg(target_os = "none")]
mod grants;
#[cfg(target_os = "none")]
mod harness;
#[cfg(target_os = "none")]
mod report;

// Link the kernel: it owns the entry point, the allocator and the panic
// handler.
#[cfg(target_os = "none")]
use kernel as _;

/// Called by the kernel once every CPU is online (see `kernel::lib.rs`).
#[cfg(target_os = "none")]
#[no_mangle]
fn umbra_image_main(cmdline: &'static str) -> bool {
    harness::boot_hook(cmdline)
}

/// The command-line words the image understands (see `harness`).
#[cfg(target_os = "none")]
#[no_mangle]
fn umbra_image_words() -> &'static [&'static str] {
    harness::WORDS
}

/// The image is built only for `x86_64-unknown-none`; on the host it is empty.
#[cfg(not(target_os = "none"))]
fn main() {}
