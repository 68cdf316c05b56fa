//! IDT, interrupt entry stubs (global_asm), dispatch, and the CPU-exception report.
//!
//! Every stub pushes the vector (and a zero error code when the CPU pushes
//! none), swaps to the kernel's GS base when it came from ring 3, saves the
//! general registers and calls [`dispatch`] with a [`Frame`]. Whatever
//! arrives from ring 3 (a server task's system call, exception or
//! interrupt) goes to [`crate::task::from_user`]. Kernel exceptions are
//! fatal: they print vector, error code, RIP, CR2
//! and CPU number, then end the run with the failure exit code. A fault in
//! a stack's guard page is first reported as `stack overflow on cpu N`
//! (it arrives as #DF on the #DF IST stack when the #PF could not be
//! pushed on the full stack), one in the null page as a null dereference.

use crate::{apic, cpu, paging, qemu, serial, shootdown};
use core::arch::global_asm;
use core::sync::atomic::Ordering;
use x86_64::registers::control::Cr2;

/// Vector of the TLB shootdown IPI.
pub const SHOOTDOWN_VECTOR: u8 = 0xF0;
/// Vector of the wake-up IPI (a CPU halted in its idle loop has work).
pub const WAKE_VECTOR: u8 = 0xF1;

/// The register state saved by an interrupt stub: general registers (named
/// as in the ISA), the vector, the error code (0 if the CPU pushes none),
/// then the CPU's own interrupt frame.
#[repr(C)]
#[derive(Debug)]
#[allow(missing_docs)] // register names need no further words
pub struct Frame {
    pub r15: u64,
    pub r14: u64,
    pub r13: u64,
    pub r12: u64,
    pub r11: u64,
    pub r10: u64,
    pub r9: u64,
    pub r8: u64,
    pub rbp: u64,
    pub rdi: u64,
    pub rsi: u64,
    pub rdx: u64,
    pub rcx: u64,
    pub rbx: u64,
    pub rax: u64,
    pub vector: u64,
    pub error: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Vectors that have a stub, in the order of `umbra_isr_table`.
const STUB_VECTORS: [u8; 37] = [
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25,
    26, 27, 28, 29, 30, 31, 0x80, 0xEF, 0xF0, 0xF1, 0xFF,
];

global_asm!(
    r#"
    .macro UMBRA_ISR_NOERR v
umbra_isr_\v:
    push 0
    push \v
    jmp umbra_isr_common
    .endm
    .macro UMBRA_ISR_ERR v
umbra_isr_\v:
    push \v
    jmp umbra_isr_common
    .endm

    .section .text
    .irp v, 0,1,2,3,4,5,6,7,9,15,16,18,19,20,22,23,24,25,26,27,28,31,128,239,240,241,255
    UMBRA_ISR_NOERR \v
    .endr
    .irp v, 8,10,11,12,13,14,17,21,29,30
    UMBRA_ISR_ERR \v
    .endr

umbra_isr_common:
    // From ring 3 (a server task): load the kernel's GS base first.
    test byte ptr [rsp + 24], 3
    jz 1f
    swapgs
1:
    push rax
    push rbx
    push rcx
    push rdx
    push rsi
    push rdi
    push rbp
    push r8
    push r9
    push r10
    push r11
    push r12
    push r13
    push r14
    push r15
    mov rdi, rsp
    cld
    call {dispatch}
    pop r15
    pop r14
    pop r13
    pop r12
    pop r11
    pop r10
    pop r9
    pop r8
    pop rbp
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rbx
    pop rax
    add rsp, 16
    // Back to ring 3: give the task its own GS base again.
    test byte ptr [rsp + 8], 3
    jz 2f
    swapgs
2:
    iretq

    .section .rodata
    .balign 8
    .global umbra_isr_table
umbra_isr_table:
    .irp v, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,128,239,240,241,255
    .quad umbra_isr_\v
    .endr
"#,
    dispatch = sym dispatch,
);

extern "C" {
    static umbra_isr_table: [u64; STUB_VECTORS.len()];
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    attributes: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

impl Gate {
    const MISSING: Gate = Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        attributes: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    };

    fn interrupt(handler: u64, ist: u8, dpl: u8) -> Gate {
        Gate {
            offset_low: handler as u16,
            selector: 0x08, // kernel code: the first entry appended to each GDT
            ist,
            attributes: 0x8E | (dpl << 5), // present, DPL, 64-bit interrupt gate
            offset_mid: (handler >> 16) as u16,
            offset_high: (handler >> 32) as u32,
            reserved: 0,
        }
    }
}

/// An interrupt descriptor table (one per CPU).
#[repr(C, align(16))]
pub struct Idt([Gate; 256]);

impl Idt {
    /// A table with no gates.
    pub const fn new() -> Self {
        Idt([Gate::MISSING; 256])
    }

