//! The VMCB: one 4 KiB page per vCPU, control area then state-save area, at
//! the byte offsets given by the AMD64 APM vol. 2, appendix B.
//!
//! Fields are reached through typed accessors at named offsets rather than a
//! packed struct, so every offset is written once, next to its APM name.

/// Control-area and save-area offsets (APM vol. 2, tables B-1 and B-2).
#[allow(missing_docs)]
pub mod off {
    pub const INTERCEPT_CR: usize = 0x000;
    pub const INTERCEPT_DR: usize = 0x004;
    pub const INTERCEPT_EXCEPTIONS: usize = 0x008;
    pub const INTERCEPT_MISC1: usize = 0x00C;
    pub const INTERCEPT_MISC2: usize = 0x010;
    pub const IOPM_BASE_PA: usize = 0x040;
    pub const MSRPM_BASE_PA: usize = 0x048;
    pub const TSC_OFFSET: usize = 0x050;
    pub const GUEST_ASID: usize = 0x058;
    pub const TLB_CONTROL: usize = 0x05C;
    pub const INT_CTL: usize = 0x060;
    pub const INT_STATE: usize = 0x068;
    pub const EXITCODE: usize = 0x070;
    pub const EXITINFO1: usize = 0x078;
    pub const EXITINFO2: usize = 0x080;
    pub const EXITINTINFO: usize = 0x088;
    pub const NP_ENABLE: usize = 0x090;
    pub const EVENTINJ: usize = 0x0A8;
    pub const N_CR3: usize = 0x0B0;
    pub const VMCB_CLEAN: usize = 0x0C0;
    pub const NRIP: usize = 0x0C8;

    // State-save area, starting at 0x400.
    pub const ES: usize = 0x400;
    pub const CS: usize = 0x410;
    pub const SS: usize = 0x420;
    pub const DS: usize = 0x430;
    pub const FS: usize = 0x440;
    pub const GS: usize = 0x450;
    pub const GDTR: usize = 0x460;
    pub const LDTR: usize = 0x470;
    pub const IDTR: usize = 0x480;
    pub const TR: usize = 0x490;
    pub const CPL: usize = 0x4CB;
    pub const EFER: usize = 0x4D0;
    pub const CR4: usize = 0x548;
    pub const CR3: usize = 0x550;
    pub const CR0: usize = 0x558;
    pub const DR7: usize = 0x560;
    pub const DR6: usize = 0x568;
    pub const RFLAGS: usize = 0x570;
    pub const RIP: usize = 0x578;
    pub const RSP: usize = 0x5D8;
    pub const RAX: usize = 0x5F8;
    pub const STAR: usize = 0x600;
    pub const LSTAR: usize = 0x608;
    pub const CSTAR: usize = 0x610;
    pub const SFMASK: usize = 0x618;
    pub const KERNEL_GS_BASE: usize = 0x620;
    pub const SYSENTER_CS: usize = 0x628;
    pub const SYSENTER_ESP: usize = 0x630;
    pub const SYSENTER_EIP: usize = 0x638;
    pub const CR2: usize = 0x640;
    pub const G_PAT: usize = 0x668;
}

/// Intercept bits of the word at 0x00C (APM table B-1).
#[allow(missing_docs)]
pub mod misc1 {
    pub const INTR: u32 = 1 << 0;
    pub const NMI: u32 = 1 << 1;
    pub const SMI: u32 = 1 << 2;
    pub const INIT: u32 = 1 << 3;
    pub const CR0_SEL_WRITE: u32 = 1 << 5;
    pub const CPUID: u32 = 1 << 18;
    pub const INVD: u32 = 1 << 22;
    pub const HLT: u32 = 1 << 24;
    pub const INVLPG: u32 = 1 << 25;
    pub const INVLPGA: u32 = 1 << 26;
    pub const IOIO_PROT: u32 = 1 << 27;
    pub const MSR_PROT: u32 = 1 << 28;
    pub const TASK_SWITCH: u32 = 1 << 29;
    pub const SHUTDOWN: u32 = 1 << 31;
}

/// Intercept bits of the word at 0x010 (APM table B-1).
#[allow(missing_docs)]
pub mod misc2 {
    pub const VMRUN: u32 = 1 << 0;
    pub const VMMCALL: u32 = 1 << 1;
    pub const VMLOAD: u32 = 1 << 2;
    pub const VMSAVE: u32 = 1 << 3;
    pub const STGI: u32 = 1 << 4;
    pub const CLGI: u32 = 1 << 5;
    pub const SKINIT: u32 = 1 << 6;
    pub const RDTSCP: u32 = 1 << 7;
    pub const ICEBP: u32 = 1 << 8;
    pub const WBINVD: u32 = 1 << 9;
    pub const MONITOR: u32 = 1 << 10;
    pub const MWAIT: u32 = 1 << 11;
    pub const XSETBV: u32 = 1 << 13;
}

