//! Ring-3 server tasks: loading one into its own address space, the synchronous call into it, and stopping it when it misbehaves.
//!
//! # Address space
//! A task's PML4 holds the kernel's slot 0 (the identity map of the low
//! 4 GiB) as it is: its entries have U/S clear, so ring 3 cannot touch it,
//! while the kernel's interrupt and system-call paths keep running when
//! they arrive from the task. Everything else is the task's own and laid out
//! by `abi::task`: its ELF segments, its heap, one stack per pCPU with an
//! unmapped guard page below, one message page per pCPU, its control page,
//! and the physical window holding exactly what it serves (the shadow pool
//! and the served guests' frames, mapped by [`Task::map_window`]). Kernel
//! memory, other tasks' memory and other frames are not mapped user-
//! accessible anywhere in its tables.
//!
//! # The call ([`Task::call`])
//! The request goes into the calling pCPU's message page; the kernel saves
//! its callee-saved registers and stack pointer in that pCPU's door slot,
//! points TSS.RSP0 just below them, loads the task's CR3 and enters the
//! task's entry point by IRETQ (interrupts on). The task answers with
//! `int 0x80` ([`abi::task::SYS_REPLY`]): the system-call path restores the
//! saved stack and registers and returns from the call, abandoning the
//! task's context (the next request enters afresh). No thread state
//! survives between requests, so there is nothing to schedule.
//!
//! # Containment
//! Anything else that arrives from ring 3 ends the call with a [`Stop`]: a
//! CPU exception (its vector, error code, RIP, CR2; a #PF in a stack's guard
//! page is named a stack overflow), a panic report ([`abi::task::SYS_PANIC`]
//! with the message), an unknown system call, or a timer tick past the
//! call's bound ([`REPLY_BOUND_MS`]). The task is marked stopped for
//! good: later calls fail at once, and a pCPU still inside it leaves at its
//! next timer tick. The kernel itself never faults on the task's behalf.

use crate::interrupts::Frame;
use crate::{apic, cpu, frames};
use abi::task::{
    self as layout, ControlPage, Op, CONTROL, HEAP_BASE, HEAP_BYTES, IMAGE_BASE, REPLY_OFFSET,
    STACK_BYTES, SYS_CALL, SYS_PANIC, SYS_REPLY, WINDOW_BASE,
};
use abi::MAX_MESSAGE;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use spin::Mutex;
use x86_64::registers::control::{Cr3, Cr3Flags};
use x86_64::structures::paging::PhysFrame;
use x86_64::PhysAddr;

/// How long a task may run on one request before it is stopped, counted
/// in timer ticks taken while the task ran (100 Hz: 200 ticks).
///
/// Ticks, not TSC time: under TCG on a loaded 2-core host a pCPU's thread
/// can be descheduled for hundreds of milliseconds inside a call (the run
/// report prints the longest call by the TSC; 440 ms was seen with other
/// builds running), while QEMU's periodic timer coalesces the ticks it
/// missed, so ticks count the time the task really ran. Legitimate requests
/// take well under a tick; 2 s is ample, and costs a hung server's test
/// boot only 2 s.
pub const REPLY_BOUND_MS: u64 = 2000;

/// [`REPLY_BOUND_MS`] in timer ticks.
const REPLY_BOUND_TICKS: u64 = REPLY_BOUND_MS * apic::TIMER_HZ / 1000;

/// User code and data selectors (appended to every CPU's GDT after the TSS,
/// see [`cpu`]), with RPL 3.
pub const USER_DATA_SELECTOR: u64 = 0x28 | 3;
/// See [`USER_DATA_SELECTOR`].
pub const USER_CODE_SELECTOR: u64 = 0x30 | 3;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

