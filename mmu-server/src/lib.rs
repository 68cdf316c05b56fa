//! Umbra's MMU servers: shadow paging policy as `no_std` state machines.
//! (Filled by the MMU protocol issue.)
#![cfg_attr(not(test), no_std)]
pub mod fast;
