//! One cfg for "this build has the Metal backend": `metal_gpu`, set on macOS when the `gpu`
//! (default) or `metal` feature is on. Candle's Metal kernels are always compiled on macOS
//! (Cargo.toml's macOS-only dependency entries); this decides whether FineTune uses them, so
//! `--no-default-features` still gives a CPU-only app there.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(metal_gpu)");
    let macos = std::env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "macos");
    let wanted = std::env::var_os("CARGO_FEATURE_GPU").is_some()
        || std::env::var_os("CARGO_FEATURE_METAL").is_some();
    if macos && wanted {
        println!("cargo::rustc-cfg=metal_gpu");
    }
}
