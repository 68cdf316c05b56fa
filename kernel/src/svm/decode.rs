//! Decoding the guest instruction behind an exit, with iced-x86's no_std
//! decoder: TCG gives neither NRIPS nor decode assists, so after every exit
//! RIP points at the intercepted instruction and the kernel itself must find
//! its length, the MOV-to/from-CR3 register, the INVLPG operand and the
//! destination, value and size of a write it emulates.

use iced_x86::{Code, Decoder, DecoderOptions, Instruction, Mnemonic, OpKind, Register};

/// The guest's general-purpose registers in encoding order (RAX, RCX, RDX,
/// RBX, RSP, RBP, RSI, RDI, R8..R15), plus the FS and GS bases.
#[derive(Clone, Copy, Debug, Default)]
pub struct RegFile {
    /// Registers by encoding number.
    pub r: [u64; 16],
    /// FS base (for `fs:` operands).
    pub fs_base: u64,
    /// GS base (for `gs:` operands).
    pub gs_base: u64,
}

impl RegFile {
    /// The value of any general-purpose register of any width (AH..BH are
    /// bits 8..15 of their full register), or a segment base.
    pub fn get(&self, reg: Register) -> Option<u64> {
        match reg {
            Register::ES | Register::CS | Register::SS | Register::DS => return Some(0),
            Register::FS => return Some(self.fs_base),
            Register::GS => return Some(self.gs_base),
            Register::AH | Register::CH | Register::DH | Register::BH => {
                return Some((self.r[full_index(reg)?] >> 8) & 0xFF);
            }
            _ => {}
        }
        let v = self.r[full_index(reg)?];
        Some(match reg.size() {
            1 => v & 0xFF,
            2 => v & 0xFFFF,
            4 => v & 0xFFFF_FFFF,
            8 => v,
            _ => return None,
        })
    }

    /// Writes a 64-bit register, a 32-bit one (zero-extending as the
    /// architecture does) or a 16-bit one (the rest kept). Byte
    /// destinations are not needed by Umbra.
    pub fn set(&mut self, reg: Register, value: u64) -> Result<(), DecodeError> {
        let i = full_index(reg).ok_or(DecodeError::Unsupported)?;
        match reg.size() {
            8 => self.r[i] = value,
            4 => self.r[i] = value & 0xFFFF_FFFF,
            2 => self.r[i] = (self.r[i] & !0xFFFF) | (value & 0xFFFF),
            _ => return Err(DecodeError::Unsupported),
        }
        Ok(())
    }
}

/// Index 0..15 of a general-purpose register's full 64-bit form.
fn full_index(reg: Register) -> Option<usize> {
    let full = reg.full_register();
    if !full.is_gpr64() {
        return None;
    }
    Some(full as usize - Register::RAX as usize)
}

/// What the instruction at RIP does, as far as the exit handler cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `mov cr3, reg`: the new guest CR3.
    Cr3Write {
        /// Value written.
        value: u64,
    },
    /// `mov cr0, reg` or `mov cr4, reg`.
    CrWrite {
        /// 0 or 4.
        cr: u8,
        /// Value written.
        value: u64,
    },
    /// `mov reg, cr3`: which register receives the guest CR3.
    Cr3Read {
        /// Destination register.
        dest: Register,
    },
    /// `mov reg, cr0` or `mov reg, cr4`.
    CrRead {
        /// 0 or 4.
        cr: u8,
        /// Destination register.
        dest: Register,
    },
    /// `clts`: clear CR0.TS.
    Clts,
    /// `lmsw reg`: load CR0 bits 0..3 (PE cannot be cleared).
    Lmsw {
        /// The source's value (its low 4 bits count).
        value: u64,
    },
    /// `invlpg [mem]`: the guest-virtual address it names.
    Invlpg {
        /// The operand's effective address.
        gva: u64,
    },
    /// A store to memory by MOV: destination
    /// guest-virtual address, value and size in bytes.
    Write {
        /// Effective address.
        gva: u64,
        /// Value stored (zero-extended).
        value: u64,
        /// 1, 2, 4 or 8.
        size: u8,
    },
    /// A read-modify-write of memory (XCHG, CMPXCHG, OR, AND, ADD, XADD,
    /// with or without LOCK): its effect depends on the old value, see
    /// [`rmw_apply`].
    ReadModifyWrite {
        /// Effective address.
        gva: u64,
        /// 1, 2, 4 or 8.
        size: u8,
        /// Which operation.
        kind: Rmw,
        /// The source operand (register value or immediate, zero-extended).
        src: u64,
        /// The source register, if it is one (XCHG/XADD write it back).
        reg: Option<Register>,
    },
    /// A load from memory into a register by MOV (MMIO reads): source
    /// guest-virtual address, size in bytes, destination.
    Read {
        /// Effective address.
        gva: u64,
        /// 1, 2, 4 or 8.
        size: u8,
        /// The register loaded.
        dest: Register,
    },
    /// An arithmetic or logic instruction that reads memory without
    /// writing it (MMIO reads folded into an ALU instruction): `CMP` and
    /// `TEST` with memory on either side, and `OR`, `AND`, `XOR`, `ADD`,
    /// `SUB` into a register from memory. See [`alu_apply`].
    ReadAlu {
        /// Effective address.
        gva: u64,
        /// 1, 2, 4 or 8.
        size: u8,
        /// Which operation.
        alu: Alu,
        /// The other operand: a register's value or an immediate.
        other: u64,
        /// The register written (OR/AND/XOR/ADD/SUB into a register).
        dest: Option<Register>,
        /// Memory is the first operand (`CMP m, x`: flags of m - x).
        mem_first: bool,
    },
    /// Some other instruction (only its length is known).
    Other,
}

