//! Builds the policies in `plugins/` for wasm32-wasip2 so the binary can embed the default
//! ones (`src/policy/builtin.rs`) and the tests can upload the others. A nested cargo
//! build in a target dir of its own, as wasmtime's test-programs artifacts do: the guest
//! workspace has its own lock file, profile and target, and never mixes with the host's.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").unwrap());
    let plugins = manifest_dir.join("plugins");
    let target_dir = out_dir.join("plugins-target");

    println!("cargo:rerun-if-changed=plugins/Cargo.toml");
    println!("cargo:rerun-if-changed=plugins/Cargo.lock");
    println!("cargo:rerun-if-changed=plugins/.cargo/config.toml");
    for crate_dir in std::fs::read_dir(&plugins).expect("plugins/ exists").flatten() {
        if crate_dir.path().join("Cargo.toml").exists() {
            println!("cargo:rerun-if-changed={}", crate_dir.path().display());
        }
    }
    println!("cargo:rerun-if-changed=wit");
    println!("cargo:rerun-if-changed=wit/0.1");
    println!("cargo:rerun-if-changed=wit/0.2");

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        // From inside plugins/, so its .cargo/config.toml (the guest's rustflags) applies.
        .current_dir(&plugins)
        .args(["build", "--release", "--target", "wasm32-wasip2", "--workspace"])
        .arg("--manifest-path")
        .arg(plugins.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        // Flags meant for the host (e.g. -C target-cpu=native) must not reach the guest.
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("CARGO_TARGET_DIR")
        // `cargo clippy` runs build scripts with clippy-driver as the workspace wrapper;
        // the guest build is a plain build (CI lints plugins/ on its own).
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .output()
        .expect("run cargo to build the wasm policies");
    if !output.status.success() {
        panic!(
            "building the policies in plugins/ for wasm32-wasip2 failed \
             (is the target installed? `rustup target add wasm32-wasip2`):\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let wasm_dir = target_dir.join("wasm32-wasip2").join("release");
    println!("cargo:rustc-env=LETTERBOX_WASM_DIR={}", wasm_dir.display());
}
