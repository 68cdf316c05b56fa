//! The PC a guest sees: its own CR0/CR4/EFER, the CPUID filter, the MSR and
//! I/O-port tables, as pure functions and tables the exit handlers in
//! `vcpu` call (no VMCB, no guest memory here).
//!
//! # Guest-visible control state
//! Each vCPU keeps the CR0, CR4 and EFER the guest wrote ([`GuestControl`]),
//! which is what it reads back (CR0/CR4 reads and RDMSR EFER are
//! intercepted). The hardware runs with what the shadow needs
//! ([`GuestControl::hardware`]): always long mode with paging on
//! (EFER.LME|LMA|SVME, CR0.PE|PG, CR4.PAE), plus the guest's bits that do
//! not concern paging (CR0.MP/EM/TS/NE/AM, CR4.DE/TSD/MCE/PGE/PCE/OSFXSR/
//! OSXMMEXCPT, EFER.SCE). Two bits are held fixed on purpose, as the MMU
//! protocol says (`abi::mmu`): hardware CR0.WP is always 1 (the servers
//! emulate the guest's CR0.WP = 0 in their shadow leaves and rely on
//! read-only shadow leaves to see first writes) and hardware EFER.NXE is
//! always 1 (servers never set NX in a shadow entry for a guest with
//! EFER.NXE = 0). A write the hardware would refuse gets #GP(0) and leaves
//! the state unchanged ([`GpFault`] says which rule and value).
//!
//! # What the guest may not see
//! [`CPUID_HIDDEN`] lists each feature bit cleared from the host's CPUID and
//! why; [`CPUID_ZEROED`] the leaves answered with zeros. Every MSR outside
//! [`msr_kind`]'s table and every CR4 bit outside [`cr4::SUPPORTED`] gets
//! #GP(0). Ports outside [`port_device`]'s table read all ones and ignore
//! writes, as on a PC with nothing there.

use super::vmcb::off;
use abi::PagingMode;

/// CR0 bits.
pub mod cr0 {
    /// Protection enable.
    pub const PE: u64 = 1 << 0;
    /// Monitor coprocessor.
    pub const MP: u64 = 1 << 1;
    /// x87 emulation.
    pub const EM: u64 = 1 << 2;
    /// Task switched.
    pub const TS: u64 = 1 << 3;
    /// Extension type (reads as 1).
    pub const ET: u64 = 1 << 4;
    /// Numeric error.
    pub const NE: u64 = 1 << 5;
    /// Write protect.
    pub const WP: u64 = 1 << 16;
    /// Alignment mask.
    pub const AM: u64 = 1 << 18;
    /// Not write-through.
    pub const NW: u64 = 1 << 29;
    /// Cache disable.
    pub const CD: u64 = 1 << 30;
    /// Paging.
    pub const PG: u64 = 1 << 31;
    /// Every defined bit; the others are reserved (#GP if set).
    pub const DEFINED: u64 = PE | MP | EM | TS | ET | NE | WP | AM | NW | CD | PG;
    /// The guest's bits the hardware runs with.
    pub const TO_HARDWARE: u64 = MP | EM | TS | NE | AM;
    /// The bits the hardware always has (WP: see the module doc).
    pub const HARDWARE_FIXED: u64 = PE | ET | WP | PG;
}

/// CR4 bits.
pub mod cr4 {
    /// Debugging extensions.
    pub const DE: u64 = 1 << 3;
    /// Time stamp disable (RDTSC privileged).
    pub const TSD: u64 = 1 << 2;
    /// Page size extensions (32-bit paging only).
    pub const PSE: u64 = 1 << 4;
    /// Physical address extension.
    pub const PAE: u64 = 1 << 5;
    /// Machine check enable.
    pub const MCE: u64 = 1 << 6;
    /// Global pages.
    pub const PGE: u64 = 1 << 7;
    /// Performance counters readable at CPL 3.
    pub const PCE: u64 = 1 << 8;
    /// FXSAVE/FXRSTOR and SSE enabled.
    pub const OSFXSR: u64 = 1 << 9;
    /// Unmasked SIMD exceptions enabled.
    pub const OSXMMEXCPT: u64 = 1 << 10;
    /// Protection keys (unsupported: PKU is hidden).
    pub const PKE: u64 = 1 << 22;
    /// 5-level paging (unsupported: LA57 is hidden).
    pub const LA57: u64 = 1 << 12;
    /// Supervisor-mode execution prevention (unsupported: SMEP is hidden).
    pub const SMEP: u64 = 1 << 20;
    /// The bits a guest may set. Everything else (VME, PVI, UMIP, LA57,
    /// VMXE, SMXE, FSGSBASE, PCIDE, OSXSAVE, SMEP, SMAP, PKE, CET and every
    /// reserved bit) gets #GP.
    pub const SUPPORTED: u64 = DE | TSD | PSE | PAE | MCE | PGE | PCE | OSFXSR | OSXMMEXCPT;
    /// The guest's bits the hardware runs with.
    pub const TO_HARDWARE: u64 = DE | TSD | MCE | PGE | PCE | OSFXSR | OSXMMEXCPT;
    /// The bits the hardware always has.
    pub const HARDWARE_FIXED: u64 = PAE;
}

