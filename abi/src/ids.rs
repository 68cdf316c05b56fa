//! Identifiers (domains, vCPUs, pCPUs) and the CPU set used by flush
//! obligations.

use core::fmt;
use serde::{Deserialize, Serialize};

/// A domain (one guest with its own guest-physical memory map).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DomainId(pub u32);

/// A virtual CPU. vCPU ids are unique across all domains (a vCPU belongs to the
/// domain named when it was created).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VcpuId(pub u32);

/// A physical CPU, numbered densely from 0. Valid ids are below
/// [`CpuSet::MAX_CPUS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PcpuId(pub u32);

impl PcpuId {
    /// Whether this pCPU id fits in a [`CpuSet`].
    pub const fn is_valid(self) -> bool {
        self.0 < CpuSet::MAX_CPUS
    }
}

/// A set of physical CPUs (bit `n` = [`PcpuId`] `n`), at most 64 CPUs.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct CpuSet(pub u64);

impl CpuSet {
    /// The largest number of pCPUs a set can hold.
    pub const MAX_CPUS: u32 = 64;
    /// The empty set.
    pub const EMPTY: CpuSet = CpuSet(0);

    /// The set holding only `cpu` (empty if `cpu` is not valid).
    pub const fn single(cpu: PcpuId) -> CpuSet {
        if cpu.is_valid() {
            CpuSet(1 << cpu.0)
        } else {
            CpuSet(0)
        }
    }

    /// The set of pCPUs `0..n` (all 64 if `n >= 64`).
    pub const fn first(n: u32) -> CpuSet {
        if n >= 64 {
            CpuSet(u64::MAX)
        } else {
            CpuSet((1u64 << n) - 1)
        }
    }

    /// Whether the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of pCPUs in the set.
    pub const fn len(self) -> u32 {
        self.0.count_ones()
    }

    /// Whether `cpu` is in the set.
    pub const fn contains(self, cpu: PcpuId) -> bool {
        cpu.is_valid() && self.0 & (1 << cpu.0) != 0
    }

    /// Adds `cpu`; returns `false` (and changes nothing) if `cpu` is not valid.
    pub fn insert(&mut self, cpu: PcpuId) -> bool {
        if !cpu.is_valid() {
            return false;
        }
        self.0 |= 1 << cpu.0;
        true
    }

    /// Removes `cpu` (no-op if absent or invalid).
    pub fn remove(&mut self, cpu: PcpuId) {
        if cpu.is_valid() {
            self.0 &= !(1 << cpu.0);
        }
    }

    /// The union of two sets.
    pub const fn union(self, other: CpuSet) -> CpuSet {
        CpuSet(self.0 | other.0)
    }

    /// The intersection of two sets.
    pub const fn intersection(self, other: CpuSet) -> CpuSet {
        CpuSet(self.0 & other.0)
    }

    /// The pCPUs in `self` but not in `other`.
    pub const fn difference(self, other: CpuSet) -> CpuSet {
        CpuSet(self.0 & !other.0)
    }

    /// Whether every pCPU of `self` is in `other`.
    pub const fn is_subset(self, other: CpuSet) -> bool {
        self.0 & !other.0 == 0
    }

    /// Iterates over the pCPUs in the set, lowest first.
    pub const fn iter(self) -> CpuSetIter {
        CpuSetIter(self.0)
    }
}

impl fmt::Debug for CpuSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(|c| c.0)).finish()
    }
}

impl IntoIterator for CpuSet {
    type Item = PcpuId;
    type IntoIter = CpuSetIter;
    fn into_iter(self) -> CpuSetIter {
        self.iter()
    }
}

impl FromIterator<PcpuId> for CpuSet {
    fn from_iter<I: IntoIterator<Item = PcpuId>>(iter: I) -> Self {
        let mut s = CpuSet::EMPTY;
        for c in iter {
            s.insert(c);
        }
        s
    }
}

/// Iterator over the pCPUs of a [`CpuSet`], lowest id first.
#[derive(Clone, Debug)]
pub struct CpuSetIter(u64);

impl Iterator for CpuSetIter {
    type Item = PcpuId;
    fn next(&mut self) -> Option<PcpuId> {
        if self.0 == 0 {
            return None;
        }
        let bit = self.0.trailing_zeros();
        self.0 &= self.0 - 1;
        Some(PcpuId(bit))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let n = self.0.count_ones() as usize;
        (n, Some(n))
    }
}

impl ExactSizeIterator for CpuSetIter {}
