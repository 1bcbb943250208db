//! `vla_finetune train-heads`: stage 1, the policy heads (sensor encoder + diffusion action
//! expert) trained on frozen VL features of the base model, validated in physical units and
//! published as verified heads-only checkpoints, the starting point of `train` (Stage 2).
//! Settings come from `--config` (config/train_heads.yaml format; built-in defaults without it),
//! `--set key=value` and the flags below. Ctrl-C cancels at the next optimizer step and leaves a
//! resumable state in `<work-dir>/state` (`--resume` continues it).
//!
//! Under torchrun (`torchrun --nproc_per_node=N --no-python vla_finetune train-heads ...`) each
//! process is one data-parallel rank on the CPU: the features are computed once over the ranks,
//! BatchNorm normalises with every rank's batch, `batch_size` is per rank (a step takes
//! `batch_size x world` samples); rank 0 alone locks, draws the bar and prints the result.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use serde_json::json;

use crate::policy::config::PolicyConfig;
use crate::train::config::Override;
use crate::train::heads_job::{self, small_heads, HeadsJob, HeadsResult, HeadsTrainConfig};

/// Arguments of `train-heads`.
#[derive(clap::Args, Debug)]
pub struct TrainHeadsArgs {
    /// Compiled dataset folder (`vla_finetune dataset compile`).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Base VL model folder (Hugging Face layout).
    #[arg(long, required_unless_present = "oracle_truth")]
    pub base_model: Option<PathBuf>,
    /// Train the oracle floor instead: the same heads conditioned on the simulator's ground truth
    /// in this truth log (`sim_truth.jsonl` beside a simulated recording) and the recorded tool
    /// pose, instead of VL features. Prints its validation error; publishes nothing.
    #[arg(long, conflicts_with_all = ["base_model", "resume"])]
    pub oracle_truth: Option<PathBuf>,
    /// Root of published checkpoints (the new versions and `latest` go there).
    #[arg(long, default_value = "checkpoints")]
    pub checkpoints: PathBuf,
    /// Folder for the job's own files (heads before publication, `state/`, `curves.png`).
    #[arg(long, default_value = "out/stage1")]
    pub work_dir: PathBuf,
    /// Settings file (config/train_heads.yaml format); without it the built-in defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Override one setting, `key=value` (YAML value), e.g. `weight_decay=0.01`; repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<Override>,
    /// Epochs (overrides the settings).
    #[arg(long)]
    pub epochs: Option<u64>,
    /// Samples per optimizer step (overrides the settings).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Peak learning rate (overrides the settings).
    #[arg(long)]
    pub lr: Option<f64>,
    /// Seed of the order, noise and initialization (overrides the settings).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Heads sizes: `reference` (the reference design's sizes) or `small` (CPU runs).
    #[arg(long, default_value = "reference", value_parser = ["reference", "small"])]
    pub size: String,
    /// Heads configuration file (YAML or JSON, the `PolicyConfig` fields; absent ones take the
    /// reference values) instead of `--size`.
    #[arg(long, conflicts_with = "size")]
    pub heads_config: Option<PathBuf>,
    /// Continue from the training state in `<work-dir>/state` when there is one.
    #[arg(long)]
    pub resume: bool,
}

impl TrainHeadsArgs {
    /// `--set` followed by the flags (which win), as overrides.
    fn overrides(&self) -> Vec<Override> {
        let mut o = self.set.clone();
        o.extend(self.epochs.map(|v| Override::new("epochs", v)));
        o.extend(self.batch_size.map(|v| Override::new("batch_size", v)));
        o.extend(self.lr.map(|v| Override::new("lr", v)));
        o.extend(self.seed.map(|v| Override::new("seed", v)));
        o
    }
}