/// Why a call into a task ended without a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// A CPU exception in ring 3.
    Exception {
        /// The vector.
        vector: u64,
        /// Its error code (0 if none).
        error: u64,
        /// Where.
        rip: u64,
        /// CR2 at the time (the address of a #PF).
        cr2: u64,
    },
    /// A #PF in the guard page below a stack: the task overran it.
    StackOverflow {
        /// Where.
        rip: u64,
        /// The guard-page address touched.
        cr2: u64,
    },
    /// The task's panic handler reported this message.
    Panicked(String),
    /// No reply within [`REPLY_BOUND_MS`].
    NoReply {
        /// How long it ran, in milliseconds.
        ms: u64,
    },
    /// A system call number the kernel does not know.
    BadSystemCall(u64),
    /// A reply length beyond the reply buffer.
    BadReplyLength(u64),
    /// The task had already been stopped (on this or another pCPU).
    AlreadyStopped,
    /// This pCPU is already inside a task call (no nesting yet).
    Busy,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Exception {
                vector,
                error,
                rip,
                cr2,
            } => write!(
                f,
                "exception {} (vector {vector}, error {error:#x}) at rip {rip:#x}, cr2 {cr2:#x}",
                crate::interrupts::exception_name(*vector)
            ),
            Stop::StackOverflow { rip, cr2 } => write!(
                f,
                "stack overflow: #PF (vector 14) in the guard page at cr2 {cr2:#x}, rip {rip:#x}"
            ),
            Stop::Panicked(m) => write!(f, "panicked: {m}"),
            Stop::NoReply { ms } => write!(
                f,
                "no reply within {REPLY_BOUND_MS} ms of running (preempted after {ms} ms)"
            ),
            Stop::BadSystemCall(n) => write!(f, "unknown system call {n}"),
            Stop::BadReplyLength(n) => {
                write!(f, "reply length {n} beyond the {MAX_MESSAGE}-byte buffer")
            }
            Stop::AlreadyStopped => write!(f, "the task was already stopped"),
            Stop::Busy => write!(f, "this pCPU is already inside a task call"),
        }
    }
}

/// Why a task could not be loaded.
#[derive(Debug)]
pub enum LoadError {
    /// The image is not a 64-bit x86-64 ELF executable.
    NotElf(&'static str),
    /// A segment lies outside the image region of the layout.
    SegmentOutOfRange {
        /// Its first address.
        vaddr: u64,
        /// Its size in memory.
        memsz: u64,
    },
    /// No frames left.
    OutOfFrames,
    /// Every slot of the task's served-range table is taken.
    RangeTableFull,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LoadError::NotElf(why) => write!(f, "not a task image: {why}"),
            LoadError::SegmentOutOfRange { vaddr, memsz } => write!(
                f,
                "segment at {vaddr:#x} (+{memsz:#x}) outside the task image region"
            ),
            LoadError::OutOfFrames => write!(f, "out of frames"),
            LoadError::RangeTableFull => write!(
                f,
                "the control page's table of {} served ranges is full",
                layout::MAX_RANGES
            ),
        }
    }
}

/// A loaded server task.
pub struct Task {
    /// Its name in reports.
    pub name: String,
    pml4: u64,
    entry: u64,
    control_pa: u64,
    buffers: Vec<u64>,
    stopped: AtomicBool,
    /// Frames of its tables, image, heap, stacks and pages (freed by
    /// [`Task::destroy`]).
    owned: Mutex<Vec<u64>>,
    /// The longest call so far, in TSC ticks.
    longest: AtomicU64,
}

