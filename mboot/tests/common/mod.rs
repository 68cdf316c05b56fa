//! Kernel images built byte by byte for the tests: ELF32, ELF64 and a.out-kludge Multiboot files.
#![allow(dead_code)]

use mboot::{FLAG_AOUT_KLUDGE, HEADER_MAGIC};

/// One `PT_LOAD` of a test ELF: its bytes go at `paddr` (linked at `vaddr`).
#[derive(Clone)]
pub struct Seg {
    pub paddr: u64,
    pub vaddr: u64,
    pub data: Vec<u8>,
    pub memsz: u64,
}

impl Seg {
    /// A segment linked where it is loaded.
    pub fn at(paddr: u64, data: &[u8], memsz: u64) -> Seg {
        Seg {
            paddr,
            vaddr: paddr,
            data: data.to_vec(),
            memsz,
        }
    }
}

/// What a test ELF looks like.
#[derive(Clone)]
pub struct ElfSpec {
    pub class64: bool,
    pub machine: u16,
    pub e_type: u16,
    pub entry: u64,
    pub header_flags: u32,
    pub segs: Vec<Seg>,
}

impl ElfSpec {
    /// An x86 ELF32 (`class64` false) or x86-64 ELF64 executable.
    pub fn new(class64: bool, entry: u64, segs: Vec<Seg>) -> ElfSpec {
        ElfSpec {
            class64,
            machine: if class64 { 62 } else { 3 },
            e_type: 2,
            entry,
            header_flags: 0,
            segs,
        }
    }
}

/// Magic, flags and checksum of a Multiboot v1 header.
pub fn multiboot_header(flags: u32) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend(HEADER_MAGIC.to_le_bytes());
    h.extend(flags.to_le_bytes());
    h.extend(
        0u32.wrapping_sub(HEADER_MAGIC)
            .wrapping_sub(flags)
            .to_le_bytes(),
    );
    h
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

/// File offset of the segment data of `spec`'s segment `i` in `elf(spec)`.
pub fn data_offset(spec: &ElfSpec, i: usize) -> usize {
    let mut at = 0x440;
    for s in &spec.segs[..i] {
        at += s.data.len().next_multiple_of(16);
    }
    at
}

/// File offset of the Multiboot header in `elf(spec)`.
pub const ELF_HEADER_AT: usize = 0x400;

/// Builds the ELF file: the ELF header, the program headers, the Multiboot
/// header at `ELF_HEADER_AT`, then each segment's data from 0x440 on.
pub fn elf(spec: &ElfSpec) -> Vec<u8> {
    let (ehsize, phsize) = if spec.class64 { (64, 56) } else { (52, 32) };
    let end = data_offset(spec, spec.segs.len());
    let mut f = vec![0u8; end];
    put(&mut f, 0, &[0x7f, b'E', b'L', b'F']);
    f[4] = if spec.class64 { 2 } else { 1 };
    f[5] = 1; // little-endian
    f[6] = 1; // EV_CURRENT
    put(&mut f, 16, &spec.e_type.to_le_bytes());
    put(&mut f, 18, &spec.machine.to_le_bytes());
    put(&mut f, 20, &1u32.to_le_bytes());
    let phnum = spec.segs.len() as u16;
    if spec.class64 {
        put(&mut f, 24, &spec.entry.to_le_bytes());
        put(&mut f, 32, &(ehsize as u64).to_le_bytes()); // e_phoff
        put(&mut f, 52, &(ehsize as u16).to_le_bytes());
        put(&mut f, 54, &(phsize as u16).to_le_bytes());
        put(&mut f, 56, &phnum.to_le_bytes());
    } else {
        put(&mut f, 24, &(spec.entry as u32).to_le_bytes());
        put(&mut f, 28, &(ehsize as u32).to_le_bytes()); // e_phoff
        put(&mut f, 40, &(ehsize as u16).to_le_bytes());
        put(&mut f, 42, &(phsize as u16).to_le_bytes());
        put(&mut f, 44, &phnum.to_le_bytes());
    }
    for (i, s) in spec.segs.iter().enumerate() {
        let ph = ehsize + i * phsize;
        let off = data_offset(spec, i) as u64;
        put(&mut f, off as usize, &s.data);
        put(&mut f, ph, &1u32.to_le_bytes()); // PT_LOAD
        if spec.class64 {
            put(&mut f, ph + 4, &5u32.to_le_bytes()); // R+X
            put(&mut f, ph + 8, &off.to_le_bytes());
            put(&mut f, ph + 16, &s.vaddr.to_le_bytes());
            put(&mut f, ph + 24, &s.paddr.to_le_bytes());
            put(&mut f, ph + 32, &(s.data.len() as u64).to_le_bytes());
            put(&mut f, ph + 40, &s.memsz.to_le_bytes());
            put(&mut f, ph + 48, &16u64.to_le_bytes());
        } else {
            put(&mut f, ph + 4, &(off as u32).to_le_bytes());
            put(&mut f, ph + 8, &(s.vaddr as u32).to_le_bytes());
            put(&mut f, ph + 12, &(s.paddr as u32).to_le_bytes());
            put(&mut f, ph + 16, &(s.data.len() as u32).to_le_bytes());
            put(&mut f, ph + 20, &(s.memsz as u32).to_le_bytes());
            put(&mut f, ph + 24, &5u32.to_le_bytes());
            put(&mut f, ph + 28, &16u32.to_le_bytes());
        }
    }
    assert!(
        ehsize + spec.segs.len() * phsize <= ELF_HEADER_AT,
        "too many test segments"
    );
    put(&mut f, ELF_HEADER_AT, &multiboot_header(spec.header_flags));
    f
}

