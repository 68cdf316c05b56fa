//! In-image self-tests: a static list of `(name, fn)`, run by the command-line word `test`.
//!
//! Output: one `test <name> ... ok` or `test <name> ... FAILED: <why>` line
//! per test, then `umbra: selftest: N passed, M failed`, then the run ends
//! with the success or failure exit code. To add a test, write a
//! `fn() -> Result<(), &'static str>` and add one line to [`TESTS`]. Tests
//! run on the bootstrap CPU with every CPU online; [`smp::run_on`] runs code
//! on all of them at once.

use crate::cpu::{self, CpuSet, CpuSetExt, StackKind};
use crate::frames::{FrameError, FrameSet, FRAME_SIZE};
use crate::shootdown::{FlushRequest, Reason, Scope, Space};
use crate::{apic, boot, frames, kprintln, paging, qemu, shootdown, smp};
use alloc::boxed::Box;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};
use x86_64::structures::paging::PhysFrame;
use x86_64::{PhysAddr, VirtAddr};

/// A self-test: `Err` says what was wrong.
pub type Test = fn() -> Result<(), &'static str>;

/// Every in-image test, in run order.
pub static TESTS: &[(&str, Test)] = &[
    ("frames_exhaustion_reported", frames_exhaustion_reported),
    ("frames_double_free_refused", frames_double_free_refused),
    ("frames_foreign_free_refused", frames_foreign_free_refused),
    ("frames_contiguous_runs", frames_contiguous_runs),
    ("frames_kernel_allocator", frames_kernel_allocator),
    ("frames_alloc_zeroed", frames_alloc_zeroed),
    ("heap_alloc_and_free", heap_alloc_and_free),
    ("cmdline_words", cmdline_words),
    ("null_page_unmapped", null_page_unmapped),
    (
        "guard_pages_below_every_stack",
        guard_pages_below_every_stack,
    ),
    (
        "cpus_run_on_their_guarded_stacks",
        cpus_run_on_their_guarded_stacks,
    ),
    (
        "cpuset_is_abi_with_index_helpers",
        cpuset_is_abi_with_index_helpers,
    ),
    ("percpu_data_on_every_cpu", percpu_data_on_every_cpu),
    ("percpu_slots_on_every_cpu", percpu_slots_on_every_cpu),
    ("timer_ticks_on_every_cpu", timer_ticks_on_every_cpu),
    ("shootdown_one_to_all", shootdown_one_to_all),
    (
        "shootdown_guest_space_recorded",
        shootdown_guest_space_recorded,
    ),
    ("shootdown_all_cpus_1000_each", shootdown_all_cpus_1000_each),
    (
        "shootdown_all_cpus_interrupts_off",
        shootdown_all_cpus_interrupts_off,
    ),
];

/// Runs every test in [`TESTS`], prints the summary and ends the run.
pub fn run_all() -> ! {
    let (mut passed, mut failed) = (0, 0);
    for (name, test) in TESTS {
        match test() {
            Ok(()) => {
                passed += 1;
                kprintln!("test {name} ... ok");
            }
            Err(why) => {
                failed += 1;
                kprintln!("test {name} ... FAILED: {why}");
            }
        }
    }
    kprintln!("umbra: selftest: {passed} passed, {failed} failed");
    qemu::exit(if failed == 0 {
        qemu::ExitCode::Success
    } else {
        qemu::ExitCode::Failure
    })
}

/// The expected-failure run (`test-fault`): the highest-numbered CPU writes
/// to an unmapped address; the fault report must end the run as failed.
pub fn fault_on_last_cpu() -> ! {
    let last = cpu::count() - 1;
    kprintln!("umbra: test-fault: cpu {last} writes to {FAULT_ADDR:#x}");
    smp::run_on(CpuSet::only(last), || {
        // SAFETY: a store through inline asm, not a Rust pointer write: it
        // targets FAULT_ADDR, which is canonical, above the identity-mapped
        // 4 GiB, unmapped and part of no Rust allocation. It either faults
        // (the intended outcome; the handler ends the run) or changes no
        // memory Rust code can see.
        unsafe {
            core::arch::asm!(
                "mov qword ptr [{a}], {v}",
                a = in(reg) FAULT_ADDR,
                v = in(reg) 0xBADu64,
                options(nostack, preserves_flags),
            );
        }
        Err("the write to an unmapped address did not fault")
    });
    kprintln!("umbra: test-fault: no fault happened");
    qemu::exit(qemu::ExitCode::Failure)
}