/// Runs stage 1 and prints its result as JSON.
pub fn run(a: TrainHeadsArgs) -> Result<()> {
    let train = HeadsTrainConfig::load(a.config.as_deref(), &a.overrides())?;
    let heads = match &a.heads_config {
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("reading --heads-config {}", path.display()))?;
            serde_yaml::from_str::<PolicyConfig>(&text)
                .with_context(|| format!("--heads-config {}: not a heads configuration", path.display()))?
        }
        None if a.size == "small" => small_heads(),
        None => PolicyConfig::default(),
    };
    let group =
        crate::dist::join_launch("gloo", std::time::Duration::from_secs(train.distributed_timeout_s))?.map(|(_, g)| g);
    if let Some(truth) = &a.oracle_truth {
        if group.is_some() {
            bail!("--oracle-truth runs in one process (not under torchrun)");
        }
        let job = HeadsJob {
            dataset: a.dataset,
            base_model: PathBuf::new(),
            checkpoints: a.checkpoints,
            work_dir: a.work_dir,
            train,
            heads,
            resume: false,
            group: None,
        };
        return run_oracle(&job, truth);
    }
    let base_model = a.base_model.context("--base-model is required")?;
    let job = HeadsJob {
        dataset: a.dataset,
        base_model,
        checkpoints: a.checkpoints,
        work_dir: a.work_dir,
        train,
        heads,
        resume: a.resume,
        group: group.clone(),
    };
    let Some(group) = group.filter(|g| !g.is_main()) else { return run_main(&job) };
    // The other ranks wait until rank 0 holds the state folder's lock.
    group.barrier()?;
    let ctx = crate::train::controller::JobContext {
        job_id: "train-heads".into(),
        cancel: Default::default(),
        progress: crate::train::progress::ProgressHub::new(16),
    };
    let cancel = ctx.cancel.clone();
    let _ = super::ctrlc_cancel(move || cancel.cancel());
    let r = heads_job::run(&job, &ctx, &mut |_| {})?;
    eprintln!("rank {}: done after {} optimizer steps", group.rank(), r.run.counters.global_step);
    Ok(())
}

/// The oracle floor of `job`'s dataset from the truth log `truth`, its result printed as JSON.
fn run_oracle(job: &HeadsJob, truth: &std::path::Path) -> Result<()> {
    let truths = crate::train::oracle::read_truth(truth)?;
    let _lock = crate::train::guard::StateLock::acquire(&job.state_dir())?;
    let r = super::with_progress_bar("oracle", true, |ctx| Ok(heads_job::run_oracle(job, &truths, ctx)?))?;
    println!("{}", serde_json::to_string_pretty(&errors_json(&r))?);
    Ok(())
}

/// The job in this process (alone, or as rank 0), with the lock, a bar and the result printed.
fn run_main(job: &HeadsJob) -> Result<()> {
    let lock = crate::train::guard::StateLock::acquire(&job.state_dir())?;
    for p in &lock.removed {
        eprintln!("removed {} (left by an interrupted run)", p.display());
    }
    if let Some(g) = &job.group {
        g.barrier()?;
    }
    let r = super::with_progress_bar("train-heads", true, |ctx| {
        Ok(heads_job::run(job, ctx, &mut |p| eprintln!("published {} ({})", p.version, p.dir.display()))?)
    })?;
    let published = r.published.as_ref().with_context(|| {
        format!(
            "stage 1 was cancelled at step {}; `--resume` continues from {}",
            r.run.counters.global_step,
            job.state_dir().display()
        )
    })?;
    let mut out = errors_json(&r);
    out["best_val_action_error"] = json!(r.run.best);
    out["global_step"] = json!(r.run.counters.global_step);
    out["published"] = json!(r.run.published);
    out["version"] = json!(published.version);
    out["checkpoint"] = json!(published.dir);
    out["latest"] = json!(published.latest);
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}

/// The samples, errors and losses of a stage-1 or oracle run, as the printed result has them.
fn errors_json(r: &HeadsResult) -> serde_json::Value {
    json!({
        "samples_train": r.samples.0,
        "samples_val": r.samples.1,
        "val_action_error_before": r.val_action_error_before,
        "val_action_error": r.val_action_error_after,
        "val_action_error_conditioning_swapped": r.val_action_error_conditioning_swapped,
        "val_action_error_per_dim": r.val_error_after,
        "train_loss_per_epoch": r.run.train_loss_per_epoch,
    })
}
