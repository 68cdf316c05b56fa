//! Simulated physical memory for host tests: a flat array of atomic words,
//! frames `0..frames`, of which a contiguous range is the shadow pool.
//!
//! Everything outside the pool is "guest memory" that a memory map may name.
//! The simulator checks what the kernel would trust: word alignment, bounds,
//! frees of frames that are not allocated (double free). It counts frames in
//! use so tests can check that a server leaks nothing.

use abi::{Hpa, MemError, Mfn, PhysMem, PAGE_SIZE};
use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use spin::Mutex;

const WORDS_PER_FRAME: u64 = PAGE_SIZE / 8;

/// Simulated host-physical memory with a shadow-frame pool.
pub struct SimMem {
    words: Vec<AtomicU64>,
    pool: Range<u64>,
    /// Free pool frames (a stack) and, per pool frame, whether it is allocated.
    free: Mutex<(Vec<u64>, Vec<bool>)>,
    in_use: AtomicUsize,
    /// `alloc_frame` fails while this many frames are in use.
    limit: AtomicUsize,
}

impl SimMem {
    /// Memory of `frames` 4 KiB frames (all zero); frames in `pool` form the
    /// shadow pool. Panics if `pool` is not inside `0..frames` (test setup).
    pub fn new(frames: u64, pool: Range<u64>) -> SimMem {
        assert!(
            pool.start <= pool.end && pool.end <= frames,
            "pool outside memory"
        );
        let words = (0..frames * WORDS_PER_FRAME)
            .map(|_| AtomicU64::new(0))
            .collect();
        // Hand out low frames first (pop from the end of a reversed list).
        let free_list: Vec<u64> = pool.clone().rev().collect();
        let allocated = alloc::vec![false; (pool.end - pool.start) as usize];
        SimMem {
            words,
            pool,
            free: Mutex::new((free_list, allocated)),
            in_use: AtomicUsize::new(0),
            limit: AtomicUsize::new(usize::MAX),
        }
    }

    /// Number of frames.
    pub fn frames(&self) -> u64 {
        self.words.len() as u64 / WORDS_PER_FRAME
    }

    /// The pool's frame range.
    pub fn pool(&self) -> Range<u64> {
        self.pool.clone()
    }

    /// Pool frames currently allocated.
    pub fn frames_in_use(&self) -> usize {
        self.in_use.load(Ordering::SeqCst)
    }

    /// Whether `mfn` is a pool frame currently allocated.
    pub fn is_allocated(&self, mfn: Mfn) -> bool {
        if !self.pool.contains(&mfn.0) {
            return false;
        }
        self.free.lock().1[(mfn.0 - self.pool.start) as usize]
    }

    /// Shrinks the pool to at most `n` frames in use at once (`usize::MAX`:
    /// the whole pool), to provoke exhaustion.
    pub fn set_frame_limit(&self, n: usize) {
        self.limit.store(n, Ordering::SeqCst);
    }

    fn index(&self, at: Hpa) -> Result<usize, MemError> {
        if !at.is_aligned(8) {
            return Err(MemError::Misaligned(at));
        }
        let i = at.0 / 8;
        if i >= self.words.len() as u64 {
            return Err(MemError::OutOfRange(at));
        }
        Ok(i as usize)
    }

    /// Reads `len <= 8` bytes at any byte address (little-endian), for tests.
    pub fn read_bytes(&self, at: Hpa, out: &mut [u8]) -> Result<(), MemError> {
        for (k, b) in out.iter_mut().enumerate() {
            let a = Hpa(at.0 + k as u64);
            let w = self.read_u64(Hpa(a.0 & !7))?;
            *b = (w >> ((a.0 & 7) * 8)) as u8;
        }
        Ok(())
    }
}

impl PhysMem for SimMem {
    fn read_u64(&self, at: Hpa) -> Result<u64, MemError> {
        Ok(self.words[self.index(at)?].load(Ordering::SeqCst))
    }

    fn write_u64(&self, at: Hpa, value: u64) -> Result<(), MemError> {
        self.words[self.index(at)?].store(value, Ordering::SeqCst);
        Ok(())
    }

