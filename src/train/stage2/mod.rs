//! Stage 2: LoRA on the VL model's decoder + sensor encoder + diffusion action expert, starting
//! from a stage-1 deployable checkpoint (heads only, `train::heads_job`), on a compiled dataset,
//! driven by the generic loop [`runner::run`] (accumulation, clipping, schedule, exact resume,
//! best/latest, publication, plot, progress, cancel, out-of-memory halving).
//!
//! Cache modes (`cache.mode`, see [`task`]): `vision` (frozen vision-tower embeddings cached once,
//! decoder + LoRA live every step), `features` (pooled VL features cached; heads train on them
//! with the LoRA frozen; refresh epochs train the LoRA live and rewrite the cache), `off` (the
//! whole VL model live every step).

mod data;
mod features;
mod task;
mod vl;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::action_error::DimError;
use super::config::{ResolvedMemory, TrainConfig, VramPresets};
use super::controller::JobContext;
use super::error::TrainError;
use super::optim::Accumulation;
use super::runner::{self, RunSummary, RunnerConfig};
use crate::checkpoint::publish::Published;
pub use task::{saved_memory, Stage2Task};

type Result<T> = std::result::Result<T, TrainError>;

/// The metric that selects the best checkpoint (mean DDIM action error in training-set stds).
pub use super::action_error::BEST_METRIC;

/// A Stage 2 job.
#[derive(Debug, Clone)]
pub struct Stage2Job {
    /// The whole configuration (`config/train.yaml` format).
    pub config: TrainConfig,
    /// Continue from `<checkpoint.state_dir>/latest.safetensors` when it exists.
    pub resume: bool,
    /// The data-parallel group this process is a rank of (None: one process).
    pub group: Option<std::sync::Arc<crate::dist::Group>>,
}

/// What a Stage 2 run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage2Result {
    /// The loop's summary (counters, validation per epoch, published versions).
    pub run: RunSummary,
    /// Validation action error of the stage-1 checkpoint (base VL model, LoRA zero), in
    /// training-set stds ([`super::action_error::ActionAxes`]).
    pub val_action_error_before: f64,
    /// The same after the last finished epoch (None when none finished).
    pub val_action_error: Option<f64>,
    /// Per action dimension (physical units) of the stage-1 checkpoint.
    pub val_action_error_before_per_dim: Vec<DimError>,
    /// Per action dimension, after the last finished epoch.
    pub val_action_error_per_dim: Vec<DimError>,
    /// Whether any LoRA weight differs from its initial value.
    pub lora_params_changed: bool,
    /// Refresh epochs run (`features` mode).
    pub cache_refreshes: u64,
    /// Feature drift (rel. L2, mean over the probe set) measured at the last refresh.
    #[serde(default)]
    pub last_drift: Option<f64>,
    /// Vision-cache entries computed by this process (`vision` mode; 0 when all were on disk).
    pub vision_entries_built: u64,
    /// Published checkpoint versions, in order.
    pub published: Vec<String>,
    /// Micro-batch and accumulation used.
    pub accumulation: Accumulation,
}

/// Micro-batch, accumulation and LoRA rank from the memory settings. `memory.preset: auto` on a
/// CUDA device picks the largest preset fitting the device's free memory now; on CPU (no
/// accelerator memory size) it is an error naming the fix.
pub fn resolve_memory(cfg: &TrainConfig) -> Result<ResolvedMemory> {
    let free_gib = if cfg.memory.preset == "auto" { free_accelerator_gib(&cfg.run.device)? } else { None };
    resolve_memory_with(cfg, free_gib)
}

/// [`resolve_memory`] with the accelerator's free memory given (GiB; `None`: no accelerator).
pub fn resolve_memory_with(cfg: &TrainConfig, free_gib: Option<f64>) -> Result<ResolvedMemory> {
    let presets = if cfg.memory.preset == "manual" {
        VramPresets { presets: Vec::new() }
    } else {
        VramPresets::load(&cfg.memory.presets_file)?
    };
    cfg.resolve_memory(&presets, free_gib).map_err(|e| match free_gib {
        None => TrainError::invalid(
            "memory",
            format!("{e} (run.device `{}` has no accelerator memory to measure: name a preset or set memory.micro_batch/accum_steps and lora.rank)", cfg.run.device),
        ),
        Some(gib) => TrainError::invalid("memory", format!("{e} (run.device `{}` has {gib:.1} GiB free)", cfg.run.device)),
    })
}

/// The memory plan of a run. A resume reuses the plan saved in its state (whatever memory is
/// free now), unless the config explicitly asks for another one, which is an error; otherwise
/// the settings are resolved, measuring the accelerator with `free_gib` only for
/// `memory.preset: auto`.
pub fn plan_memory(
    cfg: &TrainConfig,
    resume: bool,
    free_gib: &mut dyn FnMut() -> Result<Option<f64>>,
) -> Result<ResolvedMemory> {
    let latest = cfg.checkpoint.state_dir.join("latest.safetensors");
    let saved = if resume && latest.exists() { task::saved_memory(&latest)? } else { None };
    let Some(saved) = saved else {
        let free = if cfg.memory.preset == "auto" { free_gib()? } else { None };
        return resolve_memory_with(cfg, free);
    };
    match explicit_conflict(cfg, &saved) {
        None => Ok(saved),
        Some(asked) => Err(TrainError::invalid(
            format!("training state `{}`", latest.display()),
            format!("was saved with {saved}, but the config asks for {asked}: resume with the run's memory settings (or memory.preset `auto`), or start a new run"),
        )),
    }
}

