//! Guests under AMD SVM with shadow paging: the kernel half.
//!
//! Mechanism only: this module runs guests (world switch, exit decoding),
//! forwards every page-table event to the MMU server as postcard bytes
//! through one door ([`Svm::mmu`]: over the ring-3 task transport, or the
//! direct call), and carries out the replies (resume, inject #PF, load a
//! shadow root, emulate a write, flush a CPU set through the kernel's
//! shootdown). What a guest may map is decided by the server alone.
//!
//! - [`vmcb`], [`exit`], [`world`], [`decode`]: the hardware interface.
//! - [`domain`], [`vcpu`]: loading guests and handling their exits.
//! - [`guest`]: the guest kernels (workloads) themselves.
//! - [`stats`]: the counters behind the run's report.
//! - [`conf`]: the conformance scenarios in the image.
//! - [`host`]: the only contact points with the rest of the kernel.
//!
//! # How a run goes
//! `kernel_main` calls [`boot_hook`] once every CPU is online. For each
//! name in `mmu=<name>[,...]` and each transport in `transport=` it creates
//! that implementation (in the MMU server task, or in the kernel from
//! `mmu_server::registry` for `direct`) over a fresh shadow pool, loads one domain per
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
pub mod stats;
pub mod vcpu;
pub mod vmcb;
pub mod world;

use crate::task::{Stop, Task};
use abi::task::{ControlPage, Op, TaskInit, TaskInitReply};
use abi::{
    DomainId, FlushObligation, FlushScope, GuestCr3, MemRegion, MemoryMap, Mfn, MmuReply,
    MmuRequest, MmuServer, PagingMode, PcpuId, VcpuId, MAX_MESSAGE, PROTOCOL_VERSION,
};
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, Ordering};
use domain::Domain;
use guest::work::WORKLOADS;
use spin::{Mutex, Once};
use stats::{bump, get, STATS};
use task_rt::mem::WindowMem;
use vcpu::Vcpu;

/// Shadow-pool size in frames (32 MiB).
const SHADOW_POOL_FRAMES: u64 = 8192;

/// How the kernel reaches the MMU server: the choice `transport=` makes.
pub enum Transport {
    /// The server runs in ring 3 as a task of its own (the default).
    Task(&'static Task),
    /// The server is linked into the kernel and called in ring 0: the old
    /// way, kept so the cost of isolation is measured on the same runs.
    Direct(Box<dyn MmuServer>),
}

impl Transport {
    /// The transport's name on the command line and in reports.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Task(_) => "task",
            Transport::Direct(_) => "direct",
        }
    }
}

/// The MMU server stopped: the request it was serving and why.
#[derive(Clone, Debug)]
pub struct ServerDown {
    /// What stopped it.
    pub cause: Stop,
}

/// Everything the SVM side shares between CPUs, for one run.
pub struct Svm {
    /// The MMU server (reached only through encoded bytes, see [`Svm::mmu`]).
    server: Transport,
    /// The server implementation's registered name.
    pub name: String,
    /// What the server may touch besides its pool: the served guest ranges
    /// (for a task, its own control page; for the direct call, the
    /// kernel's), and the pool counters the server keeps there.
    control: &'static ControlPage,
    /// Set once the server was stopped: it is never called again.
    down: AtomicBool,
    /// All domains (set once, after they are created).
    pub domains: Once<Vec<&'static Domain>>,
    /// Each pCPU's vCPUs (pinned).
    queues: Vec<Mutex<Vec<Vcpu>>>,
    /// I/O permission map (all ones: every port intercepted).
    pub iopm_pa: u64,
    /// MSR permission map (all ones: every MSR intercepted).
    pub msrpm_pa: u64,
}

static SVM: AtomicPtr<Svm> = AtomicPtr::new(core::ptr::null_mut());

/// The shared state of the run in progress (after [`run`] set it up).
pub fn svm() -> &'static Svm {
    let p = SVM.load(Ordering::Acquire);
    assert!(!p.is_null(), "svm used before setup");
    // SAFETY: every Svm stored here is leaked by `run` ('static) and never
    // freed; the pointer is only replaced by the next run's.
    unsafe { &*p }
}

