//! Umbra's wire: message types, address newtypes and postcard encoding shared
//! by the kernel and every server.
//!
//! - [`addr`]: `Gva`, `Gpa`, `Gfn`, `Hpa`, `Mfn` and page sizes.
//! - [`ids`]: domain, vCPU and pCPU ids and [`CpuSet`].
//! - [`paging`]: guest CR3, paging mode bits, #PF error codes.
//! - [`mmu`]: the MMU protocol, the [`MmuServer`] trait, [`dispatch`].
//! - [`grant`]: the grant protocol, the [`GrantServer`] trait, [`grant_dispatch`].
//! - [`guest`]: the layout and hypercalls Umbra's own guest kernels share with the loader.
//! - [`mem`]: [`PhysMem`], the servers' only way to physical memory.
//! - [`wire`]: [`encode`] / [`decode`] with the [`MAX_MESSAGE`] bound.
//! - [`sched`]: the scheduler protocol, the [`SchedServer`] trait, its
//!   dispatch, the kernel's decision check and the fairness arithmetic.
#![cfg_attr(not(test), no_std)]
#![forbid(unsafe_code)]

pub mod addr;
pub mod grant;
pub mod guest;
pub mod ids;
pub mod mem;
pub mod mmu;
pub mod paging;
pub mod task;
pub mod wire;

pub use addr::{Gfn, Gpa, Gva, Hpa, Mfn, PageSize, PAGE_SHIFT, PAGE_SIZE};
pub use grant::{
    grant_call, grant_dispatch, CopyDirection, GrantCounters, GrantError, GrantRef, GrantReply,
    GrantRequest, GrantResource, GrantServer, MapHandle, UnmapStatus, GRANT_PROTOCOL_VERSION,
    MAX_UNMAP_BATCH,
};
pub use ids::{CpuSet, DomainId, PcpuId, VcpuId};
pub use mem::{MemError, PhysMem};
pub use mmu::{
    call, dispatch, DirtyChunk, FlushObligation, FlushScope, MemRegion, MemoryMap, MmuError,
    MmuReply, MmuRequest, MmuServer, ServerCounters, PROTOCOL_VERSION,
};
pub use paging::{GuestCr3, PagingMode, PfErrorCode};
pub use wire::{decode, encode, DecodeError, EncodeError, MAX_MESSAGE};
pub mod sched;
pub use sched::{Micros, SchedError, SchedReply, SchedRequest, SchedServer, StopReason};
