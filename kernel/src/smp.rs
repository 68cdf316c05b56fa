//! SMP: starting the application processors (INIT-SIPI-SIPI, real-mode trampoline), the idle loop, and running jobs on CPUs.
//!
//! The trampoline is copied to [`TRAMPOLINE`] (below 1 MiB). It goes from
//! real mode straight to long mode on the boot page tables and GDT, picks its
//! stack from `AP_STACK_TOPS[apic id]` (filled by the bootstrap CPU, see
//! [`cpu::prepare_stacks`]: every stack has an unmapped guard page below)
//! and calls [`ap_main`].

use crate::cpu::{self, CpuSet, CpuSetExt, Job};
use crate::{apic, interrupts, kprintln, qemu};
use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};

/// Physical address the trampoline runs at (SIPI vector 0x08).
pub const TRAMPOLINE: u64 = 0x8000;

/// How long the bootstrap CPU waits for every AP to come online (generous:
/// a busy 2-core host runs 8 or 16 vCPU threads).
pub const AP_START_LIMIT_MS: u64 = 5000;

/// Stack top of each application processor, by local APIC id.
static AP_STACK_TOPS: [AtomicU64; 256] = [const { AtomicU64::new(0) }; 256];

global_asm!(
    r#"
    .section .text
    .code16
    .global umbra_ap_trampoline_start
    .global umbra_ap_trampoline_end
umbra_ap_trampoline_start:
    cli
    cld
    xor ax, ax
    mov ds, ax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset umbra_boot_pml4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x900
    wrmsr
    /* lgdt [disp16] with a 32-bit base (the assembler takes no label
       difference in a memory operand) */
    .byte 0x66, 0x0F, 0x01, 0x16
    .word 0x8000 + umbra_ap_gdtr - umbra_ap_trampoline_start
    mov eax, cr0
    or eax, 0x80010001
    mov cr0, eax
    .byte 0x66, 0xEA
    .long 0x8000 + umbra_ap_long - umbra_ap_trampoline_start
    .word 0x08

    .code64
umbra_ap_long:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov eax, 1
    cpuid
    shr ebx, 24
    mov rsp, qword ptr [rbx * 8 + {stacks}]
    mov rdi, rbx
    mov rax, offset {ap_main}
    call rax
    ud2

    .balign 4
umbra_ap_gdtr:
    .word 23
    .long umbra_boot_gdt_table
umbra_ap_trampoline_end:
    .code64
"#,
    stacks = sym AP_STACK_TOPS,
    ap_main = sym ap_main,
);

extern "C" {
    static umbra_ap_trampoline_start: u8;
    static umbra_ap_trampoline_end: u8;
}

/// Starts every listed application processor and waits (up to
/// [`AP_START_LIMIT_MS`])
/// until all are online. Also calibrates the timers: the calibration is the
/// wait between INIT and SIPI. Returns the CPUs that came online.
pub fn start_aps() -> usize {
    let n = cpu::count();
    // SAFETY: both symbols delimit the trampoline in the image; the target
    // page (0x8000) is below 1 MiB, identity-mapped and reserved from the
    // frame allocator, and no CPU runs code there yet.
    unsafe {
        let start = core::ptr::addr_of!(umbra_ap_trampoline_start);
        let len = core::ptr::addr_of!(umbra_ap_trampoline_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    // Every stack of every AP (each with its guard page) is made here,
    // while only this CPU runs: see `cpu::prepare_stacks`.
    for i in 1..n {
        let c = cpu::get(i);
        match cpu::prepare_stacks(i) {
            Ok(top) => {
                AP_STACK_TOPS[c.apic_id() as usize % 256].store(top.as_u64(), Ordering::Release)
            }
            Err(e) => kprintln!("umbra: no stack for cpu {i}: {e:?}"),
        }
    }
    for i in 1..n {
        apic::send_init(cpu::get(i).apic_id());
    }
    apic::calibrate(5, 2);
    for _ in 0..2 {
        for i in 1..n {
            let c = cpu::get(i);
            if !c.is_online()
                && AP_STACK_TOPS[c.apic_id() as usize % 256].load(Ordering::Relaxed) != 0
            {
                apic::send_sipi(c.apic_id(), (TRAMPOLINE >> 12) as u8);
            }
        }
        apic::delay_us(200);
    }
    let deadline = apic::tsc() + AP_START_LIMIT_MS * apic::tsc_per_ms();
    while cpu::online_count() < n && apic::tsc() < deadline {
        core::hint::spin_loop();
    }
    cpu::online_count()
}

extern "C" fn ap_main(apic_id: u64) -> ! {
    let Some(index) = cpu::index_of_apic(apic_id as u32) else {
        kprintln!("umbra: started CPU with unlisted apic id {apic_id}");
        qemu::exit(qemu::ExitCode::Failure);
    };
    // SAFETY: first code on this CPU, with its own index.
    if let Err(e) = unsafe { cpu::init_this_cpu(index) } {
        kprintln!("umbra: cpu {index} setup failed: {e:?}");
        qemu::exit(qemu::ExitCode::Failure);
    }
    apic::start_timer();
    kprintln!("umbra: cpu {index} (apic {apic_id}) online");
    cpu::set_online();
    idle()
}

/// The idle loop: run posted jobs, otherwise halt with interrupts enabled.
pub fn idle() -> ! {
    let me = cpu::current();
    loop {
        x86_64::instructions::interrupts::disable();
        if me.job_pending.load(Ordering::Acquire) {
            x86_64::instructions::interrupts::enable();
            let job = me.job.lock().take();
            let result = job.map_or(Err("job vanished"), |j| j());
            *me.job_result.lock() = Some(result);
            me.job_pending.store(false, Ordering::Release);
        } else {
            // STI's one-instruction shadow keeps the wake IPI from slipping in
            // between the check and HLT.
            x86_64::instructions::interrupts::enable_and_hlt();
        }
    }
}

/// Runs `job` on every CPU in `cpus` at once (the caller too, if listed)
/// and waits for all; returns each CPU's result (None where not run).
/// Only the bootstrap CPU posts jobs; the others must be idle.
pub fn run_on(cpus: CpuSet, job: Job) -> [Option<Result<(), &'static str>>; cpu::MAX_CPUS] {
    let me = cpu::current().index();
    let mut results = [None; cpu::MAX_CPUS];
    let remote: CpuSet = CpuSet(cpus.0 & CpuSet::all().0).without(me);
    for i in remote.indices() {
        let c = cpu::get(i);
        *c.job.lock() = Some(job);
        *c.job_result.lock() = None;
        c.job_pending.store(true, Ordering::Release);
        x86_64::instructions::interrupts::without_interrupts(|| {
            apic::send_ipi(c.apic_id(), interrupts::WAKE_VECTOR)
        });
    }
    if cpus.has(me) {
        results[me] = Some(job());
    }
    for i in remote.indices() {
        let c = cpu::get(i);
        while c.job_pending.load(Ordering::Acquire) {
            crate::shootdown::serve();
            core::hint::spin_loop();
        }
        results[i] = c.job_result.lock().take();
    }
    results
}