impl Svm {
    /// The one door to the MMU server: encodes `req`, sends it over the
    /// transport on this pCPU, decodes the reply and carries out its flush
    /// obligation for `dom` (for every domain when `None`) before
    /// returning, so no caller can forget it. A reply that does not decode
    /// becomes an error reply, never a panic. When the server stops while
    /// serving (or has stopped before), it is reported with the request,
    /// every domain is stopped, and the caller gets [`ServerDown`].
    pub fn mmu(&self, dom: Option<&Domain>, req: &MmuRequest) -> Result<MmuReply, ServerDown> {
        let me = host::cpu_index();
        bump(&STATS[me].mmu_calls);
        if self.down.load(Ordering::Acquire) {
            return Err(ServerDown {
                cause: Stop::AlreadyStopped,
            });
        }
        let mut buf = [0u8; MAX_MESSAGE];
        let n = match abi::encode(req, &mut buf) {
            Ok(n) => n,
            Err(_) => return Ok(MmuReply::error(abi::mmu::MmuError::Unsupported(0xFF))),
        };
        let mut out = [0u8; MAX_MESSAGE];
        let t0 = crate::apic::tsc();
        let m = match &self.server {
            Transport::Direct(server) => abi::dispatch(&**server, &buf[..n], &mut out),
            Transport::Task(task) => match task.call(Op::Request, &buf[..n], &mut out) {
                Ok(m) => m,
                Err(cause) => return Err(self.server_down(req, cause)),
            },
        };
        let reply = abi::decode::<MmuReply>(&out[..m])
            .unwrap_or_else(|e| MmuReply::error(abi::mmu::MmuError::Malformed(e)));
        stats::record_round_trip(me, crate::apic::tsc() - t0);
        match dom {
            Some(d) => self.carry_out(d, reply.flush()),
            None if reply.flush().is_some() => {
                // A whole-server answer concerns no one domain: carry it
                // out for each (a wider flush is always allowed).
                for d in self.domains.get().map(|v| v.as_slice()).unwrap_or(&[]) {
                    self.carry_out(d, reply.flush());
                }
            }
            None => {}
        }
        Ok(reply)
    }

    /// Reports the server stopped while serving `req` (the first pCPU to
    /// see it reports; the others only stop), stops every domain it
    /// serves, and returns the error for the caller.
    fn server_down(&self, req: &MmuRequest, cause: Stop) -> ServerDown {
        // The pCPU that saw the fault reports it; the others, which find
        // the task already stopped, only stop their domains.
        self.down.store(true, Ordering::Release);
        if cause != Stop::AlreadyStopped {
            crate::kprintln!(
                "svm: MMU server `{}` STOPPED on pcpu {} while serving {:?}: {}",
                self.name,
                host::cpu_index(),
                req,
                cause
            );
        }
        for d in self.domains.get().map(|v| v.as_slice()).unwrap_or(&[]) {
            if !d.stopped.load(Ordering::Acquire) {
                d.stop("MMU server stopped", 0);
                host::kick(d.pcpus);
            }
        }
        ServerDown { cause }
    }

    /// Whether the server was stopped during this run.
    pub fn server_stopped(&self) -> bool {
        self.down.load(Ordering::Acquire)
    }

