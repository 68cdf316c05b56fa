//! Counters for the run's report: per pCPU, updated by the CPU itself
//! (relaxed atomics), summed at the end.

use super::exit::BUCKETS;
use core::sync::atomic::{AtomicU64, Ordering};

/// One pCPU's counters.
pub struct PcpuStats {
    /// Exits by report bucket.
    pub exits: [AtomicU64; BUCKETS],
    /// #PF exits the server fixed (Resume).
    pub fixed: AtomicU64,
    /// #PF exits injected into the guest.
    pub injected: AtomicU64,
    /// Page-table writes emulated for the server.
    pub emulated: AtomicU64,
    /// Zaps asked for (ZapAll requests and AllReloadRoots obligations).
    pub zaps: AtomicU64,
    /// Flush obligations carried out.
    pub obligations: AtomicU64,
    /// Shootdown IPIs sent for guest flushes.
    pub ipis: AtomicU64,
    /// CPUs told to flush (the local one included).
    pub cpus_flushed: AtomicU64,
    /// Messages exchanged with the MMU server.
    pub mmu_calls: AtomicU64,
}

impl PcpuStats {
    /// All zero.
    pub const fn new() -> PcpuStats {
        PcpuStats {
            exits: [const { AtomicU64::new(0) }; BUCKETS],
            fixed: AtomicU64::new(0),
            injected: AtomicU64::new(0),
            emulated: AtomicU64::new(0),
            zaps: AtomicU64::new(0),
            obligations: AtomicU64::new(0),
            ipis: AtomicU64::new(0),
            cpus_flushed: AtomicU64::new(0),
            mmu_calls: AtomicU64::new(0),
        }
    }
}

impl Default for PcpuStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Adds one.
pub fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Reads.
pub fn get(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// The counters of every possible pCPU.
pub static STATS: [PcpuStats; 64] = [const { PcpuStats::new() }; 64];
