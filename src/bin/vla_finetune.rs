//! The `vla_finetune` CLI entry point.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Writing to a closed pipe (`... | head`) ends the process quietly, as CLI tools do,
    // instead of panicking in `println!`.
    // SAFETY: restores the default disposition of SIGPIPE before any thread starts.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    vla_finetune::logging::init("info");
    match vla_finetune::cli::run(vla_finetune::cli::Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("Error: {e:?}");
            ExitCode::from(vla_finetune::cli::exit_code(&e))
        }
    }
}