    /// Lets the server touch guest memory [pa, pa + bytes).
    fn add_guest_range(&self, pa: u64, bytes: u64) -> Result<(), &'static str> {
        match &self.server {
            Transport::Task(t) => t
                .map_window(pa, bytes, true)
                .map_err(|_| "cannot map a guest into the server task"),
            Transport::Direct(_) => WindowMem::add_range(self.control, pa, bytes)
                .then_some(())
                .ok_or("the served-range table is full"),
        }
    }

    /// Withdraws a guest range (the server forgot the domain).
    fn remove_guest_range(&self, pa: u64, bytes: u64) {
        match &self.server {
            Transport::Task(t) => t.unmap_window(pa, bytes),
            Transport::Direct(_) => WindowMem::remove_range(self.control, pa),
        }
    }

    /// Shadow-pool frames in use now and at the peak.
    fn shadow_pages(&self) -> (u64, u64) {
        WindowMem::pool_usage(self.control)
    }

    /// Carries out a flush obligation for `dom`: every listed pCPU flushes
    /// the domain's ASID before its next VMRUN, remote ones are forced out
    /// of guest mode by the shootdown IPI and acknowledge; returns once all
    /// have. `AllReloadRoots` also voids every vCPU's root.
    fn carry_out(&self, dom: &Domain, flush: Option<FlushObligation>) {
        let Some(f) = flush else { return };
        let me = host::cpu_index();
        bump(&STATS[me].obligations);
        let mut cpus = f.cpus.0 & online_mask();
        if f.scope == FlushScope::AllReloadRoots {
            dom.root_gen.fetch_add(1, Ordering::AcqRel);
            bump(&STATS[me].zaps);
            cpus |= dom.pcpus & online_mask();
        }
        if cpus == 0 {
            return;
        }
        let remote = (cpus & !(1u64 << me)).count_ones() as u64;
        STATS[me].ipis.fetch_add(remote, Ordering::Relaxed);
        STATS[me]
            .cpus_flushed
            .fetch_add(cpus.count_ones() as u64, Ordering::Relaxed);
        dom.shootdown_ipis.fetch_add(remote, Ordering::Relaxed);
        host::guest_shootdown(cpus, dom.asid);
    }
}

/// Zaps every shadow of `dom` and carries out the reply's flush; an
/// unexpected reply comes back boxed.
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
/// prints the report. Returns whether every workload passed, and whether
/// the teardown was clean.
pub fn run(
    server: Transport,
    name: &str,
    control: &'static ControlPage,
    test_mode: bool,
) -> Result<(bool, bool), &'static str> {
    let ncpu = host::cpus_online();
    crate::kprintln!(
        "svm: MMU server `{name}` over the {} transport; {} workloads on {} CPUs",
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
    stats::reset(ncpu);
    let svm: &'static Svm = Box::leak(Box::new(Svm {
        server,
        name: name.into(),
        control,
        down: AtomicBool::new(false),
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
                memory: map,
            },
        )?;
        for (v, boot) in boots.iter().enumerate() {
            let pcpu = (w.first_pcpu as usize + v) % ncpu;
            let vid = VcpuId(next_vcpu + v as u32);
            let p = PcpuId(pcpu as u32);
            expect_done(
                svm,
                dom,
                &MmuRequest::CreateVcpu {
                    domain: id,
                    vcpu: vid,
                },
            )?;
            // CR3 first: a server may build a root as soon as paging is on,
            // and a root for the initial CR3 of 0 would shadow gfn 0.
            let cr3 = GuestCr3(guest::layout::L4_GPA);
            expect_done(
                svm,
                dom,
                &MmuRequest::WriteCr3 {
                    vcpu: vid,
                    pcpu: p,
                    cr3,
                },
            )?;
            let mode = PagingMode(PagingMode::WP | PagingMode::NXE);
            expect_done(
                svm,
                dom,
                &MmuRequest::SetPagingMode {
                    vcpu: vid,
                    pcpu: p,
                    mode,
                },
            )?;

            let vcpu = Vcpu::new(vid, v as u32, dom, boot, svm.iopm_pa, svm.msrpm_pa)?;
            svm.queues[pcpu].lock().push(vcpu);
        }
        next_vcpu += w.vcpus;
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
    Ok((all_passed, teardown(svm, test_mode)))
}

