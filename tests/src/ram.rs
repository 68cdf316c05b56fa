//! The memory a run uses: one block of host frames (simulated on the host,
//! real in the image), split into guest RAM and the server's shadow pool,
//! and the `PhysMem` the suite hands the server, which records everything
//! the server writes so the oracle can judge it.

use abi::addr::{Hpa, Mfn};
use abi::mem::{MemError, PhysMem};
use alloc::collections::BTreeSet;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

/// A block of host frames as 64-bit words: `words[i]` is the word at
/// host-physical address `base + 8 * i`. On the host it is a `Vec`; in the
/// image the kernel passes real frames through its direct map.
#[derive(Clone, Copy)]
pub struct Ram<'a> {
    /// Host-physical address of `words[0]` (4 KiB aligned).
    pub base: u64,
    /// The memory, a whole number of frames.
    pub words: &'a [AtomicU64],
}

impl<'a> Ram<'a> {
    /// The block `words` at host-physical `base`.
    pub fn new(base: u64, words: &'a [AtomicU64]) -> Ram<'a> {
        assert!(
            base.is_multiple_of(4096),
            "ram base {base:#x} is not frame aligned"
        );
        assert!(
            words.len().is_multiple_of(512),
            "ram is not a whole number of frames"
        );
        Ram { base, words }
    }
    /// Frames in the block.
    pub fn frames(&self) -> u64 {
        self.words.len() as u64 / 512
    }
    /// The first frame number.
    pub fn first_mfn(&self) -> u64 {
        self.base >> 12
    }
    fn slot(&self, hpa: u64) -> Option<&AtomicU64> {
        if !hpa.is_multiple_of(8) || hpa < self.base {
            return None;
        }
        self.words.get(((hpa - self.base) / 8) as usize)
    }
    /// The word at `hpa`, `None` outside the block.
    pub fn read(&self, hpa: u64) -> Option<u64> {
        self.slot(hpa).map(|w| w.load(Ordering::SeqCst))
    }
    /// Writes the word at `hpa`; false outside the block.
    pub fn write(&self, hpa: u64, v: u64) -> bool {
        self.slot(hpa)
            .map(|w| w.store(v, Ordering::SeqCst))
            .is_some()
    }
    /// Zeroes frame `mfn`.
    pub fn zero(&self, mfn: u64) -> bool {
        if mfn < self.first_mfn() || mfn >= self.first_mfn() + self.frames() {
            return false;
        }
        for i in 0..512 {
            self.write((mfn << 12) + i * 8, 0);
        }
        true
    }
}

/// A write the server made to a frame outside its shadow pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForeignWrite {
    /// Where.
    pub hpa: u64,
    /// Value before.
    pub old: u64,
    /// Value after.
    pub new: u64,
}

struct Pool {
    free: Vec<u64>,
    taken: BTreeSet<u64>,
    /// Frames the server may hold at once (`None`: all of `free`).
    limit: Option<usize>,
}

/// The `PhysMem` the server runs on: the whole block is readable; the server
/// may write its pool frames (the ones it holds) and guest frames (A/D bits;
/// the oracle judges those writes).
pub struct SuitePhys<'a> {
    ram: Ram<'a>,
    pool_first: u64,
    pool: Mutex<Pool>,
    foreign: Mutex<Vec<ForeignWrite>>,
    bad: Mutex<Vec<(u64, &'static str)>>,
    /// Incremented on every server write (the shadow tables may have changed).
    pub shadow_writes: AtomicU64,
    /// The most pool frames the server held at once.
    pub peak: AtomicU64,
}

