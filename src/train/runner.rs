//! The one training loop, over a [`TrainTask`] (the model side: parameters, losses, validation,
//! cache epochs, deployable files); stage 1 (`heads_job`) and Stage 2 (`stage2`) both run on it.
//! [`Runner`] owns everything model-independent: epochs and optimizer steps with gradient
//! accumulation, per-step seeds, clipping, the schedule, cooperative cancel, out-of-memory
//! halving of the micro-batch, exact-resume state (`<state_dir>/latest.safetensors`,
//! `best.safetensors`), progress events (each carrying the current optimizer step), the curves
//! plot, and publication of a deployable checkpoint on each new best and at the end.
//!
//! Data-parallel with a [`Group`] ([`RunnerConfig::group`]): every rank runs this loop over its
//! shard of each step ([`data_parallel`]), the trainable gradients are all-reduced once per
//! optimizer step (after the accumulation), so every rank takes the same update; the ranks agree
//! before each step on cancel and on the micro-batch (the smallest after out-of-memory halving);
//! rank 0 alone validates (the metrics are broadcast), saves the state, publishes, plots and
//! reports progress. A resume on another world size keeps the step's batch (`micro-batch x
//! accumulation x world` of the run that began it).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::dist::{Group, ReduceOp};
use crate::oom_injection;

use super::config::GROUP_HEADS;
use super::controller::JobContext;
use super::data_parallel::{all_reduce_gradients, rank_micro_batches};
use super::error::TrainError;
use super::optim::{Accumulation, AdamW, AdamWConfig, CosineSchedule, GroupConfig, MicroBatch, NamedParam};
use super::plot::{write_curves, Curve, TrainingCurves};
use super::progress::{eta_seconds, peak_host_memory_bytes, CacheStatus, Phase, ProgressEvent};
use super::state::{epoch_order, load_state, save_state, seed_torch, Counters, RunState};
use crate::checkpoint::publish::{PublishItem, PublishRequest, Published, Publisher};

