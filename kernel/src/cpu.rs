//! Per-CPU data (found through the GS base), CPU sets, each CPU's own GDT, TSS and IDT, and its stacks (each with an unmapped guard page below).

use crate::{apic, frames, interrupts, paging, shootdown};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use spin::Mutex;
use x86_64::instructions::segmentation::{Segment, CS, DS, ES, SS};
use x86_64::instructions::tables::load_tss;
use x86_64::registers::model_specific::GsBase;
use x86_64::structures::gdt::{Descriptor, GlobalDescriptorTable};
use x86_64::structures::tss::TaskStateSegment;
use x86_64::VirtAddr;

/// Most CPUs the kernel manages (a [`CpuSet`] is one `u64`).
pub const MAX_CPUS: usize = 64;
/// Kernel stack of an application processor, in 4 KiB frames (plus an
/// unmapped guard page below).
pub const STACK_FRAMES: u64 = 16;
/// Each IST stack (#DF, NMI, #MC), in 4 KiB frames (plus an unmapped guard
/// page below).
pub const IST_FRAMES: u64 = 4;
/// IST slot (1-based, as in the IDT gate) of the double-fault stack.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot of the NMI stack.
pub const IST_NMI: u8 = 2;
/// IST slot of the machine-check stack.
pub const IST_MACHINE_CHECK: u8 = 3;

/// One of the four stacks every CPU has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StackKind {
    /// The stack the CPU normally runs on (CPU 0: the boot stack).
    Kernel = 0,
    /// The #DF IST stack.
    DoubleFault = 1,
    /// The NMI IST stack.
    Nmi = 2,
    /// The #MC IST stack.
    MachineCheck = 3,
}

impl StackKind {
    /// Every kind, in index order.
    pub const ALL: [StackKind; 4] = [
        StackKind::Kernel,
        StackKind::DoubleFault,
        StackKind::Nmi,
        StackKind::MachineCheck,
    ];

    /// Name for reports.
    pub fn name(self) -> &'static str {
        match self {
            StackKind::Kernel => "kernel stack",
            StackKind::DoubleFault => "#DF IST stack",
            StackKind::Nmi => "NMI IST stack",
            StackKind::MachineCheck => "#MC IST stack",
        }
    }

    /// Size in 4 KiB frames (CPU 0's kernel stack is the boot stack).
    fn frames(self) -> u64 {
        match self {
            StackKind::Kernel => STACK_FRAMES,
            _ => IST_FRAMES,
        }
    }
}

// A CPU index is a bit of the abi's set.
const _: () = assert!(MAX_CPUS == abi::CpuSet::MAX_CPUS as usize);

/// A set of CPUs by index (bit i = CPU i): the wire type of [`abi`], re-exported.
/// [`CpuSetExt`] adds the kernel's index-based helpers.
pub use abi::CpuSet;

/// The kernel's helpers on [`CpuSet`], by CPU index (`usize`, as in
/// [`Cpu::index`]) rather than [`abi::PcpuId`]. An index of 64 or more is
/// never in a set: [`only`](CpuSetExt::only) and [`with`](CpuSetExt::with)
/// ignore it, [`has`](CpuSetExt::has) says false.
pub trait CpuSetExt: Sized {
    /// Every CPU listed by the firmware (and kept).
    fn all() -> CpuSet;
    /// Every CPU listed by the firmware except the calling one.
    fn all_but_self() -> CpuSet;
    /// Only CPU `i`.
    fn only(i: usize) -> CpuSet;
    /// This set plus CPU `i`.
    fn with(self, i: usize) -> CpuSet;
    /// This set minus CPU `i`.
    fn without(self, i: usize) -> CpuSet;
    /// True when CPU `i` is in the set (`CpuSet::contains` takes a `PcpuId`).
    fn has(self, i: usize) -> bool;
    /// The CPU indices in the set, ascending (`CpuSet::iter` yields `PcpuId`s).
    fn indices(self) -> impl Iterator<Item = usize>;
}

