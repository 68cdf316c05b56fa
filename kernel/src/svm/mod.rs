//! Guests under AMD SVM with shadow paging: the kernel half.
//!
//! Mechanism only: this module runs guests (world switch, exit decoding),
//! forwards every page-table event to the MMU server as postcard bytes
//! through `abi::dispatch`, and carries out the replies (resume, inject #PF,
//! load a shadow root, emulate a write, flush a CPU set through the kernel's
//! shootdown). What a guest may map is decided by the server alone.
//!
//! - [`vmcb`], [`exit`], [`world`], [`decode`]: the hardware interface.
//! - [`mem`]: `PhysMem` over real frames for the server.
//! - [`domain`], [`vcpu`]: loading guests and handling their exits.
//! - [`guest`]: the guest kernels (workloads) themselves.
//! - [`stats`]: the counters behind the run's report.
//! - [`conf`]: the conformance scenarios in the image.
//! - [`host`]: the only contact points with the rest of the kernel.
//!
//! # How a run goes
//! `kernel_main` calls [`boot_hook`] once every CPU is online. With
//! `mmu=<name>` on the command line it creates that implementation from
//! `mmu_server::registry` over [`mem::RealMem`], loads one domain per
//! workload ([`guest::work::WORKLOADS`]), pins each vCPU to a pCPU and runs
//! all pCPUs at once (`smp::run_on`). Each pCPU round-robins its vCPUs: a
//! vCPU gives way on HLT (the guests' yield) and on timer exits. Then the
//! report (the kernel's own counters per pCPU, then the server's counters
//! per workload and in total, asked with `GetCounters` through the same
//! bytes as every request; a server that does not count is reported as
//! such), the verdicts, and the teardown (every domain destroyed, no shadow
//! page may stay taken).
//!
//! # Guests
//! The guest kernels are Rust code in this image ([`guest`]). The loader
//! gives each domain a private copy of the image mapped at the same
//! addresses, page tables built in guest memory, a GDT, an IDT with the
//! guest's own #PF handler, and a stack and info block per vCPU; the guest
//! starts in 64-bit mode at `guest_main`. The guest reaches the kernel only
//! through exits: VMMCALL hypercalls, its console (port 0x3F8) and its exit
//! port (0xF4).
//!
//! # TLB and ASIDs
//! One ASID per domain. A pCPU flushes (TLB_CONTROL = flush all, the only
//! kind TCG offers) before a VMRUN when it switches vCPUs, after an emulated
//! MOV CR3 or INVLPG, after a new root, and when a flush obligation named it:
//! a flush obligation is a kernel shootdown in the guest space, which marks
//! the ASID pending on each target (a target in guest mode leaves it with an
//! INTR exit to acknowledge). The pending mask is read after CLGI, so an IPI
//! that arrives later turns the VMRUN into an immediate exit instead of
//! being missed. `AllReloadRoots` also bumps the domain's root generation:
//! each vCPU asks for its root again (VcpuScheduled) before it next runs.
//!
//! # Not done
//! CR0/CR4 writes may change only CR0.WP and CR4.PGE (sent to the server as
//! SetPagingMode); any other CR0/CR4 change, EFER writes (WRMSR: every MSR
//! access is intercepted and stops the domain) and string I/O stop the
//! domain. Emulated writes that cross a page are refused, not split.

pub mod conf;
pub mod decode;
pub mod domain;
pub mod exit;
pub mod guest;
pub mod host;
pub mod mem;
pub mod stats;
pub mod vcpu;
pub mod vmcb;
pub mod world;

use abi::{
    DomainId, FlushObligation, FlushScope, GuestCr3, MemRegion, MemoryMap, Mfn, MmuReply,
    MmuRequest, MmuServer, PagingMode, PcpuId, VcpuId, MAX_MESSAGE, PROTOCOL_VERSION,
};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};
use domain::Domain;
use guest::work::WORKLOADS;
use mem::RealMem;
use spin::{Mutex, Once};
use stats::{bump, get, STATS};
use vcpu::Vcpu;