/// The expected-failure run `test-panic`: the highest-numbered CPU panics.
pub fn panic_on_last_cpu() -> ! {
    let last = cpu::count() - 1;
    smp::run_on(CpuSet::only(last), || {
        panic!("deliberate panic (test-panic)")
    });
    kprintln!("umbra: test-panic: no panic happened");
    qemu::exit(qemu::ExitCode::Failure)
}

/// The expected-failure run `test-triple-fault`: with an empty IDT, a
/// breakpoint escalates to a triple fault, which QEMU (`-no-reboot`) turns
/// into exit status 0; the runner must count that as a failure.
pub fn triple_fault() -> ! {
    let empty = x86_64::structures::DescriptorTablePointer {
        limit: 0,
        base: VirtAddr::zero(),
    };
    // SAFETY: with interrupts off, IDTR is pointed at an empty table and
    // `int3` raised: the breakpoint cannot be delivered (#GP), nor can that
    // (#DF), so the CPU shuts down and QEMU (`-no-reboot`) ends. No memory
    // is written and no code after this block runs.
    unsafe {
        x86_64::instructions::interrupts::disable();
        x86_64::instructions::tables::lidt(&empty);
        core::arch::asm!("int3");
    }
    qemu::exit(qemu::ExitCode::Failure)
}

/// The expected-failure run `test-hang`: never ends, so the runner's time
/// limit must end it.
pub fn hang() -> ! {
    kprintln!("umbra: test-hang: spinning with interrupts off");
    x86_64::instructions::interrupts::disable();
    loop {
        core::hint::spin_loop();
    }
}

/// The expected-failure run `test-stack-overflow`: the highest-numbered
/// CPU (an AP on its allocated stack, or with one CPU the bootstrap CPU on
/// the boot stack) recurses without end. The guard page below its stack
/// must turn that into `stack overflow on cpu N` and a failed run.
pub fn stack_overflow_on_last_cpu() -> ! {
    let last = cpu::count() - 1;
    kprintln!("umbra: test-stack-overflow: cpu {last} recurses until its stack overflows");
    let job: cpu::Job = || {
        let depth = recurse(0);
        kprintln!("umbra: test-stack-overflow: recursion returned at depth {depth}");
        Err("the recursion returned")
    };
    if last == 0 {
        let _ = job();
    } else {
        smp::run_on(CpuSet::only(last), job);
    }
    kprintln!("umbra: test-stack-overflow: no stack overflow was reported");
    qemu::exit(qemu::ExitCode::Failure)
}

/// Recurses with a 512-byte frame until `black_box` says stop (never: the
/// compiler cannot know, so neither the frames nor the calls go away).
#[inline(never)]
fn recurse(depth: u64) -> u64 {
    let frame = core::hint::black_box([depth; 64]);
    if core::hint::black_box(depth) == u64::MAX {
        return depth;
    }
    recurse(depth + 1) + frame[depth as usize % 64]
}

/// The expected-failure run `test-null`: the highest-numbered CPU reads
/// address 0; the unmapped null page must turn that into a `null pointer
/// dereference on cpu N` report and a failed run.
pub fn null_deref_on_last_cpu() -> ! {
    let last = cpu::count() - 1;
    kprintln!("umbra: test-null: cpu {last} reads address 0");
    let job: cpu::Job = || {
        let value: u64;
        // SAFETY: a load through inline asm, not a Rust pointer dereference,
        // so no Rust-level null-pointer rule applies; it reads 8 bytes at
        // address 0, touches no Rust-visible memory, and either faults (the
        // intended outcome, which ends the run) or yields a plain u64.
        unsafe {
            core::arch::asm!(
                "mov {v}, qword ptr [{a}]",
                a = in(reg) core::hint::black_box(0u64),
                v = out(reg) value,
                options(nostack, readonly, preserves_flags),
            );
        }
        kprintln!("umbra: test-null: address 0 held {value:#x}");
        Err("the read of address 0 did not fault")
    };
    if last == 0 {
        let _ = job();
    } else {
        smp::run_on(CpuSet::only(last), job);
    }
    kprintln!("umbra: test-null: no fault happened");
    qemu::exit(qemu::ExitCode::Failure)
}

/// The address `test-fault` writes to (canonical, not mapped).
pub const FAULT_ADDR: u64 = 0xDE_ADBE_E000;

