//! The build script of every server task's crate (`build = "../task-rt/link-task.rs"`): links its
//! binaries with the task linker script, only when building for bare metal.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(umbra_task)");
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rerun-if-changed=../task-rt/task.ld");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("none") {
        println!("cargo:rustc-link-arg-bins=-T{dir}/../task-rt/task.ld");
        println!("cargo:rustc-link-arg-bins=--no-pie");
    }
}
