//! The VMM binary under test: identical to `vmm`, built by this package so integration tests
//! get its path from `CARGO_BIN_EXE_vmm-it`.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
