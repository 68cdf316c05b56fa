//! The `platform` workload: checks, from inside a guest, the PC the kernel
//! emulates (CPUID filter, MSRs, CR0/CR4, ports, string I/O, exceptions).
//!
//! It installs its own #GP and #UD gates in its IDT. Each instruction that
//! may fault is issued with its length in R11: the handlers skip it and
//! count the fault in R10 (#GP) or R9 (#UD), so a probe returns how many
//! faults it took. A fault with R11 = 0 (not a probe) ends the vCPU with a
//! failing exit status.

use crate::rt::{domain, fail, finish, puts, rdtsc, read_cr0, write_cr0};
use abi::guest::{DIRECT_BASE, GDT_GPA, IDT_GPA};
use core::arch::{asm, global_asm};

global_asm!(
    ".global umbra_platform_gp_entry",
    "umbra_platform_gp_entry:",
    "test r11, r11",
    "jz 2f",
    // Drop the error code, skip the instruction, count the #GP.
    "add rsp, 8",
    "add [rsp], r11",
    "inc r10",
    "iretq",
    ".global umbra_platform_ud_entry",
    "umbra_platform_ud_entry:",
    "test r11, r11",
    "jz 2f",
    "add [rsp], r11",
    "inc r9",
    "iretq",
    "2:",
    "mov dx, {exit_port}",
    "mov eax, 0xdead",
    "out dx, eax",
    "jmp 2b",
    exit_port = const abi::guest::EXIT_PORT,
);

// Compatibility mode (32-bit code under long mode), as an unmodified guest
// runs before it jumps to 64-bit code: far return to the 32-bit code
// selector `COMPAT_CS`, read CR0 and CR4 and write CR4 with OSFXSR set
// (three intercepted accesses the kernel decodes as 32-bit code), far jump
// back to 0x08. No stack use in 32-bit code (the stack is above 4 GiB).
// Returns the CR0 read there.
global_asm!(
    ".global umbra_platform_compat_probe",
    "umbra_platform_compat_probe:",
    "push rbx",
    "lea rax, [rip + 2f]",
    "push {cs32}",
    "push rax",
    "retfq",
    ".code32",
    "2:",
    "mov eax, cr0",
    "mov ebx, eax",
    "mov eax, cr4",
    "or eax, 0x200",
    "mov cr4, eax",
    "jmp fword ptr [3f]",
    "3:",
    ".long 4f",
    ".word 0x08",
    ".code64",
    "4:",
    "mov eax, ebx",
    "pop rbx",
    "ret",
    cs32 = const COMPAT_CS,
);

/// The 32-bit code selector this workload adds to its GDT.
const COMPAT_CS: u64 = 0x18;

unsafe extern "C" {
    fn umbra_platform_gp_entry();
    fn umbra_platform_ud_entry();
    fn umbra_platform_compat_probe() -> u32;
}

/// Points IDT gate `vector` at `handler` (interrupt gate, DPL 0, selector
/// 0x08), as the loader builds the #PF gate.
fn set_gate(vector: u64, handler: u64) {
    let gate = (DIRECT_BASE + IDT_GPA + vector * 16) as *mut u64;
    let lo = (handler & 0xFFFF) | 0x08 << 16 | 0x8E00 << 32 | ((handler >> 16) & 0xFFFF) << 48;
    // SAFETY: the loader's IDT page is guest memory reached through the
    // direct map; the gate is written whole before any fault can use it.
    unsafe {
        gate.write_volatile(lo);
        gate.add(1).write_volatile(handler >> 32);
    }
}

/// CPUID of `leaf`/`subleaf`: EAX, EBX, ECX, EDX.
fn cpuid(leaf: u32, subleaf: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, subleaf);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// RDMSR: the value and the #GPs taken (1: refused, value meaningless).
fn rdmsr(msr: u32) -> (u64, u64) {
    let (lo, hi): (u32, u32);
    let mut gps = 0u64;
    // SAFETY: RDMSR is intercepted; a #GP is skipped by our handler (R11 =
    // its length, 2).
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi,
             in("r11") 2u64, inout("r10") gps, options(nostack))
    };
    (u64::from(hi) << 32 | u64::from(lo), gps)
}

