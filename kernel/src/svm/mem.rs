//! `abi::PhysMem` over real frames: the guests' own frames (read and written
//! by the MMU server as guest page tables) and a contiguous shadow pool the
//! server builds its shadow tables from. Any other address is refused.

use super::host;
use abi::{Hpa, MemError, Mfn, PhysMem};
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use spin::{Mutex, RwLock};

/// Physical memory as the MMU server may see it.
pub struct RealMem {
    pool_base: u64,
    pool_frames: u64,
    free: Mutex<Vec<u32>>,
    taken: Vec<AtomicU64>,
    in_use: AtomicU64,
    peak: AtomicU64,
    guest: RwLock<Vec<(u64, u64)>>,
}

impl RealMem {
    /// A shadow pool of `frames` contiguous host frames.
    pub fn new(frames: u64) -> Result<RealMem, &'static str> {
        let pool_base = host::alloc_zeroed(frames)?;
        let free = (0..frames as u32).rev().collect();
        let taken = (0..frames.div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(RealMem {
            pool_base,
            pool_frames: frames,
            free: Mutex::new(free),
            taken,
            in_use: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            guest: RwLock::new(Vec::new()),
        })
    }

    /// Lets the server touch guest memory [pa, pa + bytes).
    pub fn add_guest_range(&self, pa: u64, bytes: u64) {
        self.guest.write().push((pa, bytes));
    }

    /// Withdraws a guest range (the domain is gone).
    pub fn remove_guest_range(&self, pa: u64) {
        self.guest.write().retain(|&(p, _)| p != pa);
    }

    /// Shadow frames in use now, and the most ever in use.
    pub fn shadow_pages(&self) -> (u64, u64) {
        (
            self.in_use.load(Ordering::Relaxed),
            self.peak.load(Ordering::Relaxed),
        )
    }

    fn in_pool(&self, pa: u64) -> bool {
        pa >= self.pool_base && pa < self.pool_base + self.pool_frames * 4096
    }

    fn check(&self, at: Hpa) -> Result<*mut u64, MemError> {
        let pa = at.0;
        if !pa.is_multiple_of(8) {
            return Err(MemError::Misaligned(at));
        }
        let ok = self.in_pool(pa)
            || self
                .guest
                .read()
                .iter()
                .any(|&(p, n)| pa >= p && pa < p + n);
        if !ok {
            return Err(MemError::OutOfRange(at));
        }
        Ok(host::va(pa).cast())
    }

    fn atomic(&self, at: Hpa) -> Result<&AtomicU64, MemError> {
        let p = self.check(at)?;
        // SAFETY: `check` proved p is an aligned word of a pool or guest frame
        // in the identity map; those frames live as long as the kernel (the
        // pool) or until their range is withdrawn (guests, after the server
        // forgot the domain). All accesses to them are atomic.
        Ok(unsafe { AtomicU64::from_ptr(p) })
    }
}

impl PhysMem for RealMem {
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
        let n = self.in_use.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(n, Ordering::Relaxed);
        Some(Mfn(self.pool_base / 4096 + i as u64))
    }

    fn free_frame(&self, frame: Mfn) -> Result<(), MemError> {
        let pa = frame.0.wrapping_mul(4096);
        if !self.in_pool(pa) {
            return Err(MemError::BadFrame(frame));
        }
        let i = ((pa - self.pool_base) / 4096) as u32;
        let bit = 1u64 << (i % 64);
        if self.taken[i as usize / 64].fetch_and(!bit, Ordering::Relaxed) & bit == 0 {
            return Err(MemError::BadFrame(frame));
        }
        self.in_use.fetch_sub(1, Ordering::Relaxed);
        self.free.lock().push(i);
        Ok(())
    }
}
