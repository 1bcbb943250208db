//! The `vla_finetune` command line: one subcommand per job, each runnable without ROS.

use clap::{Parser, Subcommand};

pub mod bench;
pub mod dataset;
pub mod demo;
pub mod experiment;
pub mod import_bag;
pub mod lerobot;
pub mod policy;
pub mod record;
pub mod train;
pub mod train_heads;
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
    /// The whole loop on an embedded default: simulated recording, dataset, stage 1, Stage 2, a hot-swapping policy process.
    Demo(demo::DemoArgs),
    /// Experiments that measure the training on the simulated task (cache modes vs quality and cost).
    Experiment(experiment::ExperimentArgs),
    /// Compile recorded episodes into a training dataset, or describe one.
    Dataset(dataset::DatasetArgs),
    /// Record episodes (from the simulated robot with --sim).
    Record(record::RecordArgs),
    /// Import a rosbag2 bag (MCAP or sqlite3 storage) as an episode.
    ImportBag(import_bag::ImportBagArgs),
    /// Import a local LeRobot v3.0 dataset as a compiled training dataset.
    ImportLerobot(lerobot::ImportLeRobotArgs),
    /// Stage 1: train the policy heads on frozen VL features and publish a heads-only checkpoint.
    TrainHeads(train_heads::TrainHeadsArgs),
    /// Stage 2 fine-tuning (LoRA on the VL model + heads) from a config file (config/train.yaml).
    Train(train::TrainArgs),
    /// Run Qwen2.5-VL on images + a prompt and write inputs and features to safetensors.
    VlmFeatures(vlm_features::VlmFeaturesArgs),
    /// Benchmark the Stage 2 step, vision-cache building and act() (JSON comparable with scripts/reference_bench.py).
    Bench(bench::BenchArgs),
    /// Run the policy (hot-swapping checkpoints from a folder) on the simulated robot.
    Policy(policy::PolicyArgs),
}

/// Arguments of `device`.
#[derive(clap::Args, Debug)]
pub struct DeviceArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    pub device: String,
}

/// An error that asks for a specific exit status; its message is printed like any error.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Exit {
    /// The exit status.
    pub code: u8,
    /// What happened.
    pub message: String,
}

/// The exit status for an error from [`run`]: an [`Exit`]'s code, otherwise 1.
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.downcast_ref::<Exit>().map_or(1, |x| x.code)
}

/// Runs the parsed command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Device(a) => {
            let d = crate::device::parse(&a.device).map_err(anyhow::Error::msg)?;
            println!("{}", crate::device::describe(d));
            Ok(())
        }
        Command::Demo(a) => demo::run(a),
        Command::Experiment(a) => experiment::run(a),
        Command::Dataset(a) => dataset::run(a, &open_recorded_episodes),
        Command::Record(a) => record::run(a),
        Command::ImportBag(a) => import_bag::run(a),
        Command::ImportLerobot(a) => lerobot::run_import(&a),
        Command::TrainHeads(a) => train_heads::run(a),
        Command::Train(a) => train::run(a),
        Command::VlmFeatures(a) => vlm_features::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Policy(a) => policy::run(a),
    }
}

/// The recorded episodes at `path` for `dataset compile`: one episode folder (holding
/// `episode.json`) or a dataset root and all its `episodes/`, as
/// [`recorded`](crate::dataset::selection::recorded) lists them (opened one at a time while
/// compiled; unreadable ones kept with their reason; unfinished ones of a stopped recorder
/// recovered).
pub fn open_recorded_episodes(
    path: &std::path::Path,
) -> anyhow::Result<Vec<crate::dataset::episode::LazyEpisode<'static>>> {
    use crate::dataset::mcap_episode::{list_episodes, EPISODE_JSON};
    let dirs = if path.join(EPISODE_JSON).exists() { vec![path.to_path_buf()] } else { list_episodes(path)? };
    Ok(crate::dataset::selection::recorded(&dirs))
}

/// `--vl-pooling` / `--pooling`: a [`crate::vlm::Pooling`] name.
pub(crate) fn parse_pooling(name: &str) -> Result<crate::vlm::Pooling, String> {
    crate::vlm::Pooling::parse(name).ok_or_else(|| format!("expected {}", crate::vlm::Pooling::NAMES))
}

/// Runs `f` with a job context whose progress is drawn as a bar on stderr; with `ctrl_c` a
/// Ctrl-C requests the job's cancel (the job stops at its next optimizer step).
pub(crate) fn with_progress_bar<T>(
    job_id: &str,
    ctrl_c: bool,
    f: impl FnOnce(&crate::train::controller::JobContext) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    use crate::train::progress::{spawn_sink, BarRenderer, Phase, ProgressHub, Throttle};
    let hub = ProgressHub::new(256);
    let sink = spawn_sink(hub.subscribe(), job_id.into(), None, Some((BarRenderer::stderr(), Throttle::new(10.0))));
    let ctx = crate::train::controller::JobContext {
        job_id: job_id.into(),
        cancel: Default::default(),
        progress: hub.clone(),
    };
    if ctrl_c {
        let cancel = ctx.cancel.clone();
        let _ = ctrlc_cancel(move || cancel.cancel());
    }
    let result = f(&ctx);
    // Ends the sink (a job that already sent its own terminal event ended it before).
    hub.publish(terminal_event(&hub, job_id, if result.is_ok() { Phase::Done } else { Phase::Failed }));
    let _ = sink.join();
    result
}

/// The job's last event (so the step and epoch stay those reached) in the terminal `phase`.
pub(crate) fn terminal_event(
    hub: &crate::train::progress::ProgressHub,
    job_id: &str,
    phase: crate::train::progress::Phase,
) -> crate::train::progress::ProgressEvent {
    use crate::train::progress::ProgressEvent;
    let fresh = ProgressEvent::new(job_id, phase);
    match hub.latest().filter(|e| e.job_id == job_id) {
        Some(mut ev) => {
            (ev.phase, ev.time_unix_ms, ev.eta_s, ev.message) = (phase, fresh.time_unix_ms, None, String::new());
            ev
        }
        None => fresh,
    }
}

/// Installs a SIGINT handler calling `f` once (best effort: a second Ctrl-C kills the process).
pub(crate) fn ctrlc_cancel(f: impl Fn() + Send + 'static) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    std::thread::spawn(move || {
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!("cancel requested: stopping at the next optimizer step");
                f();
            }
        })
    });
    Ok(())
}
