//! `cargo xtask run --guest`: check an unmodified Multiboot v1 kernel and its modules against the domain it would run in.
//!
//! The loader's host side is complete: the kernel file is parsed
//! (`mboot::parse`), checked against the domain's memory
//! (`Kernel::check_fits`), and its modules and command line are placed
//! (`mboot::plan`); any refusal names the file at fault and the reason. The
//! kernel side (a one-vCPU domain entered in 32-bit protected mode with the
//! info in EBX) does not exist yet, so a kernel that passes every check is
//! still refused, plainly.

use anyhow::{anyhow, bail, Result};
use mboot::{LoadError, Module};
use std::path::{Path, PathBuf};

/// Memory of the domain an unmodified guest runs in: 128 MiB, the size
/// kvm-unit-tests' runner gives its x86 tests (`MEMSIZE=128`).
pub const GUEST_MEM_BYTES: u64 = 128 << 20;

/// What to run as an unmodified guest.
pub struct GuestArgs<'a> {
    /// The Multiboot v1 kernel file.
    pub kernel: &'a Path,
    /// Module files, in order.
    pub modules: &'a [PathBuf],
    /// The kernel's command line.
    pub cmdline: &'a str,
}

/// A file and why it cannot be used, as `FILE: reason`.
fn refusal(file: &Path, why: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("{}: {why}", file.display())
}

/// Reads a whole file, refusing with its name.
fn read(file: &Path) -> Result<Vec<u8>> {
    std::fs::read(file).map_err(|e| refusal(file, format_args!("cannot read: {e}")))
}

/// Parses the kernel, checks it fits a domain of `mem_bytes` and places its
/// modules and command line. Returns a one-line description of the kernel.
pub fn check(args: &GuestArgs<'_>, mem_bytes: u64) -> Result<String> {
    let image = read(args.kernel)?;
    let kernel = mboot::parse(&image).map_err(|e| refusal(args.kernel, e))?;
    kernel
        .check_fits(mem_bytes)
        .map_err(|e| refusal(args.kernel, e))?;
    let contents = args
        .modules
        .iter()
        .map(|m| read(m))
        .collect::<Result<Vec<_>>>()?;
    let strings: Vec<String> = args
        .modules
        .iter()
        .map(|m| m.display().to_string())
        .collect();
    let modules: Vec<Module<'_>> = contents
        .iter()
        .zip(&strings)
        .map(|(bytes, string)| Module { bytes, string })
        .collect();
    let layout = mboot::plan(&kernel, mem_bytes, args.cmdline, &modules).map_err(|e| match e {
        LoadError::ModulePastMemory { index, .. } => refusal(&args.modules[index], e),
        other => refusal(args.kernel, other),
    })?;
    Ok(format!(
        "{:?} kernel, {} segment(s) at {:#x}..{:#x}, entry {:#x}, {} module(s), info at {:#x}",
        kernel.format,
        kernel.segments().len(),
        kernel.segments().iter().map(|s| s.gpa.0).min().unwrap_or(0),
        kernel.end().0,
        kernel.entry.0,
        layout.modules.len(),
        layout.info.0,
    ))
}

/// `cargo xtask run --guest`: every check, then the plain refusal to run.
pub fn run(args: &GuestArgs<'_>) -> Result<()> {
    let summary = check(args, GUEST_MEM_BYTES)?;
    eprintln!("xtask: {}: {summary}", args.kernel.display());
    bail!(
        "{}: passes the loader's checks for a {} MiB domain, but running unmodified guests \
         is not built yet (the kernel side of issue 11: entry in 32-bit protected mode, the \
         PC platform)",
        args.kernel.display(),
        GUEST_MEM_BYTES >> 20
    )
}

#[cfg(test)]
mod tests {
    use super::{check, run, GuestArgs, GUEST_MEM_BYTES};
    use std::path::{Path, PathBuf};

