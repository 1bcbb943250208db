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

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::Digest;
use tch::{nn, Device, Kind, Tensor};

use crate::checkpoint::deploy::{DeployInfo, ADAPTER_DIR, DEPLOY_FILE, HEADS_FILE, STATS_FILE};
use crate::checkpoint::model_id::{base_model_id, older_scheme_note};
use crate::checkpoint::publish::{PublishItem, Source};
use crate::dataset::reader::{Array, Dataset};
use crate::dataset::store::Split;
use crate::dist::Group;
use crate::policy::checkpoint::CheckpointStage;
use crate::policy::heads::{CondInput, PolicyHeads, VlInput};
use crate::train::action_error::ActionAxes;
use crate::train::cache::{cache_key, CacheKey, FeatureCache, KeyInput};
use crate::train::config::{
    CacheMode, ComputeDtype, ResolvedMemory, TrainConfig, GROUP_HEADS, GROUP_SENSOR_ENCODER, GROUP_VL_LORA,
};
use crate::train::drift::{feature_drift, DriftStats, RefreshDecision, RefreshPolicy};
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
use crate::vlm::prompt::chat_prompt;
use crate::vlm::{Pooling, Qwen25VL, VlBatch, VlProcessor};

type Result<T> = std::result::Result<T, TrainError>;

const NOISE_STREAM: u64 = 0x5354_4147_4532; // "STAGE2"
const VAL_STREAM: u64 = 0x5641_4c32; // "VAL2"
const EMBEDS: &str = "embeds";
const POOLED: &str = "pooled";

/// Features-mode state saved with the training state (exact resume).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FeatureState {
    /// Adapter hash the cached features were computed with (None: not built yet).
    adapter: Option<String>,
    /// Cached epochs begun since the last (re)build.
    cached_since_refresh: u64,
    /// Refresh epochs begun.
    refreshes: u64,
    /// Drift measured after the last refresh epoch.
    drift: Option<DriftStats>,
    /// The epoch whose decision is below (so a resumed epoch keeps it).
    decided_epoch: Option<u64>,
    /// Whether that epoch runs the VL model live.
    live: bool,
}

/// Key of the memory plan in the task's saved state (beside the [`FeatureState`] fields).
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
    mode: CacheMode,
    device: Device,
    seed: u64,
    ds: Arc<Dataset>,
    train_idx: Vec<usize>,
    val_idx: Vec<usize>,
    vlm: Qwen25VL,
    _lora_vs: nn::VarStore,
    lora_cfg: LoraConfig,
    /// The run's memory plan, saved with the state.
    memory: ResolvedMemory,
    lora_init: Vec<Tensor>,
    processor: Arc<VlProcessor>,
    processor_json: serde_json::Value,
    base_model_id: String,
    base_model_dir: PathBuf,
    heads: PolicyHeads,
    deploy: DeployInfo,
    checkpointing: Checkpointing,
    cache: Option<FeatureCache>,
    /// Cache keys computed so far ([`Stage2Task::memo_key`]).
    keys: KeyMemo,
    /// Owner of this job's features entries in the shared cache folder (`features@<state_dir>`).
    cache_owner: String,
    refresh: Option<RefreshPolicy>,
    probe: Vec<usize>,
    fs: FeatureState,
    epoch: u64,
    vision_built: u64,
    work_dir: PathBuf,
    dataset_dir: PathBuf,
    pending: Option<crate::vlm::CheckpointedPass>,
    /// Offload the base VL weights during cached epochs (features mode on an accelerator).
    offload: bool,
    /// Whether the base VL weights are in host memory now.
    vl_offloaded: bool,
    /// Whether the vision tower alone is in host memory now (`vision` mode on an accelerator).
    vision_offloaded: bool,
    /// `data.prefetch`.
    prefetch: bool,
    /// The micro-batch the loop will ask for next ([`TrainTask::prefetch`]).
    next: Option<Vec<usize>>,
    /// Its data, being prepared on a worker thread.
    prefetched: Option<(Vec<usize>, VlNeed, std::thread::JoinHandle<Result<MicroBatchData>>)>,
    /// Micro-batches whose data came from the worker.
    prefetch_hits: u64,
    /// The data-parallel group (None: one process).
    group: Option<Arc<Group>>,
}

/// Which VL inputs a micro-batch needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VlNeed {
    /// None (a cached features epoch).
    None,
    /// Token ids and positions from the frame sizes (the image embeddings come from the cache).
    Text,
    /// Decoded and processed images (no cache).
    Images,
}

/// A micro-batch's data: sensor windows, action chunks and the VL inputs it needs.
struct MicroBatchData {
    sensor: Array<f32>,
    action: Array<f32>,
    vl: Option<VlBatch>,
}