fn pcpu(i: usize) -> abi::PcpuId {
    // Out-of-range indices become an invalid id, which no set holds.
    abi::PcpuId(u32::try_from(i).unwrap_or(u32::MAX))
}

impl CpuSetExt for CpuSet {
    fn all() -> CpuSet {
        CpuSet::first(u32::try_from(count()).unwrap_or(u32::MAX))
    }

    fn all_but_self() -> CpuSet {
        Self::all().without(current().index())
    }

    fn only(i: usize) -> CpuSet {
        CpuSet::single(pcpu(i))
    }

    fn with(self, i: usize) -> CpuSet {
        self.union(CpuSet::single(pcpu(i)))
    }

    fn without(self, i: usize) -> CpuSet {
        self.difference(CpuSet::single(pcpu(i)))
    }

    fn has(self, i: usize) -> bool {
        self.contains(pcpu(i))
    }

    fn indices(self) -> impl Iterator<Item = usize> {
        self.iter().map(|p| p.0 as usize)
    }
}

/// One `T` per CPU, for subsystems that keep per-CPU state outside [`Cpu`]
/// (e.g. `static HSAVE: PerCpu<AtomicU64> = PerCpu::new([const { AtomicU64::new(0) }; MAX_CPUS]);`).
pub struct PerCpu<T>([T; MAX_CPUS]);

impl<T> PerCpu<T> {
    /// One value per CPU slot.
    pub const fn new(values: [T; MAX_CPUS]) -> Self {
        PerCpu(values)
    }

    /// The running CPU's value.
    pub fn this(&self) -> &T {
        &self.0[current().index()]
    }

    /// CPU `index`'s value.
    pub fn of(&self, index: usize) -> &T {
        &self.0[index]
    }
}

/// A job a CPU runs when asked (see [`crate::smp::run_on`]).
pub type Job = fn() -> Result<(), &'static str>;

/// Descriptor tables owned by one CPU.
struct Tables {
    gdt: GlobalDescriptorTable,
    tss: TaskStateSegment,
    idt: interrupts::Idt,
}

/// Everything the kernel keeps per CPU. `gs:[0]` holds the address of the
/// running CPU's entry, so [`current`] is one load.
#[repr(C, align(64))]
pub struct Cpu {
    self_ptr: AtomicU64,
    index: AtomicUsize,
    apic_id: AtomicU32,
    online: AtomicBool,
    /// Timer interrupts taken.
    pub ticks: AtomicU64,
    /// Shootdown counters (IPIs sent, flushes done, waits).
    pub counters: shootdown::Counters,
    /// Shootdown request slot and inbox.
    pub(crate) mailbox: shootdown::Mailbox,
    /// Job posted by another CPU, and its result.
    pub(crate) job: Mutex<Option<Job>>,
    pub(crate) job_pending: AtomicBool,
    pub(crate) job_result: Mutex<Option<Result<(), &'static str>>>,
    /// Guard page (unmapped) and top of each stack, by [`StackKind`]; 0
    /// until [`prepare_stacks`] ran for this CPU.
    stack_guards: [AtomicU64; 4],
    stack_tops: [AtomicU64; 4],
    tables: UnsafeCell<Tables>,
}

// SAFETY: all fields but `tables` are atomics, arrays of atomics or locks.
// `tables` is written only in `init_this_cpu`, which runs once, on the
// owning CPU, before that CPU loads them; after that the only software
// access is the task door's write of TSS.RSP0, made by the owning CPU
// itself through a raw pointer (`rsp0_slot`), which the CPU reads only on
// its own ring-3 -> ring-0 transitions; so no two threads ever access a
// CPU's tables at once.
unsafe impl Sync for Cpu {}