/// EFER bits.
pub mod efer {
    /// SYSCALL/SYSRET enabled.
    pub const SCE: u64 = 1 << 0;
    /// Long mode enabled.
    pub const LME: u64 = 1 << 8;
    /// Long mode active (set by the CPU; written values are ignored).
    pub const LMA: u64 = 1 << 10;
    /// No-execute enabled.
    pub const NXE: u64 = 1 << 11;
    /// SVM enabled (the host's; hidden from guests).
    pub const SVME: u64 = 1 << 12;
    /// The bits a guest may write; any other set bit gets #GP.
    pub const SUPPORTED: u64 = SCE | LME | LMA | NXE;
    /// The guest's bits the hardware runs with.
    pub const TO_HARDWARE: u64 = SCE;
    /// The bits the hardware always has (NXE: see the module doc).
    pub const HARDWARE_FIXED: u64 = LME | LMA | NXE | SVME;
}

/// Why a guest's write gets #GP(0): the rule it broke and the value it
/// wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpFault {
    /// The rule, for the log.
    pub why: &'static str,
    /// The offending value.
    pub value: u64,
}

fn gp<T>(why: &'static str, value: u64) -> Result<T, GpFault> {
    Err(GpFault { why, value })
}

/// A paging mode the MMU protocol cannot express yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeError {
    /// CR0.PG = 1 without long mode: 32-bit paging, PSE or PAE.
    Paging32,
}

/// The CR0, CR4 and EFER a guest wrote: what it reads back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestControl {
    /// Guest CR0.
    pub cr0: u64,
    /// Guest CR4.
    pub cr4: u64,
    /// Guest EFER.
    pub efer: u64,
}

/// The hardware values of CR0, CR4 and EFER for the VMCB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HardwareControl {
    /// VMCB CR0.
    pub cr0: u64,
    /// VMCB CR4.
    pub cr4: u64,
    /// VMCB EFER.
    pub efer: u64,
}

impl GuestControl {
    /// Umbra's own guests start in 64-bit mode with paging, write protect,
    /// NX and the x87/SSE bits on: the hardware values they always ran with
    /// (EFER without SVME, which the guest does not own).
    pub const LONG_MODE_BOOT: GuestControl = GuestControl {
        cr0: cr0::PG | cr0::WP | cr0::NE | cr0::ET | cr0::MP | cr0::PE,
        cr4: cr4::PAE,
        efer: efer::LME | efer::LMA | efer::NXE,
    };

    /// Where a Multiboot kernel starts: protected mode, paging off, long
    /// mode off.
    pub const MULTIBOOT_ENTRY: GuestControl = GuestControl {
        cr0: cr0::PE | cr0::ET,
        cr4: 0,
        efer: 0,
    };

    /// What the hardware runs with for this guest state.
    pub const fn hardware(&self) -> HardwareControl {
        HardwareControl {
            cr0: cr0::HARDWARE_FIXED | (self.cr0 & cr0::TO_HARDWARE),
            cr4: cr4::HARDWARE_FIXED | (self.cr4 & cr4::TO_HARDWARE),
            efer: efer::HARDWARE_FIXED | (self.efer & efer::TO_HARDWARE),
        }
    }

    /// MOV to CR0 of `value`, from 64-bit code if `code64` (where clearing
    /// CR0.PG is refused): the new state, or the #GP the hardware gives.
    /// Setting PG with EFER.LME activates long mode (EFER.LMA), which needs
    /// CR4.PAE; clearing PG leaves it.
    pub fn write_cr0(&self, value: u64, code64: bool) -> Result<GuestControl, GpFault> {
        if value & !cr0::DEFINED != 0 {
            return gp("CR0 write sets a reserved bit", value);
        }
        if value & cr0::NW != 0 && value & cr0::CD == 0 {
            return gp("CR0 write sets NW without CD", value);
        }
        if value & cr0::PG != 0 && value & cr0::PE == 0 {
            return gp("CR0 write sets PG without PE", value);
        }
        let mut next = GuestControl {
            cr0: value | cr0::ET,
            ..*self
        };
        let was_paging = self.cr0 & cr0::PG != 0;
        let paging = value & cr0::PG != 0;
        if paging && !was_paging && self.efer & efer::LME != 0 {
            if self.cr4 & cr4::PAE == 0 {
                return gp("CR0.PG with EFER.LME but without CR4.PAE", value);
            }
            next.efer |= efer::LMA;
        }
        if !paging && was_paging && self.efer & efer::LMA != 0 {
            if code64 {
                return gp("CR0.PG cleared in 64-bit code", value);
            }
            next.efer &= !efer::LMA;
        }
        Ok(next)
    }