/// `V_INTR_MASKING` in the INT_CTL word: the host's RFLAGS.IF governs
/// physical interrupts while the guest runs, so they become INTR exits.
pub const V_INTR_MASKING: u64 = 1 << 24;

/// TLB_CONTROL value: flush the whole TLB (every ASID) on this VMRUN. TCG
/// supports only this one, not flush-by-ASID.
pub const TLB_FLUSH_ALL: u8 = 1;

/// EVENTINJ: valid bit, "error code valid" bit, type exception (3).
pub const EVENTINJ_VALID: u64 = 1 << 31;
/// EVENTINJ: push an error code.
pub const EVENTINJ_EV: u64 = 1 << 11;
/// EVENTINJ type field value for an exception.
pub const EVENTINJ_TYPE_EXCEPTION: u64 = 3 << 8;

/// A segment register in the save area: selector, packed attributes, limit,
/// base (16 bytes).
#[derive(Clone, Copy, Debug, Default)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Attributes: descriptor bits 40..47 in 0..7, bits 52..55 in 8..11.
    pub attrib: u16,
    /// Limit (already scaled).
    pub limit: u32,
    /// Base address.
    pub base: u64,
}

impl Segment {
    /// Flat 64-bit ring-0 code: present, S, type execute/read accessed, L.
    pub const CODE64: Segment = Segment {
        selector: 0x08,
        attrib: 0x029B,
        limit: 0xFFFF_FFFF,
        base: 0,
    };
    /// Flat ring-0 data: present, S, type read/write accessed, D/B, G.
    pub const DATA: Segment = Segment {
        selector: 0x10,
        attrib: 0x0C93,
        limit: 0xFFFF_FFFF,
        base: 0,
    };
    /// Flat 32-bit ring-0 code (execute/read accessed, D/B, G, not L): what
    /// a Multiboot loader hands its kernel (run in compatibility mode).
    pub const CODE32: Segment = Segment {
        selector: 0x08,
        attrib: 0x0C9B,
        limit: 0xFFFF_FFFF,
        base: 0,
    };
    /// A null data segment (usable in 64-bit mode).
    pub const NULL: Segment = Segment {
        selector: 0,
        attrib: 0,
        limit: 0,
        base: 0,
    };
    /// A 64-bit TSS (type 0xB busy), needed by VMRUN's consistency checks.
    pub const fn tss(base: u64) -> Segment {
        Segment {
            selector: 0x18,
            attrib: 0x008B,
            limit: 0x67,
            base,
        }
    }
}

/// One vCPU's VMCB, a 4 KiB page the kernel owns.
///
/// Holds the page by its host-virtual pointer and host-physical address
/// (VMRUN/VMLOAD/VMSAVE take the physical one).
pub struct Vmcb {
    va: *mut u8,
    pa: u64,
}

// SAFETY: the page is owned by this Vmcb alone; it is only touched by the CPU
// that currently runs the vCPU (the scheduler hands a vCPU to one pCPU at a
// time), so moving the handle between CPUs is sound.
unsafe impl Send for Vmcb {}

impl Vmcb {
    /// Wraps a zeroed, exclusively owned 4 KiB page.
    ///
    /// # Safety
    /// `va` must point to a writable 4 KiB-aligned page whose physical address
    /// is `pa`, owned by the returned value for as long as it lives.
    pub unsafe fn from_page(va: *mut u8, pa: u64) -> Vmcb {
        Vmcb { va, pa }
    }

    /// Host-physical address of the VMCB (the operand of VMRUN).
    pub fn pa(&self) -> u64 {
        self.pa
    }

    /// Reads the u64 at `offset`.
    pub fn read64(&self, offset: usize) -> u64 {
        assert!(
            offset.is_multiple_of(8) && offset < 4096,
            "bad VMCB offset {offset:#x}"
        );
        // SAFETY: in-bounds, aligned, the page is ours (see from_page).
        unsafe { self.va.add(offset).cast::<u64>().read_volatile() }
    }

    /// Writes the u64 at `offset`.
    pub fn write64(&mut self, offset: usize, value: u64) {
        assert!(
            offset.is_multiple_of(8) && offset < 4096,
            "bad VMCB offset {offset:#x}"
        );
        // SAFETY: in-bounds, aligned, the page is ours (see from_page).
        unsafe { self.va.add(offset).cast::<u64>().write_volatile(value) }
    }