    /// A flat a.out-kludge Multiboot kernel loaded at 1 MiB: the header, a
    /// `hlt`, and a bss reaching `bss_end`.
    pub(crate) fn aout_kernel(bss_end: u32) -> Vec<u8> {
        let (magic, flags) = (0x1bad_b002u32, 1u32 << 16);
        let mut f = Vec::new();
        for word in [
            magic,
            flags,
            0u32.wrapping_sub(magic).wrapping_sub(flags),
            0x10_0000, // header_addr
            0x10_0000, // load_addr
            0x10_0024, // load_end_addr: the header and the hlt
            bss_end,
            0x10_0020, // entry_addr: the hlt
        ] {
            f.extend(word.to_le_bytes());
        }
        f.extend([0xf4, 0xeb, 0xfd, 0x90]);
        f
    }

    /// A file of this test process, removed when dropped.
    struct TempFile(PathBuf);

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    impl std::ops::Deref for TempFile {
        type Target = PathBuf;
        fn deref(&self) -> &PathBuf {
            &self.0
        }
    }

    /// Writes `bytes` to a temporary file named after `name`.
    fn file(name: &str, bytes: &[u8]) -> TempFile {
        let path = std::env::temp_dir().join(format!("umbra-guest-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).expect("the temporary file is writable");
        TempFile(path)
    }

    fn refusal(kernel: &Path, modules: &[PathBuf]) -> String {
        let args = GuestArgs {
            kernel,
            modules,
            cmdline: "",
        };
        format!("{:#}", check(&args, GUEST_MEM_BYTES).expect_err("refused"))
    }

    #[test]
    fn a_valid_kernel_and_module_pass_every_check() {
        let kernel = file("valid", &aout_kernel(0x10_1000));
        let environ = file("environ", b"NR_CPUS=1\nMEMSIZE=128\n");
        let args = GuestArgs {
            kernel: &kernel,
            modules: std::slice::from_ref(&*environ),
            cmdline: "x",
        };
        assert_eq!(
            check(&args, GUEST_MEM_BYTES).expect("the kernel passes"),
            "AoutKludge kernel, 1 segment(s) at 0x100000..0x101000, entry 0x100020, 1 module(s), \
             info at 0x9000"
        );
        // No pretending: the run itself still fails, saying why.
        let why = format!("{:#}", run(&args).expect_err("not built yet"));
        assert!(
            why.contains("running unmodified guests is not built yet"),
            "{why}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_multiboot_kernel_is_refused_by_name() {
        let text = file("text", b"#!/bin/sh\necho not a kernel\n");
        assert_eq!(
            refusal(&text, &[]),
            format!(
                "{}: no Multiboot header in the first 8192 bytes",
                text.display()
            )
        );
    }

    #[test]
    fn a_kernel_too_large_for_the_domain_is_refused_with_the_numbers() {
        let big = file("big", &aout_kernel(0x810_0001));
        assert_eq!(
            refusal(&big, &[]),
            format!(
                "{}: segment at 0x100000 of 0x8000001 bytes passes the domain's 128 MiB",
                big.display()
            )
        );
    }

    #[test]
    fn missing_files_and_modules_that_do_not_fit_are_named() {
        let kernel = file("for-modules", &aout_kernel(0x10_1000));
        let missing = std::env::temp_dir().join("umbra-guest-no-such-module");
        let why = refusal(&kernel, std::slice::from_ref(&missing));
        assert!(
            why.starts_with(&format!("{}: cannot read: ", missing.display())),
            "{why}"
        );
        let why = refusal(&missing, &[]);
        assert!(
            why.starts_with(&format!("{}: cannot read: ", missing.display())),
            "{why}"
        );
        // Two modules: the second passes 8 MiB of memory.
        let small = file("small", &[1; 16]);
        let large = file("large", &vec![2; 7 << 20]);
        let modules = [small.to_path_buf(), large.to_path_buf()];
        let args = GuestArgs {
            kernel: &kernel,
            modules: &modules,
            cmdline: "",
        };
        assert_eq!(
            format!("{:#}", check(&args, 8 << 20).expect_err("refused")),
            format!(
                "{}: module 1 of 0x700000 bytes, placed at 0x102000 after the kernel, passes the \
                 domain's 8 MiB (or 4 GiB)",
                large.display()
            )
        );
    }
}
