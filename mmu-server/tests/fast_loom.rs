//! `loom` model of the fast server's lockless page fault (seed 001 races).
//!
//! Runs under plain `cargo test`: the algorithm in
//! `mmu_server::fast::lockless` is generic over [`Cell64`], and this file
//! instantiates it with `loom` atomics. Each race has a passing test with the
//! real guard and a `should_panic` test that removes the guard, proving the
//! assertion catches the race.

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::{Arc, Mutex};
use loom::thread;
use mmu_server::fast::lockless::{
    fast_fix_write, needs_flush, update_leaf, Cell64, DirtyLog, FastGate, FastOutcome, Gate,
    SPTE_A, SPTE_FAST_W, SPTE_P, SPTE_W,
};

/// A loom atomic behind the server's cell trait.
#[derive(Default)]
struct L(AtomicU64);

impl L {
    fn new(v: u64) -> Self {
        L(AtomicU64::new(v))
    }
}

impl Cell64 for L {
    fn load(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
    fn compare_exchange(&self, current: u64, new: u64) -> Result<u64, u64> {
        self.0
            .compare_exchange(current, new, Ordering::SeqCst, Ordering::SeqCst)
    }
    fn swap(&self, v: u64) -> u64 {
        self.0.swap(v, Ordering::SeqCst)
    }
    fn store(&self, v: u64) {
        self.0.store(v, Ordering::SeqCst)
    }
    fn fetch_add(&self, v: u64) -> u64 {
        self.0.fetch_add(v, Ordering::SeqCst)
    }
    fn fetch_sub(&self, v: u64) -> u64 {
        self.0.fetch_sub(v, Ordering::SeqCst)
    }
    fn fetch_or(&self, v: u64) -> u64 {
        self.0.fetch_or(v, Ordering::SeqCst)
    }
}

/// A dirty bitmap of 64 gfns in one word.
struct Bitmap(L);

impl DirtyLog for Bitmap {
    fn mark(&self, gfn: u64) {
        self.0.fetch_or(1 << gfn);
    }
}

/// The guard removed: every fast fault enters, grace periods are no-ops.
struct NoGate;

impl Gate for NoGate {
    fn enter(&self) -> bool {
        true
    }
    fn exit(&self) {}
    fn synchronize(&self, _spin: impl Fn()) {}
}

const MFN: u64 = 7;
const GFN1: u64 = 1;
const GFN2: u64 = 2;
/// A leaf that is read-only only for dirty logging.
const RO_LOGGED: u64 = (MFN << 12) | SPTE_P | SPTE_A | SPTE_FAST_W;

fn builder() -> loom::model::Builder {
    let mut b = loom::model::Builder::new();
    b.preemption_bound = Some(3);
    b
}

struct AbaWorld<G> {
    gate: G,
    spte: L,
    /// The host's mfn -> gfn association (ABA: it changes under the path).
    gfn_of_mfn: L,
    dirty: Bitmap,
}

/// Race 1 (ABA on gfn -> mfn): the host moves `MFN` from GFN1 to GFN2 while
/// a fast fault is in flight; the locked path zaps the entry, waits for a
/// grace period, re-targets, and re-installs the identical entry value for
/// GFN2. Whatever the interleaving, a writable entry's current gfn must be
/// in the dirty log.
fn aba_model<G: Gate + Send + Sync + 'static>(gate: G) {
    let w = Arc::new(AbaWorld {
        gate,
        spte: L::new(RO_LOGGED),
        gfn_of_mfn: L::new(GFN1),
        dirty: Bitmap(L::default()),
    });
    let fast = {
        let w = w.clone();
        thread::spawn(move || {
            fast_fix_write(
                &w.gate,
                || Some(&w.spte),
                |_| Some(w.gfn_of_mfn.load()),
                &w.dirty,
            )
        })
    };
    // The locked path (it holds the domain lock: one synchronizer at a time).
    let old = update_leaf(&w.spte, |_| 0);
    w.gate.synchronize(thread::yield_now);
    w.gfn_of_mfn.store(GFN2);
    w.spte.store(RO_LOGGED);
    let outcome = fast.join().unwrap();

    let spte = w.spte.load();
    let dirty = w.dirty.0.load();
    let current_gfn = w.gfn_of_mfn.load();
    if spte & SPTE_W != 0 {
        assert!(
            dirty & (1 << current_gfn) != 0,
            "writable entry for gfn {current_gfn} not logged dirty: dirty={dirty:#b}, outcome={outcome:?}"
        );
    }
    // A fast fix that landed before the zap is seen by the zap's atomic swap.
    if let FastOutcome::Fixed { gfn } = outcome {
        assert!(dirty & (1 << gfn) != 0);
        assert!(spte & SPTE_W != 0 || old & SPTE_W != 0);
    }
}