    fn compare_exchange_u64(
        &self,
        at: Hpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemError> {
        Ok(self.words[self.index(at)?].compare_exchange(
            current,
            new,
            Ordering::SeqCst,
            Ordering::SeqCst,
        ))
    }

    fn zero_frame(&self, frame: Mfn) -> Result<(), MemError> {
        if frame.0 >= self.frames() {
            return Err(MemError::BadFrame(frame));
        }
        let base = (frame.0 * WORDS_PER_FRAME) as usize;
        for w in &self.words[base..base + WORDS_PER_FRAME as usize] {
            w.store(0, Ordering::SeqCst);
        }
        Ok(())
    }

    fn alloc_frame(&self) -> Option<Mfn> {
        let mut g = self.free.lock();
        if self.in_use.load(Ordering::SeqCst) >= self.limit.load(Ordering::SeqCst) {
            return None;
        }
        let f = g.0.pop()?;
        g.1[(f - self.pool.start) as usize] = true;
        self.in_use.fetch_add(1, Ordering::SeqCst);
        // Fresh frames hold garbage, as real ones may.
        let base = (f * WORDS_PER_FRAME) as usize;
        for (k, w) in self.words[base..base + WORDS_PER_FRAME as usize]
            .iter()
            .enumerate()
        {
            w.store(0xdead_0000_0000_0000 | k as u64, Ordering::SeqCst);
        }
        Some(Mfn(f))
    }

    fn free_frame(&self, frame: Mfn) -> Result<(), MemError> {
        if !self.pool.contains(&frame.0) {
            return Err(MemError::BadFrame(frame));
        }
        let mut g = self.free.lock();
        let slot = &mut g.1[(frame.0 - self.pool.start) as usize];
        if !*slot {
            return Err(MemError::BadFrame(frame));
        }
        *slot = false;
        g.0.push(frame.0);
        self.in_use.fetch_sub(1, Ordering::SeqCst);
        Ok(())
    }
}

/// Builds guest page tables in a [`SimMem`] through a domain's memory map,
/// for tests: tables come from a bump range of guest frames.
pub struct GuestTables<'a> {
    /// The memory the guest lives in.
    pub mem: &'a SimMem,
    /// The domain's memory map.
    pub map: abi::mmu::MemoryMap,
    next: u64,
}

/// Flags of the intermediate entries [`GuestTables::map`] creates.
pub const TABLE_FLAGS: u64 = crate::walk::PTE_P | crate::walk::PTE_RW | crate::walk::PTE_US;

impl<'a> GuestTables<'a> {
    /// Tables will be taken from guest frames `first_table..` (which must be
    /// in `map`).
    pub fn new(mem: &'a SimMem, map: abi::mmu::MemoryMap, first_table: abi::Gfn) -> Self {
        GuestTables {
            mem,
            map,
            next: first_table.0,
        }
    }

    /// The host address of a guest-physical address. Panics outside the map
    /// (test setup error).
    pub fn hpa(&self, gpa: abi::Gpa) -> Hpa {
        let gfn = gpa.frame();
        let mfn = self
            .map
            .iter()
            .find_map(|r| r.translate(gfn))
            .unwrap_or_else(|| panic!("{gpa:?} not in the memory map"));
        mfn.at(gpa.page_offset())
    }

    /// Reads a guest word.
    pub fn read(&self, gpa: abi::Gpa) -> u64 {
        self.mem.read_u64(self.hpa(gpa)).expect("guest word")
    }

    /// Writes a guest word.
    pub fn write(&self, gpa: abi::Gpa, value: u64) {
        self.mem
            .write_u64(self.hpa(gpa), value)
            .expect("guest word")
    }

    /// Takes the next free guest frame for a table and zeroes it.
    pub fn alloc_table(&mut self) -> abi::Gfn {
        let g = abi::Gfn(self.next);
        self.next += 1;
        let mfn = self.hpa(g.base()).frame();
        self.mem.zero_frame(mfn).expect("table frame");
        g
    }

    /// The guest-physical address of the entry at `level` for `gva` under
    /// the PML4 at `pml4`, if the tables above it are present (ignores
    /// permissions and reserved bits; stops at large pages).
    pub fn entry(&self, pml4: abi::Gfn, gva: abi::Gva, level: u8) -> Option<abi::Gpa> {
        let mut table = pml4.base();
        for l in (level..=4).rev() {
            let at = abi::Gpa(table.0 + 8 * gva.table_index(l) as u64);
            if l == level {
                return Some(at);
            }
            let e = self.read(at);
            if e & crate::walk::PTE_P == 0 || (l < 4 && e & crate::walk::PTE_PS != 0) {
                return None;
            }
            table = abi::Gpa(e & crate::walk::PTE_ADDR_MASK);
        }
        None
    }

    /// Maps `gva` to `target` with a page of `size` whose leaf entry gets
    /// `flags` (P is added; PS for large pages), creating missing tables
    /// with [`TABLE_FLAGS`]. Returns the leaf entry's guest address.
    pub fn map(
        &mut self,
        pml4: abi::Gfn,
        gva: abi::Gva,
        target: abi::Gpa,
        size: abi::PageSize,
        flags: u64,
    ) -> abi::Gpa {
        let leaf_level = size.level();
        let mut table = pml4;
        for level in ((leaf_level + 1)..=4).rev() {
            let at = abi::Gpa(table.base().0 + 8 * gva.table_index(level) as u64);
            let e = self.read(at);
            table = if e & crate::walk::PTE_P != 0 {
                abi::Gfn((e & crate::walk::PTE_ADDR_MASK) >> 12)
            } else {
                let t = self.alloc_table();
                self.write(at, t.base().0 | TABLE_FLAGS);
                t
            };
        }
        let at = abi::Gpa(table.base().0 + 8 * gva.table_index(leaf_level) as u64);
        let ps = if leaf_level > 1 {
            crate::walk::PTE_PS
        } else {
            0
        };
        self.write(
            at,
            target.align_down(size).0 | flags | crate::walk::PTE_P | ps,
        );
        at
    }
}