    /// MOV to CR4 of `value`: the new state, or #GP for an unsupported bit
    /// or for clearing PAE in long mode.
    pub fn write_cr4(&self, value: u64) -> Result<GuestControl, GpFault> {
        if value & !cr4::SUPPORTED != 0 {
            return gp("CR4 write sets a bit Umbra does not support", value);
        }
        if value & cr4::PAE == 0 && self.efer & efer::LMA != 0 {
            return gp("CR4.PAE cleared in long mode", value);
        }
        Ok(GuestControl {
            cr4: value,
            ..*self
        })
    }

    /// WRMSR EFER of `value`: the new state (the written LMA is ignored, as
    /// the hardware does), or #GP for a reserved or hidden bit (SVME among
    /// them) or for changing LME while paging is on.
    pub fn write_efer(&self, value: u64) -> Result<GuestControl, GpFault> {
        if value & !efer::SUPPORTED != 0 {
            return gp("EFER write sets a reserved or hidden bit", value);
        }
        if (value ^ self.efer) & efer::LME != 0 && self.cr0 & cr0::PG != 0 {
            return gp("EFER.LME changed while CR0.PG is set", value);
        }
        Ok(GuestControl {
            efer: (value & !efer::LMA) | (self.efer & efer::LMA),
            ..*self
        })
    }

    /// The paging mode for the MMU server, from CR0.PG, EFER.LMA, CR0.WP,
    /// EFER.NXE and CR4.PGE: `OFF` while CR0.PG is clear; 32-bit paging is
    /// not in the protocol.
    pub fn paging_mode(&self) -> Result<PagingMode, ModeError> {
        if self.cr0 & cr0::PG == 0 {
            return Ok(PagingMode(PagingMode::OFF));
        }
        if self.efer & efer::LMA == 0 {
            return Err(ModeError::Paging32);
        }
        let mut mode = 0;
        if self.cr0 & cr0::WP != 0 {
            mode |= PagingMode::WP;
        }
        if self.efer & efer::NXE != 0 {
            mode |= PagingMode::NXE;
        }
        if self.cr4 & cr4::PGE != 0 {
            mode |= PagingMode::PGE;
        }
        Ok(PagingMode(mode))
    }

    /// Whether going from `self` to `next` changes how the guest's page
    /// tables are read (a new mode for the server and a TLB flush).
    /// While paging is off before and after, nothing else matters.
    pub fn paging_changed(&self, next: &GuestControl) -> bool {
        if (self.cr0 | next.cr0) & cr0::PG == 0 {
            return false;
        }
        const CR0_PAGING: u64 = cr0::PG | cr0::PE | cr0::WP;
        const CR4_PAGING: u64 = cr4::PAE | cr4::PSE | cr4::PGE;
        const EFER_PAGING: u64 = efer::LMA | efer::NXE;
        (self.cr0 ^ next.cr0) & CR0_PAGING != 0
            || (self.cr4 ^ next.cr4) & CR4_PAGING != 0
            || (self.efer ^ next.efer) & EFER_PAGING != 0
    }
}

/// A CPUID output register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuidReg {
    /// EAX.
    Eax = 0,
    /// EBX.
    Ebx = 1,
    /// ECX.
    Ecx = 2,
    /// EDX.
    Edx = 3,
}

/// Feature bits cleared from the host's CPUID answer.
#[derive(Clone, Copy, Debug)]
pub struct Hidden {
    /// The leaf (EAX in).
    pub leaf: u32,
    /// The subleaf (ECX in), for leaves that have them.
    pub subleaf: Option<u32>,
    /// The output register.
    pub reg: CpuidReg,
    /// The bits cleared.
    pub bits: u32,
    /// Why Umbra hides them.
    pub why: &'static str,
}

const fn hide(
    leaf: u32,
    subleaf: Option<u32>,
    reg: CpuidReg,
    bits: u32,
    why: &'static str,
) -> Hidden {
    Hidden {
        leaf,
        subleaf,
        reg,
        bits,
        why,
    }
}