    /// Installs every stub; #DF, NMI and #MC run on their IST stacks.
    pub fn fill(&mut self) {
        for (i, &v) in STUB_VECTORS.iter().enumerate() {
            let ist = match v {
                8 => cpu::IST_DOUBLE_FAULT,
                2 => cpu::IST_NMI,
                18 => cpu::IST_MACHINE_CHECK,
                _ => 0,
            };
            // SAFETY: `umbra_isr_table` is defined in the global_asm above
            // with one `.quad` per entry of STUB_VECTORS (so the declared
            // length is right), lives in .rodata and is never written.
            let handler = unsafe { umbra_isr_table[i] };
            // Only the system-call gate may be used by `int n` from ring 3.
            let dpl = if v == abi::task::SYSCALL_VECTOR { 3 } else { 0 };
            self.0[v as usize] = Gate::interrupt(handler, ist, dpl);
        }
    }

    /// Loads this table into IDTR.
    ///
    /// # Safety
    /// The table must stay at this address for as long as it is loaded.
    pub unsafe fn load(&'static self) {
        let ptr = x86_64::structures::DescriptorTablePointer {
            limit: (core::mem::size_of::<Idt>() - 1) as u16,
            base: x86_64::VirtAddr::new(self as *const Idt as u64),
        };
        // SAFETY: a valid IDT that lives forever (the caller's promise).
        unsafe { x86_64::instructions::tables::lidt(&ptr) };
    }
}

impl Default for Idt {
    fn default() -> Self {
        Self::new()
    }
}

/// Short name of an exception vector.
pub fn exception_name(vector: u64) -> &'static str {
    const NAMES: [&str; 32] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "RSV", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "RSV", "RSV", "RSV", "RSV",
        "RSV", "RSV", "#HV", "#VC", "#SX", "RSV",
    ];
    NAMES.get(vector as usize).copied().unwrap_or("IRQ")
}

extern "C" fn dispatch(frame: *mut Frame) {
    // SAFETY: the stub passes RSP, which points at the Frame it just
    // pushed (layout matches `Frame`, repr(C)); it stays valid and is used
    // by nothing else until this function returns.
    let frame = unsafe { &mut *frame };
    if frame.cs & 3 == 3 {
        return crate::task::from_user(frame);
    }
    if !serve_interrupt(frame) {
        fatal_exception(frame);
    }
}

/// Serves a device interrupt or IPI (shootdown, wake-up, timer, spurious);
/// returns false for anything else (an exception).
pub fn serve_interrupt(frame: &Frame) -> bool {
    match frame.vector as u8 {
        v if v == SHOOTDOWN_VECTOR => {
            shootdown::serve();
            apic::eoi();
        }
        v if v == WAKE_VECTOR => apic::eoi(),
        v if v == apic::TIMER_VECTOR => {
            cpu::current().ticks.fetch_add(1, Ordering::Relaxed);
            apic::eoi();
        }
        v if v == apic::SPURIOUS_VECTOR => {}
        _ => return false,
    }
    true
}

/// What a fault address says about the cause, for the line before the
/// exception report: a stack overflow (the address is in a stack's guard
/// page) or a null dereference (the address is in the null page).
fn diagnose(frame: &Frame, cr2: u64, cpu: Option<usize>) {
    let cpu = cpu.map_or(-1, |i| i as i64);
    // A #PF names the address in CR2. A #DF from a stack overflow follows a
    // #PF whose delivery failed on the same full stack: CR2 is in the
    // guard page, and the interrupted RSP at most one push above it.
    let mut suspects = [Some(cr2), None];
    if frame.vector == 8 {
        suspects[1] = Some(frame.rsp.wrapping_sub(8));
    }
    let faulting_access = matches!(frame.vector, 8 | 14);
    if let Some((owner, kind)) = suspects
        .into_iter()
        .flatten()
        .filter(|_| faulting_access)
        .find_map(cpu::stack_guard_owner)
    {
        serial::print_emergency(format_args!(
            "umbra: stack overflow on cpu {cpu}: {} hit the guard page below cpu {owner}'s {} \
             (cr2 {cr2:#x}, rsp {:#x})\n",
            exception_name(frame.vector),
            kind.name(),
            frame.rsp,
        ));
    } else if frame.vector == 14 && cr2 < paging::PAGE_SIZE {
        serial::print_emergency(format_args!(
            "umbra: null pointer dereference on cpu {cpu}: address {cr2:#x} (the null page is unmapped), rip {:#x}\n",
            frame.rip,
        ));
    }
}

/// Reports an exception the kernel cannot survive and ends the run.
pub fn fatal_exception(frame: &Frame) -> ! {
    let cpu = cpu::current_index_checked();
    diagnose(frame, Cr2::read_raw(), cpu);
    serial::print_emergency(format_args!(
        "umbra: EXCEPTION {} vector {} error {:#x} rip {:#x} cr2 {:#x} cpu {} rsp {:#x}\n",
        exception_name(frame.vector),
        frame.vector,
        frame.error,
        frame.rip,
        Cr2::read_raw(),
        match cpu {
            Some(i) => i as i64,
            None => -1,
        },
        frame.rsp,
    ));
    qemu::exit(qemu::ExitCode::Failure)
}
