//! Plain shadow page-table trees: install a 4 KiB leaf, collect every frame of
//! a tree, and write-protect every leaf. Used by the reference server; every
//! access goes through [`PhysMem`].

use crate::walk::{PTE_A, PTE_ADDR_MASK, PTE_D, PTE_P, PTE_RW, PTE_US};
use abi::{Gva, Hpa, MemError, Mfn, PhysMem};
use alloc::vec::Vec;

/// Flags of a shadow non-leaf entry: all permissions live in the leaves.
pub const NONLEAF_FLAGS: u64 = PTE_P | PTE_RW | PTE_US | PTE_A;

/// Why a leaf could not be installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstallError {
    /// The shadow pool is empty.
    OutOfPool,
    /// Host memory failed.
    Memory(MemError),
}

impl From<MemError> for InstallError {
    fn from(e: MemError) -> Self {
        InstallError::Memory(e)
    }
}

fn entry(table: Mfn, index: usize) -> Hpa {
    Hpa(table.base().0.wrapping_add(8 * index as u64))
}

/// Takes a frame from the pool and zeroes it.
pub fn alloc_table<M: PhysMem + ?Sized>(mem: &M) -> Result<Mfn, InstallError> {
    let f = mem.alloc_frame().ok_or(InstallError::OutOfPool)?;
    if let Err(e) = mem.zero_frame(f) {
        // Give it back; report the first error.
        let _ = mem.free_frame(f);
        return Err(e.into());
    }
    Ok(f)
}

/// Installs `leaf` as the level-1 entry for `gva` in the tree at `root`,
/// allocating missing tables (one is added to `tables_taken` for each, also
/// when it fails later). Returns the entry it replaced. On `OutOfPool` the
/// tree stays well-formed (tables allocated so far stay linked in).
pub fn install<M: PhysMem + ?Sized>(
    mem: &M,
    root: Mfn,
    gva: Gva,
    leaf: u64,
    tables_taken: &mut u64,
) -> Result<u64, InstallError> {
    let mut table = root;
    for level in (2..=4u8).rev() {
        let at = entry(table, gva.table_index(level));
        let e = mem.read_u64(at)?;
        table = if e & PTE_P != 0 {
            Mfn((e & PTE_ADDR_MASK) >> 12)
        } else {
            let child = alloc_table(mem)?;
            *tables_taken += 1;
            mem.write_u64(at, child.base().0 | NONLEAF_FLAGS)?;
            child
        };
    }
    let at = entry(table, gva.table_index(1));
    let old = mem.read_u64(at)?;
    mem.write_u64(at, leaf)?;
    Ok(old)
}

/// Appends every table frame below `root` to `out` and clears the root, so
/// the tree is empty. The collected frames keep their contents (a pCPU that
/// still caches them sees a consistent old tree until it is flushed).
pub fn collect<M: PhysMem + ?Sized>(
    mem: &M,
    root: Mfn,
    out: &mut Vec<Mfn>,
) -> Result<(), MemError> {
    fn below<M: PhysMem + ?Sized>(
        mem: &M,
        table: Mfn,
        level: u8,
        out: &mut Vec<Mfn>,
    ) -> Result<(), MemError> {
        for i in 0..512 {
            let e = mem.read_u64(entry(table, i))?;
            if e & PTE_P != 0 {
                let child = Mfn((e & PTE_ADDR_MASK) >> 12);
                out.push(child);
                if level > 2 {
                    below(mem, child, level - 1, out)?;
                }
            }
        }
        Ok(())
    }
    below(mem, root, 4, out)?;
    mem.zero_frame(root)
}

/// Clears R/W (and D) in every present leaf below `root`. Returns whether
/// any entry changed.
pub fn write_protect<M: PhysMem + ?Sized>(mem: &M, root: Mfn) -> Result<bool, MemError> {
    fn below<M: PhysMem + ?Sized>(mem: &M, table: Mfn, level: u8) -> Result<bool, MemError> {
        let mut changed = false;
        for i in 0..512 {
            let at = entry(table, i);
            let e = mem.read_u64(at)?;
            if e & PTE_P == 0 {
                continue;
            }
            if level == 1 {
                if e & PTE_RW != 0 {
                    mem.write_u64(at, e & !(PTE_RW | PTE_D))?;
                    changed = true;
                }
            } else {
                changed |= below(mem, Mfn((e & PTE_ADDR_MASK) >> 12), level - 1)?;
            }
        }
        Ok(changed)
    }
    below(mem, root, 4)
}

/// Reads the level-1 entry for `gva` in the tree at `root`, if every table
/// above it is present (for tests and diagnostics).
pub fn lookup<M: PhysMem + ?Sized>(mem: &M, root: Mfn, gva: Gva) -> Result<Option<u64>, MemError> {
    let mut table = root;
    for level in (2..=4u8).rev() {
        let e = mem.read_u64(entry(table, gva.table_index(level)))?;
        if e & PTE_P == 0 {
            return Ok(None);
        }
        table = Mfn((e & PTE_ADDR_MASK) >> 12);
    }
    let e = mem.read_u64(entry(table, gva.table_index(1)))?;
    Ok((e & PTE_P != 0).then_some(e))
}

/// Calls `f` with every present leaf below `root` (for finding entries of
/// foreign frames before a tree is emptied).
pub fn for_each_leaf<M: PhysMem + ?Sized>(
    mem: &M,
    root: Mfn,
    f: &mut dyn FnMut(u64),
) -> Result<(), MemError> {
    fn below<M: PhysMem + ?Sized>(
        mem: &M,
        table: Mfn,
        level: u8,
        f: &mut dyn FnMut(u64),
    ) -> Result<(), MemError> {
        for i in 0..512 {
            let e = mem.read_u64(entry(table, i))?;
            if e & PTE_P == 0 {
                continue;
            }
            if level == 1 {
                f(e);
            } else {
                below(mem, Mfn((e & PTE_ADDR_MASK) >> 12), level - 1, f)?;
            }
        }
        Ok(())
    }
    below(mem, root, 4, f)
}

/// Clears every leaf below `root` that maps `frame`, each with an atomic
/// swap (a compare-exchange loop), so an A bit the hardware sets
/// concurrently is never lost. Returns (leaves cleared, whether any of them
/// had A set when it was cleared).
pub fn unmap_frame<M: PhysMem + ?Sized>(
    mem: &M,
    root: Mfn,
    frame: Mfn,
) -> Result<(u64, bool), MemError> {
    fn below<M: PhysMem + ?Sized>(
        mem: &M,
        table: Mfn,
        level: u8,
        frame: Mfn,
        acc: &mut (u64, bool),
    ) -> Result<(), MemError> {
        for i in 0..512 {
            let at = entry(table, i);
            let e = mem.read_u64(at)?;
            if e & PTE_P == 0 {
                continue;
            }
            if level > 1 {
                below(mem, Mfn((e & PTE_ADDR_MASK) >> 12), level - 1, frame, acc)?;
                continue;
            }
            if (e & PTE_ADDR_MASK) >> 12 != frame.0 {
                continue;
            }
            let mut old = e;
            loop {
                match mem.compare_exchange_u64(at, old, 0)? {
                    Ok(_) => break,
                    Err(now) => old = now,
                }
            }
            if old & PTE_P != 0 {
                acc.0 += 1;
                acc.1 |= old & PTE_A != 0;
            }
        }
        Ok(())
    }
    let mut acc = (0, false);
    below(mem, root, 4, frame, &mut acc)?;
    Ok(acc)
}