/// The model side of a training run. Progress events report the learning rate of the
/// [`GROUP_HEADS`] group (or of the first group when there is none).
pub trait TrainTask {
    /// Trainable fp32 leaf parameters with their groups; called once, before any step.
    fn params(&mut self) -> Vec<NamedParam>;
    /// Number of training samples (indices `0..train_len()` are passed to [`TrainTask::loss`]).
    fn train_len(&self) -> usize;
    /// Prepares epoch `epoch` (build or refresh a cache, move the VL model, set LoRA trainable or
    /// frozen) and returns the phase its steps report (`Training` or `RefreshingCache`). Batched
    /// work runs in chunks of at most `chunk` samples; [`TrainError::OutOfMemory`] makes the loop
    /// halve it and call again, so a repeated call must finish what the failed one began.
    fn begin_epoch(&mut self, epoch: u64, chunk: usize) -> Result<Phase, TrainError>;
    /// The differentiable mean loss over `samples` and the seconds spent fetching their data;
    /// `global_step` is the optimizer step it is for (steps completed before it), the same for
    /// every micro-batch of the step. [`TrainError::OutOfMemory`] makes the loop halve the
    /// micro-batch and redo the step.
    fn loss(&mut self, samples: &[usize], global_step: u64) -> Result<(Tensor, f64), TrainError>;
    /// The samples of the micro-batch [`TrainTask::loss`] will be asked for after the next one
    /// (the loop announces it before each loss), so their data can be prepared on a worker
    /// while the next one computes. A hint: the loss must not depend on it.
    fn prefetch(&mut self, _next: &[usize]) {}
    /// The backward of a [`TrainTask::loss`] (scaled by its share of the step).
    fn backward(&mut self, loss: &Tensor) -> Result<(), TrainError> {
        Ok(loss.f_backward()?)
    }
    /// Called, data-parallel, for a micro-batch in which this rank has no samples, so that a task
    /// whose passes make collectives (synchronised BatchNorm) can join them.
    fn idle_pass(&mut self) -> Result<(), TrainError> {
        Ok(())
    }
    /// Called after the backward of each [`TrainTask::loss`] (e.g. to finish a gradient-
    /// checkpointed backward pass by recomputing its segments).
    fn after_backward(&mut self) -> Result<(), TrainError> {
        Ok(())
    }
    /// Drops what a pass left half done (a checkpointed pass awaiting its backward) after an
    /// out-of-memory error, before the step is redone with a smaller micro-batch.
    fn discard_pass(&mut self) {}
    /// Called after the last step of every epoch, before any validation (e.g. to rewrite a
    /// feature cache after a refresh epoch); `chunk` and out-of-memory as for
    /// [`TrainTask::begin_epoch`].
    fn end_epoch(&mut self, _epoch: u64, _chunk: usize) -> Result<(), TrainError> {
        Ok(())
    }
    /// Validation metrics after epoch `epoch` (must contain the runner's `best_metric`), computed
    /// in chunks of at most `chunk` samples (the loop's micro-batch, smaller after an
    /// out-of-memory). [`TrainError::OutOfMemory`] makes the loop halve it and validate again.
    fn validate(&mut self, epoch: u64, chunk: usize) -> Result<BTreeMap<String, f64>, TrainError>;
    /// The deployable files for the current weights (heads, PEFT adapter, stats, config).
    fn deployable(&mut self) -> Result<Vec<PublishItem>, TrainError>;
    /// Opaque task state saved with the training state (cache bookkeeping, buffers).
    fn cache_state(&self) -> serde_json::Value;
    /// Restores the state of a resumed run (`Null` when the state file has none).
    fn restore_cache_state(&mut self, state: &serde_json::Value) -> Result<(), TrainError>;
    /// The cache as reported in progress events.
    fn cache_status(&self) -> CacheStatus;
    /// Peak accelerator memory since the epoch began, bytes (None on CPU).
    fn peak_accel_mem_bytes(&self) -> Option<u64> {
        None
    }
    /// Called once, before the first epoch, when the run is data-parallel: the task may share
    /// out by rank the work every rank would otherwise repeat (cache builds), and must take its
    /// decisions identically on every rank (e.g. broadcast from rank 0).
    fn join_group(&mut self, _group: &Arc<Group>) {}
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
    /// Resume from `<state_dir>/latest.safetensors` when it exists; without it an old state
    /// there is removed first.
    pub resume: bool,
    /// Where to publish deployable checkpoints (None: do not publish).
    pub publish_dir: Option<PathBuf>,
    /// Whether `latest` may move to a version worse on the same data than the one it named when
    /// the run started; false guards it ([`Publisher::guard_latest`] on `best_metric`).
    pub allow_worse_latest: bool,
    /// Base model identity for manifests.
    pub base_model_id: String,
    /// Curves PNG written after each epoch (None: no plot).
    pub plot_file: Option<PathBuf>,
    /// The data-parallel group this process is a rank of (None: one process).
    pub group: Option<Arc<Group>>,
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
    /// Mean training loss (over samples) of each finished epoch.
    pub train_loss_per_epoch: Vec<f64>,
    /// Published versions, in order.
    pub published: Vec<String>,
    /// Micro-batch and accumulation at the end (smaller than configured after out-of-memory).
    pub accumulation: Accumulation,
    /// Gradient all-reduces issued by this process (data-parallel runs; one per optimizer step
    /// while the trainable gradients fit one bucket).
    #[serde(default)]
    pub grad_all_reduces: u64,
    /// Seconds this process spent in them.
    #[serde(default)]
    pub grad_all_reduce_s: f64,
    /// Times the ranks compared their trainable parameters and found them identical
    /// (data-parallel runs: before every optimizer step and at each epoch's start and end).
    #[serde(default)]
    pub replica_checks: u64,
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
    /// Mean training loss of each finished epoch (absent in older states).
    #[serde(default)]
    epoch_loss: Vec<f64>,
    /// Sum of step loss x step samples in the current epoch.
    #[serde(default)]
    epoch_loss_sum: f64,
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

/// Runs (or resumes) the loop: [`Runner::new`] then [`Runner::run`].
pub fn run(
    task: &mut dyn TrainTask,
    cfg: &RunnerConfig,
    ctx: &JobContext,
    on_publish: &mut dyn FnMut(&Published),
) -> Result<RunSummary, TrainError> {
    Runner::new(task, cfg, ctx, on_publish)?.run()
}

/// The loop's state between steps; see the module doc.
pub struct Runner<'a> {
    task: &'a mut dyn TrainTask,
    cfg: &'a RunnerConfig,
    ctx: &'a JobContext,
    on_publish: &'a mut dyn FnMut(&Published),
    opt: AdamW,
    state: RunState,
    hist: History,
    publisher: Option<Publisher>,
    n: usize,
    /// Samples per optimizer step over all ranks.
    step_batch: usize,
    steps_per_epoch: u64,
    /// The trainable parameters (shallow clones), for the gradient all-reduce.
    dp_params: Vec<Tensor>,
    grad_all_reduces: u64,
    grad_all_reduce_s: f64,
    replica_checks: u64,
    /// Peak accelerator memory, the maximum over the ranks at the last agreement.
    peak_accel: Option<u64>,
    started: Instant,
    start_step: u64,
    /// The current epoch's sample order and step phase, set by [`Runner::begin_epoch`].
    epoch: Option<(Vec<usize>, Phase)>,
}

/// The state of a run that starts now: counters at zero, the schedule over `total_steps`.
fn fresh_state(cfg: &RunnerConfig, total_steps: u64, world: usize) -> RunState {
    RunState {
        run_seed: cfg.seed,
        counters: Counters::default(),
        schedule: CosineSchedule {
            warmup_steps: (cfg.warmup_ratio * total_steps as f64).round() as u64,
            total_steps,
            min_lr_ratio: cfg.min_lr_ratio,
        },
        accumulation: cfg.accumulation,
        world_size: world,
        cache_state: serde_json::Value::Null,
        extra: serde_json::Value::Null,
    }
}