fn check(cond: bool, why: &'static str) -> Result<(), &'static str> {
    if cond {
        Ok(())
    } else {
        Err(why)
    }
}

fn small_set() -> FrameSet<2> {
    // 128 frames managed; 100 usable, starting at frame 8.
    let mut set = FrameSet::<2>::new();
    set.add_region(PhysAddr::new(8 * FRAME_SIZE), 100 * FRAME_SIZE);
    set
}

fn frames_exhaustion_reported() -> Result<(), &'static str> {
    let mut set = small_set();
    check(set.free_frames() == 100, "expected 100 free frames")?;
    let mut got = Vec::new();
    for _ in 0..100 {
        got.push(
            set.alloc()
                .map_err(|_| "allocation failed before exhaustion")?,
        );
    }
    check(
        set.alloc() == Err(FrameError::Exhausted { wanted: 1, free: 0 }),
        "101st allocation was not reported as exhaustion",
    )?;
    got.sort();
    got.dedup();
    check(got.len() == 100, "a frame was handed out twice")?;
    check(
        got.iter()
            .all(|f| (8..108).contains(&(f.start_address().as_u64() / FRAME_SIZE))),
        "a frame outside the usable region was handed out",
    )?;
    set.free(got[50])
        .map_err(|_| "freeing an allocated frame failed")?;
    check(
        set.alloc() == Ok(got[50]),
        "a freed frame did not come back",
    )
}

fn frames_double_free_refused() -> Result<(), &'static str> {
    let mut set = small_set();
    let f = set.alloc().map_err(|_| "allocation failed")?;
    set.free(f).map_err(|_| "first free failed")?;
    check(
        set.free(f) == Err(FrameError::DoubleFree(f.start_address())),
        "second free of the same frame was not refused",
    )?;
    check(
        set.free_frames() == 100,
        "double free changed the free count",
    )
}

fn frames_foreign_free_refused() -> Result<(), &'static str> {
    let mut set = small_set();
    let inside_unusable = PhysFrame::containing_address(PhysAddr::new(2 * FRAME_SIZE));
    let beyond = PhysFrame::containing_address(PhysAddr::new(1 << 30));
    check(
        set.free(inside_unusable) == Err(FrameError::NotManaged(inside_unusable.start_address())),
        "freeing a frame outside the usable region was not refused",
    )?;
    check(
        set.free(beyond) == Err(FrameError::NotManaged(beyond.start_address())),
        "freeing a frame beyond the bitmap was not refused",
    )?;
    set.reserve(PhysAddr::new(8 * FRAME_SIZE), FRAME_SIZE);
    check(
        set.free_frames() == 99,
        "reserve did not take a free frame away",
    )
}

fn frames_contiguous_runs() -> Result<(), &'static str> {
    let mut set = small_set();
    let run = set
        .alloc_contiguous(70)
        .map_err(|_| "70-frame run not found")?;
    check(
        run.start_address().as_u64() == 8 * FRAME_SIZE,
        "first run not at the region start",
    )?;
    check(
        matches!(
            set.alloc_contiguous(31),
            Err(FrameError::Exhausted { wanted: 31, .. })
        ),
        "31 frames from 30 free were not refused",
    )?;
    // Punch a hole: free frames 20..30 of the run, then ask for 15.
    set.free_contiguous(run + 20, 10)
        .map_err(|_| "freeing part of a run failed")?;
    let big = set
        .alloc_contiguous(15)
        .map_err(|_| "15-frame run not found")?;
    check(
        big.start_address().as_u64() == 78 * FRAME_SIZE,
        "15-frame run did not skip the 10-frame hole",
    )?;
    let small = set
        .alloc_contiguous(10)
        .map_err(|_| "10-frame hole not reused")?;
    check(small == run + 20, "10-frame run not placed in the hole")
}

fn frames_kernel_allocator() -> Result<(), &'static str> {
    let before = frames::free_frames();
    let a = frames::alloc().map_err(|_| "kernel allocator is empty")?;
    let b = frames::alloc().map_err(|_| "kernel allocator is empty")?;
    check(a != b, "the same frame was handed out twice")?;
    check(
        a.start_address().as_u64() >= 1 << 20,
        "a frame below 1 MiB was handed out",
    )?;
    let (img_start, img_end) = boot::image_span();
    check(
        !(img_start..img_end).contains(&a.start_address()),
        "a frame inside the kernel image was handed out",
    )?;
    frames::free(a).map_err(|_| "free failed")?;
    check(
        frames::free(a) == Err(FrameError::DoubleFree(a.start_address())),
        "double free was not refused",
    )?;
    frames::free(b).map_err(|_| "free failed")?;
    check(frames::free_frames() == before, "free count did not return")
}

