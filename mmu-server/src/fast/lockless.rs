//! The lockless fast page fault: one compare-and-swap restores W on a leaf
//! shadow entry that is read-only only because of dirty logging.
//!
//! This file is generic over tiny atomic traits so that the very same code
//! runs in the server (entries in [`abi::mem::PhysMem`] frames, counters in
//! `core` atomics) and under `loom` (`mmu-server/tests/fast_loom.rs`).
//!
//! # Shadow entry bits this path relies on
//! - [`SPTE_P`] present, [`SPTE_W`] writable, [`SPTE_D`] dirty (set by the
//!   hardware walker on a write through a writable entry).
//! - [`SPTE_FAST_W`] (software bit 52): the guest PTE grants write *and its
//!   own D bit is already set*, the frame is not write-protected as a guest
//!   page table, and W is clear only because dirty logging wants to see the
//!   next write. Only the locked path sets this bit, and only on leaves.
//!
//! # The two races of seed 001 and how they are closed
//! 1. **ABA on gfn -> mfn.** The fast path reads the entry `old`, derives the
//!    gfn to log from it, and later CASes `old -> old|W`. If meanwhile the
//!    locked path zapped the entry, the host re-assigned the mfn to another
//!    gfn and the locked path re-installed the *identical* value for the new
//!    gfn, the CAS succeeds and the wrong gfn is logged: the page that is now
//!    writable is missing from the next dirty bitmap.
//!    Guard: [`FastGate`] (pinning, in the spirit of KVM's pfn refcount). A
//!    fast fault is a read-side section between [`FastGate::enter`] and
//!    [`FastGate::exit`]. Invariant **G1**: the locked path never re-fills an
//!    entry it cleared (nor changes an mfn's gfn, nor frees a shadow frame)
//!    before a grace period ([`FastGate::synchronize`]) has passed since the
//!    clearing; a grace period waits until no fast fault that started before
//!    it is still inside. So a fast fault that read `old` either CASes
//!    before the clear (and then the locked path's atomic clear sees W, see
//!    race 2) or fails its CAS.
//! 2. **Lost Dirty bit / lost W.** If the locked path updates an entry that
//!    may be made writable locklessly with a plain load + store, a fast fault
//!    (and the hardware setting D) can slip between them: the locked path
//!    decides from a read-only snapshot that no flush is needed, stores its
//!    value, and a writable translation stays in some TLB while the next
//!    dirty bitmap misses the writes. Invariant **G2**: every locked-path
//!    update of a present leaf goes through [`update_leaf`] (an atomic swap /
//!    CAS loop) and decides about flushes and dirty state from the value it
//!    actually replaced.

/// Shadow entry: present.
pub const SPTE_P: u64 = 1 << 0;
/// Shadow entry: writable.
pub const SPTE_W: u64 = 1 << 1;
/// Shadow entry: user accessible.
pub const SPTE_U: u64 = 1 << 2;
/// Shadow entry: accessed (set by the hardware walker).
pub const SPTE_A: u64 = 1 << 5;
/// Shadow entry: dirty (set by the hardware walker on a write).
pub const SPTE_D: u64 = 1 << 6;
/// Shadow entry: large page (at levels 2 and 3).
pub const SPTE_PS: u64 = 1 << 7;
/// Software bit: W may be restored locklessly (see the module docs).
pub const SPTE_FAST_W: u64 = 1 << 52;
/// Shadow entry: no execute.
pub const SPTE_NX: u64 = 1 << 63;
/// Physical address bits of an entry.
pub const SPTE_ADDR: u64 = 0x000f_ffff_ffff_f000;

