//! [`Stage2Task`]: the model side of Stage 2 for [`crate::train::runner`].
//!
//! - Parameters: LoRA on the decoder ([`GROUP_VL_LORA`], fp32 masters), sensor encoder
//!   ([`GROUP_SENSOR_ENCODER`]), fusion + action expert ([`GROUP_HEADS`]). The sensor encoder's
//!   BatchNorm keeps the stage-1 running statistics (frozen), so an update does not depend on
//!   how a batch is split into micro-batches.
//! - `vision` mode: merged vision-tower embeddings per sample, cached once (key: base model by
//!   content, compute dtype, processor settings, image bytes; no adapter since LoRA is on the
//!   decoder only; pinned, refused up front when they cannot fit); each step runs the decoder
//!   with LoRA from them and token ids and positions built from the frame sizes (no image
//!   decoded), and the vision tower waits in host memory on an accelerator.
//! - `features` mode: pooled VL features cached (key adds the adapter hash and the prompt; owned
//!   by the job). Cached epochs train the heads with the LoRA frozen; a refresh epoch (every
//!   `rebuild_interval_epochs` cached epochs, or when the drift measured at the last refresh
//!   reached `drift_threshold`) runs the decoder live with the LoRA trainable, from the vision
//!   embeddings cached as in `vision` mode (unpinned here); after it the drift of the probe set
//!   (spread over the training split; new adapter vs the cached features) is measured and the
//!   cache is rewritten under the new adapter's key (the job's old entries removed). With
//!   `memory.offload_vl_when_cached` on an accelerator, the VL model's frozen base weights move
//!   to host memory for cached epochs and back to the device whenever the VL model runs (refresh
//!   epochs, drift probes, cache misses); the LoRA weights stay on the device, so the
//!   optimizer's parameters are never replaced. On CPU it changes nothing.
//! - `off` mode: the whole VL model live every step.
//! - Every mode: the frozen embedding keeps only the rows of the dataset's prompt tokens; the
//!   next micro-batch's data is prepared on a worker thread while the current one computes
//!   (`data.prefetch`).
//!
//! Per-sample diffusion noise derives from (run seed, epoch, sample index), so it does not depend
//! on the micro-batch split; LoRA dropout draws from libtorch's generator, seeded per
//! micro-batch by the runner (so it depends on the split, and on the world size).
//!
//! Data-parallel ([`TrainTask::join_group`]): each rank builds the cache entries of the samples
//! `i` with `i % world == rank` into the shared cache folder (same keys as one process) and reads
//! the others' from there after the loop's barrier; the drift is rank 0's, broadcast, so every
//! rank takes the same refresh decisions; rank 0 alone removes the job's old features entries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use tch::{nn, Device, Tensor};

use super::data::{frame_sizes, Prefetcher, VlNeed};
use super::features::Features;
use super::vl::{HostWeights, Keys, Vl};
use crate::checkpoint::deploy::{DeployInfo, ADAPTER_DIR, DEPLOY_FILE, HEADS_FILE, STATS_FILE};
use crate::checkpoint::model_id::{base_model_id, older_scheme_note};
use crate::checkpoint::publish::{PublishItem, Source};
use crate::dataset::reader::Dataset;
use crate::dataset::store::Split;
use crate::dist::Group;
use crate::policy::heads::{CondInput, PolicyHeads, VlInput};
use crate::policy::heads_file::CheckpointStage;
use crate::train::action_error::ActionAxes;
use crate::train::cache::CacheKey;
use crate::train::config::{
    ComputeDtype, ResolvedMemory, TrainConfig, GROUP_HEADS, GROUP_SENSOR_ENCODER, GROUP_VL_LORA,
};
use crate::train::error::TrainError;
use crate::train::heads_job::{heads_params, ValidationSums};
use crate::train::optim::NamedParam;
use crate::train::progress::{CacheStatus, Phase};
use crate::train::runner::TrainTask;
use crate::train::state::{derive_seed, read_state_meta};
use crate::vlm::grad_checkpoint::Checkpointing;
use crate::vlm::lora::{inject_lora, lora_parameters, LoraConfig, TargetModules};
use crate::vlm::peft::{save_adapter, AdapterMeta};
use crate::vlm::precision::Precision;
use crate::vlm::{Pooling, Qwen25VL, VlProcessor};