/// The usual test ELF: text at 1 MiB (entry in it) and data + bss at 1 MiB + 8 KiB.
pub fn two_segment_elf(class64: bool) -> ElfSpec {
    ElfSpec::new(
        class64,
        0x10_0010,
        vec![
            Seg::at(0x10_0000, &[0x90; 0x30], 0x30),
            Seg::at(0x10_2000, b"data bytes", 0x1000),
        ],
    )
}

/// The a.out kludge's five address fields, in header order.
#[derive(Clone, Copy)]
pub struct Aout {
    pub header_addr: u32,
    pub load_addr: u32,
    pub load_end_addr: u32,
    pub bss_end_addr: u32,
    pub entry_addr: u32,
}

/// A flat a.out-kludge kernel: `pad` bytes, the 32-byte header, then `text`.
/// Loaded at `load_addr` from file offset 0 when the fields say so.
pub fn aout_file(flags: u32, pad: usize, a: Aout, text: &[u8]) -> Vec<u8> {
    let mut f = vec![0xccu8; pad];
    f.extend(multiboot_header(flags | FLAG_AOUT_KLUDGE));
    for v in [
        a.header_addr,
        a.load_addr,
        a.load_end_addr,
        a.bss_end_addr,
        a.entry_addr,
    ] {
        f.extend(v.to_le_bytes());
    }
    f.extend(text);
    f
}

/// The usual a.out kernel: header at offset 0x40 of a file loaded at 1 MiB,
/// 0x40 + 32 + 0x20 bytes of text and data, bss to 1 MiB + 0x1000.
pub fn usual_aout() -> (Vec<u8>, Aout) {
    let a = Aout {
        header_addr: 0x10_0040,
        load_addr: 0x10_0000,
        load_end_addr: 0x10_0080,
        bss_end_addr: 0x10_1000,
        entry_addr: 0x10_0060,
    };
    (aout_file(0, 0x40, a, &[0xf4; 0x20]), a)
}

/// xorshift64*: small, deterministic, no dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Reads a little-endian u32 at `at`.
pub fn u32_at(mem: &[u8], at: u64) -> u32 {
    let at = at as usize;
    u32::from_le_bytes(mem[at..at + 4].try_into().unwrap())
}

/// Reads a little-endian u64 at `at`.
pub fn u64_at(mem: &[u8], at: u64) -> u64 {
    let at = at as usize;
    u64::from_le_bytes(mem[at..at + 8].try_into().unwrap())
}

/// The NUL-terminated string at `at`.
pub fn c_string(mem: &[u8], at: u64) -> &[u8] {
    let rest = &mem[at as usize..];
    &rest[..rest
        .iter()
        .position(|&b| b == 0)
        .expect("a NUL ends the string")]
}
