//! The generic Stage 2 training loop over a [`TrainTask`] (the model side: parameters, losses,
//! validation, cache epochs, deployable files). It owns everything model-independent: epochs and
//! optimizer steps with gradient accumulation, per-step seeds, clipping, the schedule, cooperative
//! cancel, exact-resume state (`<state_dir>/latest.safetensors`, `best.safetensors`), progress
//! events, the curves plot, and publication of a deployable checkpoint on each new best and at
//! the end.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::config::GROUP_HEADS;
use super::controller::JobContext;
use super::optim::{Accumulation, AdamW, AdamWConfig, CosineSchedule, GroupConfig, NamedParam};
use super::plot::{write_curves, Curve, TrainingCurves};
use super::progress::{eta_seconds, peak_host_memory_bytes, CacheStatus, Phase, ProgressEvent};
use super::publish::{Published, PublishItem, PublishRequest, Publisher};
use super::state::{epoch_order, load_state, save_state, seed_torch, Counters, RunState};

/// The model side of a training run. Progress events report the learning rate of the
/// [`GROUP_HEADS`] group (or of the first group when there is none).
pub trait TrainTask {
    /// Trainable fp32 leaf parameters with their groups; called once, before any step.
    fn params(&mut self) -> Vec<NamedParam>;
    /// Number of training samples (indices `0..train_len()` are passed to [`TrainTask::loss`]).
    fn train_len(&self) -> usize;
    /// Prepares epoch `epoch` (build or refresh a cache, move the VL model, set LoRA trainable or
    /// frozen) and returns the phase its steps report (`Training` or `RefreshingCache`).
    fn begin_epoch(&mut self, epoch: u64) -> Result<Phase, String>;
    /// The differentiable mean loss over `samples` and the seconds spent fetching their data.
    /// [`TaskError::OutOfMemory`] makes the loop halve the micro-batch and redo the step.
    fn loss(&mut self, samples: &[usize]) -> Result<(Tensor, f64), TaskError>;
    /// Called after the backward of each [`TrainTask::loss`] (e.g. to finish a gradient-
    /// checkpointed backward pass by recomputing its segments).
    fn after_backward(&mut self) -> Result<(), TaskError> {
        Ok(())
    }
    /// Called after the last step of every epoch, before any validation (e.g. to rewrite a
    /// feature cache after a refresh epoch).
    fn end_epoch(&mut self, _epoch: u64) -> Result<(), String> {
        Ok(())
    }
    /// Validation metrics after epoch `epoch` (must contain the runner's `best_metric`).
    fn validate(&mut self, epoch: u64) -> Result<BTreeMap<String, f64>, String>;
    /// The deployable files for the current weights (heads, PEFT adapter, stats, config).
    fn deployable(&mut self) -> Result<Vec<PublishItem>, String>;
    /// Opaque cache state saved with the training state.
    fn cache_state(&self) -> serde_json::Value;
    /// Restores the cache state of a resumed run.
    fn restore_cache_state(&mut self, state: &serde_json::Value) -> Result<(), String>;
    /// The cache as reported in progress events.
    fn cache_status(&self) -> CacheStatus;
    /// Peak accelerator memory since the epoch began, bytes (None on CPU).
    fn peak_accel_mem_bytes(&self) -> Option<u64> {
        None
    }
}

/// A failed [`TrainTask::loss`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskError {
    /// The accelerator ran out of memory; the step can be retried with a smaller micro-batch.
    OutOfMemory(String),
    /// Anything else; the run stops.
    Failed(String),
}

impl From<String> for TaskError {
    /// Classifies a libtorch error message: one saying "out of memory" is [`TaskError::OutOfMemory`].
    fn from(message: String) -> Self {
        if message.to_ascii_lowercase().contains("out of memory") {
            TaskError::OutOfMemory(message)
        } else {
            TaskError::Failed(message)
        }
    }
}

