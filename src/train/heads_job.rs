//! Stage 1 of the reference design: the policy heads (sensor encoder + diffusion action expert)
//! trained on frozen VL features of the base model. The VL features are computed once per sample
//! (a feature cache that is never stale because the VL model does not change); [`HeadsTask`] is
//! the model side for the one training loop ([`runner`]), which brings AdamW + warmup/cosine +
//! clipping, exact resume, out-of-memory halving, best-checkpoint selection and publication.
//! Validation reports the DDIM action error in physical units; each new best and the last epoch
//! are published as verified deployable checkpoints (train::deploy). Stage 2 adds LoRA on the VL
//! model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::deploy::{
    DeployInfo, ProcessorSettings, DEPLOY_FILE, DEPLOY_FORMAT_VERSION, HEADS_FILE, STATS_FILE,
};
use crate::checkpoint::publish::{PublishItem, Published, Publisher, Source};
use crate::dataset::reader::Dataset;
use crate::dataset::store::Split;
use crate::dist::Group;
use crate::policy::config::PolicyConfig;
use crate::policy::heads::{CondInput, PolicyHeads, VlInput};
use crate::policy::normalize::NormStats;
use crate::policy::schedule::NoiseRng;
use crate::policy::sync_bn::backward_keep_graph;
use crate::sim::truth::EpisodeTruth;
use crate::train::action_error::{ActionAxes, DimError};
use crate::train::config::{ConfigError, Override, GROUP_HEADS};
use crate::train::controller::JobContext;
use crate::train::error::TrainError;
use crate::train::optim::{Accumulation, AdamWConfig, GroupConfig, NamedParam};
use crate::train::oracle::{self, ORACLE_DIM};
use crate::train::progress::{CacheStatus, Phase, ProgressEvent};
use crate::train::runner::{self, RunSummary, RunnerConfig, TrainTask};
use crate::train::state::derive_seed;
use crate::vlm::{Pooling, Qwen25VL, VlProcessor};

type Result<T> = std::result::Result<T, TrainError>;

pub use crate::train::action_error::BEST_METRIC;
/// DDIM steps of validation sampling (and of the deployed policy).
pub const DDIM_STEPS: usize = 10;

/// Loop and optimizer settings of stage 1 (`config/train_heads.yaml`; every key required there,
/// unknown keys are errors).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadsTrainConfig {
    /// Epochs.
    pub epochs: u64,
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate of the heads.
    pub lr: f64,
    /// Decoupled weight decay (not on biases and norms).
    pub weight_decay: f64,
    /// Global gradient-norm clip.
    pub grad_clip_norm: f64,
    /// Epochs of linear warmup (capped at `epochs`).
    pub warmup_epochs: u64,
    /// Cosine floor as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Validate every this many epochs (and after the last).
    pub val_every_epochs: u64,
    /// Seed of the order, noise and initialization.
    pub seed: u64,
    /// Sample rate of the sensor stream, Hz (the deployed sensor window is `samples / rate`).
    pub sensor_rate_hz: f64,
    /// Published versions kept in the checkpoints root (the latest and the best are never pruned).
    pub keep_versions: usize,
    /// Let `latest` move to a version worse on the same data than the one it named at the start.
    pub allow_worse_latest: bool,
    /// Under torchrun: seconds a collective may wait for the other ranks.
    pub distributed_timeout_s: u64,
    /// Which tokens' last hidden states the VL feature averages; Stage 2 and the deployed
    /// policy follow the stage-1 checkpoint's choice (deploy.json `pooling`). `all` when a file
    /// written before this key existed omits it.
    #[serde(default)]
    pub vl_pooling: Pooling,
}

impl Default for HeadsTrainConfig {
    /// The values of `config/train_heads.yaml`.
    fn default() -> Self {
        Self {
            epochs: 30,
            batch_size: 16,
            lr: 1e-3,
            weight_decay: 1e-4,
            grad_clip_norm: 1.0,
            warmup_epochs: 1,
            min_lr_ratio: 0.1,
            val_every_epochs: 1,
            seed: 0,
            sensor_rate_hz: 650.0,
            keep_versions: 5,
            allow_worse_latest: false,
            distributed_timeout_s: 1800,
            vl_pooling: Pooling::All,
        }
    }
}

