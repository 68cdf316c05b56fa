//! Umbra's own guest kernels (the workloads): code linked into the boot image that runs only inside guests.
//!
//! The loader gives each domain a private copy of the boot image mapped at
//! the same addresses and starts every vCPU at [`work::guest_main`], which
//! runs the workload the loader named in `abi::guest::DomainInfo`. A guest
//! reaches the kernel only through exits: hypercalls (`abi::guest::hc`),
//! its console port and its exit port. This crate depends on `abi` alone,
//! so a guest cannot name a kernel symbol.
//!
//! - [`rt`]: the guest runtime (console, hypercalls, page faults, probes).
//! - [`work`]: the workloads, [`work::WORKLOADS`].
//! - [`split`]: the split-driver workloads (frontend/backend pairs over
//!   grant tables).
//! - [`platform`]: the workload that checks the PC the kernel emulates.
#![no_std]

pub mod platform;
pub mod rt;
pub mod split;
pub mod work;