impl Task {
    /// Loads the ELF image `elf` as task `name` for `pcpus` pCPUs.
    pub fn load(name: &str, elf: &[u8], pcpus: usize) -> Result<&'static Task, LoadError> {
        use elf::abi::{EM_X86_64, PF_W, PT_LOAD};
        use elf::endian::AnyEndian;
        let file = elf::ElfBytes::<AnyEndian>::minimal_parse(elf)
            .map_err(|_| LoadError::NotElf("the ELF header does not parse"))?;
        if file.ehdr.class != elf::file::Class::ELF64 || file.ehdr.e_machine != EM_X86_64 {
            return Err(LoadError::NotElf("not a 64-bit x86-64 ELF"));
        }
        let segments = file
            .segments()
            .ok_or(LoadError::NotElf("no program headers"))?;
        let mut task = Task {
            name: name.into(),
            pml4: 0,
            entry: file.ehdr.e_entry,
            control_pa: 0,
            buffers: Vec::new(),
            stopped: AtomicBool::new(false),
            owned: Mutex::new(Vec::new()),
            longest: AtomicU64::new(0),
        };
        task.pml4 = task.frame()?;
        // SAFETY: both are page-table pages: the running PML4 and the
        // task's fresh one; slot 0 is the kernel's identity map, U/S clear.
        unsafe {
            entry(task.pml4, 0).store(
                entry(kernel_pml4(), 0).load(Ordering::Acquire),
                Ordering::Release,
            )
        };
        for ph in segments.iter().filter(|p| p.p_type == PT_LOAD) {
            let end = ph.p_vaddr.checked_add(ph.p_memsz);
            let file_end = ph.p_offset.checked_add(ph.p_filesz);
            let ok = ph.p_vaddr >= IMAGE_BASE
                && end.is_some_and(|e| e <= HEAP_BASE)
                && ph.p_filesz <= ph.p_memsz
                && file_end.is_some_and(|e| e <= elf.len() as u64);
            if !ok {
                return Err(LoadError::SegmentOutOfRange {
                    vaddr: ph.p_vaddr,
                    memsz: ph.p_memsz,
                });
            }
            let first = ph.p_vaddr & !0xFFF;
            let mut va = first;
            while va < ph.p_vaddr + ph.p_memsz {
                let pa = task.frame()?;
                // Copy the file bytes that fall in this page.
                let lo = va.max(ph.p_vaddr);
                let hi = (va + 4096).min(ph.p_vaddr + ph.p_filesz);
                if lo < hi {
                    let src =
                        &elf[(ph.p_offset + lo - ph.p_vaddr) as usize..][..(hi - lo) as usize];
                    // SAFETY: `pa` is a fresh frame of ours in the identity
                    // map; the copy stays inside it (lo..hi within one page).
                    unsafe {
                        core::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            (pa + (lo - va)) as *mut u8,
                            (hi - lo) as usize,
                        )
                    };
                }
                let w = if ph.p_flags & PF_W != 0 { WRITABLE } else { 0 };
                task.map(va, pa, w)?;
                va += 4096;
            }
        }
        for i in 0..HEAP_BYTES / 4096 {
            let pa = task.frame()?;
            task.map(HEAP_BASE + i * 4096, pa, WRITABLE)?;
        }
        for p in 0..pcpus.min(layout::MAX_PCPUS) {
            for i in 0..STACK_BYTES / 4096 {
                let pa = task.frame()?;
                task.map(layout::stack_bottom(p) + i * 4096, pa, WRITABLE)?;
            }
            let buf = task.frame()?;
            task.map(layout::buffer(p), buf, WRITABLE)?;
            task.buffers.push(buf);
        }
        task.control_pa = task.frame()?;
        task.map(CONTROL, task.control_pa, WRITABLE)?;
        Ok(alloc::boxed::Box::leak(alloc::boxed::Box::new(task)))
    }

    /// A fresh zeroed frame owned by the task.
    fn frame(&self) -> Result<u64, LoadError> {
        let f = frames::alloc_zeroed().map_err(|_| LoadError::OutOfFrames)?;
        let pa = f.start_address().as_u64();
        self.owned.lock().push(pa);
        Ok(pa)
    }

    /// Maps `va` to frame `pa` for ring 3 (`flags`: 0 or [`WRITABLE`]),
    /// making the tables on the way.
    fn map(&self, va: u64, pa: u64, flags: u64) -> Result<(), LoadError> {
        let mut table = self.pml4;
        for level in [39u32, 30, 21] {
            let i = (va >> level) & 511;
            // SAFETY: `table` is the task's PML4 or a table made below;
            // slot 0 of the PML4 (the kernel's) is never walked: every
            // user address is at or above IMAGE_BASE (slot 1).
            let e = unsafe { entry(table, i) };
            let cur = e.load(Ordering::Acquire);
            table = if cur & PRESENT != 0 {
                cur & ADDR_MASK
            } else {
                let t = self.frame()?;
                e.store(t | PRESENT | WRITABLE | USER, Ordering::Release);
                t
            };
        }
        // SAFETY: a leaf table of the task's own.
        unsafe { entry(table, (va >> 12) & 511) }
            .store(pa | PRESENT | USER | flags, Ordering::Release);
        Ok(())
    }

    /// Clears the mapping of `va`, if any.
    fn unmap(&self, va: u64) {
        let mut table = self.pml4;
        for level in [39u32, 30, 21] {
            // SAFETY: as in `map`.
            let cur = unsafe { entry(table, (va >> level) & 511) }.load(Ordering::Acquire);
            if cur & PRESENT == 0 {
                return;
            }
            table = cur & ADDR_MASK;
        }
        // SAFETY: a leaf table of the task's own.
        unsafe { entry(table, (va >> 12) & 511) }.store(0, Ordering::Release);
    }

    /// Maps host frames [pa, pa + bytes) into the task's physical window
    /// and lists them as served in its control page (with `list`); the
    /// shadow pool is mapped without being listed (the task knows it from
    /// its init message).
    pub fn map_window(&self, pa: u64, bytes: u64, list: bool) -> Result<(), LoadError> {
        let mut off = 0;
        while off < bytes {
            self.map(WINDOW_BASE + pa + off, pa + off, WRITABLE)?;
            off += 4096;
        }
        if list && !self.control().add_range(pa, bytes) {
            return Err(LoadError::RangeTableFull);
        }
        Ok(())
    }

    /// Withdraws a served range and unmaps it. No pCPU may be inside the
    /// task using it (the server forgot the domain first); a stale TLB
    /// entry cannot survive, because every call loads CR3 afresh.
    pub fn unmap_window(&self, pa: u64, bytes: u64) {
        self.control().remove_range(pa);
        let mut off = 0;
        while off < bytes {
            self.unmap(WINDOW_BASE + pa + off);
            off += 4096;
        }
    }

    /// The task's control page.
    pub fn control(&self) -> &ControlPage {
        // SAFETY: a frame of ours in the identity map, zeroed at load (a
        // valid ControlPage: atomics only), alive as long as the task.
        unsafe { &*(self.control_pa as *const ControlPage) }
    }

    /// Whether the task has been stopped.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }

    /// The longest call so far, in TSC ticks.
    pub fn longest_call(&self) -> u64 {
        self.longest.load(Ordering::Relaxed)
    }

    /// Sends `request` on the calling pCPU and waits for the reply, which
    /// is copied into `reply`; returns its length, or why there is none.
    /// Interrupts must be enabled (the timer bounds the call).
    pub fn call(
        &'static self,
        op: Op,
        request: &[u8],
        reply: &mut [u8; MAX_MESSAGE],
    ) -> Result<usize, Stop> {
        if self.is_stopped() {
            return Err(Stop::AlreadyStopped);
        }
        let me = cpu::current().index();
        let Some(&buf) = self.buffers.get(me) else {
            return Err(Stop::Busy);
        };
        let depth = DEPTH[me].load(Ordering::Acquire);
        if depth >= MAX_NESTING || entered(me, self) {
            return Err(Stop::Busy);
        }
        let slot = &DOORS[me][depth];
        let len = request.len().min(REPLY_OFFSET);
        // SAFETY: `buf` is this pCPU's message page (a frame of ours in the
        // identity map); no one else uses it while this pCPU is not inside
        // the task, which it is not (the slot is empty).
        unsafe { core::ptr::copy_nonoverlapping(request.as_ptr(), buf as *mut u8, len) };
        let start = apic::tsc();
        slot.start.store(start, Ordering::Relaxed);
        slot.ticks.store(0, Ordering::Relaxed);
        slot.task
            .store(self as *const Task as *mut Task, Ordering::Release);
        DEPTH[me].store(depth + 1, Ordering::Release);
        let rsp0 = cpu::current().rsp0_slot();
        // SAFETY: this CPU's own TSS field; only this CPU reads it, on a
        // ring-3 -> ring-0 transition, and none happens before the door
        // writes it again.
        let old_rsp0 = unsafe { rsp0.read_volatile() };
        let ctx = slot.ctx.get();
        // SAFETY: only this CPU uses its slot's context.
        unsafe { (*ctx).rsp0 = rsp0 };
        let (kernel_cr3, flags) = Cr3::read();
        // SAFETY: the task's PML4 maps the kernel's slot 0 exactly as the
        // running tables do (the kernel keeps running after the switch),
        // the rest of it is user memory of the task.
        unsafe {
            Cr3::write(
                PhysFrame::containing_address(PhysAddr::new(self.pml4)),
                Cr3Flags::empty(),
            )
        };
        // SAFETY: the door saves the kernel context in `ctx`, enters the
        // task at its entry with its own stack for this pCPU, and returns
        // only through `umbra_door_exit` on the same context (a reply or a
        // stop from this module's ring-3 handler); RSP0 points below the
        // saved frame so ring-3 interrupts do not overwrite it.
        let code = unsafe {
            umbra_door_enter(
                ctx,
                self.entry,
                layout::stack_top(me) - 8,
                op as u64,
                me as u64,
                len as u64,
            )
        };
        // SAFETY: back to the kernel's own tables (same slot 0).
        unsafe { Cr3::write(kernel_cr3, flags) };
        // SAFETY: as above: restores this CPU's RSP0.
        unsafe { rsp0.write_volatile(old_rsp0) };
        slot.task.store(core::ptr::null_mut(), Ordering::Release);
        DEPTH[me].store(depth, Ordering::Release);
        self.longest
            .fetch_max(apic::tsc() - start, Ordering::Relaxed);
        if code < (MAX_MESSAGE as u64) + 1 {
            let n = code as usize;
            // SAFETY: the reply half of our message page (identity map);
            // the task is no longer running on this pCPU.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    (buf + REPLY_OFFSET as u64) as *const u8,
                    reply.as_mut_ptr(),
                    n,
                )
            };
            return Ok(n);
        }
        Err(slot.cause.lock().take().unwrap_or(Stop::AlreadyStopped))
    }

    /// Gives every frame of the task back. The caller guarantees no pCPU
    /// is or will be inside it (its run is over).
    pub fn destroy(&self) {
        self.stopped.store(true, Ordering::Release);
        for pa in self.owned.lock().drain(..) {
            let _ = frames::free(PhysFrame::containing_address(PhysAddr::new(pa)));
        }
    }
}

