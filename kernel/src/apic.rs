//! Local APIC (xAPIC, MMIO): enable, EOI, IPIs, INIT/SIPI, and the timer calibrated against the PIT.
//!
//! Time is kept with the TSC (calibrated against PIT channel 2 once, on the
//! bootstrap CPU); the local APIC timer runs periodically at [`TIMER_HZ`].

use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::instructions::port::Port;
use x86_64::registers::model_specific::Msr;

/// Vector of the periodic local APIC timer.
pub const TIMER_VECTOR: u8 = 0xEF;
/// Vector of the spurious interrupt (never acknowledged).
pub const SPURIOUS_VECTOR: u8 = 0xFF;
/// Periodic timer frequency.
pub const TIMER_HZ: u64 = 100;

const REG_ID: usize = 0x20;
const REG_EOI: usize = 0xB0;
const REG_SVR: usize = 0xF0;
const REG_ICR_LOW: usize = 0x300;
const REG_ICR_HIGH: usize = 0x310;
const REG_LVT_TIMER: usize = 0x320;
const REG_TIMER_INIT: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3E0;
const ICR_PENDING: u32 = 1 << 12;
const IA32_APIC_BASE: u32 = 0x1B;

/// The architectural default base of the local APIC.
const DEFAULT_BASE: u64 = 0xFEE0_0000;
/// Where the boot page tables map MMIO: the top GiB of the identity map,
/// uncached (see [`crate::boot`]).
const UNCACHED: core::ops::Range<u64> = (3 << 30)..(4 << 30);

static BASE: AtomicU64 = AtomicU64::new(DEFAULT_BASE);
static TSC_PER_MS: AtomicU64 = AtomicU64::new(0);
static APIC_TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

fn reg(offset: usize) -> *mut u32 {
    (BASE.load(Ordering::Relaxed) as usize + offset) as *mut u32
}

fn read(offset: usize) -> u32 {
    // SAFETY: BASE is the default or a base `set_base` checked: a page in
    // the uncached top GiB of the identity map, so the APIC registers are
    // mapped (uncached, as MMIO must be) at their physical address.
    // `offset` is one of the architectural register offsets (below 4 KiB,
    // 16-byte aligned), and the page belongs to no Rust allocation, so a
    // volatile 32-bit access there touches only the device.
    unsafe { reg(offset).read_volatile() }
}

fn write(offset: usize, value: u32) {
    // SAFETY: as in `read`. A register write acts on the APIC (EOI, IPIs,
    // timer), never on memory Rust code can see.
    unsafe { reg(offset).write_volatile(value) }
}

/// Sets the local APIC's physical base (from the MADT).
///
/// Panics if `base` is not a page in the uncached top GiB of the identity
/// map (where every PC puts it): register accesses would miss the device
/// or hit cached RAM.
pub fn set_base(base: u64) {
    assert!(
        UNCACHED.contains(&base) && base.is_multiple_of(4096),
        "local APIC base {base:#x} is not a page in the uncached identity map {UNCACHED:#x?}"
    );
    BASE.store(base, Ordering::Relaxed);
}

/// Masks every line of the two legacy 8259 PICs (the BIOS leaves the PIT's
/// IRQ 0 on vector 8, which would look like a double fault).
pub fn mask_legacy_pic() {
    // SAFETY: writing the PICs' interrupt mask registers only masks lines.
    unsafe {
        Port::<u8>::new(0x21).write(0xFF);
        Port::<u8>::new(0xA1).write(0xFF);
    }
}

/// Enables this CPU's local APIC (global enable bit and spurious vector).
pub fn enable() {
    let mut msr = Msr::new(IA32_APIC_BASE);
    // SAFETY: IA32_APIC_BASE exists on every x86-64 CPU; setting bit 11
    // (global enable) keeps the base address unchanged.
    unsafe {
        let v = msr.read();
        msr.write(v | (1 << 11));
    }
    write(REG_SVR, 0x100 | SPURIOUS_VECTOR as u32);
}

/// This CPU's local APIC id.
pub fn id() -> u32 {
    read(REG_ID) >> 24
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}

fn send_icr(apic_id: u32, low: u32) {
    while read(REG_ICR_LOW) & ICR_PENDING != 0 {
        core::hint::spin_loop();
    }
    write(REG_ICR_HIGH, apic_id << 24);
    write(REG_ICR_LOW, low);
}