#[test]
fn aba_on_gfn_to_mfn_is_guarded_by_the_gate() {
    builder().check(|| aba_model(FastGate::new(L::default(), L::default())));
}

#[test]
#[should_panic(expected = "not logged dirty")]
fn aba_on_gfn_to_mfn_is_caught_without_the_gate() {
    builder().check(|| aba_model(NoGate));
}

struct WpWorld {
    gate: FastGate<L>,
    spte: L,
    dirty: Bitmap,
    /// Model of the TLB of the pCPU where another vCPU runs: holds a writable
    /// translation. A fill and a flush are atomic w.r.t. each other (the
    /// hardware takes the shootdown IPI between instructions).
    tlb_writable: Mutex<bool>,
}

/// Race 2 (lost W / D): the locked path write-protects the frame (it became
/// a guest page table) while a fast fault restores W and another pCPU fills
/// its TLB from the entry. After the locked path has carried out the flushes
/// it decided on, no pCPU may hold a writable translation.
fn wp_model(atomic_update: bool) {
    let w = Arc::new(WpWorld {
        gate: FastGate::new(L::default(), L::default()),
        spte: L::new(RO_LOGGED),
        dirty: Bitmap(L::default()),
        tlb_writable: Mutex::new(false),
    });
    let fast = {
        let w = w.clone();
        thread::spawn(move || fast_fix_write(&w.gate, || Some(&w.spte), |_| Some(GFN1), &w.dirty))
    };
    let other_pcpu = {
        let w = w.clone();
        thread::spawn(move || {
            let mut tlb = w.tlb_writable.lock().unwrap();
            if w.spte.load() & SPTE_W != 0 {
                *tlb = true;
            }
        })
    };
    // Locked path: drop W and the lockless permission.
    let protect = |v: u64| v & !(SPTE_W | SPTE_FAST_W);
    let replaced = if atomic_update {
        update_leaf(&w.spte, protect)
    } else {
        // The racy variant: a snapshot, then a plain store.
        let old = w.spte.load();
        w.spte.store(protect(old));
        old
    };
    if needs_flush(replaced, protect(replaced)) {
        *w.tlb_writable.lock().unwrap() = false;
    }
    fast.join().unwrap();
    other_pcpu.join().unwrap();
    let final_spte = w.spte.load();
    assert!(
        !*w.tlb_writable.lock().unwrap() && final_spte & (SPTE_W | SPTE_FAST_W) == 0,
        "a pCPU still holds a writable translation after write-protect (replaced {replaced:#x}, entry now {final_spte:#x})"
    );
}

#[test]
fn write_protect_never_loses_a_lockless_w() {
    builder().check(|| wp_model(true));
}

#[test]
#[should_panic(expected = "still holds a writable translation")]
fn write_protect_with_load_then_store_is_caught() {
    builder().check(|| wp_model(false));
}

#[test]
fn gate_turns_fast_faults_away_while_pending() {
    builder().check(|| {
        let gate = Arc::new(FastGate::new(L::default(), L::default()));
        let g2 = gate.clone();
        let t = thread::spawn(move || {
            if g2.enter() {
                g2.exit();
            }
        });
        gate.synchronize(thread::yield_now);
        t.join().unwrap();
        assert!(gate.enter());
        gate.exit();
    });
}

// ---- foreign frames (grant mappings) ---------------------------------------

/// A foreign frame (not in the domain's memory map).
const FOREIGN_MFN: u64 = 9;
/// Foreign gfns the frame is mapped at, one after the other.
const FGFN1: u64 = 3;
const FGFN2: u64 = 4;

struct ForeignWorld<G> {
    gate: G,
    spte: L,
    /// The domain's current gfn of `FOREIGN_MFN` (a foreign mapping that
    /// comes and goes moves it: gfn -> mfn is not fixed for foreign gfns).
    foreign_gfn: L,
    dirty: Bitmap,
}

