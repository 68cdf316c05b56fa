//! A per-pCPU TLB model: caches every translation the simulated hardware
//! used or could have used (the machine fills it with every shadow
//! translation reachable after each step, as speculative walks may), tagged
//! with the vCPU (ASID) that may use it, and drops entries only when a flush
//! obligation says so or an access faults on them.

use crate::arch::{Rights, Size};
use abi::FlushScope;
use alloc::collections::BTreeMap;
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
    fn end(&self) -> u64 {
        self.va.saturating_add(self.size.bytes())
    }
}

/// The TLB of one pCPU, keyed by (vCPU, page start).
#[derive(Default, Debug)]
pub struct Tlb {
    entries: BTreeMap<(u32, u64), Entry>,
}

const SIZES: [Size; 3] = [Size::K4, Size::M2, Size::G1];

impl Tlb {
    /// The entry `vcpu` would use for `va`.
    pub fn lookup(&self, vcpu: u32, va: u64) -> Option<Entry> {
        SIZES.iter().find_map(|s| {
            self.entries
                .get(&(vcpu, va & !(s.bytes() - 1)))
                .filter(|e| e.size == *s)
                .copied()
        })
    }
    /// Caches `e`, replacing entries of the same vCPU that overlap it.
    pub fn insert(&mut self, e: Entry) {
        if self.entries.get(&(e.vcpu, e.va)) == Some(&e) {
            return;
        }
        for s in SIZES {
            let k = (e.vcpu, e.va & !(s.bytes() - 1));
            if self.entries.get(&k).is_some_and(|o| o.covers(e.va)) {
                self.entries.remove(&k);
            }
        }
        let inner: Vec<(u32, u64)> = self
            .entries
            .range((e.vcpu, e.va)..(e.vcpu, e.end()))
            .map(|(k, _)| *k)
            .collect();
        for k in inner {
            self.entries.remove(&k);
        }
        self.entries.insert((e.vcpu, e.va), e);
    }
    /// Caches `e` unless the vCPU already caches something overlapping it
    /// (a speculative fill never displaces an older, maybe stale, entry).
    pub fn insert_if_free(&mut self, e: Entry) {
        let overlaps = SIZES.iter().any(|s| {
            self.entries
                .get(&(e.vcpu, e.va & !(s.bytes() - 1)))
                .is_some_and(|o| o.covers(e.va))
        }) || self
            .entries
            .range((e.vcpu, e.va)..(e.vcpu, e.end()))
            .next()
            .is_some();
        if !overlaps {
            self.entries.insert((e.vcpu, e.va), e);
        }
    }
    /// Drops `vcpu`'s entries translating `va` (what a #PF does).
    pub fn drop_va(&mut self, vcpu: u32, va: u64) {
        for s in SIZES {
            let k = (vcpu, va & !(s.bytes() - 1));
            if self.entries.get(&k).is_some_and(|o| o.covers(va)) {
                self.entries.remove(&k);
            }
        }
    }
    /// Drops the entries of the vCPUs `mine` accepts that translate any
    /// address in `[start, start+len)`.
    pub fn flush_range(&mut self, start: u64, len: u64, mine: &dyn Fn(u32) -> bool) {
        let end = start.saturating_add(len);
        self.entries
            .retain(|_, e| !mine(e.vcpu) || e.end() <= start || e.va >= end);
    }
    /// Carries out one pCPU's part of a flush obligation with `scope`:
    /// `Page` and `Range` for the vCPUs `mine` accepts (the domain's),
    /// `All` and `AllReloadRoots` for every guest ASID on the pCPU.
    pub fn flush_scope(&mut self, scope: FlushScope, mine: &dyn Fn(u32) -> bool) {
        match scope {
            FlushScope::Page(g) => self.flush_range(g.0 & !0xfff, 4096, mine),
            FlushScope::Range { start, pages } => self.flush_range(
                start.0 & !0xfff,
                u64::from(pages).saturating_mul(4096),
                mine,
            ),
            FlushScope::All | FlushScope::AllReloadRoots => self.flush_all(),
        }
    }
    /// Drops everything.
    pub fn flush_all(&mut self) {
        self.entries.clear();
    }
    /// The entries of `vcpu`.
    pub fn of(&self, vcpu: u32) -> Vec<Entry> {
        self.entries
            .range((vcpu, 0)..=(vcpu, u64::MAX))
            .map(|(_, e)| *e)
            .collect()
    }
    /// Every entry.
    pub fn all(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
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
        let e = |va, size| Entry {
            vcpu: 1,
            va,
            size,
            hpa: 0,
            rights: r,
            dirty: false,
        };
        t.insert(e(0x20_0000, Size::M2));
        t.insert(e(0x1000, Size::K4));
        assert!(t.lookup(1, 0x3f_ffff).is_some());
        assert!(t.lookup(2, 0x3f_ffff).is_none());
        // A 4 KiB entry inside the 2 MiB one replaces it.
        t.insert(e(0x20_1000, Size::K4));
        assert_eq!(t.lookup(1, 0x20_0000), None);
        assert_eq!(t.lookup(1, 0x20_1008).map(|x| x.size), Some(Size::K4));
        // A 2 MiB entry replaces the 4 KiB ones inside it.
        t.insert(e(0, Size::M2));
        assert_eq!(t.lookup(1, 0x1000).map(|x| x.size), Some(Size::M2));
        t.flush_range(0x3f_f000, 0x1000, &|_| true);
        assert!(t.lookup(1, 0x20_1000).is_some());
        t.flush_range(0x20_1000, 0x1000, &|v| v == 2);
        assert!(t.lookup(1, 0x20_1000).is_some());
        t.flush_range(0x20_1000, 0x1000, &|v| v == 1);
        assert!(t.lookup(1, 0x20_1000).is_none());
        t.drop_va(1, 0x1000);
        assert_eq!(t.all().count(), 0);
    }
}
