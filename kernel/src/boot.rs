//! Boot: the Multiboot header, the 32-bit entry stub into long mode, and the boot information.
//!
//! QEMU's `-kernel` loads the image at 1 MiB (Multiboot v1, a.out kludge) and
//! enters `umbra_boot32` in 32-bit protected mode with paging off. The stub
//! identity-maps the low 4 GiB with 2 MiB pages (the last GiB uncached: local
//! APIC, IO-APIC), enables long mode and calls `kernel_main(magic, info)`
//! on a 64 KiB stack with a guard page below it (unmapped later by
//! [`crate::paging::init`]). The same page tables and GDT serve the
//! application processors.

use core::arch::global_asm;
use core::sync::atomic::{AtomicU64, Ordering};
use x86_64::{PhysAddr, VirtAddr};

/// The bootstrap CPU's stack (in the image), in 4 KiB frames.
pub const BOOT_STACK_FRAMES: u64 = 16;

/// Value of EAX when a Multiboot v1 loader hands over control.
pub const MULTIBOOT_MAGIC: u32 = 0x2BAD_B002;

/// Physical address of the boot page tables' top level (loaded into CR3 by every CPU).
pub fn boot_pml4() -> PhysAddr {
    PhysAddr::new(core::ptr::addr_of!(umbra_boot_pml4) as u64)
}

/// First and one-past-last physical address of the loaded image (incl. bss).
pub fn image_span() -> (PhysAddr, PhysAddr) {
    (
        PhysAddr::new(core::ptr::addr_of!(__image_start) as u64),
        PhysAddr::new(core::ptr::addr_of!(__image_end) as u64),
    )
}

/// The page below the bootstrap CPU's stack (in the image's bss; left
/// unmapped by [`crate::paging::init`] so an overflow faults).
pub fn boot_stack_guard() -> VirtAddr {
    VirtAddr::new(core::ptr::addr_of!(umbra_boot_stack_guard) as u64)
}

/// One past the top of the bootstrap CPU's stack.
pub fn boot_stack_top() -> VirtAddr {
    VirtAddr::new(core::ptr::addr_of!(umbra_boot_stack_top) as u64)
}

/// TSC value read by the entry stub, before anything else ran.
pub fn entry_tsc() -> u64 {
    ENTRY_TSC.load(Ordering::Relaxed)
}

/// Written once by the 32-bit stub (low/high halves), read afterwards.
#[no_mangle]
static ENTRY_TSC: AtomicU64 = AtomicU64::new(0);

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
    static umbra_boot_pml4: u8;
    static umbra_boot_stack_guard: u8;
    static umbra_boot_stack_top: u8;
    /// The boot GDT's pseudo-descriptor (also used by the AP trampoline).
    pub static umbra_boot_gdt: u8;
}