/// Reads and builds the data of `idx` (dataset indices); runs on the data worker or inline.
fn prepare(ds: &Dataset, processor: &VlProcessor, idx: &[usize], need: VlNeed) -> Result<MicroBatchData> {
    let (sensor, action) = ds.sensor_action(idx)?;
    Ok(MicroBatchData { sensor, action, vl: vl_batch_of(ds, processor, idx, need)? })
}

/// The VL batch of `idx` that `need` asks for (None for [`VlNeed::None`]).
fn vl_batch_of(ds: &Dataset, processor: &VlProcessor, idx: &[usize], need: VlNeed) -> Result<Option<VlBatch>> {
    let samples = match need {
        VlNeed::None => return Ok(None),
        VlNeed::Text => {
            let sizes = frame_sizes(ds);
            idx.iter()
                .map(|&i| processor.text_sample(&sizes, instruction(ds, i)))
                .collect::<std::result::Result<Vec<_>, _>>()?
        }
        VlNeed::Images => idx
            .iter()
            .map(|&i| {
                ds.sample(i).map_err(TrainError::from).and_then(|s| Ok(processor.sample(&s.images, &s.instruction)?))
            })
            .collect::<Result<Vec<_>>>()?,
    };
    Ok(Some(processor.collate(&samples)?))
}

/// The (width, height) of every camera's frames, in camera order.
fn frame_sizes(ds: &Dataset) -> Vec<(u32, u32)> {
    ds.index.cameras.iter().map(|c| (c.width, c.height)).collect()
}

/// The instruction of sample `i`'s episode.
fn instruction(ds: &Dataset, i: usize) -> &str {
    &ds.index.episodes[ds.index.samples[i].episode].instruction
}

/// Name prefix of the vision tower's weights.
const VISION_PREFIX: &str = "model.visual.";

/// `k` of `items` evenly spaced over the whole list (all of them when `k >= len`): the drift
/// probe covers every episode, not the first one (samples are stored episode by episode).
fn spread(items: &[usize], k: usize) -> Vec<usize> {
    let n = items.len();
    if k >= n {
        return items.to_vec();
    }
    (0..k).map(|j| items[j * n / k]).collect()
}

/// Cache keys by sample: vision keys, and features keys under `features_adapter`.
#[derive(Default)]
struct KeyMemo {
    vision: HashMap<usize, CacheKey>,
    features_adapter: String,
    features: HashMap<usize, CacheKey>,
}