/// Every feature Umbra hides. 1 GiB pages (8000_0001.EDX26) stay visible:
/// every MMU server walks PS at level 3 (and shadows such pages with 4 KiB
/// or 2 MiB leaves).
#[rustfmt::skip]
pub const CPUID_HIDDEN: &[Hidden] = &[
    hide(1, None, CpuidReg::Edx, 1 << 1, "VME: CR4.VME is refused"),
    hide(1, None, CpuidReg::Ecx, 1 << 3, "MONITOR/MWAIT: they raise #UD"),
    hide(1, None, CpuidReg::Ecx, 1 << 5, "VMX: no nested virtualization"),
    hide(1, None, CpuidReg::Ecx, 1 << 6, "SMX: CR4.SMXE is refused"),
    hide(1, None, CpuidReg::Ecx, 1 << 17, "PCID: CR4.PCIDE is refused"),
    hide(1, None, CpuidReg::Ecx, 1 << 21, "x2APIC: the local APIC is an xAPIC"),
    hide(1, None, CpuidReg::Ecx, 1 << 26, "XSAVE: CR4.OSXSAVE is refused"),
    hide(1, None, CpuidReg::Ecx, 1 << 27, "OSXSAVE: CR4.OSXSAVE is clear"),
    hide(1, None, CpuidReg::Ecx, 1 << 31, "hypervisor: the host's paravirtual leaves are not Umbra's"),
    hide(7, Some(0), CpuidReg::Ebx, 1 << 0, "FSGSBASE: CR4.FSGSBASE is refused"),
    hide(7, Some(0), CpuidReg::Ebx, 1 << 7, "SMEP: CR4.SMEP is refused"),
    hide(7, Some(0), CpuidReg::Ebx, 1 << 10, "INVPCID: PCIDs are not supported"),
    hide(7, Some(0), CpuidReg::Ebx, 1 << 20, "SMAP: CR4.SMAP is refused"),
    hide(7, Some(0), CpuidReg::Ecx, 1 << 2, "UMIP: CR4.UMIP is refused"),
    hide(7, Some(0), CpuidReg::Ecx, 1 << 3, "PKU: CR4.PKE is refused"),
    hide(7, Some(0), CpuidReg::Ecx, 1 << 4, "OSPKE: CR4.PKE is clear"),
    hide(7, Some(0), CpuidReg::Ecx, 1 << 16, "LA57: 5-level paging is refused"),
    hide(0x8000_0001, None, CpuidReg::Ecx, 1 << 2, "SVM: no nested virtualization"),
    hide(0x8000_0001, None, CpuidReg::Edx, 1 << 27, "RDTSCP: it raises #UD (TSC_AUX is the host's)"),
];

/// Leaves answered with zeros: XSAVE state (XSAVE is hidden), SVM features
/// (SVM is hidden) and the hypervisor range (the host's paravirtual
/// interfaces are not offered).
pub const CPUID_ZEROED: &[(u32, u32)] = &[
    (0xD, 0xD),
    (0x8000_000A, 0x8000_000A),
    (0x4000_0000, 0x4000_00FF),
];

/// The guest's CPUID answer for `leaf`/`subleaf` given the host's `host`
/// (EAX, EBX, ECX, EDX), for the vCPU with index `vcpu`: the hidden bits
/// cleared, leaf 1's APIC ID the vCPU index and its logical-processor
/// count 1.
pub fn filter_cpuid(leaf: u32, subleaf: u32, host: [u32; 4], vcpu: u32) -> [u32; 4] {
    if CPUID_ZEROED
        .iter()
        .any(|&(lo, hi)| (lo..=hi).contains(&leaf))
    {
        return [0; 4];
    }
    let mut out = host;
    for h in CPUID_HIDDEN {
        if h.leaf == leaf && h.subleaf.is_none_or(|s| s == subleaf) {
            out[h.reg as usize] &= !h.bits;
        }
    }
    if leaf == 1 {
        out[1] = (out[1] & 0xFFFF) | 1 << 16 | (vcpu & 0xFF) << 24;
    }
    out
}

/// MSR numbers Umbra knows.
#[allow(missing_docs)]
pub mod msr {
    pub const TSC: u32 = 0x10;
    pub const APIC_BASE: u32 = 0x1B;
    pub const SYSENTER_CS: u32 = 0x174;
    pub const SYSENTER_ESP: u32 = 0x175;
    pub const SYSENTER_EIP: u32 = 0x176;
    pub const PAT: u32 = 0x277;
    pub const EFER: u32 = 0xC000_0080;
    pub const STAR: u32 = 0xC000_0081;
    pub const LSTAR: u32 = 0xC000_0082;
    pub const CSTAR: u32 = 0xC000_0083;
    pub const SFMASK: u32 = 0xC000_0084;
    pub const FS_BASE: u32 = 0xC000_0100;
    pub const GS_BASE: u32 = 0xC000_0101;
    pub const KERNEL_GS_BASE: u32 = 0xC000_0102;
    /// The AMD legacy performance counters: PERF_CTL0..3, PERF_CTR0..3.
    pub const PERF_LEGACY_FIRST: u32 = 0xC001_0000;
    pub const PERF_LEGACY_LAST: u32 = 0xC001_0007;
}

