//! Builds the `no_std` guest workspace (`guest-fixtures/`) and embeds every fixture binary in
//! the VMM, so that one `vmm` binary is all a user needs.
//!
//! The guest is its own cargo workspace with its own `.cargo/config.toml`, which cargo reads
//! only from the working directory: so cargo is run with `guest-fixtures/` as its working
//! directory and with the outer build's CARGO_*/RUST* variables removed (they would redirect
//! its target directory or add host flags).

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest_dir =
        PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let guest_dir = manifest_dir
        .parent()
        .expect("vmm/ has a parent")
        .join("guest-fixtures");
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));

    watch_tree(&guest_dir);
    watch_tree(
        &manifest_dir
            .parent()
            .expect("vmm/ has a parent")
            .join("memconv/src"),
    );

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&guest_dir)
        .args(["build", "--release", "--bins"]);
    for (key, _) in env::vars() {
        let keep = matches!(
            key.as_str(),
            "CARGO_HOME" | "RUSTUP_HOME" | "RUSTUP_TOOLCHAIN" | "CARGO_NET_OFFLINE"
        );
        if !keep && (key.starts_with("CARGO") || key.starts_with("RUST")) {
            cmd.env_remove(&key);
        }
    }
    // The guest build has a target directory of its own inside guest-fixtures/.
    cmd.env_remove("MAKEFLAGS").env_remove("MFLAGS");
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "cannot run cargo for the guest in {}: {e}",
            guest_dir.display()
        )
    });
    if !status.success() {
        panic!(
            "building the guest fixtures failed ({status}); run `cargo build --release` in {} to see why",
            guest_dir.display()
        );
    }

    let bin_src = guest_dir.join("fixtures/src/bin");
    let mut fixtures: Vec<(String, String)> = Vec::new();
    let entries =
        fs::read_dir(&bin_src).unwrap_or_else(|e| panic!("cannot list {}: {e}", bin_src.display()));
    for entry in entries {
        let path = entry.expect("readable directory entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("fixture file names are UTF-8")
            .to_string();
        let source = fs::read_to_string(&path).unwrap_or_default();
        let description = source
            .lines()
            .find_map(|l| l.strip_prefix("//!"))
            .map(|l| l.trim().to_string())
            .unwrap_or_default();
        fixtures.push((name, description));
    }
    fixtures.sort();

    let mut generated = String::from(
        "/// Fixtures built from guest-fixtures/fixtures/src/bin: (name, description, ELF image).\n\
         pub static EMBEDDED: &[(&str, &str, &[u8])] = &[\n",
    );
    for (name, description) in &fixtures {
        let elf = guest_dir.join("target/release").join(name);
        if !elf.is_file() {
            panic!("guest build did not produce {}", elf.display());
        }
        generated.push_str(&format!(
            "    ({name:?}, {description:?}, include_bytes!({:?})),\n",
            elf.display().to_string()
        ));
    }
    generated.push_str("];\n");
    fs::write(out_dir.join("fixtures.rs"), generated).expect("write fixtures.rs to OUT_DIR");
}

/// Asks cargo to rerun this script when any source file of the guest changes.
fn watch_tree(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    println!("cargo:rerun-if-changed={}", dir.display());
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        if path.is_dir() {
            watch_tree(&path);
        } else {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
