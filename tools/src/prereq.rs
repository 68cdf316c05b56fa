//! Prerequisites a fresh machine may lack, installed or named exactly.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tools/ has a parent directory")
        .to_path_buf()
}

/// A `cargo` command run at the workspace root, with the outer cargo's
/// rustflags cleared so that a nested build for another target keeps its own.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
    cmd
}

/// Runs `cmd` to completion; fails with the command line if it fails.
pub fn run_checked(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("could not start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false)
}

/// Makes sure `qemu-system-x86_64` is available: installs Debian's
/// `qemu-system-x86` when running as root with apt-get, or stops with the
/// exact command to run.
pub fn ensure_qemu() -> Result<()> {
    const QEMU: &str = "qemu-system-x86_64";
    if on_path(QEMU) {
        return Ok(());
    }
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.trim_ascii() == b"0")
        .unwrap_or(false);
    if !(is_root && on_path("apt-get")) {
        bail!("{QEMU} is missing; install it with: sudo apt-get install -y qemu-system-x86");
    }
    eprintln!("xtask: {QEMU} is missing; installing Debian's qemu-system-x86");
    run_checked(Command::new("apt-get").args(["update", "-qq"]))?;
    run_checked(
        Command::new("apt-get")
            .args([
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "qemu-system-x86",
            ])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if !on_path(QEMU) {
        bail!("apt-get installed qemu-system-x86 but {QEMU} is still not on PATH");
    }
    Ok(())
}

/// The bare-metal target the kernel is built for.
pub const KERNEL_TARGET: &str = "x86_64-unknown-none";

/// Makes sure the kernel's target is installed for the pinned toolchain
/// (`rust-toolchain.toml` names it; older rustups do not add it by themselves).
pub fn ensure_kernel_target() -> Result<()> {
    let out = Command::new("rustup")
        .current_dir(workspace_root())
        .args(["target", "list", "--installed"])
        .output();
    match out {
        Ok(o)
            if String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l == KERNEL_TARGET) =>
        {
            Ok(())
        }
        Ok(_) => run_checked(Command::new("rustup").current_dir(workspace_root()).args([
            "target",
            "add",
            KERNEL_TARGET,
        ])),
        Err(_) => bail!(
            "rustup is missing; the kernel needs the {KERNEL_TARGET} target: \
             install rustup, then run `rustup target add {KERNEL_TARGET}`"
        ),
    }
}