impl HeadsTrainConfig {
    /// Reads `path` (or the defaults when None), applies `overrides` (keys without a section)
    /// and validates.
    pub fn load(path: Option<&Path>, overrides: &[Override]) -> std::result::Result<Self, ConfigError> {
        let (mut doc, origin) = match path {
            Some(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|source| ConfigError::Io { path: p.to_path_buf(), source })?;
                let doc: serde_yaml::Value = serde_yaml::from_str(&text)
                    .map_err(|e| ConfigError::Parse { origin: p.display().to_string(), reason: e.to_string() })?;
                (doc, p.display().to_string())
            }
            None => (serde_yaml::to_value(Self::default()).expect("the defaults serialize"), "defaults".to_string()),
        };
        for o in overrides {
            o.apply(&mut doc)?;
        }
        // The error names the key whose value is wrong (a missing key names itself).
        let cfg: Self = serde_path_to_error::deserialize(doc).map_err(|e| {
            let reason = match e.path().to_string().as_str() {
                "." => e.inner().to_string(),
                key => format!("key `{key}`: {}", e.inner()),
            };
            ConfigError::Parse { origin, reason }
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value's range; the error names the key.
    pub fn validate(&self) -> std::result::Result<(), ConfigError> {
        let bad =
            |key: &str, reason: &str| Err(ConfigError::Invalid { key: key.to_string(), reason: reason.to_string() });
        let finite_pos = |v: f64| v > 0.0 && v.is_finite();
        if self.epochs == 0 {
            return bad("epochs", "must be >= 1");
        }
        if self.batch_size == 0 {
            return bad("batch_size", "must be >= 1");
        }
        if !(self.lr >= 0.0 && self.lr.is_finite()) {
            return bad("lr", "must be finite and >= 0");
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay.is_finite()) {
            return bad("weight_decay", "must be finite and >= 0");
        }
        if !finite_pos(self.grad_clip_norm) {
            return bad("grad_clip_norm", "must be positive");
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return bad("min_lr_ratio", "must be in [0, 1]");
        }
        if self.val_every_epochs == 0 {
            return bad("val_every_epochs", "must be >= 1");
        }
        if !finite_pos(self.sensor_rate_hz) {
            return bad("sensor_rate_hz", "must be positive");
        }
        if self.keep_versions == 0 {
            return bad("keep_versions", "must be >= 1");
        }
        Ok(())
    }

    /// Fraction of the optimizer steps in warmup (`warmup_epochs / epochs`, at most 1).
    pub fn warmup_ratio(&self) -> f64 {
        (self.warmup_epochs as f64 / self.epochs as f64).min(1.0)
    }
}

/// What to train.
#[derive(Debug, Clone)]
pub struct HeadsJob {
    /// Compiled dataset folder.
    pub dataset: PathBuf,
    /// Base VL model folder (Hugging Face layout).
    pub base_model: PathBuf,
    /// Root of published checkpoints.
    pub checkpoints: PathBuf,
    /// Folder for the job's own files: heads weights before publication, the resumable state
    /// (`state/`) and the curves plot (`curves.png`).
    pub work_dir: PathBuf,
    /// Loop and optimizer settings.
    pub train: HeadsTrainConfig,
    /// Heads sizes; the input/output sizes are taken from the dataset and the VL model.
    pub heads: PolicyConfig,
    /// Continue from `<work_dir>/state/latest.safetensors` when it exists.
    pub resume: bool,
    /// The data-parallel group this process is a rank of (None: one process): the features are
    /// computed once over the ranks, and BatchNorm normalises with every rank's batch.
    pub group: Option<Arc<Group>>,
}

impl HeadsJob {
    /// The resumable state folder.
    pub fn state_dir(&self) -> PathBuf {
        self.work_dir.join("state")
    }
}

/// What a stage-1 job produced.
#[derive(Debug)]
pub struct HeadsResult {
    /// The loop's summary (counters, validation per epoch, published versions, cancelled).
    pub run: RunSummary,
    /// Validation action error before training, in training-set stds ([`ActionAxes`]).
    pub val_action_error_before: f64,
    /// The same after the last validated epoch (None when none was validated).
    pub val_action_error_after: Option<f64>,
    /// Per action dimension before training (physical units).
    pub val_error_before: Vec<DimError>,
    /// The same after the last validated epoch (empty when none was validated).
    pub val_error_after: Vec<DimError>,
    /// The ablation of the conditioning: the final heads' validation error (training-set stds)
    /// when each validation sample gets the VL features (or, for the oracle, the ground truth)
    /// of another sample ([`swap_conditioning`]). Near [`Self::val_action_error_after`]: the
    /// heads act without reading them. None when cancelled or nothing was validated.
    pub val_action_error_conditioning_swapped: Option<f64>,
    /// Train / validation sample counts.
    pub samples: (usize, usize),
    /// The checkpoint of the last epoch, verified (None when cancelled before the end); not
    /// `latest` when worse than the version `latest` named at the start (see
    /// [`HeadsTrainConfig::allow_worse_latest`]).
    pub published: Option<Published>,
}

/// Small heads for CPU runs: the reference structure with reduced widths.
pub fn small_heads() -> PolicyConfig {
    let mut cfg = PolicyConfig::default();
    cfg.sensor.conv_channels = vec![64, 64];
    cfg.sensor.d_model = 64;
    cfg.sensor.n_heads = 4;
    cfg.sensor.n_layers = 1;
    cfg.sensor.ff_dim = 128;
    cfg.sensor.out_dim = 64;
    cfg.expert.d_model = 128;
    cfg.expert.n_heads = 4;
    cfg.expert.n_layers = 2;
    cfg.expert.ff_dim = 256;
    cfg
}

/// Runs (or, with `job.resume`, continues) stage 1. `ctx` receives progress and may cancel
/// between optimizer steps; `on_publish` is called after each publication that `latest` names.
pub fn run(job: &HeadsJob, ctx: &JobContext, on_publish: &mut dyn FnMut(&Published)) -> Result<HeadsResult> {
    run_conditioned(job, ctx, on_publish, None)
}

/// The oracle floor ([`oracle`]): `job`'s heads and settings trained on its dataset with the
/// simulator's ground truth of `truth` as their conditioning instead of VL features. Its base
/// model is not read, nothing is published, its state goes to `<work_dir>/state`.
pub fn run_oracle(job: &HeadsJob, truth: &[EpisodeTruth], ctx: &JobContext) -> Result<HeadsResult> {
    run_conditioned(job, ctx, &mut |_| {}, Some(truth))
}

fn run_conditioned(
    job: &HeadsJob,
    ctx: &JobContext,
    on_publish: &mut dyn FnMut(&Published),
    truth: Option<&[EpisodeTruth]>,
) -> Result<HeadsResult> {
    job.train.validate()?;
    ctx.progress.publish(ProgressEvent::new(&ctx.job_id, Phase::Preparing));
    let mut task = HeadsTask::conditioned(job, ctx, truth)?;
    let deployable = task.deploy.is_some();
    let val_error_before = task.validation_error()?;
    let t = &job.train;
    let cfg = RunnerConfig {
        epochs: t.epochs,
        accumulation: Accumulation::new(t.batch_size, 1)?,
        adamw: AdamWConfig::default(),
        groups: vec![GroupConfig { name: GROUP_HEADS.into(), lr: t.lr, weight_decay: t.weight_decay }],
        warmup_ratio: t.warmup_ratio(),
        min_lr_ratio: t.min_lr_ratio,
        grad_clip_norm: t.grad_clip_norm,
        seed: t.seed,
        best_metric: BEST_METRIC.into(),
        val_every_epochs: t.val_every_epochs,
        state_dir: job.state_dir(),
        resume: job.resume,
        publish_dir: deployable.then(|| job.checkpoints.clone()),
        allow_worse_latest: t.allow_worse_latest,
        base_model_id: task.deploy.as_ref().map(|d| d.base_model_id.clone()).unwrap_or_default(),
        plot_file: Some(job.work_dir.join("curves.png")),
        group: job.group.clone(),
    };
    let summary = runner::run(&mut task, &cfg, ctx, on_publish)?;
    let published = match summary.published.last() {
        Some(v) if deployable && !summary.cancelled => {
            runner::prune_published(&job.checkpoints, t.keep_versions, &summary)?;
            Some(Publisher::new(&job.checkpoints)?.published(v)?)
        }
        _ => None,
    };
    let swapped = match summary.validation.last() {
        Some(_) if !summary.cancelled => {
            let features = swap_conditioning(&task.features, &task.val_idx);
            let e = validation_error(&task.heads, &task.ds, &task.val_idx, &features, task.seed, task.val_chunk)?;
            Some(task.axes.normalized(&e))
        }
        _ => None,
    };
    let axes = &task.axes;
    let after = summary.validation.last().map(|m| axes.per_dim(m)).unwrap_or_default();
    Ok(HeadsResult {
        val_action_error_before: axes.normalized(&val_error_before),
        val_action_error_after: summary.validation.last().and_then(|m| m.get(BEST_METRIC).copied()),
        val_error_before: axes.report(&val_error_before),
        val_error_after: axes.report(&after),
        val_action_error_conditioning_swapped: swapped,
        run: summary,
        samples: (task.train_idx.len(), task.val_idx.len()),
        published,
    })
}

/// The heads' trainable parameters for the optimizer, named `{prefix}{variable}`, the sensor
/// encoder's in `sensor_group` and the rest in `expert_group`, each with the heads' own decay flag
/// (no decay on biases, norms, BatchNorm and positional embeddings).
pub fn heads_params(heads: &PolicyHeads, prefix: &str, sensor_group: &str, expert_group: &str) -> Vec<NamedParam> {
    let g = heads.param_groups();
    let mut out = Vec::new();
    for (params, group) in [(g.sensor_encoder, sensor_group), (g.action_expert, expert_group)] {
        out.extend(params.into_iter().map(|p| NamedParam {
            name: format!("{prefix}{}", p.name),
            group: group.into(),
            tensor: p.tensor,
            decay: p.decay,
        }));
    }
    out
}

/// Stage 1's model side: fresh heads on features of the frozen base model, computed once.
pub struct HeadsTask {
    ds: Dataset,
    axes: ActionAxes,
    dataset_dir: PathBuf,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    /// Pooled VL features `[1, hidden]` of every sample.
    features: Vec<Tensor>,
    heads: PolicyHeads,
    /// None for the oracle (not deployable).
    deploy: Option<DeployInfo>,
    seed: u64,
    /// Validation samples per chunk (the training batch).
    val_chunk: usize,
    work_dir: PathBuf,
}

impl HeadsTask {
    /// Opens the dataset, computes the VL features of every sample with the base model (CPU,
    /// f32) and builds fresh heads (initialized from `job.train.seed`) sized to the dataset and
    /// the model.
    pub fn new(job: &HeadsJob, ctx: &JobContext) -> Result<Self> {
        Self::conditioned(job, ctx, None)
    }

    /// [`Self::new`], or with `truth`, the oracle: heads conditioned on the simulator's ground
    /// truth ([`oracle::conditioning`]) instead of VL features; the base model is not read and
    /// nothing can be deployed.
    fn conditioned(job: &HeadsJob, ctx: &JobContext, truth: Option<&[EpisodeTruth]>) -> Result<Self> {
        tch::manual_seed(job.train.seed as i64);
        let ds = Dataset::open(&job.dataset)?;
        let (train_idx, val_idx) = (ds.split_indices(Split::Train), ds.split_indices(Split::Val));
        if train_idx.is_empty() || val_idx.is_empty() {
            return Err(TrainError::invalid(
                format!("dataset `{}`", job.dataset.display()),
                format!("{} train / {} validation samples; both must be non-empty", train_idx.len(), val_idx.len()),
            ));
        }
        let (features, vl_dim, deploy) = match truth {
            Some(t) => (oracle::conditioning(&ds, t)?, ORACLE_DIM, None),
            None => {
                let (features, deploy) = vl_features(job, ctx, &ds)?;
                (features, deploy.1, Some(deploy.0))
            }
        };
        let [t_len, channels] = ds.index.sensor_shape;
        let [horizon, action_dim] = ds.index.action_shape;
        let mut cfg = job.heads.clone();
        cfg.vl_dim = vl_dim as i64;
        cfg.state_dim = 0;
        cfg.sensor.window = t_len as i64;
        cfg.sensor.in_channels = channels as i64;
        cfg.expert.horizon = horizon as i64;
        cfg.expert.action_dim = action_dim as i64;
        let mut heads = PolicyHeads::new(cfg, NormStats::from_dataset(&ds.stats, 0), Device::Cpu)?;
        heads.set_batch_norm_sync(job.group.clone());
        Ok(Self {
            axes: ActionAxes::from_dataset(&ds),
            ds,
            dataset_dir: job.dataset.clone(),
            train_idx,
            val_idx,
            features,
            heads,
            deploy,
            seed: job.train.seed,
            val_chunk: job.train.batch_size,
            work_dir: job.work_dir.clone(),
        })
    }

    /// Mean absolute DDIM action error per action dimension of the current heads on the
    /// validation split (physical units).
    pub fn validation_error(&self) -> Result<Vec<f64>> {
        validation_error(&self.heads, &self.ds, &self.val_idx, &self.features, self.seed, self.val_chunk)
    }

    /// The sensor encoder's BatchNorm running statistics (the heads' non-trainable variables).
    fn buffers(&self) -> BTreeMap<String, Tensor> {
        self.heads.var_store().variables().into_iter().filter(|(_, t)| !t.requires_grad()).collect()
    }
}

/// The pooled VL features `[1, hidden]` of every sample of `ds` with the frozen base model (CPU,
/// f32; data-parallel: each rank computes its share), the deployment settings and the hidden size.
fn vl_features(job: &HeadsJob, ctx: &JobContext, ds: &Dataset) -> Result<(Vec<Tensor>, (DeployInfo, usize))> {
    check_model_dir(&job.base_model)?;
    let vl_config = crate::vlm::Config::from_file(&job.base_model.join("config.json"))?;
    let vlm = Qwen25VL::load(&job.base_model, Kind::Float, Device::Cpu)?;
    let processor = VlProcessor::from_model_dir(&job.base_model, &vl_config, None, None)?;
    let mut building = ProgressEvent::new(&ctx.job_id, Phase::BuildingCache);
    building.cache.building = true;
    ctx.progress.publish(building);
    let (rank, world) = job.group.as_ref().map_or((0, 1), |g| (g.rank(), g.world_size()));
    let hidden = vl_config.text.hidden_size;
    let mut features = Vec::with_capacity(ds.len());
    for i in 0..ds.len() {
        if i % world != rank {
            features.push(Tensor::zeros([1, hidden], (Kind::Float, Device::Cpu)));
            continue;
        }
        let s = ds.sample(i)?;
        let batch = processor.collate(&[processor.sample(&s.images, &s.instruction)?])?;
        let f = tch::no_grad(|| vlm.forward(&batch, false))?;
        features.push(f.pooled(job.train.vl_pooling)?.detach());
    }
    if let Some(g) = &job.group {
        // Each rank computed its share (the others are zeros): the sum is every feature.
        let mut all = [Tensor::cat(&features, 0)];
        g.all_reduce(&mut all, crate::dist::ReduceOp::Sum)?;
        features = all[0].split(1, 0);
    }
    let [t_len, channels] = ds.index.sensor_shape;
    let [horizon, action_dim] = ds.index.action_shape;
    let deploy = DeployInfo {
        format_version: DEPLOY_FORMAT_VERSION,
        base_model_id: crate::checkpoint::model_id::base_model_id(&job.base_model)?,
        adapter: None,
        cameras: ds.index.cameras.iter().map(|c| c.name.clone()).collect(),
        processor: ProcessorSettings { min_pixels: processor.image.min_pixels, max_pixels: processor.image.max_pixels },
        pooling: job.train.vl_pooling.name().into(),
        sensor_channels: channels,
        sensor_window: t_len,
        sensor_window_s: t_len as f64 / job.train.sensor_rate_hz,
        state_dim: 0,
        horizon,
        action_dim,
        step_period_s: 1.0 / ds.index.control_hz,
        ddim_steps: DDIM_STEPS,
        dtype: "f32".into(),
    };
    Ok((features, (deploy, hidden as usize)))
}

/// A tensor's shape and values in the task state.
#[derive(Serialize, Deserialize)]
struct SavedBuffer {
    shape: Vec<i64>,
    values: Vec<f32>,
}

impl TrainTask for HeadsTask {
    fn params(&mut self) -> Vec<NamedParam> {
        heads_params(&self.heads, "", GROUP_HEADS, GROUP_HEADS)
    }

    fn train_len(&self) -> usize {
        self.train_idx.len()
    }

    fn begin_epoch(&mut self, _epoch: u64, _chunk: usize) -> Result<Phase> {
        Ok(Phase::Training)
    }

    /// Diffusion loss; each sample's noise derives from (seed, optimizer step, sample index), so
    /// it does not depend on how a step is split into micro-batches.
    fn loss(&mut self, samples: &[usize], global_step: u64) -> Result<(Tensor, f64)> {
        let t0 = Instant::now();
        let idx: Vec<usize> = samples.iter().map(|&k| self.train_idx[k]).collect();
        // Sensor and action only: the VL features are precomputed, no image is decoded.
        let (sensor, actions) = self.ds.sensor_action(&idx)?;
        let vl =
            VlInput::pooled(Tensor::cat(&idx.iter().map(|&i| self.features[i].shallow_clone()).collect::<Vec<_>>(), 0));
        let (sensor, actions) = (sensor.to_tensor(), actions.to_tensor());
        let data_s = t0.elapsed().as_secs_f64();
        let seeds: Vec<u64> = idx.iter().map(|&i| derive_seed(self.seed, &[global_step, i as u64])).collect();
        let loss = self.heads.loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &actions, &seeds, true)?;
        if let Some(e) = self.heads.batch_norm_sync().and_then(|s| s.take_error()) {
            return Err(e.into());
        }
        Ok((loss, data_s))
    }

    fn validate(&mut self, _epoch: u64, chunk: usize) -> Result<BTreeMap<String, f64>> {
        Ok(self.axes.metrics(&validation_error(
            &self.heads,
            &self.ds,
            &self.val_idx,
            &self.features,
            self.seed,
            chunk,
        )?))
    }

    /// With synchronised BatchNorm, the backward keeps its graph for the pass through the
    /// global statistics.
    fn backward(&mut self, loss: &Tensor) -> Result<()> {
        let Some(sync) = self.heads.batch_norm_sync() else { return Ok(loss.f_backward()?) };
        backward_keep_graph(loss).map_err(|e| TrainError::invalid("stage-1 backward", e))?;
        Ok(sync.complete_backward()?)
    }

    fn idle_pass(&mut self) -> Result<()> {
        Ok(self.heads.batch_norm_idle_pass()?)
    }

    fn discard_pass(&mut self) {
        if let Some(sync) = self.heads.batch_norm_sync() {
            sync.discard_pass();
        }
    }

    fn deployable(&mut self) -> Result<Vec<PublishItem>> {
        let deploy = self
            .deploy
            .as_ref()
            .ok_or_else(|| TrainError::invalid("oracle heads", "conditioned on simulator truth: not deployable"))?;
        std::fs::create_dir_all(&self.work_dir).map_err(TrainError::io("create folder", &self.work_dir))?;
        let heads_path = self.work_dir.join(HEADS_FILE);
        self.heads.save(&heads_path, crate::policy::heads_file::CheckpointStage::Stage1, BTreeMap::new())?;
        Ok(vec![
            PublishItem { dest: HEADS_FILE.into(), source: Source::File(heads_path) },
            PublishItem { dest: DEPLOY_FILE.into(), source: Source::Bytes(deploy.to_json().into_bytes()) },
            PublishItem { dest: STATS_FILE.into(), source: Source::File(self.dataset_dir.join(STATS_FILE)) },
        ])
    }

    /// The BatchNorm running statistics (not optimizer parameters, so not in the optimizer's
    /// part of the state), for an exact resume.
    fn cache_state(&self) -> serde_json::Value {
        let saved: BTreeMap<String, SavedBuffer> = self
            .buffers()
            .into_iter()
            .map(|(name, t)| {
                let values = Vec::<f32>::try_from(t.detach().to_kind(Kind::Float).flatten(0, -1))
                    .expect("a CPU float buffer converts");
                (name, SavedBuffer { shape: t.size(), values })
            })
            .collect();
        serde_json::json!({ "buffers": saved })
    }

    fn restore_cache_state(&mut self, state: &serde_json::Value) -> Result<()> {
        let bad = |reason: String| TrainError::invalid("stage-1 task state", reason);
        let saved: BTreeMap<String, SavedBuffer> =
            serde_json::from_value(state["buffers"].clone()).map_err(|e| bad(format!("`buffers`: {e}")))?;
        let mut buffers = self.buffers();
        if saved.len() != buffers.len() {
            return Err(bad(format!("{} buffers saved, the heads have {}", saved.len(), buffers.len())));
        }
        for (name, s) in saved {
            let t = buffers.get_mut(&name).ok_or_else(|| bad(format!("buffer `{name}` is not in the heads")))?;
            if t.size() != s.shape {
                return Err(bad(format!("buffer `{name}`: saved shape {:?}, the heads have {:?}", s.shape, t.size())));
            }
            let src = Tensor::from_slice(&s.values).reshape(s.shape.as_slice()).to_kind(t.kind());
            tch::no_grad(|| t.f_copy_(&src))?;
        }
        Ok(())
    }

    fn cache_status(&self) -> CacheStatus {
        CacheStatus {
            mode: "features".into(),
            entries: self.features.len() as u64,
            hit_rate: 1.0,
            ..Default::default()
        }
    }
}

/// Stream of the per-sample DDIM start noise of validation.
const VAL_NOISE_STREAM: u64 = 0x5641_4c4e; // "VALN"

/// The DDIM start noise `[1, H, A]` of dataset sample `i` in a validation pass seeded `seed`:
/// per sample, so a pass's result does not depend on how it is chunked.
pub fn validation_noise(heads: &PolicyHeads, seed: u64, i: usize) -> Tensor {
    let e = &heads.config().expert;
    NoiseRng::new(derive_seed(seed, &[VAL_NOISE_STREAM, i as u64])).randn(&[1, e.horizon, e.action_dim], heads.device())
}

/// Running sums of a validation pass taken in chunks: the absolute DDIM action error per action
/// dimension (physical units) and, optionally, the diffusion loss with fixed per-sample noise.
#[derive(Debug, Default)]
pub struct ValidationSums {
    abs_err: Vec<f64>,
    loss: f64,
    samples: usize,
    horizon: usize,
}

impl ValidationSums {
    /// Adds the samples `idx` with their pooled VL features `vl [n, hidden]`, reading only their
    /// sensor windows and action chunks (no image is decoded). With `loss_stream`, their
    /// diffusion loss too, with sample `i`'s noise from `derive_seed(seed, [loss_stream, i])`.
    pub fn add(
        &mut self,
        heads: &PolicyHeads,
        ds: &Dataset,
        idx: &[usize],
        vl: &Tensor,
        seed: u64,
        loss_stream: Option<u64>,
    ) -> Result<()> {
        let (sensor, action) = ds.sensor_action(idx)?;
        let dev = heads.device();
        let (sensor, action) = (sensor.to_tensor().to_device(dev), action.to_tensor().to_device(dev));
        let vl = VlInput::pooled(vl.to_device(dev));
        let c = CondInput { vl: &vl, sensor: &sensor, state: None };
        let x_t = Tensor::cat(&idx.iter().map(|&i| validation_noise(heads, seed, i)).collect::<Vec<_>>(), 0);
        let pred = heads.sample_from(&c, x_t, DDIM_STEPS, 0.0, &mut NoiseRng::new(seed))?;
        let err = Vec::<f64>::try_from((pred - &action).abs().sum_dim_intlist(&[0i64, 1][..], false, Kind::Double))?;
        self.abs_err.resize(err.len(), 0.0);
        self.abs_err.iter_mut().zip(&err).for_each(|(s, e)| *s += e);
        if let Some(stream) = loss_stream {
            let seeds: Vec<u64> = idx.iter().map(|&i| derive_seed(seed, &[stream, i as u64])).collect();
            let loss = tch::no_grad(|| heads.loss(&c, &action, &seeds, false))?;
            self.loss += loss.f_double_value(&[])? * idx.len() as f64;
        }
        self.samples += idx.len();
        self.horizon = action.size()[1] as usize;
        Ok(())
    }