fn frames_alloc_zeroed() -> Result<(), &'static str> {
    let f = frames::alloc().map_err(|_| "kernel allocator is empty")?;
    let ptr = f.start_address().as_u64() as usize as *mut u8;
    // SAFETY: the frame is ours until freed and identity-mapped.
    unsafe { core::ptr::write_bytes(ptr, 0xEE, FRAME_SIZE as usize) };
    frames::free(f).map_err(|_| "free failed")?;
    let z = frames::alloc_zeroed().map_err(|_| "kernel allocator is empty")?;
    let ptr = z.start_address().as_u64() as usize as *const u8;
    // SAFETY: as above; the frame is read only while we own it.
    let zeroed = unsafe { core::slice::from_raw_parts(ptr, FRAME_SIZE as usize) }
        .iter()
        .all(|&b| b == 0);
    frames::free(z).map_err(|_| "free failed")?;
    check(zeroed, "alloc_zeroed returned a frame with non-zero bytes")
}

fn heap_alloc_and_free() -> Result<(), &'static str> {
    let v: Vec<u64> = (0..100_000).collect();
    check(
        v.iter().sum::<u64>() == 4_999_950_000,
        "vector contents wrong",
    )?;
    let big = alloc::vec![0xA5u8; 4 << 20];
    check(
        big.iter().all(|&b| b == 0xA5),
        "4 MiB buffer contents wrong",
    )?;
    drop(big);
    let again = alloc::vec![0x5Au8; 4 << 20];
    check(
        again[(4 << 20) - 1] == 0x5A,
        "reallocated buffer contents wrong",
    )?;
    let b = Box::new([7u32; 1024]);
    check(b.iter().all(|&x| x == 7), "boxed array contents wrong")
}

fn cmdline_words() -> Result<(), &'static str> {
    let line = "test --mmu reference smp=8";
    check(boot::has_arg(line, "test"), "has_arg missed a word")?;
    let known: &[&str] = &["test", "mmu=", "svm-test"];
    check(
        boot::check_cmdline("test mmu=reference svm-test", &[known]).is_ok(),
        "check_cmdline refused known words",
    )?;
    check(
        boot::check_cmdline("test mmu=a bogus", &[known])
            == Err(boot::CmdlineError::Unknown("bogus")),
        "check_cmdline took an unknown word",
    )?;
    check(
        boot::check_cmdline("mmu=a mmu=b", &[known]) == Err(boot::CmdlineError::Twice("mmu")),
        "check_cmdline took a key twice",
    )?;
    check(
        boot::check_cmdline("test=1", &[known]) == Err(boot::CmdlineError::Unknown("test=1")),
        "check_cmdline took a value for a flag",
    )?;
    check(!boot::has_arg(line, "tes"), "has_arg matched a prefix")?;
    check(
        boot::arg_value(line, "--mmu") == Some("reference"),
        "arg_value missed `key value`",
    )?;
    check(
        boot::arg_value(line, "smp") == Some("8"),
        "arg_value missed `key=value`",
    )?;
    check(
        boot::arg_value(line, "x").is_none(),
        "arg_value invented a value",
    )
}

fn null_page_unmapped() -> Result<(), &'static str> {
    check(
        !paging::is_mapped(VirtAddr::zero()),
        "address 0 is mapped: a null dereference would not fault",
    )?;
    check(
        !paging::is_mapped(VirtAddr::new(0xFFF)),
        "the last byte of the null page is mapped",
    )?;
    // Only the null page: the rest of the low 2 MiB stays identity-mapped
    // (the AP trampoline runs at 0x8000).
    for a in [0x1000u64, 0x8000, 0x1F_F000] {
        check(
            paging::translate(VirtAddr::new(a)) == Some(PhysAddr::new(a)),
            "a page next to the null page lost its identity mapping",
        )?;
    }
    Ok(())
}

