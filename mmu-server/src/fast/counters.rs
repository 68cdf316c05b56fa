//! `GetCounters` for the fast server: per-domain relaxed atomic counters
//! (so the lockless fast page fault counts without the main lock), the
//! totals of destroyed domains, and the whole-server sum.
//!
//! What counts where (meanings as documented on [`ServerCounters`]):
//! - `page_faults`: the lockless path ([`FastServer::fast_page_fault`]) for
//!   the faults it fixes, the slow path's closure for every fault of a known
//!   vCPU it serves, and [`FastServer::count_fault_of`] for a fault refused
//!   before the lock (invalid pCPU).
//! - `faults_fixed` / `fast_path_fixes`: the lockless path counts both; the
//!   slow path's `Resume`, `InjectPageFault`, `EmulateWrite` and
//!   `WriteDone` replies are counted by reply kind in [`Inner::count_reply`]
//!   (called by `serve` for every reply, with its flush obligation).
//! - `shadow_pages_created` / `_freed`: where a shadow page's frame is taken
//!   (`get_sp`) and given back (`reclaim`), on the page's domain. The
//!   per-pCPU L4 copies of [`policy::PerPcpuCopies`] belong to no domain
//!   (a pCPU's copy frame serves every domain that runs there and outlives
//!   them): they count in the whole-server answer only, through
//!   [`L4Policy::frames_counted`].
//! - `shadow_pages_in_use` = created - freed at the time of the reply
//!   (pages obsoleted by a zap but not yet freed count as in use).
//! - `shadow_pages_peak`: per domain, raised (`fetch_max`) to created - freed
//!   after each shadow page the domain takes ([`Inner::count_created`]); for
//!   the whole server, `Inner::peak`, raised at the same points to the
//!   whole-server level (every live domain + the policy's frames), and to the
//!   level at the time of a whole-server reply. The per-pCPU copies raise it
//!   at the next shadow page taken or reply, not when taken themselves. A
//!   destroyed domain's peak only lasts in the server's peak (the retired
//!   total keeps the largest of its domains' peaks, a lower bound, which the
//!   whole-server answer replaces by `Inner::peak`).
//! - `zaps`: completed `ZapAll` requests (not the internal zaps of a
//!   domain's destruction or of running out of frames).
//! - `reclaims`: once per step that got frames back because the pool ran
//!   dry: early freeing of a domain's acknowledged pending pages or of idle
//!   per-pCPU copies in `alloc_frame`, the emergency zap-and-free, and the
//!   zap of a domain whose request failed for lack of frames.
//! - `unshadowed`: write-flood unshadowing in `emulated_write`.
//! - `unsyncs` / `resyncs`: always 0 by design: this server keeps shadows
//!   coherent by write protection and never lets a shadow page go out of
//!   sync (see the module docs of [`super`]).
//! - `flush_obligations` / `flush_cpus`: every reply of a request about the
//!   domain (a vCPU's or the domain's own) carrying an obligation.
//!
//! A destroyed domain's counts (with its last reply's flush) move into the
//! server's `retired` total; the whole-server answer is `retired` + every
//! live domain + the policy's frames.

use super::*;
use abi::mmu::ServerCounters;

/// One domain's counters. Relaxed atomics on their own cache lines: the
/// lockless fast page fault increments them concurrently from every pCPU
/// the domain runs on; readers only need each count eventually exact.
#[derive(Debug, Default)]
#[repr(align(64))]
pub(super) struct DomCounters {
    pub(super) page_faults: AtomicU64,
    pub(super) faults_fixed: AtomicU64,
    pub(super) faults_injected: AtomicU64,
    pub(super) fast_path_fixes: AtomicU64,
    pub(super) shadow_pages_created: AtomicU64,
    pub(super) shadow_pages_freed: AtomicU64,
    pub(super) zaps: AtomicU64,
    pub(super) reclaims: AtomicU64,
    pub(super) emulate_write_replies: AtomicU64,
    pub(super) emulated_writes: AtomicU64,
    pub(super) unshadowed: AtomicU64,
    pub(super) flush_obligations: AtomicU64,
    pub(super) flush_cpus: AtomicU64,
    pub(super) shadow_pages_peak: AtomicU64,
}

/// Adds `n` to a counter (relaxed: counts only).
fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl DomCounters {
    /// Counts one fault fixed by the lockless fast path.
    pub(super) fn fast_fix(&self) {
        add(&self.page_faults, 1);
        add(&self.faults_fixed, 1);
        add(&self.fast_path_fixes, 1);
    }

    /// Counts a reply's flush obligation, if any.
    fn flush(&self, flush: Option<FlushObligation>) {
        if let Some(f) = flush {
            add(&self.flush_obligations, 1);
            add(&self.flush_cpus, u64::from(f.cpus.0.count_ones()));
        }
    }

    /// The counts now, with `shadow_pages_in_use` = created - freed.
    pub(super) fn snapshot(&self) -> ServerCounters {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let created = l(&self.shadow_pages_created);
        let freed = l(&self.shadow_pages_freed);
        ServerCounters {
            page_faults: l(&self.page_faults),
            faults_fixed: l(&self.faults_fixed),
            faults_injected: l(&self.faults_injected),
            fast_path_fixes: l(&self.fast_path_fixes),
            shadow_pages_created: created,
            shadow_pages_freed: freed,
            shadow_pages_in_use: created.saturating_sub(freed),
            zaps: l(&self.zaps),
            reclaims: l(&self.reclaims),
            emulate_write_replies: l(&self.emulate_write_replies),
            emulated_writes: l(&self.emulated_writes),
            // By design (write protection, never out of sync).
            unsyncs: 0,
            resyncs: 0,
            unshadowed: l(&self.unshadowed),
            flush_obligations: l(&self.flush_obligations),
            flush_cpus: l(&self.flush_cpus),
            shadow_pages_peak: l(&self.shadow_pages_peak).max(created.saturating_sub(freed)),
        }
    }
}

