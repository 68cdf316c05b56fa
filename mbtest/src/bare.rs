//! The test kernel itself: boot code, exception handling, the checks.

use core::arch::{asm, global_asm};
use core::fmt::Write;
use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
    .long 0x1BADB002
    .long 0
    .long -0x1BADB002

    .section .bss
    .balign 4096
mbtest_pml4:  .skip 4096
mbtest_pdpt:  .skip 4096
mbtest_pd:    .skip 4096 * 4
mbtest_stack: .skip 16384
    .global mbtest_stack_top
mbtest_stack_top:
mbtest_user_stack: .skip 4096
    .global mbtest_user_stack_top
mbtest_user_stack_top:
    .global mbtest_magic
mbtest_magic: .skip 4
    .global mbtest_info
mbtest_info:  .skip 4

    .section .data
    .balign 16
    .global mbtest_gdt
mbtest_gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
    .quad 0x00AFFA000000FFFF
    .quad 0x00CFF2000000FFFF
    .global mbtest_gdt_tss
mbtest_gdt_tss:
    .quad 0
    .quad 0
mbtest_gdt_end:
mbtest_gdt_ptr:
    .word mbtest_gdt_end - mbtest_gdt - 1
    .long mbtest_gdt

    .section .text.boot, "ax"
    .code32
    .global mbtest_start32
mbtest_start32:
    cli
    cld
    mov [mbtest_magic], eax
    mov [mbtest_info], ebx
    mov esp, offset mbtest_stack_top

    /* Identity map of 0..4 GiB with 2 MiB pages; the image's own 2 MiB
       (index 1) is user-accessible for the ring-3 check; above 3 GiB
       uncached (the local APIC lives there). */
    mov edi, offset mbtest_pd
    mov eax, 0x83
    xor ecx, ecx
2:  mov [edi + ecx * 8], eax
    mov dword ptr [edi + ecx * 8 + 4], 0
    cmp ecx, 1
    jne 3f
    or dword ptr [edi + ecx * 8], 0x4
3:  cmp ecx, 1536
    jb 4f
    or dword ptr [edi + ecx * 8], 0x18
4:  add eax, 0x200000
    inc ecx
    cmp ecx, 2048
    jne 2b

    mov edi, offset mbtest_pdpt
    mov eax, offset mbtest_pd
    or eax, 7
    xor ecx, ecx
5:  mov [edi + ecx * 8], eax
    add eax, 4096
    inc ecx
    cmp ecx, 4
    jne 5b
    mov eax, offset mbtest_pdpt
    or eax, 7
    mov [mbtest_pml4], eax

    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov eax, offset mbtest_pml4
    mov cr3, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x100
    wrmsr
    mov eax, cr0
    or eax, 0x80010001
    mov cr0, eax
    lgdt [mbtest_gdt_ptr]
    mov eax, offset mbtest_start64
    push 0x08
    push eax
    retf

    .code64
mbtest_start64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset mbtest_stack_top
    call mbtest_main
6:  cli
    hlt
    jmp 6b

    /* Exception and interrupt entry: push a dummy error code where the
       CPU pushes none, then the vector; save the caller-saved registers;
       call the Rust handler with the frame; restore; drop the two words. */
    .macro stub vec, err
    .global mbtest_isr\vec
mbtest_isr\vec:
    .if \err == 0
    push 0
    .endif
    push \vec
    jmp mbtest_isr_common
    .endm
    stub 0, 0
    stub 1, 0
    stub 3, 0
    stub 6, 0
    stub 8, 1
    stub 13, 1
    stub 14, 1
    stub 32, 0

mbtest_isr_common:
    push rax
    push rcx
    push rdx
    push rsi
    push rdi
    push r8
    push r9
    push r10
    push r11
    mov rdi, rsp
    call mbtest_trap
    pop r11
    pop r10
    pop r9
    pop r8
    pop rdi
    pop rsi
    pop rdx
    pop rcx
    pop rax
    add rsp, 16
    iretq

    /* Enters ring 3 at `mbtest_user` and comes back when the user code
       raises `int 0x20` (the trap handler points the frame here). */
    .global mbtest_run_user