/// WRMSR: the #GPs taken (0: accepted).
fn wrmsr(msr: u32, value: u64) -> u64 {
    let mut gps = 0u64;
    // SAFETY: WRMSR is intercepted; the MSRs written are restored by the
    // callers where the guest depends on them; a #GP is skipped (length 2).
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             in("r11") 2u64, inout("r10") gps, options(nostack))
    };
    gps
}

/// MOV to CR0 or CR4 (`cr`) of `value`: the #GPs taken.
fn write_cr(cr: u8, value: u64) -> u64 {
    let mut gps = 0u64;
    // SAFETY: intercepted; the values written keep the paging bits or are
    // refused; a #GP is skipped (`mov crN, rax` is 3 bytes).
    unsafe {
        if cr == 0 {
            asm!("mov cr0, rax", in("rax") value, in("r11") 3u64, inout("r10") gps,
                 options(nostack));
        } else {
            asm!("mov cr4, rax", in("rax") value, in("r11") 3u64, inout("r10") gps,
                 options(nostack));
        }
    }
    gps
}

/// Reads CR4 (intercepted: the guest's own value).
fn read_cr4() -> u64 {
    let v: u64;
    // SAFETY: reading CR4 has no side effect.
    unsafe { asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)) };
    v
}

/// IN of `size` bytes (1, 2, 4) from `port`.
fn port_in(port: u16, size: u8) -> u32 {
    let v: u32;
    // SAFETY: port I/O is intercepted by the kernel's device table.
    unsafe {
        match size {
            1 => {
                let b: u8;
                asm!("in al, dx", in("dx") port, out("al") b, options(nomem, nostack));
                v = u32::from(b);
            }
            2 => {
                let w: u16;
                asm!("in ax, dx", in("dx") port, out("ax") w, options(nomem, nostack));
                v = u32::from(w);
            }
            _ => asm!("in eax, dx", in("dx") port, out("eax") v, options(nomem, nostack)),
        }
    }
    v
}

/// OUT of a byte.
fn outb(port: u16, b: u8) {
    // SAFETY: port I/O is intercepted by the kernel's device table.
    unsafe { asm!("out dx, al", in("dx") port, in("al") b, options(nomem, nostack)) };
}

/// OUT of a word.
fn outw(port: u16, w: u16) {
    // SAFETY: as outb.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") w, options(nomem, nostack)) };
}

/// A feature the kernel must hide: leaf, subleaf, register (0 EAX .. 3
/// EDX), bit, name.
const HIDDEN: &[(u32, u32, usize, u32, &str)] = &[
    (1, 0, 3, 1, "VME"),
    (1, 0, 2, 3, "MONITOR"),
    (1, 0, 2, 5, "VMX"),
    (1, 0, 2, 6, "SMX"),
    (1, 0, 2, 17, "PCID"),
    (1, 0, 2, 21, "x2APIC"),
    (1, 0, 2, 26, "XSAVE"),
    (1, 0, 2, 27, "OSXSAVE"),
    (1, 0, 2, 31, "hypervisor"),
    (7, 0, 1, 0, "FSGSBASE"),
    (7, 0, 1, 7, "SMEP"),
    (7, 0, 1, 10, "INVPCID"),
    (7, 0, 1, 20, "SMAP"),
    (7, 0, 2, 2, "UMIP"),
    (7, 0, 2, 3, "PKU"),
    (7, 0, 2, 4, "OSPKE"),
    (7, 0, 2, 16, "LA57"),
    (0x8000_0001, 0, 2, 2, "SVM"),
    (0x8000_0001, 0, 3, 27, "RDTSCP"),
];

