//! Prefetching in the fast server: a scripted guest demand-paging sequence
//! (fault, the guest's handler zeroes a page through its direct map and
//! writes the PTE, the access is retried) on the conformance suite's
//! simulated machine, counting the page faults that reach the server with
//! prefetching on and off and on the reference, and checking that every
//! guest-visible result (outcomes, all of guest memory: A/D bits included)
//! is the same on all of them.

use abi::MmuServer;
use conformance::arch::{Access, Ctrl, Size, A, D, P, RW};
use conformance::machine::{Machine, Outcome, DIRECT};
use conformance::ram::{Ram, SuitePhys};
use core::sync::atomic::AtomicU64;
use mmu_server::fast::policy::{L4Policy, PerPcpuCopies, SharedRoots};
use mmu_server::fast::{DirtyMode, FastServer, Prefetch};
use mmu_server::reference::Reference;

const FRAMES: u64 = 4096;
const GUEST: u64 = 1024;
const REGIONS: [(u64, u64); 2] = [(0, 512), (0x1000, 256)];
const PAGES: u64 = 96;

/// What one run saw: fault round trips, outcomes, guest memory.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    faults: u64,
    outcomes: Vec<Outcome>,
    memory: Vec<u64>,
}

/// The scripted sequence: per page, a write to the unmapped page (#PF
/// injected), the handler zeroes eight words of a fresh frame through the
/// direct map and maps it with `pte_flags`, the write is retried; then
/// everything is read back. With `logging`, dirty logging is on meanwhile.
fn script(m: &mut Machine<'_>, pte_flags: u64, logging: bool) -> Seen {
    let d = m.create_domain(&REGIONS).unwrap_or_else(|f| panic!("{f}"));
    let v = m
        .create_vcpu(d, Ctrl::DEFAULT)
        .unwrap_or_else(|f| panic!("{f}"));
    let cr3 = m.new_space(d, None).unwrap_or_else(|f| panic!("{f}"));
    m.schedule(v, 0).unwrap_or_else(|f| panic!("{f}"));
    m.write_cr3(v, cr3).unwrap_or_else(|f| panic!("{f}"));
    if logging {
        m.enable_dirty(d).unwrap_or_else(|f| panic!("{f}"));
    }
    let base = m.stats.faults;
    let mut outcomes = Vec::new();
    for i in 0..PAGES {
        let va = 0x4000_0000 + i * 4096;
        outcomes.push(
            m.access(v, va, Access::WRITE, i)
                .unwrap_or_else(|f| panic!("{f}")),
        );
        let gpa = m.alloc_gfn(d) << 12;
        for w in 0..8 {
            m.guest_write(d, Some(v), gpa + w * 8, 0)
                .unwrap_or_else(|f| panic!("{f}"));
        }
        m.map(d, Some(v), cr3, va, gpa, Size::K4, pte_flags)
            .unwrap_or_else(|f| panic!("{f}"));
        outcomes.push(
            m.access(v, va, Access::WRITE, i + 1)
                .unwrap_or_else(|f| panic!("{f}")),
        );
    }
    for i in 0..PAGES {
        let va = 0x4000_0000 + i * 4096;
        outcomes.push(
            m.access(v, va, Access::READ, 0)
                .unwrap_or_else(|f| panic!("{f}")),
        );
    }
    if logging {
        let dirty = m.get_dirty(d).unwrap_or_else(|f| panic!("{f}"));
        outcomes.push(Outcome::Ok(dirty.len() as u64));
    }
    m.check().unwrap_or_else(|f| panic!("{f}"));
    let faults = m.stats.faults - base;
    let memory = (0..768u64)
        .flat_map(|g| {
            let gpa = if g < 512 {
                g << 12
            } else {
                (0x1000 + g - 512) << 12
            };
            (0..512).map(move |w| gpa + w * 8)
        })
        .map(|gpa| m.peek(d, gpa).unwrap_or(0))
        .collect();
    let _ = DIRECT;
    Seen {
        faults,
        outcomes,
        memory,
    }
}