mbtest_run_user:
    push rbx
    push rbp
    push r12
    push r13
    push r14
    push r15
    mov [rip + mbtest_kernel_rsp], rsp
    push 0x23
    lea rax, [rip + mbtest_user_stack_top]
    push rax
    push 0x2
    push 0x1B
    lea rax, [rip + mbtest_user]
    push rax
    iretq
    .global mbtest_user_return
mbtest_user_return:
    mov rsp, [rip + mbtest_kernel_rsp]
    pop r15
    pop r14
    pop r13
    pop r12
    pop rbp
    pop rbx
    ret

mbtest_user:
    mov eax, 0x5eed
    int 0x20
    ud2

    .section .bss
    .balign 8
    .global mbtest_kernel_rsp
mbtest_kernel_rsp: .skip 8
"#
);

extern "C" {
    static mbtest_magic: u32;
    static mbtest_info: u32;
    static mut mbtest_gdt_tss: [u64; 2];
    static mbtest_stack_top: u8;
    fn mbtest_run_user();
    fn mbtest_user_return();
    fn mbtest_isr0();
    fn mbtest_isr1();
    fn mbtest_isr3();
    fn mbtest_isr6();
    fn mbtest_isr8();
    fn mbtest_isr13();
    fn mbtest_isr14();
    fn mbtest_isr32();
}

/// The registers the trap stub saved, then what the CPU pushed.
#[repr(C)]
struct Frame {
    r11: u64,
    r10: u64,
    r9: u64,
    r8: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rax: u64,
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

/// Bytes to skip over an expected faulting instruction (0: no fault is
/// expected, and one ends the run as a failure).
static SKIP: AtomicU64 = AtomicU64::new(0);
/// The last trap: vector, error code, CR2 (for #PF), CS of the interrupted
/// code and its RAX (for `int 0x20` from ring 3).
static LAST_VECTOR: AtomicU64 = AtomicU64::new(u64::MAX);
static LAST_ERROR: AtomicU64 = AtomicU64::new(0);
static LAST_CR2: AtomicU64 = AtomicU64::new(0);
static LAST_CS: AtomicU64 = AtomicU64::new(0);
static LAST_RAX: AtomicU64 = AtomicU64::new(0);
/// Where the last single-step trap (#DB) came: the RIP it pushed.
static LAST_RIP: AtomicU64 = AtomicU64::new(0);

#[no_mangle]
extern "C" fn mbtest_trap(f: &mut Frame) {
    LAST_VECTOR.store(f.vector, Relaxed);
    LAST_ERROR.store(f.error, Relaxed);
    LAST_CS.store(f.cs, Relaxed);
    LAST_RAX.store(f.rax, Relaxed);
    if f.vector == 14 {
        let cr2: u64;
        // SAFETY: reading CR2 has no side effect.
        unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
        LAST_CR2.store(cr2, Relaxed);
    }
    if f.vector == 32 {
        // Back to the kernel where `mbtest_run_user` left it.
        f.rip = mbtest_user_return as *const () as u64;
        f.cs = 0x08;
        f.ss = 0x10;
        f.rsp = 0;
        f.rflags = 0x2;
        return;
    }
    if f.vector == 1 {
        // The single-step trap of `single_step_fresh_stack`: once only.
        LAST_RIP.store(f.rip, Relaxed);
        f.rflags &= !0x100;
        return;
    }
    match SKIP.swap(0, Relaxed) {
        0 => {
            let _ = writeln!(
                Serial,
                "mbtest: unexpected exception {} (error {:#x}) at {:#x}",
                f.vector, f.error, f.rip
            );
            exit(0xFE);
        }
        n => f.rip += n,
    }
}

/// COM1, polled.
struct Serial;

impl Write for Serial {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for b in s.bytes() {
            // Wait for the transmitter holding register to be empty.
            while inb(0x3FD) & 0x20 == 0 {}
            outb(0x3F8, b);
        }
        Ok(())
    }
}