fn check_cpuid() -> u64 {
    for &(leaf, subleaf, reg, bit, name) in HIDDEN {
        if cpuid(leaf, subleaf)[reg] & (1 << bit) != 0 {
            puts("platform: CPUID shows ");
            puts(name);
            puts("\n");
            fail("platform: a hidden CPUID bit is set, leaf", u64::from(leaf));
        }
    }
    let leaf1 = cpuid(1, 0);
    if leaf1[1] >> 16 != 0x0001 {
        fail(
            "platform: CPUID 1 EBX APIC ID / count not 0 / 1:",
            u64::from(leaf1[1]),
        );
    }
    // Not everything is hidden: the x87 FPU, PAE and long mode stay.
    if leaf1[3] & 1 == 0 || leaf1[3] & (1 << 6) == 0 || cpuid(0x8000_0001, 0)[3] & (1 << 29) == 0 {
        fail(
            "platform: CPUID hides FPU, PAE or LM, EDX",
            u64::from(leaf1[3]),
        );
    }
    if cpuid(0x4000_0000, 0) != [0; 4] {
        fail(
            "platform: CPUID 0x40000000 not empty, EAX",
            u64::from(cpuid(0x4000_0000, 0)[0]),
        );
    }
    HIDDEN.len() as u64
}

/// Checks that `msr` accepts `value` and reads it back.
fn round_trip(msr: u32, value: u64) {
    if wrmsr(msr, value) != 0 {
        fail("platform: WRMSR refused, MSR", u64::from(msr));
    }
    let (got, gps) = rdmsr(msr);
    if gps != 0 || got != value {
        fail(
            "platform: RDMSR did not read back the value, MSR",
            u64::from(msr),
        );
    }
}

fn check_msrs() -> u64 {
    const EFER: u32 = 0xC000_0080;
    const KERNEL_GS_BASE: u32 = 0xC000_0102;
    const FS_BASE: u32 = 0xC000_0100;
    const GS_BASE: u32 = 0xC000_0101;
    const APIC_BASE: u32 = 0x1B;
    const PAT: u32 = 0x277;
    const TSC: u32 = 0x10;
    let mut checks = 0;
    // EFER: LME | LMA | NXE as the loader left it, SCE toggles, SVME and
    // clearing LME under paging are refused.
    let (efer, gps) = rdmsr(EFER);
    if gps != 0 || efer != 0xD00 {
        fail("platform: EFER does not read LME|LMA|NXE:", efer);
    }
    round_trip(EFER, efer | 1);
    round_trip(EFER, efer);
    if wrmsr(EFER, efer | 1 << 12) != 1 || wrmsr(EFER, efer & !(1 << 8)) != 1 {
        fail("platform: EFER.SVME or clearing LME was not refused", efer);
    }
    if rdmsr(EFER).0 != efer {
        fail(
            "platform: a refused EFER write changed EFER:",
            rdmsr(EFER).0,
        );
    }
    checks += 4;
    // APIC_BASE: BSP|EN|0xFEE00000 at reset; the writes kvm-unit-tests
    // makes; x2APIC mode refused.
    if rdmsr(APIC_BASE).0 != 0xFEE0_0900 {
        fail("platform: APIC_BASE reset value wrong:", rdmsr(APIC_BASE).0);
    }
    round_trip(APIC_BASE, 0xFEE0_0100);
    round_trip(APIC_BASE, 0xFEE0_0900);
    if wrmsr(APIC_BASE, 0xFEE0_0D00) != 1 {
        fail("platform: APIC_BASE x2APIC enable was not refused", 0);
    }
    checks += 4;
    // The VMCB-held MSRs.
    let gs = rdmsr(GS_BASE).0;
    round_trip(GS_BASE, gs);
    round_trip(FS_BASE, 0xFFFF_8000_1234_5000);
    round_trip(FS_BASE, 0);
    round_trip(KERNEL_GS_BASE, 0x0000_7FFF_0000_1000);
    for (msr, value) in [
        (0xC000_0081, 0x0023_0010_0000_0000u64), // STAR
        (0xC000_0082, 0xFFFF_FFFF_8000_1000),    // LSTAR
        (0xC000_0083, 0xFFFF_FFFF_8000_2000),    // CSTAR
        (0xC000_0084, 0x4700),                   // SFMASK
        (0x174, 0x10),                           // SYSENTER_CS
        (0x175, 0xFFFF_FFFF_8000_3000),          // SYSENTER_ESP
        (0x176, 0xFFFF_FFFF_8000_4000),          // SYSENTER_EIP
    ] {
        round_trip(msr, value);
        checks += 1;
    }
    for msr in [FS_BASE, GS_BASE, KERNEL_GS_BASE] {
        if wrmsr(msr, 0x0000_8000_0000_0000) != 1 {
            fail(
                "platform: a non-canonical base was not refused, MSR",
                u64::from(msr),
            );
        }
    }
    if rdmsr(GS_BASE).0 != gs {
        fail(
            "platform: GS_BASE changed by a refused write:",
            rdmsr(GS_BASE).0,
        );
    }
    checks += 5;
    // PAT: stored and read back; an undefined memory type refused.
    let pat = rdmsr(PAT).0;
    round_trip(PAT, 0x0007_0106_0007_0406);
    if wrmsr(PAT, 0x0007_0406_0007_0402) != 1 {
        fail("platform: a PAT with memory type 2 was not refused", 0);
    }
    round_trip(PAT, pat);
    checks += 3;
    // TSC: a write sets the guest's TSC (an offset), which RDTSC sees too.
    let ahead = 1u64 << 50;
    let before = rdtsc();
    if wrmsr(TSC, before + ahead) != 0 || rdtsc() < before + ahead {
        fail("platform: TSC write did not move RDTSC ahead:", rdtsc());
    }
    if wrmsr(TSC, rdmsr(TSC).0 - ahead) != 0 || rdtsc() >= before + ahead {
        fail("platform: TSC write did not move RDTSC back:", rdtsc());
    }
    checks += 2;
    // The AMD legacy performance counters: writes ignored, reads 0.
    for msr in 0xC001_0000..=0xC001_0007u32 {
        if wrmsr(msr, 0x1234) != 0 || rdmsr(msr) != (0, 0) {
            fail("platform: perf counter MSR not harmless:", u64::from(msr));
        }
        checks += 1;
    }
    // Unknown MSRs (the host's VM_CR, KVM's wall clock, an unused number):
    // #GP on read and on write.
    for msr in [0xC001_0114u32, 0x4B56_4D00, 0x0000_0DA0] {
        if rdmsr(msr).1 != 1 || wrmsr(msr, 0) != 1 {
            fail(
                "platform: an unknown MSR did not raise #GP:",
                u64::from(msr),
            );
        }
        checks += 2;
    }
    checks
}

