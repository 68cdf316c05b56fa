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
//! - [`door`]: the one door to the MMU server, over the task or the direct
//!   transport; it carries out every reply's flush obligation.
//! - [`domain`], [`vcpu`]: loading guests and handling their exits.
//! - [`platform`]: the PC guests see (their CR0/CR4/EFER, CPUID, MSRs,
//!   ports), as tables and pure rules the exit handlers apply.
//! - [`run`]: one run (load, run every pCPU, the kernel's clock, teardown).
//! - [`sched`]: running vCPUs under a scheduler server (when the run has
//!   one): its door, the per-pCPU loop, refused decisions, the record.
//! - [`stats`]: the counters and cost samples behind the run's report.
//! - [`host`]: the only contact points with the rest of the kernel.
//!
//! # How a run goes
//! The image (crate `image`) chooses the server, the transport and the
//! guests, and calls [`run`] with one [`domain::DomainSpec`] per guest: it
//! loads each domain and runs all pCPUs at once (`smp::run_on`). Without a
//! scheduler server each vCPU is pinned to a pCPU and each pCPU
//! round-robins its vCPUs: a vCPU gives way on HLT (the guests' yield) and
//! on timer exits. With one ([`sched`]), each pCPU asks it what to run. [`run`] returns the run's
//! state for the image's report; [`teardown`] then destroys every domain
//! and checks that no shadow page stayed taken.
//!
//! # Guests
//! The kernel knows a guest only by its spec: an entry point and a #PF
//! handler in the image (guest code is linked into the image by the image
//! crate, from the `guests` crate, which cannot name a kernel symbol). The
//! loader gives each domain a private copy of the image mapped at the same
//! addresses, page tables built in guest memory, a GDT, an IDT with the
//! guest's own #PF handler, and a stack and info block per vCPU
//! (`abi::guest`); the guest starts in 64-bit mode at its entry. The guest
//! reaches the kernel only through exits: VMMCALL hypercalls, its console
//! (port 0x3F8) and its exit port (0xF4). Unmodified guests see a small PC
//! instead ([`platform`]): their own CR0/CR4/EFER, a filtered CPUID, a
//! table of MSRs and ports; what is not there gets the fault or the value
//! real hardware would give.
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
//! The MMU protocol has no paging-off or 32-bit paging mode yet: a guest
//! that turns paging off or on without long mode is stopped (see
//! `platform::GuestControl::paging_mode`). The guest walk used to fetch
//! instructions and string I/O operands is 4-level only. Emulated writes
//! that cross a page are refused, not split.

pub mod decode;
pub mod domain;
pub mod door;
pub mod exit;
pub mod grant;
pub mod host;
pub mod lapic;
pub mod platform;
pub mod run;
pub mod sched;
pub mod stats;
pub mod vcpu;
pub mod vmcb;
pub mod world;

pub use door::{svm, ServerDown, Svm, Transport};
pub use grant::{GrantDoor, GrantTransport};
pub use run::{harvest_dirty, past_deadline, run, teardown, timer_work, zap, Teardown};

/// Every online pCPU.
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