global_asm!(
    r#"
    .section .multiboot, "a"
    .balign 4
umbra_multiboot_header:
    .long 0x1BADB002
    .long 0x00010002
    .long -(0x1BADB002 + 0x00010002)
    .long umbra_multiboot_header
    .long __image_start
    .long __data_end
    .long __image_end
    .long umbra_boot32

    .section .bss.boot, "aw", @nobits
    .balign 4096
    .global umbra_boot_pml4
umbra_boot_pml4:  .skip 4096
umbra_boot_pdpt:  .skip 4096
umbra_boot_pd:    .skip 4096 * 4
    .global umbra_boot_stack_guard
    .global umbra_boot_stack_top
umbra_boot_stack_guard: .skip 4096
umbra_boot_stack: .skip {boot_stack_bytes}
umbra_boot_stack_top:
umbra_mb_magic:   .skip 4
umbra_mb_info:    .skip 4

    .section .rodata.boot, "a"
    .balign 16
    .global umbra_boot_gdt
    .global umbra_boot_gdt_table
umbra_boot_gdt_table:
    .quad 0
    .quad 0x00AF9A000000FFFF
    .quad 0x00CF92000000FFFF
umbra_boot_gdt:
    .word umbra_boot_gdt - umbra_boot_gdt_table - 1
    .long umbra_boot_gdt_table

    .section .text.boot, "ax"
    .code32
    .global umbra_boot32
umbra_boot32:
    cli
    cld
    mov [umbra_mb_magic], eax
    mov [umbra_mb_info], ebx
    rdtsc
    mov [ENTRY_TSC], eax
    mov [ENTRY_TSC + 4], edx
    mov esp, offset umbra_boot_stack_top

    /* 2048 2 MiB pages: identity map of 0..4 GiB. */
    mov edi, offset umbra_boot_pd
    mov eax, 0x83
    xor ecx, ecx
2:  mov [edi + ecx * 8], eax
    mov dword ptr [edi + ecx * 8 + 4], 0
    cmp ecx, 1536
    jb 3f
    or dword ptr [edi + ecx * 8], 0x18
3:  add eax, 0x200000
    inc ecx
    cmp ecx, 2048
    jne 2b

    mov edi, offset umbra_boot_pdpt
    mov eax, offset umbra_boot_pd
    or eax, 3
    xor ecx, ecx
4:  mov [edi + ecx * 8], eax
    add eax, 4096
    inc ecx
    cmp ecx, 4
    jne 4b

    mov eax, offset umbra_boot_pdpt
    or eax, 3
    mov [umbra_boot_pml4], eax

    mov eax, offset umbra_boot_pml4
    mov cr3, eax
    mov eax, cr4
    or eax, 0x20
    mov cr4, eax
    mov ecx, 0xC0000080
    rdmsr
    or eax, 0x900
    wrmsr
    mov eax, cr0
    or eax, 0x80010001
    mov cr0, eax
    lgdt [umbra_boot_gdt]
    mov eax, offset umbra_boot64
    push 0x08
    push eax
    retf

    .code64
umbra_boot64:
    mov ax, 0x10
    mov ds, ax
    mov es, ax
    mov ss, ax
    xor eax, eax
    mov fs, ax
    mov gs, ax
    mov rsp, offset umbra_boot_stack_top
    mov edi, [umbra_mb_magic]
    mov esi, [umbra_mb_info]
    call kernel_main
5:  cli
    hlt
    jmp 5b
"#,
    boot_stack_bytes = const BOOT_STACK_FRAMES * 4096,
);

/// One usable RAM region from the boot memory map.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    /// First byte.
    pub start: PhysAddr,
    /// Length in bytes.
    pub len: u64,
    /// Multiboot type: 1 usable, 2 reserved, 3 ACPI reclaimable, 4 NVS, 5 bad.
    pub kind: u32,
}

/// Most memory-map entries kept.
pub const MAX_REGIONS: usize = 32;
/// Most boot modules kept (QEMU `-initrd a,b,...`).
pub const MAX_MODULES: usize = 8;
/// Longest module string kept (bytes).
pub const MAX_MODULE_STRING: usize = 128;

/// One boot module: its bytes stay where the loader put them (the frame
/// allocator keeps them out), its string is copied.
#[derive(Clone, Copy, Debug)]
pub struct Module {
    /// First byte.
    pub start: PhysAddr,
    /// One past the last byte.
    pub end: PhysAddr,
    string: [u8; MAX_MODULE_STRING],
    string_len: usize,
}

impl Module {
    /// The module's string (QEMU: the file name, then any arguments),
    /// empty when absent or not UTF-8.
    pub fn string(&self) -> &str {
        core::str::from_utf8(&self.string[..self.string_len]).unwrap_or("")
    }

    /// The module's length in bytes.
    pub fn len(&self) -> u64 {
        self.end.as_u64().saturating_sub(self.start.as_u64())
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The module's bytes.
    pub fn bytes(&self) -> &'static [u8] {
        // SAFETY: the loader put the module in RAM, which the kernel maps
        // at identity; `frames::init` keeps its frames out of the
        // allocator for the kernel's life and nothing writes them, so a
        // shared 'static slice over them is sound.
        unsafe {
            core::slice::from_raw_parts(
                self.start.as_u64() as usize as *const u8,
                self.len() as usize,
            )
        }
    }
}
/// Longest kernel command line kept (bytes).
pub const MAX_CMDLINE: usize = 256;

