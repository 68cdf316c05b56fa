//! The global allocator: talc on one contiguous run of frames.

use crate::frames::{self, FrameError, FRAME_SIZE};
use talc::source::Manual;
use talc::TalcLock;

/// Heap size in bytes (the MMU servers size their tables at creation).
pub const HEAP_BYTES: u64 = 16 << 20;

#[global_allocator]
static ALLOCATOR: TalcLock<spin::mutex::SpinMutex<()>, Manual> = TalcLock::new(Manual);

/// Carves the heap from the frame allocator and hands it to talc.
pub fn init() -> Result<(), FrameError> {
    let first = frames::alloc_contiguous(HEAP_BYTES / FRAME_SIZE)?;
    let base = first.start_address().as_u64() as usize as *mut u8;
    // SAFETY: the frames were just taken from the allocator, are identity
    // mapped, and are never given back: the heap owns them for good.
    let claimed = unsafe { ALLOCATOR.lock().claim(base, HEAP_BYTES as usize) };
    // talc refuses a claim only when it is too small to hold its metadata.
    assert!(claimed.is_some(), "talc refused a {HEAP_BYTES}-byte heap");
    Ok(())
}
