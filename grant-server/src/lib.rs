//! Grant server: grant tables between domains (grant, map, batched unmap,
//! copy, end access) returning TLB flush hints from the Accessed bit.
//!
//! - [`table`]: the grant table state machine, [`GrantTable`], generic over
//!   its flush policy.
//! - [`policy`]: the flush policies, `always-flush` (Xen upstream: one flush
//!   of the dirty mask per unmap batch) and `accessed-hint` (no flush when no
//!   shadow entry of the unmapped frames had A set).
//! - [`port`]: [`MmuPort`], the server's only way to the MMU server (the
//!   kernel's IPC door in the image, [`DispatchPort`] over the wire on the
//!   host).
//! - [`registry`]: the one list of implementations, by name.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod policy;
pub mod port;
pub mod registry;
pub mod table;

pub use port::{DispatchPort, MmuPort};
pub use table::{Config, GrantTable};