fn outb(port: u16, v: u8) {
    // SAFETY: port I/O to the PC's devices; no memory is touched.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack)) };
}

fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: as outb.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack)) };
    v
}

fn outw(port: u16, v: u16) {
    // SAFETY: as outb.
    unsafe { asm!("out dx, ax", in("dx") port, in("ax") v, options(nomem, nostack)) };
}

fn exit(code: u32) -> ! {
    // SAFETY: the isa-debug-exit port; then halt for good.
    unsafe {
        asm!("out dx, eax", in("dx") 0xF4u16, in("eax") code, options(nomem, nostack));
        loop {
            asm!("cli; hlt", options(nomem, nostack));
        }
    }
}

fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reading an MSR the platform supports (callers expecting #GP
    // use `rdmsr_faults`).
    unsafe { asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack)) };
    u64::from(hi) << 32 | u64::from(lo)
}

fn wrmsr(msr: u32, v: u64) {
    // SAFETY: writing an MSR the platform supports with a value that keeps
    // this kernel running (the callers say why).
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") v as u32, in("edx") (v >> 32) as u32,
             options(nomem, nostack))
    };
}

/// Runs `f`, which executes one instruction of `len` bytes expected to
/// fault; returns the trap's vector (u64::MAX: none).
fn faulting(len: u64, f: impl FnOnce()) -> u64 {
    LAST_VECTOR.store(u64::MAX, Relaxed);
    SKIP.store(len, Relaxed);
    f();
    SKIP.store(0, Relaxed);
    LAST_VECTOR.load(Relaxed)
}

fn read_cr(n: u8) -> u64 {
    let v: u64;
    // SAFETY: reading a control register has no side effect.
    unsafe {
        match n {
            0 => asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)),
            3 => asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)),
            _ => asm!("mov {}, cr4", out(reg) v, options(nomem, nostack)),
        }
    }
    v
}

fn write_cr4(v: u64) {
    // SAFETY: callers write CR4 values that keep long mode (PAE set);
    // `mov cr4, rax` is 3 bytes (0F 22 E0) for the #GP checks.
    unsafe { asm!("mov cr4, rax", in("rax") v, options(nomem, nostack)) };
}

/// Reads a u32 of physical memory (identity-mapped below 4 GiB).
fn peek32(pa: u64) -> u32 {
    // SAFETY: `pa` is below 4 GiB, identity-mapped by this kernel's tables;
    // volatile for MMIO.
    unsafe { (pa as *const u32).read_volatile() }
}

fn poke32(pa: u64, v: u32) {
    // SAFETY: as peek32.
    unsafe { (pa as *mut u32).write_volatile(v) }
}

/// A C string in physical memory (the loader's), at most `max` bytes.
fn c_str(pa: u64, max: usize) -> &'static str {
    let mut n = 0;
    // SAFETY: the loader's NUL-terminated string in identity-mapped RAM;
    // we stop at NUL or `max`.
    while n < max && unsafe { ((pa + n as u64) as *const u8).read() } != 0 {
        n += 1;
    }
    // SAFETY: as above, `n` bytes inside it.
    let bytes = unsafe { core::slice::from_raw_parts(pa as *const u8, n) };
    core::str::from_utf8(bytes).unwrap_or("<not utf-8>")
}

struct Checks {
    failed: u32,
    passed: u32,
}

impl Checks {
    fn check(&mut self, name: &str, ok: bool, detail: core::fmt::Arguments<'_>) {
        if ok {
            self.passed += 1;
            let _ = writeln!(Serial, "mbtest: {name} ... ok");
        } else {
            self.failed += 1;
            let _ = writeln!(Serial, "mbtest: {name} ... FAILED: {detail}");
        }
    }
}

