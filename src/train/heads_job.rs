//! Fine-tuning of the policy heads (sensor encoder + diffusion action expert) on frozen VL
//! features of the base model: VL features are computed once per sample (a feature cache that is
//! never stale because the VL model does not change), the heads train with AdamW + warmup/cosine
//! + clipping, validation reports the DDIM action error in physical units, and the result is
//! published as a verified deployable checkpoint (train::deploy). This is stage 1 of the
//! reference design; Stage 2 adds LoRA on the VL model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::dataset::reader::Dataset;
use crate::dataset::store::Split;
use crate::policy::config::PolicyConfig;
use crate::policy::heads::{CondInput, PolicyHeads, VlFeatures};
use crate::policy::normalize::NormStats;
use crate::train::controller::JobContext;
use crate::train::deploy::{DeployInfo, ProcessorSettings, DEPLOY_FILE, DEPLOY_FORMAT_VERSION, HEADS_FILE, STATS_FILE};
use crate::train::optim::{AdamW, AdamWConfig, CosineSchedule, GroupConfig, NamedParam};
use crate::train::progress::{Phase, ProgressEvent};
use crate::train::publish::{verify, PublishItem, PublishRequest, Published, Publisher, Source};
use crate::vlm::{Pooling, Qwen25VL, VlProcessor};

/// What to train.
#[derive(Debug, Clone)]
pub struct HeadsJob {
    /// Compiled dataset folder.
    pub dataset: PathBuf,
    /// Base VL model folder (Hugging Face layout).
    pub base_model: PathBuf,
    /// Root of published checkpoints.
    pub checkpoints: PathBuf,
    /// Folder for the job's own files (heads weights before publication).
    pub work_dir: PathBuf,
    /// Epochs.
    pub epochs: usize,
    /// Samples per optimizer step.
    pub batch_size: usize,
    /// Peak learning rate of the heads.
    pub lr: f64,
    /// Seed of the order, noise and initialization.
    pub seed: u64,
    /// Heads sizes; the input/output sizes are taken from the dataset and the VL model.
    pub heads: PolicyConfig,
}

