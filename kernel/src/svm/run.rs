//! One run: loading the domains, running every pCPU's vCPUs, the kernel's own clock (zaps, dirty harvests), the teardown.

use super::domain::{self, BootMode, Domain, DomainSpec};
use super::door::{Svm, Transport, SVM};
use super::grant::GrantDoor;
use super::sched::Scheduler;
use super::stats::{self, bump, STATS};
use super::vcpu::{self, Vcpu};
use super::{enable_on_this_cpu, host, online_mask, svm};
use crate::task::Task;
use abi::grant::{GrantReply, GrantRequest, GRANT_PROTOCOL_VERSION};
use abi::task::ControlPage;
use abi::{
    DomainId, GuestCr3, MemRegion, MemoryMap, Mfn, MmuReply, MmuRequest, PcpuId, VcpuId,
    PROTOCOL_VERSION,
};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use spin::{Mutex, Once};

/// Zaps every shadow of `dom` (the door carries out the reply's flush);
/// an unexpected reply comes back boxed.
pub fn zap(dom: &Domain) -> Result<(), Box<MmuReply>> {
    bump(&STATS[host::cpu_index()].zaps);
    bump(&dom.zaps);
    match svm().mmu(Some(dom), &MmuRequest::ZapAll { domain: dom.id }) {
        Ok(MmuReply::Done { .. }) | Err(_) => Ok(()),
        Ok(other) => Err(Box::new(other)),
    }
}

/// Gets and clears the domain's whole dirty log from the server, ORing it
/// into `bits` (one bit per gfn).
pub fn harvest_dirty(dom: &Domain, bits: &mut [u64]) -> Result<(), Box<MmuReply>> {
    let mut start = abi::Gfn(0);
    loop {
        let Ok(reply) = svm().mmu(
            Some(dom),
            &MmuRequest::GetAndClearDirty {
                domain: dom.id,
                start,
            },
        ) else {
            return Ok(());
        };
        match reply {
            MmuReply::DirtyBitmap { chunk, .. } => {
                for g in chunk.dirty() {
                    if let Some(w) = bits.get_mut((g.0 / 64) as usize) {
                        *w |= 1 << (g.0 % 64);
                    }
                }
                match chunk.next {
                    Some(n) if n.0 > start.0 => start = n,
                    _ => return Ok(()),
                }
            }
            other => return Err(Box::new(other)),
        }
    }
}

/// The longest a run of Umbra's own workloads may take before the watchdog
/// stops what still runs.
pub const RUN_SECONDS: u64 = 100;

/// The longest a run with an unmodified guest may take. Such a guest is a
/// test kernel no one here wrote, and an exhaustive one (kvm-unit-tests'
/// `access_test`: about two million page-table cases) runs for many
/// minutes under TCG, as it does under QEMU alone; the runner's own limit
/// (`cargo xtask run --timeout`) is meant to end a hung one first.
pub const UNMODIFIED_RUN_SECONDS: u64 = 6 * 3600;

/// The watchdog's bound for a run of `specs`: [`UNMODIFIED_RUN_SECONDS`]
/// if any domain is an unmodified Multiboot guest, else [`RUN_SECONDS`].
pub fn watchdog_seconds(specs: &[DomainSpec]) -> u64 {
    if specs.iter().any(|s| s.multiboot.is_some()) {
        UNMODIFIED_RUN_SECONDS
    } else {
        RUN_SECONDS
    }
}

/// In-image check of [`watchdog_seconds`]: a run with an unmodified guest
/// gets the long bound, one of Umbra's own workloads the short one.
pub fn self_test() -> Result<(), &'static str> {
    static GUEST: domain::MultibootGuest = domain::MultibootGuest {
        image: &[],
        cmdline: "",
        modules: &[],
    };
    let unmodified = DomainSpec::unmodified(&GUEST, 1);
    let own = DomainSpec {
        multiboot: None,
        ..unmodified
    };
    if watchdog_seconds(&[own, own]) != RUN_SECONDS {
        return Err("a run of Umbra's own workloads did not get the short watchdog");
    }
    if watchdog_seconds(&[unmodified]) != UNMODIFIED_RUN_SECONDS || UNMODIFIED_RUN_SECONDS < 3600 {
        return Err(
            "an unmodified guest's run would be stopped before an hour (access_test needs minutes)",
        );
    }
    Ok(())
}