/// The IDT: 256 gates of 16 bytes.
static mut IDT: [[u64; 2]; 256] = [[0; 2]; 256];
/// The TSS (RSP0 for entries from ring 3).
static mut TSS: [u32; 26] = [0; 26];

fn gate(handler: unsafe extern "C" fn(), dpl: u64) -> [u64; 2] {
    let h = handler as usize as u64;
    let lo = (h & 0xFFFF) | 0x08 << 16 | (0x8E | dpl << 5) << 40 | ((h >> 16) & 0xFFFF) << 48;
    [lo, h >> 32]
}

fn setup_traps() {
    // SAFETY: one CPU, before any trap can come: nothing else uses the
    // IDT, the TSS or the GDT's TSS slot while they are written.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (v, h) in [
            (0, mbtest_isr0 as unsafe extern "C" fn()),
            (1, mbtest_isr1),
            (3, mbtest_isr3),
            (6, mbtest_isr6),
            (8, mbtest_isr8),
            (13, mbtest_isr13),
            (14, mbtest_isr14),
        ] {
            idt[v] = gate(h, 0);
        }
        idt[32] = gate(mbtest_isr32, 3);
        let tss = &mut *core::ptr::addr_of_mut!(TSS);
        let rsp0 = core::ptr::addr_of!(mbtest_stack_top) as u64 - 4096;
        tss[1] = rsp0 as u32;
        tss[2] = (rsp0 >> 32) as u32;
        let base = tss.as_ptr() as u64;
        let limit = 103u64;
        let gdt = &mut *core::ptr::addr_of_mut!(mbtest_gdt_tss);
        gdt[0] = limit | (base & 0xFF_FFFF) << 16 | 0x89 << 40 | ((base >> 24) & 0xFF) << 56;
        gdt[1] = base >> 32;
        let ptr: [u64; 2] = [
            ((core::mem::size_of::<[[u64; 2]; 256]>() as u64 - 1) | (idt.as_ptr() as u64) << 16),
            idt.as_ptr() as u64 >> 48,
        ];
        asm!("lidt [{}]", in(reg) ptr.as_ptr(), options(nostack));
        asm!("ltr ax", in("ax") 0x28u16, options(nomem, nostack));
    }
}

#[no_mangle]
extern "C" fn mbtest_main() -> ! {
    let _ = writeln!(Serial, "mbtest: in long mode; checking the platform");
    setup_traps();
    let mut c = Checks {
        failed: 0,
        passed: 0,
    };
    multiboot(&mut c);
    control_registers(&mut c);
    cpuid_filtered(&mut c);
    msrs(&mut c);
    exceptions(&mut c);
    single_step_fresh_stack(&mut c);
    page_zero_string_store(&mut c);
    ring3(&mut c);
    ports(&mut c);
    local_apic(&mut c);
    // The summary ends without a newline, as kvm-unit-tests' `dummy` ends
    // on "Dummy Hello World!": the platform must show a guest's last
    // partial line when the guest exits, or the runner misses the summary.
    let _ = write!(Serial, "mbtest: {} passed, {} failed", c.passed, c.failed);
    exit(c.failed)
}