impl Cpu {
    const fn new() -> Self {
        Cpu {
            self_ptr: AtomicU64::new(0),
            index: AtomicUsize::new(0),
            apic_id: AtomicU32::new(0),
            online: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            counters: shootdown::Counters::new(),
            mailbox: shootdown::Mailbox::new(),
            job: Mutex::new(None),
            job_pending: AtomicBool::new(false),
            job_result: Mutex::new(None),
            stack_guards: [const { AtomicU64::new(0) }; 4],
            stack_tops: [const { AtomicU64::new(0) }; 4],
            tables: UnsafeCell::new(Tables {
                gdt: GlobalDescriptorTable::new(),
                tss: TaskStateSegment::new(),
                idt: interrupts::Idt::new(),
            }),
        }
    }

    /// This CPU's TSS.RSP0 field: the stack the CPU switches to when an
    /// interrupt arrives from ring 3. Only the task door writes it, on its
    /// own CPU (see `task`).
    pub fn rsp0_slot(&self) -> *mut u64 {
        // SAFETY: only the address is taken (no reference is created);
        // the TSS lives in the static CPUS for the kernel's life.
        unsafe { core::ptr::addr_of_mut!((*self.tables.get()).tss.privilege_stack_table[0]).cast() }
    }

    /// Index of this CPU (0 = bootstrap CPU; order of the MADT).
    pub fn index(&self) -> usize {
        self.index.load(Ordering::Relaxed)
    }

    /// Local APIC id.
    pub fn apic_id(&self) -> u32 {
        self.apic_id.load(Ordering::Relaxed)
    }

    /// True once the CPU finished its bring-up.
    pub fn is_online(&self) -> bool {
        self.online.load(Ordering::Acquire)
    }

    /// The unmapped guard page below this CPU's `kind` stack and one past
    /// the stack's top; `None` before [`prepare_stacks`].
    pub fn stack(&self, kind: StackKind) -> Option<(VirtAddr, VirtAddr)> {
        let guard = self.stack_guards[kind as usize].load(Ordering::Acquire);
        let top = self.stack_tops[kind as usize].load(Ordering::Acquire);
        (top != 0).then(|| (VirtAddr::new(guard), VirtAddr::new(top)))
    }
}

static CPUS: [Cpu; MAX_CPUS] = [const { Cpu::new() }; MAX_CPUS];
static COUNT: AtomicUsize = AtomicUsize::new(0);

/// Registers the CPUs the firmware lists (bootstrap CPU first), by APIC id.
/// Extra CPUs beyond [`MAX_CPUS`] are ignored; returns how many were kept.
pub fn set_cpus(apic_ids: &[u32]) -> usize {
    let n = apic_ids.len().min(MAX_CPUS);
    for (i, &id) in apic_ids[..n].iter().enumerate() {
        CPUS[i].index.store(i, Ordering::Relaxed);
        CPUS[i].apic_id.store(id, Ordering::Relaxed);
    }
    COUNT.store(n, Ordering::Release);
    n
}

/// Number of CPUs listed by the firmware (and kept).
pub fn count() -> usize {
    COUNT.load(Ordering::Acquire)
}

/// Number of CPUs that finished their bring-up.
pub fn online_count() -> usize {
    CPUS[..count()].iter().filter(|c| c.is_online()).count()
}

/// The per-CPU entry of CPU `index`.
pub fn get(index: usize) -> &'static Cpu {
    &CPUS[index]
}

/// The index of the CPU with `apic_id`, if listed.
pub fn index_of_apic(apic_id: u32) -> Option<usize> {
    CPUS[..count()].iter().position(|c| c.apic_id() == apic_id)
}

