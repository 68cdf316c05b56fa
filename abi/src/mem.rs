//! The narrow memory trait through which servers reach physical memory: the
//! kernel implements it over real frames, host tests over simulated memory.

use crate::addr::{Hpa, Mfn};
use core::fmt;
use serde::{Deserialize, Serialize};

/// Why a physical-memory access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemError {
    /// The address is not 8-byte aligned.
    Misaligned(Hpa),
    /// The address is not backed by memory this implementation may touch.
    OutOfRange(Hpa),
    /// The frame is not one this implementation may touch (or free).
    BadFrame(Mfn),
}

impl fmt::Display for MemError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemError::Misaligned(a) => write!(f, "physical address {a} is not 8-byte aligned"),
            MemError::OutOfRange(a) => write!(f, "physical address {a} is not backed by memory"),
            MemError::BadFrame(m) => write!(f, "frame {m} may not be used here"),
        }
    }
}

/// Physical memory as a server sees it: 64-bit words at host-physical
/// addresses, plus a pool of frames reserved for shadow page tables.
///
/// All methods take `&self`: implementations are shared between CPUs (host
/// threads in tests) and make each single-word access atomic. Addresses passed
/// to the word accessors must be 8-byte aligned; a misaligned or unbacked
/// address is an error, never a panic.
pub trait PhysMem: Send + Sync {
    /// Reads the 64-bit word at `at`.
    fn read_u64(&self, at: Hpa) -> Result<u64, MemError>;

    /// Writes the 64-bit word at `at`.
    fn write_u64(&self, at: Hpa, value: u64) -> Result<(), MemError>;

    /// Atomically replaces the word at `at` with `new` if it equals `current`.
    /// Returns `Ok(Ok(current))` on success and `Ok(Err(actual))` with the
    /// value found when it did not match.
    fn compare_exchange_u64(
        &self,
        at: Hpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemError>;

    /// Fills the 4 KiB frame with zeros.
    fn zero_frame(&self, frame: Mfn) -> Result<(), MemError>;

    /// Takes a frame from the shadow pool (its contents are unspecified), or
    /// `None` when the pool is empty.
    fn alloc_frame(&self) -> Option<Mfn>;

    /// Returns a frame taken with [`PhysMem::alloc_frame`] to the pool.
    /// Returning a frame that is not out of the pool is an error.
    fn free_frame(&self, frame: Mfn) -> Result<(), MemError>;
}