fn on_reference(pte_flags: u64, logging: bool) -> Seen {
    let words: Vec<AtomicU64> = (0..FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
    let ram = Ram::new(0x10_0000, &words);
    let phys = SuitePhys::new(ram, ram.first_mfn() + GUEST);
    let server = Reference::new(&phys, mmu_server::Config::default());
    let s: &dyn MmuServer = &server;
    let mut m = Machine::new("reference", s, &phys, GUEST, 2);
    script(&mut m, pte_flags, logging)
}

fn on_fast<P: L4Policy>(
    name: &'static str,
    prefetch: Prefetch,
    mode: DirtyMode,
    pte_flags: u64,
    logging: bool,
) -> (Seen, u64) {
    let words: Vec<AtomicU64> = (0..FRAMES * 512).map(|_| AtomicU64::new(0)).collect();
    let ram = Ram::new(0x10_0000, &words);
    let phys = SuitePhys::new(ram, ram.first_mfn() + GUEST);
    let server =
        FastServer::<P>::with_options(name, &phys, mmu_server::Config::default(), mode, prefetch);
    let mut m = Machine::new(name, &server, &phys, GUEST, 2);
    let seen = script(&mut m, pte_flags, logging);
    server
        .audit()
        .unwrap_or_else(|e| panic!("{name}: audit: {e}"));
    let prefetched = server
        .stats()
        .prefetched
        .load(core::sync::atomic::Ordering::Relaxed);
    (seen, prefetched)
}

/// Runs the script on the reference and on `name` with prefetching off and
/// on, asserts every guest-visible result equal, and returns the page
/// faults that reached the server: (reference, off, on).
fn compare<P: L4Policy>(
    name: &'static str,
    mode: DirtyMode,
    pte_flags: u64,
    logging: bool,
) -> (u64, u64, u64) {
    let reference = on_reference(pte_flags, logging);
    let (off, none) = on_fast::<P>(name, Prefetch::Off, mode, pte_flags, logging);
    let (on, some) = on_fast::<P>(name, Prefetch::On, mode, pte_flags, logging);
    assert_eq!(none, 0, "{name}: prefetched with prefetch off");
    assert!(some > 0, "{name}: nothing prefetched");
    for (what, s) in [("prefetch off", &off), ("prefetch on", &on)] {
        assert_eq!(
            s.outcomes, reference.outcomes,
            "{name} ({what}): outcomes differ from the reference"
        );
        assert!(
            s.memory == reference.memory,
            "{name} ({what}): guest memory (A/D bits) differs from the reference"
        );
    }
    eprintln!(
        "{name} {mode:?} flags {pte_flags:#x} logging {logging}: faults for {PAGES} pages: \
         reference {} off {} on {} (prefetched {some})",
        reference.faults, off.faults, on.faults
    );
    assert!(
        on.faults <= off.faults,
        "{name}: {} faults with prefetch, {} without",
        on.faults,
        off.faults
    );
    (reference.faults, off.faults, on.faults)
}

#[test]
fn prefetch_saves_faults_accessed_dirty_ptes() {
    // PTEs written with A and D set (as Linux writes them for a write
    // fault): the retry of the faulting write no longer faults at all, and
    // the direct-map zeroing misses are amortised over the window.
    for (r, off, on) in [
        compare::<SharedRoots>(
            "fast-shared",
            DirtyMode::WriteProtect,
            P | RW | A | D,
            false,
        ),
        compare::<PerPcpuCopies>(
            "fast-percpu",
            DirtyMode::WriteProtect,
            P | RW | A | D,
            false,
        ),
        compare::<SharedRoots>("fast-shared", DirtyMode::DirtyBits, P | RW | A | D, false),
    ] {
        // Without prefetch: every retry faults; with it, none does, and
        // at least a third of the direct-map misses go too.
        assert!(off - on >= PAGES + PAGES / 3, "saved {} of {off}", off - on);
        // Fewer round trips than the reference, despite the emulated PTE
        // write the reference does not take.
        assert!(on < r, "prefetch: {on} faults vs reference {r}");
    }
}

#[test]
fn prefetch_saves_faults_accessed_ptes() {
    // A set but D clear: the retried write must fault to set D (the shadow
    // is read-only until then); the direct-map misses still shrink.
    for (_, off, on) in [
        compare::<SharedRoots>("fast-shared", DirtyMode::WriteProtect, P | RW | A, false),
        compare::<PerPcpuCopies>("fast-percpu", DirtyMode::WriteProtect, P | RW | A, false),
    ] {
        assert!(off - on >= PAGES / 3, "saved {} of {off}", off - on);
    }
}

#[test]
fn prefetch_saves_faults_unaccessed_ptes() {
    // PTEs written without A (as Umbra's test guests write them): the retry
    // must fault (the guest's A bit is set only by a real access), but the
    // direct-map misses are still amortised.
    for (_, off, on) in [
        compare::<SharedRoots>("fast-shared", DirtyMode::WriteProtect, P | RW, false),
        compare::<PerPcpuCopies>("fast-percpu", DirtyMode::WriteProtect, P | RW, false),
    ] {
        assert!(off - on >= PAGES / 3, "saved {} of {off}", off - on);
    }
}

#[test]
fn prefetch_with_dirty_logging() {
    // Write protection for logging: every first write to a page must exit
    // to be logged, so prefetched leaves are read-only and this all-writes
    // script saves nothing; the results must still be identical.
    compare::<SharedRoots>("fast-shared", DirtyMode::WriteProtect, P | RW | A | D, true);
    // Hardware D bits log without exits: the prefetched leaves are writable.
    let (_, off, on) =
        compare::<SharedRoots>("fast-shared", DirtyMode::DirtyBits, P | RW | A | D, true);
    assert!(off - on >= PAGES, "saved {} of {off}", off - on);
    compare::<PerPcpuCopies>("fast-percpu", DirtyMode::DirtyBits, P | RW | A, true);
}
