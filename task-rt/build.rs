//! Declares the `umbra_task` cfg (set by `cargo xtask` for task binaries).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(umbra_task)");
}
