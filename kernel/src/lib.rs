//! Umbra's ring-0 kernel: boot, CPUs, physical frames, IPIs and TLB shootdown.
//!
//! # Principles
//! - Mechanism only. The kernel starts CPUs, hands out frames, moves
//!   interrupts and flushes TLBs when told to. What a guest may map, which
//!   vCPU runs where, and when a flush is needed are decided by servers,
//!   which run as ring-3 tasks in address spaces of their own ([`task`]).
//! - A server's failure is the server's: an exception, a panic or a hang
//!   in ring 3 stops that server and the domains it served, never the
//!   kernel.
//! - Simple and clear over fast and clever: bitmaps over trees, one request
//!   slot per CPU over queues, fixed-size tables over growth, busy-waiting
//!   over scheduling where the wait is short and bounded.
//! - One shape per mechanism: every interrupt enters through the same stub
//!   and [`interrupts`]' dispatch; every TLB flush is a
//!   [`shootdown::FlushRequest`] with a closed [`shootdown::Reason`].
//! - The kernel's own failures are loud and final: a CPU exception in
//!   ring 0 or a panic prints what and
//!   where (vector, error code, RIP, CR2, CPU) and ends the run with the
//!   failure exit code. Errors that callers can handle are values
//!   (frame exhaustion, double free), never panics.
//! - Every `unsafe` block says why it is sound.
//!
//! Boot order: [`boot`] (Multiboot stub, long mode) -> [`serial`] ->
//! [`frames`] and [`heap`] -> [`madt`] -> [`paging`] (null page and boot
//! stack guard unmapped) -> [`cpu`] (GDT/TSS/IDT/per-CPU) ->
//! [`smp`] (APs, with [`apic`] timer calibration) -> self-tests -> the
//! image's `umbra_image_main` (servers, guests, report) -> done.
//! The command line (QEMU `-append`), checked word by word first (unknown
//! words and repeated keys stop the boot), selects: `test` runs [`selftest`];
//! `test-fault`, `test-panic`, `test-triple-fault`, `test-hang`,
//! `test-stack-overflow` and `test-null` are the expected-failure boots the
//! runner checks.
#![cfg_attr(target_os = "none", no_std)]

#[cfg(target_os = "none")]
extern crate alloc;

#[cfg(target_os = "none")]
pub mod apic;
#[cfg(target_os = "none")]
pub mod boot;
#[cfg(target_os = "none")]
pub mod cpu;
#[cfg(target_os = "none")]
pub mod frames;
#[cfg(target_os = "none")]
pub mod heap;
#[cfg(target_os = "none")]
pub mod interrupts;
#[cfg(target_os = "none")]
pub mod madt;
#[cfg(target_os = "none")]
pub mod paging;
#[cfg(target_os = "none")]
pub mod qemu;
#[cfg(target_os = "none")]
pub mod selftest;
#[cfg(target_os = "none")]
pub mod serial;
#[cfg(target_os = "none")]
pub mod shootdown;
#[cfg(target_os = "none")]
pub mod smp;
#[cfg(target_os = "none")]
pub mod svm;
#[cfg(target_os = "none")]
pub mod task;

#[cfg(target_os = "none")]
static CMDLINE: spin::Once<([u8; boot::MAX_CMDLINE], usize)> = spin::Once::new();

static MODULES: spin::Once<heapless::Vec<boot::Module, { boot::MAX_MODULES }>> = spin::Once::new();

/// The boot modules (QEMU `-initrd`), in order; their bytes are reserved
/// from the frame allocator for the kernel's life.
pub fn modules() -> &'static [boot::Module] {
    MODULES.get().map_or(&[], |m| m.as_slice())
}

/// The kernel command line (QEMU `-append`), available after boot.
#[cfg(target_os = "none")]
pub fn cmdline() -> &'static str {
    CMDLINE
        .get()
        .and_then(|(buf, len)| core::str::from_utf8(&buf[..*len]).ok())
        .unwrap_or("")
}