type Result<T> = std::result::Result<T, TrainError>;

const NOISE_STREAM: u64 = 0x5354_4147_4532; // "STAGE2"
const VAL_STREAM: u64 = 0x5641_4c32; // "VAL2"

/// Key of the memory plan in the task's saved state (beside the features-mode state's fields).
const MEMORY_KEY: &str = "memory";

/// The memory plan (LoRA rank, micro-batch, accumulation) saved in the training state at `path`;
/// None for a state written before plans were saved.
pub fn saved_memory(path: &Path) -> Result<Option<ResolvedMemory>> {
    memory_in(&read_state_meta(path)?.cache_state)
}

fn memory_in(state: &serde_json::Value) -> Result<Option<ResolvedMemory>> {
    state
        .get(MEMORY_KEY)
        .map(|m| {
            serde_json::from_value(m.clone())
                .map_err(|e| TrainError::invalid("training state's memory plan", e.to_string()))
        })
        .transpose()
}

/// Stage 2 model side; see the module doc.
pub struct Stage2Task {
    /// The VL model with LoRA and its inputs.
    vl: Vl,
    /// Where the VL features come from (`cache.mode`).
    features: Features,
    seed: u64,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    _lora_vs: nn::VarStore,
    lora_cfg: LoraConfig,
    /// The run's memory plan, saved with the state.
    memory: ResolvedMemory,
    lora_init: Vec<Tensor>,
    base_model_dir: PathBuf,
    heads: PolicyHeads,
    deploy: DeployInfo,
    epoch: u64,
    work_dir: PathBuf,
    dataset_dir: PathBuf,
    pending: Option<crate::vlm::CheckpointedPass>,
    prefetcher: Prefetcher,
    /// The data-parallel group (None: one process).
    group: Option<Arc<Group>>,
}

/// The base model with fresh LoRA injected.
struct LoraModel {
    vlm: Qwen25VL,
    vs: nn::VarStore,
    cfg: LoraConfig,
    /// The LoRA weights as initialised.
    init: Vec<Tensor>,
}

/// The dataset with its training and validation indices, both non-empty.
fn open_dataset(cfg: &TrainConfig) -> Result<(Dataset, Vec<usize>, Vec<usize>)> {
    let ds = Dataset::open(&cfg.data.dataset_dir)?;
    let (train_idx, val_idx) = (ds.split_indices(Split::Train), ds.split_indices(Split::Val));
    if train_idx.is_empty() || val_idx.is_empty() {
        return Err(TrainError::invalid(
            format!("dataset `{}`", cfg.data.dataset_dir.display()),
            format!("{} train / {} validation samples; both must be non-empty", train_idx.len(), val_idx.len()),
        ));
    }
    Ok((ds, train_idx, val_idx))
}

/// The stage-1 checkpoint's deploy description and the base model's identity, refused unless
/// the checkpoint was trained on this base model, with a known pooling, on this dataset's layout.
fn check_stage1(cfg: &TrainConfig, ds: &Dataset) -> Result<(DeployInfo, String, Pooling)> {
    let stage1 = &cfg.model.stage1_checkpoint;
    let deploy1 = DeployInfo::read(stage1)?;
    let base_dir = &cfg.model.base_model_dir;
    crate::train::heads_job::check_model_dir(base_dir)
        .map_err(|e| TrainError::invalid("model.base_model_dir", e.to_string()))?;
    let base_id = base_model_id(base_dir)?;
    let refuse = |why: String| TrainError::invalid(format!("stage-1 checkpoint `{}`", stage1.display()), why);
    if deploy1.base_model_id != base_id {
        return Err(refuse(format!(
            "was trained with base model {}, but model.base_model_dir {} is {}{}",
            deploy1.base_model_id,
            base_dir.display(),
            base_id,
            older_scheme_note(&deploy1.base_model_id)
        )));
    }
    let Some(pooling) = Pooling::parse(&deploy1.pooling) else {
        return Err(refuse(format!("deploy.json: pooling `{}`: expected {}", deploy1.pooling, Pooling::NAMES)));
    };
    if let Some(why) = deploy1.layout_mismatch(ds.index.sensor_shape, ds.index.action_shape) {
        return Err(refuse(format!("{why} (dataset {})", cfg.data.dataset_dir.display())));
    }
    Ok((deploy1, base_id, pooling))
}