/// The result code of a door exit that is not a reply (above every reply
/// length).
const STOPPED: u64 = u64::MAX;

/// One pCPU's door: the saved kernel context and what it is inside.
struct DoorSlot {
    ctx: UnsafeCell<DoorCtx>,
    task: AtomicPtr<Task>,
    start: AtomicU64,
    ticks: AtomicU64,
    cause: Mutex<Option<Stop>>,
}

/// The kernel context saved at door entry (layout used by the assembly).
#[repr(C)]
struct DoorCtx {
    /// The kernel stack pointer after the saved registers.
    kernel_rsp: u64,
    /// This CPU's TSS.RSP0 field.
    rsp0: *mut u64,
}

// SAFETY: each slot is used only by its own CPU (indexed by the running
// CPU's index); the atomics and the mutex are shared for reports only.
unsafe impl Sync for DoorSlot {}

/// How deep calls may nest on one pCPU (the kernel calls a task, which
/// calls another through [`abi::task::SYS_CALL`], ...).
pub const MAX_NESTING: usize = 4;

/// How many door slots of each pCPU are in use.
static DEPTH: [AtomicUsize; cpu::MAX_CPUS] = [const { AtomicUsize::new(0) }; cpu::MAX_CPUS];

static DOORS: [[DoorSlot; MAX_NESTING]; cpu::MAX_CPUS] = [const {
    [const {
        DoorSlot {
            ctx: UnsafeCell::new(DoorCtx {
                kernel_rsp: 0,
                rsp0: core::ptr::null_mut(),
            }),
            task: AtomicPtr::new(core::ptr::null_mut()),
            start: AtomicU64::new(0),
            ticks: AtomicU64::new(0),
            cause: Mutex::new(None),
        }
    }; MAX_NESTING]
}; cpu::MAX_CPUS];