impl Stage2Task {
    /// Loads the dataset, the base model (frozen weights in the compute dtype) with fresh LoRA of
    /// `memory.lora_rank` and alpha `lora.scaling * rank` (seeded by `run.seed`; B = 0 so features
    /// start equal to the base model's), the stage-1 heads and deploy description, and opens the
    /// cache. `memory` is saved with the training state (see [`saved_memory`]).
    pub fn new(cfg: &TrainConfig, memory: &ResolvedMemory) -> Result<Self> {
        let rank = memory.lora_rank;
        let device = crate::device::parse(&cfg.run.device).map_err(|e| TrainError::invalid("run.device", e))?;
        let precision = match cfg.model.compute_dtype {
            ComputeDtype::F32 => Precision::F32,
            ComputeDtype::Bf16 => Precision::Bf16,
        };
        let ds = Dataset::open(&cfg.data.dataset_dir)?;
        let (train_idx, val_idx) = (ds.split_indices(Split::Train), ds.split_indices(Split::Val));
        if train_idx.is_empty() || val_idx.is_empty() {
            return Err(TrainError::invalid(
                format!("dataset `{}`", cfg.data.dataset_dir.display()),
                format!("{} train / {} validation samples; both must be non-empty", train_idx.len(), val_idx.len()),
            ));
        }
        let stage1 = &cfg.model.stage1_checkpoint;
        let deploy1 = DeployInfo::read(stage1)?;
        let base_dir = &cfg.model.base_model_dir;
        crate::train::heads_job::check_model_dir(base_dir)
            .map_err(|e| TrainError::invalid("model.base_model_dir", e.to_string()))?;
        let base_id = base_model_id(base_dir)?;
        if deploy1.base_model_id != base_id {
            return Err(TrainError::invalid(
                format!("stage-1 checkpoint `{}`", stage1.display()),
                format!(
                    "was trained with base model {}, but model.base_model_dir {} is {}{}",
                    deploy1.base_model_id,
                    base_dir.display(),
                    base_id,
                    older_scheme_note(&deploy1.base_model_id)
                ),
            ));
        }
        if deploy1.pooling != "all" {
            return Err(TrainError::invalid(
                format!("stage-1 checkpoint `{}`", stage1.display()),
                format!("pooling `{}` (this job trains with `all`)", deploy1.pooling),
            ));
        }
        if let Some(why) = deploy1.layout_mismatch(ds.index.sensor_shape, ds.index.action_shape) {
            return Err(TrainError::invalid(
                format!("stage-1 checkpoint `{}`", stage1.display()),
                format!("{why} (dataset {})", cfg.data.dataset_dir.display()),
            ));
        }
        let (mut heads, _) = PolicyHeads::load(&stage1.join(HEADS_FILE), device)?;
        heads.set_compute_kind(precision.compute_kind());
        heads.set_batch_norm_frozen(true);

        let mut vlm = Qwen25VL::load(base_dir, precision.compute_kind(), device)?;
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
        let lora_vs = nn::VarStore::new(device);
        tch::manual_seed(derive_seed(cfg.run.seed, &[0x4c4f_5241]) as i64);
        inject_lora(&mut vlm, &lora_cfg, &lora_vs.root())?;
        let lora_init = lora_parameters(&mut vlm).into_iter().map(|(_, t)| t.detach().copy()).collect();
        let processor = VlProcessor::from_model_dir(
            base_dir,
            &vlm.config,
            Some(deploy1.processor.min_pixels),
            Some(deploy1.processor.max_pixels),
        )?;
        // The frozen embedding is only ever read at this dataset's prompt tokens: keep those rows.
        let sizes = frame_sizes(&ds);
        let mut prompt_ids = vec![processor.tokenizer.pad_token_id];
        for ep in &ds.index.episodes {
            prompt_ids.extend(processor.text_sample(&sizes, &ep.instruction)?.input_ids);
        }
        vlm.language_model.keep_embedding_rows(&prompt_ids)?;
        let ip = &processor.image;
        let processor_json = serde_json::json!({
            "min_pixels": ip.min_pixels, "max_pixels": ip.max_pixels, "patch_size": ip.patch_size,
            "merge_size": ip.merge_size, "temporal_patch_size": ip.temporal_patch_size,
            "image_mean": ip.image_mean, "image_std": ip.image_std,
        });
        let mode = cfg.cache.mode;
        let cache = match mode {
            CacheMode::Off => None,
            _ => Some(FeatureCache::open(&cfg.cache.dir, cfg.cache_config())?),
        };
        let mut deploy = deploy1;
        deploy.adapter = Some(ADAPTER_DIR.into());
        deploy.dtype = match precision {
            Precision::F32 => "f32".into(),
            Precision::Bf16 => "bf16".into(),
        };
        let probe = spread(&train_idx, cfg.cache.probe_samples.max(1));
        let mut task = Self {
            mode,
            device,
            seed: cfg.run.seed,
            ds: Arc::new(ds),
            train_idx,
            val_idx,
            vlm,
            _lora_vs: lora_vs,
            lora_cfg,
            memory: memory.clone(),
            lora_init,
            processor: Arc::new(processor),
            processor_json,
            base_model_id: base_id,
            base_model_dir: base_dir.clone(),
            heads,
            deploy,
            checkpointing: if cfg.model.gradient_checkpointing { Checkpointing::every(1) } else { Checkpointing::OFF },
            cache,
            keys: KeyMemo::default(),
            cache_owner: format!("features@{}", cfg.checkpoint.state_dir.display()),
            refresh: cfg.refresh_policy(),
            probe,
            fs: FeatureState::default(),
            epoch: 0,
            vision_built: 0,
            work_dir: super::work_dir(cfg),
            dataset_dir: cfg.data.dataset_dir.clone(),
            pending: None,
            offload: mode == CacheMode::Features && cfg.memory.offload_vl_when_cached && device != Device::Cpu,
            vl_offloaded: false,
            vision_offloaded: false,
            prefetch: cfg.data.prefetch,
            next: None,
            prefetched: None,
            prefetch_hits: 0,
            group: None,
        };
        if mode == CacheMode::Vision {
            task.check_vision_cache_fits()?;
        }
        Ok(task)
    }

    /// Identity of the base model.
    pub fn base_model_id(&self) -> &str {
        &self.base_model_id
    }

    /// Whether any LoRA weight differs from its initial value.
    pub fn lora_params_changed(&mut self) -> bool {
        let now = lora_parameters(&mut self.vlm);
        now.iter().zip(&self.lora_init).any(|((_, t), t0)| !t.detach().equal(t0))
    }