/// An instruction at guest RIP, decoded.
#[derive(Clone, Copy, Debug)]
pub struct Decoded {
    /// Length in bytes (RIP advances by this much once emulated).
    pub len: u8,
    /// What it does.
    pub op: Op,
    /// The mnemonic, for error messages.
    pub mnemonic: Mnemonic,
}

/// Why an instruction could not be decoded or emulated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The bytes are not a valid instruction.
    Invalid,
    /// Valid, but not a form Umbra emulates.
    Unsupported,
}

/// Decodes the instruction in `bytes` (up to 15 fetched at `rip`) as code of
/// `bits` (16, 32 or 64: the guest's CS.L and CS.D) and works out its effect
/// on the operands the handler needs.
pub fn decode(bytes: &[u8], rip: u64, bits: u32, regs: &RegFile) -> Result<Decoded, DecodeError> {
    if !matches!(bits, 16 | 32 | 64) {
        return Err(DecodeError::Unsupported);
    }
    let mut decoder = Decoder::with_ip(bits, bytes, rip, DecoderOptions::NONE);
    let instr = decoder.decode();
    if instr.is_invalid() {
        return Err(DecodeError::Invalid);
    }
    let op = classify(&instr, regs)?;
    Ok(Decoded {
        len: instr.len() as u8,
        op,
        mnemonic: instr.mnemonic(),
    })
}