impl<'a> SuitePhys<'a> {
    /// Frames `[pool_first, end of ram)` form the shadow pool.
    pub fn new(ram: Ram<'a>, pool_first: u64) -> SuitePhys<'a> {
        let end = ram.first_mfn() + ram.frames();
        SuitePhys {
            ram,
            pool_first,
            pool: Mutex::new(Pool {
                free: (pool_first..end).rev().collect(),
                taken: BTreeSet::new(),
                limit: None,
            }),
            foreign: Mutex::new(Vec::new()),
            bad: Mutex::new(Vec::new()),
            shadow_writes: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }
    }
    /// The memory block.
    pub fn ram(&self) -> Ram<'a> {
        self.ram
    }
    /// Limits how many pool frames the server may hold at once.
    pub fn set_pool_limit(&self, limit: Option<usize>) {
        self.pool.lock().limit = limit;
    }
    /// Pool frames the server holds now.
    pub fn pool_in_use(&self) -> usize {
        self.pool.lock().taken.len()
    }
    /// Whether `mfn` is a pool frame the server holds now.
    pub fn holds(&self, mfn: u64) -> bool {
        self.pool.lock().taken.contains(&mfn)
    }
    /// Whether `mfn` is in the pool part of the block.
    pub fn is_pool(&self, mfn: u64) -> bool {
        mfn >= self.pool_first && mfn < self.ram.first_mfn() + self.ram.frames()
    }
    /// Takes the server's writes to non-pool frames since the last call.
    pub fn take_foreign(&self) -> Vec<ForeignWrite> {
        core::mem::take(&mut *self.foreign.lock())
    }
    /// Takes the server's misuses of memory (writes to frames it does not
    /// hold, frees of frames it does not hold) since the last call.
    pub fn take_bad(&self) -> Vec<(u64, &'static str)> {
        core::mem::take(&mut *self.bad.lock())
    }
    fn check_write(&self, at: Hpa) -> Result<(), MemError> {
        let hpa = at.0;
        if !hpa.is_multiple_of(8) {
            return Err(MemError::Misaligned(at));
        }
        if self.ram.slot(hpa).is_none() {
            self.bad.lock().push((hpa, "write outside memory"));
            return Err(MemError::OutOfRange(at));
        }
        let mfn = hpa >> 12;
        if self.is_pool(mfn) && !self.holds(mfn) {
            self.bad
                .lock()
                .push((hpa, "write to a pool frame it does not hold"));
            return Err(MemError::BadFrame(Mfn(mfn)));
        }
        Ok(())
    }
    fn note(&self, hpa: u64, old: u64, new: u64) {
        self.shadow_writes.fetch_add(1, Ordering::SeqCst);
        if !self.is_pool(hpa >> 12) && old != new {
            self.foreign.lock().push(ForeignWrite { hpa, old, new });
        }
    }
}

impl PhysMem for SuitePhys<'_> {
    fn read_u64(&self, at: Hpa) -> Result<u64, MemError> {
        if !at.0.is_multiple_of(8) {
            return Err(MemError::Misaligned(at));
        }
        self.ram.read(at.0).ok_or(MemError::OutOfRange(at))
    }
    fn write_u64(&self, at: Hpa, value: u64) -> Result<(), MemError> {
        self.check_write(at)?;
        let slot = self.ram.slot(at.0).ok_or(MemError::OutOfRange(at))?;
        let old = slot.swap(value, Ordering::SeqCst);
        self.note(at.0, old, value);
        Ok(())
    }
    fn compare_exchange_u64(
        &self,
        at: Hpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemError> {
        self.check_write(at)?;
        let slot = self.ram.slot(at.0).ok_or(MemError::OutOfRange(at))?;
        let r = slot.compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst);
        if r.is_ok() {
            self.note(at.0, current, new);
        }
        Ok(r)
    }
    fn zero_frame(&self, frame: Mfn) -> Result<(), MemError> {
        if !self.holds(frame.0) {
            self.bad
                .lock()
                .push((frame.0 << 12, "zeroed a frame it does not hold"));
            return Err(MemError::BadFrame(frame));
        }
        self.shadow_writes.fetch_add(1, Ordering::SeqCst);
        self.ram.zero(frame.0);
        Ok(())
    }
    fn alloc_frame(&self) -> Option<Mfn> {
        let mut p = self.pool.lock();
        if p.limit.is_some_and(|l| p.taken.len() >= l) {
            return None;
        }
        let f = p.free.pop()?;
        p.taken.insert(f);
        self.peak.fetch_max(p.taken.len() as u64, Ordering::SeqCst);
        // Unspecified contents: make them garbage so a server that forgets
        // to zero a fresh table is caught.
        for i in 0..512u64 {
            self.ram
                .write((f << 12) + i * 8, 0xdead_0000_0000_0007 | (i << 12));
        }
        Some(Mfn(f))
    }
    fn free_frame(&self, frame: Mfn) -> Result<(), MemError> {
        let mut p = self.pool.lock();
        if !p.taken.remove(&frame.0) {
            drop(p);
            self.bad
                .lock()
                .push((frame.0 << 12, "freed a frame it does not hold"));
            return Err(MemError::BadFrame(frame));
        }
        // Freed frames go to the back, so reuse is as late as possible...
        // except that reuse is exactly what we want to exercise: front.
        p.free.push(frame.0);
        Ok(())
    }
}