/// The memory setting of `cfg` that is given explicitly and differs from `saved`, if any.
fn explicit_conflict(cfg: &TrainConfig, saved: &ResolvedMemory) -> Option<String> {
    let m = &cfg.memory;
    if let Some(r) = cfg.lora.rank.filter(|r| *r != saved.lora_rank) {
        return Some(format!("lora.rank {r}"));
    }
    match (m.micro_batch, m.accum_steps) {
        (Some(mb), Some(acc)) if (mb, acc) != (saved.micro_batch, saved.accum_steps) => {
            Some(format!("memory.micro_batch {mb} x memory.accum_steps {acc}"))
        }
        (Some(_), Some(_)) => None,
        _ if !matches!(m.preset.as_str(), "auto" | "manual") && m.preset != saved.preset => {
            Some(format!("memory.preset `{}`", m.preset))
        }
        _ => None,
    }
}

/// Free memory (GiB) of the CUDA device `run.device` names; `None` for a CPU device.
pub fn free_accelerator_gib(device: &str) -> Result<Option<f64>> {
    match crate::device::parse(device).map_err(|e| TrainError::invalid("run.device", e))? {
        tch::Device::Cuda(i) => {
            let cap = crate::memory::accelerator_capacity(i)?.ok_or_else(|| {
                TrainError::invalid(
                    format!("run.device `{device}`"),
                    format!("CUDA device {i} is not available (memory.preset `auto` measures its free memory)"),
                )
            })?;
            Ok(Some(cap.free as f64 / (1u64 << 30) as f64))
        }
        _ => Ok(None),
    }
}

/// Runs (or, with `job.resume`, continues) a Stage 2 job. `ctx` receives progress and may cancel
/// between optimizer steps; `on_publish` is called after each publication.
pub fn run(job: &Stage2Job, ctx: &JobContext, on_publish: &mut dyn FnMut(&Published)) -> Result<Stage2Result> {
    let device = job.config.run.device.clone();
    run_with_free_memory(job, ctx, on_publish, &mut || free_accelerator_gib(&device))
}

/// [`run`] with the accelerator's free memory (GiB; None: no accelerator) read from `free_gib`,
/// which is called only when `memory.preset: auto` has to be resolved (see [`plan_memory`]).
pub fn run_with_free_memory(
    job: &Stage2Job,
    ctx: &JobContext,
    on_publish: &mut dyn FnMut(&Published),
    free_gib: &mut dyn FnMut() -> Result<Option<f64>>,
) -> Result<Stage2Result> {
    let cfg = &job.config;
    let memory = match &job.group {
        // Rank 0 decides (`memory.preset: auto` measures its device), every rank uses it.
        Some(g) => {
            let mine = if g.is_main() {
                serde_json::to_vec(&plan_memory(cfg, job.resume, free_gib)?)
                    .map_err(|e| TrainError::invalid("memory plan", e.to_string()))?
            } else {
                Vec::new()
            };
            serde_json::from_slice(&g.broadcast_bytes(&mine)?)
                .map_err(|e| TrainError::invalid("memory plan from rank 0", e.to_string()))?
        }
        None => plan_memory(cfg, job.resume, free_gib)?,
    };
    let mut accumulation = Accumulation::new(memory.micro_batch, memory.accum_steps)?;
    let mut task = Stage2Task::new(cfg, &memory)?;
    let before = runner::validate_with_halving(&mut task, 0, &mut accumulation)?;
    let runner_cfg = RunnerConfig {
        epochs: cfg.run.epochs,
        accumulation,
        adamw: cfg.adamw(),
        groups: cfg.param_groups(),
        warmup_ratio: cfg.optim.warmup_ratio,
        min_lr_ratio: cfg.optim.min_lr_ratio,
        grad_clip_norm: cfg.optim.grad_clip_norm,
        seed: cfg.run.seed,
        best_metric: BEST_METRIC.into(),
        val_every_epochs: cfg.data.val_every_epochs,
        state_dir: cfg.checkpoint.state_dir.clone(),
        resume: job.resume,
        publish_dir: Some(cfg.checkpoint.publish_dir.clone()),
        allow_worse_latest: cfg.checkpoint.allow_worse_latest,
        base_model_id: task.base_model_id().to_string(),
        plot_file: Some(cfg.progress.plot_file.clone()),
        group: job.group.clone(),
    };
    let summary = runner::run(&mut task, &runner_cfg, ctx, on_publish)?;
    runner::prune_published(&cfg.checkpoint.publish_dir, cfg.checkpoint.keep_versions, &summary)?;
    let last: Option<&BTreeMap<String, f64>> = summary.validation.last();
    let axes = task.axes();
    let per_dim = last.map(|m| axes.report(&axes.per_dim(m))).unwrap_or_default();
    Ok(Stage2Result {
        val_action_error_before: before[BEST_METRIC],
        val_action_error: last.and_then(|m| m.get(BEST_METRIC).copied()),
        val_action_error_before_per_dim: axes.report(&axes.per_dim(&before)),
        val_action_error_per_dim: per_dim,
        lora_params_changed: task.lora_params_changed(),
        cache_refreshes: task.refreshes(),
        last_drift: task.last_drift(),
        vision_entries_built: task.vision_entries_built(),
        published: summary.published.clone(),
        accumulation: summary.accumulation,
        run: summary,
    })
}

/// Folder of the job's own files (heads and adapter before publication).
fn work_dir(cfg: &TrainConfig) -> PathBuf {
    cfg.run.output_dir.join("stage2_work")
}