/// What the boot loader told us, copied out of its memory before anything
/// else can reuse it.
pub struct BootInfo {
    regions: [Region; MAX_REGIONS],
    region_count: usize,
    cmdline: [u8; MAX_CMDLINE],
    cmdline_len: usize,
    modules: [Module; MAX_MODULES],
    module_count: usize,
}

impl BootInfo {
    /// The boot modules, in the loader's order.
    pub fn modules(&self) -> &[Module] {
        &self.modules[..self.module_count]
    }

    /// The memory map (all types).
    pub fn regions(&self) -> &[Region] {
        &self.regions[..self.region_count]
    }

    /// The kernel command line (QEMU `-append`), empty when absent.
    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
}

/// Reasons the boot information cannot be used.
#[derive(Debug)]
pub enum BootError {
    /// EAX did not hold the Multiboot magic (value found).
    BadMagic(u32),
    /// The loader gave no memory map (flags value).
    NoMemoryMap(u32),
}

/// Copies the memory map and command line out of the Multiboot information.
///
/// # Safety
/// `info` must be the physical (identity-mapped) address the Multiboot loader
/// passed in EBX, and its structures must still be intact.
pub unsafe fn parse_multiboot(magic: u32, info: u32) -> Result<BootInfo, BootError> {
    if magic != MULTIBOOT_MAGIC {
        return Err(BootError::BadMagic(magic));
    }
    let mut out = BootInfo {
        regions: [Region {
            start: PhysAddr::zero(),
            len: 0,
            kind: 0,
        }; MAX_REGIONS],
        region_count: 0,
        cmdline: [0; MAX_CMDLINE],
        cmdline_len: 0,
        modules: [Module {
            start: PhysAddr::zero(),
            end: PhysAddr::zero(),
            string: [0; MAX_MODULE_STRING],
            string_len: 0,
        }; MAX_MODULES],
        module_count: 0,
    };
    let base = info as usize as *const u32;
    // SAFETY: the caller guarantees the Multiboot info structure at `info`;
    // words 0 (flags), 4 (cmdline), 11 and 12 (mmap length and address) are
    // part of its fixed layout.
    let (flags, cmdline, mmap_len, mmap_addr) = unsafe {
        (
            base.read_unaligned(),
            base.add(4).read_unaligned(),
            base.add(11).read_unaligned(),
            base.add(12).read_unaligned(),
        )
    };
    if flags & (1 << 2) != 0 && cmdline != 0 {
        let p = cmdline as usize as *const u8;
        while out.cmdline_len < MAX_CMDLINE {
            // SAFETY: the loader's NUL-terminated command line; we stop at NUL
            // or at our buffer's size.
            let b = unsafe { p.add(out.cmdline_len).read() };
            if b == 0 {
                break;
            }
            out.cmdline[out.cmdline_len] = b;
            out.cmdline_len += 1;
        }
    }
    if flags & (1 << 3) != 0 {
        // SAFETY: words 5 and 6 (mods_count, mods_addr) are part of the
        // fixed layout, valid when flag 3 is set.
        let (count, addr) = unsafe { (base.add(5).read_unaligned(), base.add(6).read_unaligned()) };
        for i in 0..(count as usize).min(MAX_MODULES) {
            let m = (addr as usize + i * 16) as *const u32;
            // SAFETY: the loader's module list: `count` entries of four
            // words (start, end, string, reserved).
            let (start, end, string) = unsafe {
                (
                    m.read_unaligned(),
                    m.add(1).read_unaligned(),
                    m.add(2).read_unaligned(),
                )
            };
            let module = &mut out.modules[i];
            module.start = PhysAddr::new(u64::from(start));
            module.end = PhysAddr::new(u64::from(end.max(start)));
            if string != 0 {
                let p = string as usize as *const u8;
                while module.string_len < MAX_MODULE_STRING {
                    // SAFETY: the loader's NUL-terminated module string; we
                    // stop at NUL or at our buffer's size.
                    let b = unsafe { p.add(module.string_len).read() };
                    if b == 0 {
                        break;
                    }
                    module.string[module.string_len] = b;
                    module.string_len += 1;
                }
            }
            out.module_count += 1;
        }
    }
    if flags & (1 << 6) == 0 {
        return Err(BootError::NoMemoryMap(flags));
    }
    let mut off = 0usize;
    while off + 24 <= mmap_len as usize && out.region_count < MAX_REGIONS {
        let e = (mmap_addr as usize + off) as *const u8;
        // SAFETY: each entry is `size: u32` followed by `size` bytes holding
        // base (u64), length (u64), type (u32); we stay within mmap_len.
        let (size, start, len, kind) = unsafe {
            (
                (e as *const u32).read_unaligned(),
                (e.add(4) as *const u64).read_unaligned(),
                (e.add(12) as *const u64).read_unaligned(),
                (e.add(20) as *const u32).read_unaligned(),
            )
        };
        out.regions[out.region_count] = Region {
            start: PhysAddr::new(start),
            len,
            kind,
        };
        out.region_count += 1;
        off += size as usize + 4;
    }
    Ok(out)
}

