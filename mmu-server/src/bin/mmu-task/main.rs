//! The MMU server task: every registered MMU server, run in ring 3 by the kernel's task transport.
//!
//! One binary holds the whole registry ([`mmu_server::registry`]); the
//! kernel's `Init` message names the implementation to create, the shadow
//! pool and the guest MAXPHYADDR. Each request is `MmuRequest` bytes in the
//! calling pCPU's buffer, answered by `abi::dispatch`. The servers keep
//! `&self` with their own locks, so several pCPUs may be inside at once.
//!
//! For the kernel's containment tests the binary also answers to the names
//! in [`misbehave::NAMES`]: the reference server with one deliberate fault.
//! They are not in the registry, so `--mmu all` never picks them.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(all(target_os = "none", not(umbra_task)))]
compile_error!("the MMU task is built by `cargo xtask` (it passes --cfg umbra_task)");

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod misbehave;
#[cfg(target_os = "none")]
mod serve;

/// Keeps the runtime's entry point in the link (the linker script names it).
#[cfg(target_os = "none")]
#[used]
static ENTRY: unsafe extern "C" fn() -> ! = task_rt::rt::umbra_task_entry;

/// On the host the task is empty: it is built only for `x86_64-unknown-none`.
#[cfg(not(target_os = "none"))]
fn main() {}