fn check_control_registers() -> u64 {
    const PAE: u64 = 1 << 5;
    const OSFXSR: u64 = 1 << 9;
    const AM: u64 = 1 << 18;
    const TS: u64 = 1 << 3;
    const PG: u64 = 1 << 31;
    const CD: u64 = 1 << 30;
    let cr4 = read_cr4();
    if cr4 != PAE {
        fail("platform: CR4 is not PAE at start:", cr4);
    }
    for (bit, name) in [
        (22, "PKE"),
        (12, "LA57"),
        (20, "SMEP"),
        (17, "PCIDE"),
        (18, "OSXSAVE"),
    ] {
        if write_cr(4, cr4 | 1 << bit) != 1 || read_cr4() != cr4 {
            puts("platform: CR4.");
            puts(name);
            puts("\n");
            fail(
                "platform: an unsupported CR4 bit was accepted, CR4",
                read_cr4(),
            );
        }
    }
    if write_cr(4, 0) != 1 {
        fail(
            "platform: clearing CR4.PAE in long mode was accepted",
            read_cr4(),
        );
    }
    if write_cr(4, cr4 | OSFXSR) != 0 || read_cr4() != cr4 | OSFXSR {
        fail("platform: CR4.OSFXSR does not read back:", read_cr4());
    }
    if write_cr(4, cr4) != 0 || read_cr4() != cr4 {
        fail("platform: CR4 not restored:", read_cr4());
    }
    let cr0 = read_cr0();
    if cr0 != 0x8001_0033 {
        fail("platform: CR0 at start is not PG|WP|NE|ET|MP|PE:", cr0);
    }
    write_cr0(cr0 | AM);
    if read_cr0() != cr0 | AM {
        fail("platform: CR0.AM does not read back:", read_cr0());
    }
    write_cr0(cr0 | TS);
    // SAFETY: CLTS only clears CR0.TS (intercepted as a CR0 write).
    unsafe { asm!("clts", options(nomem, nostack)) };
    if read_cr0() != cr0 {
        fail("platform: CLTS did not clear CR0.TS:", read_cr0());
    }
    // SMSW reads the guest's CR0 (CD is the guest's alone, the hardware
    // never has it); LMSW sets TS.
    write_cr0(cr0 | CD);
    let msw: u64;
    // SAFETY: SMSW only reads CR0 (intercepted as a CR0 read).
    unsafe { asm!("smsw {0:e}", out(reg) msw, options(nomem, nostack)) };
    write_cr0(cr0);
    if msw != (cr0 | CD) & 0xFFFF_FFFF {
        fail("platform: SMSW did not read the guest's CR0:", msw);
    }
    // SAFETY: LMSW only loads CR0.PE/MP/EM/TS (intercepted as a CR0 write);
    // TS is cleared again by CLTS below.
    unsafe { asm!("lmsw {0:x}", in(reg) (cr0 | TS) as u16, options(nomem, nostack)) };
    if read_cr0() != cr0 | TS {
        fail("platform: LMSW did not set CR0.TS:", read_cr0());
    }
    // SAFETY: as above.
    unsafe { asm!("clts", options(nomem, nostack)) };
    if write_cr(0, cr0 | 1 << 6) != 1 || write_cr(0, cr0 & !PG) != 1 || read_cr0() != cr0 {
        fail(
            "platform: a reserved CR0 bit or CR0.PG clear in 64-bit code was accepted",
            cr0,
        );
    }
    12
}

