//! Parse, fit and info tests on ELF32, ELF64 and a.out-kludge kernels built byte by byte.

mod common;

use abi::Gpa;
use common::{
    aout_file, c_string, data_offset, elf, multiboot_header, two_segment_elf, u32_at, u64_at,
    usual_aout, Aout, ElfSpec, Seg, ELF_HEADER_AT,
};
use mboot::{
    build_info, parse, plan, Format, GuestMemory, Kernel, LoadError, Module, Segment,
    BOOTLOADER_MAGIC, FLAG_MEMORY_INFO, FLAG_PAGE_ALIGN, INFO_GPA, LOW_AREA_END,
};

const MIB: u64 = 1 << 20;

fn refusal(image: &[u8]) -> String {
    match parse(image) {
        Ok(k) => panic!("parsed a bad image: {k:?}"),
        Err(e) => e.to_string(),
    }
}

/// A parsed ELF32 kernel of one segment of `len` bytes at `gpa`, entered at its start.
fn one_segment(gpa: u64, len: u64) -> Kernel {
    parse(&elf(&ElfSpec::new(
        false,
        gpa,
        vec![Seg::at(gpa, &[1], len)],
    )))
    .unwrap()
}

fn fit_refusal(k: &Kernel, mem_bytes: u64) -> String {
    k.check_fits(mem_bytes)
        .expect_err("the kernel should not fit")
        .to_string()
}

#[test]
fn elf32_segments_and_entry_are_taken_by_physical_address() {
    let spec = two_segment_elf(false);
    let k = parse(&elf(&spec)).expect("a valid ELF32 kernel parses");
    assert_eq!(k.format, Format::Elf32);
    assert_eq!(k.header.offset, ELF_HEADER_AT);
    assert_eq!(k.header.flags, 0);
    assert_eq!(k.entry, Gpa(0x10_0010));
    assert_eq!(
        k.segments(),
        [
            Segment {
                file_offset: data_offset(&spec, 0),
                file_len: 0x30,
                gpa: Gpa(0x10_0000),
                mem_len: 0x30
            },
            Segment {
                file_offset: data_offset(&spec, 1),
                file_len: 10,
                gpa: Gpa(0x10_2000),
                mem_len: 0x1000
            },
        ]
    );
    assert_eq!(k.segments()[1].zero_len(), 0x1000 - 10);
    assert_eq!(k.end(), Gpa(0x10_3000));
}

#[test]
fn elf64_linked_high_enters_at_the_physical_address() {
    let mut spec = ElfSpec::new(
        true,
        0xffff_ffff_8000_0020,
        vec![Seg {
            paddr: 0x40_0000,
            vaddr: 0xffff_ffff_8000_0000,
            data: vec![0xf4; 0x40],
            memsz: 0x2000,
        }],
    );
    spec.header_flags = FLAG_PAGE_ALIGN | FLAG_MEMORY_INFO;
    let k = parse(&elf(&spec)).expect("a valid ELF64 kernel parses");
    assert_eq!(k.format, Format::Elf64);
    assert_eq!(k.header.flags, 3);
    assert_eq!(k.entry, Gpa(0x40_0020));
    assert_eq!(k.segments().len(), 1);
    assert_eq!(k.segments()[0].gpa, Gpa(0x40_0000));
    assert_eq!(k.segments()[0].mem_len, 0x2000);
    assert_eq!(k.end(), Gpa(0x40_2000));
}

#[test]
fn aout_kludge_takes_the_header_addresses() {
    let (file, a) = usual_aout();
    let k = parse(&file).expect("a valid a.out-kludge kernel parses");
    assert_eq!(k.format, Format::AoutKludge);
    assert_eq!(k.header.offset, 0x40);
    assert_eq!(k.entry, Gpa(u64::from(a.entry_addr)));
    assert_eq!(
        k.segments(),
        [Segment {
            file_offset: 0,
            file_len: 0x80,
            gpa: Gpa(0x10_0000),
            mem_len: 0x1000
        }]
    );
}

#[test]
fn aout_kludge_with_zero_end_fields_loads_the_whole_file_without_bss() {
    let (_, mut a) = usual_aout();
    a.load_end_addr = 0;
    a.bss_end_addr = 0;
    let file = aout_file(0, 0x40, a, &[0xf4; 0x120]);
    let k = parse(&file).expect("load_end_addr 0 means the whole file");
    assert_eq!(k.segments()[0].file_len, file.len());
    assert_eq!(k.segments()[0].mem_len, file.len() as u64);
}

