//! The `vla_finetune` command line: one subcommand per job, each runnable without ROS.

use clap::{Parser, Subcommand};

pub mod dataset;

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
    /// Compile recorded episodes into a training dataset, or describe one.
    Dataset(dataset::DatasetArgs),
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
        Command::Dataset(a) => dataset::run(a, &open_recorded_episodes),
    }
}

/// Opens the recorded episodes at `path` for `dataset compile`.
// Merge seam: the MCAP episode reader lives on the recorder branch; until it is merged this
// build has no reader for recorded episodes and says so.
fn open_recorded_episodes(path: &std::path::Path) -> anyhow::Result<Vec<Box<dyn crate::dataset::episode::EpisodeSource>>> {
    anyhow::bail!("{}: this build has no reader for recorded MCAP episodes (it comes with the recorder's McapEpisode)", path.display())
}