/// Settings of the loop.
#[derive(Debug, Clone)]
pub struct RunnerConfig {
    /// Epochs.
    pub epochs: u64,
    /// Micro-batch and accumulation; its effective batch fixes the optimizer steps per epoch,
    /// even after out-of-memory halving of the micro-batch.
    pub accumulation: Accumulation,
    /// AdamW hyper-parameters.
    pub adamw: AdamWConfig,
    /// Parameter groups.
    pub groups: Vec<GroupConfig>,
    /// Fraction of optimizer steps in warmup.
    pub warmup_ratio: f64,
    /// Cosine floor.
    pub min_lr_ratio: f64,
    /// Global gradient-norm clip.
    pub grad_clip_norm: f64,
    /// Run seed.
    pub seed: u64,
    /// The validation metric that defines "best" (lower is better).
    pub best_metric: String,
    /// Validate after every N-th epoch and after the last one (>= 1); best selection and
    /// publication of a new best consider validated epochs only.
    pub val_every_epochs: u64,
    /// Resumable state folder.
    pub state_dir: PathBuf,
    /// Resume from `<state_dir>/latest.safetensors` when it exists.
    pub resume: bool,
    /// Where to publish deployable checkpoints (None: do not publish).
    pub publish_dir: Option<PathBuf>,
    /// Base model identity for manifests.
    pub base_model_id: String,
    /// Curves PNG written after each epoch (None: no plot).
    pub plot_file: Option<PathBuf>,
}

/// Errors of the loop.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The task failed.
    #[error("{phase} (epoch {epoch}, step {step}): {message}")]
    Task { phase: &'static str, epoch: u64, step: u64, message: String },
    /// Optimizer, state, publication or plot failure.
    #[error("{0}")]
    Infra(String),
}

/// How the loop ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSummary {
    /// Whether it stopped on a cancel request.
    pub cancelled: bool,
    /// Counters at the end.
    pub counters: Counters,
    /// Best value of the best metric so far.
    pub best: Option<f64>,
    /// Validation metrics per validated epoch.
    pub validation: Vec<BTreeMap<String, f64>>,
    /// The (0-based) epoch of each `validation` entry.
    pub validated_epochs: Vec<u64>,
    /// Published versions, in order.
    pub published: Vec<String>,
    /// Micro-batch and accumulation at the end (smaller than configured after out-of-memory).
    pub accumulation: Accumulation,
}

/// History kept in the training state's `extra`, so plots and "best" survive a resume.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct History {
    train_loss: Vec<(u64, f64)>,
    validation: Vec<BTreeMap<String, f64>>,
    /// Epoch of each `validation` entry (absent in states written before it existed: one per epoch).
    #[serde(default)]
    validated_epochs: Vec<u64>,
    best: Option<f64>,
    published: Vec<String>,
}

impl History {
    /// The epoch of each validation entry.
    fn epochs(&self) -> Vec<u64> {
        if self.validated_epochs.len() == self.validation.len() {
            self.validated_epochs.clone()
        } else {
            (0..self.validation.len() as u64).collect()
        }
    }
}

fn infra(e: impl std::fmt::Display) -> RunError {
    RunError::Infra(e.to_string())
}