fn check_ports() -> u64 {
    const LSR: u16 = 0x3FD;
    let mut checks = 0;
    if port_in(LSR, 1) != 0x60 {
        fail(
            "platform: COM1 LSR does not read 0x60:",
            u64::from(port_in(LSR, 1)),
        );
    }
    for (port, mask) in [(0x21u16, 0xFBu8), (0xA1, 0xFF)] {
        outb(port, mask);
        if port_in(port, 1) != u32::from(mask) {
            fail(
                "platform: PIC mask does not read back, port",
                u64::from(port),
            );
        }
    }
    checks += 3;
    for (port, size, ones) in [
        (0x3E8u16, 1u8, 0xFFu32),
        (0x1234, 2, 0xFFFF),
        (0xCF8, 4, u32::MAX),
    ] {
        if port_in(port, size) != ones {
            fail(
                "platform: an unassigned port does not read all ones:",
                u64::from(port),
            );
        }
        checks += 1;
    }
    // fw_cfg: the signature, one CPU, the domain's memory.
    let fw_cfg = |item: u16, len: u32| {
        outw(0x510, item);
        (0..len).fold(0u64, |a, i| a | u64::from(port_in(0x511, 1)) << (8 * i))
    };
    if fw_cfg(0, 4) != u64::from(u32::from_le_bytes(*b"QEMU")) {
        fail("platform: fw_cfg signature wrong:", fw_cfg(0, 4));
    }
    if fw_cfg(5, 2) != 1 {
        fail("platform: fw_cfg does not answer 1 CPU:", fw_cfg(5, 2));
    }
    if fw_cfg(3, 8) != domain().mem_bytes {
        fail("platform: fw_cfg RAM size wrong:", fw_cfg(3, 8));
    }
    checks += 3;
    // String I/O: `rep insb` of the fw_cfg signature into memory; `rep
    // outsb` of two bytes to the PIC mask (the last one stays), and a line
    // to the console.
    let mut sig = [0u8; 4];
    outw(0x510, 0);
    // SAFETY: INS stores 4 bytes into `sig` (RDI, count in RCX, DF clear).
    unsafe {
        asm!("rep insb", in("dx") 0x511u16, inout("rdi") sig.as_mut_ptr() => _,
             inout("rcx") 4u64 => _, options(nostack))
    };
    if &sig != b"QEMU" {
        fail(
            "platform: rep insb of the fw_cfg signature wrong:",
            u64::from(u32::from_le_bytes(sig)),
        );
    }
    let masks = [0x12u8, 0x34];
    // SAFETY: OUTS reads 2 bytes of `masks` (RSI, count in RCX, DF clear).
    unsafe {
        asm!("rep outsb", in("dx") 0x21u16, inout("rsi") masks.as_ptr() => _,
             inout("rcx") 2u64 => _, options(nostack, readonly))
    };
    if port_in(0x21, 1) != 0x34 {
        fail(
            "platform: rep outsb to the PIC mask wrong:",
            u64::from(port_in(0x21, 1)),
        );
    }
    let line = b"platform: this line was written by rep outsb\n";
    // SAFETY: OUTS reads `line` (RSI, count in RCX, DF clear).
    unsafe {
        asm!("rep outsb", in("dx") abi::guest::CONSOLE_PORT, inout("rsi") line.as_ptr() => _,
             inout("rcx") line.len() as u64 => _, options(nostack, readonly))
    };
    checks + 2
}