/// The publisher of `cfg.publish_dir` (None: no publication), guarding `latest` on the best
/// metric unless `cfg.allow_worse_latest`.
fn open_publisher(cfg: &RunnerConfig) -> Result<Option<Publisher>, TrainError> {
    cfg.publish_dir
        .as_ref()
        .map(|d| {
            let p = Publisher::new(d)?;
            if cfg.allow_worse_latest {
                Ok(p)
            } else {
                p.guard_latest(&cfg.best_metric)
            }
        })
        .transpose()
        .map_err(TrainError::from)
}

impl<'a> Runner<'a> {
    /// Builds the optimizer over the task's parameters and, with `cfg.resume`, restores
    /// `<state_dir>/latest.safetensors` (parameters, moments, counters, history, task state);
    /// without it an old state there is removed. `on_publish` is called right after each
    /// publication (the trainer node announces it on `~/checkpoint`).
    pub fn new(
        task: &'a mut dyn TrainTask,
        cfg: &'a RunnerConfig,
        ctx: &'a JobContext,
        on_publish: &'a mut dyn FnMut(&Published),
    ) -> Result<Self, TrainError> {
        let fail = |e: TrainError| e.at("preparing", 0, 0);
        let world = cfg.group.as_ref().map_or(1, |g| g.world_size());
        let main = cfg.group.as_ref().is_none_or(|g| g.is_main());
        std::fs::create_dir_all(&cfg.state_dir)
            .map_err(TrainError::io("create folder", &cfg.state_dir))
            .map_err(fail)?;
        let latest = cfg.state_dir.join("latest.safetensors");
        if !cfg.resume && latest.exists() && main {
            std::fs::remove_file(&latest).map_err(TrainError::io("remove the old state", &latest)).map_err(fail)?;
        }
        let n = task.train_len();
        if n == 0 {
            return Err(fail(TrainError::invalid("training set", "is empty (expected at least one sample)")));
        }
        let opt = AdamW::new(cfg.adamw.clone(), cfg.groups.clone(), task.params()).map_err(|e| fail(e.into()))?;
        let step_batch = cfg.accumulation.effective_batch() * world;
        let steps_per_epoch = n.div_ceil(step_batch) as u64;
        let state = fresh_state(cfg, steps_per_epoch * cfg.epochs, world);
        let publisher = if main { open_publisher(cfg).map_err(fail)? } else { None };
        let mut runner = Runner {
            task,
            cfg,
            ctx,
            on_publish,
            opt,
            state,
            hist: History::default(),
            publisher,
            n,
            step_batch,
            steps_per_epoch,
            dp_params: Vec::new(),
            grad_all_reduces: 0,
            grad_all_reduce_s: 0.0,
            replica_checks: 0,
            peak_accel: None,
            started: Instant::now(),
            start_step: 0,
            epoch: None,
        };
        if cfg.resume && latest.exists() {
            runner.restore(&latest)?;
        }
        if let Some(group) = &cfg.group {
            runner.join(group)?;
        }
        Ok(runner)
    }

    /// Makes this rank's start identical to rank 0's (parameters broadcast) and lets the task
    /// share out its work.
    fn join(&mut self, group: &Arc<Group>) -> Result<(), TrainError> {
        self.dp_params = self.opt.params().map(|(_, _, _, t)| t.shallow_clone()).collect();
        for p in &mut self.dp_params {
            let mut data = p.detach();
            group.broadcast(&mut data, 0).map_err(|e| TrainError::from(e).at("preparing", 0, 0))?;
        }
        self.task.join_group(group);
        Ok(())
    }

    fn group(&self) -> Option<&Arc<Group>> {
        self.cfg.group.as_ref()
    }

    fn is_main(&self) -> bool {
        self.group().is_none_or(|g| g.is_main())
    }

    /// Loads a saved state into the optimizer, the counters, the history and the task.
    fn restore(&mut self, path: &Path) -> Result<(), TrainError> {
        let meta = load_state(path, &mut self.opt).map_err(|e| TrainError::from(e).at("preparing", 0, 0))?;
        let (epoch, step) = (meta.counters.epoch, meta.counters.global_step);
        self.task.restore_cache_state(&meta.cache_state).map_err(|e| e.at("restore", epoch, step))?;
        self.hist = serde_json::from_value(meta.extra.clone()).map_err(|e| {
            TrainError::invalid(format!("training state `{}`", path.display()), format!("history: {e}"))
                .at("restore", epoch, step)
        })?;
        let saved_world = meta.world_size.max(1);
        self.state = meta.into();
        self.start_step = step;
        let world = self.group().map_or(1, |g| g.world_size());
        if saved_world != world {
            // The step's batch of the run that began it, now over `world` ranks.
            self.step_batch = self.cfg.accumulation.effective_batch() * saved_world;
            self.steps_per_epoch = self.n.div_ceil(self.step_batch) as u64;
            let a = &mut self.state.accumulation;
            a.accum_steps = self.step_batch.div_ceil(a.micro_batch * world);
            self.state.world_size = world;
            tracing::info!(
                saved_world,
                world,
                step_batch = self.step_batch,
                accum_steps = a.accum_steps,
                "resumed on another world size: same batch per optimizer step"
            );
        }
        Ok(())
    }