/// The ABA of the fast page fault, through a foreign mapping: a fast fault
/// is in flight on the leaf of a foreign frame mapped at FGFN1; the locked
/// path unmaps it (no grace period: foreign unmaps do not wait for one) and
/// maps the frame again at FGFN2, re-filling the identical entry value.
///
/// The server's rules: a foreign leaf is never lockless-writable
/// (`fast_w = false`) and the fast path derives a gfn only through the
/// memory map, which has none for a foreign frame (`via_memory_map`). With
/// either rule the fast path never acts on a foreign leaf; with neither, the
/// CAS succeeds on the re-filled entry and logs the gfn the frame had
/// before, and the entry is writable with its current gfn unlogged.
fn foreign_aba_model(fast_w: bool, via_memory_map: bool) {
    let leaf = (FOREIGN_MFN << 12) | SPTE_P | SPTE_A | if fast_w { SPTE_FAST_W } else { 0 };
    let w = Arc::new(ForeignWorld {
        gate: NoGate,
        spte: L::new(leaf),
        foreign_gfn: L::new(FGFN1),
        dirty: Bitmap(L::default()),
    });
    let fast = {
        let w = w.clone();
        thread::spawn(move || {
            fast_fix_write(
                &w.gate,
                || Some(&w.spte),
                |e| {
                    if via_memory_map {
                        // Only MFN (the domain's own frame) has a gfn.
                        ((e >> 12) == MFN).then_some(GFN1)
                    } else {
                        Some(w.foreign_gfn.load())
                    }
                },
                &w.dirty,
            )
        })
    };
    // Locked path: unmap (swap, reading A), map at FGFN2, re-fill.
    let old = update_leaf(&w.spte, |_| 0);
    w.foreign_gfn.store(FGFN2);
    w.spte.store(leaf);
    let outcome = fast.join().unwrap();
    let spte = w.spte.load();
    let dirty = w.dirty.0.load();
    let current = w.foreign_gfn.load();
    if spte & SPTE_W != 0 {
        assert!(
            dirty & (1 << current) != 0,
            "writable foreign entry for gfn {current} not logged dirty: dirty={dirty:#b}, \
             outcome={outcome:?}, replaced {old:#x}"
        );
    }
}

#[test]
fn foreign_leaves_are_never_touched_by_the_fast_path() {
    // The server's rules, both at once, with no grace period at all.
    builder().check(|| foreign_aba_model(false, true));
}

#[test]
fn either_foreign_rule_alone_closes_the_foreign_aba() {
    builder().check(|| foreign_aba_model(false, false));
    builder().check(|| foreign_aba_model(true, true));
}

#[test]
#[should_panic(expected = "not logged dirty")]
fn foreign_aba_is_caught_without_the_rules() {
    builder().check(|| foreign_aba_model(true, false));
}

struct HintWorld {
    spte: L,
    /// The frame a pCPU's TLB caches a translation to (0: none).
    tlb: Mutex<u64>,
}

/// The accessed-bit flush hint: a pCPU walks the foreign leaf (setting A
/// with an atomic read-modify-write before it caches, as the CPU does)
/// while the locked path unmaps it and flushes only if it saw A. After the
/// unmap no pCPU may cache the frame. An unmap that reads the entry and then
/// stores 0 (instead of one swap) loses an A set in between.
fn hint_model(atomic_unmap: bool) {
    let w = Arc::new(HintWorld {
        spte: L::new((FOREIGN_MFN << 12) | SPTE_P),
        tlb: Mutex::new(0),
    });
    let walker = {
        let w = w.clone();
        thread::spawn(move || {
            // The hardware walk and fill, one instruction's worth: the flush
            // IPI is taken before or after it, never inside (the lock).
            let mut tlb = w.tlb.lock().unwrap();
            // A is set atomically, only on a present entry, before caching.
            let seen = w
                .spte
                .update(|v| if v & SPTE_P != 0 { v | SPTE_A } else { v });
            if seen & SPTE_P != 0 {
                *tlb = seen >> 12;
            }
        })
    };
    let old = if atomic_unmap {
        update_leaf(&w.spte, |_| 0)
    } else {
        let old = w.spte.load();
        w.spte.store(0);
        old
    };
    if old & SPTE_A != 0 {
        // The flush of the dirty mask (the fill and the flush are atomic
        // w.r.t. each other: the hardware takes the IPI between
        // instructions).
        *w.tlb.lock().unwrap() = 0;
    }
    walker.join().unwrap();
    let cached = *w.tlb.lock().unwrap();
    assert!(
        cached != FOREIGN_MFN,
        "a pCPU caches the unmapped frame after an unmap that saw A={} (entry replaced: {old:#x})",
        old & SPTE_A != 0
    );
}

#[test]
fn the_accessed_hint_is_sound_with_an_atomic_unmap() {
    builder().check(|| hint_model(true));
}

#[test]
#[should_panic(expected = "caches the unmapped frame")]
fn an_unmap_that_loads_then_stores_loses_the_accessed_bit() {
    builder().check(|| hint_model(false));
}