    /// Hash of the current LoRA weights (the features cache's adapter version).
    pub fn adapter_hash(&mut self) -> String {
        let mut h = sha2::Sha256::new();
        for (name, t) in lora_parameters(&mut self.vlm) {
            h.update(name.as_bytes());
            let v = Vec::<f32>::try_from(t.detach().to_device(Device::Cpu).to_kind(Kind::Float).flatten(0, -1))
                .unwrap_or_default();
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
        hex::encode(&h.finalize()[..12])
    }

    /// Whether the VL model's base weights are in host memory now (features-mode offload).
    pub fn vl_offloaded(&self) -> bool {
        self.vl_offloaded
    }

    /// Device of every base VL weight (one entry when all are on the same device).
    pub fn vl_weight_devices(&self) -> Vec<Device> {
        let mut out: Vec<Device> = Vec::new();
        for (_, t) in self.vlm.named_tensors() {
            if !out.contains(&t.device()) {
                out.push(t.device());
            }
        }
        out
    }

    /// Moves the base VL weights to `device` in place (`param.data = param.data.to(device)`, as
    /// `nn.Module.to` does): every holder of these tensors sees the move.
    fn move_vl_weights(&mut self, device: Device) {
        self.move_weights(device, |_| true);
        self.vision_offloaded = false;
    }

    /// [`Stage2Task::move_vl_weights`] of the vision tower only.
    fn move_vision_tower(&mut self, device: Device) {
        self.move_weights(device, |name| name.starts_with(VISION_PREFIX));
        self.vision_offloaded = device != self.device;
    }

    fn move_weights(&mut self, device: Device, which: impl Fn(&str) -> bool) {
        for (name, mut t) in self.vlm.named_tensors() {
            if which(&name) && t.device() != device {
                let moved = t.to_device(device);
                t.set_data(&moved);
            }
        }
    }

    /// Puts the base VL weights back on the training device if they were offloaded.
    fn vl_to_device(&mut self) {
        if self.vl_offloaded {
            self.move_vl_weights(self.device);
            self.vl_offloaded = false;
        }
    }

    /// Training micro-batches whose data a worker prepared ahead (`data.prefetch`).
    pub fn prefetched_micro_batches(&self) -> u64 {
        self.prefetch_hits
    }

    /// Refresh epochs begun (`features` mode).
    pub fn refreshes(&self) -> u64 {
        self.fs.refreshes
    }

    /// Vision-cache entries computed by this process.
    pub fn vision_entries_built(&self) -> u64 {
        self.vision_built
    }

    /// The cache key of sample `i` for `kind` (`vision`: no adapter, no prompt; `features`: the
    /// given adapter hash and the chat prompt).
    pub fn sample_key(&self, i: usize, kind: &str, adapter: &str) -> Result<CacheKey> {
        let cams = self.ds.index.cameras.len();
        let images: Vec<&[u8]> = (0..cams).map(|c| self.ds.jpeg(i, c)).collect::<std::result::Result<_, _>>()?;
        let prompt = if kind == "features" { chat_prompt(cams, instruction(&self.ds, i)) } else { String::new() };
        Ok(cache_key(&KeyInput {
            kind,
            base_model: &self.base_model_id,
            dtype: &self.deploy.dtype,
            adapter,
            processor: &self.processor_json,
            prompt: &prompt,
            images: &images,
        }))
    }

    /// [`Stage2Task::sample_key`], computed once per sample (vision) or once per sample and
    /// adapter (features): a key hashes every image of the sample.
    fn memo_key(&mut self, i: usize, kind: &str, adapter: &str) -> Result<CacheKey> {
        let features = kind == "features";
        if features && self.keys.features_adapter != adapter {
            self.keys.features_adapter = adapter.to_string();
            self.keys.features.clear();
        }
        let memo = if features { &self.keys.features } else { &self.keys.vision };
        if let Some(&key) = memo.get(&i) {
            return Ok(key);
        }
        let key = self.sample_key(i, kind, adapter)?;
        let memo = if features { &mut self.keys.features } else { &mut self.keys.vision };
        memo.insert(i, key);
        Ok(key)
    }

    /// Cached vision embeddings of sample `i` (its images decoded and embedded on a miss only).
    /// `vision` mode pins them (every step needs them); `features` mode uses them in refresh
    /// epochs and rebuilds and lets the disk budget evict them.
    fn vision_embeds(&mut self, i: usize) -> Result<Tensor> {
        let key = self.memo_key(i, "vision", "none")?;
        let pin = self.mode == CacheMode::Vision;
        let cache = self.cache.as_mut().expect("vision and features modes have a cache");
        if pin {
            cache.pin(key);
        }
        if let Some(t) = cache.get(&key) {
            return Ok(t.into_iter().next().map(|(_, t)| t).expect("one tensor per entry"));
        }
        let b = vl_batch_of(&self.ds, &self.processor, &[i], VlNeed::Images)?.expect("images asked for");
        if self.vision_offloaded {
            self.move_vision_tower(self.device);
        }
        let e = tch::no_grad(|| self.vlm.image_embeds(&b.pixel_values, &b.image_grid_thw, false))?;
        let cpu = e.to_device(Device::Cpu);
        self.cache.as_mut().expect("cache").put(key, &[(EMBEDS.to_string(), cpu.shallow_clone())])?;
        self.vision_built += 1;
        Ok(cpu)
    }

    /// Refuses, before anything is written, a vision cache that cannot fit: every sample's embeddings
    /// (pinned for the whole run) against `cache.disk_budget_mb`, the missing ones against the
    /// free space of the cache folder's disk.
    fn check_vision_cache_fits(&mut self) -> Result<()> {
        let v = &self.vlm.config.vision;
        let unit = v.spatial_merge_size * v.spatial_merge_size;
        let mut tokens = 0i64;
        for c in &self.ds.index.cameras {
            let g = self.processor.image.grid(c.width, c.height)?;
            tokens += g[0] * g[1] * g[2] / unit;
        }
        let per_sample = (tokens * v.out_hidden_size) as u64 * self.vlm.kind().elt_size_in_bytes() as u64 + 512;
        let n = self.ds.len();
        let mut missing = 0u64;
        for i in 0..n {
            let key = self.memo_key(i, "vision", "none")?;
            missing += u64::from(!self.cache.as_ref().expect("vision mode has a cache").contains(&key));
        }
        let gb = |b: u64| format!("{:.2} GB", b as f64 / 1e9);
        let need = format!(
            "the vision cache of this dataset needs about {} ({n} samples x {} of embeddings)",
            gb(n as u64 * per_sample),
            gb(per_sample)
        );
        let cache = self.cache.as_ref().expect("vision mode has a cache");
        if let Some(budget) = cache.disk_budget_bytes() {
            if n as u64 * per_sample > budget {
                return Err(TrainError::invalid(
                    "cache.mode=vision",
                    format!("{need}, over cache.disk_budget_mb ({}): raise the budget, or use cache.mode=features (a few KB per sample) or off", gb(budget)),
                ));
            }
        }
        let free = cache.free_disk_bytes().map_err(TrainError::io("read the free space of", cache.dir()))?;
        if missing * per_sample > free {
            return Err(TrainError::invalid(
                "cache.mode=vision",
                format!("{need}, {missing} of them still to write, but {} has {} free: free space, point cache.dir elsewhere, or use cache.mode=features or off", cache.dir().display(), gb(free)),
            ));
        }
        Ok(())
    }

    /// The VL model's inputs for `idx`: with a cache (`vision` and `features` modes; the vision
    /// tower is frozen, so its embeddings are exact) the token ids and positions from the
    /// cameras' frame sizes (no image decoded) with the cached vision embeddings; in `off` mode
    /// the decoded and processed images.
    fn vl_inputs(&mut self, idx: &[usize]) -> Result<(VlBatch, Option<Tensor>)> {
        let need = if self.cache.is_some() { VlNeed::Text } else { VlNeed::Images };
        let batch = vl_batch_of(&self.ds, &self.processor, idx, need)?;
        self.with_embeds(idx, batch)
    }

    /// A VL `batch` of `idx` with, when there is a cache, the vision embeddings of `idx` from it.
    fn with_embeds(&mut self, idx: &[usize], batch: Option<VlBatch>) -> Result<(VlBatch, Option<Tensor>)> {
        let batch = batch.ok_or_else(|| {
            TrainError::invalid("micro-batch data", "has no VL inputs (expected them outside cached epochs)")
        })?;
        if self.cache.is_none() {
            return Ok((batch, None));
        }
        let embeds = idx.iter().map(|&i| self.vision_embeds(i)).collect::<Result<Vec<_>>>()?;
        Ok((batch, Some(Tensor::cat(&embeds, 0))))
    }

    /// The data of micro-batch `idx`: what the worker prepared for it, or prepared now; then the
    /// worker starts on the next micro-batch the loop announced (outside cached epochs).
    fn micro_batch_data(&mut self, idx: &[usize], need: VlNeed) -> Result<MicroBatchData> {
        let data = match self.prefetched.take() {
            Some((for_idx, for_need, worker)) if for_idx == idx && for_need == need => {
                self.prefetch_hits += 1;
                worker
                    .join()
                    .map_err(|_| TrainError::invalid("data worker", "panicked while preparing a micro-batch"))??
            }
            // Another micro-batch (e.g. the micro-batch was halved): prepared here.
            _ => prepare(&self.ds, &self.processor, idx, need)?,
        };
        // A cached epoch's data (two small reads) costs less than a thread: no worker then.
        if let Some(next) = self.next.take().filter(|_| need != VlNeed::None) {
            let (ds, processor, for_idx) = (Arc::clone(&self.ds), Arc::clone(&self.processor), next.clone());
            let worker = std::thread::Builder::new()
                .name("stage2-data".into())
                .spawn(move || prepare(&ds, &processor, &for_idx, need))
                .map_err(|e| TrainError::invalid("data worker", format!("could not start: {e}")))?;
            self.prefetched = Some((next, need, worker));
        }
        Ok(data)
    }

    /// [`Stage2Task::features_of`] the inputs of `idx`.
    fn live_features(&mut self, idx: &[usize], train: bool) -> Result<(Tensor, Option<crate::vlm::CheckpointedPass>)> {
        let (batch, embeds) = self.vl_inputs(idx)?;
        self.features_of(&batch, embeds, train)
    }

    /// Pooled VL features `[B, hidden]` (f32) of `batch` (with cached image embeddings in
    /// `vision` mode) and the current LoRA, computed live; `train` keeps the graph and LoRA
    /// dropout. With gradient checkpointing in training, the returned pass must be completed
    /// after the loss's backward.
    fn features_of(
        &mut self,
        batch: &VlBatch,
        embeds: Option<Tensor>,
        train: bool,
    ) -> Result<(Tensor, Option<crate::vlm::CheckpointedPass>)> {
        self.vl_to_device();
        let ck = self.checkpointing;
        let run = |vlm: &Qwen25VL| -> Result<(Tensor, Option<crate::vlm::CheckpointedPass>)> {
            let (f, pass) = match (&embeds, train && ck != Checkpointing::OFF) {
                (Some(e), true) => {
                    let (f, p) = vlm.forward_checkpointed_with_image_embeds(batch, Some(e), ck, true)?;
                    (f, Some(p))
                }
                (Some(e), false) => (vlm.forward_with_image_embeds(batch, Some(e), train)?, None),
                (None, true) => {
                    let (f, p) = vlm.forward_checkpointed(
                        batch,
                        crate::vlm::TrainCheckpointing { vision: Checkpointing::OFF, text: ck },
                        true,
                    )?;
                    (f, Some(p))
                }
                (None, false) => (vlm.forward(batch, train)?, None),
            };
            Ok((f.pooled(Pooling::All)?, pass))
        };
        if train {
            run(&self.vlm)
        } else {
            tch::no_grad(|| run(&self.vlm))
        }
    }

    /// Cached pooled features of sample `i` under the adapter the cache holds.
    fn cached_features(&mut self, i: usize) -> Result<Tensor> {
        let adapter = self.fs.adapter.clone().ok_or_else(|| {
            TrainError::invalid("features cache", "is not built yet (expected a cached epoch after it was built)")
        })?;
        let key = self.memo_key(i, "features", &adapter)?;
        let cache = self.cache.as_mut().expect("features mode has a cache");
        if let Some(t) = cache.get(&key) {
            return Ok(t.into_iter().next().map(|(_, t)| t).expect("one tensor per entry"));
        }
        let (f, _) = self.live_features(&[i], false)?;
        let f = f.to_device(Device::Cpu);
        let owner = self.cache_owner.clone();
        self.cache.as_mut().expect("cache").put_owned(key, &[(POOLED.to_string(), f.shallow_clone())], &owner)?;
        Ok(f)
    }

    /// Writes the features of every sample under the current adapter's key (the missing ones
    /// computed in batches of the micro-batch), pins them and
    /// removes this job's other features entries (older adapters); other jobs' entries and the
    /// shared vision embeddings stay.
    fn rebuild_features(&mut self, chunk: usize) -> Result<()> {
        let adapter = self.adapter_hash();
        self.cache.as_mut().expect("cache").unpin_all();
        let mut missing = Vec::new();
        for i in 0..self.ds.len() {
            let key = self.memo_key(i, "features", &adapter)?;
            let cache = self.cache.as_mut().expect("cache");
            cache.pin(key);
            if !cache.contains(&key) && self.builds(i) {
                missing.push((i, key));
            }
        }
        let owner = self.cache_owner.clone();
        for part in missing.chunks(chunk.max(1)) {
            let idx: Vec<usize> = part.iter().map(|&(i, _)| i).collect();
            let f = self.live_features_nograd(&idx)?;
            for (row, &(_, key)) in part.iter().enumerate() {
                let pooled = f.narrow(0, row as i64, 1).copy();
                self.cache.as_mut().expect("cache").put_owned(key, &[(POOLED.to_string(), pooled)], &owner)?;
            }
        }
        // Only a complete rebuild moves the cache to the new adapter (one cut short by an
        // out-of-memory is done again in smaller chunks).
        self.fs.adapter = Some(adapter);
        if self.group.as_ref().is_none_or(|g| g.is_main()) {
            self.cache.as_mut().expect("cache").remove_unpinned_owned_by(&owner)?;
        }
        Ok(())
    }

    /// Drift (rel. L2 mean over the probe set) measured at the last refresh, if any.
    pub fn last_drift(&self) -> Option<f64> {
        self.fs.drift.map(|d| d.rel_l2_mean)
    }

    /// The dataset's action dimensions.
    pub fn axes(&self) -> ActionAxes {
        ActionAxes::from_dataset(&self.ds)
    }

    /// Whether this process builds sample `i`'s cache entries (data-parallel: its share).
    fn builds(&self, i: usize) -> bool {
        self.group.as_ref().is_none_or(|g| i % g.world_size() == g.rank())
    }

    fn set_lora_trainable(&mut self, on: bool) {
        for (_, t) in lora_parameters(&mut self.vlm) {
            let _ = t.f_set_requires_grad(on);
        }
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
            let features = if self.mode == CacheMode::Features && self.fs.adapter.is_some() {
                Tensor::cat(&idx.iter().map(|&i| self.cached_features(i)).collect::<Result<Vec<_>>>()?, 0)
            } else {
                self.live_features_nograd(idx)?
            };
            sums.add(&self.heads, &self.ds, idx, &features, self.seed, Some(VAL_STREAM))?;
        }
        let mut m = self.axes().metrics(&sums.errors());
        m.insert("val_loss".to_string(), sums.loss());
        Ok(m)
    }