/// The innermost call this pCPU is in, if any.
fn innermost(me: usize) -> Option<&'static DoorSlot> {
    let d = DEPTH[me].load(Ordering::Acquire);
    d.checked_sub(1).map(|i| &DOORS[me][i])
}

/// Whether `task` is already entered on this pCPU (a call into it would
/// reuse the stack its suspended thread is on).
fn entered(me: usize, task: &Task) -> bool {
    let d = DEPTH[me].load(Ordering::Acquire);
    DOORS[me][..d]
        .iter()
        .any(|s| core::ptr::eq(s.task.load(Ordering::Acquire), task))
}

global_asm!(
    r#"
    .section .text
    .global umbra_door_enter
umbra_door_enter:
    // rdi = ctx, rsi = user rip, rdx = user rsp, rcx/r8/r9 = the task's args
    push rbp
    push rbx
    push r12
    push r13
    push r14
    push r15
    pushfq
    mov [rdi], rsp
    mov rax, [rdi + 8]
    mov [rax], rsp
    cli
    push {uds}
    push rdx
    push 0x202
    push {ucs}
    push rsi
    mov rdi, rcx
    mov rsi, r8
    mov rdx, r9
    xor eax, eax
    xor ebx, ebx
    xor ecx, ecx
    xor ebp, ebp
    xor r8d, r8d
    xor r9d, r9d
    xor r10d, r10d
    xor r11d, r11d
    xor r12d, r12d
    xor r13d, r13d
    xor r14d, r14d
    xor r15d, r15d
    swapgs
    iretq

    .global umbra_door_exit
umbra_door_exit:
    // rdi = ctx, rsi = result; kernel GS is loaded (the entry stub swapped)
    mov rsp, [rdi]
    mov rax, rsi
    popfq
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbx
    pop rbp
    ret
"#,
    uds = const USER_DATA_SELECTOR,
    ucs = const USER_CODE_SELECTOR,
);