/// Sends a fixed interrupt `vector` to the CPU with `apic_id`.
/// Call with interrupts disabled (the ICR is written in two steps).
pub fn send_ipi(apic_id: u32, vector: u8) {
    send_icr(apic_id, (1 << 14) | vector as u32);
}

/// Sends INIT (assert) to `apic_id`.
pub fn send_init(apic_id: u32) {
    send_icr(apic_id, 0x4500);
}

/// Sends a startup IPI: the CPU starts in real mode at `page * 4096`.
pub fn send_sipi(apic_id: u32, page: u8) {
    send_icr(apic_id, 0x4600 | page as u32);
}

/// Reads the time-stamp counter.
pub fn tsc() -> u64 {
    // SAFETY: RDTSC is unprivileged and always present on x86-64.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// TSC ticks per millisecond (0 before calibration).
pub fn tsc_per_ms() -> u64 {
    TSC_PER_MS.load(Ordering::Relaxed)
}

/// Microseconds between two TSC readings.
pub fn tsc_to_us(delta: u64) -> u64 {
    delta.saturating_mul(1000) / tsc_per_ms().max(1)
}

/// Busy-waits for `us` microseconds (after calibration).
pub fn delay_us(us: u64) {
    let end = tsc() + us * tsc_per_ms() / 1000;
    while tsc() < end {
        core::hint::spin_loop();
    }
}

/// Measures the TSC and the local APIC timer against PIT channel 2
/// (one-shot, polled through port 0x61): `runs` windows of `ms` each, keeping
/// the shortest, since a late-noticed PIT expiry (the vCPU thread was
/// descheduled on a busy host) only ever lengthens a window. Bootstrap CPU only.
pub fn calibrate(runs: u32, ms: u64) {
    let (mut best_tsc, mut best_apic) = (u64::MAX, 0u64);
    for _ in 0..runs {
        let (tsc_delta, apic_delta) = pit_window(ms);
        if tsc_delta < best_tsc {
            (best_tsc, best_apic) = (tsc_delta, apic_delta);
        }
    }
    TSC_PER_MS.store((best_tsc / ms).max(1), Ordering::Relaxed);
    APIC_TICKS_PER_MS.store((best_apic / ms).max(1), Ordering::Relaxed);
}

/// One PIT window of `ms`: (TSC ticks, local APIC timer ticks at divide 1).
fn pit_window(ms: u64) -> (u64, u64) {
    const PIT_HZ: u64 = 1_193_182;
    let count = (PIT_HZ * ms / 1000) as u16;
    let mut gate: Port<u8> = Port::new(0x61);
    let mut cmd: Port<u8> = Port::new(0x43);
    let mut ch2: Port<u8> = Port::new(0x42);
    // Local APIC timer: divide by 1.
    write(REG_TIMER_DIVIDE, 0b1011);
    // SAFETY: the PIT and the speaker gate are legacy ISA devices the kernel
    // owns; channel 2 is not used for anything else.
    let (t0, t1, apic_elapsed) = unsafe {
        let g = gate.read();
        gate.write((g & !0x02) | 0x01); // gate on, speaker off
        cmd.write(0b1011_0000); // channel 2, lo/hi byte, mode 0, binary
        ch2.write(count as u8);
        write(REG_TIMER_INIT, u32::MAX);
        let t0 = tsc();
        ch2.write((count >> 8) as u8); // counting starts now
        while gate.read() & 0x20 == 0 {
            core::hint::spin_loop();
        }
        let t1 = tsc();
        (t0, t1, u32::MAX - read(REG_TIMER_CURRENT))
    };
    write(REG_TIMER_INIT, 0);
    (t1 - t0, apic_elapsed as u64)
}

/// Local APIC timer ticks per millisecond (divide by 1).
pub fn apic_ticks_per_ms() -> u64 {
    APIC_TICKS_PER_MS.load(Ordering::Relaxed)
}

/// Starts this CPU's periodic timer at [`TIMER_HZ`] on [`TIMER_VECTOR`].
pub fn start_timer() {
    let period = (apic_ticks_per_ms() * 1000 / TIMER_HZ).clamp(1, u32::MAX as u64);
    write(REG_TIMER_DIVIDE, 0b1011);
    write(REG_LVT_TIMER, (1 << 17) | TIMER_VECTOR as u32);
    write(REG_TIMER_INIT, period as u32);
}
