//! The guest kernels' runtime: console, hypercalls, exit, a #PF handler with
//! fault-probing accessors, and page-table editing through the direct map.
//!
//! Everything here runs INSIDE a guest, from the guest's private copy of the
//! kernel image: it must only touch guest memory (its stack, the direct map,
//! the workload region) and never a kernel static.

use abi::guest::{hc, pte, DomainInfo, VcpuInfo, CONSOLE_PORT, DIRECT_BASE, EXIT_PORT};
use core::arch::{asm, global_asm};
use core::sync::atomic::Ordering;

// The guest's #PF entry stub and the fault-probing accessors. A fault on a
// probe's marked instruction resumes at the probe's fixup, which returns 1.
global_asm!(
    ".global umbra_guest_pf_entry",
    "umbra_guest_pf_entry:",
    "push rax",
    "push rcx",
    "push rdx",
    "push rsi",
    "push rdi",
    "push r8",
    "push r9",
    "push r10",
    "push r11",
    "mov rdi, rsp",
    "sub rsp, 8",
    "call {handler}",
    "add rsp, 8",
    "pop r11",
    "pop r10",
    "pop r9",
    "pop r8",
    "pop rdi",
    "pop rsi",
    "pop rdx",
    "pop rcx",
    "pop rax",
    "add rsp, 8",
    "iretq",
    ".global umbra_guest_probe_read",
    "umbra_guest_probe_read:",
    ".global umbra_guest_probe_read_insn",
    "umbra_guest_probe_read_insn:",
    "mov rax, [rdi]",
    "mov [rsi], rax",
    "xor eax, eax",
    "ret",
    ".global umbra_guest_probe_write",
    "umbra_guest_probe_write:",
    ".global umbra_guest_probe_write_insn",
    "umbra_guest_probe_write_insn:",
    "mov [rdi], rsi",
    "xor eax, eax",
    "ret",
    ".global umbra_guest_probe_fixup",
    "umbra_guest_probe_fixup:",
    "mov eax, 1",
    "ret",
    handler = sym guest_pf_handler,
);

unsafe extern "C" {
    /// The guest IDT's #PF gate points here.
    pub fn umbra_guest_pf_entry();
    fn umbra_guest_probe_read(addr: u64, out: *mut u64) -> u64;
    fn umbra_guest_probe_write(addr: u64, value: u64) -> u64;
    static umbra_guest_probe_read_insn: u8;
    static umbra_guest_probe_write_insn: u8;
    static umbra_guest_probe_fixup: u8;
}

/// A probe's access faulted (the fault is recorded in the vCPU's info).
#[derive(Clone, Copy, Debug)]
pub struct Faulted;

/// Reads a u64 at `addr`, or `Faulted`.
pub fn probe_read(addr: u64) -> Result<u64, Faulted> {
    let mut v = 0u64;
    // SAFETY: the probe either reads `addr` or takes a #PF that the handler
    // turns into a return of 1; `v` is a valid out pointer.
    let faulted = unsafe { umbra_guest_probe_read(addr, &mut v) };
    if faulted == 0 {
        Ok(v)
    } else {
        Err(Faulted)
    }
}

/// Writes a u64 at `addr`, or `Faulted`.
pub fn probe_write(addr: u64, value: u64) -> Result<(), Faulted> {
    // SAFETY: as probe_read; a faulting store has no effect.
    let faulted = unsafe { umbra_guest_probe_write(addr, value) };
    if faulted == 0 {
        Ok(())
    } else {
        Err(Faulted)
    }
}

/// This vCPU's info block (through GS, which the loader points at it).
pub fn vcpu() -> &'static mut VcpuInfo {
    let p: u64;
    // SAFETY: gs:[0] holds the VcpuInfo's own address (set by the loader).
    unsafe { asm!("mov {}, gs:[0]", out(reg) p, options(nostack, readonly, preserves_flags)) };
    // SAFETY: the loader mapped a VcpuInfo there, private to this vCPU.
    unsafe { &mut *(p as *mut VcpuInfo) }
}

/// The domain's shared info block.
pub fn domain() -> &'static DomainInfo {
    // SAFETY: the loader wrote a DomainInfo at the address in domain_gva;
    // its shared fields are atomics.
    unsafe { &*(vcpu().domain_gva as *const DomainInfo) }
}

/// Pointer into the direct map for a guest-physical address.
pub fn phys<T>(gpa: u64) -> *mut T {
    (DIRECT_BASE + gpa) as *mut T
}