/// The stage-1 heads in the compute dtype, their BatchNorm frozen.
fn load_heads(cfg: &TrainConfig, precision: Precision, device: Device) -> Result<PolicyHeads> {
    let (mut heads, _) = PolicyHeads::load(&cfg.model.stage1_checkpoint.join(HEADS_FILE), device)?;
    heads.set_compute_kind(precision.compute_kind());
    heads.set_batch_norm_frozen(true);
    Ok(heads)
}

/// The frozen base model with fresh LoRA of rank `rank` on the decoder's target modules.
fn load_lora_model(cfg: &TrainConfig, rank: u32, precision: Precision, device: Device) -> Result<LoraModel> {
    let mut vlm = Qwen25VL::load(&cfg.model.base_model_dir, precision.compute_kind(), device)?;
    for (_, t) in vlm.named_tensors() {
        let _ = t.f_set_requires_grad(false);
    }
    let lora_cfg = LoraConfig {
        r: rank as i64,
        lora_alpha: cfg.lora.scaling * rank as f64,
        lora_dropout: cfg.lora.dropout,
        target_modules: TargetModules::Regex(format!(
            r".*language_model.*\.({})",
            cfg.lora.target_modules.iter().map(|m| regex::escape(m)).collect::<Vec<_>>().join("|")
        )),
        exclude_modules: None,
        use_rslora: false,
    };
    let vs = nn::VarStore::new(device);
    tch::manual_seed(derive_seed(cfg.run.seed, &[0x4c4f_5241]) as i64);
    let adapted = inject_lora(&mut vlm, &lora_cfg, &vs.root())?;
    check_every_target_adapted(&cfg.lora.target_modules, &adapted)?;
    let init = lora_parameters(&mut vlm).into_iter().map(|(_, t)| t.detach().copy()).collect();
    Ok(LoraModel { vlm, vs, cfg: lora_cfg, init })
}

/// Errors naming a `lora.target_modules` entry that matched no language-model layer (the regex
/// built from the list would otherwise adapt the others and silently drop it).
fn check_every_target_adapted(targets: &[String], adapted: &[String]) -> Result<()> {
    let missing: Vec<&str> =
        targets.iter().filter(|t| !adapted.iter().any(|p| p.ends_with(&format!(".{t}")))).map(String::as_str).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let mut names: Vec<&str> = adapted.iter().filter_map(|p| p.rsplit('.').next()).collect();
    names.sort_unstable();
    names.dedup();
    Err(TrainError::Invalid {
        what: "lora.target_modules".into(),
        reason: format!(
            "{} matched no linear layer of the language model (adapted: {}; its attention and MLP \
             projections are q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
            missing.iter().map(|m| format!("`{m}`")).collect::<Vec<_>>().join(", "),
            names.join(", ")
        ),
    })
}

/// The processor with the stage-1 checkpoint's pixel bounds; `vlm`'s frozen embedding then
/// keeps only the rows of the dataset's prompt tokens (the only ones ever read).
fn processor_for(cfg: &TrainConfig, deploy1: &DeployInfo, vlm: &mut Qwen25VL, ds: &Dataset) -> Result<VlProcessor> {
    let processor = VlProcessor::from_model_dir(
        &cfg.model.base_model_dir,
        &vlm.config,
        Some(deploy1.processor.min_pixels),
        Some(deploy1.processor.max_pixels),
    )?;
    let sizes = frame_sizes(ds);
    let mut prompt_ids = vec![processor.tokenizer.pad_token_id];
    for ep in &ds.index.episodes {
        prompt_ids.extend(processor.text_sample(&sizes, &ep.instruction)?.input_ids);
    }
    vlm.language_model.keep_embedding_rows(&prompt_ids)?;
    Ok(processor)
}