#[test]
fn the_header_must_be_aligned_complete_and_in_the_first_8192_bytes() {
    let at = |offset: usize| {
        let mut f = vec![0u8; offset];
        f.extend(multiboot_header(0));
        f
    };
    // At 8180 the 12 bytes end exactly at 8192: found (then not ELF).
    assert!(refusal(&at(8180)).starts_with("not an ELF file"));
    assert_eq!(
        refusal(&at(8184)),
        "no Multiboot header in the first 8192 bytes"
    );
    assert_eq!(
        refusal(&at(8192)),
        "no Multiboot header in the first 8192 bytes"
    );
    assert_eq!(
        refusal(&at(2)),
        "no Multiboot header in the first 8192 bytes"
    );
    assert_eq!(refusal(&[]), "no Multiboot header in the first 8192 bytes");
    assert_eq!(
        refusal(b"\x02\xb0\xad\x1b"),
        "no Multiboot header in the first 8192 bytes"
    );
}

#[test]
fn a_bad_checksum_is_reported_with_its_value() {
    let mut f = multiboot_header(0);
    f[8] ^= 1;
    let checksum = u32::from_le_bytes(f[8..12].try_into().unwrap());
    assert_eq!(
        refusal(&f),
        format!(
            "Multiboot header at offset 0x0: checksum {checksum:#010x} does not sum to 0 with \
             magic 0x1badb002 and flags 0x00000000"
        )
    );
    // A good header after a bad one is used.
    let mut spec = two_segment_elf(false);
    spec.entry = 0x10_0000;
    let mut file = elf(&spec);
    file[ELF_HEADER_AT - 12..ELF_HEADER_AT].copy_from_slice(&f);
    assert_eq!(
        parse(&file)
            .expect("the second header is valid")
            .header
            .offset,
        ELF_HEADER_AT
    );
}

#[test]
fn flags_it_cannot_honour_are_named() {
    let mut spec = two_segment_elf(false);
    spec.header_flags = 1 << 2;
    assert_eq!(
        refusal(&elf(&spec)),
        "Multiboot header flag bit 2 (video mode) is not supported"
    );
    spec.header_flags = 1 << 9 | 1;
    assert_eq!(
        refusal(&elf(&spec)),
        "Multiboot header flag bit 9 (a requirement this loader does not know) is not supported"
    );
    // Optional bits above 16 (other than the kludge) are ignored.
    spec.header_flags = 1 << 20;
    assert!(parse(&elf(&spec)).is_ok());
}

#[test]
fn aout_kludge_fields_are_checked_against_the_file() {
    let (_, good) = usual_aout();
    let text = [0xf4u8; 0x20];
    let with = |f: &dyn Fn(&mut Aout)| {
        let mut a = good;
        f(&mut a);
        refusal(&aout_file(0, 0x40, a, &text))
    };
    assert_eq!(
        with(&|a| a.load_addr = 0x10_0044),
        "a.out kludge: load_addr 0x100044 is above header_addr 0x100040"
    );
    assert_eq!(
        with(&|a| a.load_addr = 0xf_f000),
        "a.out kludge: load_addr 0xff000 is 0x1040 bytes before header_addr 0x100040, but the \
         header is at file offset 0x40"
    );
    assert_eq!(
        with(&|a| a.load_end_addr = 0xf_0000),
        "a.out kludge: load_end_addr 0xf0000 is below load_addr 0x100000"
    );
    assert_eq!(
        with(&|a| a.load_end_addr = 0x10_0100),
        "a.out kludge: load_end_addr 0x100100 needs 0x100 bytes from file offset 0x0, but the \
         file has 0x80 bytes"
    );
    assert_eq!(
        with(&|a| a.bss_end_addr = 0x10_0070),
        "a.out kludge: bss_end_addr 0x100070 is below the loaded data's end 0x100080"
    );
    assert_eq!(
        with(&|a| a.entry_addr = 0x20_0000),
        "entry point 0x200000 lies in no loaded segment"
    );
    let short = &aout_file(0, 0x40, good, &text)[..0x40 + 20];
    assert_eq!(
        refusal(short),
        "Multiboot header at offset 0x40 has the a.out kludge flag but not its 32 bytes inside \
         the file's first 8192"
    );
}

