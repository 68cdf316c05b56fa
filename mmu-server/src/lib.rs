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

use abi::mmu::{MemoryMap, MmuError, Resource};
use abi::Gfn;

/// The most foreign frames (grant mappings) mapped into one domain at once,
/// in every implementation.
pub const MAX_FOREIGN_PER_DOMAIN: u32 = 1024;

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

impl Config {
    /// Checks a domain's memory map against these limits: every region
    /// valid, no two regions overlapping, at most `max_guest_frames` frames
    /// in all. Returns the number of guest frames, or the error reply's
    /// reason naming the offending region, frame or limit.
    pub fn check_memory_map(&self, memory: &MemoryMap) -> Result<u64, MmuError> {
        let mut total: u64 = 0;
        for (i, r) in memory.iter().enumerate() {
            if !r.is_valid() {
                return Err(MmuError::BadRegion(*r));
            }
            if let Some(o) = memory[..i]
                .iter()
                .find(|o| r.gfn.0 < o.gfn.0 + o.pages && o.gfn.0 < r.gfn.0 + r.pages)
            {
                return Err(MmuError::OverlappingRegions(Gfn(r.gfn.0.max(o.gfn.0))));
            }
            total = total.saturating_add(r.pages);
        }
        if total > self.max_guest_frames {
            return Err(MmuError::CapacityExceeded {
                what: Resource::GuestFrames,
                limit: u32::try_from(self.max_guest_frames).unwrap_or(u32::MAX),
            });
        }
        Ok(total)
    }
}