/// The APIC_BASE reset value of the bootstrap vCPU: the base 0xFEE00000,
/// enabled (bit 11), BSP (bit 8). Other vCPUs lack BSP.
pub const APIC_BASE_BSP_RESET: u64 = 0xFEE0_0900;
/// APIC_BASE bits a guest may write: BSP, EN and a base below 2^52
/// (x2APIC mode, bit 10, is refused: x2APIC is hidden).
pub const APIC_BASE_WRITABLE: u64 = 1 << 8 | 1 << 11 | 0x000F_FFFF_FFFF_F000;

/// Where an MSR lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrKind {
    /// The guest's EFER ([`GuestControl::write_efer`]).
    Efer,
    /// APIC_BASE, kept per vCPU.
    ApicBase,
    /// The TSC: reads give the guest's TSC, writes set its offset.
    Tsc,
    /// PAT, kept in the VMCB's G_PAT field (unused without nested paging:
    /// the guest's memory types are not applied).
    Pat,
    /// A VMCB field; `canonical` if a write must be a canonical address.
    Vmcb {
        /// The field's offset.
        offset: usize,
        /// Non-canonical writes get #GP.
        canonical: bool,
    },
    /// Harmless: reads 0, writes ignored (the legacy performance counters).
    Ignored,
    /// Any other: #GP on read and write.
    Unknown,
}

/// The MSR table.
pub fn msr_kind(ecx: u32) -> MsrKind {
    let vmcb = |offset, canonical| MsrKind::Vmcb { offset, canonical };
    match ecx {
        msr::EFER => MsrKind::Efer,
        msr::APIC_BASE => MsrKind::ApicBase,
        msr::TSC => MsrKind::Tsc,
        msr::PAT => MsrKind::Pat,
        msr::FS_BASE => vmcb(off::FS + 8, true),
        msr::GS_BASE => vmcb(off::GS + 8, true),
        msr::KERNEL_GS_BASE => vmcb(off::KERNEL_GS_BASE, true),
        msr::STAR => vmcb(off::STAR, false),
        msr::LSTAR => vmcb(off::LSTAR, true),
        msr::CSTAR => vmcb(off::CSTAR, true),
        msr::SFMASK => vmcb(off::SFMASK, false),
        msr::SYSENTER_CS => vmcb(off::SYSENTER_CS, false),
        msr::SYSENTER_ESP => vmcb(off::SYSENTER_ESP, true),
        msr::SYSENTER_EIP => vmcb(off::SYSENTER_EIP, true),
        msr::PERF_LEGACY_FIRST..=msr::PERF_LEGACY_LAST => MsrKind::Ignored,
        _ => MsrKind::Unknown,
    }
}

/// Whether `v` is a canonical 48-bit address.
pub const fn canonical(v: u64) -> bool {
    ((v as i64) << 16 >> 16) as u64 == v
}

/// Whether `v` is a valid PAT: each of the 8 entries a memory type the
/// hardware defines (0 UC, 1 WC, 4 WT, 5 WP, 6 WB, 7 UC-).
pub fn valid_pat(v: u64) -> bool {
    (0..8).all(|i| matches!((v >> (i * 8)) & 0xFF, 0 | 1 | 4..=7))
}

/// The isa-debug-exit port: a write ends the vCPU with the value written
/// as the domain's exit status.
pub const EXIT_PORT: u16 = abi::guest::EXIT_PORT;
/// COM1's first port (data / divisor latch low).
pub const COM1: u16 = abi::guest::CONSOLE_PORT;
/// The Bochs/QEMU shutdown port.
pub const SHUTDOWN_PORT: u16 = 0x8900;
/// What written to [`SHUTDOWN_PORT`] powers the machine off.
pub const SHUTDOWN_WORD: &[u8] = b"Shutdown";
/// fw_cfg's selector port (16-bit writes).
pub const FW_CFG_SELECTOR: u16 = 0x510;
/// fw_cfg's data port (byte reads).
pub const FW_CFG_DATA: u16 = 0x511;
/// fw_cfg item: the signature "QEMU".
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// fw_cfg item: RAM size in bytes (u64).
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
/// fw_cfg item: CPUs (u16).
pub const FW_CFG_NB_CPUS: u16 = 0x05;
/// fw_cfg item: the most CPUs (u16).
pub const FW_CFG_MAX_CPUS: u16 = 0x0F;

