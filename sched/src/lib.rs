//! Umbra's scheduler server: vCPU placement and time slicing as swappable
//! policies behind [`abi::SchedServer`].
//!
//! - [`server`]: the machinery every policy shares (the vCPU table, the idle
//!   pCPUs, kicks, the checks on every event) around a small [`Policy`].
//! - [`pinned`], [`global_rr`], [`credit`]: the policies; each module doc
//!   states its algorithm and its guarantees.
//! - [`registry`]: the one list of policies, by name.
//! - [`conformance`]: the black-box suite any scheduler server must pass.
//!
//! `no_std` + `alloc`: the same code runs in host tests and as a
//! ring-3 task (`src/bin/sched-task`).
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod conformance;
pub mod credit;
pub mod global_rr;
pub mod pinned;
pub mod registry;
pub mod server;

pub use server::{Policy, Server, VcpuInfo};

use abi::Micros;

/// Parameters every policy takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The longest slice handed out (at most [`abi::sched::MAX_SLICE`]).
    pub slice: Micros,
}

/// The default slice: 1 ms.
pub const DEFAULT_SLICE: Micros = Micros(1_000);

impl Default for Config {
    fn default() -> Self {
        Config {
            slice: DEFAULT_SLICE,
        }
    }
}

impl Config {
    /// The slice, clamped into `1 us ..= MAX_SLICE` (a policy never hands
    /// out a slice the kernel would refuse).
    pub fn slice(&self) -> Micros {
        Micros(self.slice.0.clamp(1, abi::sched::MAX_SLICE.0))
    }
}
