//! The `vla_finetune` command line: one subcommand per job, each runnable without ROS.

use clap::{Parser, Subcommand};

pub mod vlm_features;

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
    /// Run Qwen2.5-VL on images + a prompt and write inputs and features to safetensors.
    VlmFeatures(vlm_features::VlmFeaturesArgs),
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
        Command::VlmFeatures(a) => vlm_features::run(a),
    }
}