    /// Runs every remaining epoch. Checks `ctx.cancel` before every optimizer step; on cancel
    /// it writes `latest.safetensors` at the current step and returns with `cancelled: true`.
    pub fn run(mut self) -> Result<RunSummary, TrainError> {
        while self.state.counters.epoch < self.cfg.epochs {
            self.begin_epoch()?;
            while self.state.counters.step_in_epoch < self.steps_per_epoch {
                if self.agree_before_step()? {
                    self.event(Phase::Checkpointing, |ev| ev.message = "cancelled: saving the state".into());
                    self.save(&self.cfg.state_dir.join("latest.safetensors"))?;
                    return Ok(self.summary(true));
                }
                self.step()?;
            }
            self.end_epoch()?;
        }
        Ok(self.summary(false))
    }

    /// Counters now.
    pub fn counters(&self) -> Counters {
        self.state.counters
    }

    /// Micro-batch and accumulation now.
    pub fn accumulation(&self) -> Accumulation {
        self.state.accumulation
    }

    /// Optimizer steps per epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        self.steps_per_epoch
    }

    /// Whether to stop for a cancel request; data-parallel, the ranks first agree on it (any
    /// rank's request stops all), on the micro-batch (the smallest, after an out-of-memory
    /// halving on any rank) and on the peak accelerator memory (the largest).
    fn agree_before_step(&mut self) -> Result<bool, TrainError> {
        let cancel = self.ctx.cancel.is_cancelled();
        let peak = self.task.peak_accel_mem_bytes();
        let Some(group) = self.cfg.group.clone() else {
            self.peak_accel = peak;
            return Ok(cancel);
        };
        let local = [
            f64::from(u8::from(cancel)),
            -(self.state.accumulation.micro_batch as f64),
            peak.map_or(-1.0, |b| b as f64),
        ];
        let agreed = self.agree(&group, &local, "agree")?;
        let micro = (-agreed[1]) as usize;
        while self.state.accumulation.micro_batch > micro {
            match self.state.accumulation.halved() {
                Some(a) => self.state.accumulation = a,
                None => break,
            }
        }
        self.peak_accel = (agreed[2] >= 0.0).then_some(agreed[2] as u64);
        Ok(agreed[0] > 0.0)
    }

    /// Waits for every rank (data-parallel; a no-op otherwise), checking that their parameters
    /// are identical.
    fn barrier(&mut self, phase: &'static str) -> Result<(), TrainError> {
        match self.cfg.group.clone() {
            Some(g) => self.agree(&g, &[], phase).map(|_| ()),
            None => Ok(()),
        }
    }

    /// The element-wise maximum over the ranks of `values`, in the same all-reduce as a check
    /// that every rank's trainable parameters are identical (their sum and sum of squares, in
    /// f64: a rank whose update differed would fail it).
    fn agree(&mut self, group: &Group, values: &[f64], phase: &'static str) -> Result<Vec<f64>, TrainError> {
        let (sum, sq) = match self.dp_params.first() {
            Some(first) => {
                let device = first.device();
                let totals = tch::no_grad(|| {
                    let each: Vec<Tensor> = self
                        .dp_params
                        .iter()
                        .map(|p| {
                            let d = p.to_kind(tch::Kind::Double);
                            Tensor::stack(&[d.sum(tch::Kind::Double), d.square().sum(tch::Kind::Double)], 0)
                                .to_device(device)
                        })
                        .collect();
                    Tensor::stack(&each, 0).sum_dim_intlist(0, false, tch::Kind::Double)
                });
                let t = Vec::<f64>::try_from(totals.to_device(tch::Device::Cpu)).unwrap_or_default();
                (t.first().copied().unwrap_or(0.0), t.get(1).copied().unwrap_or(0.0))
            }
            None => (0.0, 0.0),
        };
        let mut local = values.to_vec();
        local.extend([sum, -sum, sq, -sq]);
        let max = group.all_reduce_f64(&local, ReduceOp::Max).map_err(|e| self.located(e.into(), phase))?;
        let k = values.len();
        if max[k] != -max[k + 1] || max[k + 2] != -max[k + 3] {
            let reason = format!(
                "differ between the ranks (sum {} .. {}, sum of squares {} .. {}): their updates diverged",
                -max[k + 1],
                max[k],
                -max[k + 3],
                max[k + 2]
            );
            return Err(self.located(TrainError::invalid("trainable parameters", reason), phase));
        }
        self.replica_checks += 1;
        Ok(max[..k].to_vec())
    }

    /// Starts the current epoch: the task prepares it, the sample order is drawn.
    pub fn begin_epoch(&mut self) -> Result<(), TrainError> {
        let epoch = self.state.counters.epoch;
        let task = &mut *self.task;
        let phase = with_halving(&mut self.state.accumulation, "begin_epoch", |chunk| task.begin_epoch(epoch, chunk))
            .map_err(|e| self.located(e, "begin_epoch"))?;
        self.barrier("begin_epoch")?;
        if self.state.counters.step_in_epoch == 0 {
            self.hist.epoch_loss_sum = 0.0;
        }
        self.epoch = Some((epoch_order(self.state.run_seed, epoch, self.n), phase));
        Ok(())
    }

    /// One optimizer step of the current epoch (after [`Runner::begin_epoch`]): forward and
    /// backward of its micro-batches (on out-of-memory with the micro-batch halved and the step
    /// redone), clipping, the update, a progress event. Returns the step's mean loss.
    pub fn step(&mut self) -> Result<f64, TrainError> {
        let Some((order, phase)) = self.epoch.take() else {
            return Err(self.located(TrainError::invalid("step", "called before begin_epoch"), "step"));
        };
        let result = self.step_in(&order, phase);
        self.epoch = Some((order, phase));
        result
    }

    fn step_in(&mut self, order: &[usize], phase: Phase) -> Result<f64, TrainError> {
        let eff = self.step_batch;
        let s = self.state.counters.step_in_epoch as usize;
        let batch = &order[s * eff..((s + 1) * eff).min(self.n)];
        let next = &order[((s + 1) * eff).min(self.n)..((s + 2) * eff).min(self.n)];
        let t0 = Instant::now();
        let (mut step_loss, data_s) = self.forward_backward(batch, next, phase)?;
        if let Some(group) = self.cfg.group.clone() {
            let t = Instant::now();
            self.grad_all_reduces += all_reduce_gradients(&group, &mut self.dp_params)
                .map_err(|e| self.located(e, "gradient all-reduce"))?;
            self.grad_all_reduce_s += t.elapsed().as_secs_f64();
            step_loss = group
                .all_reduce_f64(&[step_loss], ReduceOp::Sum)
                .map_err(|e| self.located(e.into(), "loss all-reduce"))?[0];
        }
        if !step_loss.is_finite() {
            return Err(
                self.located(TrainError::invalid("loss", format!("is {step_loss} (expected a finite number)")), "loss")
            );
        }
        let factor = self.state.schedule.factor(self.state.counters.global_step);
        self.opt
            .clip_grad_norm(self.cfg.grad_clip_norm)
            .and_then(|_| self.opt.step(factor))
            .map_err(|e| self.located(e.into(), "optimizer step"))?;
        let c = &mut self.state.counters;
        c.global_step += 1;
        c.step_in_epoch += 1;
        c.samples_seen += batch.len() as u64;
        self.hist.train_loss.push((c.global_step, step_loss));
        self.hist.epoch_loss_sum += step_loss * batch.len() as f64;
        let wall = t0.elapsed().as_secs_f64();
        let lrs = self.opt.lrs(factor);
        let lr = lrs.iter().find(|(g, _)| g == GROUP_HEADS).or(lrs.first()).map(|(_, v)| *v);
        self.event(phase, |ev| {
            ev.loss = Some(step_loss);
            ev.lr = lr;
            ev.samples_per_s = (wall > 0.0).then(|| batch.len() as f64 / wall);
            ev.data_time_s = data_s;
            ev.compute_time_s = (wall - data_s).max(0.0);
        });
        Ok(step_loss)
    }

    /// This rank's gradients of one step's `batch` (`next`: the next step's, for prefetching);
    /// halves the micro-batch and redoes it on out-of-memory (data-parallel: within the same
    /// shard). Returns (this rank's share of the step's mean loss, data seconds).
    fn forward_backward(&mut self, batch: &[usize], next: &[usize], phase: Phase) -> Result<(f64, f64), TrainError> {
        let (rank, world) = self.group().map_or((0, 1), |g| (g.rank(), g.world_size()));
        let shard_micro = self.state.accumulation.micro_batch;
        let shard = |len| rank_micro_batches(len, shard_micro, rank, world);
        let (parts, next_parts) = (shard(batch.len()), shard(next.len()));
        loop {
            self.opt.zero_grad();
            let plan = Plan {
                parts: &parts,
                next_first: next_parts.iter().find(|mb| !mb.range.is_empty()).map(|mb| &next[mb.range.clone()]),
                micro_batch: self.state.accumulation.micro_batch,
                rank,
                world,
            };
            match accumulate(self.task, &self.state, batch, &plan) {
                Ok(v) => return Ok(v),
                Err(TrainError::OutOfMemory { source }) => {
                    self.task.discard_pass();
                    self.opt.zero_grad();
                    let Some(smaller) = halve_after_oom(&self.state.accumulation, source.as_ref(), "step") else {
                        return Err(self.located(TrainError::OutOfMemory { source }, "loss at micro-batch 1"));
                    };
                    self.state.accumulation = smaller;
                    self.event(phase, |ev| {
                        ev.message = format!(
                            "out of memory: micro-batch {} x accumulation {}",
                            smaller.micro_batch, smaller.accum_steps
                        )
                    });
                }
                Err(e) => return Err(self.located(e, "loss")),
            }
        }
    }

    /// Ends the current epoch: the task's `end_epoch`, then on a validation epoch validation,
    /// best selection and publication, then the state saved (and the plot drawn).
    pub fn end_epoch(&mut self) -> Result<(), TrainError> {
        let epoch = self.state.counters.epoch;
        let task = &mut *self.task;
        with_halving(&mut self.state.accumulation, "end_epoch", |chunk| task.end_epoch(epoch, chunk))
            .map_err(|e| self.located(e, "end_epoch"))?;
        self.barrier("end_epoch")?;
        self.epoch = None;
        self.hist.epoch_loss.push(self.hist.epoch_loss_sum / self.n as f64);
        self.hist.epoch_loss_sum = 0.0;
        let last = epoch + 1 == self.cfg.epochs;
        let validate = last || (epoch + 1) % self.cfg.val_every_epochs.max(1) == 0;
        let metrics = if validate { Some(self.validate()?) } else { None };
        self.state.counters.epoch += 1;
        self.state.counters.step_in_epoch = 0;
        let Some(metrics) = metrics else {
            self.event(Phase::Checkpointing, |ev| ev.message = format!("epoch {epoch}: not a validation epoch"));
            return self.save(&self.cfg.state_dir.join("latest.safetensors"));
        };
        let value = metrics[&self.cfg.best_metric];
        let is_best = value.is_finite() && self.hist.best.is_none_or(|b| value < b);
        if is_best {
            self.hist.best = Some(value);
        }
        if is_best || last {
            self.publish(epoch, metrics, is_best)?;
        }
        self.event(Phase::Checkpointing, |ev| {
            ev.message = format!("epoch {epoch}: {} = {value}", self.cfg.best_metric)
        });
        self.save(&self.cfg.state_dir.join("latest.safetensors"))?;
        if is_best {
            self.save(&self.cfg.state_dir.join("best.safetensors"))?;
        }
        if let Some(plot) = self.cfg.plot_file.as_ref().filter(|_| self.is_main()) {
            write_curves(plot, &curves(&self.hist), 960, 400).map_err(|e| self.located(e.into(), "plot"))?;
        }
        Ok(())
    }

    /// Validation of the epoch just trained; records the metrics in the history.
    fn validate(&mut self) -> Result<BTreeMap<String, f64>, TrainError> {
        let epoch = self.state.counters.epoch;
        self.event(Phase::Validating, |_| {});
        let before = self.state.accumulation;
        let metrics = self.validate_on_main(epoch).map_err(|e| self.located(e, "validate"))?;
        if self.state.accumulation != before {
            let a = self.state.accumulation;
            self.event(Phase::Validating, |ev| {
                ev.message = format!("out of memory: micro-batch {} x accumulation {}", a.micro_batch, a.accum_steps)
            });
        }
        if !metrics.contains_key(&self.cfg.best_metric) {
            let reason = format!(
                "lack `{}` (have: {})",
                self.cfg.best_metric,
                metrics.keys().cloned().collect::<Vec<_>>().join(", ")
            );
            return Err(self.located(TrainError::invalid("validation metrics", reason), "validate"));
        }
        self.hist.validated_epochs = self.hist.epochs();
        self.hist.validated_epochs.push(epoch);
        self.hist.validation.push(metrics.clone());
        Ok(metrics)
    }

    /// Validation on rank 0 (the only one, data-parallel; the other ranks receive its metrics).
    fn validate_on_main(&mut self, epoch: u64) -> Result<BTreeMap<String, f64>, TrainError> {
        let Some(group) = self.cfg.group.clone() else {
            return validate_with_halving(self.task, epoch, &mut self.state.accumulation);
        };
        let mut sent = Vec::new();
        if group.is_main() {
            let metrics = validate_with_halving(self.task, epoch, &mut self.state.accumulation)?;
            sent =
                serde_json::to_vec(&metrics).map_err(|e| TrainError::invalid("validation metrics", e.to_string()))?;
        }
        let got = group.broadcast_bytes(&sent)?;
        serde_json::from_slice(&got).map_err(|e| TrainError::invalid("validation metrics from rank 0", e.to_string()))
    }

    /// Publishes the current weights as a deployable checkpoint (no-op without a publish folder).
    fn publish(&mut self, epoch: u64, metrics: BTreeMap<String, f64>, is_best: bool) -> Result<(), TrainError> {
        if self.publisher.is_none() {
            return Ok(());
        }
        self.event(Phase::Publishing, |_| {});
        let items = self.task.deployable().map_err(|e| self.located(e, "deployable"))?;
        let req = PublishRequest {
            base_model_id: self.cfg.base_model_id.clone(),
            metrics,
            info: serde_json::json!({"job_id": self.ctx.job_id, "epoch": epoch, "global_step": self.state.counters.global_step, "best": is_best}),
            items,
        };
        let published = self
            .publisher
            .as_ref()
            .expect("checked above")
            .publish(&req)
            .map_err(|e| self.located(e.into(), "publish"))?;
        if published.latest {
            (self.on_publish)(&published);
        }
        self.hist.published.push(published.version);
        Ok(())
    }

    /// Writes the training state (optimizer, counters, history, task state) to `path` (rank 0
    /// alone, data-parallel).
    pub fn save(&mut self, path: &Path) -> Result<(), TrainError> {
        if !self.is_main() {
            return Ok(());
        }
        self.state.cache_state = self.task.cache_state();
        self.state.extra = serde_json::to_value(&self.hist)
            .map_err(|e| self.located(TrainError::invalid("training history", e.to_string()), "save"))?;
        save_state(path, &self.opt, &self.state).map_err(|e| self.located(e.into(), "save"))
    }

    /// The summary of the run so far.
    pub fn summary(&self, cancelled: bool) -> RunSummary {
        RunSummary {
            cancelled,
            counters: self.state.counters,
            best: self.hist.best,
            validation: self.hist.validation.clone(),
            validated_epochs: self.hist.epochs(),
            train_loss_per_epoch: self.hist.epoch_loss.clone(),
            published: self.hist.published.clone(),
            accumulation: self.state.accumulation,
            grad_all_reduces: self.grad_all_reduces,
            grad_all_reduce_s: self.grad_all_reduce_s,
            replica_checks: self.replica_checks,
        }
    }

    /// `e` located at the current epoch and optimizer step.
    fn located(&self, e: TrainError, phase: &'static str) -> TrainError {
        e.at(phase, self.state.counters.epoch, self.state.counters.global_step)
    }

    /// Publishes a progress event for `phase` at the current counters; `extra` fills the rest.
    fn event(&self, phase: Phase, extra: impl FnOnce(&mut ProgressEvent)) {
        if !self.is_main() {
            return;
        }
        let c = self.state.counters;
        let total_steps = self.state.schedule.total_steps;
        let mut ev = ProgressEvent::new(&self.ctx.job_id, phase);
        ev.epoch = c.epoch;
        ev.total_epochs = self.cfg.epochs;
        ev.step = c.global_step;
        ev.total_steps = total_steps;
        ev.cache = self.task.cache_status();
        ev.peak_accel_mem_bytes =
            if self.group().is_some() { self.peak_accel } else { self.task.peak_accel_mem_bytes() };
        ev.peak_host_mem_bytes = peak_host_memory_bytes();
        ev.eta_s = eta_seconds(
            c.global_step - self.start_step,
            total_steps.saturating_sub(self.start_step),
            self.started.elapsed(),
        );
        extra(&mut ev);
        self.ctx.progress.publish(ev);
    }
}

