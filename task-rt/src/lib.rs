//! The ring-3 runtime of Umbra's server tasks, and the one `PhysMem` over a physical window.
//!
//! - [`mem`]: [`mem::WindowMem`], `abi::PhysMem` over frames mapped at a
//!   fixed offset (the task's window, or the kernel's identity map for the
//!   direct transport), limited to the served ranges and a shadow pool.
//! - [`init`]: the answer to the `Init` message every task gives the same
//!   way (decode the `TaskInit`, create the named server, reply).
//! - `rt` (only with `--cfg umbra_task`, which `cargo xtask` sets when it
//!   builds a task binary): what a server task needs and nothing more: the
//!   entry point, the system calls, the heap, the panic report.
//!
//! Nothing here is privileged: it runs in ring 3 inside a task and reaches
//! the kernel only through `int 0x80` (see `abi::task`).
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod init;
pub mod mem;
#[cfg(all(umbra_task, target_os = "none"))]
pub mod rt;