/// Reads the u64 at guest-physical `gpa`.
pub fn rd(gpa: u64) -> u64 {
    // SAFETY: the direct map covers all guest memory; callers pass gpas below
    // mem_bytes, 8-aligned.
    unsafe { phys::<u64>(gpa).read_volatile() }
}

/// Writes the u64 at guest-physical `gpa`.
pub fn wr(gpa: u64, v: u64) {
    // SAFETY: as rd.
    unsafe { phys::<u64>(gpa).write_volatile(v) }
}

/// Writes one byte to the guest console.
pub fn putc(b: u8) {
    // SAFETY: port I/O is intercepted by the hypervisor (IOIO).
    unsafe {
        asm!("out dx, al", in("dx") CONSOLE_PORT, in("al") b, options(nomem, nostack, preserves_flags))
    };
}

/// Writes a string to the guest console.
pub fn puts(s: &str) {
    for b in s.bytes() {
        putc(b);
    }
}

/// Writes `v` in hex to the guest console.
pub fn puthex(v: u64) {
    puts("0x");
    let mut started = false;
    for i in (0..16).rev() {
        let d = ((v >> (i * 4)) & 0xF) as u8;
        if d != 0 || started || i == 0 {
            started = true;
            putc(if d < 10 { b'0' + d } else { b'a' + d - 10 });
        }
    }
}

/// VMMCALL with up to three arguments; the result comes back in RAX.
pub fn hypercall(nr: u64, a: u64, b: u64, c: u64) -> u64 {
    let ret: u64;
    // SAFETY: VMMCALL is intercepted; the hypervisor preserves every register
    // except RAX.
    unsafe {
        asm!("vmmcall", inout("rax") nr => ret, in("rdi") a, in("rsi") b, in("rdx") c, options(nostack))
    };
    ret
}

/// Ends this vCPU with `code` through the exit port.
pub fn exit(code: u32) -> ! {
    loop {
        // SAFETY: the exit port is intercepted; the hypervisor never resumes
        // this vCPU after it.
        unsafe { asm!("out dx, eax", in("dx") EXIT_PORT, in("eax") code, options(nomem, nostack)) };
    }
}

/// Reports the verdict and ends the vCPU.
pub fn finish(pass: bool, detail: u64) -> ! {
    hypercall(hc::REPORT, pass as u64, detail, 0);
    exit(if pass { 0 } else { 1 })
}

/// Fails the workload with a message and a value.
pub fn fail(what: &str, value: u64) -> ! {
    puts("FAIL: ");
    puts(what);
    puts(" ");
    puthex(value);
    puts("\n");
    finish(false, value)
}

/// Reads the time-stamp counter (not intercepted: the host rate, see
/// `DomainInfo::tsc_per_ms`).
pub fn rdtsc() -> u64 {
    // SAFETY: RDTSC is unprivileged, present on x86-64 and has no side effect.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per millisecond: the kernel's calibration, or
/// `abi::guest::DEFAULT_TSC_PER_MS` when it gave none.
pub fn tsc_per_ms() -> u64 {
    match domain().tsc_per_ms {
        0 => abi::guest::DEFAULT_TSC_PER_MS,
        t => t,
    }
}

/// Gives the pCPU away for a moment (the hypervisor treats HLT as a yield).
pub fn yield_now() {
    // SAFETY: HLT is intercepted and simply resumes after it.
    unsafe { asm!("hlt", options(nomem, nostack, preserves_flags)) };
}

/// Loads CR3 (intercepted: the shadow MMU sees the switch).
pub fn write_cr3(l4_gpa: u64) {
    vcpu().cur_l4 = l4_gpa;
    // SAFETY: the guest owns its address spaces; CR3 writes are intercepted.
    unsafe { asm!("mov cr3, {}", in(reg) l4_gpa, options(nostack)) };
}

/// Reads CR3 (intercepted: returns the guest's own value, not the shadow).
pub fn read_cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effect.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack)) };
    v
}

/// Reads CR0 (intercepted: the guest's own value, not the hardware's).
pub fn read_cr0() -> u64 {
    let v: u64;
    // SAFETY: reading CR0 has no side effect.
    unsafe { asm!("mov {}, cr0", out(reg) v, options(nomem, nostack)) };
    v
}

/// Writes CR0 (intercepted: the guest's value is kept; a change of CR0.WP
/// reaches the shadow MMU).
pub fn write_cr0(v: u64) {
    // SAFETY: the guest changes only bits that keep its paging mode (CR0.WP,
    // AM, TS); the write is intercepted.
    unsafe { asm!("mov cr0, {}", in(reg) v, options(nostack)) };
}

/// INVLPG (intercepted).
pub fn invlpg(gva: u64) {
    // SAFETY: flushing a TLB entry is always safe.
    unsafe { asm!("invlpg [{}]", in(reg) gva, options(nostack)) };
}