/// What a finished job produced.
#[derive(Debug)]
pub struct HeadsResult {
    /// Mean absolute validation action error per action dimension before training (physical units).
    pub val_error_before: Vec<f64>,
    /// The same after training.
    pub val_error_after: Vec<f64>,
    /// Mean training loss per epoch.
    pub train_loss: Vec<f64>,
    /// Train / validation sample counts.
    pub samples: (usize, usize),
    /// The published checkpoint (None when cancelled before the end).
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

fn emit(ctx: Option<&JobContext>, phase: Phase, f: impl FnOnce(&mut ProgressEvent)) {
    if let Some(ctx) = ctx {
        let mut ev = ProgressEvent::new(ctx.job_id.clone(), phase);
        f(&mut ev);
        ctx.progress.publish(ev);
    }
}

/// Runs the job; `ctx` (from the job controller) receives progress and may cancel between steps.
pub fn run(job: &HeadsJob, ctx: Option<&JobContext>) -> Result<HeadsResult> {
    tch::manual_seed(job.seed as i64);
    emit(ctx, Phase::Preparing, |_| {});
    let ds = Dataset::open(&job.dataset)?;
    let (train_idx, val_idx) = (ds.split_indices(Split::Train), ds.split_indices(Split::Val));
    if train_idx.is_empty() || val_idx.is_empty() {
        return Err(anyhow!(
            "{}: {} train / {} validation samples; both must be non-empty",
            job.dataset.display(),
            train_idx.len(),
            val_idx.len()
        ));
    }
    let vl_config = crate::vlm::Config::from_file(&job.base_model.join("config.json"))?;
    let vlm = Qwen25VL::load(&job.base_model, Kind::Float, Device::Cpu)?;
    let processor = VlProcessor::from_model_dir(&job.base_model, &vl_config, None, None)?;
    emit(ctx, Phase::BuildingCache, |e| e.cache.building = true);
    let mut features = Vec::with_capacity(ds.len());
    for i in 0..ds.len() {
        let s = ds.sample(i)?;
        let batch = processor.collate(&[processor.sample(&s.images, &s.instruction)?])?;
        let f = tch::no_grad(|| vlm.forward(&batch, false))?;
        features.push(f.pooled(Pooling::All)?.detach());
    }

    let [t_len, channels] = ds.index.sensor_shape;
    let [horizon, action_dim] = ds.index.action_shape;
    let mut cfg = job.heads.clone();
    cfg.vl_dim = vl_config.text.hidden_size;
    cfg.state_dim = 0;
    cfg.sensor.window = t_len as i64;
    cfg.sensor.in_channels = channels as i64;
    cfg.expert.horizon = horizon as i64;
    cfg.expert.action_dim = action_dim as i64;
    let heads = PolicyHeads::new(cfg, NormStats::from_dataset(&ds.stats, 0), Device::Cpu)?;
    let val_error_before = validation_error(&heads, &ds, &val_idx, &features, job.seed)?;
    let groups = heads.param_groups();
    let params: Vec<NamedParam> = groups
        .sensor_encoder
        .into_iter()
        .chain(groups.action_expert)
        .map(|p| NamedParam { name: p.name, group: "heads".into(), tensor: p.tensor })
        .collect();
    let mut opt = AdamW::new(AdamWConfig::default(), vec![GroupConfig { name: "heads".into(), lr: job.lr, weight_decay: 1e-4 }], params)?;
    let steps_per_epoch = train_idx.len().div_ceil(job.batch_size);
    let total = (steps_per_epoch * job.epochs) as u64;
    let schedule = CosineSchedule { warmup_steps: steps_per_epoch as u64, total_steps: total, min_lr_ratio: 0.1 };
    let mut train_loss = Vec::new();
    let mut step = 0u64;
    for epoch in 0..job.epochs {
        let order = crate::train::state::epoch_order(job.seed, epoch as u64, train_idx.len());
        let mut epoch_loss = 0.0;
        for chunk in order.chunks(job.batch_size) {
            if ctx.is_some_and(|c| c.cancel.is_cancelled()) {
                return Ok(HeadsResult { val_error_before, val_error_after: Vec::new(), train_loss, samples: (train_idx.len(), val_idx.len()), published: None });
            }
            let idx: Vec<usize> = chunk.iter().map(|&k| train_idx[k]).collect();
            let b = ds.batch(&idx)?;
            let vl = VlFeatures::pooled(Tensor::cat(&idx.iter().map(|&i| features[i].shallow_clone()).collect::<Vec<_>>(), 0));
            let (sensor, actions) = (b.sensor.to_tensor(), b.action.to_tensor());
            let seeds: Vec<u64> = idx.iter().map(|&i| crate::train::state::derive_seed(job.seed, &[step, i as u64])).collect();
            opt.zero_grad();
            let loss = heads.loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &actions, &seeds, true)?;
            loss.backward();
            opt.clip_grad_norm(1.0)?;
            let factor = schedule.factor(step);
            opt.step(factor)?;
            let l = loss.double_value(&[]);
            epoch_loss += l * idx.len() as f64;
            step += 1;
            emit(ctx, Phase::Training, |e| {
                (e.epoch, e.total_epochs, e.step, e.total_steps) = (epoch as u64, job.epochs as u64, step, total);
                (e.loss, e.lr) = (Some(l), Some(job.lr * factor));
                e.cache.mode = "features".into();
                e.cache.entries = features.len() as u64;
                e.cache.hit_rate = 1.0;
            });
        }
        train_loss.push(epoch_loss / train_idx.len() as f64);
    }
    emit(ctx, Phase::Validating, |_| {});
    let val_error_after = validation_error(&heads, &ds, &val_idx, &features, job.seed)?;