fn classify(instr: &Instruction, regs: &RegFile) -> Result<Op, DecodeError> {
    let ea = |operand: u32| {
        instr
            .virtual_address(operand, 0, |reg, _, _| regs.get(reg))
            .ok_or(DecodeError::Unsupported)
    };
    let cr_number = |reg: Register| match reg {
        Register::CR0 => Some(0u8),
        Register::CR3 => Some(3),
        Register::CR4 => Some(4),
        _ => None,
    };
    match instr.code() {
        Code::Mov_cr_r64 | Code::Mov_cr_r32 => {
            let value = regs
                .get(instr.op_register(1))
                .ok_or(DecodeError::Unsupported)?;
            match cr_number(instr.op_register(0)) {
                Some(3) => Ok(Op::Cr3Write { value }),
                Some(cr) => Ok(Op::CrWrite { cr, value }),
                None => Err(DecodeError::Unsupported),
            }
        }
        Code::Mov_r64_cr | Code::Mov_r32_cr => {
            let dest = instr.op_register(0);
            match cr_number(instr.op_register(1)) {
                Some(3) => Ok(Op::Cr3Read { dest }),
                Some(cr) => Ok(Op::CrRead { cr, dest }),
                None => Err(DecodeError::Unsupported),
            }
        }
        Code::Clts => Ok(Op::Clts),
        // SMSW and LMSW are CR0 accesses too; their memory forms are not
        // emulated.
        Code::Smsw_rm16 | Code::Smsw_r32m16 | Code::Smsw_r64m16
            if instr.op_kind(0) == OpKind::Register =>
        {
            Ok(Op::CrRead {
                cr: 0,
                dest: instr.op_register(0),
            })
        }
        Code::Lmsw_rm16 | Code::Lmsw_r32m16 | Code::Lmsw_r64m16
            if instr.op_kind(0) == OpKind::Register =>
        {
            let value = regs
                .get(instr.op_register(0))
                .ok_or(DecodeError::Unsupported)?;
            Ok(Op::Lmsw { value })
        }
        Code::Smsw_rm16
        | Code::Smsw_r32m16
        | Code::Smsw_r64m16
        | Code::Lmsw_rm16
        | Code::Lmsw_r32m16
        | Code::Lmsw_r64m16 => Err(DecodeError::Unsupported),
        Code::Invlpg_m => Ok(Op::Invlpg { gva: ea(0)? }),
        _ if read_alu(instr).is_some() => {
            let (alu, mem_first) = read_alu(instr).ok_or(DecodeError::Unsupported)?;
            let (mem, other) = if mem_first { (0, 1) } else { (1, 0) };
            let size = instr.memory_size().size() as u8;
            if !matches!(size, 1 | 2 | 4 | 8) {
                return Err(DecodeError::Unsupported);
            }
            let (value, reg) = match instr.op_kind(other) {
                OpKind::Register => {
                    let r = instr.op_register(other);
                    (regs.get(r).ok_or(DecodeError::Unsupported)?, Some(r))
                }
                _ => (instr.immediate(other), None),
            };
            let dest = match alu {
                Alu::Cmp | Alu::Test => None,
                _ => reg,
            };
            Ok(Op::ReadAlu {
                gva: ea(mem)?,
                size,
                alu,
                other: value & size_mask(size),
                dest,
                mem_first,
            })
        }
        _ if instr.mnemonic() == Mnemonic::Mov
            && instr.op_count() == 2
            && instr.op_kind(0) == OpKind::Register
            && instr.op_kind(1) == OpKind::Memory =>
        {
            let size = instr.memory_size().size() as u8;
            if !matches!(size, 1 | 2 | 4 | 8) {
                return Err(DecodeError::Unsupported);
            }
            Ok(Op::Read {
                gva: ea(1)?,
                size,
                dest: instr.op_register(0),
            })
        }
        _ => {
            let rmw = match instr.mnemonic() {
                Mnemonic::Mov => None,
                Mnemonic::Xchg => Some(Rmw::Xchg),
                Mnemonic::Cmpxchg => Some(Rmw::Cmpxchg),
                Mnemonic::Or => Some(Rmw::Or),
                Mnemonic::And => Some(Rmw::And),
                Mnemonic::Add => Some(Rmw::Add),
                Mnemonic::Xadd => Some(Rmw::Xadd),
                Mnemonic::Sub => Some(Rmw::Sub),
                Mnemonic::Inc | Mnemonic::Dec
                    if instr.op_count() == 1 && instr.op_kind(0) == OpKind::Memory =>
                {
                    let size = instr.memory_size().size() as u8;
                    if !matches!(size, 1 | 2 | 4 | 8) {
                        return Err(DecodeError::Unsupported);
                    }
                    let kind = if instr.mnemonic() == Mnemonic::Inc {
                        Rmw::Inc
                    } else {
                        Rmw::Dec
                    };
                    return Ok(Op::ReadModifyWrite {
                        gva: ea(0)?,
                        size,
                        kind,
                        src: 1,
                        reg: None,
                    });
                }
                _ => return Ok(Op::Other),
            };
            if instr.op_count() != 2 || instr.op_kind(0) != OpKind::Memory {
                return Ok(Op::Other);
            }
            let size = instr.memory_size().size();
            if !matches!(size, 1 | 2 | 4 | 8) {
                return Err(DecodeError::Unsupported);
            }
            let (value, reg) = match instr.op_kind(1) {
                OpKind::Register => {
                    let r = instr.op_register(1);
                    (regs.get(r).ok_or(DecodeError::Unsupported)?, Some(r))
                }
                OpKind::Immediate8
                | OpKind::Immediate16
                | OpKind::Immediate32
                | OpKind::Immediate32to64
                | OpKind::Immediate8to64 => (instr.immediate(1), None),
                _ => return Err(DecodeError::Unsupported),
            };
            let value = value & size_mask(size as u8);
            let gva = ea(0)?;
            let size = size as u8;
            match rmw {
                None => Ok(Op::Write { gva, value, size }),
                Some(kind) => {
                    // XCHG, CMPXCHG and XADD write a register back: only
                    // 32- and 64-bit ones are emulated.
                    if matches!(kind, Rmw::Xchg | Rmw::Cmpxchg | Rmw::Xadd) && size < 4 {
                        return Err(DecodeError::Unsupported);
                    }
                    Ok(Op::ReadModifyWrite {
                        gva,
                        size,
                        kind,
                        src: value,
                        reg,
                    })
                }
            }
        }
    }
}

