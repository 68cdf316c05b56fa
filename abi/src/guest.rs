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
    /// A grant-table operation: RDI = gpa of a [`GrantCall`](super::GrantCall)
    /// block in the caller's memory (8-byte aligned, not crossing a page).
    /// The kernel reads the block, forwards the operation to the grant
    /// server with the caller's domain filled in, carries out the reply
    /// (flush, copy) and writes the outputs back into the block. Returns in
    /// RAX the block's `status` (0: done), or [`GRANT_BAD_BLOCK`](super::grant_status::BAD_BLOCK)
    /// when the block is not in the caller's memory.
    pub const GRANT: u64 = 8;
}

/// The operations of [`GrantCall::op`].
pub mod grant_op {
    /// Grant `peer` access to own frame `gfn` under `gref`; `flags` bit 0:
    /// read-only.
    pub const GRANT: u64 = 1;
    /// End access through own `gref` (refused while it is mapped).
    pub const END_ACCESS: u64 = 2;
    /// Map `peer`'s `gref` at own guest frame `gfn` (above own memory);
    /// `flags` bit 0: writable. Output: `handle`.
    pub const MAP: u64 = 3;
    /// Unmap `handles[..count]` (count 1..=32) in one batch. Output:
    /// `statuses[..count]`, and `status` (0 unless the whole call failed).
    pub const UNMAP: u64 = 4;
    /// Copy `len` bytes between `peer`'s `gref` at byte `offset` and own
    /// gpa `local`; `flags` bit 1: towards the grant (else from it).
    pub const COPY: u64 = 5;
}

/// Values of [`GrantCall::status`] and [`GrantCall::statuses`]: 0 is
/// success; `1 + i` is the grant server's error of variant index `i`
/// (`abi::grant::GrantError::code`); the kernel's own refusals are above
/// 0x1000.
pub mod grant_status {
    /// Done.
    pub const OK: u32 = 0;
    /// The block is not 8-byte aligned inside the caller's memory.
    pub const BAD_BLOCK: u32 = 0x1001;
    /// `op` is not one of [`super::grant_op`], or `count` is not 1..=32.
    pub const BAD_OP: u32 = 0x1002;
    /// This run has no grant server.
    pub const NO_SERVER: u32 = 0x1003;
    /// The grant server stopped (the domain is being stopped).
    pub const SERVER_DOWN: u32 = 0x1004;
    /// The server's copy plan named memory outside both domains: refused,
    /// nothing copied.
    pub const BAD_PLAN: u32 = 0x1005;
    /// The server answered with a reply the operation does not take.
    pub const BAD_REPLY: u32 = 0x1006;
}

/// The block a guest hands to [`hc::GRANT`], in its own memory. Inputs are
/// read by the kernel, outputs written back; the kernel never trusts it for
/// anything but the values the guest may choose (the caller's domain is the
/// kernel's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GrantCall {
    /// One of [`grant_op`].
    pub op: u64,
    /// The other domain: the grantee (`GRANT`) or the granter (`MAP`,
    /// `COPY`), as a `DomainId` number.
    pub peer: u64,
    /// The grant reference.
    pub gref: u64,
    /// `GRANT`: own frame granted; `MAP`: own frame to map at.
    pub gfn: u64,
    /// Bit 0: read-only (`GRANT`) / writable (`MAP`); bit 1: `COPY` towards
    /// the grant.
    pub flags: u64,
    /// `COPY`: byte offset in the granted frame.
    pub offset: u64,
    /// `COPY`: own guest-physical address.
    pub local: u64,
    /// `COPY`: bytes.
    pub len: u64,
    /// `UNMAP`: handles used.
    pub count: u64,
    /// Output of `MAP`: the map handle.
    pub handle: u64,
    /// Output: [`grant_status`] of the call.
    pub status: u64,
    /// `UNMAP` input: the handles.
    pub handles: [u32; 32],
    /// `UNMAP` output: one [`grant_status`] per handle.
    pub statuses: [u32; 32],
}

/// Byte offsets of [`GrantCall`]'s fields (the kernel reads the block word
/// by word from guest memory).
pub mod grant_call {
    /// `op`.
    pub const OP: u64 = 0;
    /// `peer`.
    pub const PEER: u64 = 8;
    /// `gref`.
    pub const GREF: u64 = 16;
    /// `gfn`.
    pub const GFN: u64 = 24;
    /// `flags`.
    pub const FLAGS: u64 = 32;
    /// `offset`.
    pub const OFFSET: u64 = 40;
    /// `local`.
    pub const LOCAL: u64 = 48;
    /// `len`.
    pub const LEN: u64 = 56;
    /// `count`.
    pub const COUNT: u64 = 64;
    /// `handle`.
    pub const HANDLE: u64 = 72;
    /// `status`.
    pub const STATUS: u64 = 80;
    /// `handles`.
    pub const HANDLES: u64 = 88;
    /// `statuses`.
    pub const STATUSES: u64 = 88 + 4 * 32;
    /// The block's size.
    pub const SIZE: u64 = 88 + 8 * 32;
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
    /// This domain's `DomainId` number (what [`GrantCall::peer`] names).
    pub domain_id: u64,
    /// The peer domain's `DomainId` number for a split-driver pair (the
    /// frontend's backend and the other way), 0 when it has none.
    pub peer: u64,
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

// The offsets the kernel uses are the layout's (checked at compile time).
const _: () = {
    use core::mem::{offset_of, size_of};
    assert!(offset_of!(GrantCall, op) as u64 == grant_call::OP);
    assert!(offset_of!(GrantCall, peer) as u64 == grant_call::PEER);
    assert!(offset_of!(GrantCall, gref) as u64 == grant_call::GREF);
    assert!(offset_of!(GrantCall, gfn) as u64 == grant_call::GFN);
    assert!(offset_of!(GrantCall, flags) as u64 == grant_call::FLAGS);
    assert!(offset_of!(GrantCall, offset) as u64 == grant_call::OFFSET);
    assert!(offset_of!(GrantCall, local) as u64 == grant_call::LOCAL);
    assert!(offset_of!(GrantCall, len) as u64 == grant_call::LEN);
    assert!(offset_of!(GrantCall, count) as u64 == grant_call::COUNT);
    assert!(offset_of!(GrantCall, handle) as u64 == grant_call::HANDLE);
    assert!(offset_of!(GrantCall, status) as u64 == grant_call::STATUS);
    assert!(offset_of!(GrantCall, handles) as u64 == grant_call::HANDLES);
    assert!(offset_of!(GrantCall, statuses) as u64 == grant_call::STATUSES);
    assert!(size_of::<GrantCall>() as u64 == grant_call::SIZE);
};
