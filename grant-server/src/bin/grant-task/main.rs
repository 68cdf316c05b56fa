//! The grant server task: every registered grant server, run in ring 3 by the kernel's task transport.
//!
//! One binary holds the whole registry ([`grant_server::registry`]); the
//! kernel's `Init` message names the implementation in `implementation`
//! (the pool fields mean nothing here: a grant server owns no memory). Each
//! request is `GrantRequest` bytes in the calling pCPU's buffer, answered by
//! `abi::grant::grant_dispatch`. The server reaches the MMU server through
//! the kernel, with `SYS_CALL` to `abi::task::PORT_MMU` (see `port`).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(all(target_os = "none", not(umbra_task)))]
compile_error!("the grant task is built by `cargo xtask` (it passes --cfg umbra_task)");

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
mod serve;

/// Keeps the runtime's entry point in the link (the linker script names it).
#[cfg(target_os = "none")]
#[used]
static ENTRY: unsafe extern "C" fn() -> ! = task_rt::rt::umbra_task_entry;

/// On the host the task is empty: it is built only for `x86_64-unknown-none`.
#[cfg(not(target_os = "none"))]
fn main() {}