/// Shadow-pool size in frames (32 MiB).
const SHADOW_POOL_FRAMES: u64 = 8192;

/// Everything the SVM side shares between CPUs.
pub struct Svm {
    /// The MMU server (reached only through encoded bytes, see [`Svm::mmu`]).
    server: Box<dyn MmuServer>,
    /// The server's view of physical memory.
    pub mem: &'static RealMem,
    /// All domains (set once, after they are created).
    pub domains: Once<Vec<&'static Domain>>,
    /// Each pCPU's vCPUs (pinned).
    queues: Vec<Mutex<Vec<Vcpu>>>,
    /// I/O permission map (all ones: every port intercepted).
    pub iopm_pa: u64,
    /// MSR permission map (all ones: every MSR intercepted).
    pub msrpm_pa: u64,
}

static SVM: Once<Svm> = Once::new();

/// The shared state (after [`run`] set it up).
pub fn svm() -> &'static Svm {
    SVM.get().expect("svm used before setup")
}

impl Svm {
    /// Sends one request to the MMU server as postcard bytes through
    /// `abi::dispatch` and decodes the reply. A reply that does not decode is
    /// turned into an error reply, never a panic.
    pub fn mmu(&self, req: &MmuRequest) -> MmuReply {
        let me = host::cpu_index();
        bump(&STATS[me].mmu_calls);
        let mut buf = [0u8; MAX_MESSAGE];
        let n = match abi::encode(req, &mut buf) {
            Ok(n) => n,
            Err(_) => return MmuReply::error(abi::mmu::MmuError::Unsupported(0xFF)),
        };
        let mut out = [0u8; MAX_MESSAGE];
        let m = abi::dispatch(&*self.server, &buf[..n], &mut out);
        abi::decode::<MmuReply>(&out[..m])
            .unwrap_or_else(|e| MmuReply::error(abi::mmu::MmuError::Malformed(e)))
    }

    /// Carries out a flush obligation for `dom`: every listed pCPU flushes
    /// the domain's ASID before its next VMRUN, remote ones are forced out
    /// of guest mode by the shootdown IPI and acknowledge; returns once all
    /// have. `AllReloadRoots` also voids every vCPU's root.
    pub fn carry_out(&self, dom: &Domain, flush: Option<FlushObligation>) {
        let Some(f) = flush else { return };
        let me = host::cpu_index();
        bump(&STATS[me].obligations);
        let mut cpus = f.cpus.0 & online_mask();
        if f.scope == FlushScope::AllReloadRoots {
            dom.root_gen
                .fetch_add(1, core::sync::atomic::Ordering::AcqRel);
            bump(&STATS[me].zaps);
            cpus |= dom.pcpus & online_mask();
        }
        if cpus == 0 {
            return;
        }
        let remote = (cpus & !(1u64 << me)).count_ones() as u64;
        STATS[me]
            .ipis
            .fetch_add(remote, core::sync::atomic::Ordering::Relaxed);
        STATS[me].cpus_flushed.fetch_add(
            cpus.count_ones() as u64,
            core::sync::atomic::Ordering::Relaxed,
        );
        dom.shootdown_ipis
            .fetch_add(remote, core::sync::atomic::Ordering::Relaxed);
        host::guest_shootdown(cpus, dom.asid);
    }
}

/// Zaps every shadow of `dom` and carries out the reply's flush; an
/// unexpected reply comes back boxed.
pub fn zap(dom: &Domain) -> Result<(), Box<MmuReply>> {
    bump(&STATS[host::cpu_index()].zaps);
    bump(&dom.zaps);
    let reply = svm().mmu(&MmuRequest::ZapAll { domain: dom.id });
    svm().carry_out(dom, reply.flush());
    match reply {
        MmuReply::Done { .. } => Ok(()),
        other => Err(Box::new(other)),
    }
}

