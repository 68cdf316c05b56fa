//! The contract between the kernel and a server task: its address-space layout, its entry, its system calls.
//!
//! A server task is a separately compiled `no_std` ELF binary embedded in the
//! boot image. The kernel loads it into an address space of its own and runs
//! it in ring 3. The task never runs on its own: it is entered by the kernel
//! for one request at a time per pCPU (a synchronous call) and leaves by a
//! system call. Nothing here is privileged; both sides read these constants.
//!
//! # Address space (user half; the kernel's identity map of the low 4 GiB is
//! # present in every task's tables but supervisor-only)
//! | range | what |
//! | --- | --- |
//! | [`IMAGE_BASE`].. | the task's ELF segments (linked there) |
//! | [`HEAP_BASE`], [`HEAP_BYTES`] | its heap |
//! | [`stack_top`]`(p)` | one stack per pCPU, [`STACK_BYTES`], an unmapped guard page below |
//! | [`buffer`]`(p)` | one message page per pCPU shared with the kernel: the request at offset 0, the reply at [`REPLY_OFFSET`] |
//! | [`CONTROL`] | one control page ([`ControlPage`]): served ranges, pool counters |
//! | [`WINDOW_BASE`] + pa | the physical frames the task serves, and nothing else |
//!
//! # Entry
//! The kernel enters the ELF entry point with `rdi` = [`Op`] as `u64`,
//! `rsi` = pCPU index, `rdx` = request length, on the top of that pCPU's
//! stack with interrupts enabled. The task answers with [`SYS_REPLY`] (reply
//! length in `rdi`), which never returns: the next request enters afresh.
//!
//! # System calls (`int 0x80`, number in `rax`)
//! - [`SYS_REPLY`] (`rdi` = reply length): the reply is in the buffer.
//! - [`SYS_PANIC`] (`rdi` = message length): the task gives up; the message
//!   (UTF-8) is in the reply half of the buffer. The kernel stops the task.

use crate::addr::Mfn;
use heapless::String;
use serde::{Deserialize, Serialize};

/// Where task images are linked (PML4 slot 1: above the kernel's 512 GiB).
pub const IMAGE_BASE: u64 = 0x0000_0080_0000_0000;
/// The task heap.
pub const HEAP_BASE: u64 = 0x0000_0090_0000_0000;
/// Size of the task heap.
pub const HEAP_BYTES: u64 = 16 << 20;
/// Base of the per-pCPU stacks.
pub const STACKS_BASE: u64 = 0x0000_00A0_0000_0000;
/// Each stack's size (the guard page below it is not counted).
pub const STACK_BYTES: u64 = 64 << 10;
/// Distance between two pCPUs' stacks (stack + guard + unmapped slack).
pub const STACK_STRIDE: u64 = 1 << 20;
/// Base of the per-pCPU message pages.
pub const BUFFERS_BASE: u64 = 0x0000_00B0_0000_0000;
/// Distance between two pCPUs' message pages (an unmapped page between).
pub const BUFFER_STRIDE: u64 = 2 * 4096;
/// Offset of the reply in a message page.
pub const REPLY_OFFSET: usize = 2048;
/// The control page.
pub const CONTROL: u64 = 0x0000_00C0_0000_0000;
/// The physical window: frame `pa` is mapped at `WINDOW_BASE + pa`.
pub const WINDOW_BASE: u64 = 0x0000_1000_0000_0000;
/// How many pCPUs a task can serve.
pub const MAX_PCPUS: usize = 64;
/// How many served ranges the control page lists.
pub const MAX_RANGES: usize = 128;

/// The top of pCPU `p`'s stack (exclusive).
pub const fn stack_top(p: usize) -> u64 {
    STACKS_BASE + p as u64 * STACK_STRIDE + 4096 + STACK_BYTES
}

/// The lowest mapped byte of pCPU `p`'s stack (the guard page is just below).
pub const fn stack_bottom(p: usize) -> u64 {
    STACKS_BASE + p as u64 * STACK_STRIDE + 4096
}

