//! Links the boot image with the kernel's linker script (bare metal only),
//! and embeds the MMU server task named by `UMBRA_MMU_TASK` (set by `cargo
//! xtask`; without it the embedded image is empty and only the direct
//! transport works).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR");
    println!("cargo:rerun-if-changed=../kernel/link.ld");
    println!("cargo:rerun-if-env-changed=UMBRA_MMU_TASK");
    let dest = std::path::Path::new(&out).join("mmu-task.elf");
    match std::env::var("UMBRA_MMU_TASK") {
        Ok(path) if !path.is_empty() => {
            println!("cargo:rerun-if-changed={path}");
            std::fs::copy(&path, &dest)
                .unwrap_or_else(|e| panic!("UMBRA_MMU_TASK={path}: cannot read it: {e}"));
        }
        _ => std::fs::write(&dest, []).expect("OUT_DIR is writable"),
    }
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/../kernel/link.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