impl<P: L4Policy> Inner<P> {
    /// Adds 1 to the counter `pick` of domain `did` (if it exists).
    pub(super) fn count(&self, did: u32, pick: impl FnOnce(&DomCounters) -> &AtomicU64) {
        if let Some(d) = self.domains.get(&did) {
            add(pick(&d.shared.counters), 1);
        }
    }

    /// Counts a shadow page taken by domain `did` (if it exists) and raises
    /// its peak and the server's to the levels now.
    pub(super) fn count_created(&mut self, did: u32) {
        if let Some(d) = self.domains.get(&did) {
            let c = &d.shared.counters;
            let created = c.shadow_pages_created.fetch_add(1, Ordering::Relaxed) + 1;
            let freed = c.shadow_pages_freed.load(Ordering::Relaxed);
            c.shadow_pages_peak
                .fetch_max(created.saturating_sub(freed), Ordering::Relaxed);
        }
        self.peak = self.peak.max(self.total().shadow_pages_in_use);
    }

    /// Counts a page fault of `vcpu` served under the lock (if it exists).
    pub(super) fn count_page_fault(&self, vcpu: VcpuId) {
        if let Some(v) = self.vcpus.get(&vcpu.0) {
            self.count(v.domain, |c| &c.page_faults);
        }
    }

    /// Counts a reply (its flush, and its kind for fault and emulated-write
    /// outcomes) on the domain the request was about. Nothing if that
    /// domain or vCPU does not exist (any more: a destroyed domain's last
    /// flush is counted by [`Inner::retire`]).
    pub(super) fn count_reply(&self, about: About, reply: &MmuReply) {
        let did = match about {
            About::Vcpu(v) => match self.vcpus.get(&v.0) {
                Some(v) => v.domain,
                None => return,
            },
            About::Domain(d) => d.0,
        };
        let Some(d) = self.domains.get(&did) else {
            return;
        };
        let c = &d.shared.counters;
        c.flush(reply.flush());
        match reply {
            MmuReply::Resume { .. } => add(&c.faults_fixed, 1),
            MmuReply::InjectPageFault { .. } => add(&c.faults_injected, 1),
            MmuReply::EmulateWrite { .. } => add(&c.emulate_write_replies, 1),
            MmuReply::WriteDone { .. } => add(&c.emulated_writes, 1),
            _ => {}
        }
    }

    /// Moves the counts of `did` (about to be destroyed, its frames freed)
    /// into the server's `retired` total, with the flush the destroy reply
    /// will carry.
    pub(super) fn retire(&mut self, did: u32) {
        let Some(d) = self.domains.get(&did) else {
            return;
        };
        d.shared.counters.flush(self.flush.0);
        let c = d.shared.counters.snapshot();
        self.retired = self.retired.sum(&c);
    }

    /// The counters of `domain`, or of the whole server (raising the
    /// server's peak to the level now).
    fn counters(&mut self, domain: Option<DomainId>) -> Result<ServerCounters, MmuError> {
        if let Some(id) = domain {
            let d = self.domains.get(&id.0).ok_or(MmuError::UnknownDomain(id))?;
            return Ok(d.shared.counters.snapshot());
        }
        let mut c = self.total();
        self.peak = self.peak.max(c.shadow_pages_in_use);
        c.shadow_pages_peak = self.peak;
        Ok(c)
    }

    /// The whole server's counters, its peak not yet set (the largest of
    /// the domains' peaks).
    fn total(&self) -> ServerCounters {
        let (taken, given) = self.policy.frames_counted();
        let own = ServerCounters {
            shadow_pages_created: taken,
            shadow_pages_freed: given,
            ..ServerCounters::default()
        };
        let mut c = self
            .domains
            .values()
            .fold(self.retired.sum(&own), |acc, d| {
                acc.sum(&d.shared.counters.snapshot())
            });
        c.shadow_pages_in_use = c.shadow_pages_created.saturating_sub(c.shadow_pages_freed);
        c
    }
}

impl<P: L4Policy> FastServer<'_, P> {
    /// Counts a page fault of `vcpu` refused before the main lock (its
    /// domain found through the lockless map; nothing if unknown).
    pub(super) fn count_fault_of(&self, vcpu: VcpuId) {
        if let Some(v) = self.fast.read().get(&vcpu.0) {
            add(&v.dom.counters.page_faults, 1);
        }
    }

    /// The answer to `GetCounters` (under the main lock, so the sum over
    /// live domains and the retired total are taken at one point).
    pub(super) fn counters_reply(&self, domain: Option<DomainId>) -> MmuReply {
        match self.inner.lock().counters(domain) {
            Ok(counters) => MmuReply::Counters {
                counters,
                flush: None,
            },
            Err(e) => MmuReply::error(e),
        }
    }
}