/// Runs (or resumes) the loop. Checks `ctx.cancel` before every optimizer step; on cancel it
/// writes `latest.safetensors` at the current step and returns with `cancelled: true`.
/// `on_publish` is called right after each publication (the trainer node announces it on
/// `~/checkpoint`).
pub fn run(
    task: &mut dyn TrainTask,
    cfg: &RunnerConfig,
    ctx: &JobContext,
    on_publish: &mut dyn FnMut(&Published),
) -> Result<RunSummary, RunError> {
    std::fs::create_dir_all(&cfg.state_dir).map_err(|e| infra(format!("create `{}`: {e}", cfg.state_dir.display())))?;
    let latest_path = cfg.state_dir.join("latest.safetensors");
    let best_path = cfg.state_dir.join("best.safetensors");
    let mut opt = AdamW::new(cfg.adamw.clone(), cfg.groups.clone(), task.params()).map_err(infra)?;
    let n = task.train_len();
    if n == 0 {
        return Err(RunError::Task { phase: "preparing", epoch: 0, step: 0, message: "the training set is empty".into() });
    }
    let steps_per_epoch = n.div_ceil(cfg.accumulation.effective_batch()) as u64;
    let total_steps = steps_per_epoch * cfg.epochs;
    let mut run = RunState {
        run_seed: cfg.seed,
        counters: Counters::default(),
        schedule: CosineSchedule {
            warmup_steps: (cfg.warmup_ratio * total_steps as f64).round() as u64,
            total_steps,
            min_lr_ratio: cfg.min_lr_ratio,
        },
        accumulation: cfg.accumulation,
        cache_state: serde_json::Value::Null,
        extra: serde_json::Value::Null,
    };
    let mut hist = History::default();
    if cfg.resume && latest_path.exists() {
        let meta = load_state(&latest_path, &mut opt).map_err(infra)?;
        task.restore_cache_state(&meta.cache_state)
            .map_err(|message| RunError::Task { phase: "preparing", epoch: meta.counters.epoch, step: meta.counters.global_step, message })?;
        hist = serde_json::from_value(meta.extra.clone()).map_err(|e| infra(format!("`{}` history: {e}", latest_path.display())))?;
        run = RunState { run_seed: meta.run_seed, counters: meta.counters, schedule: meta.schedule, accumulation: meta.accumulation, cache_state: meta.cache_state, extra: meta.extra };
    }
    let publisher = cfg.publish_dir.as_ref().map(|d| Publisher::new(d)?.guard_latest(&cfg.best_metric)).transpose().map_err(infra)?;
    let started = Instant::now();
    let start_step = run.counters.global_step;
    let event = |phase: Phase, run: &RunState, task: &dyn TrainTask, extra: &dyn Fn(&mut ProgressEvent)| {
        let mut ev = ProgressEvent::new(&ctx.job_id, phase);
        ev.epoch = run.counters.epoch;
        ev.total_epochs = cfg.epochs;
        ev.step = run.counters.global_step;
        ev.total_steps = total_steps;
        ev.cache = task.cache_status();
        ev.peak_accel_mem_bytes = task.peak_accel_mem_bytes();
        ev.peak_host_mem_bytes = peak_host_memory_bytes();
        ev.eta_s = eta_seconds(run.counters.global_step - start_step, total_steps - start_step, started.elapsed());
        extra(&mut ev);
        ctx.progress.publish(ev);
    };
    let save = |path: &PathBuf, opt: &AdamW, run: &mut RunState, task: &dyn TrainTask, hist: &History| -> Result<(), RunError> {
        run.cache_state = task.cache_state();
        run.extra = serde_json::to_value(hist).map_err(infra)?;
        save_state(path, opt, run).map_err(infra)
    };

    while run.counters.epoch < cfg.epochs {
        let epoch = run.counters.epoch;
        let task_err = |phase: &'static str, run: &RunState| {
            let step = run.counters.global_step;
            move |message| RunError::Task { phase, epoch, step, message }
        };
        let phase = task.begin_epoch(epoch).map_err(task_err("begin_epoch", &run))?;
        let order = epoch_order(run.run_seed, epoch, n);
        let eff = cfg.accumulation.effective_batch();
        while run.counters.step_in_epoch < steps_per_epoch {
            if ctx.cancel.is_cancelled() {
                event(Phase::Checkpointing, &run, task, &|_| {});
                save(&latest_path, &opt, &mut run, task, &hist)?;
                return Ok(RunSummary { cancelled: true, counters: run.counters, best: hist.best, validated_epochs: hist.epochs(), validation: hist.validation, published: hist.published, accumulation: run.accumulation });
            }
            let s = run.counters.step_in_epoch as usize;
            let batch = &order[s * eff..((s + 1) * eff).min(n)];
            let t0 = Instant::now();
            let (step_loss, data_s) = loop {
                opt.zero_grad();
                match accumulate(task, &run, batch) {
                    Ok(v) => break v,
                    Err(TaskError::OutOfMemory(msg)) => {
                        opt.zero_grad();
                        let Some(smaller) = run.accumulation.halved() else {
                            return Err(task_err("loss", &run)(format!("out of memory at micro-batch 1: {msg}")));
                        };
                        tracing::warn!(micro_batch = smaller.micro_batch, accum_steps = smaller.accum_steps, "out of memory: micro-batch halved, step redone");
                        run.accumulation = smaller;
                        event(phase, &run, task, &|ev| {
                            ev.message = format!("out of memory: micro-batch {} x accumulation {}", smaller.micro_batch, smaller.accum_steps)
                        });
                    }
                    Err(TaskError::Failed(msg)) => return Err(task_err("loss", &run)(msg)),
                }
            };
            if !step_loss.is_finite() {
                return Err(task_err("loss", &run)(format!("loss is {step_loss}")));
            }
            opt.clip_grad_norm(cfg.grad_clip_norm).map_err(infra)?;
            let factor = run.schedule.factor(run.counters.global_step);
            opt.step(factor).map_err(infra)?;
            run.counters.global_step += 1;
            run.counters.step_in_epoch += 1;
            run.counters.samples_seen += batch.len() as u64;
            hist.train_loss.push((run.counters.global_step, step_loss));
            let wall = t0.elapsed().as_secs_f64();
            let lrs = opt.lrs(factor);
            let lr = lrs.iter().find(|(g, _)| g == GROUP_HEADS).or(lrs.first()).map(|(_, v)| *v);
            event(phase, &run, task, &|ev| {
                ev.loss = Some(step_loss);
                ev.lr = lr;
                ev.samples_per_s = (wall > 0.0).then(|| batch.len() as f64 / wall);
                ev.data_time_s = data_s;
                ev.compute_time_s = (wall - data_s).max(0.0);
            });
        }
        task.end_epoch(epoch).map_err(task_err("end_epoch", &run))?;
        let last = epoch + 1 == cfg.epochs;
        if !(last || (epoch + 1) % cfg.val_every_epochs.max(1) == 0) {
            run.counters.epoch += 1;
            run.counters.step_in_epoch = 0;
            event(Phase::Checkpointing, &run, task, &|ev| ev.message = format!("epoch {epoch}: not a validation epoch"));
            save(&latest_path, &opt, &mut run, task, &hist)?;
            continue;
        }
        event(Phase::Validating, &run, task, &|_| {});
        let metrics = task.validate(epoch).map_err(task_err("validate", &run))?;
        let value = *metrics
            .get(&cfg.best_metric)
            .ok_or_else(|| task_err("validate", &run)(format!("metrics lack `{}`", cfg.best_metric)))?;
        hist.validated_epochs = hist.epochs();
        hist.validated_epochs.push(epoch);
        hist.validation.push(metrics.clone());
        run.counters.epoch += 1;
        run.counters.step_in_epoch = 0;
        let is_best = value.is_finite() && hist.best.is_none_or(|b| value < b);
        if is_best {
            hist.best = Some(value);
        }
        if let (Some(p), true) = (&publisher, is_best || last) {
            event(Phase::Publishing, &run, task, &|_| {});
            let items = task.deployable().map_err(task_err("deployable", &run))?;
            let req = PublishRequest {
                base_model_id: cfg.base_model_id.clone(),
                metrics: metrics.clone(),
                info: serde_json::json!({"job_id": ctx.job_id, "epoch": epoch, "global_step": run.counters.global_step, "best": is_best}),
                items,
            };
            let published = p.publish(&req).map_err(infra)?;
            if published.latest {
                on_publish(&published);
            }
            hist.published.push(published.version);
        }
        event(Phase::Checkpointing, &run, task, &|ev| ev.message = format!("epoch {epoch}: {} = {value}", cfg.best_metric));
        save(&latest_path, &opt, &mut run, task, &hist)?;
        if is_best {
            save(&best_path, &opt, &mut run, task, &hist)?;
        }
        if let Some(plot) = &cfg.plot_file {
            write_curves(plot, &curves(&hist), 960, 400).map_err(infra)?;
        }
    }
    Ok(RunSummary { cancelled: false, counters: run.counters, best: hist.best, validated_epochs: hist.epochs(), validation: hist.validation, published: hist.published, accumulation: run.accumulation })
}