/// An ALU operation that reads memory without writing it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alu {
    /// CMP: flags of a - b.
    Cmp,
    /// TEST: flags of a & b.
    Test,
    /// OR into a register.
    Or,
    /// AND into a register.
    And,
    /// XOR into a register.
    Xor,
    /// ADD into a register.
    Add,
    /// SUB into a register.
    Sub,
}

/// Whether `instr` is a [`Op::ReadAlu`] form: its operation and whether
/// memory is the first operand.
fn read_alu(instr: &Instruction) -> Option<(Alu, bool)> {
    if instr.op_count() != 2 {
        return None;
    }
    let mem_first = instr.op_kind(0) == OpKind::Memory;
    let mem_second = instr.op_kind(1) == OpKind::Memory;
    let alu = match instr.mnemonic() {
        Mnemonic::Cmp => Alu::Cmp,
        Mnemonic::Test => Alu::Test,
        Mnemonic::Or => Alu::Or,
        Mnemonic::And => Alu::And,
        Mnemonic::Xor => Alu::Xor,
        Mnemonic::Add => Alu::Add,
        Mnemonic::Sub => Alu::Sub,
        _ => return None,
    };
    match alu {
        Alu::Cmp | Alu::Test if mem_first || mem_second => Some((alu, mem_first)),
        // Memory as the destination is a read-modify-write, not this.
        _ if mem_second && instr.op_kind(0) == OpKind::Register => Some((alu, false)),
        _ => None,
    }
}

/// What a [`Op::ReadAlu`] does once memory read `mem`: the register value
/// to write (if any) and the new arithmetic flags (within
/// [`ARITH_FLAGS`]).
pub fn alu_apply(alu: Alu, size: u8, mem: u64, other: u64, mem_first: bool) -> (Option<u64>, u64) {
    let (a, b) = if mem_first {
        (mem, other)
    } else {
        (other, mem)
    };
    let none = RegFile {
        r: [0; 16],
        fs_base: 0,
        gs_base: 0,
    };
    let kind = match alu {
        Alu::Cmp | Alu::Sub => Rmw::Sub,
        Alu::Test | Alu::And => Rmw::And,
        Alu::Or => Rmw::Or,
        Alu::Add => Rmw::Add,
        // XOR sets the flags as OR does, of its own result.
        Alu::Xor => {
            let r = rmw_apply(Rmw::Or, size, a ^ b, 0, None, &none);
            return (r.store, r.flags.unwrap_or(0));
        }
    };
    let r = rmw_apply(kind, size, a, b, None, &none);
    let value = match alu {
        Alu::Cmp | Alu::Test => None,
        _ => r.store,
    };
    (value, r.flags.unwrap_or(0))
}

/// The all-ones mask of a `size`-byte value.
pub fn size_mask(size: u8) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// A read-modify-write instruction on memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rmw {
    /// XCHG m, r: m := r, r := old.
    Xchg,
    /// CMPXCHG m, r: if old == rAX { m := r, ZF=1 } else { rAX := old, ZF=0 }.
    Cmpxchg,
    /// OR m, src.
    Or,
    /// AND m, src.
    And,
    /// ADD m, src.
    Add,
    /// XADD m, r: m := old + r, r := old.
    Xadd,
    /// SUB m, src.
    Sub,
    /// INC m (CF unchanged).
    Inc,
    /// DEC m (CF unchanged).
    Dec,
}

/// What a read-modify-write does given the old memory value: the new
/// memory value (None: no write), register write-backs and the new
/// arithmetic flags (CF, PF, AF, ZF, SF, OF).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RmwResult {
    /// Value to store, if any.
    pub store: Option<u64>,
    /// Register to write and its value.
    pub reg_write: Option<(Register, u64)>,
    /// New RFLAGS arithmetic bits (within [`ARITH_FLAGS`]), or None to
    /// leave them.
    pub flags: Option<u64>,
    /// Which flags `flags` replaces (INC/DEC keep CF).
    pub flags_mask: u64,
}

