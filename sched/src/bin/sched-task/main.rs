//! The scheduler server task: every registered scheduler policy, run in ring 3 by the kernel's task transport.
//!
//! One binary holds the whole registry ([`sched::registry`]); the kernel's
//! `Init` message (an `abi::task::TaskInit`) names the policy to create in
//! `implementation` (its other fields, the MMU server's pool and
//! MAXPHYADDR, mean nothing here). Each request is `SchedRequest` bytes in
//! the calling pCPU's buffer, answered by `abi::sched::dispatch`. The
//! policies take `&self` with their own lock, so several pCPUs may be
//! inside at once. For the kernel's tests it also answers to the names
//! `misbehave-twice` and `misbehave-unknown` (see `misbehave`), which are
//! not in the registry.
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(all(target_os = "none", not(umbra_task)))]
compile_error!("the scheduler task is built by `cargo xtask` (it passes --cfg umbra_task)");

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
