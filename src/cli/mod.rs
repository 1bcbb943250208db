//! The `vla_finetune` command line: one subcommand per job, each runnable without ROS.

use clap::{Parser, Subcommand};

pub mod import_bag;
pub mod record;

/// Record demonstrations, fine-tune a sensor-aware VLA policy and run it, without ROS.
#[derive(Parser, Debug)]
#[command(name = "vla_finetune", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Every job the CLI can do.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the libtorch build and the device that would be used.
    Device(DeviceArgs),
    /// Record episodes (from the simulated robot with --sim).
    Record(record::RecordArgs),
    /// Import a rosbag2 bag (MCAP storage) as an episode.
    ImportBag(import_bag::ImportBagArgs),
}

/// Arguments of `device`.
#[derive(clap::Args, Debug)]
pub struct DeviceArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Device(a) => {
            let d = crate::device::parse(&a.device).map_err(anyhow::Error::msg)?;
            println!("{}", crate::device::describe(d));
            Ok(())
        }
        Command::Record(a) => record::run(a),
        Command::ImportBag(a) => import_bag::run(a),
    }
}