/// A device behind a port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    /// COM1 register 0..7 (0: data out, 3: LCR, 5: LSR).
    Com1(u8),
    /// PIC command port (0x20 master, 0xA0 slave): writes ignored, reads 0.
    PicCommand,
    /// PIC mask register (0 master 0x21, 1 slave 0xA1): stored.
    PicMask(usize),
    /// isa-debug-exit.
    Exit,
    /// Bochs/QEMU shutdown.
    Shutdown,
    /// fw_cfg selector.
    FwCfgSelector,
    /// fw_cfg data.
    FwCfgData,
    /// Nothing: reads all ones, writes ignored.
    Nothing,
}

/// The port table.
pub fn port_device(port: u16) -> Device {
    match port {
        COM1..=0x3FF => Device::Com1((port - COM1) as u8),
        0x20 | 0xA0 => Device::PicCommand,
        0x21 => Device::PicMask(0),
        0xA1 => Device::PicMask(1),
        EXIT_PORT => Device::Exit,
        SHUTDOWN_PORT => Device::Shutdown,
        FW_CFG_SELECTOR => Device::FwCfgSelector,
        FW_CFG_DATA => Device::FwCfgData,
        _ => Device::Nothing,
    }
}

/// What a port write asks of the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortEffect {
    /// Nothing beyond the device's state.
    None,
    /// A byte for the console line.
    Console(u8),
    /// isa-debug-exit: end the vCPU with this status.
    Exit(u32),
    /// "Shutdown" completed on the shutdown port: end the domain.
    PowerOff,
}

/// The state of a domain's emulated devices (COM1, PIC masks, fw_cfg, the
/// shutdown port's progress). Port accesses wider than a byte go to the
/// successive byte ports, except the exit port and the fw_cfg selector,
/// which take the whole value.
#[derive(Clone, Copy, Debug)]
pub struct Devices {
    /// The domain's memory in bytes (fw_cfg RAM size).
    pub mem_bytes: u64,
    com1_lcr: u8,
    com1_scratch: u8,
    pic_mask: [u8; 2],
    fw_cfg_item: u16,
    fw_cfg_offset: u32,
    shutdown_matched: usize,
}

/// COM1's line control register: divisor latch access.
const LCR_DLAB: u8 = 1 << 7;
/// COM1's line status: transmitter holding register and transmitter empty.
pub const LSR_READY: u8 = 0x60;

impl Devices {
    /// A machine at reset: PICs unmasked, fw_cfg on the signature.
    pub const fn new(mem_bytes: u64) -> Devices {
        Devices {
            mem_bytes,
            com1_lcr: 0,
            com1_scratch: 0,
            pic_mask: [0; 2],
            fw_cfg_item: 0,
            fw_cfg_offset: 0,
            shutdown_matched: 0,
        }
    }

    /// IN of `size` bytes (1, 2 or 4) from `port`.
    pub fn read(&mut self, port: u16, size: u8) -> u32 {
        (0..size).fold(0u32, |acc, i| {
            let b = self.read_byte(port.wrapping_add(u16::from(i)));
            acc | u32::from(b) << (8 * i)
        })
    }

    fn read_byte(&mut self, port: u16) -> u8 {
        match port_device(port) {
            Device::Com1(3) => self.com1_lcr,
            Device::Com1(5) => LSR_READY,
            Device::Com1(7) => self.com1_scratch,
            // IIR: no interrupt pending.
            Device::Com1(2) => 0x01,
            Device::Com1(_) | Device::PicCommand | Device::FwCfgSelector => 0,
            Device::PicMask(i) => self.pic_mask[i],
            Device::FwCfgData => {
                let b = self.fw_cfg_byte(self.fw_cfg_item, self.fw_cfg_offset);
                self.fw_cfg_offset = self.fw_cfg_offset.saturating_add(1);
                b
            }
            Device::Exit | Device::Shutdown | Device::Nothing => 0xFF,
        }
    }

    fn fw_cfg_byte(&self, item: u16, offset: u32) -> u8 {
        let (value, len): (u64, u32) = match item {
            FW_CFG_SIGNATURE => (u64::from(u32::from_le_bytes(*b"QEMU")), 4),
            FW_CFG_RAM_SIZE => (self.mem_bytes, 8),
            FW_CFG_NB_CPUS | FW_CFG_MAX_CPUS => (1, 2),
            _ => (0, 0),
        };
        if offset < len {
            (value >> (8 * offset)) as u8
        } else {
            0
        }
    }