/// CR0/CR4 accesses from 32-bit code: the kernel decodes them in the
/// guest's code size.
fn check_compat_mode() -> u64 {
    const OSFXSR: u64 = 1 << 9;
    // The loader's GDT (null, code 0x08, data 0x10) gains a flat 32-bit
    // code segment (present, DPL 0, execute/read, D, G) at COMPAT_CS.
    let gdt = DIRECT_BASE + GDT_GPA;
    // SAFETY: the GDT page is guest memory in the direct map; the new entry
    // is written before LGDT makes it reachable.
    unsafe { ((gdt + COMPAT_CS) as *mut u64).write_volatile(0x00CF_9A00_0000_FFFF) };
    let limit = (COMPAT_CS + 7) as u16;
    let gdtr = [
        limit,
        gdt as u16,
        (gdt >> 16) as u16,
        (gdt >> 32) as u16,
        (gdt >> 48) as u16,
    ];
    // SAFETY: the new GDT keeps the loader's entries at the same selectors.
    unsafe { asm!("lgdt [{}]", in(reg) gdtr.as_ptr(), options(readonly, nostack)) };
    let cr4 = read_cr4();
    // SAFETY: the probe only reads CR0/CR4 and sets CR4.OSFXSR (restored
    // below), and comes back to 64-bit code at CS 0x08.
    let cr0_seen = unsafe { umbra_platform_compat_probe() };
    if u64::from(cr0_seen) != read_cr0() & 0xFFFF_FFFF {
        fail(
            "platform: CR0 read in 32-bit code wrong:",
            u64::from(cr0_seen),
        );
    }
    if read_cr4() != cr4 | OSFXSR {
        fail("platform: CR4 written in 32-bit code wrong:", read_cr4());
    }
    if write_cr(4, cr4) != 0 {
        fail("platform: CR4 not restored after 32-bit code:", read_cr4());
    }
    2
}

fn check_exceptions() -> u64 {
    let mut uds = 0u64;
    // SAFETY: #UD is skipped by our handler (R11 = 2, the length of ud2).
    unsafe { asm!("ud2", in("r11") 2u64, inout("r9") uds, options(nomem, nostack)) };
    if uds != 1 {
        fail("platform: ud2 did not raise #UD in the guest, count", uds);
    }
    // RDTSCP is hidden: #UD (R11 = 3, its length).
    // SAFETY: as above; RDTSCP would only write EAX, EDX, ECX.
    unsafe {
        asm!("rdtscp", in("r11") 3u64, inout("r9") uds, out("eax") _, out("edx") _,
             out("ecx") _, options(nomem, nostack))
    };
    if uds != 2 {
        fail("platform: RDTSCP did not raise #UD, count", uds);
    }
    2
}

/// The workload: every check above; the detail is how many passed.
pub fn platform(_: u64) -> ! {
    set_gate(13, umbra_platform_gp_entry as *const () as u64);
    set_gate(6, umbra_platform_ud_entry as *const () as u64);
    let checks = check_exceptions()
        + check_cpuid()
        + check_msrs()
        + check_control_registers()
        + check_compat_mode()
        + check_ports();
    puts("platform: CPUID, MSRs, CR0/CR4, ports, string I/O and exceptions checked\n");
    finish(true, checks)
}
