//! #VMEXIT codes (APM vol. 2, appendix C) and their names for the report.

/// The exit reasons Umbra intercepts and counts. Anything else is `Other`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// MOV from CR3 (0x03).
    Cr3Read,
    /// MOV to CR3 (0x13).
    Cr3Write,
    /// MOV to CR0 (0x10) or CR4 (0x14), with the register number.
    CrWrite(u8),
    /// MOV from CR0 (0x00) or CR4 (0x04), with the register number.
    CrRead(u8),
    /// Guest #PF (0x4E): EXITINFO1 = error code, EXITINFO2 = address.
    PageFault,
    /// Other intercepted exception (0x40..0x5F), with its vector.
    Exception(u8),
    /// Physical interrupt (0x60).
    Intr,
    /// Physical NMI (0x61).
    Nmi,
    /// CPUID (0x72).
    Cpuid,
    /// HLT (0x78).
    Hlt,
    /// INVLPG (0x79).
    Invlpg,
    /// INVLPGA (0x7A).
    Invlpga,
    /// IN/OUT (0x7B): EXITINFO1 = port and access, EXITINFO2 = next RIP.
    Ioio,
    /// RDMSR/WRMSR (0x7C).
    Msr,
    /// WBINVD (0x89) or INVD (0x76): nothing to do but skip it.
    CacheFlush,
    /// An instruction of a feature hidden from guests (the SVM
    /// instructions, RDTSCP, MONITOR/MWAIT, XSETBV): the guest gets #UD.
    NotOffered(u64),
    /// Shutdown, for example a triple fault (0x7F).
    Shutdown,
    /// VMRUN executed by the guest (0x80).
    Vmrun,
    /// VMMCALL: a hypercall (0x81).
    Vmmcall,
    /// VMRUN refused the guest state (-1, reported as 0xFFFF_FFFF by TCG).
    Invalid,
    /// Any other code.
    Other(u64),
}

/// Number of report buckets (see [`ExitReason::bucket`]).
pub const BUCKETS: usize = 14;

/// Machine-readable names (the `exits.<name>` keys of the image's result
/// lines), indexed by [`ExitReason::bucket`].
pub const BUCKET_KEYS: [&str; BUCKETS] = [
    "pf",
    "cr3_write",
    "cr3_read",
    "invlpg",
    "vmmcall",
    "hlt",
    "ioio",
    "intr",
    "shutdown",
    "msr",
    "exception",
    "invalid",
    "other",
    "cr_write",
];

/// Report column names, indexed by [`ExitReason::bucket`].
pub const BUCKET_NAMES: [&str; BUCKETS] = [
    "#PF", "cr3-wr", "cr3-rd", "invlpg", "vmmcall", "hlt", "ioio", "intr", "shutdn", "msr", "exc",
    "invalid", "other", "cr-wr",
];

impl ExitReason {
    /// Decodes EXITCODE.
    pub fn from_code(code: u64) -> ExitReason {
        match code {
            0x03 => ExitReason::Cr3Read,
            0x13 => ExitReason::Cr3Write,
            0x10 | 0x14 => ExitReason::CrWrite((code - 0x10) as u8),
            0x00 | 0x04 => ExitReason::CrRead(code as u8),
            0x4E => ExitReason::PageFault,
            0x40..=0x5F => ExitReason::Exception((code - 0x40) as u8),
            0x60 => ExitReason::Intr,
            0x61 => ExitReason::Nmi,
            0x72 => ExitReason::Cpuid,
            0x78 => ExitReason::Hlt,
            0x79 => ExitReason::Invlpg,
            0x7A => ExitReason::Invlpga,
            0x7B => ExitReason::Ioio,
            0x7C => ExitReason::Msr,
            0x76 | 0x89 => ExitReason::CacheFlush,
            // RDTSCP, MONITOR, MWAIT (both kinds), XSETBV, and VMLOAD..SKINIT.
            0x82..=0x87 | 0x8A..=0x8D => ExitReason::NotOffered(code),
            0x7F => ExitReason::Shutdown,
            0x80 => ExitReason::Vmrun,
            0x81 => ExitReason::Vmmcall,
            0xFFFF_FFFF | 0xFFFF_FFFF_FFFF_FFFF => ExitReason::Invalid,
            other => ExitReason::Other(other),
        }
    }

    /// The report bucket this exit is counted in (CR0/CR4 reads, CPUID and
    /// the rest count as "other").
    pub fn bucket(self) -> usize {
        match self {
            ExitReason::PageFault => 0,
            ExitReason::Cr3Write => 1,
            ExitReason::Cr3Read => 2,
            ExitReason::CrWrite(_) => 13,
            ExitReason::Invlpg => 3,
            ExitReason::Vmmcall => 4,
            ExitReason::Hlt => 5,
            ExitReason::Ioio => 6,
            ExitReason::Intr | ExitReason::Nmi => 7,
            ExitReason::Shutdown => 8,
            ExitReason::Msr => 9,
            ExitReason::Exception(_) => 10,
            ExitReason::Invalid => 11,
            _ => 12,
        }
    }
}