/// The running CPU's entry.
///
/// Panics (with a report naming the cause) if the calling CPU has not run
/// [`init_this_cpu`] yet; if its GS base is still the reset value 0 the
/// load hits the unmapped null page and faults with a report instead.
pub fn current() -> &'static Cpu {
    let ptr: u64;
    // SAFETY: reads the 8 bytes at GS base. `init_this_cpu` points GS base
    // at this CPU's entry of CPUS, whose first field holds its own address;
    // nothing else in the kernel writes GS base. Before that, GS base is
    // its reset value 0 and the load faults on the unmapped null page (a
    // fault report, not a bad value). The asm touches no Rust-visible state
    // besides the output register.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) ptr, options(nostack, readonly, preserves_flags));
    }
    let first = CPUS.as_ptr() as u64;
    let size = core::mem::size_of::<Cpu>() as u64;
    let offset = ptr.wrapping_sub(first);
    assert!(
        offset < size * MAX_CPUS as u64 && offset.is_multiple_of(size),
        "per-CPU data used before init_this_cpu on this CPU (gs:[0] = {ptr:#x})"
    );
    &CPUS[(offset / size) as usize]
}

/// The running CPU's index if the per-CPU data is set up yet (for fault
/// reports, which may come before).
pub fn current_index_checked() -> Option<usize> {
    let gs = GsBase::read().as_u64();
    let first = CPUS.as_ptr() as u64;
    let size = core::mem::size_of::<Cpu>() as u64;
    (gs >= first && gs < first + size * MAX_CPUS as u64).then(|| ((gs - first) / size) as usize)
}

/// Allocates a stack of `frames` 4 KiB frames plus one guard frame below
/// it, unmaps the guard (see [`paging::unmap_page`]) and returns (guard,
/// top). The guard frame is retired: never handed out or freed again.
fn guarded_stack(frames: u64) -> Result<(VirtAddr, VirtAddr), frames::FrameError> {
    let first = frames::alloc_contiguous(frames + 1)?;
    let guard = VirtAddr::new(first.start_address().as_u64());
    paging::unmap_page(guard)?;
    frames::retire(first);
    Ok((guard, guard + (frames + 1) * frames::FRAME_SIZE))
}

/// Allocates a kernel stack of [`STACK_FRAMES`] frames, with an unmapped
/// guard page below it; returns its top. [`prepare_stacks`] uses it for the
/// application processors (and records the guard for fault reports).
pub fn alloc_stack() -> Result<VirtAddr, frames::FrameError> {
    guarded_stack(STACK_FRAMES).map(|(_, top)| top)
}

/// Allocates CPU `index`'s stacks, each with an unmapped guard page below:
/// its kernel stack (CPU 0 keeps the boot stack, whose guard
/// [`paging::init`] unmapped) and its #DF, NMI and #MC IST stacks; records
/// them for [`init_this_cpu`], [`Cpu::stack`] and [`stack_guard_owner`].
/// Returns the kernel stack's top.
///
/// The bootstrap CPU calls this for every CPU before starting the others:
/// unmapping a page waits for every online CPU to flush it, which a CPU
/// still in its bring-up (interrupts off) would not do.
pub fn prepare_stacks(index: usize) -> Result<VirtAddr, frames::FrameError> {
    let cpu = &CPUS[index];
    for kind in StackKind::ALL {
        let (guard, top) = if kind == StackKind::Kernel && index == 0 {
            let top = crate::boot::boot_stack_top();
            (crate::boot::boot_stack_guard(), top)
        } else if kind == StackKind::Kernel {
            let top = alloc_stack()?;
            (top - (STACK_FRAMES + 1) * frames::FRAME_SIZE, top)
        } else {
            guarded_stack(kind.frames())?
        };
        cpu.stack_guards[kind as usize].store(guard.as_u64(), Ordering::Relaxed);
        cpu.stack_tops[kind as usize].store(top.as_u64(), Ordering::Release);
    }
    Ok(VirtAddr::new(
        cpu.stack_tops[StackKind::Kernel as usize].load(Ordering::Acquire),
    ))
}