/// The command-line words the kernel itself acts on (the image adds its
/// own, see `umbra_image_words`).
pub const KERNEL_WORDS: &[&str] = &[
    "test",
    "test-fault",
    "test-panic",
    "test-triple-fault",
    "test-hang",
    "test-stack-overflow",
    "test-null",
];

/// A command line that is refused: the word, and what is wrong with it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmdlineError<'a> {
    /// Neither a known flag nor `key=value` with a known key.
    Unknown(&'a str),
    /// A flag or key given twice.
    Twice(&'a str),
}

impl core::fmt::Display for CmdlineError<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            CmdlineError::Unknown(w) => write!(f, "unknown command-line word {w:?}"),
            CmdlineError::Twice(k) => write!(f, "command-line key {k:?} given twice"),
        }
    }
}

/// Checks every word of `line` against `known`: an entry `"name"` is a
/// flag (the word must be exactly it), an entry `"name="` a key (the word
/// must be `name=value`). Each flag or key may appear once.
pub fn check_cmdline<'a>(line: &'a str, known: &[&[&str]]) -> Result<(), CmdlineError<'a>> {
    let known = || known.iter().flat_map(|k| k.iter());
    let mut seen: heapless::Vec<&str, 32> = heapless::Vec::new();
    for word in line.split_ascii_whitespace() {
        let name = match word.split_once('=') {
            Some((key, _)) if known().any(|k| k.strip_suffix('=') == Some(key)) => key,
            None if known().any(|k| *k == word) => word,
            _ => return Err(CmdlineError::Unknown(word)),
        };
        if seen.contains(&name) {
            return Err(CmdlineError::Twice(name));
        }
        // More than 32 distinct words cannot all be known: refuse the rest.
        seen.push(name).map_err(|_| CmdlineError::Unknown(word))?;
    }
    Ok(())
}

/// True when `word` is one of the whitespace-separated command-line words.
pub fn has_arg(cmdline: &str, word: &str) -> bool {
    cmdline.split_ascii_whitespace().any(|w| w == word)
}

/// The value after `key` (`key value` or `key=value`), if present.
pub fn arg_value<'a>(cmdline: &'a str, key: &str) -> Option<&'a str> {
    let mut words = cmdline.split_ascii_whitespace();
    while let Some(w) = words.next() {
        if w == key {
            return words.next();
        }
        if let Some(v) = w.strip_prefix(key).and_then(|r| r.strip_prefix('=')) {
            return Some(v);
        }
    }
    None
}
