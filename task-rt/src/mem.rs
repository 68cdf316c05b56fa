//! `abi::PhysMem` over a window of mapped physical frames: the served guest ranges and a shadow pool, nothing else.
//!
//! Frame `pa` is reached at `base + pa`. In a server task `base` is
//! `abi::task::WINDOW_BASE` and the kernel maps exactly the served ranges
//! and the pool there; in the kernel's direct transport `base` is 0 (the
//! identity map). Either way every access is checked against the ranges in
//! the [`ControlPage`] and the pool first, so a bad address is an error
//! value, never a stray access.

use abi::task::ControlPage;
use abi::{Hpa, MemError, Mfn, PhysMem};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::Mutex;

/// Physical memory as a server may see it through a window.
pub struct WindowMem {
    base: u64,
    control: &'static ControlPage,
    pool_first: u64,
    pool_frames: u64,
    free: Mutex<Vec<u32>>,
    taken: Vec<AtomicU64>,
}

impl WindowMem {
    /// A window at `base` over the ranges listed in `control`, with the
    /// shadow pool `pool_frames` frames from `pool_first`.
    ///
    /// # Safety
    /// For every range listed in `control` (now or later) and for the pool,
    /// `base + pa` must be mapped to `pa`, writable, for as long as the
    /// range is listed (the pool: for the life of this value). The caller
    /// of `ControlPage::remove_range` must unmap only after it returns.
    pub unsafe fn new(
        base: u64,
        control: &'static ControlPage,
        pool_first: Mfn,
        pool_frames: u64,
    ) -> WindowMem {
        WindowMem {
            base,
            control,
            pool_first: pool_first.0,
            pool_frames,
            free: Mutex::new((0..pool_frames as u32).rev().collect()),
            taken: (0..pool_frames.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn in_pool(&self, pa: u64) -> bool {
        let first = self.pool_first * 4096;
        pa >= first && pa < first + self.pool_frames * 4096
    }

    fn atomic(&self, at: Hpa) -> Result<&AtomicU64, MemError> {
        let pa = at.0;
        if !pa.is_multiple_of(8) {
            return Err(MemError::Misaligned(at));
        }
        if !(self.in_pool(pa) || self.control.serves(pa)) {
            return Err(MemError::OutOfRange(at));
        }
        // SAFETY: `pa` is an aligned word of the pool or of a listed range,
        // which the contract of `new` keeps mapped at `base + pa` while
        // listed; every access to these words is atomic, so sharing them
        // with guests and other pCPUs is sound.
        Ok(unsafe { AtomicU64::from_ptr((self.base + pa) as *mut u64) })
    }
}

impl PhysMem for WindowMem {
    fn read_u64(&self, at: Hpa) -> Result<u64, MemError> {
        Ok(self.atomic(at)?.load(Ordering::Acquire))
    }

    fn write_u64(&self, at: Hpa, value: u64) -> Result<(), MemError> {
        self.atomic(at)?.store(value, Ordering::Release);
        Ok(())
    }

    fn compare_exchange_u64(
        &self,
        at: Hpa,
        current: u64,
        new: u64,
    ) -> Result<Result<u64, u64>, MemError> {
        Ok(self
            .atomic(at)?
            .compare_exchange(current, new, Ordering::AcqRel, Ordering::Acquire))
    }

    fn zero_frame(&self, frame: Mfn) -> Result<(), MemError> {
        let base = frame.0.checked_mul(4096).ok_or(MemError::BadFrame(frame))?;
        for i in 0..512 {
            self.write_u64(Hpa(base + i * 8), 0)
                .map_err(|_| MemError::BadFrame(frame))?;
        }
        Ok(())
    }

    fn alloc_frame(&self) -> Option<Mfn> {
        let i = self.free.lock().pop()?;
        self.taken[i as usize / 64].fetch_or(1 << (i % 64), Ordering::Relaxed);
        let n = self.control.pool_in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.control.pool_peak.fetch_max(n, Ordering::Relaxed);
        Some(Mfn(self.pool_first + i as u64))
    }

    fn free_frame(&self, frame: Mfn) -> Result<(), MemError> {
        let pa = frame.0.wrapping_mul(4096);
        if !self.in_pool(pa) {
            return Err(MemError::BadFrame(frame));
        }
        let i = (frame.0 - self.pool_first) as u32;
        let bit = 1u64 << (i % 64);
        if self.taken[i as usize / 64].fetch_and(!bit, Ordering::Relaxed) & bit == 0 {
            return Err(MemError::BadFrame(frame));
        }
        self.control.pool_in_use.fetch_sub(1, Ordering::Relaxed);
        self.free.lock().push(i);
        Ok(())
    }
}