#[test]
fn elf_files_it_cannot_run_are_refused_by_field() {
    let spec = two_segment_elf(false);
    let edit = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut file = elf(&spec);
        f(&mut file);
        refusal(&file)
    };
    assert_eq!(
        edit(&|f| f[4] = 3),
        "ELF class 3 unknown (1 is ELF32, 2 is ELF64)"
    );
    assert_eq!(
        edit(&|f| f[5] = 2),
        "ELF data encoding 2 is not little-endian (1), as x86 is"
    );
    assert_eq!(edit(&|f| f[18] = 62), "ELF32 machine 62 is not x86 (3)");
    assert_eq!(
        edit(&|f| f[16] = 3),
        "ELF type 3 is not an executable (ET_EXEC, 2)"
    );
    assert_eq!(
        edit(&|f| f[0] = b'X'),
        "not an ELF file (starts 58 45 4c 46) and the Multiboot header has no a.out kludge \
         (flag bit 16)"
    );
    assert!(edit(&|f| f[44] = 40).starts_with("malformed ELF: "));

    let mut spec64 = two_segment_elf(true);
    spec64.machine = 3;
    assert_eq!(refusal(&elf(&spec64)), "ELF64 machine 3 is not x86-64 (62)");
}

#[test]
fn elf_segments_are_checked() {
    let base = two_segment_elf(false);
    let with = |f: &dyn Fn(&mut ElfSpec)| {
        let mut spec = base.clone();
        f(&mut spec);
        refusal(&elf(&spec))
    };
    assert_eq!(
        with(&|s| s.segs[1].memsz = 4),
        "program header 1: p_filesz 0xa is above p_memsz 0x4"
    );
    assert_eq!(
        with(&|s| s.segs[1].paddr = 0x10_0020),
        "segment at 0x100000 of 0x30 bytes overlaps segment at 0x100020 of 0x1000 bytes"
    );
    assert_eq!(
        with(&|s| s.entry = 0x10_1000),
        "entry point 0x101000 lies in no loaded segment"
    );
    assert_eq!(
        with(&|s| s.segs.clear()),
        "nothing to load: no segment has any bytes"
    );
    assert_eq!(
        with(&|s| {
            s.segs = (0..17)
                .map(|i| Seg::at(0x10_0000 + i * 0x1000, &[1], 1))
                .collect();
            s.entry = 0x10_0000;
        }),
        "17 loadable segments; at most 16 are supported"
    );
    let mut spec64 = two_segment_elf(true);
    spec64.entry = 0x1_0000_0000;
    spec64.segs[0].paddr = 0x1_0000_0000;
    spec64.segs[0].vaddr = 0x1_0000_0000;
    assert_eq!(
        refusal(&elf(&spec64)),
        "entry point 0x100000000 is not a 32-bit address"
    );
    spec64.segs[0].paddr = u64::MAX - 8;
    assert_eq!(
        refusal(&elf(&spec64)),
        "segment at 0xfffffffffffffff7 of 0x30 bytes passes the top of the address space"
    );
    // A segment whose bytes pass the file's end.
    let mut file = elf(&base);
    file.truncate(data_offset(&base, 1) + 4);
    assert_eq!(
        refusal(&file),
        format!(
            "segment 1: 0xa bytes at file offset {:#x} pass the file's end {:#x}",
            data_offset(&base, 1),
            file.len()
        )
    );
}

#[test]
fn check_fits_refuses_with_the_numbers() {
    let spec = ElfSpec::new(
        true,
        0x10_0000,
        vec![Seg::at(0x10_0000, &[0xf4], 128 * MIB)],
    );
    let big = parse(&elf(&spec)).unwrap();
    assert_eq!(
        fit_refusal(&big, 128 * MIB),
        "segment at 0x100000 of 0x8000000 bytes passes the domain's 128 MiB"
    );
    big.check_fits(129 * MIB).expect("fits one MiB more");
    assert_eq!(
        fit_refusal(&big, 129 * MIB - 1),
        "segment at 0x100000 of 0x8000000 bytes passes the domain's 0x80fffff bytes"
    );
    assert_eq!(
        fit_refusal(&big, MIB),
        "the domain's 1 MiB of memory do not reach past 1 MiB"
    );

    let low = one_segment(0x8000, 0x1001);
    assert_eq!(
        fit_refusal(&low, 128 * MIB),
        "segment at 0x8000 of 0x1001 bytes overlaps the loader's low area 0x9000..0x10000 (info, \
         memory map, module list, strings)"
    );
    let below = one_segment(0x1000, 0x8000);
    below
        .check_fits(128 * MIB)
        .expect("ends right at the low area");
    let hole = one_segment(0x9_f000, 0x1001);
    assert_eq!(
        fit_refusal(&hole, 128 * MIB),
        "segment at 0x9f000 of 0x1001 bytes overlaps 640 KiB..1 MiB, which the memory map leaves out"
    );
}