fn guard_pages_below_every_stack() -> Result<(), &'static str> {
    for i in 0..cpu::count() {
        let c = cpu::get(i);
        for kind in StackKind::ALL {
            let (guard, top) = c.stack(kind).ok_or("a CPU's stack was never prepared")?;
            let frames = match kind {
                StackKind::Kernel if i == 0 => boot::BOOT_STACK_FRAMES,
                StackKind::Kernel => cpu::STACK_FRAMES,
                _ => cpu::IST_FRAMES,
            };
            check(
                top - guard == (frames + 1) * FRAME_SIZE,
                "a stack's guard page is not right below the stack",
            )?;
            check(!paging::is_mapped(guard), "a stack's guard page is mapped")?;
            check(
                !paging::is_mapped(guard + (FRAME_SIZE - 8)),
                "the top of a stack's guard page is mapped",
            )?;
            for a in [guard - FRAME_SIZE, guard + FRAME_SIZE, top - 8u64] {
                check(
                    paging::translate(a) == Some(PhysAddr::new(a.as_u64())),
                    "a page next to a guard page lost its identity mapping",
                )?;
            }
            let frame = PhysFrame::containing_address(PhysAddr::new(guard.as_u64()));
            check(
                !matches!(frames::free(frame), Ok(()) | Err(FrameError::DoubleFree(_))),
                "a guard page's frame could be freed (and handed out unmapped)",
            )?;
            check(
                cpu::stack_guard_owner(guard.as_u64() + 0x123) == Some((i, kind)),
                "the fault report would not name a guard page's CPU and stack",
            )?;
        }
        // The IST slots in the TSS are the recorded (guarded) stacks.
        check(
            c.stack(StackKind::DoubleFault) != c.stack(StackKind::Nmi),
            "two IST stacks share a guard page",
        )?;
    }
    check(
        cpu::stack_guard_owner(0x1000).is_none(),
        "an ordinary page was taken for a guard page",
    )
}

fn cpus_run_on_their_guarded_stacks() -> Result<(), &'static str> {
    all_ok(&smp::run_on(CpuSet::all(), || {
        let rsp: u64;
        // SAFETY: copies RSP into a register; no memory is touched.
        unsafe {
            core::arch::asm!("mov {}, rsp", out(reg) rsp, options(nomem, nostack, preserves_flags))
        };
        let me = cpu::current();
        let (guard, top) = me
            .stack(StackKind::Kernel)
            .ok_or("the running CPU has no recorded kernel stack")?;
        check(
            rsp > guard.as_u64() + FRAME_SIZE && rsp <= top.as_u64(),
            "a CPU runs on a stack other than its guarded kernel stack",
        )
    }))
}

fn cpuset_is_abi_with_index_helpers() -> Result<(), &'static str> {
    let n = cpu::count();
    let set: abi::CpuSet = CpuSet::all();
    check(
        set.len() as usize == n,
        "CpuSet::all() does not hold every CPU",
    )?;
    check(
        set == abi::CpuSet::first(n as u32),
        "CpuSet::all() differs from abi's first(count)",
    )?;
    check(
        CpuSet::all_but_self().len() as usize == n - 1
            && !CpuSet::all_but_self().has(cpu::current().index()),
        "all_but_self() holds the caller or misses another CPU",
    )?;
    let s = CpuSet::only(5).with(63).with(64).without(5).with(2);
    check(
        s == CpuSet((1 << 63) | (1 << 2)),
        "only/with/without gave the wrong bits",
    )?;
    check(
        s.has(63) && s.has(2) && !s.has(5) && !s.has(64) && !s.has(usize::MAX),
        "has() is wrong (an index >= 64 must never be in a set)",
    )?;
    check(CpuSet::only(64).is_empty(), "only(64) is not empty")?;
    let mut it = s.indices();
    check(
        it.next() == Some(2) && it.next() == Some(63) && it.next().is_none(),
        "indices() did not list 2 and 63 in order",
    )
}

fn all_ok(results: &[Option<Result<(), &'static str>>; cpu::MAX_CPUS]) -> Result<(), &'static str> {
    for result in &results[..cpu::count()] {
        match result {
            Some(Ok(())) => {}
            Some(Err(why)) => return Err(*why),
            None => return Err("a CPU did not run the job"),
        }
    }
    Ok(())
}

fn percpu_data_on_every_cpu() -> Result<(), &'static str> {
    all_ok(&smp::run_on(CpuSet::all(), || {
        let me = cpu::current();
        check(
            me.apic_id() == apic::id(),
            "per-CPU APIC id differs from the LAPIC's",
        )?;
        check(
            cpu::current_index_checked() == Some(me.index()),
            "GS base does not point at this CPU's entry",
        )?;
        check(me.is_online(), "running CPU not marked online")
    }))
}

static SLOTS: cpu::PerCpu<AtomicUsize> =
    cpu::PerCpu::new([const { AtomicUsize::new(usize::MAX) }; cpu::MAX_CPUS]);

fn percpu_slots_on_every_cpu() -> Result<(), &'static str> {
    all_ok(&smp::run_on(CpuSet::all(), || {
        SLOTS
            .this()
            .store(cpu::current().index(), Ordering::Relaxed);
        Ok(())
    }))?;
    check(
        (0..cpu::count()).all(|i| SLOTS.of(i).load(Ordering::Relaxed) == i),
        "a CPU's PerCpu slot does not hold its own index",
    )
}