    /// Pooled features `[B, hidden]` of `idx` on the CPU, computed live in one batch without
    /// gradients.
    fn live_features_nograd(&mut self, idx: &[usize]) -> Result<Tensor> {
        Ok(self.live_features(idx, false)?.0.to_device(Device::Cpu))
    }

    fn begin(&mut self, epoch: u64, chunk: usize) -> Result<Phase> {
        self.epoch = epoch;
        match self.mode {
            CacheMode::Off => Ok(Phase::Training),
            CacheMode::Vision => {
                if epoch == 0 || self.vision_built == 0 {
                    let mine: Vec<usize> = (0..self.ds.len()).filter(|&i| self.builds(i)).collect();
                    for i in mine {
                        let _ = self.vision_embeds(i)?;
                    }
                }
                // Every step now reads the cache: the vision tower waits in host memory (it
                // comes back only to fill a miss) and its blocks go back to the device.
                if self.device != Device::Cpu && !self.vision_offloaded {
                    self.move_vision_tower(Device::Cpu);
                    crate::memory::release_cached_accelerator_memory()?;
                }
                Ok(Phase::Training)
            }
            CacheMode::Features => {
                if self.fs.decided_epoch != Some(epoch) {
                    let live = match (&self.fs.adapter, self.refresh) {
                        (None, _) => false,
                        (Some(_), Some(p)) => matches!(
                            p.decide(self.fs.cached_since_refresh, self.fs.drift.as_ref()),
                            RefreshDecision::Refresh(_)
                        ),
                        (Some(_), None) => false,
                    };
                    if live {
                        self.fs.refreshes += 1;
                        self.fs.cached_since_refresh = 0;
                    } else {
                        self.fs.cached_since_refresh += 1;
                    }
                    self.fs.decided_epoch = Some(epoch);
                    self.fs.live = live;
                }
                self.set_lora_trainable(self.fs.live);
                let current = self.adapter_hash();
                if !self.fs.live && self.fs.adapter.as_deref() != Some(current.as_str()) {
                    self.rebuild_features(chunk)?;
                }
                if self.fs.live {
                    self.vl_to_device();
                } else if self.offload && !self.vl_offloaded {
                    self.move_vl_weights(Device::Cpu);
                    self.vl_offloaded = true;
                    // Hand the freed blocks back to the device (a policy may share the GPU).
                    crate::memory::release_cached_accelerator_memory()?;
                }
                Ok(if self.fs.live { Phase::RefreshingCache } else { Phase::Training })
            }
        }
    }