/// TSC value after which the watchdog fires (0: not armed).
static DEADLINE: AtomicU64 = AtomicU64::new(0);
/// The bound the watchdog was armed with, in seconds (for its message).
static DEADLINE_SECONDS: AtomicU64 = AtomicU64::new(RUN_SECONDS);
/// TSC value of the next kernel clock work (zaps, dirty harvests).
static NEXT_WORK: AtomicU64 = AtomicU64::new(0);
/// Interval of the kernel clock work (dirty harvests), in ms.
const WORK_MS: u64 = 20;
/// Kernel zaps come every this many work intervals (250 ms: a few per run,
/// so they do not swamp the exit counts).
const ZAP_EVERY: u64 = 12;
/// Work intervals so far.
static WORK_TICKS: AtomicU64 = AtomicU64::new(0);

/// Whether the run's deadline has passed.
pub fn past_deadline() -> bool {
    let d = DEADLINE.load(Ordering::Relaxed);
    d != 0 && crate::apic::tsc() > d
}

/// The bound, in seconds, the running run's watchdog was armed with.
pub fn deadline_seconds() -> u64 {
    DEADLINE_SECONDS.load(Ordering::Relaxed)
}

/// The kernel's own clock, run from INTR exits on whichever pCPU comes first
/// after each interval: it zaps each domain whose workload asks for it and
/// harvests the dirty log of each domain that logs, while their vCPUs run on
/// other pCPUs (a zap-all or a log clear in the middle of a run that the
/// guest did not ask for; the flush obligations force the running vCPUs out).
pub fn timer_work() {
    let now = crate::apic::tsc();
    let next = NEXT_WORK.load(Ordering::Relaxed);
    if now < next
        || NEXT_WORK
            .compare_exchange(
                next,
                now + WORK_MS * crate::apic::tsc_per_ms(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_err()
    {
        return;
    }
    let zap_now = WORK_TICKS.fetch_add(1, Ordering::Relaxed) % ZAP_EVERY == ZAP_EVERY - 1;
    for d in svm().domains() {
        let running =
            d.ended.load(Ordering::Acquire) < d.spec.vcpus && !d.stopped.load(Ordering::Acquire);
        if !running {
            continue;
        }
        if d.spec.kernel_zaps && zap_now {
            if let Err(reply) = zap(d) {
                crate::kprintln!("svm: timer zap of d{} refused: {reply:?}", d.id.0);
            }
        }
        if d.dirty_on.load(Ordering::Acquire) {
            if let Some(mut bits) = d.harvest.try_lock() {
                match harvest_dirty(d, &mut bits) {
                    Ok(()) => bump(&d.harvests),
                    Err(reply) => {
                        crate::kprintln!("svm: timer harvest of d{} refused: {reply:?}", d.id.0)
                    }
                }
            }
        }
    }
}

/// Loads one domain per spec on `server` (implementation `name`), runs them
/// on every pCPU until all have ended, and returns the run's state for the
/// report (the image's job) and [`teardown`]. A run that fails to start
/// gives back what it loaded before it returns the error. `control` is the
/// control page whose pool counters the report reads; guest memory is also
/// mapped into every task of `mirrors`.
pub fn run(
    server: Transport,
    name: &str,
    control: &'static ControlPage,
    mirrors: Vec<&'static Task>,
    specs: &[DomainSpec],
    sched: Option<Scheduler>,
    grant: Option<GrantDoor>,
) -> Result<&'static Svm, &'static str> {
    let ncpu = host::cpus_online();
    crate::kprintln!(
        "svm: MMU server `{name}` over the {} transport; {} workloads on {} CPUs",
        server.name(),
        specs.len(),
        ncpu
    );
    let iopm_pa = host::alloc_zeroed(3)?;
    let msrpm_pa = host::alloc_zeroed(2)?;
    // SAFETY: freshly allocated, exclusively owned frames in the identity map.
    unsafe {
        core::ptr::write_bytes(host::va(iopm_pa), 0xFF, 3 * 4096);
        core::ptr::write_bytes(host::va(msrpm_pa), 0xFF, 2 * 4096);
    }
    let mut queues = Vec::new();
    for _ in 0..ncpu {
        queues.push(Mutex::new(Vec::new()));
    }
    stats::reset(ncpu);
    let svm: &'static Svm = Box::leak(Box::new(Svm {
        server,
        name: name.into(),
        control,
        down: AtomicBool::new(false),
        mirrors,
        sched,
        grant,
        domains: Once::new(),
        queues,
        iopm_pa,
        msrpm_pa,
    }));
    SVM.store(svm as *const Svm as *mut Svm, Ordering::Release);
    match svm.mmu(
        None,
        &MmuRequest::Hello {
            version: PROTOCOL_VERSION,
        },
    ) {
        Ok(MmuReply::Welcome { .. }) => {}
        other => {
            crate::kprintln!("svm: handshake refused: {other:?}");
            svm.domains.call_once(Vec::new);
            return Err("MMU server refused the protocol handshake");
        }
    }
    if let Some(g) = &svm.grant {
        let hello = GrantRequest::Hello {
            version: GRANT_PROTOCOL_VERSION,
        };
        if !matches!(svm.grant(None, &hello), Ok(GrantReply::Welcome { .. })) {
            crate::kprintln!("svm: grant server `{}` refused the handshake", g.name);
            svm.domains.call_once(Vec::new);
            return Err("the grant server refused the protocol handshake");
        }
    }
    if let Some(s) = &svm.sched {
        if !s.hello() {
            svm.domains.call_once(Vec::new);
            return Err("the scheduler refused the protocol handshake");
        }
    }
    let mut domains = Vec::new();
    let mut next_vcpu = 0u32;
    let result = load_all(svm, specs, ncpu, &mut domains, &mut next_vcpu);
    svm.domains.call_once(|| domains);
    if let Err(e) = result {
        // Give back what was loaded before the failure.
        teardown(svm);
        return Err(e);
    }

    let now = crate::apic::tsc();
    let bound = watchdog_seconds(specs);
    DEADLINE_SECONDS.store(bound, Ordering::Relaxed);
    DEADLINE.store(
        now + bound * 1000 * crate::apic::tsc_per_ms(),
        Ordering::Relaxed,
    );
    NEXT_WORK.store(now, Ordering::Relaxed);
    if let Some(s) = &svm.sched {
        s.begin();
    }
    let all = crate::cpu::CpuSet(online_mask());
    let results = crate::smp::run_on(all, pcpu_main);
    for (i, r) in results.iter().enumerate().take(ncpu) {
        if let Some(Err(e)) = r {
            crate::kprintln!("svm: cpu {i}: {e}");
        }
    }
    Ok(svm)
}