/// Forward and backward of one optimizer step's micro-batches; returns (mean loss, data seconds).
fn accumulate(task: &mut dyn TrainTask, run: &RunState, batch: &[usize]) -> Result<(f64, f64), TaskError> {
    let (mut loss_sum, mut data_s) = (0.0, 0.0);
    for (mi, mb) in run.accumulation.micro_batches(batch.len()).into_iter().enumerate() {
        seed_torch(run.run_seed, run.counters.global_step, mi as u64);
        let (loss, d) = task.loss(&batch[mb.range.clone()])?;
        data_s += d;
        let scaled = loss * mb.loss_scale;
        loss_sum += scaled.double_value(&[]);
        scaled.f_backward().map_err(|e| TaskError::from(e.to_string()))?;
        task.after_backward()?;
    }
    Ok((loss_sum, data_s))
}

fn curves(h: &History) -> TrainingCurves {
    let epochs = h.epochs();
    let mut names: Vec<&String> = h.validation.iter().flat_map(|m| m.keys()).collect();
    names.sort();
    names.dedup();
    TrainingCurves {
        train_loss: h.train_loss.iter().map(|&(s, l)| (s as f64, l)).collect(),
        validation: names
            .into_iter()
            .map(|name| Curve {
                name: name.clone(),
                points: h.validation.iter().zip(&epochs).filter_map(|(m, &e)| m.get(name).map(|v| (e as f64, *v))).collect(),
            })
            .collect(),
    }
}