    emit(ctx, Phase::Publishing, |_| {});
    std::fs::create_dir_all(&job.work_dir)?;
    let heads_path = job.work_dir.join(HEADS_FILE);
    heads.save(&heads_path, crate::policy::checkpoint::CheckpointStage::Stage1, BTreeMap::new())?;
    let base_model_id = base_model_id(&job.base_model)?;
    let deploy = DeployInfo {
        format_version: DEPLOY_FORMAT_VERSION,
        base_model_id: base_model_id.clone(),
        adapter: None,
        cameras: ds.index.cameras.iter().map(|c| c.name.clone()).collect(),
        processor: ProcessorSettings { min_pixels: processor.image.min_pixels, max_pixels: processor.image.max_pixels },
        pooling: "all".into(),
        sensor_channels: channels,
        sensor_window: t_len,
        sensor_window_s: t_len as f64 / 650.0,
        state_dim: 0,
        horizon,
        action_dim,
        step_period_s: 1.0 / ds.index.control_hz,
        ddim_steps: 10,
        dtype: "f32".into(),
    };
    let mut metrics = BTreeMap::new();
    metrics.insert("val_action_error".to_string(), mean(&val_error_after));
    for (d, e) in val_error_after.iter().enumerate() {
        metrics.insert(format!("val_action_error/dim{d}"), *e);
    }
    let published = Publisher::new(&job.checkpoints)?.publish(&PublishRequest {
        base_model_id,
        metrics,
        info: json!({"stage": 1, "epoch": job.epochs, "global_step": step}),
        items: vec![
            PublishItem { dest: HEADS_FILE.into(), source: Source::File(heads_path) },
            PublishItem { dest: DEPLOY_FILE.into(), source: Source::Bytes(deploy.to_json().into_bytes()) },
            PublishItem { dest: STATS_FILE.into(), source: Source::File(job.dataset.join("stats.json")) },
        ],
    })?;
    verify(&published.dir)?;
    Ok(HeadsResult { val_error_before, val_error_after, train_loss, samples: (train_idx.len(), val_idx.len()), published: Some(published) })
}

/// Mean absolute DDIM action error per action dimension over `val`, in physical units, with a
/// fixed sampling seed.
pub fn validation_error(heads: &PolicyHeads, ds: &Dataset, val: &[usize], features: &[Tensor], seed: u64) -> Result<Vec<f64>> {
    let b = ds.batch(val)?;
    let vl = VlFeatures::pooled(Tensor::cat(&val.iter().map(|&i| features[i].shallow_clone()).collect::<Vec<_>>(), 0));
    let sensor = b.sensor.to_tensor();
    let pred = heads.sample(&CondInput { vl: &vl, sensor: &sensor, state: None }, 10, seed)?;
    let err = (pred - b.action.to_tensor()).abs().mean_dim(&[0i64, 1][..], false, Kind::Double);
    Ok(Vec::<f64>::try_from(err)?)
}

/// Mean of a vector (0 for an empty one).
pub fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Identity of a base model folder: `qwen2_5_vl:` + sha256 of its config.json and of the
/// names and sizes of its weight files (cheap; a re-sharded or edited model gets a new id).
pub fn base_model_id(dir: &Path) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(std::fs::read(dir.join("config.json")).map_err(|e| anyhow!("{}/config.json: {e}", dir.display()))?);
    let mut files: Vec<(String, u64)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors"))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.metadata().map(|m| m.len()).unwrap_or(0)))
        .collect();
    files.sort();
    for (name, len) in files {
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
    }
    Ok(format!("qwen2_5_vl:{}", hex::encode(h.finalize())))
}

/// Whether `dir` looks like a base VL model folder (config.json, tokenizer.json, weights).
pub fn check_model_dir(dir: &Path) -> Result<(), String> {
    for f in ["config.json", "tokenizer.json"] {
        if !dir.join(f).is_file() {
            return Err(format!("{}: no {f}", dir.display()));
        }
    }
    if !dir.join("model.safetensors").is_file() && !dir.join("model.safetensors.index.json").is_file() {
        return Err(format!("{}: no model.safetensors or model.safetensors.index.json", dir.display()));
    }
    Ok(())
}