/// Loads every spec's domain and vCPUs and tells the server about them.
fn load_all(
    svm: &'static Svm,
    specs: &[DomainSpec],
    ncpu: usize,
    domains: &mut Vec<&'static Domain>,
    next_vcpu: &mut u32,
) -> Result<(), &'static str> {
    for (i, w) in specs.iter().enumerate() {
        let id = DomainId(i as u32 + 1);
        let mut pcpus = 0u64;
        for v in 0..w.vcpus {
            pcpus |= 1 << ((w.first_pcpu + v) as usize % ncpu);
        }
        let asid = (i as u32 % 15) + 1;
        let (dom, boots) = domain::load(id, *w, *next_vcpu, asid, pcpus)?;
        let dom: &'static Domain = Box::leak(Box::new(dom));
        svm.add_guest_range(dom.mem_pa, dom.mem_bytes)?;
        domains.push(dom);
        let mut map = MemoryMap::new();
        let region = MemRegion {
            gfn: abi::Gfn(0),
            mfn: Mfn(dom.mem_pa / 4096),
            pages: dom.mem_bytes / 4096,
        };
        map.push(region).map_err(|_| "memory map full")?;
        expect_done(
            svm,
            dom,
            &MmuRequest::CreateDomain {
                domain: id,
                memory: map.clone(),
            },
        )?;
        if svm.grant.is_some() {
            let req = GrantRequest::CreateDomain {
                domain: id,
                memory: map,
            };
            match svm.grant(Some(dom), &req) {
                Ok(GrantReply::Done { .. }) => {}
                Ok(other) => {
                    crate::kprintln!("svm: grant {req:?}: unexpected reply {other:?}");
                    return Err("the grant server refused a domain");
                }
                Err(_) => return Err("the grant server stopped during domain creation"),
            }
        }
        for (v, boot) in boots.iter().enumerate() {
            let pcpu = (w.first_pcpu as usize + v) % ncpu;
            let vid = VcpuId(*next_vcpu + v as u32);
            let p = PcpuId(pcpu as u32);
            expect_done(
                svm,
                dom,
                &MmuRequest::CreateVcpu {
                    domain: id,
                    vcpu: vid,
                },
            )?;
            // A server builds a root for whatever CR3 it holds while the
            // mode it holds has paging on, and a new vCPU holds CR3 0 in
            // long mode: a root for CR3 0 shadows gfn 0 as a page table,
            // and a caching server then keeps that RAM page write-protected
            // for good (a guest's string store to it cannot be emulated).
            // So a vCPU that starts paged gets its CR3 before its mode; one
            // that starts with paging off (an unmodified guest, whose
            // accesses outside RAM are MMIO) its mode before its CR3.
            let cr3 = |cr3| MmuRequest::WriteCr3 {
                vcpu: vid,
                pcpu: p,
                cr3: GuestCr3(cr3),
            };
            let mode = |mode| MmuRequest::SetPagingMode {
                vcpu: vid,
                pcpu: p,
                mode,
            };
            let start = dom
                .server_mode(&boot.mode.control())
                .map_err(|_| "a vCPU's starting state has no paging mode")?;
            let order = match boot.mode {
                BootMode::Long => [cr3(boot.mode.cr3()), mode(start)],
                BootMode::Multiboot { .. } => [mode(start), cr3(boot.mode.cr3())],
            };
            for req in &order {
                expect_done(svm, dom, req)?;
            }

            let vcpu = Vcpu::new(vid, v as u32, dom, boot, svm.iopm_pa, svm.msrpm_pa)?;
            match &svm.sched {
                Some(s) => {
                    let weight = match w.weights {
                        [] => abi::sched::DEFAULT_WEIGHT,
                        ws => u32::from(ws[v % ws.len()]),
                    };
                    s.add(vcpu, weight, p)?;
                }
                None => svm.queues[pcpu].lock().push(vcpu),
            }
        }
        *next_vcpu += w.vcpus;
    }
    Ok(())
}