/// The processor settings that enter the cache keys.
fn processor_json(processor: &VlProcessor) -> serde_json::Value {
    let ip = &processor.image;
    serde_json::json!({
        "min_pixels": ip.min_pixels, "max_pixels": ip.max_pixels, "patch_size": ip.patch_size,
        "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size,
        "image_mean": ip.image_mean, "image_std": ip.image_std,
    })
}

impl Stage2Task {
    /// Loads the dataset, the base model (frozen weights in the compute dtype) with fresh LoRA of
    /// `memory.lora_rank` and alpha `lora.scaling * rank` (seeded by `run.seed`; B = 0 so features
    /// start equal to the base model's), the stage-1 heads and deploy description, and opens the
    /// cache. `memory` is saved with the training state (see [`saved_memory`]).
    pub fn new(cfg: &TrainConfig, memory: &ResolvedMemory) -> Result<Self> {
        let device = crate::device::parse(&cfg.run.device).map_err(|e| TrainError::invalid("run.device", e))?;
        let (precision, dtype) = match cfg.model.compute_dtype {
            ComputeDtype::F32 => (Precision::F32, "f32"),
            ComputeDtype::Bf16 => (Precision::Bf16, "bf16"),
        };
        let (ds, train_idx, val_idx) = open_dataset(cfg)?;
        let (deploy1, base_id, pooling) = check_stage1(cfg, &ds)?;
        let heads = load_heads(cfg, precision, device)?;
        let mut lora = load_lora_model(cfg, memory.lora_rank, precision, device)?;
        let processor = processor_for(cfg, &deploy1, &mut lora.vlm, &ds)?;
        let mut vl = Vl {
            keys: Keys::new(base_id, dtype.into(), processor_json(&processor), pooling),
            vlm: lora.vlm,
            device,
            ds: Arc::new(ds),
            processor: Arc::new(processor),
            checkpointing: if cfg.model.gradient_checkpointing { Checkpointing::every(1) } else { Checkpointing::OFF },
            host: HostWeights::None,
        };
        let features = Features::open(cfg, &mut vl, &train_idx)?;
        let deploy = DeployInfo { adapter: Some(ADAPTER_DIR.into()), dtype: dtype.into(), ..deploy1 };
        Ok(Self {
            vl,
            features,
            seed: cfg.run.seed,
            train_idx,
            val_idx,
            _lora_vs: lora.vs,
            lora_cfg: lora.cfg,
            memory: memory.clone(),
            lora_init: lora.init,
            base_model_dir: cfg.model.base_model_dir.clone(),
            heads,
            deploy,
            epoch: 0,
            work_dir: super::work_dir(cfg),
            dataset_dir: cfg.data.dataset_dir.clone(),
            pending: None,
            prefetcher: Prefetcher::new(cfg.data.prefetch),
            group: None,
        })
    }

    /// Identity of the base model.
    pub fn base_model_id(&self) -> &str {
        &self.vl.keys.base_model_id
    }

    /// Whether any LoRA weight differs from its initial value.
    pub fn lora_params_changed(&mut self) -> bool {
        let now = lora_parameters(&mut self.vl.vlm);
        now.iter().zip(&self.lora_init).any(|((_, t), t0)| !t.detach().equal(t0))
    }

    /// Hash of the current LoRA weights (the features cache's adapter version).
    pub fn adapter_hash(&mut self) -> String {
        self.vl.adapter_hash()
    }

    /// Whether the VL model's base weights are in host memory now (features-mode offload).
    pub fn vl_offloaded(&self) -> bool {
        self.vl.host == HostWeights::All
    }

    /// Device of every base VL weight (one entry when all are on the same device).
    pub fn vl_weight_devices(&self) -> Vec<Device> {
        let mut out: Vec<Device> = Vec::new();
        for (_, t) in self.vl.vlm.named_tensors() {
            if !out.contains(&t.device()) {
                out.push(t.device());
            }
        }
        out
    }

    /// Training micro-batches whose data a worker prepared ahead (`data.prefetch`).
    pub fn prefetched_micro_batches(&self) -> u64 {
        self.prefetcher.hits
    }

    /// Refresh epochs begun (`features` mode).
    pub fn refreshes(&self) -> u64 {
        self.features.refreshes()
    }

