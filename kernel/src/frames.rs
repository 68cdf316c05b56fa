//! Physical frames: a bitmap allocator over the boot memory map that refuses double frees.
//!
//! Two bitmaps: `usable` (RAM the firmware gave us, minus the image and the
//! low 1 MiB) and `free`. A frame can only be freed if it is usable and not
//! already free, so double frees and frees of foreign memory are errors, not
//! corruption. Exhaustion is an error value, never a panic. Only the low
//! 4 GiB (the identity-mapped part) is managed, and every frame handed out
//! is mapped: the only unmapped pages there are the null page (below 1 MiB,
//! never managed) and stack guard pages, which are [`retire`]d.

use crate::boot::BootInfo;
use spin::Mutex;
use x86_64::structures::paging::{PhysFrame, Size4KiB};
use x86_64::PhysAddr;

/// Frame size in bytes.
pub const FRAME_SIZE: u64 = 4096;
/// Bytes of physical memory the global allocator can manage (the identity-mapped low 4 GiB).
pub const MANAGED_BYTES: u64 = 4 << 30;
const WORDS: usize = (MANAGED_BYTES / FRAME_SIZE / 64) as usize;

/// What went wrong with a frame operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// No free frame (or no run of the requested length) is left.
    Exhausted {
        /// Frames asked for.
        wanted: u64,
        /// Frames still free (possibly fragmented).
        free: u64,
    },
    /// The frame was already free.
    DoubleFree(PhysAddr),
    /// The frame is not memory this allocator manages.
    NotManaged(PhysAddr),
}

/// A bitmap frame allocator over `W * 64` frames starting at address 0.
pub struct FrameSet<const W: usize> {
    usable: [u64; W],
    free: [u64; W],
    free_count: u64,
    hint: usize,
}

impl<const W: usize> Default for FrameSet<W> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const W: usize> FrameSet<W> {
    /// An allocator managing no memory yet.
    pub const fn new() -> Self {
        Self {
            usable: [0; W],
            free: [0; W],
            free_count: 0,
            hint: 0,
        }
    }

    /// Frames covered by this set.
    pub const fn capacity(&self) -> u64 {
        W as u64 * 64
    }

    /// Frames currently free.
    pub fn free_frames(&self) -> u64 {
        self.free_count
    }

    /// Adds the whole frames inside `[start, start + len)` as usable and free.
    /// Frames beyond the capacity are ignored; returns how many were added.
    pub fn add_region(&mut self, start: PhysAddr, len: u64) -> u64 {
        let first = start.as_u64().div_ceil(FRAME_SIZE);
        let end = ((start.as_u64().saturating_add(len)) / FRAME_SIZE).min(self.capacity());
        let mut added = 0;
        for f in first..end {
            let (w, b) = ((f / 64) as usize, f % 64);
            if self.usable[w] & (1 << b) == 0 {
                self.usable[w] |= 1 << b;
                self.free[w] |= 1 << b;
                added += 1;
            }
        }
        self.free_count += added;
        added
    }

    /// Removes the frames overlapping `[start, start + len)` from the usable
    /// set (for memory in use before the allocator existed).
    pub fn reserve(&mut self, start: PhysAddr, len: u64) {
        let first = start.as_u64() / FRAME_SIZE;
        let end = start
            .as_u64()
            .saturating_add(len)
            .div_ceil(FRAME_SIZE)
            .min(self.capacity());
        for f in first..end {
            let (w, b) = ((f / 64) as usize, f % 64);
            if self.free[w] & (1 << b) != 0 {
                self.free_count -= 1;
            }
            self.usable[w] &= !(1 << b);
            self.free[w] &= !(1 << b);
        }
    }

    /// Takes one free frame.
    pub fn alloc(&mut self) -> Result<PhysFrame<Size4KiB>, FrameError> {
        for i in 0..W {
            let w = (self.hint + i) % W;
            if self.free[w] != 0 {
                let b = self.free[w].trailing_zeros() as u64;
                self.free[w] &= !(1 << b);
                self.free_count -= 1;
                self.hint = w;
                return Ok(frame_at((w as u64 * 64 + b) * FRAME_SIZE));
            }
        }
        Err(FrameError::Exhausted {
            wanted: 1,
            free: self.free_count,
        })
    }