fn multiboot(c: &mut Checks) {
    // SAFETY: written once by the 32-bit entry before any Rust code ran.
    let (magic, info) = unsafe { (mbtest_magic, u64::from(mbtest_info)) };
    c.check(
        "multiboot-magic",
        magic == 0x2BAD_B002,
        format_args!("EAX was {magic:#x}"),
    );
    if magic != 0x2BAD_B002 || info == 0 {
        return;
    }
    let flags = peek32(info);
    c.check(
        "multiboot-flags",
        flags & 0x4D == 0x4D,
        format_args!("flags {flags:#x} lack memory, cmdline, modules or mmap"),
    );
    let upper = u64::from(peek32(info + 8));
    c.check(
        "multiboot-mem-upper",
        upper >= 32 * 1024,
        format_args!("mem_upper {upper} KiB"),
    );
    let cmdline = c_str(u64::from(peek32(info + 16)), 256);
    let _ = writeln!(Serial, "mbtest: command line {cmdline:?}");
    let count = peek32(info + 20);
    let mods = u64::from(peek32(info + 24));
    let mut environ_ok = true;
    for i in 0..u64::from(count) {
        let (start, end) = (peek32(mods + i * 16), peek32(mods + i * 16 + 4));
        let name = c_str(u64::from(peek32(mods + i * 16 + 8)), 128);
        let len = end.saturating_sub(start) as usize;
        // SAFETY: the loader's module, in identity-mapped RAM.
        let bytes = unsafe { core::slice::from_raw_parts(start as usize as *const u8, len) };
        let _ = writeln!(Serial, "mbtest: module {i}: {len} bytes {name:?}");
        environ_ok &= start % 4096 == 0 && end >= start;
        if cmdline.contains("expect-environ") {
            environ_ok &= bytes.starts_with(b"NR_CPUS=1");
        }
    }
    c.check(
        "multiboot-modules",
        environ_ok && (count > 0 || !cmdline.contains("expect-environ")),
        format_args!("{count} module(s), page-aligned and as the command line expects"),
    );
}

fn control_registers(c: &mut Checks) {
    let efer = rdmsr(0xC000_0080);
    c.check(
        "long-mode-efer",
        efer & 0x500 == 0x500,
        format_args!("EFER {efer:#x} lacks LME|LMA"),
    );
    let (cr0, cr4) = (read_cr(0), read_cr(4));
    c.check(
        "long-mode-cr0-cr4",
        cr0 & 0x8000_0001 == 0x8000_0001 && cr4 & 0x20 != 0,
        format_args!("CR0 {cr0:#x}, CR4 {cr4:#x}"),
    );
    // The CR4 bit this kernel sets is the one it reads back.
    write_cr4(cr4 | 0x200);
    let with = read_cr(4);
    write_cr4(cr4 & !0x200);
    let without = read_cr(4);
    c.check(
        "cr4-reads-back",
        with & 0x200 != 0 && without & 0x200 == 0,
        format_args!("OSFXSR set: {with:#x}, cleared: {without:#x}"),
    );
    // A CR4 bit the platform does not implement (PKE: CPUID hides PKU)
    // raises #GP and changes nothing.
    let v = faulting(3, || write_cr4(cr4 | 1 << 22));
    let after = read_cr(4);
    c.check(
        "cr4-unsupported-bit-gp",
        v == 13 && after == cr4 & !0x200,
        format_args!("vector {v}, CR4 after {after:#x}"),
    );
}

fn cpuid_filtered(c: &mut Checks) {
    let l7 = cpuid(7, 0);
    let l1 = cpuid(1, 0);
    c.check(
        "cpuid-hides-pku-la57",
        l7[2] & (1 << 3 | 1 << 16) == 0,
        format_args!("leaf 7 ECX {:#x}", l7[2]),
    );
    c.check(
        "cpuid-hides-x2apic",
        l1[2] & 1 << 21 == 0,
        format_args!("leaf 1 ECX {:#x}", l1[2]),
    );
}