    /// Mean absolute action error per action dimension over the samples added.
    pub fn errors(&self) -> Vec<f64> {
        let n = (self.samples * self.horizon).max(1) as f64;
        self.abs_err.iter().map(|e| e / n).collect()
    }

    /// Mean diffusion loss over the samples added (with a `loss_stream`).
    pub fn loss(&self) -> f64 {
        self.loss / self.samples.max(1) as f64
    }
}

/// Mean absolute DDIM action error per action dimension over `val`, in physical units, in chunks
/// of `chunk` samples; `features` holds the pooled VL features `[1, hidden]` of every dataset
/// sample. Each sample's start noise derives from `seed` and its index ([`validation_noise`]).
pub fn validation_error(
    heads: &PolicyHeads,
    ds: &Dataset,
    val: &[usize],
    features: &[Tensor],
    seed: u64,
    chunk: usize,
) -> Result<Vec<f64>> {
    let mut sums = ValidationSums::default();
    for idx in val.chunks(chunk.max(1)) {
        let vl = Tensor::cat(&idx.iter().map(|&i| features[i].shallow_clone()).collect::<Vec<_>>(), 0);
        sums.add(heads, ds, idx, &vl, seed, None)?;
    }
    Ok(sums.errors())
}

/// `features` with each validation sample's entry replaced by that of the validation sample
/// half the split further on (wrapping): split order keeps an episode's samples together, so with
/// two or more validation episodes most samples get another scene's conditioning.
pub fn swap_conditioning(features: &[Tensor], val: &[usize]) -> Vec<Tensor> {
    let mut out: Vec<Tensor> = features.iter().map(Tensor::shallow_clone).collect();
    for (k, &i) in val.iter().enumerate() {
        out[i] = features[val[(k + val.len() / 2) % val.len()]].shallow_clone();
    }
    out
}

/// Whether `dir` looks like a base Qwen2.5-VL model folder: a config.json that parses as one,
/// tokenizer.json, weights.
pub fn check_model_dir(dir: &Path) -> Result<()> {
    let missing = |what: &str| Err(TrainError::invalid(dir.display().to_string(), format!("no {what}")));
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            return missing(f);
        }
    }
    crate::vlm::config::Config::from_file(&dir.join("config.json"))
        .map_err(|e| TrainError::invalid(dir.display().to_string(), format!("not a Qwen2.5-VL model: {e}")))?;
    if !dir.join("model.safetensors").is_file() && !dir.join("model.safetensors.index.json").is_file() {
        return missing("model.safetensors or model.safetensors.index.json");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_file_holds_the_defaults_and_overrides_name_bad_keys() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/train_heads.yaml");
        assert_eq!(HeadsTrainConfig::load(Some(&path), &[]).unwrap(), HeadsTrainConfig::default());
        let set = |specs: &[&str]| specs.iter().map(|s| s.parse().unwrap()).collect::<Vec<Override>>();
        let c = HeadsTrainConfig::load(None, &set(&["weight_decay=0.01", "epochs=4"])).unwrap();
        assert_eq!((c.weight_decay, c.epochs, c.grad_clip_norm), (0.01, 4, 1.0));
        assert_eq!(c.warmup_ratio(), 0.25);
        let e = HeadsTrainConfig::load(None, &set(&["clip=2"])).unwrap_err().to_string();
        assert!(e.contains("no key `clip`"), "{e}");
        let e = HeadsTrainConfig::load(None, &set(&["sensor_rate_hz=0"])).unwrap_err().to_string();
        assert!(e.contains("sensor_rate_hz") && e.contains("positive"), "{e}");
        let c = HeadsTrainConfig::load(None, &set(&["vl_pooling=last"])).unwrap();
        assert_eq!(c.vl_pooling, Pooling::Last);
        let e = HeadsTrainConfig::load(None, &set(&["vl_pooling=mean"])).unwrap_err().to_string();
        assert!(e.contains("vl_pooling") && e.contains("`last`"), "{e}");
        // A file written before `vl_pooling` existed reads as `all`.
        let older = tempfile::NamedTempFile::new().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\nvl_pooling: all\n"));
        std::fs::write(older.path(), text.replace("\nvl_pooling: all\n", "\n")).unwrap();
        assert_eq!(HeadsTrainConfig::load(Some(older.path()), &[]).unwrap().vl_pooling, Pooling::All);
    }
}