    /// OUT of the low `size` bytes of `value` to `port`.
    pub fn write(&mut self, port: u16, size: u8, value: u32) -> PortEffect {
        match port_device(port) {
            Device::Exit => return PortEffect::Exit(value),
            Device::FwCfgSelector => {
                self.fw_cfg_item = value as u16;
                self.fw_cfg_offset = 0;
                return PortEffect::None;
            }
            _ => {}
        }
        let mut effect = PortEffect::None;
        for i in 0..size {
            let e = self.write_byte(port.wrapping_add(u16::from(i)), (value >> (8 * i)) as u8);
            if e != PortEffect::None {
                effect = e;
            }
        }
        effect
    }

    fn write_byte(&mut self, port: u16, b: u8) -> PortEffect {
        match port_device(port) {
            Device::Com1(0) if self.com1_lcr & LCR_DLAB == 0 => return PortEffect::Console(b),
            Device::Com1(3) => self.com1_lcr = b,
            Device::Com1(7) => self.com1_scratch = b,
            Device::PicMask(i) => self.pic_mask[i] = b,
            Device::Shutdown => {
                if SHUTDOWN_WORD[self.shutdown_matched] == b {
                    self.shutdown_matched += 1;
                } else {
                    self.shutdown_matched = usize::from(SHUTDOWN_WORD[0] == b);
                }
                if self.shutdown_matched == SHUTDOWN_WORD.len() {
                    self.shutdown_matched = 0;
                    return PortEffect::PowerOff;
                }
            }
            _ => {}
        }
        PortEffect::None
    }
}

