//! The guest builder: the guest's own frame allocator and page-table writes.
//!
//! Each address space has a supervisor direct map of the domain's RAM at
//! [`DIRECT`]; after the domain first runs, the guest edits its page tables
//! only by writing through it, like a real kernel (so write protection,
//! emulation and unsync are exercised).

use super::oracle::frame_digest;
use super::{Machine, Outcome, Res, DIRECT};
use crate::arch::{self, Access, Size};
use alloc::format;
use alloc::string::String;

impl<'m> Machine<'m> {
    // ---- guest memory --------------------------------------------------------

    /// A fresh zeroed guest frame of domain `d` (the guest's own allocator).
    pub fn alloc_gfn(&mut self, d: usize) -> u64 {
        let dom = &mut self.doms[d];
        let g = dom.next_gfn;
        let mut next = g + 1;
        if dom.mfn(next).is_none() {
            // Jump to the next region.
            next = dom
                .regions
                .iter()
                .map(|r| r.0)
                .filter(|&s| s > g)
                .min()
                .unwrap_or(next);
        }
        dom.next_gfn = next;
        g
    }

    /// The host frame behind guest frame `gfn` of domain `d`.
    pub fn mfn(&self, d: usize, gfn: u64) -> Option<u64> {
        self.doms[d].mfn(gfn)
    }

    /// Reads the guest word at `gpa` (no side effects).
    pub fn peek(&self, d: usize, gpa: u64) -> Option<u64> {
        let m = self.doms[d].mfn(gpa >> 12)?;
        self.ram.read((m << 12) | (gpa & 0xff8))
    }

    /// Writes the guest word at `gpa` before the domain ever ran (building
    /// its first tables); later writes must go through a vCPU.
    pub fn setup_write(&mut self, d: usize, gpa: u64, value: u64) -> Res<()> {
        if self.doms[d].started {
            return Err(self.fail(
                "scenario",
                None,
                String::from("setup writes only before the domain runs"),
                format!("setup write to {gpa:#x}"),
            ));
        }
        let Some(m) = self.doms[d].mfn(gpa >> 12) else {
            return Err(self.fail(
                "scenario",
                None,
                String::from("gpa in memory"),
                format!("{gpa:#x}"),
            ));
        };
        let hpa = (m << 12) | (gpa & 0xff8);
        let old = self.ram.read(hpa).unwrap_or(0);
        self.ram.write(hpa, value);
        self.doms[d].hist.record(gpa, old);
        // Not the guest's write: no harvest owes it.
        let idx = self.doms[d].index(gpa >> 12);
        if let Some(slot) = idx.and_then(|i| self.doms[d].dirty_digest.get_mut(i)) {
            *slot = frame_digest(self.ram, m);
        }
        Ok(())
    }
    // ---- conveniences for scenarios -----------------------------------------

    /// Maps `va` -> `gpa` with `size` and leaf `flags` in the tables at
    /// `cr3` of domain `d`, creating missing tables; writes go through vCPU
    /// `via` (its direct map) or, with `None`, are setup writes.
    #[allow(clippy::too_many_arguments)]
    pub fn map(
        &mut self,
        d: usize,
        via: Option<usize>,
        cr3: u64,
        va: u64,
        gpa: u64,
        size: Size,
        flags: u64,
    ) -> Res<()> {
        let leaf_level = match size {
            Size::K4 => 1,
            Size::M2 => 2,
            Size::G1 => 3,
        };
        let mut table = cr3 & arch::ADDR_MASK;
        for level in (leaf_level + 1..=4).rev() {
            let ea = table + arch::index(va, level) * 8;
            let e = self.peek(d, ea).unwrap_or(0);
            if e & arch::P != 0 && e & arch::PS == 0 {
                table = e & arch::ADDR_MASK;
                continue;
            }
            let t = self.alloc_gfn(d) << 12;
            self.guest_write(d, via, ea, t | arch::P | arch::RW | arch::US)?;
            table = t;
        }
        let ps = if size == Size::K4 { 0 } else { arch::PS };
        let ea = table + arch::index(va, leaf_level) * 8;
        self.guest_write(d, via, ea, gpa | flags | ps)
    }

    /// The gpa of the entry that maps `va` at `level` in tables at `cr3`.
    pub fn entry_addr(&self, d: usize, cr3: u64, va: u64, level: u32) -> Option<u64> {
        let mut table = cr3 & arch::ADDR_MASK;
        for l in (level + 1..=4).rev() {
            let e = self.peek(d, table + arch::index(va, l) * 8)?;
            if e & arch::P == 0 || e & arch::PS != 0 {
                return None;
            }
            table = e & arch::ADDR_MASK;
        }
        Some(table + arch::index(va, level) * 8)
    }

    /// Writes a guest word: a setup write (`via` None) or a supervisor write
    /// through vCPU `via`'s direct map (with paging off, at `gpa` itself),
    /// which must succeed.
    pub fn guest_write(&mut self, d: usize, via: Option<usize>, gpa: u64, value: u64) -> Res<()> {
        match via {
            None => self.setup_write(d, gpa, value),
            Some(v) => {
                let va = if self.vcpus[v].ctrl.paging {
                    // A hostile table pointer may name a gpa the direct map
                    // cannot reach: the wrapped address then faults.
                    DIRECT.wrapping_add(gpa)
                } else {
                    gpa
                };
                match self.access(v, va, Access::WRITE, value)? {
                    Outcome::Ok(_) => Ok(()),
                    o => Err(self.fail(
                        "guest page-table write through the direct map",
                        Some(va),
                        String::from("the write completes"),
                        format!("{o:?}"),
                    )),
                }
            }
        }
    }

    /// Adds the direct map (`DIRECT + gpa` -> gpa, supervisor RW, NX) of all
    /// of domain `d`'s memory to the tables at `cr3`. Entries of even frames
    /// are pre-dirtied (A and D set, as kernels map themselves), so a read
    /// through them may be given a writable shadow: unless the frame is a
    /// page table.
    pub fn map_direct(&mut self, d: usize, via: Option<usize>, cr3: u64) -> Res<()> {
        let regions = self.doms[d].regions.clone();
        for (gfn, _, pages) in regions {
            for g in gfn..gfn + pages {
                self.map(
                    d,
                    via,
                    cr3,
                    DIRECT + (g << 12),
                    g << 12,
                    Size::K4,
                    arch::P | arch::RW | arch::NX | if g % 2 == 0 { arch::A | arch::D } else { 0 },
                )?;
            }
        }
        Ok(())
    }

    /// A fresh address space for domain `d` with the direct map; returns its
    /// CR3 (the gpa of its PML4).
    pub fn new_space(&mut self, d: usize, via: Option<usize>) -> Res<u64> {
        let cr3 = self.alloc_gfn(d) << 12;
        self.map_direct(d, via, cr3)?;
        Ok(cr3)
    }
}