extern "C" {
    fn umbra_door_enter(ctx: *mut DoorCtx, rip: u64, rsp: u64, a0: u64, a1: u64, a2: u64) -> u64;
    fn umbra_door_exit(ctx: *mut DoorCtx, result: u64) -> !;
}

/// Handles everything that arrives from ring 3 (the interrupt stub calls
/// this when the interrupted CS has RPL 3): system calls, exceptions and
/// interrupts. Returns only to resume the task (an interrupt it must not
/// notice); everything else leaves through the door.
pub fn from_user(frame: &mut Frame) {
    let me = cpu::current().index();
    let Some(slot) = innermost(me) else {
        // Ring 3 runs only inside a call: a corrupt state.
        crate::interrupts::fatal_exception(frame);
    };
    let task = slot.task.load(Ordering::Acquire);
    // SAFETY: tasks are leaked ('static) and the slot names the one this
    // pCPU is inside.
    let task: &Task = unsafe { &*task };
    let v = frame.vector;
    if v == layout::SYSCALL_VECTOR as u64 {
        match frame.rax {
            SYS_REPLY if frame.rdi <= MAX_MESSAGE as u64 => exit(slot, frame.rdi),
            SYS_REPLY => stop(task, slot, Stop::BadReplyLength(frame.rdi)),
            SYS_PANIC => {
                let n = (frame.rdi as usize).min(MAX_MESSAGE);
                let buf = task.buffers[me] + REPLY_OFFSET as u64;
                // SAFETY: the reply half of this pCPU's message page, a
                // frame of the task's in the identity map.
                let bytes = unsafe { core::slice::from_raw_parts(buf as *const u8, n) };
                let msg = String::from_utf8_lossy(bytes).into_owned();
                stop(task, slot, Stop::Panicked(msg))
            }
            SYS_CALL => frame.rax = call_port(task, me, frame.rdi, frame.rsi),
            n => stop(task, slot, Stop::BadSystemCall(n)),
        }
        return;
    }
    if v < 32 {
        let cr2 = x86_64::registers::control::Cr2::read_raw();
        let guard = (0..layout::MAX_PCPUS).any(|p| {
            let g = layout::stack_bottom(p) - 4096;
            (g..g + 4096).contains(&cr2)
        });
        let cause = if v == 14 && guard {
            Stop::StackOverflow {
                rip: frame.rip,
                cr2,
            }
        } else {
            Stop::Exception {
                vector: v,
                error: frame.error,
                rip: frame.rip,
                cr2,
            }
        };
        stop(task, slot, cause);
    }
    // An interrupt: serve it as in the kernel, then count the tick against the bound.
    crate::interrupts::serve_interrupt(frame);
    if v == apic::TIMER_VECTOR as u64 {
        if task.is_stopped() {
            stop(task, slot, Stop::AlreadyStopped);
        }
        if slot.ticks.fetch_add(1, Ordering::Relaxed) + 1 >= REPLY_BOUND_TICKS {
            let ms = apic::tsc_to_us(apic::tsc() - slot.start.load(Ordering::Relaxed)) / 1000;
            stop(task, slot, Stop::NoReply { ms });
        }
    }
}