/// A 64-bit cell updated atomically: a shadow entry in a frame, a counter,
/// a dirty-bitmap word. Every operation is sequentially consistent.
pub trait Cell64 {
    /// Reads the value.
    fn load(&self) -> u64;
    /// Replaces the value with `new` if it is `current`; returns the value
    /// seen (`Ok` on success).
    fn compare_exchange(&self, current: u64, new: u64) -> Result<u64, u64>;
    /// Writes `v`.
    fn store(&self, v: u64) {
        self.swap(v);
    }
    /// Writes `v` and returns the replaced value.
    fn swap(&self, v: u64) -> u64 {
        self.update(|_| v)
    }
    /// Adds `v` (wrapping) and returns the previous value.
    fn fetch_add(&self, v: u64) -> u64 {
        self.update(|old| old.wrapping_add(v))
    }
    /// Subtracts `v` (wrapping) and returns the previous value.
    fn fetch_sub(&self, v: u64) -> u64 {
        self.update(|old| old.wrapping_sub(v))
    }
    /// Sets the bits of `v` and returns the previous value.
    fn fetch_or(&self, v: u64) -> u64 {
        self.update(|old| old | v)
    }
    /// Applies `f` atomically (CAS loop) and returns the replaced value.
    fn update(&self, f: impl Fn(u64) -> u64) -> u64 {
        let mut old = self.load();
        loop {
            match self.compare_exchange(old, f(old)) {
                Ok(v) => return v,
                Err(seen) => old = seen,
            }
        }
    }
}

