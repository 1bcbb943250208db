//! The `vla_finetune` CLI entry point.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    vla_finetune::logging::init("info");
    vla_finetune::cli::run(vla_finetune::cli::Cli::parse())
}