/// What the teardown found.
#[derive(Clone, Copy, Debug)]
pub struct Teardown {
    /// Every domain was destroyed (or the server was stopped, and they
    /// were withdrawn from it without asking).
    pub destroyed: bool,
    /// Shadow-pool frames still taken, and the peak.
    pub left: u64,
    /// The most ever taken.
    pub peak: u64,
    /// How many may stay taken (one per pCPU).
    pub allowed: u64,
}

impl Teardown {
    /// Nothing leaked.
    pub fn clean(&self) -> bool {
        self.destroyed && self.left <= self.allowed
    }
}

/// Destroys every domain (all vCPUs are descheduled by now), gives its
/// memory back, and checks that the server returned its shadow frames (all
/// but at most one per pCPU). After a stopped server, the domains' memory
/// is withdrawn from it and freed without asking it anything, and the
/// pool is not checked (the caller frees it whole).
pub fn teardown(svm: &Svm) -> Teardown {
    let mut destroyed = true;
    // The grant server first: it unmaps every foreign mapping (and the
    // MMU server refuses to destroy a domain whose frames are mapped).
    if svm.grant.is_some() {
        for d in svm.domains() {
            match svm.grant(Some(d), &GrantRequest::DestroyDomain { domain: d.id }) {
                Ok(GrantReply::Done { .. }) | Err(_) => {}
                Ok(reply) => {
                    crate::kprintln!("svm: grant DestroyDomain d{}: {reply:?}", d.id.0);
                    destroyed = false;
                }
            }
        }
    }
    // Then the MMU server. A domain whose frames another still maps (only
    // after a grant server that stopped or failed to revoke) waits until
    // its mappers are gone (their foreign mappings go with them): passes
    // until one frees nothing.
    let mut left_over: Vec<&Domain> = svm.domains().to_vec();
    loop {
        let before = left_over.len();
        let mut refused = Vec::new();
        for d in left_over {
            match svm.mmu(Some(d), &MmuRequest::DestroyDomain { domain: d.id }) {
                Ok(MmuReply::Done { .. }) | Err(_) => {
                    svm.remove_guest_range(d.mem_pa, d.mem_bytes);
                    host::free(d.mem_pa, d.mem_bytes / 4096);
                }
                Ok(reply) => refused.push((d, reply)),
            }
        }
        let progress = refused.len() < before;
        if refused.is_empty() || !progress {
            for (d, reply) in &refused {
                crate::kprintln!("svm: DestroyDomain d{}: {reply:?}", d.id.0);
                destroyed = false;
            }
            break;
        }
        left_over = refused.into_iter().map(|(d, _)| d).collect();
    }
    let (left, peak) = svm.shadow_pages();
    // A server may keep a frame per pCPU for its whole life (fast-percpu's
    // L4 copy frames); anything beyond that is a leak.
    let allowed = host::cpus_online() as u64;
    if svm.server_stopped() {
        crate::kprintln!(
            "svm: MMU server `{}` was stopped: its shadow pool is reclaimed whole",
            svm.name
        );
        return Teardown {
            destroyed,
            left: 0,
            peak,
            allowed,
        };
    }
    crate::kprintln!(
        "svm: every domain destroyed; shadow pages still taken: {left} (peak {peak}, at most {allowed} may stay)"
    );
    Teardown {
        destroyed,
        left,
        peak,
        allowed,
    }
}

