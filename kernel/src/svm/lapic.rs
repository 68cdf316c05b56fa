//! The local APIC an unmodified guest sees: xAPIC MMIO registers at the guest's APIC base, emulated one access at a time.
//!
//! Enough for a one-vCPU test kernel: it reads its ID and version, enables
//! the APIC through the spurious-vector register, sets the task priority,
//! writes EOI, and sends INIT and SIPI through the ICR (which start nothing:
//! there is no other vCPU), polling the ICR's delivery status, which is
//! never busy. The LVT entries, the error status and the timer registers
//! keep what is written; the timer never counts and raises nothing. An
//! offset outside the register file reads 0 and ignores writes, as unused
//! APIC space does.

/// Bytes of the register page.
pub const PAGE: u64 = 4096;

/// Register offsets.
mod reg {
    pub const ID: u64 = 0x20;
    pub const VERSION: u64 = 0x30;
    pub const TPR: u64 = 0x80;
    pub const APR: u64 = 0x90;
    pub const PPR: u64 = 0xA0;
    pub const EOI: u64 = 0xB0;
    pub const LDR: u64 = 0xD0;
    pub const DFR: u64 = 0xE0;
    pub const SVR: u64 = 0xF0;
    pub const ESR: u64 = 0x280;
    pub const ICR_LOW: u64 = 0x300;
    pub const ICR_HIGH: u64 = 0x310;
    pub const LVT_FIRST: u64 = 0x320;
    pub const LVT_LAST: u64 = 0x370;
    pub const TIMER_INITIAL: u64 = 0x380;
    pub const TIMER_CURRENT: u64 = 0x390;
    pub const TIMER_DIVIDE: u64 = 0x3E0;
}

/// Version register: version 0x14 (an integrated APIC), 6 LVT entries.
const VERSION: u32 = 0x0005_0014;
/// An LVT entry at reset: masked.
const LVT_MASKED: u32 = 1 << 16;
/// ICR delivery status (never set: a send completes at once).
const ICR_BUSY: u32 = 1 << 12;

/// One vCPU's local APIC registers.
#[derive(Clone, Debug)]
pub struct Lapic {
    id: u32,
    tpr: u32,
    ldr: u32,
    dfr: u32,
    svr: u32,
    esr: u32,
    icr_low: u32,
    icr_high: u32,
    lvt: [u32; 6],
    timer_initial: u32,
    timer_divide: u32,
    /// INIT and SIPI messages sent (they start nothing).
    pub ipis_sent: u32,
}

impl Lapic {
    /// The APIC of vCPU `id` at reset.
    pub const fn new(id: u32) -> Lapic {
        Lapic {
            id,
            tpr: 0,
            ldr: 0,
            dfr: 0xFFFF_FFFF,
            svr: 0xFF,
            esr: 0,
            icr_low: 0,
            icr_high: 0,
            lvt: [LVT_MASKED; 6],
            timer_initial: 0,
            timer_divide: 0,
            ipis_sent: 0,
        }
    }

    fn lvt_index(offset: u64) -> Option<usize> {
        (reg::LVT_FIRST..=reg::LVT_LAST)
            .contains(&offset)
            .then(|| ((offset - reg::LVT_FIRST) / 0x10) as usize)
    }

    /// A 32-bit read at `offset` into the register page.
    pub fn read(&self, offset: u64) -> u32 {
        match offset & !0xF {
            reg::ID => self.id << 24,
            reg::VERSION => VERSION,
            reg::TPR => self.tpr,
            reg::APR | reg::PPR => self.tpr & 0xF0,
            reg::LDR => self.ldr,
            reg::DFR => self.dfr,
            reg::SVR => self.svr,
            reg::ESR => self.esr,
            reg::ICR_LOW => self.icr_low & !ICR_BUSY,
            reg::ICR_HIGH => self.icr_high,
            reg::TIMER_INITIAL => self.timer_initial,
            reg::TIMER_CURRENT => 0,
            reg::TIMER_DIVIDE => self.timer_divide,
            o => Self::lvt_index(o).map_or(0, |i| self.lvt[i]),
        }
    }

    /// A 32-bit write of `value` at `offset` into the register page.
    pub fn write(&mut self, offset: u64, value: u32) {
        match offset & !0xF {
            reg::TPR => self.tpr = value & 0xFF,
            reg::LDR => self.ldr = value & 0xFF00_0000,
            reg::DFR => self.dfr = value | 0x0FFF_FFFF,
            reg::SVR => self.svr = value & 0x1FF,
            // Writing ESR latches errors; there are none.
            reg::ESR => self.esr = 0,
            reg::ICR_LOW => {
                self.icr_low = value & !ICR_BUSY;
                self.ipis_sent += 1;
            }
            reg::ICR_HIGH => self.icr_high = value & 0xFF00_0000,
            reg::TIMER_INITIAL => self.timer_initial = value,
            reg::TIMER_DIVIDE => self.timer_divide = value & 0xB,
            // End of interrupt: none is ever in service.
            reg::EOI => {}
            // ID, version and read-only registers: nothing to keep.
            o => {
                if let Some(i) = Self::lvt_index(o) {
                    self.lvt[i] = value;
                }
            }
        }
    }
}
