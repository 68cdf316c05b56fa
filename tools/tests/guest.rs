//! `cargo xtask run --guest` as a user meets it: the exit status and the `xtask: FILE: reason` line.

use std::process::Command;

fn xtask(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(args)
        .output()
        .expect("xtask starts");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_file_that_is_not_a_kernel_exits_non_zero_naming_the_file() {
    let path = std::env::temp_dir().join(format!("umbra-guest-cli-{}", std::process::id()));
    std::fs::write(&path, b"plain text, no header").expect("the temporary file is writable");
    let file = path.to_str().expect("a UTF-8 temporary path");
    let (code, stderr) = xtask(&["run", "--guest", file]);
    let _ = std::fs::remove_file(&path);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!("xtask: {file}: no Multiboot header in the first 8192 bytes\n")
    );
}

#[test]
fn a_missing_kernel_file_exits_non_zero_naming_it() {
    let (code, stderr) = xtask(&["run", "--guest", "/nonexistent/umbra-kernel"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with("xtask: /nonexistent/umbra-kernel: cannot read: "),
        "{stderr}"
    );
}

#[test]
fn module_and_guest_cmdline_need_a_guest() {
    let (code, stderr) = xtask(&["run", "--module", "environ"]);
    assert_eq!(code, Some(2), "clap refuses the options: {stderr}");
    assert!(stderr.contains("--guest"), "{stderr}");
}