/// Allocates one zeroed guest page, failing the workload when memory runs out.
pub fn alloc_page() -> u64 {
    let Some(gpa) = domain().alloc(4096, 4096) else {
        fail("out of guest memory", domain().mem_bytes)
    };
    for i in 0..512 {
        wr(gpa + i * 8, 0);
    }
    gpa
}

/// Takes the domain's page-table lock (yielding while it is held).
pub fn pt_lock() {
    let d = domain();
    while d
        .pt_lock
        .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        yield_now();
    }
}

/// Releases the page-table lock.
pub fn pt_unlock() {
    domain().pt_lock.store(0, Ordering::Release);
}

/// Index of `gva` at paging `level` (4 = L4 .. 1 = PT).
pub fn index(gva: u64, level: u32) -> u64 {
    (gva >> (12 + 9 * (level - 1))) & 511
}

/// Walks from `l4` towards `gva` down to the table at `level`, creating
/// missing tables; returns the gpa of the entry at `level`.
pub fn entry_gpa(l4: u64, gva: u64, level: u32) -> u64 {
    let mut table = l4;
    let mut lvl = 4;
    while lvl > level {
        let e = table + index(gva, lvl) * 8;
        let mut v = rd(e);
        if v & pte::P == 0 {
            v = alloc_page() | pte::P | pte::W;
            wr(e, v);
        } else if v & pte::PS != 0 {
            fail("large page in the way at", gva);
        }
        table = v & pte::ADDR;
        lvl -= 1;
    }
    table + index(gva, level) * 8
}

/// Maps the 4 KiB page at `gva` to `gpa` with `flags` in `l4`.
pub fn map4k(l4: u64, gva: u64, gpa: u64, flags: u64) {
    wr(entry_gpa(l4, gva, 1), gpa | flags | pte::P);
}

/// The gpa of the PTE mapping `gva` (creating tables as needed).
pub fn pte_gpa(l4: u64, gva: u64) -> u64 {
    entry_gpa(l4, gva, 1)
}

/// A simple xorshift generator.
pub struct Rng(pub u64);
impl Rng {
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Waits until `shared[slot]` reaches `value`, yielding meanwhile.
pub fn wait_for(slot: usize, value: u64) {
    while domain().shared[slot].load(Ordering::Acquire) < value {
        yield_now();
    }
}

/// A barrier over all vCPUs of the domain on counter `slot` (generation `n`,
/// starting at 1).
pub fn barrier(slot: usize, n: u64) {
    let d = domain();
    d.shared[slot].fetch_add(1, Ordering::AcqRel);
    wait_for(slot, n * d.vcpus);
}

/// The guest's #PF handler: a probe's fault resumes at the probe fixup; a
/// not-present fault in the demand region allocates and maps a page;
/// anything else fails the workload.
extern "C" fn guest_pf_handler(frame: *mut u64) {
    let cr2: u64;
    // SAFETY: reading CR2 has no side effect (the hypervisor sets it when it
    // injects the fault).
    unsafe { asm!("mov {}, cr2", out(reg) cr2, options(nomem, nostack)) };
    // SAFETY: the entry stub passes a pointer to its saved registers: 9 GPRs,
    // then the error code and the interrupt frame (RIP first).
    let (err, rip) = unsafe { (*frame.add(9), &mut *frame.add(10)) };
    let v = vcpu();
    v.faults += 1;
    v.last_fault_addr = cr2;
    v.last_fault_err = err;
    let read_insn = &raw const umbra_guest_probe_read_insn as u64;
    let write_insn = &raw const umbra_guest_probe_write_insn as u64;
    if *rip == read_insn || *rip == write_insn {
        *rip = &raw const umbra_guest_probe_fixup as u64;
        return;
    }
    if err & 1 == 0 && cr2 >= v.demand_lo && cr2 < v.demand_hi {
        pt_lock();
        let e = pte_gpa(v.cur_l4, cr2);
        if rd(e) & pte::P == 0 {
            let page = alloc_page();
            wr(e, page | pte::P | pte::W | v.demand_pte_flags);
        }
        pt_unlock();
        v.demand_fixed += 1;
        return;
    }
    puts("unexpected #PF at ");
    puthex(cr2);
    puts(" err ");
    puthex(err);
    puts(" rip ");
    puthex(*rip);
    puts("\n");
    finish(false, cr2)
}

/// Writes `v` in decimal to the guest console.
pub fn putdec(v: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    let mut v = v;
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for &b in &buf[i..] {
        putc(b);
    }
}
