//! TLB shootdown: flush a page, a range or everything on a set of CPUs and wait for every acknowledgement.
//!
//! Each CPU owns one request slot in its [`Mailbox`]. A sender writes its
//! request there, sets the bit of every target in `acks`, sets its own bit in
//! each target's `inbox`, sends the IPIs and spins until `acks` is empty.
//! A target (in the IPI handler, or while spinning on its own request) swaps
//! its inbox to zero, carries out each sender's request and clears its bit in
//! that sender's `acks`. A sender has at most one request in flight, so the
//! slot is never overwritten while read, and since a waiting CPU keeps
//! serving its inbox, concurrent requests from many CPUs cannot deadlock,
//! even with interrupts disabled.
//!
//! Guests: a CPU running a guest takes the IPI as a VM exit; back in host
//! mode with interrupts enabled the IPI is delivered here (or the exit path
//! calls [`serve`]). A flush of a guest address space (`Space::Guest`) only
//! records the ASID in [`take_guest_flushes`]'s mask: the world-switch code
//! flushes that guest's TLB before its next VMRUN.

use crate::cpu::{self, CpuSet, CpuSetExt};
use crate::{apic, interrupts};
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::VirtAddr;

/// Why a flush is needed (a closed set: every caller names one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// The kernel changed one of its own mappings.
    KernelMapping = 0,
    /// An MMU server's reply carried a flush obligation for a guest.
    ServerObligation = 1,
    /// A guest's address space was torn down or its ASID reused.
    GuestTeardown = 2,
    /// In-image tests.
    SelfTest = 3,
}

impl Reason {
    fn from_bits(bits: u64) -> Reason {
        match bits {
            0 => Reason::KernelMapping,
            1 => Reason::ServerObligation,
            2 => Reason::GuestTeardown,
            _ => Reason::SelfTest,
        }
    }
}

/// Whose translations to flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    /// The host's own page tables (INVLPG / CR3 reload).
    Host,
    /// A guest's address space, by ASID (flushed before its next VMRUN).
    Guest {
        /// The guest's ASID (kept modulo 64 in the pending mask), or
        /// [`ALL_ASIDS`].
        asid: u32,
    },
}

/// The `asid` of a [`Space::Guest`] flush of every guest address space
/// (a grant revocation concerns whichever domains mapped the frame).
pub const ALL_ASIDS: u32 = u32::MAX;

/// Which translations to flush.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The page holding this address.
    Page(VirtAddr),
    /// `pages` 4 KiB pages from `start`.
    Range {
        /// First page.
        start: VirtAddr,
        /// Number of pages.
        pages: u64,
    },
    /// Every non-global translation.
    All,
}

/// Ranges longer than this are flushed as [`Scope::All`].
pub const MAX_INVLPG_PAGES: u64 = 32;

/// A TLB flush that must happen on `targets` before the changed mappings may
/// be relied on. Obtain one, then [`FlushRequest::execute`] it.
#[must_use = "a TLB flush obligation must be executed"]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlushRequest {
    /// CPUs that must flush (the caller included, if listed).
    pub targets: CpuSet,
    /// Host or guest translations.
    pub space: Space,
    /// Page, range or all.
    pub scope: Scope,
    /// Why.
    pub reason: Reason,
}

/// Per-CPU shootdown counters (monotonic).
#[derive(Debug)]
pub struct Counters {
    /// Shootdown IPIs this CPU sent.
    pub ipis_sent: AtomicU64,
    /// Requests from other CPUs this CPU carried out and acknowledged.
    pub flushes_done: AtomicU64,
    /// Flushes this CPU did for its own requests.
    pub local_flushes: AtomicU64,
    /// Times this CPU waited for acknowledgements.
    pub waits: AtomicU64,
}

impl Counters {
    /// All zero.
    pub const fn new() -> Self {
        Counters {
            ipis_sent: AtomicU64::new(0),
            flushes_done: AtomicU64::new(0),
            local_flushes: AtomicU64::new(0),
            waits: AtomicU64::new(0),
        }
    }

    /// A copy of the counters as plain numbers.
    pub fn snapshot(&self) -> CounterSnapshot {
        CounterSnapshot {
            ipis_sent: self.ipis_sent.load(Ordering::Relaxed),
            flushes_done: self.flushes_done.load(Ordering::Relaxed),
            local_flushes: self.local_flushes.load(Ordering::Relaxed),
            waits: self.waits.load(Ordering::Relaxed),
        }
    }
}

impl Default for Counters {
    fn default() -> Self {
        Self::new()
    }
}

/// Counter values at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CounterSnapshot {
    /// See [`Counters::ipis_sent`].
    pub ipis_sent: u64,
    /// See [`Counters::flushes_done`].
    pub flushes_done: u64,
    /// See [`Counters::local_flushes`].
    pub local_flushes: u64,
    /// See [`Counters::waits`].
    pub waits: u64,
}

/// One CPU's request slot (read by its targets) and inbox (senders to serve).
#[derive(Debug)]
pub struct Mailbox {
    /// Scope tag | space tag << 8 | reason << 16 | asid << 32.
    kind: AtomicU64,
    addr: AtomicU64,
    pages: AtomicU64,
    /// Targets that have not acknowledged this CPU's request yet.
    acks: AtomicU64,
    /// CPUs whose requests this CPU must carry out.
    inbox: AtomicU64,
    /// ASIDs (mod 64) whose guest TLB must be flushed before the next VMRUN here.
    guest_pending: AtomicU64,
}

impl Mailbox {
    /// An empty mailbox.
    pub const fn new() -> Self {
        Mailbox {
            kind: AtomicU64::new(0),
            addr: AtomicU64::new(0),
            pages: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            inbox: AtomicU64::new(0),
            guest_pending: AtomicU64::new(0),
        }
    }