    /// Vision-cache entries computed by this process.
    pub fn vision_entries_built(&self) -> u64 {
        self.features.vision_built()
    }

    /// The cache key of sample `i` for `kind` (`vision`: no adapter, no prompt; `features`: the
    /// given adapter hash and the chat prompt).
    pub fn sample_key(&self, i: usize, kind: &str, adapter: &str) -> Result<CacheKey> {
        self.vl.keys.sample(&self.vl.ds, i, kind, adapter)
    }

    /// Drift (rel. L2 mean over the probe set) measured at the last refresh, if any.
    pub fn last_drift(&self) -> Option<f64> {
        self.features.last_drift()
    }

    /// The dataset's action dimensions.
    pub fn axes(&self) -> ActionAxes {
        ActionAxes::from_dataset(&self.vl.ds)
    }

    /// Validation metrics of the current weights: `val_loss` (diffusion loss, fixed noise),
    /// `val_action_error` (mean DDIM error in training-set stds) and per dimension (physical
    /// units; [`ActionAxes::metrics`]), in
    /// chunks of `chunk` samples. In `features` mode the features come from the cache, otherwise
    /// they are computed live.
    pub fn validation_metrics(&mut self, chunk: usize) -> Result<BTreeMap<String, f64>> {
        let val = self.val_idx.clone();
        let mut sums = ValidationSums::default();
        for idx in val.chunks(chunk.max(1)) {
            let features = match &mut self.features {
                Features::Cached(c) if c.built() => {
                    Tensor::cat(&idx.iter().map(|&i| c.get(&mut self.vl, i)).collect::<Result<Vec<_>>>()?, 0)
                }
                source => self.vl.live_features_nograd(source.store_mut(), idx)?,
            };
            sums.add(&self.heads, &self.vl.ds, idx, &features, self.seed, Some(VAL_STREAM))?;
        }
        let mut m = self.axes().metrics(&sums.errors());
        m.insert("val_loss".to_string(), sums.loss());
        Ok(m)
    }

    fn step_loss(&mut self, idx: &[usize]) -> Result<(Tensor, f64)> {
        let t0 = Instant::now();
        // A cached epoch uses sensor, action and the cached features only: no image is decoded.
        let need = match &self.features {
            Features::Live => VlNeed::Images,
            Features::Cached(c) if c.cached_epoch() => VlNeed::None,
            _ => VlNeed::Text,
        };
        let data = self.prefetcher.data(&self.vl.ds, &self.vl.processor, idx, need)?;
        let (sensor, actions) =
            (data.sensor.to_tensor().to_device(self.vl.device), data.action.to_tensor().to_device(self.vl.device));
        let seeds: Vec<u64> =
            idx.iter().map(|&i| derive_seed(self.seed, &[NOISE_STREAM, self.epoch, i as u64])).collect();
        let (pooled, pass, data_s) = match &mut self.features {
            Features::Cached(c) if c.cached_epoch() => {
                let f = idx.iter().map(|&i| c.get(&mut self.vl, i)).collect::<Result<Vec<_>>>()?;
                (Tensor::cat(&f, 0).to_device(self.vl.device), None, t0.elapsed().as_secs_f64())
            }
            source => {
                let (batch, embeds) = self.vl.with_embeds(source.store_mut(), idx, data.vl)?;
                let data_s = t0.elapsed().as_secs_f64();
                let (f, p) = self.vl.features_of(&batch, embeds, true)?;
                (f, p, data_s)
            }
        };
        let vl = VlInput::pooled(pooled);
        let loss = self.heads.loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &actions, &seeds, true)?;
        self.pending = pass;
        Ok((loss, data_s))
    }
}

impl TrainTask for Stage2Task {
    fn params(&mut self) -> Vec<NamedParam> {
        let mut out: Vec<NamedParam> = lora_parameters(&mut self.vl.vlm)
            .into_iter()
            .map(|(name, tensor)| NamedParam {
                name: format!("vl.{name}"),
                group: GROUP_VL_LORA.into(),
                tensor,
                decay: true,
            })
            .collect();
        out.extend(heads_params(&self.heads, "heads.", GROUP_SENSOR_ENCODER, GROUP_HEADS));
        out
    }