    /// Reads the u32 at `offset`.
    pub fn read32(&self, offset: usize) -> u32 {
        assert!(
            offset.is_multiple_of(4) && offset < 4096,
            "bad VMCB offset {offset:#x}"
        );
        // SAFETY: in-bounds, aligned, the page is ours (see from_page).
        unsafe { self.va.add(offset).cast::<u32>().read_volatile() }
    }

    /// Writes the u32 at `offset`.
    pub fn write32(&mut self, offset: usize, value: u32) {
        assert!(
            offset.is_multiple_of(4) && offset < 4096,
            "bad VMCB offset {offset:#x}"
        );
        // SAFETY: in-bounds, aligned, the page is ours (see from_page).
        unsafe { self.va.add(offset).cast::<u32>().write_volatile(value) }
    }

    /// Writes the byte at `offset`.
    pub fn write8(&mut self, offset: usize, value: u8) {
        assert!(offset < 4096, "bad VMCB offset {offset:#x}");
        // SAFETY: in-bounds, the page is ours (see from_page).
        unsafe { self.va.add(offset).write_volatile(value) }
    }

    /// Writes a segment register of the save area.
    pub fn set_segment(&mut self, offset: usize, seg: Segment) {
        let word = seg.selector as u64 | (seg.attrib as u64) << 16 | (seg.limit as u64) << 32;
        self.write64(offset, word);
        self.write64(offset + 8, seg.base);
    }

    /// Reads a segment's base.
    pub fn segment_base(&self, offset: usize) -> u64 {
        self.read64(offset + 8)
    }

    /// The exit code of the last #VMEXIT.
    pub fn exit_code(&self) -> u64 {
        self.read64(off::EXITCODE)
    }
    /// EXITINFO1.
    pub fn exit_info1(&self) -> u64 {
        self.read64(off::EXITINFO1)
    }
    /// EXITINFO2.
    pub fn exit_info2(&self) -> u64 {
        self.read64(off::EXITINFO2)
    }
    /// Guest RIP.
    pub fn rip(&self) -> u64 {
        self.read64(off::RIP)
    }
    /// Sets guest RIP.
    pub fn set_rip(&mut self, rip: u64) {
        self.write64(off::RIP, rip)
    }
    /// Guest RAX (saved by VMRUN itself).
    pub fn rax(&self) -> u64 {
        self.read64(off::RAX)
    }
    /// Sets guest RAX.
    pub fn set_rax(&mut self, v: u64) {
        self.write64(off::RAX, v)
    }
    /// Guest RSP (saved by VMRUN itself).
    pub fn rsp(&self) -> u64 {
        self.read64(off::RSP)
    }
    /// Sets guest RSP.
    pub fn set_rsp(&mut self, v: u64) {
        self.write64(off::RSP, v)
    }

    /// Queues exception `vector` for delivery at the next VMRUN, with
    /// `error_code` pushed if given.
    pub fn inject_exception(&mut self, vector: u8, error_code: Option<u32>) {
        let mut ev = u64::from(vector) | EVENTINJ_TYPE_EXCEPTION | EVENTINJ_VALID;
        if let Some(code) = error_code {
            ev |= EVENTINJ_EV | u64::from(code) << 32;
        }
        self.write64(off::EVENTINJ, ev);
    }

    /// Queues #GP(`error_code`) for delivery at the next VMRUN.
    pub fn inject_gp(&mut self, error_code: u32) {
        self.inject_exception(13, Some(error_code));
    }

    /// Queues #UD for delivery at the next VMRUN.
    pub fn inject_ud(&mut self) {
        self.inject_exception(6, None);
    }

    /// The guest's code size in bits (16, 32 or 64), from CS.L and CS.D
    /// and, for 64, EFER.LMA (`long_mode`).
    pub fn code_bits(&self, long_mode: bool) -> u32 {
        // Attributes: descriptor bits 52..55 in 8..11 (L is bit 9, D bit 10).
        let attrib = (self.read64(off::CS) >> 16) as u16;
        if long_mode && attrib & (1 << 9) != 0 {
            64
        } else if attrib & (1 << 10) != 0 {
            32
        } else {
            16
        }
    }

    /// Queues a #PF for delivery at the next VMRUN: EVENTINJ plus the guest
    /// CR2 in the save area (the #PF intercept leaves the guest CR2 alone).
    pub fn inject_page_fault(&mut self, addr: u64, error_code: u32) {
        self.write64(off::CR2, addr);
        self.inject_exception(14, Some(error_code));
    }
}