    fn step_loss(&mut self, idx: &[usize]) -> Result<(Tensor, f64)> {
        let t0 = Instant::now();
        let cached = self.mode == CacheMode::Features && !self.fs.live;
        // A cached epoch uses sensor, action and the cached features only: no image is decoded.
        let need = if cached {
            VlNeed::None
        } else if self.cache.is_some() {
            VlNeed::Text
        } else {
            VlNeed::Images
        };
        let data = self.micro_batch_data(idx, need)?;
        let (sensor, actions) =
            (data.sensor.to_tensor().to_device(self.device), data.action.to_tensor().to_device(self.device));
        let seeds: Vec<u64> =
            idx.iter().map(|&i| derive_seed(self.seed, &[NOISE_STREAM, self.epoch, i as u64])).collect();
        let (pooled, pass, data_s) = if cached {
            let f = idx.iter().map(|&i| self.cached_features(i)).collect::<Result<Vec<_>>>()?;
            (Tensor::cat(&f, 0).to_device(self.device), None, t0.elapsed().as_secs_f64())
        } else {
            let (batch, embeds) = self.with_embeds(idx, data.vl)?;
            let data_s = t0.elapsed().as_secs_f64();
            let (f, p) = self.features_of(&batch, embeds, true)?;
            (f, p, data_s)
        };
        let vl = VlInput::pooled(pooled);
        let loss = self.heads.loss(&CondInput { vl: &vl, sensor: &sensor, state: None }, &actions, &seeds, true)?;
        self.pending = pass;
        Ok((loss, data_s))
    }
}