/// Prunes `publish_dir` to `keep` versions, never removing the run's last two publications (on
/// each new best and at the end, so they are the latest and the best).
pub fn prune_published(publish_dir: &Path, keep: usize, summary: &RunSummary) -> Result<(), TrainError> {
    if summary.published.is_empty() {
        return Ok(());
    }
    let protect: Vec<&str> = summary.published.iter().rev().take(2).map(String::as_str).collect();
    Publisher::new(publish_dir)?.prune(keep, &protect)?;
    Ok(())
}

/// `task.validate(epoch, ..)` in chunks of `accumulation`'s micro-batch, through
/// [`with_halving`]. The loop's validation, and a task's before the loop.
pub fn validate_with_halving(
    task: &mut dyn TrainTask,
    epoch: u64,
    accumulation: &mut Accumulation,
) -> Result<BTreeMap<String, f64>, TrainError> {
    with_halving(accumulation, "validation", |chunk| task.validate(epoch, chunk))
}

/// `f(chunk)` with `chunk` = `accumulation`'s micro-batch, behind the unwind boundary; on
/// out-of-memory the micro-batch is halved (`accumulation` updated, the effective batch kept)
/// and `f` called again.
fn with_halving<T>(
    accumulation: &mut Accumulation,
    what: &str,
    mut f: impl FnMut(usize) -> Result<T, TrainError>,
) -> Result<T, TrainError> {
    loop {
        let chunk = accumulation.micro_batch;
        match unwind_boundary(|| f(chunk)) {
            Err(TrainError::OutOfMemory { source }) => {
                let Some(smaller) = halve_after_oom(accumulation, source.as_ref(), what) else {
                    return Err(TrainError::OutOfMemory { source });
                };
                *accumulation = smaller;
            }
            other => return other,
        }
    }
}

