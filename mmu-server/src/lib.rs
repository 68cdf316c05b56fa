//! Umbra's MMU servers: shadow paging policy as `no_std` state machines.
//!
//! - [`walk`]: the guest page walker (the architecture's rules, written down).
//! - [`shadow`]: plain shadow page-table trees.
//! - [`reference`](mod@reference): the reference server, simple and obviously correct.
//! - [`registry`]: the one list of implementations, by name.
//! - `sim` (feature `sim`): simulated physical memory for host tests.
//!
//! Servers reach memory only through [`abi::PhysMem`].
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

extern crate alloc;

pub mod fast;
pub mod reference;
pub mod registry;
pub mod shadow;
#[cfg(feature = "sim")]
pub mod sim;
pub mod walk;

/// Limits and machine parameters shared by every implementation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// The guest's MAXPHYADDR (physical address width, 32..=52): entry bits
    /// from it up to 51 are reserved.
    pub maxphyaddr: u8,
    /// The most domains at once.
    pub max_domains: u32,
    /// The most vCPUs at once (all domains).
    pub max_vcpus: u32,
    /// The most guest frames in one domain's memory map.
    pub max_guest_frames: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            maxphyaddr: 52,
            max_domains: 64,
            max_vcpus: 256,
            max_guest_frames: 1 << 24,
        }
    }
}
