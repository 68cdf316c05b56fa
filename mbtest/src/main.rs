//! `mbtest`: an ordinary Multiboot v1 test kernel, written the way any small PC test kernel is, that Umbra runs unmodified under every MMU server.
//!
//! It knows nothing of Umbra: no hypercall, no shared structure. It is
//! entered by a Multiboot loader in 32-bit protected mode with paging off
//! (EAX the magic, EBX the info), builds its own identity page tables,
//! enables long mode itself (CR4.PAE, CR3, EFER.LME by WRMSR, CR0.PG),
//! then checks what a PC gives it: the Multiboot info (memory, command
//! line, modules), the control registers it wrote, CPUID, MSRs (supported
//! ones round-trip, unknown ones raise #GP), a CR4 bit the platform does
//! not implement (#GP), #UD, #PF with its error code and CR2, a
//! single-step #DB delivered on a stack page never touched before (the
//! hypervisor must deliver an event again after a shadow miss during its
//! delivery), physical page 0 written by a string store (it is RAM, not a
//! write-protected page table), ring 3
//! entered by IRETQ and left by `int 0x20` through a DPL3 gate, the serial
//! port's line status, the PIC masks, fw_cfg, and the local APIC's MMIO
//! registers. It prints one line per check on COM1, then the summary
//! `mbtest: N passed, M failed` without a trailing newline (a runner that
//! looks for it checks that a guest's last partial line is shown), and ends
//! by writing the number of failed checks to the isa-debug-exit port 0xf4
//! (so 0 means every check passed; QEMU then exits with status 1).
#![cfg_attr(target_os = "none", no_std, no_main)]

#[cfg(target_os = "none")]
mod bare;

/// On the host the test kernel is empty: it is built only for
/// `x86_64-unknown-none`.
#[cfg(not(target_os = "none"))]
fn main() {}