/// Loads `file` with `cmdline` and `modules` into `mem_bytes` of memory.
fn boot(file: &[u8], mem_bytes: u64, cmdline: &str, modules: &[Module]) -> (Vec<u8>, mboot::Entry) {
    let k = parse(file).expect("the kernel parses");
    let mut mem = vec![0xaau8; mem_bytes as usize];
    k.check_fits(mem_bytes).expect("the kernel fits");
    k.load(file, mem.as_mut_slice()).expect("the kernel loads");
    let entry = build_info(mem.as_mut_slice(), &k, cmdline, modules).expect("the info is written");
    (mem, entry)
}

#[test]
fn the_info_structure_reads_back_field_by_field() {
    let file = elf(&two_segment_elf(false));
    let environ = b"NR_CPUS=1\nMEMSIZE=128\n";
    let second = [7u8; 0x1001];
    let modules = [
        Module {
            bytes: environ,
            string: "environ",
        },
        Module {
            bytes: &second,
            string: "second module",
        },
    ];
    let (mem, entry) = boot(&file, 4 * MIB, "console=ttyS0 x", &modules);
    assert_eq!(
        entry,
        mboot::Entry {
            eip: Gpa(0x10_0010),
            eax: BOOTLOADER_MAGIC,
            ebx: INFO_GPA
        }
    );
    assert_eq!(BOOTLOADER_MAGIC, 0x2bad_b002);
    let info = entry.ebx.0;
    assert_eq!(info, 0x9000);
    assert_eq!(u32_at(&mem, info), 0x4d, "flags: mem, cmdline, mods, mmap");
    assert_eq!(u32_at(&mem, info + 4), 640, "mem_lower in KiB");
    assert_eq!(u32_at(&mem, info + 8), 3 * 1024, "mem_upper in KiB");
    assert_eq!(u32_at(&mem, info + 12), 0, "no boot device");
    let cmdline = u32_at(&mem, info + 16);
    assert_eq!(c_string(&mem, cmdline.into()), b"console=ttyS0 x");
    assert_eq!(u32_at(&mem, info + 20), 2, "mods_count");
    let mods = u64::from(u32_at(&mem, info + 24));
    // Modules: page-aligned after the kernel's highest byte (0x103000).
    let m0 = (u32_at(&mem, mods), u32_at(&mem, mods + 4));
    let m1 = (u32_at(&mem, mods + 16), u32_at(&mem, mods + 20));
    assert_eq!(m0, (0x10_3000, 0x10_3000 + environ.len() as u32));
    assert_eq!(m1, (0x10_4000, 0x10_5001));
    assert_eq!(&mem[0x10_3000..0x10_3000 + environ.len()], environ);
    assert_eq!(&mem[0x10_4000..0x10_5001], &second[..]);
    assert_eq!(c_string(&mem, u32_at(&mem, mods + 8).into()), b"environ");
    assert_eq!(
        c_string(&mem, u32_at(&mem, mods + 24).into()),
        b"second module"
    );
    assert_eq!(u32_at(&mem, mods + 12), 0, "reserved");
    // The memory map: two available ranges.
    assert_eq!(u32_at(&mem, info + 44), 48, "mmap_length");
    let mmap = u64::from(u32_at(&mem, info + 48));
    let entry_at = |i: u64| {
        let e = mmap + 24 * i;
        (
            u32_at(&mem, e),
            u64_at(&mem, e + 4),
            u64_at(&mem, e + 12),
            u32_at(&mem, e + 20),
        )
    };
    assert_eq!(entry_at(0), (20, 0, 0xa_0000, 1));
    assert_eq!(entry_at(1), (20, 0x10_0000, 3 * MIB, 1));
    for field in [28, 32, 36, 40, 52, 56, 60, 64, 68, 72, 76, 80, 84] {
        assert_eq!(u32_at(&mem, info + field), 0, "field at {field} is zero");
    }
    // Everything the loader wrote lies inside its low area.
    for gpa in [cmdline.into(), mods, mmap, u32_at(&mem, mods + 24).into()] {
        assert!((0x9000..LOW_AREA_END.0).contains(&gpa), "{gpa:#x}");
    }
    // The kernel's bytes and zeroed bss.
    assert_eq!(&mem[0x10_0000..0x10_0030], &[0x90; 0x30][..]);
    assert_eq!(&mem[0x10_2000..0x10_200a], b"data bytes");
    assert!(
        mem[0x10_200a..0x10_3000].iter().all(|&b| b == 0),
        "bss is zeroed"
    );
    assert_eq!(
        mem[0x10_0030], 0xaa,
        "bytes between segments are left alone"
    );
}

