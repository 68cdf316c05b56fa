//! A per-pCPU TLB model: caches every translation the simulated hardware
//! used, tagged with the vCPU (ASID) that used it, and drops entries only
//! when a flush obligation says so or an access faults on them.

use crate::arch::{Rights, Size};
use alloc::vec::Vec;

/// One cached translation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The vCPU (ASID) the entry belongs to (suite-wide vCPU key).
    pub vcpu: u32,
    /// Start of the virtual page (aligned to `size`).
    pub va: u64,
    /// Page size of the shadow leaf it came from.
    pub size: Size,
    /// Host-physical start of the page.
    pub hpa: u64,
    /// Rights of the shadow translation.
    pub rights: Rights,
    /// The shadow leaf's D bit was set when cached (a write through a clean
    /// entry walks again, as hardware does to set D).
    pub dirty: bool,
}

impl Entry {
    /// Whether the entry translates `va`.
    pub fn covers(&self, va: u64) -> bool {
        va & !(self.size.bytes() - 1) == self.va
    }
}

/// The TLB of one pCPU.
#[derive(Default, Debug)]
pub struct Tlb {
    /// Cached translations (at most one per vCPU and page).
    pub entries: Vec<Entry>,
}

impl Tlb {
    /// The entry `vcpu` would use for `va`.
    pub fn lookup(&self, vcpu: u32, va: u64) -> Option<Entry> {
        self.entries
            .iter()
            .find(|e| e.vcpu == vcpu && e.covers(va))
            .copied()
    }
    /// Caches `e`, replacing entries of the same vCPU that overlap it.
    pub fn insert(&mut self, e: Entry) {
        self.entries
            .retain(|o| !(o.vcpu == e.vcpu && (o.covers(e.va) || e.covers(o.va))));
        self.entries.push(e);
    }
    /// Drops `vcpu`'s entries translating `va` (what a #PF does).
    pub fn drop_va(&mut self, vcpu: u32, va: u64) {
        self.entries.retain(|e| !(e.vcpu == vcpu && e.covers(va)));
    }
    /// Drops every entry translating any address in `[start, start+len)`.
    pub fn flush_range(&mut self, start: u64, len: u64) {
        let end = start.saturating_add(len);
        self.entries
            .retain(|e| e.va.saturating_add(e.size.bytes()) <= start || e.va >= end);
    }
    /// Drops everything.
    pub fn flush_all(&mut self) {
        self.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flushes_by_range_and_large_pages() {
        let r = Rights {
            write: true,
            user: true,
            nx: false,
        };
        let mut t = Tlb::default();
        t.insert(Entry {
            vcpu: 1,
            va: 0x20_0000,
            size: Size::M2,
            hpa: 0,
            rights: r,
            dirty: false,
        });
        t.insert(Entry {
            vcpu: 1,
            va: 0x1000,
            size: Size::K4,
            hpa: 0,
            rights: r,
            dirty: false,
        });
        assert!(t.lookup(1, 0x3f_ffff).is_some());
        assert!(t.lookup(2, 0x3f_ffff).is_none());
        t.flush_range(0x3f_f000, 0x1000);
        assert!(t.lookup(1, 0x20_0000).is_none());
        assert!(t.lookup(1, 0x1fff).is_some());
        t.drop_va(1, 0x1000);
        assert!(t.entries.is_empty());
    }
}
