//! `cargo xtask run --guest`: check an unmodified Multiboot v1 kernel and its modules against the domain it would run in.
//!
//! On the host the kernel file is parsed (`mboot::parse`), checked against
//! the domain's memory (`Kernel::check_fits`), and its modules and command
//! line are placed (`mboot::plan`); any refusal names the file at fault and
//! the reason. Then the boot image runs it (kernel word `mbguest`): QEMU
//! passes the kernel and its modules as boot modules (`-initrd`), the
//! kernel loads them into a one-vCPU domain entered in 32-bit protected
//! mode with paging off and the info in EBX, and QEMU ends with the status
//! the guest wrote to its exit port.

use crate::image::{boot_with, build_kernel, describe, Ending, EXIT_FAILURE, EXIT_SUCCESS};
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

/// How to boot an unmodified guest.
pub struct Boot<'a> {
    /// MMU servers to run it on, in one boot (comma list of registered
    /// names).
    pub mmu: &'a str,
    /// `task` or `direct`.
    pub transport: &'a str,
    /// CPUs of the machine (the guest gets one vCPU).
    pub smp: u32,
    /// Debug build of the image.
    pub debug: bool,
    /// Limit on the boot.
    pub timeout: std::time::Duration,
}

/// The QEMU `-initrd` list: the kernel (its string the file name, then
/// the guest's command line), then each module. QEMU splits the list at
/// commas, so a comma in a path or in the command line is refused.
pub fn initrd(args: &GuestArgs<'_>) -> Result<String> {
    let mut parts = vec![if args.cmdline.is_empty() {
        args.kernel.display().to_string()
    } else {
        format!("{} {}", args.kernel.display(), args.cmdline)
    }];
    parts.extend(args.modules.iter().map(|m| m.display().to_string()));
    if let Some(bad) = parts.iter().find(|p| p.contains(',')) {
        bail!("{bad:?}: QEMU's module list cannot carry a comma (in a path or the command line)");
    }
    Ok(parts.join(","))
}

/// The isa-debug-exit status QEMU exited with, from how the boot ended
/// (`None`: no status, e.g. killed on timeout).
fn qemu_status(ending: &Ending) -> Option<i32> {
    match ending {
        Ending::Success => Some(EXIT_SUCCESS),
        Ending::Failure => Some(EXIT_FAILURE),
        Ending::TripleFault => Some(0),
        Ending::Other(code) => *code,
        Ending::Timeout(_) => None,
    }
}

/// `cargo xtask run --guest`: every check, then one boot that runs the
/// guest on each MMU server of `boot.mmu` in turn (console lines as every
/// run prints them) and ends QEMU with the status the guest wrote to its
/// exit port: QEMU's exit status `(status << 1) | 1` is returned, for the
/// process to exit with, so a runner script reads it unchanged. Every
/// server must agree (the kernel ends with the first status that differs).
pub fn run(args: &GuestArgs<'_>, boot: &Boot<'_>) -> Result<i32> {
    let summary = check(args, GUEST_MEM_BYTES)?;
    eprintln!("xtask: {}: {summary}", args.kernel.display());
    let initrd = initrd(args)?;
    let image = build_kernel(boot.debug)?;
    let append = format!("mbguest mmu={} transport={}", boot.mmu, boot.transport);
    eprintln!(
        "xtask: booting {} with -smp {}, command line \"{append}\", guest {}",
        image.display(),
        boot.smp,
        args.kernel.display()
    );
    let qemu = ["-initrd".to_string(), initrd];
    let out = boot_with(&image, boot.smp, &append, boot.timeout, true, &qemu)?;
    match qemu_status(&out.ending) {
        Some(code) if code & 1 == 1 && code != EXIT_FAILURE => {
            eprintln!(
                "xtask: the guest wrote {:#x} to its exit port; QEMU exited with {code}",
                code >> 1
            );
            Ok(code)
        }
        _ => {
            eprintln!(
                "xtask: {}: the guest did not end through its exit port ({}); exiting with \
                 {NO_EXIT_STATUS} (a failure to a kvm-unit-tests runner)",
                args.kernel.display(),
                describe(&out.ending)
            );
            Ok(NO_EXIT_STATUS)
        }
    }
}

/// What `run --guest` exits with when the guest never wrote its exit port
/// (stopped, or the boot failed or timed out): QEMU's status for a guest
/// that wrote 1, which a kvm-unit-tests runner reads as a failure, and
/// never the 1 of a pass.
pub const NO_EXIT_STATUS: i32 = 3;

#[cfg(test)]
mod tests {
    use super::{check, initrd, GuestArgs, GUEST_MEM_BYTES};
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
        assert_eq!(
            initrd(&args).expect("no comma"),
            format!("{} x,{}", kernel.display(), environ.display())
        );
    }

    #[test]
    fn a_comma_qemu_would_split_at_is_refused() {
        let kernel = file("comma-cmdline", &aout_kernel(0x10_1000));
        let args = GuestArgs {
            kernel: &kernel,
            modules: &[],
            cmdline: "a,b",
        };
        let why = format!("{:#}", initrd(&args).expect_err("refused"));
        assert!(why.contains("cannot carry a comma"), "{why}");
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