/// The halved micro-batch after an out-of-memory in `what` (None at micro-batch 1), with what
/// the failed pass freed returned to the device and a warning logged.
fn halve_after_oom(
    accumulation: &Accumulation,
    source: &(dyn std::error::Error + Send + Sync),
    what: &str,
) -> Option<Accumulation> {
    // A no-op on the CPU.
    let _ = crate::memory::release_cached_accelerator_memory();
    let smaller = accumulation.halved()?;
    let text = source.to_string();
    let cause = text.lines().next().unwrap_or_default();
    tracing::warn!(
        micro_batch = smaller.micro_batch,
        accum_steps = smaller.accum_steps,
        "out of memory ({cause}): micro-batch halved, {what} redone"
    );
    Some(smaller)
}

/// Which micro-batches of a step's batch this process computes.
struct Plan<'p> {
    /// This rank's shard ([`rank_micro_batches`]), scaled to the step's mean loss.
    parts: &'p [MicroBatch],
    /// The first micro-batch of the next step's shard (prefetched after the last one).
    next_first: Option<&'p [usize]>,
    /// Samples per forward; a part larger than that is split (after an out-of-memory).
    micro_batch: usize,
    rank: usize,
    world: usize,
}

impl Plan<'_> {
    /// The micro-batches to run: each part, split into pieces of at most `micro_batch`; an empty
    /// part stays one empty micro-batch (an idle pass).
    fn micro_batches(&self) -> Vec<MicroBatch> {
        let m = self.micro_batch.max(1);
        self.parts
            .iter()
            .flat_map(|p| {
                let per_sample = p.loss_scale / p.range.len().max(1) as f64;
                let starts: Vec<usize> = if p.range.is_empty() {
                    vec![p.range.start]
                } else {
                    (p.range.start..p.range.end).step_by(m).collect()
                };
                starts.into_iter().map(move |s| {
                    let range = s..(s + m).min(p.range.end);
                    MicroBatch { loss_scale: per_sample * range.len() as f64, range }
                })
            })
            .collect()
    }
}

