//! The world switch: VMSAVE host, VMLOAD guest, VMRUN, VMSAVE guest, VMLOAD
//! host, with every guest general-purpose register saved and restored around
//! it (VMRUN itself only switches RAX and RSP).
//!
//! GIF handling: the caller enters with GIF=0 (see [`clgi`]), having decided
//! the TLB flush for this VMRUN after GIF went to 0, so a shootdown IPI that
//! arrives later stays pending and turns the VMRUN into an immediate INTR
//! exit. The switch sets IF=1 (with V_INTR_MASKING the host's IF makes
//! physical interrupts INTR exits) and runs `stgi` only after the host's
//! FS/GS/TR are back, so the pending interrupt is then delivered to the
//! kernel's own handler (timer, shootdown IPI) in host mode.

use core::arch::global_asm;

/// Guest general-purpose registers that VMRUN does not save (RAX and RSP live
/// in the VMCB). The layout is fixed: the world switch reads it by offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct GuestGprs {
    /// RBX (offset 0).
    pub rbx: u64,
    /// RCX (8).
    pub rcx: u64,
    /// RDX (16).
    pub rdx: u64,
    /// RSI (24).
    pub rsi: u64,
    /// RDI (32).
    pub rdi: u64,
    /// RBP (40).
    pub rbp: u64,
    /// R8 (48).
    pub r8: u64,
    /// R9 (56).
    pub r9: u64,
    /// R10 (64).
    pub r10: u64,
    /// R11 (72).
    pub r11: u64,
    /// R12 (80).
    pub r12: u64,
    /// R13 (88).
    pub r13: u64,
    /// R14 (96).
    pub r14: u64,
    /// R15 (104).
    pub r15: u64,
}

const _: () = assert!(core::mem::size_of::<GuestGprs>() == 112);

global_asm!(
    ".global umbra_svm_world_switch",
    "umbra_svm_world_switch:",
    // rdi = guest VMCB pa, rsi = host VMCB pa, rdx = *mut GuestGprs
    "push rbp",
    "push rbx",
    "push r12",
    "push r13",
    "push r14",
    "push r15",
    "push rdx", // [rsp+16] gprs
    "push rsi", // [rsp+8]  host VMCB
    "push rdi", // [rsp]    guest VMCB
    "sti",
    "mov rax, rsi",
    "vmsave rax",
    "mov rax, rdi",
    "vmload rax",
    "mov rbx, [rdx + 0]",
    "mov rcx, [rdx + 8]",
    "mov rsi, [rdx + 24]",
    "mov rdi, [rdx + 32]",
    "mov rbp, [rdx + 40]",
    "mov r8,  [rdx + 48]",
    "mov r9,  [rdx + 56]",
    "mov r10, [rdx + 64]",
    "mov r11, [rdx + 72]",
    "mov r12, [rdx + 80]",
    "mov r13, [rdx + 88]",
    "mov r14, [rdx + 96]",
    "mov r15, [rdx + 104]",
    "mov rdx, [rdx + 16]",
    "vmrun rax",
    // #VMEXIT: RAX (= guest VMCB pa), RSP and RIP are the host's again; every
    // other GPR still holds the guest's value.
    "vmsave rax",
    "mov rax, [rsp + 16]",
    "mov [rax + 0], rbx",
    "mov [rax + 8], rcx",
    "mov [rax + 16], rdx",
    "mov [rax + 24], rsi",
    "mov [rax + 32], rdi",
    "mov [rax + 40], rbp",
    "mov [rax + 48], r8",
    "mov [rax + 56], r9",
    "mov [rax + 64], r10",
    "mov [rax + 72], r11",
    "mov [rax + 80], r12",
    "mov [rax + 88], r13",
    "mov [rax + 96], r14",
    "mov [rax + 104], r15",
    "mov rax, [rsp + 8]",
    "vmload rax",
    "stgi",
    "add rsp, 24",
    "pop r15",
    "pop r14",
    "pop r13",
    "pop r12",
    "pop rbx",
    "pop rbp",
    "ret",
);

unsafe extern "C" {
    fn umbra_svm_world_switch(guest_vmcb_pa: u64, host_vmcb_pa: u64, gprs: *mut GuestGprs);
}

/// Disables interrupts and clears GIF: from here until the next VMRUN no
/// interrupt is taken; ones that arrive stay pending.
pub fn clgi() {
    // SAFETY: CLI and CLGI only mask interrupts; SVM is enabled on this CPU
    // (callers run after `enable_on_this_cpu`), and `world_switch` sets GIF
    // again with STGI.
    unsafe { core::arch::asm!("cli", "clgi", options(nomem, nostack)) };
}

/// Runs the guest described by the VMCB at `guest_vmcb_pa` until its next
/// #VMEXIT. Returns with interrupts enabled (a pending physical interrupt has
/// been delivered to the host's handler by then).
///
/// # Safety
/// Must follow [`clgi`] (GIF=0). SVM must be enabled on this CPU with a host
/// save area set; both VMCBs must
/// be valid, 4 KiB-aligned pages owned by the caller; `gprs` must be valid.
/// The guest state in the VMCB must only give the guest access to memory it
/// owns (shadow page tables built from its own frames).
pub unsafe fn world_switch(guest_vmcb_pa: u64, host_vmcb_pa: u64, gprs: &mut GuestGprs) {
    // SAFETY: forwarded from the caller's contract; the assembly preserves
    // every callee-saved register and the stack pointer.
    unsafe { umbra_svm_world_switch(guest_vmcb_pa, host_vmcb_pa, gprs) }
}