/// Tasks reachable by [`abi::task::SYS_CALL`], by port.
static PORTS: [AtomicPtr<Task>; layout::MAX_PORTS] =
    [const { AtomicPtr::new(core::ptr::null_mut()) }; layout::MAX_PORTS];

/// Makes `task` reachable from other tasks at `port` (None: withdraws it).
/// Returns false for a port out of range.
pub fn set_port(port: usize, task: Option<&'static Task>) -> bool {
    let Some(p) = PORTS.get(port) else {
        return false;
    };
    let ptr = task.map_or(core::ptr::null_mut(), |t| t as *const Task as *mut Task);
    p.store(ptr, Ordering::Release);
    true
}

/// Carries out `caller`'s call of the task at `port` on this pCPU: the
/// request is the `len` bytes in the caller's reply half, and the answer
/// replaces them. Returns the answer's length, or an error code above
/// every length ([`abi::task::CallError`]).
fn call_port(caller: &Task, me: usize, port: u64, len: u64) -> u64 {
    use abi::task::CallError;
    let Some(target) = PORTS.get(port as usize).map(|p| p.load(Ordering::Acquire)) else {
        return CallError::NoSuchPort.code();
    };
    if target.is_null() {
        return CallError::NoSuchPort.code();
    }
    if len > MAX_MESSAGE as u64 {
        return CallError::TooLong.code();
    }
    // SAFETY: ports name leaked ('static) tasks.
    let target: &'static Task = unsafe { &*target };
    let buf = caller.buffers[me] + REPLY_OFFSET as u64;
    let mut request = [0u8; MAX_MESSAGE];
    // SAFETY: the reply half of the caller's message page on this pCPU (a
    // frame of the caller's in the identity map); the caller's thread is
    // suspended in this system call, so nothing else touches it.
    unsafe { core::ptr::copy_nonoverlapping(buf as *const u8, request.as_mut_ptr(), len as usize) };
    let mut answer = [0u8; MAX_MESSAGE];
    match target.call(Op::Request, &request[..len as usize], &mut answer) {
        Ok(n) => {
            // SAFETY: as above; n <= MAX_MESSAGE fits the reply half.
            unsafe { core::ptr::copy_nonoverlapping(answer.as_ptr(), buf as *mut u8, n) };
            n as u64
        }
        Err(Stop::Busy) => CallError::Busy.code(),
        Err(stop) => {
            crate::kprintln!(
                "task: `{}` STOPPED while serving a call from `{}` on pcpu {me}: {stop}",
                target.name,
                caller.name
            );
            CallError::Stopped.code()
        }
    }
}

/// Leaves the door with `result`.
fn exit(slot: &DoorSlot, result: u64) -> ! {
    // SAFETY: the slot's context was saved by `umbra_door_enter` on this
    // CPU, whose call frame is still live below (we are inside that call).
    unsafe { umbra_door_exit(slot.ctx.get(), result) }
}

/// Stops the task for good and leaves the door with `cause`.
fn stop(task: &Task, slot: &DoorSlot, cause: Stop) -> ! {
    task.stopped.store(true, Ordering::Release);
    *slot.cause.lock() = Some(cause);
    exit(slot, STOPPED)
}

/// The running PML4.
fn kernel_pml4() -> u64 {
    Cr3::read().0.start_address().as_u64()
}

/// Entry `index` of the page-table page at physical `table`.
///
/// # Safety
/// `table` must be a page-table page (a task's or the kernel's) in the
/// identity map that stays allocated while the reference is used; entries
/// are only accessed atomically.
unsafe fn entry(table: u64, index: u64) -> &'static AtomicU64 {
    debug_assert!(index < 512 && table.is_multiple_of(4096));
    // SAFETY: the caller's promise; AtomicU64 has u64's layout.
    unsafe { AtomicU64::from_ptr((table + index * 8) as *mut u64) }
}