impl<T: Cell64> Cell64 for &T {
    fn load(&self) -> u64 {
        (**self).load()
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<u64, u64> {
        (**self).compare_exchange(current, new)
    }
    fn store(&self, v: u64) {
        (**self).store(v)
    }
    fn swap(&self, v: u64) -> u64 {
        (**self).swap(v)
    }
    fn fetch_add(&self, v: u64) -> u64 {
        (**self).fetch_add(v)
    }
    fn fetch_sub(&self, v: u64) -> u64 {
        (**self).fetch_sub(v)
    }
    fn fetch_or(&self, v: u64) -> u64 {
        (**self).fetch_or(v)
    }
}

impl Cell64 for core::sync::atomic::AtomicU64 {
    fn load(&self) -> u64 {
        self.load(core::sync::atomic::Ordering::SeqCst)
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<u64, u64> {
        self.compare_exchange(
            current,
            new,
            core::sync::atomic::Ordering::SeqCst,
            core::sync::atomic::Ordering::SeqCst,
        )
    }
    fn store(&self, v: u64) {
        self.store(v, core::sync::atomic::Ordering::SeqCst)
    }
    fn swap(&self, v: u64) -> u64 {
        self.swap(v, core::sync::atomic::Ordering::SeqCst)
    }
    fn fetch_add(&self, v: u64) -> u64 {
        self.fetch_add(v, core::sync::atomic::Ordering::SeqCst)
    }
    fn fetch_sub(&self, v: u64) -> u64 {
        self.fetch_sub(v, core::sync::atomic::Ordering::SeqCst)
    }
    fn fetch_or(&self, v: u64) -> u64 {
        self.fetch_or(v, core::sync::atomic::Ordering::SeqCst)
    }
}

/// The guard against the gfn -> mfn ABA race (invariant G1).
pub trait Gate {
    /// Starts a fast fault; `false` means a grace period is pending and the
    /// caller must take the locked path instead.
    fn enter(&self) -> bool;
    /// Ends a fast fault started by a successful [`Gate::enter`].
    fn exit(&self);
    /// Waits (calling `spin` between polls) until every fast fault that
    /// entered before this call has exited. Called only by the holder of
    /// the domain's main lock.
    fn synchronize(&self, spin: impl Fn());
}

/// The gate used by the fast server: a count of fast faults in flight and a
/// pending flag that turns new fast faults away while the locked path waits,
/// so the wait is bounded by the few instructions of the faults in flight.
#[derive(Debug, Default)]
pub struct FastGate<C> {
    inflight: C,
    pending: C,
}

impl<C: Cell64> FastGate<C> {
    /// A gate over the two given cells (both must start at 0).
    pub const fn new(inflight: C, pending: C) -> Self {
        Self { inflight, pending }
    }
}

impl<C: Cell64> Gate for FastGate<C> {
    fn enter(&self) -> bool {
        // Dekker with `synchronize`, with read-modify-writes only (they read
        // the latest value of their cell; plain SeqCst loads are not enough
        // under the C11 model and loom): either the synchronizer sees us in
        // flight, or we see it pending.
        self.inflight.fetch_add(1);
        if self.pending.fetch_or(0) != 0 {
            self.inflight.fetch_sub(1);
            return false;
        }
        true
    }
    fn exit(&self) {
        self.inflight.fetch_sub(1);
    }
    fn synchronize(&self, spin: impl Fn()) {
        self.pending.swap(1);
        while self.inflight.fetch_or(0) != 0 {
            spin();
        }
        self.pending.swap(0);
    }
}

/// Per-domain dirty log as seen by the lockless path.
pub trait DirtyLog {
    /// Marks `gfn` dirty (idempotent).
    fn mark(&self, gfn: u64);
}

/// What the fast path did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastOutcome {
    /// W restored with one CAS and `gfn` logged dirty: resume the guest.
    Fixed {
        /// The guest frame logged dirty.
        gfn: u64,
    },
    /// Another pCPU restored W first: resume the guest.
    AlreadyWritable,
    /// Not a dirty-logging write fault (or no gfn for the entry): use the
    /// locked path.
    NotFast,
    /// The entry changed under us (CAS failed) or a grace period was
    /// pending: use the locked path.
    Raced,
}

/// The fast page fault: inside `gate`, `locate` finds the leaf entry (it may
/// walk shadow frames: they are not freed while a fast fault is inside the
/// gate); if the entry is present, read-only and [`SPTE_FAST_W`], restore W
/// with one CAS and log the gfn that `gfn_of` derives from the entry value.
pub fn fast_fix_write<C: Cell64>(
    gate: &impl Gate,
    locate: impl FnOnce() -> Option<C>,
    gfn_of: impl Fn(u64) -> Option<u64>,
    dirty: &impl DirtyLog,
) -> FastOutcome {
    if !gate.enter() {
        return FastOutcome::Raced;
    }
    let Some(spte) = locate() else {
        gate.exit();
        return FastOutcome::NotFast;
    };
    let old = spte.load();
    let outcome = if old & SPTE_P == 0 || old & SPTE_FAST_W == 0 {
        FastOutcome::NotFast
    } else if old & SPTE_W != 0 {
        FastOutcome::AlreadyWritable
    } else {
        match gfn_of(old) {
            None => FastOutcome::NotFast,
            Some(gfn) => match spte.compare_exchange(old, old | SPTE_W) {
                // Log after the CAS: a get-and-clear takes the bitmap before
                // it write-protects, so a mark that lands after its take is
                // in the next round, and a mark before its take is followed
                // by its write-protect of this very entry.
                Ok(_) => {
                    dirty.mark(gfn);
                    FastOutcome::Fixed { gfn }
                }
                Err(_) => FastOutcome::Raced,
            },
        }
    };
    gate.exit();
    outcome
}

/// Locked-path update of a present leaf (invariant G2): atomically replaces
/// the entry with `f(old)` and returns `old`, the value that was really
/// replaced; the caller owes a flush iff `old` was writable (and present)
/// and the new value is not, or the target changed.
pub fn update_leaf(spte: &impl Cell64, f: impl Fn(u64) -> u64) -> u64 {
    spte.update(f)
}

/// Whether replacing `old` by `new` requires a TLB flush for the pCPUs that
/// may cache `old`.
pub fn needs_flush(old: u64, new: u64) -> bool {
    if old & SPTE_P == 0 {
        return false;
    }
    if new & SPTE_P == 0 || (old & SPTE_ADDR) != (new & SPTE_ADDR) {
        return true;
    }
    let narrowed = |bit: u64| old & bit != 0 && new & bit == 0;
    narrowed(SPTE_W) || narrowed(SPTE_U) || (new & SPTE_NX != 0 && old & SPTE_NX == 0)
}