    fn post(&self, space: Space, scope: Scope, reason: Reason) {
        let (tag, addr, pages) = match scope {
            Scope::Page(a) => (0, a.as_u64(), 1),
            Scope::Range { start, pages } => (1, start.as_u64(), pages),
            Scope::All => (2, 0, 0),
        };
        let (space_tag, asid) = match space {
            Space::Host => (0, 0),
            Space::Guest { asid } => (1, asid as u64),
        };
        self.kind.store(
            tag | space_tag << 8 | (reason as u64) << 16 | asid << 32,
            Ordering::Relaxed,
        );
        self.addr.store(addr, Ordering::Relaxed);
        self.pages.store(pages, Ordering::Relaxed);
    }

    fn read(&self) -> (Space, Scope, Reason) {
        let kind = self.kind.load(Ordering::Relaxed);
        let addr = VirtAddr::new_truncate(self.addr.load(Ordering::Relaxed));
        let scope = match kind & 0xFF {
            0 => Scope::Page(addr),
            1 => Scope::Range {
                start: addr,
                pages: self.pages.load(Ordering::Relaxed),
            },
            _ => Scope::All,
        };
        let space = match (kind >> 8) & 0xFF {
            0 => Space::Host,
            _ => Space::Guest {
                asid: (kind >> 32) as u32,
            },
        };
        (space, scope, Reason::from_bits((kind >> 16) & 0xFF))
    }
}

impl Default for Mailbox {
    fn default() -> Self {
        Self::new()
    }
}

impl FlushRequest {
    /// A flush of `scope` in `space` on `targets`.
    pub fn new(targets: CpuSet, space: Space, scope: Scope, reason: Reason) -> Self {
        FlushRequest {
            targets,
            space,
            scope,
            reason,
        }
    }

    /// Carries the flush out: locally if the calling CPU is a target, by IPI
    /// on the others (offline CPUs have no stale entries and are skipped),
    /// and returns once every target has acknowledged. While waiting, this
    /// CPU serves requests sent to it. Not for use in interrupt handlers.
    pub fn execute(self) {
        let me = cpu::current();
        let my = me.index();
        if self.targets.has(my) {
            flush_local(self.space, self.scope);
            me.counters.local_flushes.fetch_add(1, Ordering::Relaxed);
        }
        let online = CpuSet::all()
            .indices()
            .filter(|&i| cpu::get(i).is_online())
            .fold(CpuSet::EMPTY, CpuSet::with);
        let remote = CpuSet(self.targets.0 & online.0).without(my);
        if remote.is_empty() {
            return;
        }
        let slot = &me.mailbox;
        assert_eq!(
            slot.acks.load(Ordering::Relaxed),
            0,
            "nested shootdown on cpu {my}"
        );
        slot.post(self.space, self.scope, self.reason);
        slot.acks.store(remote.0, Ordering::Release);
        for t in remote.indices() {
            cpu::get(t)
                .mailbox
                .inbox
                .fetch_or(1 << my, Ordering::AcqRel);
        }
        x86_64::instructions::interrupts::without_interrupts(|| {
            for t in remote.indices() {
                apic::send_ipi(cpu::get(t).apic_id(), interrupts::SHOOTDOWN_VECTOR);
            }
        });
        me.counters
            .ipis_sent
            .fetch_add(remote.len() as u64, Ordering::Relaxed);
        me.counters.waits.fetch_add(1, Ordering::Relaxed);
        while slot.acks.load(Ordering::Acquire) != 0 {
            serve();
            core::hint::spin_loop();
        }
    }
}

/// Carries out every request waiting in the calling CPU's inbox and
/// acknowledges it. Called by the IPI handler, by waiting senders, and by
/// the VM-exit path; cheap when the inbox is empty.
pub fn serve() {
    let me = cpu::current();
    let inbox = &me.mailbox.inbox;
    if inbox.load(Ordering::Relaxed) == 0 {
        return;
    }
    let senders = CpuSet(inbox.swap(0, Ordering::AcqRel));
    for s in senders.indices() {
        let slot = &cpu::get(s).mailbox;
        let (space, scope, _reason) = slot.read();
        flush_local(space, scope);
        me.counters.flushes_done.fetch_add(1, Ordering::Relaxed);
        slot.acks.fetch_and(!(1 << me.index()), Ordering::AcqRel);
    }
}

/// Takes (and clears) the calling CPU's mask of guest ASIDs (mod 64) whose
/// TLB entries must be flushed before the next VMRUN on this CPU.
pub fn take_guest_flushes() -> u64 {
    cpu::current()
        .mailbox
        .guest_pending
        .swap(0, Ordering::AcqRel)
}

fn flush_local(space: Space, scope: Scope) {
    use x86_64::instructions::tlb;
    match space {
        Space::Guest { asid } => {
            let bits = if asid == ALL_ASIDS {
                u64::MAX
            } else {
                1 << (asid % 64)
            };
            cpu::current()
                .mailbox
                .guest_pending
                .fetch_or(bits, Ordering::AcqRel);
        }
        Space::Host => match scope {
            Scope::Page(a) => tlb::flush(a),
            Scope::Range { start, pages } if pages <= MAX_INVLPG_PAGES => {
                for p in 0..pages {
                    tlb::flush(start + p * 4096);
                }
            }
            _ => tlb::flush_all(),
        },
    }
}

/// Sum of every listed CPU's counters.
pub fn totals() -> CounterSnapshot {
    let mut t = CounterSnapshot::default();
    for i in 0..cpu::count() {
        let s = cpu::get(i).counters.snapshot();
        t.ipis_sent += s.ipis_sent;
        t.flushes_done += s.flushes_done;
        t.local_flushes += s.local_flushes;
        t.waits += s.waits;
    }
    t
}