/// Forward and backward of this process's micro-batches of one optimizer step, each announcing
/// the one after it (the next step's first after the last); returns (this process's share of
/// the step's mean loss, data seconds).
fn accumulate(
    task: &mut dyn TrainTask,
    run: &RunState,
    batch: &[usize],
    plan: &Plan<'_>,
) -> Result<(f64, f64), TrainError> {
    let (mut loss_sum, mut data_s) = (0.0, 0.0);
    let mbs = plan.micro_batches();
    let next_first = plan.next_first.map(|n| &n[..n.len().min(plan.micro_batch.max(1))]);
    for (mi, mb) in mbs.iter().enumerate() {
        if mb.range.is_empty() {
            task.idle_pass()?;
            continue;
        }
        match mbs[mi + 1..].iter().find(|m| !m.range.is_empty()) {
            Some(after) => task.prefetch(&batch[after.range.clone()]),
            None => {
                if let Some(first) = next_first {
                    task.prefetch(first);
                }
            }
        }
        seed_torch(run.run_seed, run.counters.global_step, (mi * plan.world + plan.rank) as u64);
        let (loss, d) = unwind_boundary(|| {
            let (loss, d) = task.loss(&batch[mb.range.clone()], run.counters.global_step)?;
            let scaled = loss * mb.loss_scale;
            let value = scaled.f_double_value(&[])?;
            oom_injection::reach_backward()?;
            task.backward(&scaled)?;
            task.after_backward()?;
            Ok((value, d))
        })?;
        loss_sum += loss;
        data_s += d;
    }
    Ok((loss_sum, data_s))
}