/// In-image checks of the tables and rules above (the kernel crate has no
/// host tests); returns the first mismatch.
pub fn self_test() -> Result<(), &'static str> {
    let boot = GuestControl::LONG_MODE_BOOT;
    let hw = boot.hardware();
    if (hw.cr0, hw.cr4, hw.efer) != (0x8001_0033, 0x20, 0x1D00) {
        return Err("long-mode boot state does not give the hardware values guests always had");
    }
    if boot.paging_mode() != Ok(PagingMode(PagingMode::WP | PagingMode::NXE)) {
        return Err("long-mode boot state gives the wrong paging mode");
    }
    for bad in [cr4::PKE, cr4::LA57, cr4::SMEP, 1 << 0, 1 << 17, 1 << 63] {
        if boot.write_cr4(cr4::PAE | bad).is_ok() {
            return Err("an unsupported CR4 bit was accepted");
        }
    }
    if boot.write_cr4(0).is_ok() {
        return Err("CR4.PAE cleared in long mode was accepted");
    }
    let osfxsr = boot
        .write_cr4(cr4::PAE | cr4::OSFXSR)
        .map_err(|_| "CR4.OSFXSR refused")?;
    if osfxsr.hardware().cr4 != cr4::PAE | cr4::OSFXSR || boot.paging_changed(&osfxsr) {
        return Err("CR4.OSFXSR not passed through, or taken for a paging change");
    }
    let no_wp = boot
        .write_cr0(boot.cr0 & !cr0::WP, true)
        .map_err(|_| "CR0.WP clear refused")?;
    if no_wp.hardware().cr0 & cr0::WP == 0 || !boot.paging_changed(&no_wp) {
        return Err("guest CR0.WP=0 reached the hardware, or was not a paging change");
    }
    if no_wp.paging_mode() != Ok(PagingMode(PagingMode::NXE)) {
        return Err("CR0.WP=0 still in the paging mode");
    }
    for bad in [1 << 6, 1 << 32, cr0::PG | cr0::ET, cr0::NW | cr0::PE] {
        if boot.write_cr0(bad, false).is_ok() {
            return Err("a reserved or inconsistent CR0 was accepted");
        }
    }
    if boot.write_cr0(cr0::PE | cr0::ET, true).is_ok() {
        return Err("CR0.PG cleared in 64-bit code was accepted");
    }
    // The entry of a Multiboot guest: protected mode, paging off; then
    // PAE, LME, PG as a guest enters long mode.
    let flat = GuestControl::MULTIBOOT_ENTRY;
    if flat.paging_mode() != Ok(PagingMode(PagingMode::OFF)) {
        return Err("paging off was not given the OFF mode");
    }
    let lme = flat.write_efer(efer::LME).map_err(|_| "EFER.LME refused")?;
    let pae = flat.write_cr4(cr4::PAE).map_err(|_| "CR4.PAE refused")?;
    if flat.paging_changed(&lme) || flat.paging_changed(&pae) {
        return Err("EFER.LME or CR4.PAE with paging off taken for a paging change");
    }
    if lme.write_cr0(cr0::PE | cr0::PG, false).is_ok() {
        return Err("CR0.PG with LME but without PAE was accepted");
    }
    let long = lme
        .write_cr4(cr4::PAE)
        .and_then(|c| c.write_cr0(cr0::PE | cr0::PG, false))
        .map_err(|_| "entering long mode refused")?;
    if long.efer & efer::LMA == 0 || long.paging_mode().is_err() || !flat.paging_changed(&long) {
        return Err("entering long mode did not set EFER.LMA or was no paging change");
    }
    if long.write_efer(0).is_ok() || long.write_efer(efer::LME | efer::SVME).is_ok() {
        return Err("EFER.LME cleared under paging, or EFER.SVME, was accepted");
    }
    let nx = long
        .write_efer(efer::LME | efer::NXE)
        .map_err(|_| "EFER.NXE refused")?;
    if nx.efer != efer::LME | efer::LMA | efer::NXE {
        return Err("EFER write lost LMA");
    }
    let paging32 = flat.write_cr0(cr0::PE | cr0::PG, false);
    if paging32.map(|c| c.paging_mode()) != Ok(Err(ModeError::Paging32)) {
        return Err("32-bit paging was given a mode");
    }
    // CPUID.
    let leaf7 = filter_cpuid(7, 0, [0, u32::MAX, u32::MAX, u32::MAX], 0);
    if leaf7[1] & (1 << 7 | 1 << 20) != 0 || leaf7[2] & (1 << 3 | 1 << 16) != 0 {
        return Err("CPUID 7.0 shows SMEP, SMAP, PKU or LA57");
    }
    if filter_cpuid(7, 1, [0, u32::MAX, 0, 0], 0)[1] != u32::MAX {
        return Err("CPUID 7.1 filtered as subleaf 0");
    }
    let leaf1 = filter_cpuid(1, 0, [0, 0x0810_0800, u32::MAX, u32::MAX], 3);
    if leaf1[1] != 0x0301_0800 || leaf1[2] & (1 << 21 | 1 << 31) != 0 {
        return Err("CPUID 1 APIC ID, count, x2APIC or hypervisor bit wrong");
    }
    if filter_cpuid(0x4000_0000, 0, [1; 4], 0) != [0; 4] {
        return Err("the hypervisor leaves were not zeroed");
    }
    // MSRs.
    if msr_kind(0xC001_0003) != MsrKind::Ignored || msr_kind(0xC001_0008) != MsrKind::Unknown {
        return Err("perf-counter MSR range wrong");
    }
    if canonical(0x0000_8000_0000_0000) || !canonical(0xFFFF_8000_0000_0000) {
        return Err("canonical check wrong");
    }
    if !valid_pat(0x0007_0406_0007_0406) || valid_pat(0x0007_0406_0007_0402) {
        return Err("PAT check wrong");
    }
    // Ports.
    let mut d = Devices::new(128 << 20);
    if d.read(0x3FD, 1) != 0x60 || d.read(0x1234, 2) != 0xFFFF {
        return Err("LSR or an empty port reads wrong");
    }
    d.write(0x21, 1, 0xFB);
    if d.read(0x21, 1) != 0xFB {
        return Err("PIC mask does not read back");
    }
    if d.write(COM1 + 3, 1, 0x80) != PortEffect::None || d.write(COM1, 1, 1) != PortEffect::None {
        return Err("a divisor-latch write reached the console");
    }
    d.write(COM1 + 3, 1, 0x03);
    if d.write(COM1, 1, b'x' as u32) != PortEffect::Console(b'x') {
        return Err("a COM1 data write did not reach the console");
    }
    // fw_cfg items are read a byte at a time from the data port.
    let item = |d: &mut Devices, selector: u16, len: u32| {
        d.write(FW_CFG_SELECTOR, 2, u32::from(selector));
        (0..len).fold(0u64, |a, i| {
            a | u64::from(d.read(FW_CFG_DATA, 1)) << (8 * i)
        })
    };
    if item(&mut d, FW_CFG_SIGNATURE, 4) != u64::from(u32::from_le_bytes(*b"QEMU")) {
        return Err("fw_cfg signature wrong");
    }
    if item(&mut d, FW_CFG_NB_CPUS, 3) != 1 {
        return Err("fw_cfg CPU count wrong");
    }
    if item(&mut d, FW_CFG_RAM_SIZE, 8) != 128 << 20 {
        return Err("fw_cfg RAM size wrong");
    }
    let mut effect = PortEffect::None;
    for b in b"ShShutdown" {
        effect = d.write(SHUTDOWN_PORT, 1, u32::from(*b));
    }
    if effect != PortEffect::PowerOff
        || d.write(EXIT_PORT, 4, 0x8765_4321) != PortEffect::Exit(0x8765_4321)
    {
        return Err("shutdown or exit port wrong");
    }
    Ok(())
}
