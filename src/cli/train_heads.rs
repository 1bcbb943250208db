//! `vla_finetune train-heads`: stage 1, the policy heads (sensor encoder + diffusion action
//! expert) trained on frozen VL features of the base model, validated in physical units and
//! published as a verified heads-only checkpoint, the starting point of `train` (Stage 2).

use std::path::PathBuf;

use anyhow::{Context, Result};
use serde_json::json;

use crate::policy::config::PolicyConfig;
use crate::train::heads_job::{self, mean, small_heads, HeadsJob};

/// Arguments of `train-heads`.
#[derive(clap::Args, Debug)]
pub struct TrainHeadsArgs {
    /// Compiled dataset folder (`vla_finetune dataset compile`).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Base VL model folder (Hugging Face layout).
    #[arg(long)]
    pub base_model: PathBuf,
    /// Root of published checkpoints (the new version and `latest` go there).
    #[arg(long, default_value = "checkpoints")]
    pub checkpoints: PathBuf,
    /// Folder for the job's own files.
    #[arg(long, default_value = "out/stage1")]
    pub work_dir: PathBuf,
    /// Epochs.
    #[arg(long, default_value_t = 30)]
    pub epochs: usize,
    /// Samples per optimizer step.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Seed of the order, noise and initialization.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Heads sizes: `reference` (the reference design's sizes) or `small` (CPU runs).
    #[arg(long, default_value = "reference", value_parser = ["reference", "small"])]
    pub size: String,
}

/// Runs stage 1 and prints its result as JSON.
pub fn run(a: TrainHeadsArgs) -> Result<()> {
    let heads = if a.size == "small" { small_heads() } else { PolicyConfig::default() };
    let job = HeadsJob {
        dataset: a.dataset,
        base_model: a.base_model,
        checkpoints: a.checkpoints,
        work_dir: a.work_dir,
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
        heads,
    };
    let r = super::with_progress_bar("train-heads", |ctx| heads_job::run(&job, Some(ctx)))?;
    let published = r.published.context("stage 1 was cancelled before publication")?;
    let out = json!({
        "samples_train": r.samples.0,
        "samples_val": r.samples.1,
        "val_action_error_before": mean(&r.val_error_before),
        "val_action_error": mean(&r.val_error_after),
        "val_action_error_per_dim": r.val_error_after,
        "train_loss_per_epoch": r.train_loss,
        "version": published.version,
        "checkpoint": published.dir,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