fn msrs(c: &mut Checks) {
    let apic = rdmsr(0x1B);
    c.check(
        "msr-apic-base",
        apic & 0xFFFF_F000 == 0xFEE0_0000 && apic & 0x800 != 0,
        format_args!("APIC_BASE {apic:#x}"),
    );
    wrmsr(0xC000_0101, 0x1234_5000);
    let gs = rdmsr(0xC000_0101);
    c.check(
        "msr-gs-base-round-trip",
        gs == 0x1234_5000,
        format_args!("GS_BASE read {gs:#x}"),
    );
    wrmsr(0xC001_0000, 0);
    let perf = rdmsr(0xC001_0004);
    c.check(
        "msr-perf-counters-harmless",
        perf == 0,
        format_args!("counter 0 read {perf:#x}"),
    );
    let v = faulting(2, || {
        // SAFETY: an MSR no one implements: the platform raises #GP,
        // which the trap handler skips (RDMSR is 2 bytes).
        unsafe {
            asm!("rdmsr", in("ecx") 0x4B56_4D00u32, out("eax") _, out("edx") _, options(nomem, nostack))
        }
    });
    c.check("msr-unknown-gp", v == 13, format_args!("vector {v}"));
}

fn exceptions(c: &mut Checks) {
    // SAFETY: UD2 raises #UD, skipped by the trap handler (2 bytes).
    let v = faulting(2, || unsafe { asm!("ud2", options(nomem, nostack)) });
    c.check("ud-delivered", v == 6, format_args!("vector {v}"));
    // 4 GiB and up is not mapped by this kernel's tables.
    let addr = 0x1_2345_6000u64;
    let v = faulting(3, || {
        // SAFETY: a read of an unmapped address: #PF, skipped by the
        // handler (`mov rax, [rcx]` is 3 bytes: 48 8B 01).
        unsafe { asm!("mov rax, [rcx]", in("rcx") addr, out("rax") _, options(nostack)) }
    });
    let (err, cr2) = (LAST_ERROR.load(Relaxed), LAST_CR2.load(Relaxed));
    c.check(
        "pf-not-present-read",
        v == 14 && err == 0 && cr2 == addr,
        format_args!("vector {v}, error {err:#x}, CR2 {cr2:#x}"),
    );
}

/// Physical page 0 filled with a string store and compared with a string
/// load, as kvm-unit-tests fills its AP trampoline page there: RAM like any
/// other page. A hypervisor that wrongly holds it write-protected (as a
/// page table) must emulate the store, and a string store is not emulated.
fn page_zero_string_store(c: &mut Checks) {
    let (left, equal): (u64, u8);
    // SAFETY: page 0 is RAM that nothing of this kernel uses (the loader's
    // info is at 0x9000) and is identity-mapped; REP STOSB and REPE SCASB
    // touch exactly its 4096 bytes; DF is clear (CLD at entry).
    unsafe {
        asm!(
            "xor edi, edi",
            "mov ecx, 4096",
            "rep stosb",
            "xor edi, edi",
            "mov ecx, 4096",
            "repe scasb",
            "sete dl",
            out("rdi") _,
            out("rcx") left,
            out("dl") equal,
            in("al") 0xCCu8,
            options(nostack),
        );
    }
    c.check(
        "page-zero-string-store",
        left == 0 && equal == 1,
        format_args!("{left} bytes not compared, last compare equal: {equal}"),
    );
}

/// A page of RAM no other check touches (96 MiB, inside the domain's 128):
/// its first use misses every MMU server's shadow.
const FRESH_STACK_TOP: u64 = 0x0600_1000;

/// A single-step trap whose delivery is the first touch of its stack: the
/// push misses the shadow, so the hypervisor sees a #PF while the CPU was
/// delivering the #DB, and must deliver the #DB again after fixing the
/// shadow. A trap is not raised again by re-executing anything (RIP is
/// already past the instruction), so losing it shows: the next trap would
/// come one instruction later.
fn single_step_fresh_stack(c: &mut Checks) {
    LAST_VECTOR.store(u64::MAX, Relaxed);
    let expected: u64;
    // SAFETY: POPFQ sets TF; the instruction after it moves RSP to a page
    // of RAM this kernel identity-maps and nothing else uses, on which the
    // single-step trap after that instruction is delivered; the handler
    // clears TF in the frame it returns through; RSP is restored before
    // any other use of the stack.
    unsafe {
        asm!(
            "mov {saved}, rsp",
            "lea {expected}, [rip + 2f]",
            "pushfq",
            "or qword ptr [rsp], 0x100",
            "popfq",
            "mov rsp, {fresh}",
            "2: nop",
            "mov rsp, {saved}",
            saved = out(reg) _,
            expected = out(reg) expected,
            fresh = in(reg) FRESH_STACK_TOP,
        );
    }
    let (v, rip) = (LAST_VECTOR.load(Relaxed), LAST_RIP.load(Relaxed));
    c.check(
        "db-trap-delivered-on-fresh-stack",
        v == 1 && rip == expected,
        format_args!("vector {v}, at {rip:#x}, expected at {expected:#x}"),
    );
}