/// The CPU and stack whose guard page holds `addr`, if any (for fault
/// reports: a fault there is a stack overflow).
pub fn stack_guard_owner(addr: u64) -> Option<(usize, StackKind)> {
    let page = addr & !(frames::FRAME_SIZE - 1);
    (0..count()).find_map(|i| {
        StackKind::ALL.into_iter().find_map(|kind| {
            let guard = CPUS[i].stack_guards[kind as usize].load(Ordering::Relaxed);
            (guard != 0 && guard == page).then_some((i, kind))
        })
    })
}

/// Sets up the calling CPU (index `index`): GS base, GDT with its TSS and
/// IST stacks, IDT, local APIC. Interrupts stay disabled.
///
/// # Safety
/// Call once per CPU, on that CPU, with `index` its own index, before any
/// other code on it uses per-CPU data.
pub unsafe fn init_this_cpu(index: usize) -> Result<(), frames::FrameError> {
    let cpu = &CPUS[index];
    cpu.self_ptr
        .store(cpu as *const Cpu as u64, Ordering::Relaxed);
    GsBase::write(VirtAddr::new(cpu as *const Cpu as u64));
    if cpu.stack(StackKind::DoubleFault).is_none() {
        // The bootstrap CPU, before any other runs (see `prepare_stacks`).
        prepare_stacks(index)?;
    }
    let ist = |kind| {
        cpu.stack(kind)
            .expect("prepare_stacks records every stack")
            .1
    };
    // SAFETY: the caller promises this runs once, on CPU `index` itself,
    // before the tables are loaded; no other code reads or writes a CPU's
    // tables (see `Sync`), so this is the only reference to them.
    let tables = unsafe { &mut *cpu.tables.get() };
    tables.tss.interrupt_stack_table[(IST_DOUBLE_FAULT - 1) as usize] = ist(StackKind::DoubleFault);
    tables.tss.interrupt_stack_table[(IST_NMI - 1) as usize] = ist(StackKind::Nmi);
    tables.tss.interrupt_stack_table[(IST_MACHINE_CHECK - 1) as usize] =
        ist(StackKind::MachineCheck);
    let code = tables.gdt.append(Descriptor::kernel_code_segment());
    let data = tables.gdt.append(Descriptor::kernel_data_segment());
    // The IDT gates name the kernel code segment as selector 0x08.
    assert_eq!(code.0, 0x08, "kernel code selector is not 0x08");
    // SAFETY: the descriptor points at this CPU's TSS, which lives in the
    // static CPUS (never moved or freed) for as long as TR uses it.
    let tss = tables
        .gdt
        .append(unsafe { Descriptor::tss_segment_unchecked(&tables.tss) });
    // Ring-3 server tasks (see `task`): user data, then user code.
    let user_data = tables.gdt.append(Descriptor::user_data_segment());
    let user_code = tables.gdt.append(Descriptor::user_code_segment());
    assert_eq!(
        (user_data.0 as u64, user_code.0 as u64),
        (
            crate::task::USER_DATA_SELECTOR,
            crate::task::USER_CODE_SELECTOR
        ),
        "user selectors are not where the task door expects them"
    );
    tables.idt.fill();
    // SAFETY: the GDT, TSS and IDT live in the static CPUS for the kernel's
    // lifetime and are not written after this. `code` and `data` are the
    // flat 64-bit kernel segments just appended to this GDT (so the running
    // code and stack stay addressable), `tss` is a fresh, not busy TSS
    // descriptor whose IST entries are mapped stacks, and every IDT gate
    // uses selector 0x08 = `code` (checked above).
    unsafe {
        tables.gdt.load_unsafe();
        CS::set_reg(code);
        SS::set_reg(data);
        DS::set_reg(data);
        ES::set_reg(data);
        load_tss(tss);
        tables.idt.load();
    }
    apic::enable();
    Ok(())
}

/// Marks the calling CPU online.
pub fn set_online() {
    current().online.store(true, Ordering::Release);
}