const CF: u64 = 1;
const PF: u64 = 1 << 2;
const AF: u64 = 1 << 4;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;
/// The arithmetic flags an RMW may change.
pub const ARITH_FLAGS: u64 = CF | PF | AF | ZF | SF | OF;

fn szp(result: u64, size: u8) -> u64 {
    let sign = 1u64 << (size * 8 - 1);
    let mut f = 0;
    if result & size_mask(size) == 0 {
        f |= ZF;
    }
    if result & sign != 0 {
        f |= SF;
    }
    if (result as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    f
}

/// Computes an RMW's effect from the old memory value and the registers.
pub fn rmw_apply(
    kind: Rmw,
    size: u8,
    old: u64,
    src: u64,
    reg: Option<Register>,
    regs: &RegFile,
) -> RmwResult {
    let m = size_mask(size);
    let old = old & m;
    let sign = 1u64 << (size * 8 - 1);
    let add = |a: u64, b: u64| {
        let r = a.wrapping_add(b) & m;
        let mut f = szp(r, size);
        if r < a {
            f |= CF;
        }
        if (a ^ r) & (b ^ r) & sign != 0 {
            f |= OF;
        }
        if (a ^ b ^ r) & 0x10 != 0 {
            f |= AF;
        }
        (r, f)
    };
    let sub = |a: u64, b: u64| {
        let r = a.wrapping_sub(b) & m;
        let mut f = szp(r, size);
        if a < b {
            f |= CF;
        }
        if (a ^ b) & (a ^ r) & sign != 0 {
            f |= OF;
        }
        if (a ^ b ^ r) & 0x10 != 0 {
            f |= AF;
        }
        (r, f)
    };
    let all = ARITH_FLAGS;
    match kind {
        Rmw::Xchg => RmwResult {
            store: Some(src),
            reg_write: reg.map(|r| (r, old)),
            flags: None,
            flags_mask: 0,
        },
        Rmw::Sub => {
            let (r, f) = sub(old, src);
            RmwResult {
                store: Some(r),
                reg_write: None,
                flags: Some(f),
                flags_mask: all,
            }
        }
        Rmw::Inc => {
            let (r, f) = add(old, 1);
            RmwResult {
                store: Some(r),
                reg_write: None,
                flags: Some(f & !CF),
                flags_mask: all & !CF,
            }
        }
        Rmw::Dec => {
            let (r, f) = sub(old, 1);
            RmwResult {
                store: Some(r),
                reg_write: None,
                flags: Some(f & !CF),
                flags_mask: all & !CF,
            }
        }
        Rmw::Or => RmwResult {
            store: Some(old | src),
            reg_write: None,
            flags: Some(szp(old | src, size)),
            flags_mask: all,
        },
        Rmw::And => RmwResult {
            store: Some(old & src),
            reg_write: None,
            flags: Some(szp(old & src, size)),
            flags_mask: all,
        },
        Rmw::Add => {
            let (r, f) = add(old, src);
            RmwResult {
                store: Some(r),
                reg_write: None,
                flags: Some(f),
                flags_mask: all,
            }
        }
        Rmw::Xadd => {
            let (r, f) = add(old, src);
            RmwResult {
                store: Some(r),
                reg_write: reg.map(|r| (r, old)),
                flags: Some(f),
                flags_mask: all,
            }
        }
        Rmw::Cmpxchg => {
            // Flags as for CMP rAX, old (rAX - old).
            let acc = regs.r[0] & m;
            let (_, f) = sub(acc, old);
            let acc_reg = if size == 8 {
                Register::RAX
            } else {
                Register::EAX
            };
            if acc == old {
                RmwResult {
                    store: Some(src),
                    reg_write: None,
                    flags: Some(f),
                    flags_mask: all,
                }
            } else {
                RmwResult {
                    store: None,
                    reg_write: Some((acc_reg, old)),
                    flags: Some(f),
                    flags_mask: all,
                }
            }
        }
    }
}

/// In-image checks of the decoder on known encodings, then of the platform
/// tables ([`super::platform::self_test`]) and the watchdog's bounds
/// ([`super::run::self_test`]), since the kernel crate has no host tests;
/// returns the first mismatch.
pub fn self_test() -> Result<(), &'static str> {
    let mut regs = RegFile::default();
    for (i, r) in regs.r.iter_mut().enumerate() {
        *r = 0x1000 * (i as u64 + 1) + i as u64;
    }
    let (rax, rcx, rdx, rbx, rsi, rdi) = (
        regs.r[0], regs.r[1], regs.r[2], regs.r[3], regs.r[6], regs.r[7],
    );
    let cases: &[(&[u8], u8, Op)] = &[
        // mov [rax+8], rcx
        (
            &[0x48, 0x89, 0x48, 0x08],
            4,
            Op::Write {
                gva: rax + 8,
                value: rcx,
                size: 8,
            },
        ),
        // mov cr3, rdi
        (&[0x0F, 0x22, 0xDF], 3, Op::Cr3Write { value: rdi }),
        // mov rax, cr3
        (
            &[0x0F, 0x20, 0xD8],
            3,
            Op::Cr3Read {
                dest: Register::RAX,
            },
        ),
        // invlpg [rdx]
        (&[0x0F, 0x01, 0x3A], 3, Op::Invlpg { gva: rdx }),
        // mov dword [rbx], 0x12345678
        (
            &[0xC7, 0x03, 0x78, 0x56, 0x34, 0x12],
            6,
            Op::Write {
                gva: rbx,
                value: 0x1234_5678,
                size: 4,
            },
        ),
        // mov ecx, [rax+0x20] (an MMIO read)
        (
            &[0x8B, 0x48, 0x20],
            3,
            Op::Read {
                gva: rax + 0x20,
                size: 4,
                dest: Register::ECX,
            },
        ),
        // test dword [rax+0x300], 0x1000 (polling the APIC's ICR)
        (
            &[0xF7, 0x80, 0x00, 0x03, 0x00, 0x00, 0x00, 0x10, 0x00, 0x00],
            10,
            Op::ReadAlu {
                gva: rax + 0x300,
                size: 4,
                alu: Alu::Test,
                other: 0x1000,
                dest: None,
                mem_first: true,
            },
        ),
        // or ecx, [rdx]
        (
            &[0x0B, 0x0A],
            2,
            Op::ReadAlu {
                gva: rdx,
                size: 4,
                alu: Alu::Or,
                other: rcx & 0xFFFF_FFFF,
                dest: Some(Register::ECX),
                mem_first: false,
            },
        ),
        // mov byte [rsi+1], al
        (
            &[0x88, 0x46, 0x01],
            3,
            Op::Write {
                gva: rsi + 1,
                value: rax & 0xFF,
                size: 1,
            },
        ),
        // mov qword [rdi+rcx*8], 0xFFFFFFFFFFFFFFFF (imm32 sign-extended)
        (
            &[0x48, 0xC7, 0x04, 0xCF, 0xFF, 0xFF, 0xFF, 0xFF],
            8,
            Op::Write {
                gva: rdi.wrapping_add(rcx * 8),
                value: u64::MAX,
                size: 8,
            },
        ),
        // mov [r9], r10
        (
            &[0x4D, 0x89, 0x11],
            3,
            Op::Write {
                gva: regs.r[9],
                value: regs.r[10],
                size: 8,
            },
        ),
        // mov cr0, rsi
        (&[0x0F, 0x22, 0xC6], 3, Op::CrWrite { cr: 0, value: rsi }),
        // hlt
        (&[0xF4], 1, Op::Other),
    ];
    for (bytes, len, op) in cases {
        let d =
            decode(bytes, 0x40_0000, 64, &regs).map_err(|_| "a known encoding did not decode")?;
        if d.len != *len {
            return Err("wrong instruction length");
        }
        if d.op != *op {
            return Err("wrong operands");
        }
    }
    // lock cmpxchg [rcx+0x30], rdx
    let d = decode(&[0xF0, 0x48, 0x0F, 0xB1, 0x51, 0x30], 0, 64, &regs)
        .map_err(|_| "cmpxchg did not decode")?;
    let want = Op::ReadModifyWrite {
        gva: rcx + 0x30,
        size: 8,
        kind: Rmw::Cmpxchg,
        src: rdx,
        reg: Some(Register::RDX),
    };
    if d.len != 6 || d.op != want {
        return Err("wrong cmpxchg decode");
    }
    // lock inc qword [rax+0x40]
    let d = decode(&[0xF0, 0x48, 0xFF, 0x40, 0x40], 0, 64, &regs)
        .map_err(|_| "lock inc did not decode")?;
    if d.len != 5
        || d.op
            != (Op::ReadModifyWrite {
                gva: rax + 0x40,
                size: 8,
                kind: Rmw::Inc,
                src: 1,
                reg: None,
            })
    {
        return Err("wrong lock inc decode");
    }
    // CMPXCHG: equal -> store, ZF=1; different -> RAX := old, ZF=0.
    let hit = rmw_apply(Rmw::Cmpxchg, 8, rax, 7, Some(Register::RDX), &regs);
    if hit.store != Some(7) || hit.flags.map(|f| f & ZF) != Some(ZF) || hit.reg_write.is_some() {
        return Err("cmpxchg success emulated wrongly");
    }
    let miss = rmw_apply(Rmw::Cmpxchg, 8, 5, 7, Some(Register::RDX), &regs);
    if miss.store.is_some()
        || miss.flags.map(|f| f & ZF) != Some(0)
        || miss.reg_write != Some((Register::RAX, 5))
    {
        return Err("cmpxchg failure emulated wrongly");
    }
    let inc = rmw_apply(Rmw::Inc, 1, 0xFF, 1, None, &regs);
    if inc.store != Some(0) || inc.flags.map(|f| f & ZF) != Some(ZF) || inc.flags_mask & CF != 0 {
        return Err("inc emulated wrongly");
    }
    if decode(&[0x0F, 0xFF], 0, 64, &regs).is_ok() {
        return Err("an invalid encoding decoded");
    }
    if decode(&[0x48, 0x89], 0, 64, &regs).is_ok() {
        return Err("a truncated instruction decoded");
    }
    // Control registers from 32-bit (compatibility mode) and 64-bit code.
    let cr_cases: &[(&[u8], u32, Op)] = &[
        // mov cr4, eax (32-bit)
        (
            &[0x0F, 0x22, 0xE0],
            32,
            Op::CrWrite {
                cr: 4,
                value: rax & 0xFFFF_FFFF,
            },
        ),
        // mov eax, cr0 (32-bit)
        (
            &[0x0F, 0x20, 0xC0],
            32,
            Op::CrRead {
                cr: 0,
                dest: Register::EAX,
            },
        ),
        // mov cr3, edi (32-bit)
        (
            &[0x0F, 0x22, 0xDF],
            32,
            Op::Cr3Write {
                value: rdi & 0xFFFF_FFFF,
            },
        ),
        // mov rbx, cr4
        (
            &[0x0F, 0x20, 0xE3],
            64,
            Op::CrRead {
                cr: 4,
                dest: Register::RBX,
            },
        ),
        // clts
        (&[0x0F, 0x06], 64, Op::Clts),
        // smsw eax (32-bit)
        (
            &[0x0F, 0x01, 0xE0],
            32,
            Op::CrRead {
                cr: 0,
                dest: Register::EAX,
            },
        ),
        // lmsw si
        (
            &[0x0F, 0x01, 0xF6],
            64,
            Op::Lmsw {
                value: rsi & 0xFFFF,
            },
        ),
    ];
    for (bytes, bits, op) in cr_cases {
        let d = decode(bytes, 0x10_0000, *bits, &regs)
            .map_err(|_| "a control-register access did not decode")?;
        if d.op != *op || d.len as usize != bytes.len() {
            return Err("wrong control-register decode");
        }
    }
    if decode(&[0x90], 0, 8, &regs).is_ok() {
        return Err("a code size of 8 bits was accepted");
    }
    // MMIO reads folded into ALU instructions: values and flags.
    if alu_apply(Alu::Test, 4, 0x1000, 0x1000, true) != (None, PF)
        || alu_apply(Alu::Test, 4, 0, 0x1000, true) != (None, ZF | PF)
    {
        return Err("TEST of an MMIO value sets the wrong flags");
    }
    if alu_apply(Alu::Cmp, 4, 5, 7, true).1 & CF == 0
        || alu_apply(Alu::Cmp, 4, 7, 5, false).1 & CF == 0
        || alu_apply(Alu::Cmp, 4, 7, 7, true).1 & ZF == 0
    {
        return Err("CMP with an MMIO operand sets the wrong flags");
    }
    if alu_apply(Alu::Or, 4, 0xF0, 0x0F, false).0 != Some(0xFF)
        || alu_apply(Alu::Xor, 4, 0xFF, 0xFF, false) != (Some(0), ZF | PF)
        || alu_apply(Alu::Sub, 4, 2, 10, false).0 != Some(8)
    {
        return Err("an ALU from MMIO into a register computes the wrong value");
    }
    super::platform::self_test()?;
    super::run::self_test()
}