/// Gets and clears the domain's whole dirty log from the server, ORing it
/// into `bits` (one bit per gfn).
pub fn harvest_dirty(dom: &Domain, bits: &mut [u64]) -> Result<(), Box<MmuReply>> {
    let mut start = abi::Gfn(0);
    loop {
        let reply = svm().mmu(&MmuRequest::GetAndClearDirty {
            domain: dom.id,
            start,
        });
        svm().carry_out(dom, reply.flush());
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

/// The longest a run may take before the watchdog stops what still runs.
pub const RUN_SECONDS: u64 = 100;

/// TSC value after which the watchdog fires (0: not armed).
static DEADLINE: AtomicU64 = AtomicU64::new(0);
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
    for d in svm().domains.get().map(|v| v.as_slice()).unwrap_or(&[]) {
        let running = d.ended.load(Ordering::Acquire) < d.workload.vcpus
            && !d.stopped.load(Ordering::Acquire);
        if !running {
            continue;
        }
        if d.workload.kernel_zaps && zap_now {
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

fn online_mask() -> u64 {
    let n = host::cpus_online();
    if n >= 64 {
        u64::MAX
    } else {
        (1u64 << n) - 1
    }
}

/// Turns SVM on for the calling CPU: EFER.SVME and a host save area.
/// Returns the physical address of a page for VMSAVE/VMLOAD of host state.
pub fn enable_on_this_cpu() -> Result<u64, &'static str> {
    use x86_64::registers::model_specific::Msr;
    let ecx = core::arch::x86_64::__cpuid(0x8000_0001).ecx;
    if ecx & (1 << 2) == 0 {
        return Err("CPU has no SVM (CPUID 8000_0001 ECX bit 2 clear)");
    }
    // SAFETY: VM_CR exists on every SVM CPU; reading it has no side effect.
    let vm_cr = unsafe { Msr::new(0xC001_0114).read() };
    if vm_cr & (1 << 4) != 0 {
        return Err("SVM disabled by firmware (VM_CR.SVMDIS)");
    }
    let hsave = host::alloc_zeroed(1)?;
    let host_vmcb = host::alloc_zeroed(1)?;
    // SAFETY: setting EFER.SVME only enables the SVM instructions; the host
    // save area is a fresh page owned by this CPU forever (VM_HSAVE_PA).
    unsafe {
        let mut efer = Msr::new(0xC000_0080);
        efer.write(efer.read() | (1 << 12));
        Msr::new(0xC001_0117).write(hsave);
    }
    Ok(host_vmcb)
}

/// Creates every workload's domain on `server`, runs them on all CPUs, and
/// prints the report. Returns whether every workload passed.
pub fn run(
    server: Box<dyn MmuServer>,
    mem: &'static RealMem,
    test_mode: bool,
) -> Result<bool, &'static str> {
    let ncpu = host::cpus_online();
    crate::kprintln!(
        "svm: MMU server `{}`; {} workloads on {} CPUs",
        server.name(),
        WORKLOADS.len(),
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
    let svm = SVM.call_once(|| Svm {
        server,
        mem,
        domains: Once::new(),
        queues,
        iopm_pa,
        msrpm_pa,
    });
    match svm.mmu(&MmuRequest::Hello {
        version: PROTOCOL_VERSION,
    }) {
        MmuReply::Welcome { .. } => {}
        other => {
            crate::kprintln!("svm: handshake refused: {other:?}");
            return Err("MMU server refused the protocol handshake");
        }
    }
    let mut domains = Vec::new();
    let mut next_vcpu = 0u32;
    for (i, w) in WORKLOADS.iter().enumerate() {
        let id = DomainId(i as u32 + 1);
        let mut pcpus = 0u64;
        for v in 0..w.vcpus {
            pcpus |= 1 << ((w.first_pcpu + v) as usize % ncpu);
        }
        let asid = (i as u32 % 15) + 1;
        let (dom, boots) = domain::load(id, w, i as u64, next_vcpu, asid, pcpus)?;
        let dom: &'static Domain = Box::leak(Box::new(dom));
        mem.add_guest_range(dom.mem_pa, dom.mem_bytes);
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
            svm.mmu(&MmuRequest::CreateDomain {
                domain: id,
                memory: map,
            }),
            "CreateDomain",
        )?;
        for (v, boot) in boots.iter().enumerate() {
            let pcpu = (w.first_pcpu as usize + v) % ncpu;
            let vid = VcpuId(next_vcpu + v as u32);
            let p = PcpuId(pcpu as u32);
            expect_done(
                svm,
                dom,
                svm.mmu(&MmuRequest::CreateVcpu {
                    domain: id,
                    vcpu: vid,
                }),
                "CreateVcpu",
            )?;
            // CR3 first: a server may build a root as soon as paging is on,
            // and a root for the initial CR3 of 0 would shadow gfn 0.
            let cr3 = GuestCr3(guest::layout::L4_GPA);
            let r = svm.mmu(&MmuRequest::WriteCr3 {
                vcpu: vid,
                pcpu: p,
                cr3,
            });
            expect_done(svm, dom, r, "WriteCr3")?;
            let mode = PagingMode(PagingMode::WP | PagingMode::NXE);
            expect_done(
                svm,
                dom,
                svm.mmu(&MmuRequest::SetPagingMode {
                    vcpu: vid,
                    pcpu: p,
                    mode,
                }),
                "SetPagingMode",
            )?;

            let vcpu = Vcpu::new(vid, v as u32, dom, boot, svm.iopm_pa, svm.msrpm_pa)?;
            svm.queues[pcpu].lock().push(vcpu);
        }
        next_vcpu += w.vcpus;
        domains.push(dom);
    }
    svm.domains.call_once(|| domains);

    let now = crate::apic::tsc();
    DEADLINE.store(
        now + RUN_SECONDS * 1000 * crate::apic::tsc_per_ms(),
        Ordering::Relaxed,
    );
    NEXT_WORK.store(now, Ordering::Relaxed);
    let all = crate::cpu::CpuSet(online_mask());
    let results = crate::smp::run_on(all, pcpu_main);
    for (i, r) in results.iter().enumerate().take(ncpu) {
        if let Some(Err(e)) = r {
            crate::kprintln!("svm: cpu {i}: {e}");
        }
    }
    let all_passed = report(svm, ncpu, test_mode);
    Ok(teardown(svm, test_mode) && all_passed)
}

/// Destroys every domain (all vCPUs are descheduled by now), gives its
/// memory back, and checks that the server returned its shadow frames (all
/// but at most one per pCPU).
fn teardown(svm: &Svm, test_mode: bool) -> bool {
    let mut ok = true;
    for d in svm.domains.get().map(|v| v.as_slice()).unwrap_or(&[]) {
        let reply = svm.mmu(&MmuRequest::DestroyDomain { domain: d.id });
        svm.carry_out(d, reply.flush());
        if !matches!(reply, MmuReply::Done { .. }) {
            crate::kprintln!("svm: DestroyDomain d{}: {reply:?}", d.id.0);
            ok = false;
            continue;
        }
        svm.mem.remove_guest_range(d.mem_pa);
        host::free(d.mem_pa, d.mem_bytes / 4096);
    }
    let (left, peak) = svm.mem.shadow_pages();
    // A server may keep a frame per pCPU for its whole life (fast-percpu's
    // L4 copy frames); anything beyond that is a leak.
    let allowed = host::cpus_online() as u64;
    crate::kprintln!(
        "svm: every domain destroyed; shadow pages still taken: {left} (peak {peak}, at most {allowed} may stay)"
    );
    let clean = ok && left <= allowed;
    if test_mode {
        let name = svm.server.name();
        if clean {
            crate::kprintln!("test svm-{name}-teardown-no-leak ... ok");
        } else {
            crate::kprintln!(
                "test svm-{name}-teardown-no-leak ... FAILED: {left} shadow pages leaked"
            );
        }
        TEARDOWN.call_once(|| clean);
    }
    clean
}

/// Whether the test-mode teardown was clean.
static TEARDOWN: Once<bool> = Once::new();

/// Carries out a control reply at domain creation: its flush, and nothing
/// else (a root handed out here is fetched again by `VcpuScheduled` before
/// the vCPU first runs).
fn expect_done(
    svm: &Svm,
    dom: &Domain,
    reply: MmuReply,
    what: &'static str,
) -> Result<(), &'static str> {
    svm.carry_out(dom, reply.flush());
    match reply {
        MmuReply::Done { .. } | MmuReply::LoadShadowRoot { .. } => Ok(()),
        other => {
            crate::kprintln!("svm: {what}: unexpected reply {other:?}");
            Err("MMU server refused a control request")
        }
    }
}

/// One pCPU's share of the run: enable SVM, then run its vCPUs round-robin
/// until every one has ended.
fn pcpu_main() -> Result<(), &'static str> {
    let host_vmcb = enable_on_this_cpu()?;
    let me = host::cpu_index();
    let svm = svm();
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

fn verdict(d: &Domain) -> (bool, &'static str) {
    use core::sync::atomic::Ordering::Acquire;
    let reported = d.reported.load(Acquire);
    let stop = *d.stop_reason.lock();
    if d.workload.ends_in_shutdown {
        return match (reported, stop) {
            (1, Some(("shutdown", _))) => (true, "PASS (faulted, then stopped on shutdown)"),
            (1, _) => (false, "FAIL (reported, but was not stopped on shutdown)"),
            _ => (false, "FAIL (no passing report)"),
        };
    }
    if stop.is_some() {
        return (false, "FAIL (stopped)");
    }
    if reported == 1
        && d.exited_bad.load(Acquire) == 0
        && d.exited_ok.load(Acquire) == d.workload.vcpus
    {
        (true, "PASS")
    } else {
        (false, "FAIL")
    }
}

fn report(svm: &Svm, ncpu: usize, test_mode: bool) -> bool {
    use exit::{BUCKETS, BUCKET_NAMES};
    crate::kprintln!("svm: ---- exits by reason, per pCPU ----");
    let mut line = alloc::string::String::new();
    use core::fmt::Write;
    let _ = write!(line, "cpu ");
    for n in BUCKET_NAMES {
        let _ = write!(line, "{n:>8}");
    }
    let _ = write!(
        line,
        "{:>8}{:>8}{:>8}{:>7}{:>6}{:>7}{:>7}",
        "fixed", "inject", "emul", "zaps", "ipis", "flushd", "mmu"
    );
    crate::kprintln!("{line}");
    let mut tot = [0u64; BUCKETS + 8];
    for (c, s) in STATS.iter().enumerate().take(ncpu) {
        let mut row = [0u64; BUCKETS + 8];
        for (b, r) in row.iter_mut().enumerate().take(BUCKETS) {
            *r = get(&s.exits[b]);
        }
        row[BUCKETS] = get(&s.fixed);
        row[BUCKETS + 1] = get(&s.injected);
        row[BUCKETS + 2] = get(&s.emulated);
        row[BUCKETS + 3] = get(&s.zaps);
        row[BUCKETS + 4] = get(&s.ipis);
        row[BUCKETS + 5] = get(&s.cpus_flushed);
        row[BUCKETS + 6] = get(&s.mmu_calls);
        print_row(&alloc::format!("{c:<4}"), &row);
        for (t, r) in tot.iter_mut().zip(row.iter()) {
            *t += r;
        }
    }
    print_row("all ", &tot);
    let total = server_counters(svm);
    let (shadow_now, shadow_peak) = svm.mem.shadow_pages();
    let fast = match &total {
        Ok(c) => alloc::format!(
            "{} of the server's {} fixes ({} page faults)",
            c.fast_path_fixes,
            c.faults_fixed,
            c.page_faults
        ),
        Err(why) => why.clone(),
    };
    crate::kprintln!(
        "svm: shadow pages in use {shadow_now}, peak {shadow_peak}; fast-path fixes: {fast} \
         (Resume replies = {})",
        tot[BUCKETS]
    );
    crate::kprintln!("svm: ---- workloads ----");
    let mut all = true;
    for d in svm.domains.get().map(|v| v.as_slice()).unwrap_or(&[]) {
        let (ok, text) = verdict(d);
        all &= ok;
        let stop = *d.stop_reason.lock();
        let n = |c: &core::sync::atomic::AtomicU64| c.load(core::sync::atomic::Ordering::Relaxed);
        let exits = n(&d.exits);
        let injected = n(&d.injected);
        // Exits per guest demand fault: every exit of the domain (barriers,
        // console and checks included) over the guest's demand faults.
        let per_fault = match d.workload.demand_faults {
            0 => "-".into(),
            f => alloc::format!("{:.2}", exits as f64 / f as f64),
        };
        crate::kprintln!(
            "svm: workload {:<12} d{} vcpus {} exits {:>6} #PF {:>6} fixed {:>6} inject {:>5} emul {:>5} \
             exits/demand-fault {:>5} zaps {:>3} harvests {:>3} shootdown-ipis {:>4}  {}{}",
            d.workload.name,
            d.id.0,
            d.workload.vcpus,
            exits,
            n(&d.pf_exits),
            n(&d.fixed),
            injected,
            n(&d.emulated),
            per_fault,
            n(&d.zaps),
            n(&d.harvests),
            n(&d.shootdown_ipis),
            text,
            match stop {
                Some((why, v)) => alloc::format!(" [stopped: {why} {v:#x}]"),
                None => alloc::string::String::new(),
            }
        );
    }
    let doms = svm.domains.get().map(|v| v.as_slice()).unwrap_or(&[]);
    let passed = doms.iter().filter(|d| verdict(d).0).count();
    crate::kprintln!("svm: {passed}/{} workloads passed", doms.len());
    if test_mode {
        let name = svm.server.name();
        for d in doms {
            match verdict(d) {
                (true, _) => crate::kprintln!("test svm-{name}-{} ... ok", d.workload.name),
                (false, why) => {
                    crate::kprintln!("test svm-{name}-{} ... FAILED: {why}", d.workload.name)
                }
            }
        }
        TEST_TALLY.call_once(|| (passed as u32, (doms.len() - passed) as u32));
    }
    all
}

/// Asks the server for its counters, per domain and in total, through the
/// same byte path as every request (`Svm::mmu`), prints the table (or one
/// line when the server reports none at all), and returns the total (or the
/// text printed instead of numbers).
fn server_counters(svm: &Svm) -> Result<abi::ServerCounters, alloc::string::String> {
    let doms = svm.domains.get().map(|v| v.as_slice()).unwrap_or(&[]);
    let mut rows = Vec::new();
    for d in doms {
        let reply = svm.mmu(&MmuRequest::GetCounters { domain: Some(d.id) });
        svm.carry_out(d, reply.flush());
        let label = alloc::format!("{} d{}", d.workload.name, d.id.0);
        rows.push((label, stats::counters_of(&reply)));
    }
    let reply = svm.mmu(&MmuRequest::GetCounters { domain: None });
    // A flush with the whole-server answer concerns no one domain: carry it
    // out for each (a wider flush is always allowed).
    if reply.flush().is_some() {
        for d in doms {
            svm.carry_out(d, reply.flush());
        }
    }
    let total = stats::counters_of(&reply);
    let name = svm.server.name();
    if let Err(why) = &total {
        if rows.iter().all(|(_, r)| r.as_ref().err() == Some(why)) {
            crate::kprintln!("svm: ---- MMU server `{name}` counters: {why} ----");
            return total;
        }
    }
    crate::kprintln!("svm: ---- MMU server `{name}` counters, per workload (GetCounters) ----");
    crate::kprintln!("{}", stats::server_header());
    for (label, r) in &rows {
        crate::kprintln!("{}", stats::server_line(label, r));
    }
    crate::kprintln!("{}", stats::server_line("all (server)", &total));
    total
}

fn print_row(label: &str, row: &[u64]) {
    use core::fmt::Write;
    let mut line = alloc::string::String::new();
    let _ = write!(line, "{label}");
    for (i, v) in row.iter().enumerate().take(exit::BUCKETS) {
        let _ = i;
        let _ = write!(line, "{v:>8}");
    }
    let b = exit::BUCKETS;
    let _ = write!(
        line,
        "{:>8}{:>8}{:>8}{:>7}{:>6}{:>7}{:>7}",
        row[b],
        row[b + 1],
        row[b + 2],
        row[b + 3],
        row[b + 4],
        row[b + 5],
        row[b + 6]
    );
    crate::kprintln!("{line}");
}

/// Called by `kernel_main` once every CPU is online: with `mmu=<name>` on
/// the command line, runs the guest workloads on that MMU server. Returns
/// false when something failed.
pub fn boot_hook(cmdline: &'static str) -> bool {
    let Some(name) = crate::boot::arg_value(cmdline, "mmu") else {
        return true;
    };
    crate::kprintln!("umbra: MMU implementation: {name}");
    let (server, mem) = match make_server(name) {
        Ok(s) => s,
        Err(e) => {
            crate::kprintln!("svm: {e}");
            return false;
        }
    };
    let test_mode = crate::boot::has_arg(cmdline, "svm-test");
    let ok = match run(server, mem, test_mode) {
        Ok(all) => all,
        Err(e) => {
            crate::kprintln!("svm: run failed: {e}");
            if test_mode {
                crate::kprintln!("test svm-{name}-setup ... FAILED: {e}");
            }
            false
        }
    };
    if !test_mode {
        return ok;
    }
    // The test image: the conformance scenarios on real frames, then a
    // summary over the workload and scenario lines.
    let (mut wp, mut wf) = TEST_TALLY.get().copied().unwrap_or((0, 1));
    match TEARDOWN.get() {
        Some(true) => wp += 1,
        _ => wf += 1,
    }
    match decode::self_test() {
        Ok(()) => {
            wp += 1;
            crate::kprintln!("test svm-decode ... ok");
        }
        Err(e) => {
            wf += 1;
            crate::kprintln!("test svm-decode ... FAILED: {e}");
        }
    }
    let (cp, cf) = conf::run_all(name);
    let (p, f) = (wp + cp, wf + cf);
    crate::kprintln!("umbra: svm-test: {p} passed, {f} failed");
    ok && f == 0
}

/// Passed/failed workload lines of the test-mode run.
static TEST_TALLY: Once<(u32, u32)> = Once::new();

/// Creates the MMU implementation `name` from `mmu_server::registry` (the
/// one place implementations are chosen), over real frames, with the
/// guest's MAXPHYADDR taken from CPUID.
fn make_server(
    name: &str,
) -> Result<(Box<dyn MmuServer>, &'static RealMem), alloc::string::String> {
    let mem: &'static RealMem = Box::leak(Box::new(RealMem::new(SHADOW_POOL_FRAMES)?));
    let phys_bits = (core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xFF) as u8;
    let config = mmu_server::Config {
        maxphyaddr: phys_bits.clamp(32, 52),
        ..mmu_server::Config::default()
    };
    let server =
        mmu_server::registry::create_with(name, mem, config).map_err(|e| alloc::format!("{e}"))?;
    crate::kprintln!("svm: MMU server `{name}` over real frames, MAXPHYADDR {phys_bits}");
    Ok((server, mem))
}