    /// Takes `count` physically contiguous free frames; returns the first.
    pub fn alloc_contiguous(&mut self, count: u64) -> Result<PhysFrame<Size4KiB>, FrameError> {
        let exhausted = FrameError::Exhausted {
            wanted: count,
            free: self.free_count,
        };
        if count == 0 || count > self.free_count {
            return Err(exhausted);
        }
        let mut run_start = 0;
        let mut run = 0;
        let mut f = 0;
        while f < self.capacity() {
            let word = self.free[(f / 64) as usize];
            // Whole words at a time where possible: a boot allocates stacks
            // and the heap from a mostly empty 4 GiB bitmap.
            if f % 64 == 0 && (word == 0 || (word == u64::MAX && run + 64 <= count)) {
                if word == 0 {
                    run = 0;
                } else {
                    if run == 0 {
                        run_start = f;
                    }
                    run += 64;
                }
                f += 64;
            } else {
                if self.is_free(f) {
                    if run == 0 {
                        run_start = f;
                    }
                    run += 1;
                } else {
                    run = 0;
                }
                f += 1;
            }
            if run == count {
                for g in run_start..run_start + count {
                    self.free[(g / 64) as usize] &= !(1 << (g % 64));
                }
                self.free_count -= count;
                return Ok(frame_at(run_start * FRAME_SIZE));
            }
        }
        Err(exhausted)
    }

    /// Gives a frame back; refuses a frame that is already free or was never ours.
    pub fn free(&mut self, frame: PhysFrame<Size4KiB>) -> Result<(), FrameError> {
        let addr = frame.start_address();
        let f = addr.as_u64() / FRAME_SIZE;
        if f >= self.capacity() {
            return Err(FrameError::NotManaged(addr));
        }
        let (w, b) = ((f / 64) as usize, f % 64);
        if self.usable[w] & (1 << b) == 0 {
            return Err(FrameError::NotManaged(addr));
        }
        if self.free[w] & (1 << b) != 0 {
            return Err(FrameError::DoubleFree(addr));
        }
        self.free[w] |= 1 << b;
        self.free_count += 1;
        Ok(())
    }

    /// Gives back `count` contiguous frames from `first`; stops at the first refusal.
    pub fn free_contiguous(
        &mut self,
        first: PhysFrame<Size4KiB>,
        count: u64,
    ) -> Result<(), FrameError> {
        for i in 0..count {
            self.free(first + i)?;
        }
        Ok(())
    }

    fn is_free(&self, f: u64) -> bool {
        self.free[(f / 64) as usize] & (1 << (f % 64)) != 0
    }
}

fn frame_at(addr: u64) -> PhysFrame<Size4KiB> {
    PhysFrame::containing_address(PhysAddr::new(addr))
}

/// The kernel's frame allocator over all managed RAM.
pub static FRAMES: Mutex<FrameSet<WORDS>> = Mutex::new(FrameSet::new());

/// Fills [`FRAMES`] from the memory map: usable RAM, minus the low 1 MiB
/// (BIOS, AP trampoline), the loaded image and the boot modules. Returns (usable bytes in the
/// map, bytes managed).
pub fn init(boot: &BootInfo) -> (u64, u64) {
    let mut set = FRAMES.lock();
    let mut ram = 0;
    for r in boot.regions().iter().filter(|r| r.kind == 1) {
        ram += r.len;
        set.add_region(r.start, r.len);
    }
    set.reserve(PhysAddr::new(0), 1 << 20);
    let (start, end) = crate::boot::image_span();
    set.reserve(start, end - start);
    for m in boot.modules() {
        set.reserve(m.start, m.len());
    }
    (ram, set.free_frames() * FRAME_SIZE)
}

/// Takes one frame from the kernel's allocator.
pub fn alloc() -> Result<PhysFrame<Size4KiB>, FrameError> {
    FRAMES.lock().alloc()
}

/// Takes one frame from the kernel's allocator, filled with zeros.
pub fn alloc_zeroed() -> Result<PhysFrame<Size4KiB>, FrameError> {
    let frame = alloc()?;
    let ptr = frame.start_address().as_u64() as usize as *mut u8;
    // SAFETY: the frame was just taken from the allocator (nobody else
    // uses it) and every frame it hands out is identity-mapped (see the
    // module doc).
    unsafe { core::ptr::write_bytes(ptr, 0, FRAME_SIZE as usize) };
    Ok(frame)
}

/// Takes `count` contiguous frames from the kernel's allocator.
pub fn alloc_contiguous(count: u64) -> Result<PhysFrame<Size4KiB>, FrameError> {
    FRAMES.lock().alloc_contiguous(count)
}

/// Takes an allocated frame out of the kernel's allocator for good: it is
/// never handed out again and [`free`] refuses it as not managed (for stack
/// guard pages, which are unmapped).
pub fn retire(frame: PhysFrame<Size4KiB>) {
    FRAMES.lock().reserve(frame.start_address(), FRAME_SIZE);
}

/// Gives a frame back to the kernel's allocator.
pub fn free(frame: PhysFrame<Size4KiB>) -> Result<(), FrameError> {
    FRAMES.lock().free(frame)
}

/// Frames currently free in the kernel's allocator.
pub fn free_frames() -> u64 {
    FRAMES.lock().free_frames()
}