#[test]
fn an_empty_command_line_is_still_a_string() {
    let (file, _) = usual_aout();
    let (mem, entry) = boot(&file, 2 * MIB, "", &[]);
    let cmdline = u32_at(&mem, entry.ebx.0 + 16);
    assert_ne!(cmdline, 0);
    assert_eq!(mem[cmdline as usize], 0);
    assert_eq!(u32_at(&mem, entry.ebx.0 + 20), 0, "no modules");
    assert_eq!(u32_at(&mem, entry.ebx.0 + 8), 1024, "mem_upper");
    assert_eq!(&mem[0x10_0040..0x10_0044], &0x1bad_b002u32.to_le_bytes());
    assert!(
        mem[0x10_0080..0x10_1000].iter().all(|&b| b == 0),
        "bss is zeroed"
    );
}

#[test]
fn modules_and_strings_that_do_not_fit_are_refused() {
    let file = elf(&two_segment_elf(false));
    let k = parse(&file).unwrap();
    let big = vec![0u8; 2 * MIB as usize];
    let one = |bytes, string| [Module { bytes, string }];
    assert_eq!(
        plan(&k, 3 * MIB, "", &one(&big, "big"))
            .unwrap_err()
            .to_string(),
        "module 0 of 0x200000 bytes, placed at 0x103000 after the kernel, passes the domain's \
         3 MiB (or 4 GiB)"
    );
    assert_eq!(
        plan(&k, 3 * MIB, "a\0b", &[]).unwrap_err().to_string(),
        "the command line has a NUL byte at offset 1"
    );
    assert_eq!(
        plan(&k, 3 * MIB, "", &one(b"x", "\0"))
            .unwrap_err()
            .to_string(),
        "module 0's string has a NUL byte at offset 0"
    );
    let long = "x".repeat(0x7000);
    assert_eq!(
        plan(&k, 3 * MIB, &long, &[]).unwrap_err().to_string(),
        "the info, memory map, module list and strings need 28809 bytes; the loader's low area \
         has 28672"
    );
    let many = [Module {
        bytes: b"",
        string: "",
    }; 17];
    assert_eq!(
        plan(&k, 3 * MIB, "", &many).unwrap_err().to_string(),
        "17 modules; at most 16 are supported"
    );
    let layout = plan(&k, 3 * MIB, &"x".repeat(0x7000 - 137), &[]).expect("fills the low area");
    assert_eq!(layout.low_end, LOW_AREA_END);
    // The fit check runs first.
    assert!(matches!(
        plan(&k, MIB, "", &[]),
        Err(LoadError::MemoryTooSmall { mem_bytes: MIB })
    ));
}

#[test]
fn a_byte_slice_memory_refuses_writes_past_its_end() {
    let mut mem = vec![0u8; 16];
    let mem = mem.as_mut_slice();
    assert_eq!(mem.size(), 16);
    mem.write(Gpa(12), &[1, 2, 3, 4]).expect("fits exactly");
    assert_eq!(
        mem.write(Gpa(13), &[1, 2, 3, 4]).unwrap_err().to_string(),
        "a write of 0x4 bytes at 0xd passes guest memory's 0x10 bytes"
    );
    assert!(mem.zero(Gpa(u64::MAX), 2).is_err());
    assert!(mem.zero(Gpa(0), u64::MAX).is_err());
    // A memory smaller than the plan's: build_info refuses, no panic.
    let file = elf(&two_segment_elf(false));
    let k = parse(&file).unwrap();
    assert!(matches!(
        build_info(mem, &k, "", &[]),
        Err(LoadError::MemoryTooSmall { mem_bytes: 16 })
    ));
}
