//! The contract between the kernel's guest loader and Umbra's own guest kernels: guest memory layout, boot structures, hypercalls.
//!
//! The loader (`kernel::svm::domain`) writes these structures into guest
//! memory; the guests (crate `guests`) read them. Neither can name the
//! other's symbols: this module is all they share.

use core::sync::atomic::{AtomicU64, Ordering};

/// Guest-virtual base of the direct map of all guest-physical memory
/// (L4 slot 1, 2 MiB pages): gva = DIRECT_BASE + gpa.
pub const DIRECT_BASE: u64 = 0x0000_0080_0000_0000;
/// Guest-virtual base of the region the workloads map themselves (L4 slot 2).
pub const WORK_BASE: u64 = 0x0000_0100_0000_0000;
/// The guest's console port (a 16550 data register).
pub const CONSOLE_PORT: u16 = 0x3F8;
/// The guest's exit port: a 32-bit OUT ends this vCPU with that code.
pub const EXIT_PORT: u16 = 0xF4;
/// Size of each vCPU's stack.
pub const STACK_BYTES: u64 = 16 * 1024;

/// Guest-physical address of the [`DomainInfo`] page.
pub const DOMAIN_INFO_GPA: u64 = 0x0000;
/// Guest-physical address of the GDT page.
pub const GDT_GPA: u64 = 0x1000;
/// Guest-physical address of the IDT page.
pub const IDT_GPA: u64 = 0x2000;
/// Guest-physical address of the boot L4 (the initial guest CR3).
pub const L4_GPA: u64 = 0x3000;
/// First guest-physical page the loader hands out for its own tables.
pub const LOADER_ALLOC_GPA: u64 = 0x4000;

/// Hypercall numbers (RAX at VMMCALL; arguments in RDI, RSI, RDX).
pub mod hc {
    /// Report the workload's verdict: RDI = 1 pass / 0 fail, RSI = detail.
    pub const REPORT: u64 = 1;
    /// Start a dirty-logging round: enable logging (once) and clear the log.
    pub const DIRTY_START: u64 = 2;
    /// End a round: RDI = gpa of the guest's own bitmap of pages it wrote,
    /// RSI = first gfn it covers, RDX = number of gfns. Returns in RAX the
    /// number of written pages missing from the server's dirty bitmap.
    pub const DIRTY_CHECK: u64 = 3;
    /// Ask the kernel to zap every shadow page of the domain now.
    pub const ZAP_ALL: u64 = 4;
    /// Returns in RAX the number of exits the domain has taken so far (this
    /// one included): lets a guest measure exits per operation.
    pub const EXITS: u64 = 5;
    /// Begins the domain's measured phase: the kernel notes its exit count.
    pub const PHASE_BEGIN: u64 = 6;
    /// Ends the measured phase: RDI = the faults the guest counted in it.
    /// The kernel's report then prints the one "exits per fault" figure:
    /// the exits strictly between the two hypercalls over those faults.
    pub const PHASE_END: u64 = 7;
}

/// Page-table entry bits the guests and the loader use.
#[allow(missing_docs)]
pub mod pte {
    pub const P: u64 = 1 << 0;
    pub const W: u64 = 1 << 1;
    pub const U: u64 = 1 << 2;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;
    pub const PS: u64 = 1 << 7;
    pub const NX: u64 = 1 << 63;
    pub const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
}

/// Per-domain information at gpa [`DOMAIN_INFO_GPA`], shared by its vCPUs.
#[repr(C)]
pub struct DomainInfo {
    /// Bytes of guest-physical memory (gpa 0 .. mem_bytes).
    pub mem_bytes: u64,
    /// End of the memory the guest may allocate (the loader keeps the top
    /// for the image copy).
    pub alloc_end: u64,
    /// Number of vCPUs.
    pub vcpus: u64,
    /// Which workload (index into the kernel's workload table).
    pub workload: u64,
    /// The boot L4's gpa (the initial CR3).
    pub l4_gpa: u64,
    /// Bump pointer of free guest-physical memory (grows up).
    pub next_free: AtomicU64,
    /// A spin lock the workloads take around page-table edits.
    pub pt_lock: AtomicU64,
    /// Scratch words for cross-vCPU protocols (barriers, flags, counters).
    pub shared: [AtomicU64; 32],
    /// TSC ticks per millisecond as the kernel calibrated them (the guest's
    /// TSC runs at the host rate); 0 when the kernel does not say, and the
    /// guest assumes [`DEFAULT_TSC_PER_MS`].
    pub tsc_per_ms: u64,
}

/// The TSC rate a guest assumes when [`DomainInfo::tsc_per_ms`] is 0 (2 GHz).
pub const DEFAULT_TSC_PER_MS: u64 = 2_000_000;

/// Per-vCPU information; the guest's GS base points at it.
#[repr(C)]
pub struct VcpuInfo {
    /// Its own guest-virtual address (read as `gs:[0]`).
    pub self_gva: u64,
    /// vCPU index in the domain.
    pub index: u64,
    /// Guest-virtual address of the [`DomainInfo`].
    pub domain_gva: u64,
    /// The L4 gpa the guest has loaded (kept by the guest beside CR3).
    pub cur_l4: u64,
    /// Page faults taken by the guest's handler.
    pub faults: u64,
    /// Address of the last fault.
    pub last_fault_addr: u64,
    /// Error code of the last fault.
    pub last_fault_err: u64,
    /// Demand region: faults in [demand_lo, demand_hi) allocate and map.
    pub demand_lo: u64,
    /// End of the demand region.
    pub demand_hi: u64,
    /// Demand faults fixed by the guest's handler.
    pub demand_fixed: u64,
    /// Extra PTE bits the demand handler sets (0; or A|D, as Linux's
    /// protection maps and its anonymous write faults do).
    pub demand_pte_flags: u64,
}

impl DomainInfo {
    /// Takes `bytes` of guest-physical memory aligned to `align` (a power of
    /// two) from the bump pointer; None when memory is exhausted. The memory
    /// is not zeroed.
    pub fn alloc(&self, bytes: u64, align: u64) -> Option<u64> {
        let mut cur = self.next_free.load(Ordering::Relaxed);
        loop {
            let start = cur.checked_add(align - 1)? & !(align - 1);
            let end = start.checked_add(bytes)?;
            if end > self.alloc_end {
                return None;
            }
            match self
                .next_free
                .compare_exchange(cur, end, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Some(start),
                Err(now) => cur = now,
            }
        }
    }
}