/// Sends a control request at domain creation (its flush is carried out
/// by the door) and expects `Done` (or a root, which is fetched again by
/// `VcpuScheduled` before the vCPU first runs).
fn expect_done(svm: &Svm, dom: &Domain, req: &MmuRequest) -> Result<(), &'static str> {
    match svm.mmu(Some(dom), req) {
        Ok(MmuReply::Done { .. } | MmuReply::LoadShadowRoot { .. }) => Ok(()),
        Ok(other) => {
            crate::kprintln!("svm: {req:?}: unexpected reply {other:?}");
            Err("MMU server refused a control request")
        }
        Err(_) => Err("MMU server stopped during domain creation"),
    }
}

/// One pCPU's share of the run: enable SVM, then run its vCPUs round-robin
/// until every one has ended.
fn pcpu_main() -> Result<(), &'static str> {
    let svm = svm();
    if let Some(s) = &svm.sched {
        return s.pcpu_loop();
    }
    let host_vmcb = enable_on_this_cpu()?;
    let me = host::cpu_index();
    let mut queue = core::mem::take(&mut *svm.queues[me].lock());
    let mut pcpu = vcpu::PcpuState {
        host_vmcb,
        pending: 0,
        last: None,
    };
    let mut cur = 0;
    while !queue.is_empty() {
        cur %= queue.len();
        let others = queue.len() > 1;
        match queue[cur].run_slice(&mut pcpu, others) {
            vcpu::Slice::Yield => cur += 1,
            vcpu::Slice::Done => {
                let v = queue.remove(cur);
                v.domain()
                    .ended
                    .fetch_add(1, core::sync::atomic::Ordering::AcqRel);
            }
        }
    }
    Ok(())
}