/// Entered from the boot stub on the bootstrap CPU, in long mode.
#[cfg(target_os = "none")]
#[no_mangle]
extern "C" fn kernel_main(magic: u32, info: u32) -> ! {
    use qemu::{exit, ExitCode};
    serial::init();
    // SAFETY: `magic` and `info` are EAX and EBX as the loader left them;
    // nothing has been allocated yet, so its structures are intact.
    let boot = match unsafe { boot::parse_multiboot(magic, info) } {
        Ok(b) => b,
        Err(e) => {
            kprintln!("umbra: unusable boot information: {e:?}");
            exit(ExitCode::Failure)
        }
    };
    // Multiboot loaders (QEMU, GRUB) put the image's path first: drop it.
    let line = boot.cmdline().trim_start();
    let line = line.split_once(' ').map_or("", |(_, rest)| rest.trim());
    let mut buf = [0u8; boot::MAX_CMDLINE];
    buf[..line.len()].copy_from_slice(line.as_bytes());
    CMDLINE.call_once(|| (buf, line.len()));
    MODULES.call_once(|| {
        let mut kept = heapless::Vec::new();
        for m in boot.modules() {
            // Cannot fail: BootInfo keeps at most MAX_MODULES.
            let _ = kept.push(*m);
        }
        kept
    });
    kprintln!("umbra: booting, command line \"{}\"", cmdline());
    // SAFETY: the image crate defines `umbra_image_words` (a link-time
    // constant, see below).
    let image_words = unsafe { umbra_image_words() };
    if let Err(e) = boot::check_cmdline(cmdline(), &[boot::KERNEL_WORDS, image_words]) {
        kprintln!(
            "umbra: {e}; the kernel knows {:?}, the image {:?} (a trailing `=` takes a value)",
            boot::KERNEL_WORDS,
            image_words
        );
        exit(ExitCode::Failure)
    }

    for r in boot.regions() {
        kprintln!(
            "umbra: memory {:#012x}-{:#012x} type {}",
            r.start.as_u64(),
            r.start.as_u64() + r.len,
            r.kind
        );
    }
    for (i, m) in boot.modules().iter().enumerate() {
        kprintln!(
            "umbra: module {i}: {:#x}-{:#x} ({} bytes) \"{}\"",
            m.start.as_u64(),
            m.end.as_u64(),
            m.len(),
            m.string()
        );
    }
    let (ram, managed) = frames::init(&boot);
    kprintln!(
        "umbra: memory: {} MiB usable, {} MiB managed by the frame allocator",
        ram >> 20,
        managed >> 20
    );
    if let Err(e) = heap::init() {
        kprintln!("umbra: no room for the heap: {e:?}");
        exit(ExitCode::Failure)
    }

    let list = match madt::read_cpus() {
        Ok(l) => l,
        Err(e) => {
            kprintln!("umbra: cannot read the ACPI MADT: {e:?}");
            exit(ExitCode::Failure)
        }
    };
    // The RSDP search above read the BIOS data area in page 0; from here on
    // page 0 and the page below the boot stack are unmapped.
    if let Err(e) = paging::init() {
        kprintln!("umbra: cannot unmap the null page and the boot stack guard: {e:?}");
        exit(ExitCode::Failure)
    }
    apic::set_base(list.local_apic);
    kprintln!(
        "umbra: ACPI MADT lists {} CPUs ({} enabled), APIC ids {:?}, local APIC at {:#x}",
        list.listed,
        list.enabled,
        &list.apic_ids[..list.enabled],
        list.local_apic
    );
    // The per-CPU setup below needs to know which listed CPU we are.
    let bsp_id = {
        apic::mask_legacy_pic();
        apic::enable();
        apic::id()
    };
    let mut ids = [0u32; cpu::MAX_CPUS];
    ids[0] = bsp_id;
    let mut n = 1;
    for &id in list.apic_ids[..list.enabled]
        .iter()
        .filter(|&&id| id != bsp_id)
    {
        if n == cpu::MAX_CPUS {
            kprintln!(
                "umbra: more than {} CPUs listed; ignoring the rest",
                cpu::MAX_CPUS
            );
            break;
        }
        ids[n] = id;
        n += 1;
    }
    cpu::set_cpus(&ids[..n]);
    // SAFETY: first per-CPU setup on the bootstrap CPU, index 0.
    if let Err(e) = unsafe { cpu::init_this_cpu(0) } {
        kprintln!("umbra: cpu 0 setup failed: {e:?}");
        exit(ExitCode::Failure)
    }
    kprintln!("umbra: cpu 0 (apic {bsp_id}) online (bootstrap)");
    cpu::set_online();

    let online = smp::start_aps();
    apic::start_timer();
    x86_64::instructions::interrupts::enable();
    let us = apic::tsc_to_us(apic::tsc() - boot::entry_tsc());
    kprintln!(
        "umbra: timer: {} TSC ticks/ms, {} APIC ticks/ms",
        apic::tsc_per_ms(),
        apic::apic_ticks_per_ms()
    );
    if online != n {
        kprintln!(
            "umbra: only {online}/{n} CPUs came online within {} ms",
            smp::AP_START_LIMIT_MS
        );
        exit(ExitCode::Failure)
    }
    kprintln!(
        "umbra: all {n} CPUs online {}.{:03} ms after kernel entry",
        us / 1000,
        us % 1000
    );

    if boot::has_arg(cmdline(), "test-fault") {
        selftest::fault_on_last_cpu();
    }
    if boot::has_arg(cmdline(), "test-panic") {
        selftest::panic_on_last_cpu();
    }
    if boot::has_arg(cmdline(), "test-triple-fault") {
        selftest::triple_fault();
    }
    if boot::has_arg(cmdline(), "test-hang") {
        selftest::hang();
    }
    if boot::has_arg(cmdline(), "test-stack-overflow") {
        selftest::stack_overflow_on_last_cpu();
    }
    if boot::has_arg(cmdline(), "test-null") {
        selftest::null_deref_on_last_cpu();
    }
    if boot::has_arg(cmdline(), "test") {
        selftest::run_all();
    }
    // SAFETY: the image crate defines `umbra_image_main` (the one link-time
    // hook, see below) with this signature; it runs once, here.
    if !unsafe { umbra_image_main(cmdline()) } {
        kprintln!("umbra: {online}/{n} CPUs online");
        exit(ExitCode::Failure)
    }
    kprintln!("umbra: {online}/{n} CPUs online");
    exit(ExitCode::Success)
}

#[cfg(target_os = "none")]
extern "Rust" {
    /// What the boot image does once every CPU is online (defined by the
    /// image crate, the one place that assembles the image: servers,
    /// guests, harness, report). Returns false when something failed.
    fn umbra_image_main(cmdline: &'static str) -> bool;
    /// The command-line words the image understands (flags, and keys with
    /// a trailing `=`); with the kernel's own, every other word is refused.
    fn umbra_image_words() -> &'static [&'static str];
}

#[cfg(target_os = "none")]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let cpu = cpu::current_index_checked().map_or(-1, |i| i as i64);
    let (file, line) = info.location().map_or(("?", 0), |l| (l.file(), l.line()));
    serial::print_emergency(format_args!(
        "umbra: PANIC on cpu {cpu}: {} at {file}:{line}\n",
        info.message()
    ));
    qemu::exit(qemu::ExitCode::Failure)
}