    fn train_len(&self) -> usize {
        self.train_idx.len()
    }

    fn begin_epoch(&mut self, epoch: u64, chunk: usize) -> Result<Phase> {
        self.epoch = epoch;
        let group = self.group.as_deref();
        match &mut self.features {
            Features::Live => Ok(Phase::Training),
            Features::Vision(store) => {
                store.begin_epoch(&mut self.vl, group, epoch)?;
                Ok(Phase::Training)
            }
            Features::Cached(c) => c.begin_epoch(&mut self.vl, group, epoch, chunk),
        }
    }

    fn prefetch(&mut self, next: &[usize]) {
        let train_idx = &self.train_idx;
        self.prefetcher.announce(next.iter().map(|&k| train_idx[k]));
    }

    fn loss(&mut self, samples: &[usize], _global_step: u64) -> Result<(Tensor, f64)> {
        let idx: Vec<usize> = samples.iter().map(|&k| self.train_idx[k]).collect();
        self.step_loss(&idx)
    }

    fn after_backward(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(pass) => Ok(pass.backward(&self.vl.vlm)?),
            None => Ok(()),
        }
    }

    fn discard_pass(&mut self) {
        self.pending = None;
    }

    fn end_epoch(&mut self, _epoch: u64, chunk: usize) -> Result<()> {
        match &mut self.features {
            Features::Cached(c) if !c.cached_epoch() => c.end_refresh(&mut self.vl, self.group.as_deref(), chunk),
            _ => Ok(()),
        }
    }

    fn validate(&mut self, _epoch: u64, chunk: usize) -> Result<BTreeMap<String, f64>> {
        self.validation_metrics(chunk)
    }

    fn join_group(&mut self, group: &Arc<Group>) {
        self.group = Some(group.clone());
    }

    fn deployable(&mut self) -> Result<Vec<PublishItem>> {
        std::fs::create_dir_all(&self.work_dir).map_err(TrainError::io("create folder", &self.work_dir))?;
        let heads_path = self.work_dir.join(HEADS_FILE);
        let stage = CheckpointStage::Stage2 {
            adapter_dir: ADAPTER_DIR.into(),
            base_model_id: self.base_model_id().to_string(),
        };
        self.heads.save(&heads_path, stage, BTreeMap::new())?;
        let adapter_dir = self.work_dir.join(ADAPTER_DIR);
        let meta =
            AdapterMeta { base_model_name_or_path: Some(self.base_model_dir.display().to_string()), task_type: None };
        save_adapter(&mut self.vl.vlm, &self.lora_cfg, &meta, &adapter_dir)?;
        Ok(vec![
            PublishItem { dest: HEADS_FILE.into(), source: Source::File(heads_path) },
            PublishItem { dest: ADAPTER_DIR.into(), source: Source::Dir(adapter_dir) },
            PublishItem { dest: DEPLOY_FILE.into(), source: Source::Bytes(self.deploy.to_json().into_bytes()) },
            PublishItem { dest: STATS_FILE.into(), source: Source::File(self.dataset_dir.join(STATS_FILE)) },
        ])
    }

    fn cache_state(&self) -> serde_json::Value {
        let mut state = self.features.saved_state();
        state[MEMORY_KEY] = serde_json::to_value(&self.memory).expect("memory plan serializes");
        state
    }

    fn restore_cache_state(&mut self, state: &serde_json::Value) -> Result<()> {
        if state.is_null() {
            return Ok(());
        }
        if let Some(saved) = memory_in(state)?.filter(|m| *m != self.memory) {
            return Err(TrainError::invalid(
                "training state",
                format!("was saved with {saved}, but this run was built with {}", self.memory),
            ));
        }
        self.features.restore(state)
    }

    fn cache_status(&self) -> CacheStatus {
        let stats = self.features.stats();
        CacheStatus {
            mode: self.features.mode().as_str().into(),
            building: self.features.refreshing(),
            hit_rate: stats.hit_rate(),
            entries: stats.entries,
            size_bytes: stats.disk_bytes,
            drift: self.features.last_drift(),
            refreshes: self.features.refreshes(),
            vl_offloaded: self.vl_offloaded(),
        }
    }
}
