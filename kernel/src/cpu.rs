//! Per-CPU data (found through the GS base), CPU sets, and each CPU's own GDT, TSS and IDT.

use crate::{apic, frames, interrupts, shootdown};
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
/// Kernel stack of an application processor, in 4 KiB frames.
pub const STACK_FRAMES: u64 = 16;
/// Each IST stack (#DF, NMI, #MC), in 4 KiB frames.
pub const IST_FRAMES: u64 = 4;
/// IST slot (1-based, as in the IDT gate) of the double-fault stack.
pub const IST_DOUBLE_FAULT: u8 = 1;
/// IST slot of the NMI stack.
pub const IST_NMI: u8 = 2;
/// IST slot of the machine-check stack.
pub const IST_MACHINE_CHECK: u8 = 3;

/// A set of CPUs by index (bit i = CPU i). Same layout as `abi::CpuSet`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuSet(pub u64);

impl CpuSet {
    /// No CPU.
    pub const EMPTY: CpuSet = CpuSet(0);

    /// Only CPU `i`.
    pub const fn only(i: usize) -> CpuSet {
        CpuSet(1 << i)
    }

    /// Every CPU listed by the firmware.
    pub fn all() -> CpuSet {
        CpuSet(mask_below(count()))
    }

    /// Every CPU listed by the firmware except the calling one.
    pub fn all_but_self() -> CpuSet {
        Self::all().without(current().index())
    }

    /// This set plus CPU `i`.
    pub const fn with(self, i: usize) -> CpuSet {
        CpuSet(self.0 | 1 << i)
    }

    /// This set minus CPU `i`.
    pub const fn without(self, i: usize) -> CpuSet {
        CpuSet(self.0 & !(1 << i))
    }

    /// True when CPU `i` is in the set.
    pub const fn contains(self, i: usize) -> bool {
        i < MAX_CPUS && self.0 & (1 << i) != 0
    }

    /// True when the set is empty.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Number of CPUs in the set.
    pub const fn len(self) -> u32 {
        self.0.count_ones()
    }

    /// The CPU indices in the set, ascending.
    pub fn iter(self) -> impl Iterator<Item = usize> {
        let mut bits = self.0;
        core::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            Some(i)
        })
    }
}

fn mask_below(n: usize) -> u64 {
    if n >= 64 {
        u64::MAX
    } else {
        (1 << n) - 1
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
    tables: UnsafeCell<Tables>,
}

// SAFETY: all fields but `tables` are atomics or locks; `tables` is written
// only by the owning CPU in `init_this_cpu`, before the CPU loads them, and
// never touched again by software (the CPU reads them through GDTR/IDTR/TR).
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
            tables: UnsafeCell::new(Tables {
                gdt: GlobalDescriptorTable::new(),
                tss: TaskStateSegment::new(),
                idt: interrupts::Idt::new(),
            }),
        }
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

/// The running CPU's entry (valid after [`init_this_cpu`]).
pub fn current() -> &'static Cpu {
    let ptr: u64;
    // SAFETY: after `init_this_cpu`, GS base points at this CPU's entry of
    // CPUS, whose first field holds its own address.
    unsafe {
        core::arch::asm!("mov {}, gs:[0]", out(reg) ptr, options(nostack, readonly, preserves_flags));
        &*(ptr as *const Cpu)
    }
}

/// The running CPU's index if the per-CPU data is set up yet (for fault
/// reports, which may come before).
pub fn current_index_checked() -> Option<usize> {
    let gs = GsBase::read().as_u64();
    let first = CPUS.as_ptr() as u64;
    let size = core::mem::size_of::<Cpu>() as u64;
    (gs >= first && gs < first + size * MAX_CPUS as u64).then(|| ((gs - first) / size) as usize)
}

fn stack_top(frames: u64) -> Result<VirtAddr, frames::FrameError> {
    let first = frames::alloc_contiguous(frames)?;
    Ok(VirtAddr::new(
        first.start_address().as_u64() + frames * frames::FRAME_SIZE,
    ))
}

/// Allocates a kernel stack for an application processor; returns its top.
pub fn alloc_stack() -> Result<VirtAddr, frames::FrameError> {
    stack_top(STACK_FRAMES)
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
    // SAFETY: only this CPU touches its tables, and only here (see `Sync`).
    let tables = unsafe { &mut *cpu.tables.get() };
    tables.tss.interrupt_stack_table[(IST_DOUBLE_FAULT - 1) as usize] = stack_top(IST_FRAMES)?;
    tables.tss.interrupt_stack_table[(IST_NMI - 1) as usize] = stack_top(IST_FRAMES)?;
    tables.tss.interrupt_stack_table[(IST_MACHINE_CHECK - 1) as usize] = stack_top(IST_FRAMES)?;
    let code = tables.gdt.append(Descriptor::kernel_code_segment());
    let data = tables.gdt.append(Descriptor::kernel_data_segment());
    // SAFETY: the TSS lives in a static and is never moved or freed.
    let tss = tables
        .gdt
        .append(unsafe { Descriptor::tss_segment_unchecked(&tables.tss) });
    tables.idt.fill();
    // SAFETY: the GDT and IDT live in a static for the kernel's lifetime;
    // the selectors were just appended to this GDT.
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