/// Destroys every domain (all vCPUs are descheduled by now), gives its
/// memory back, and checks that the server returned its shadow frames (all
/// but at most one per pCPU). After a stopped server, the domains' memory
/// is withdrawn from it and freed without asking it anything.
fn teardown(svm: &Svm, test_mode: bool) -> bool {
    let mut ok = true;
    for d in svm.domains.get().map(|v| v.as_slice()).unwrap_or(&[]) {
        match svm.mmu(Some(d), &MmuRequest::DestroyDomain { domain: d.id }) {
            Ok(MmuReply::Done { .. }) | Err(_) => {}
            Ok(reply) => {
                crate::kprintln!("svm: DestroyDomain d{}: {reply:?}", d.id.0);
                ok = false;
                continue;
            }
        }
        svm.remove_guest_range(d.mem_pa, d.mem_bytes);
        host::free(d.mem_pa, d.mem_bytes / 4096);
    }
    if svm.server_stopped() {
        crate::kprintln!(
            "svm: MMU server `{}` was stopped: its shadow pool is reclaimed whole",
            svm.name
        );
        return false;
    }
    let (left, peak) = svm.shadow_pages();
    // A server may keep a frame per pCPU for its whole life (fast-percpu's
    // L4 copy frames); anything beyond that is a leak.
    let allowed = host::cpus_online() as u64;
    crate::kprintln!(
        "svm: every domain destroyed; shadow pages still taken: {left} (peak {peak}, at most {allowed} may stay)"
    );
    let clean = ok && left <= allowed;
    if test_mode {
        let name = alloc::format!("{}-{}", svm.name, svm.server.name());
        if clean {
            crate::kprintln!("test svm-{name}-teardown-no-leak ... ok");
        } else {
            crate::kprintln!(
                "test svm-{name}-teardown-no-leak ... FAILED: {left} shadow pages leaked"
            );
        }
    }
    clean
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
    let (shadow_now, shadow_peak) = svm.shadow_pages();
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
    print_costs(svm);
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
        let name = alloc::format!("{}-{}", svm.name, svm.server.name());
        for d in doms {
            match verdict(d) {
                (true, _) => crate::kprintln!("test svm-{name}-{} ... ok", d.workload.name),
                (false, why) => {
                    crate::kprintln!("test svm-{name}-{} ... FAILED: {why}", d.workload.name)
                }
            }
        }
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
    if svm.server_stopped() {
        let why = alloc::string::String::from("the server was stopped");
        crate::kprintln!("svm: ---- MMU server `{}` counters: {why} ----", svm.name);
        return Err(why);
    }
    for d in doms {
        let Ok(reply) = svm.mmu(Some(d), &MmuRequest::GetCounters { domain: Some(d.id) }) else {
            return Err("the server was stopped".into());
        };
        let label = alloc::format!("{} d{}", d.workload.name, d.id.0);
        rows.push((label, stats::counters_of(&reply)));
    }
    let Ok(reply) = svm.mmu(None, &MmuRequest::GetCounters { domain: None }) else {
        return Err("the server was stopped".into());
    };
    let total = stats::counters_of(&reply);
    let name = &svm.name;
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

/// The cost table: TSC ticks per MMU request round trip and per forwarded
/// #PF exit, median and p99 over the run's samples. Under `-icount` the TSC
/// counts instructions, and the table says so (`umbra-costs:` lines are
/// what `cargo xtask run --icount` collects).
fn print_costs(svm: &Svm) {
    let unit = if crate::boot::has_arg(crate::cmdline(), "icount") {
        "instructions"
    } else {
        "TSC ticks (boot with --icount for instructions)"
    };
    crate::kprintln!(
        "svm: ---- costs in {unit}, transport {} ----",
        svm.server.name()
    );
    for (label, fig) in [
        ("request round trip", stats::Figure::RoundTrip),
        ("forwarded #PF exit", stats::Figure::PfExit),
    ] {
        match stats::percentiles(fig) {
            Some((n, median, p99)) => crate::kprintln!(
                "umbra-costs: server {} transport {} figure {:?} samples {n} median {median} p99 {p99}   ({label})",
                svm.name,
                svm.server.name(),
                fig
            ),
            None => crate::kprintln!("umbra-costs: server {} transport {} figure {:?} samples 0", svm.name, svm.server.name(), fig),
        }
    }
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

/// Called by `kernel_main` once every CPU is online: with
/// `mmu=<name>[,<name>...]` on the command line, runs the guest workloads
/// on each named MMU server in turn, over `transport=task|direct` (default
/// `task`). Returns false when something failed. In the test image
/// (`svm-test`) a name `misbehave-*` is a deliberately broken server: its
/// run passes when the server is stopped and reported, its domains are
/// stopped, and the kernel goes on to the next name.
pub fn boot_hook(cmdline: &'static str) -> bool {
    let Some(list) = crate::boot::arg_value(cmdline, "mmu") else {
        return true;
    };
    let transports = crate::boot::arg_value(cmdline, "transport").unwrap_or("task");
    if let Some(bad) = transports
        .split(',')
        .find(|t| !matches!(*t, "task" | "direct"))
    {
        crate::kprintln!("svm: unknown transport {bad:?}; known: \"task\", \"direct\"");
        return false;
    }
    let test_mode = crate::boot::has_arg(cmdline, "svm-test");
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut ok = true;
    let runs = list.split(',').enumerate().flat_map(|(i, n)| {
        transports
            .split(',')
            .enumerate()
            .map(move |(j, t)| (n, t, i, j))
    });
    for (name, transport, _, first_transport) in runs {
        crate::kprintln!("umbra: MMU implementation: {name} (transport {transport})");
        let broken = name.starts_with("misbehave-");
        // A broken server's workloads are expected to stop: no test lines
        // of their own, the one `contain-` line below instead.
        let outcome = run_one(name, transport, test_mode && !broken);
        let label = alloc::format!("{name}-{transport}");
        let (p, f, run_ok) = match outcome {
            Ok(o) if broken => {
                let contained = o.stopped && o.domains_stopped > 0;
                if contained {
                    crate::kprintln!(
                        "test contain-{label} ... ok ({} domains stopped; the kernel goes on)",
                        o.domains_stopped
                    );
                } else {
                    crate::kprintln!(
                        "test contain-{label} ... FAILED: server stopped {}, domains stopped {}",
                        o.stopped,
                        o.domains_stopped
                    );
                }
                (contained as u32, !contained as u32, contained)
            }
            Ok(o) => (o.passed, o.failed, o.all_passed),
            Err(e) => {
                crate::kprintln!("svm: run failed: {e}");
                if test_mode {
                    crate::kprintln!("test svm-{label}-setup ... FAILED: {e}");
                }
                (0, 1, false)
            }
        };
        passed += p;
        failed += f;
        ok &= run_ok;
        if test_mode && !broken && first_transport == 0 {
            // The conformance scenarios on real frames (once per server).
            let (cp, cf) = conf::run_all(name);
            passed += cp;
            failed += cf;
        }
    }
    if !test_mode {
        return ok;
    }
    match decode::self_test() {
        Ok(()) => {
            passed += 1;
            crate::kprintln!("test svm-decode ... ok");
        }
        Err(e) => {
            failed += 1;
            crate::kprintln!("test svm-decode ... FAILED: {e}");
        }
    }
    crate::kprintln!("umbra: svm-test: {passed} passed, {failed} failed");
    ok && failed == 0
}

/// What one server's run came to.
struct Outcome {
    /// Test lines passed and failed (workloads and the teardown check).
    passed: u32,
    failed: u32,
    /// Every workload passed and the teardown was clean.
    all_passed: bool,
    /// The server was stopped during the run.
    stopped: bool,
    /// Domains stopped because the server was.
    domains_stopped: u32,
}

/// Runs the workloads on server `name` over `transport`, then frees what
/// the run took (the pool, the task).
fn run_one(name: &str, transport: &str, test_mode: bool) -> Result<Outcome, String> {
    let pool = host::alloc_zeroed(SHADOW_POOL_FRAMES)?;
    let phys_bits = ((core::arch::x86_64::__cpuid(0x8000_0008).eax & 0xFF) as u8).clamp(32, 52);
    let (server, control, task) = match transport {
        "direct" => {
            let (server, control) = direct_server(name, pool, phys_bits)?;
            (Transport::Direct(server), control, None)
        }
        _ => {
            let task = task_server(name, pool, phys_bits)?;
            (Transport::Task(task), task.control(), Some(task))
        }
    };
    crate::kprintln!("svm: MMU server `{name}` over real frames, MAXPHYADDR {phys_bits}");
    let result = run(server, name, control, test_mode);
    let svm = svm();
    let doms = svm.domains.get().map(|v| v.as_slice()).unwrap_or(&[]);
    let passed = doms.iter().filter(|d| verdict(d).0).count() as u32;
    let domains_stopped = doms
        .iter()
        .filter(|d| matches!(*d.stop_reason.lock(), Some(("MMU server stopped", _))))
        .count() as u32;
    let stopped = svm.server_stopped();
    if let Some(t) = task {
        crate::kprintln!(
            "svm: task `{name}`: longest call {} us (bound {} ms)",
            crate::apic::tsc_to_us(t.longest_call()),
            crate::task::REPLY_BOUND_MS
        );
        t.destroy();
    }
    host::free(pool, SHADOW_POOL_FRAMES);
    let (workloads_passed, clean) = result?;
    Ok(Outcome {
        passed: passed + u32::from(clean),
        failed: doms.len() as u32 - passed + u32::from(!clean),
        all_passed: workloads_passed && clean,
        stopped,
        domains_stopped,
    })
}

/// The embedded MMU server task image (built by `cargo xtask`; empty when
/// the kernel was built without it).
static MMU_TASK: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/mmu-task.elf"));

/// Loads the MMU server task, gives it the pool, and creates implementation
/// `name` in it.
fn task_server(name: &str, pool: u64, phys_bits: u8) -> Result<&'static Task, String> {
    if MMU_TASK.is_empty() {
        return Err(
            "this kernel was built without the MMU server task; build it with \
                    `cargo xtask run` (or use transport=direct)"
                .into(),
        );
    }
    let task = Task::load(&alloc::format!("mmu:{name}"), MMU_TASK, host::cpus_online())
        .map_err(|e| alloc::format!("loading the MMU server task: {e}"))?;
    task.map_window(pool, SHADOW_POOL_FRAMES * 4096, false)
        .map_err(|e| alloc::format!("mapping the shadow pool into the task: {e}"))?;
    let mut implementation = heapless::String::new();
    implementation
        .push_str(name)
        .map_err(|_| alloc::format!("server name {name:?} longer than 32 bytes"))?;
    let init = TaskInit {
        implementation,
        maxphyaddr: phys_bits,
        pool_first: Mfn(pool / 4096),
        pool_frames: SHADOW_POOL_FRAMES,
        pcpus: host::cpus_online() as u32,
    };
    let mut buf = [0u8; MAX_MESSAGE];
    let n = abi::encode(&init, &mut buf).map_err(|e| alloc::format!("{e:?}"))?;
    let mut out = [0u8; MAX_MESSAGE];
    let m = task
        .call(Op::Init, &buf[..n], &mut out)
        .map_err(|stop| alloc::format!("the MMU server task stopped during init: {stop}"))?;
    match abi::decode::<TaskInitReply>(&out[..m]) {
        Ok(TaskInitReply::Ready(_)) => Ok(task),
        other => {
            task.destroy();
            Err(alloc::format!(
                "the MMU server task refused {name:?}: {other:?}"
            ))
        }
    }
}

/// Creates the MMU implementation `name` from `mmu_server::registry` (the
/// one place implementations are chosen) in the kernel, over real frames
/// (the direct transport).
fn direct_server(
    name: &str,
    pool: u64,
    phys_bits: u8,
) -> Result<(Box<dyn MmuServer>, &'static ControlPage), String> {
    let page = host::alloc_zeroed(1)?;
    // SAFETY: a fresh zeroed frame in the identity map, never freed: all
    // zeros is a valid ControlPage (atomics only).
    let control: &'static ControlPage = unsafe { &*(host::va(page) as *const ControlPage) };
    // SAFETY: the identity map (base 0) maps the pool and every guest range
    // the kernel lists, for as long as they are listed.
    let mem: &'static WindowMem = Box::leak(Box::new(unsafe {
        WindowMem::new(0, control, Mfn(pool / 4096), SHADOW_POOL_FRAMES)
    }));
    let config = mmu_server::Config {
        maxphyaddr: phys_bits,
        ..mmu_server::Config::default()
    };
    let server =
        mmu_server::registry::create_with(name, mem, config).map_err(|e| alloc::format!("{e}"))?;
    Ok((server, control))
}
