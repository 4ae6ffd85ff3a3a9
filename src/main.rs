//! The `lanyard` binary: the CA (`serve`), the agent, and the admin verbs.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    lanyard::cli::main()
}
