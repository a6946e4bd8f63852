//! `vmm`: the command-line entry point; everything lives in the library.

#![warn(missing_docs)]
#![warn(clippy::undocumented_unsafe_blocks)]

fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