fn ring3(c: &mut Checks) {
    LAST_VECTOR.store(u64::MAX, Relaxed);
    // SAFETY: enters ring 3 at code this kernel mapped user-accessible; it
    // comes back through `int 0x20` (the trap handler resumes the kernel
    // at `mbtest_user_return`, which restores the callee-saved registers).
    unsafe { mbtest_run_user() };
    let (v, cs, rax) = (
        LAST_VECTOR.load(Relaxed),
        LAST_CS.load(Relaxed),
        LAST_RAX.load(Relaxed),
    );
    c.check(
        "ring3-int-dpl3-gate",
        v == 32 && cs & 3 == 3 && rax == 0x5eed,
        format_args!("vector {v}, CS {cs:#x}, RAX {rax:#x}"),
    );
}

fn ports(c: &mut Checks) {
    let lsr = inb(0x3FD);
    c.check(
        "serial-line-status",
        lsr & 0x60 == 0x60,
        format_args!("LSR {lsr:#x}"),
    );
    outb(0x21, 0xFB);
    let mask = inb(0x21);
    outb(0x21, 0xFF);
    c.check(
        "pic-mask-reads-back",
        mask == 0xFB,
        format_args!("mask read {mask:#x}"),
    );
    let nothing = inb(0x2F0);
    c.check(
        "unassigned-port-all-ones",
        nothing == 0xFF,
        format_args!("port 0x2f0 read {nothing:#x}"),
    );
    outw(0x510, 0);
    let sig = [inb(0x511), inb(0x511), inb(0x511), inb(0x511)];
    outw(0x510, 5);
    let cpus = u16::from_le_bytes([inb(0x511), inb(0x511)]);
    c.check(
        "fw-cfg-one-cpu",
        &sig == b"QEMU" && cpus == 1,
        format_args!("signature {sig:?}, CPUs {cpus}"),
    );
}

fn local_apic(c: &mut Checks) {
    let base = rdmsr(0x1B) & 0xFFFF_F000;
    let id = peek32(base + 0x20) >> 24;
    let version = peek32(base + 0x30) & 0xFF;
    poke32(base + 0xF0, 0x1FF);
    let svr = peek32(base + 0xF0);
    c.check(
        "apic-mmio",
        id == 0 && version >= 0x10 && svr & 0x1FF == 0x1FF,
        format_args!("ID {id}, version {version:#x}, SVR {svr:#x}"),
    );
    poke32(base + 0x80, 0x20);
    let tpr = peek32(base + 0x80);
    poke32(base + 0xB0, 0);
    // INIT then SIPI to all but self, as an SMP test kernel starts its
    // APs: with one CPU they start nothing, and the ICR is never busy.
    let mut busy = 0;
    for icr in [0x000C_4500u32, 0x000C_4608] {
        poke32(base + 0x310, 0);
        poke32(base + 0x300, icr);
        busy |= peek32(base + 0x300) & 1 << 12;
    }
    c.check(
        "apic-tpr-eoi-init-sipi",
        tpr == 0x20 && busy == 0,
        format_args!("TPR read {tpr:#x}, ICR busy {busy:#x}"),
    );
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    let _ = writeln!(Serial, "mbtest: panic: {info}");
    exit(0xFF)
}