fn timer_ticks_on_every_cpu() -> Result<(), &'static str> {
    all_ok(&smp::run_on(CpuSet::all(), || {
        let me = cpu::current();
        let before = me.ticks.load(Ordering::Relaxed);
        apic::delay_us(200_000); // 20 periods at 100 Hz
        let ticks = me.ticks.load(Ordering::Relaxed) - before;
        // A descheduled vCPU thread merges periods (busy host), so only
        // "running" and "not grossly too fast" are checked.
        check(ticks >= 1, "no timer tick in 200 ms")?;
        check(ticks <= 40, "more than 40 timer ticks in 200 ms at 100 Hz")
    }))
}

fn shootdown_one_to_all() -> Result<(), &'static str> {
    let before = shootdown::totals();
    let n = cpu::count() as u64;
    FlushRequest::new(
        CpuSet::all(),
        Space::Host,
        Scope::Range {
            start: VirtAddr::new(0x20_0000),
            pages: 4,
        },
        Reason::SelfTest,
    )
    .execute();
    let after = shootdown::totals();
    check(
        after.ipis_sent - before.ipis_sent == n - 1,
        "IPIs sent != other CPUs",
    )?;
    check(
        after.flushes_done - before.flushes_done == n - 1,
        "remote flushes != other CPUs",
    )?;
    check(
        after.local_flushes - before.local_flushes == 1,
        "the sender did not flush itself",
    )
}

fn shootdown_guest_space_recorded() -> Result<(), &'static str> {
    all_ok(&smp::run_on(CpuSet::all(), || {
        shootdown::take_guest_flushes();
        Ok(())
    }))?;
    FlushRequest::new(
        CpuSet::all(),
        Space::Guest { asid: 3 },
        Scope::All,
        Reason::SelfTest,
    )
    .execute();
    all_ok(&smp::run_on(CpuSet::all(), || {
        check(
            shootdown::take_guest_flushes() == 1 << 3,
            "guest ASID 3 flush not recorded on a CPU",
        )?;
        check(
            shootdown::take_guest_flushes() == 0,
            "guest flush mask not cleared by take",
        )
    }))
}

const STRESS_ROUNDS: u64 = 1000;

fn stress(rounds: u64, interrupts_off: bool) -> Result<(), &'static str> {
    let n = cpu::count() as u64;
    let before: Vec<_> = (0..n as usize)
        .map(|i| cpu::get(i).counters.snapshot())
        .collect();
    let job: cpu::Job = if interrupts_off {
        || x86_64::instructions::interrupts::without_interrupts(|| stress_job(STRESS_ROUNDS / 4))
    } else {
        || stress_job(STRESS_ROUNDS)
    };
    all_ok(&smp::run_on(CpuSet::all(), job))?;
    for (i, b) in before.iter().enumerate() {
        let a = cpu::get(i).counters.snapshot();
        check(
            a.ipis_sent - b.ipis_sent == rounds * (n - 1),
            "a CPU's IPIs sent != rounds x other CPUs",
        )?;
        check(
            a.flushes_done - b.flushes_done == rounds * (n - 1),
            "a CPU's flushes done != rounds x other CPUs",
        )?;
        let waits = if n > 1 { rounds } else { 0 };
        check(a.waits - b.waits == waits, "a CPU's waits != rounds")?;
    }
    Ok(())
}

fn stress_job(rounds: u64) -> Result<(), &'static str> {
    let me = cpu::current().index() as u64;
    for r in 0..rounds {
        let scope = match r % 3 {
            0 => Scope::Page(VirtAddr::new(0x40_0000 + me * 4096)),
            1 => Scope::Range {
                start: VirtAddr::new(0x80_0000),
                pages: 8,
            },
            _ => Scope::All,
        };
        FlushRequest::new(CpuSet::all_but_self(), Space::Host, scope, Reason::SelfTest).execute();
    }
    Ok(())
}

fn shootdown_all_cpus_1000_each() -> Result<(), &'static str> {
    stress(STRESS_ROUNDS, false)
}

fn shootdown_all_cpus_interrupts_off() -> Result<(), &'static str> {
    stress(STRESS_ROUNDS / 4, true)
}