/// pCPU `p`'s message page.
pub const fn buffer(p: usize) -> u64 {
    BUFFERS_BASE + p as u64 * BUFFER_STRIDE
}

/// Why the kernel entered the task.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u64)]
pub enum Op {
    /// Once, on one pCPU, before any request: the buffer holds a
    /// [`TaskInit`]; the reply is a [`TaskInitReply`].
    Init = 0,
    /// A request in the server's own protocol (e.g. `MmuRequest` bytes).
    Request = 1,
}

impl Op {
    /// The op the kernel passed, if it is one.
    pub fn from_u64(v: u64) -> Option<Op> {
        match v {
            0 => Some(Op::Init),
            1 => Some(Op::Request),
            _ => None,
        }
    }
}

/// System call: reply (`rdi` = length).
pub const SYS_REPLY: u64 = 0;
/// System call: give up with a message (`rdi` = length).
pub const SYS_PANIC: u64 = 1;
/// The interrupt vector of system calls.
pub const SYSCALL_VECTOR: u8 = 0x80;

/// The first message a task gets: which implementation to create and what
/// it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskInit {
    /// The implementation's registered name.
    pub implementation: String<32>,
    /// The guest MAXPHYADDR the server must enforce.
    pub maxphyaddr: u8,
    /// First frame of the shadow pool (mapped in the window).
    pub pool_first: Mfn,
    /// Frames in the pool.
    pub pool_frames: u64,
    /// How many pCPUs will call.
    pub pcpus: u32,
}

/// The answer to [`TaskInit`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskInitReply {
    /// Ready; the server's name for reports.
    Ready(String<32>),
    /// No implementation of that name in this task.
    UnknownImplementation(String<32>),
    /// The init message did not decode.
    Malformed,
}

/// The control page shared by the kernel and a task (`repr(C)`, atomics
/// only: both sides access it concurrently). The kernel writes the ranges
/// and never trusts what it reads back except the pool counters, which are
/// only reported.
#[repr(C)]
pub struct ControlPage {
    /// Pool frames the task has taken now.
    pub pool_in_use: core::sync::atomic::AtomicU64,
    /// The most it ever had.
    pub pool_peak: core::sync::atomic::AtomicU64,
    /// Served guest ranges: `(first byte, bytes)`; `bytes` 0 is a free slot.
    pub ranges: [[core::sync::atomic::AtomicU64; 2]; MAX_RANGES],
}

const _: () = assert!(core::mem::size_of::<ControlPage>() <= 4096);

impl ControlPage {
    /// Lists guest memory [pa, pa + bytes) as served. Returns false when
    /// every slot is in use.
    pub fn add_range(&self, pa: u64, bytes: u64) -> bool {
        use core::sync::atomic::Ordering;
        for slot in &self.ranges {
            if slot[1].load(Ordering::Acquire) == 0 {
                slot[0].store(pa, Ordering::Release);
                slot[1].store(bytes, Ordering::Release);
                return true;
            }
        }
        false
    }

    /// Withdraws the range starting at `pa`.
    pub fn remove_range(&self, pa: u64) {
        use core::sync::atomic::Ordering;
        for slot in &self.ranges {
            if slot[0].load(Ordering::Acquire) == pa {
                slot[1].store(0, Ordering::Release);
            }
        }
    }

    /// Whether `pa` lies in a listed range.
    pub fn serves(&self, pa: u64) -> bool {
        use core::sync::atomic::Ordering;
        self.ranges.iter().any(|slot| {
            let bytes = slot[1].load(Ordering::Acquire);
            let start = slot[0].load(Ordering::Acquire);
            bytes != 0 && pa >= start && pa - start < bytes
        })
    }

    /// Pool frames in use now, and the most ever in use.
    pub fn pool_usage(&self) -> (u64, u64) {
        use core::sync::atomic::Ordering;
        (
            self.pool_in_use.load(Ordering::Relaxed),
            self.pool_peak.load(Ordering::Relaxed),
        )
    }
}
