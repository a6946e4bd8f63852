//! `vmm`: the command-line entry point; everything lives in the library.
fn main() -> std::process::ExitCode {
    vmm::cli::main()
}