impl TrainTask for Stage2Task {
    fn params(&mut self) -> Vec<NamedParam> {
        let mut out: Vec<NamedParam> = lora_parameters(&mut self.vlm)
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
        self.begin(epoch, chunk)
    }

    fn prefetch(&mut self, next: &[usize]) {
        if self.prefetch {
            self.next = Some(next.iter().map(|&k| self.train_idx[k]).collect());
        }
    }

    fn loss(&mut self, samples: &[usize], _global_step: u64) -> Result<(Tensor, f64)> {
        let idx: Vec<usize> = samples.iter().map(|&k| self.train_idx[k]).collect();
        self.step_loss(&idx)
    }

    fn after_backward(&mut self) -> Result<()> {
        match self.pending.take() {
            Some(pass) => Ok(pass.backward(&self.vlm)?),
            None => Ok(()),
        }
    }

    fn discard_pass(&mut self) {
        self.pending = None;
    }

    fn end_epoch(&mut self, _epoch: u64, chunk: usize) -> Result<()> {
        if self.mode == CacheMode::Features && self.fs.live {
            // End of a refresh epoch: drift of the probe set, then the cache under the new adapter.
            let probe = self.probe.clone();
            let cached = probe.iter().map(|&i| self.cached_features(i)).collect::<Result<Vec<_>>>()?;
            let fresh = probe.chunks(chunk.max(1)).map(|c| self.live_features_nograd(c)).collect::<Result<Vec<_>>>()?;
            let drift = feature_drift(&Tensor::cat(&fresh, 0), &Tensor::cat(&cached, 0))?;
            self.fs.drift = Some(match &self.group {
                Some(g) => {
                    let bytes = serde_json::to_vec(&drift).map_err(|e| TrainError::invalid("drift", e.to_string()))?;
                    serde_json::from_slice(&g.broadcast_bytes(&bytes)?)
                        .map_err(|e| TrainError::invalid("drift from rank 0", e.to_string()))?
                }
                None => drift,
            });
            self.rebuild_features(chunk)?;
        }
        Ok(())
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
        let stage =
            CheckpointStage::Stage2 { adapter_dir: ADAPTER_DIR.into(), base_model_id: self.base_model_id.clone() };
        self.heads.save(&heads_path, stage, BTreeMap::new())?;
        let adapter_dir = self.work_dir.join(ADAPTER_DIR);
        let meta =
            AdapterMeta { base_model_name_or_path: Some(self.base_model_dir.display().to_string()), task_type: None };
        save_adapter(&mut self.vlm, &self.lora_cfg, &meta, &adapter_dir)?;
        Ok(vec![
            PublishItem { dest: HEADS_FILE.into(), source: Source::File(heads_path) },
            PublishItem { dest: ADAPTER_DIR.into(), source: Source::Dir(adapter_dir) },
            PublishItem { dest: DEPLOY_FILE.into(), source: Source::Bytes(self.deploy.to_json().into_bytes()) },
            PublishItem { dest: STATS_FILE.into(), source: Source::File(self.dataset_dir.join(STATS_FILE)) },
        ])
    }

    fn cache_state(&self) -> serde_json::Value {
        let mut state = serde_json::to_value(&self.fs).expect("cache state serializes");
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
        self.fs = serde_json::from_value(state.clone())
            .map_err(|e| TrainError::invalid("features-mode cache state", e.to_string()))?;
        Ok(())
    }

    fn cache_status(&self) -> CacheStatus {
        let stats = self.cache.as_ref().map(|c| c.stats()).unwrap_or_default();
        CacheStatus {
            mode: self.mode.as_str().into(),
            building: self.mode == CacheMode::Features && self.fs.live,
            hit_rate: stats.hit_rate(),
            entries: stats.entries,
            size_bytes: stats.disk_bytes,
            drift: self.fs.drift.map(|d| d.rel_l2_mean),
            refreshes: self.fs.refreshes,
            vl_offloaded: self.vl_offloaded,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::spread;

    #[test]
    fn the_probe_is_spread_over_the_whole_training_split() {
        let train: Vec<usize> = (100..110).collect();
        assert_eq!(spread(&train, 4), [100, 102, 105, 107]);
        assert_eq!(spread(&train, 10), train);
        assert_eq!(spread(&train, 32), train);
        assert_eq!(spread(&train, 1), [100]);
    }
}
