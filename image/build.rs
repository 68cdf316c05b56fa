//! Links the boot image with the kernel's linker script (bare metal only),
//! and embeds the server tasks named by `UMBRA_MMU_TASK`,
//! `UMBRA_SCHED_TASK` and `UMBRA_GRANT_TASK` (set by `cargo xtask`; without them the embedded
//! images are empty and only the direct transport works).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-changed=../kernel/link.ld");
    for (var, file) in [
        ("UMBRA_MMU_TASK", "mmu-task.elf"),
        ("UMBRA_SCHED_TASK", "sched-task.elf"),
        ("UMBRA_GRANT_TASK", "grant-task.elf"),
    ] {
        println!("cargo:rerun-if-env-changed={var}");
        let dest = std::path::Path::new(&out).join(file);
        match std::env::var(var) {
            Ok(path) if !path.is_empty() => {
                println!("cargo:rerun-if-changed={path}");
                std::fs::copy(&path, &dest)
                    .unwrap_or_else(|e| panic!("{var}={path}: cannot read it: {e}"));
            }
            _ => std::fs::write(&dest, []).expect("OUT_DIR is writable"),
        }
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/../kernel/link.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