/// Runs `f` (a micro-batch's forward and backward, a validation) behind an unwind boundary: tch's infallible
/// ops panic on a libtorch error, so an out-of-memory there becomes
/// [`TrainError::OutOfMemory`] like one returned by a fallible op, with autograd's grad mode
/// restored (`tch::no_grad` and `with_grad` leave it changed when a panic crosses them). Any
/// other panic continues unwinding.
fn unwind_boundary<T>(f: impl FnOnce() -> Result<T, TrainError>) -> Result<T, TrainError> {
    quiet_recovered_panics();
    let grad_mode = set_grad_enabled(true);
    set_grad_enabled(grad_mode);
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| oom_injection::in_pass(f))) {
        Ok(result) => result,
        Err(payload) => {
            set_grad_enabled(grad_mode);
            match TrainError::from_panic(payload) {
                Ok(oom) => Err(oom),
                Err(payload) => std::panic::resume_unwind(payload),
            }
        }
    }
}

/// Installs (once) a panic hook that leaves out the message of an out-of-memory panic inside a
/// training pass (it is recovered, and the loop logs a warning) and hands every other panic to
/// the hook that was there.
fn quiet_recovered_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let oom = super::error::panic_text(info.payload()).is_some_and(super::error::says_out_of_memory);
            if !(oom && oom_injection::is_in_pass()) {
                previous(info);
            }
        }));
    });
}

/// Sets autograd's grad mode of this thread; returns the previous one.
fn set_grad_enabled(on: bool) -> bool {
    // SAFETY: sets a thread-local flag of libtorch; takes and returns plain ints.
    unsafe { torch_sys::at_grad_set_enabled(i32::from(on)) != 0 }
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
                points: h
                    .validation
                    .iter()
                    .zip(&epochs)
                    .filter_map(|(m, &e)| m.get(name).map(|v| (e as f64, *v)))
                    .collect(),
            })
            .collect(),
    }
}
