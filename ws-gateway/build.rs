//! Builds the web UI (the `frontend` crate, Yew on wasm32) and stages it in `$OUT_DIR/ui` for
//! embedding, so that one `lookout` binary serves the UI and the API.
//!
//! The wasm build runs as a nested `cargo build --target wasm32-unknown-unknown` in its own target
//! directory (`target/ui`, so it never waits on the outer build's lock), then `wasm-bindgen
//! --target web` (wasm-bindgen-cli pinned to the crate's wasm-bindgen version; scripts/setup.sh
//! installs both). `LOOKOUT_UI_DIST=dir` embeds a prebuilt UI instead. When the tools are
//! missing the build still succeeds: it warns, and the page at `/` says how to get the UI.

use std::path::{Path, PathBuf};
use std::process::Command;

const ASSETS: [&str; 4] = ["index.html", "style.css", "frontend.js", "frontend_bg.wasm"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest.parent().unwrap().to_path_buf();
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("ui");
    std::fs::create_dir_all(&out).unwrap();
    for p in ["frontend/src", "frontend/static", "frontend/Cargo.toml", "protocol/src", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=LOOKOUT_UI_DIST");
    let built = match std::env::var_os("LOOKOUT_UI_DIST") {
        Some(dist) => copy_dist(Path::new(&dist), &out),
        None => build(&root, &out),
    };
    if let Err(why) = built {
        println!("cargo:warning=the web UI was not built ({why}); run scripts/setup.sh, then build again");
        let page = format!(
            "<!doctype html><meta charset=utf-8><title>Lookout</title><h1>Lookout</h1>\
             <p>This binary was built without its web UI: {why}.</p>\
             <p>Run <code>scripts/setup.sh</code> (it installs the wasm32 target and wasm-bindgen-cli), then \
             build again. The API works regardless: see <a href=/docs>/docs</a>.</p>"
        );
        std::fs::write(out.join("index.html"), page).unwrap();
        for a in &ASSETS[1..] {
            std::fs::write(out.join(a), b"").unwrap();
        }
    }
}

fn copy_dist(dist: &Path, out: &Path) -> Result<(), String> {
    for a in ASSETS {
        std::fs::copy(dist.join(a), out.join(a)).map_err(|e| format!("{}: {e}", dist.join(a).display()))?;
    }
    Ok(())
}

fn build(root: &Path, out: &Path) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = root.join("target/ui");
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(root)
        .args(["build", "-p", "frontend", "--target", "wasm32-unknown-unknown", "--release", "--locked"])
        .arg("--target-dir")
        .arg(&target_dir)
        // The outer build's wrappers and flags (clippy, coverage, native CPU flags) are not for wasm.
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env_remove("RUSTC_WRAPPER")
        .env_remove("CLIPPY_ARGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "s");
    let status = cmd.status().map_err(|e| format!("cannot run {cargo}: {e}"))?;
    if !status.success() {
        return Err(
            "cargo build --target wasm32-unknown-unknown -p frontend failed (is the wasm32 target installed?)".into()
        );
    }
    let wasm = target_dir.join("wasm32-unknown-unknown/release/frontend.wasm");
    let bindgen = which("wasm-bindgen").ok_or("wasm-bindgen (wasm-bindgen-cli) is not installed")?;
    let status = Command::new(&bindgen)
        .args(["--target", "web", "--no-typescript", "--out-dir"])
        .arg(out)
        .arg(&wasm)
        .status()
        .map_err(|e| format!("cannot run wasm-bindgen: {e}"))?;
    if !status.success() {
        return Err("wasm-bindgen failed (its version must match the crate's wasm-bindgen, 0.2.130)".into());
    }
    for a in ["index.html", "style.css"] {
        std::fs::copy(root.join("frontend/static").join(a), out.join(a)).map_err(|e| format!("{a}: {e}"))?;
    }
    Ok(())
}

fn which(name: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}
