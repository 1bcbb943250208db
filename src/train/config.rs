//! Typed Stage 2 configuration (`config/train.yaml`) with typed `section.key=value` overrides
//! ([`Override`]) and validation, and the VRAM presets (`config/vram_presets.yaml`) the memory
//! settings resolve from.

use std::path::{Path, PathBuf};

use regex::Regex;
use serde::{Deserialize, Serialize};

use super::cache::CacheConfig;
use super::drift::{DriftMetric, RefreshPolicy};
use super::optim::{AdamWConfig, CosineSchedule, GroupConfig};

/// Parameter-group name of the VL model's LoRA weights.
pub const GROUP_VL_LORA: &str = "vl_lora";
/// Parameter-group name of the fusion layer and action expert.
pub const GROUP_HEADS: &str = "heads";
/// Parameter-group name of the sensor encoder.
pub const GROUP_SENSOR_ENCODER: &str = "sensor_encoder";

/// Errors of configuration loading and checking; each names the file, key or override.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config `{path}`: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The YAML does not match the expected structure (unknown or missing key, wrong type).
    #[error("config `{origin}`: {reason}")]
    Parse { origin: String, reason: String },
    /// An override is malformed or names a key that does not exist.
    #[error("override `{spec}`: {reason}")]
    Override { spec: String, reason: String },
    /// A value is out of range.
    #[error("config key `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { key: key.to_string(), reason: reason.into() }
}

/// `run` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunConfig {
    /// Run seed (every per-step seed derives from it).
    pub seed: u64,
    /// Epochs to train.
    pub epochs: u64,
    /// Folder for the job's outputs.
    pub output_dir: PathBuf,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
}

/// Compute precision of the VL forward and heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtype {
    /// bfloat16 compute, fp32 masters.
    Bf16,
    /// float32 everywhere.
    F32,
}

/// `model` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// Base VL model folder (Hugging Face layout).
    pub base_model_dir: PathBuf,
    /// Stage-1 heads checkpoint to start from.
    pub stage1_checkpoint: PathBuf,
    /// Recompute VL activations in backward.
    pub gradient_checkpointing: bool,
    /// Compute precision.
    pub compute_dtype: ComputeDtype,
}

/// `lora` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Rank; None takes the memory preset's.
    pub rank: Option<u32>,
    /// The adapter's scaling `alpha / rank`, the same at every rank: `lora_alpha = scaling *
    /// rank`, so a preset's rank never changes the update's size (reference: 16 / 8 = 2).
    pub scaling: f64,
    /// Dropout on the adapter input.
    pub dropout: f64,
    /// Projection names the adapter wraps.
    pub target_modules: Vec<String>,
}

/// `data` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Compiled dataset folder.
    pub dataset_dir: PathBuf,
    /// Validate every this many epochs.
    pub val_every_epochs: u64,
    /// Prepare the next micro-batch's data on a worker thread while the current one computes.
    #[serde(default = "yes")]
    pub prefetch: bool,
}

fn yes() -> bool {
    true
}

/// `optim` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimSection {
    /// Peak lr of the VL LoRA group.
    pub lr_vl_lora: f64,
    /// Peak lr of the heads group.
    pub lr_heads: f64,
    /// Peak lr of the sensor-encoder group.
    pub lr_sensor_encoder: f64,
    /// Decoupled weight decay (all groups; not on no-decay names).
    pub weight_decay: f64,
    /// AdamW beta1.
    pub beta1: f64,
    /// AdamW beta2.
    pub beta2: f64,
    /// AdamW epsilon.
    pub eps: f64,
    /// Regexes of parameter names without weight decay.
    pub no_decay: Vec<String>,
    /// Global gradient-norm clip.
    pub grad_clip_norm: f64,
    /// Fraction of the optimizer steps in linear warmup.
    pub warmup_ratio: f64,
    /// Cosine floor as a fraction of the peak lr.
    pub min_lr_ratio: f64,
}

/// `memory` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemorySection {
    /// A preset name, `auto` or `manual`.
    pub preset: String,
    /// The presets file.
    pub presets_file: PathBuf,
    /// Micro-batch override (with `accum_steps`).
    pub micro_batch: Option<usize>,
    /// Accumulation override (with `micro_batch`).
    pub accum_steps: Option<usize>,
    /// Keep the VL model in host memory during feature-cached epochs.
    pub offload_vl_when_cached: bool,
}

/// Stage 2 cache mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Cache frozen vision-tower embeddings; LLM with LoRA live every step.
    Vision,
    /// Cache pooled VL features; refresh epochs train the LoRA and rewrite the cache.
    Features,
    /// Live VL forward every step.
    Off,
}

impl CacheMode {
    /// `vision`, `features` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheMode::Vision => "vision",
            CacheMode::Features => "features",
            CacheMode::Off => "off",
        }
    }
}

/// `cache` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheSection {
    /// Mode.
    pub mode: CacheMode,
    /// Cache folder.
    pub dir: PathBuf,
    /// RAM layer budget, MiB.
    pub ram_budget_mb: u64,
    /// Disk budget, MiB (None: unbounded).
    pub disk_budget_mb: Option<u64>,
    /// Features mode: refresh after this many cached epochs.
    pub rebuild_interval_epochs: u64,
    /// Features mode: refresh when drift reaches this (None: off).
    pub drift_threshold: Option<f64>,
    /// Drift number compared with the threshold.
    pub drift_metric: DriftMetric,
    /// Probe samples for drift measurement (spread evenly over the training split).
    pub probe_samples: usize,
}

/// `checkpoint` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSection {
    /// Resumable training state folder.
    pub state_dir: PathBuf,
    /// Published deployable checkpoints root.
    pub publish_dir: PathBuf,
    /// Published versions kept.
    pub keep_versions: usize,
    /// Let `latest` move to a version worse on the same validation set than the one it named
    /// when the job started (see [`Publisher::guard_latest`](crate::checkpoint::publish::Publisher::guard_latest)).
    pub allow_worse_latest: bool,
}

/// `progress` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProgressSection {
    /// Throttle for the ROS progress topic and the bar.
    pub max_hz: f64,
    /// JSON-lines log.
    pub log_file: PathBuf,
    /// Loss / validation curves PNG.
    pub plot_file: PathBuf,
}

/// `distributed` section: used only when the job runs as one rank of a torchrun launch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedSection {
    /// c10d backend: `gloo` (CPU and CUDA tensors).
    pub backend: String,
    /// Seconds a collective may wait for the other ranks before the job fails.
    pub timeout_s: u64,
}

/// `v > 0` and finite.
fn positive_finite(v: f64) -> bool {
    v > 0.0 && v.is_finite()
}

impl RunConfig {
    /// Checks the `run` values; the error names the key.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.epochs == 0 {
            return Err(invalid("run.epochs", "must be >= 1"));
        }
        crate::device::parse(&self.device).map_err(|e| invalid("run.device", e))?;
        Ok(())
    }
}

impl LoraSection {
    /// Checks the `lora` values; the error names the key.
    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(0) = self.rank {
            return Err(invalid("lora.rank", "must be >= 1 (or null for the preset's)"));
        }
        if !positive_finite(self.scaling) {
            return Err(invalid("lora.scaling", "must be positive and finite"));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(invalid("lora.dropout", "must be in [0, 1)"));
        }
        if self.target_modules.is_empty() {
            return Err(invalid("lora.target_modules", "must name at least one projection"));
        }
        Ok(())
    }
}

impl DistributedSection {
    /// Checks the `distributed` values; the error names the key.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.backend != "gloo" {
            return Err(invalid("distributed.backend", format!("`{}` is not built in (expected gloo)", self.backend)));
        }
        if self.timeout_s == 0 {
            return Err(invalid("distributed.timeout_s", "must be >= 1"));
        }
        Ok(())
    }
}

impl OptimSection {
    /// Checks the `optim` values; the error names the key.
    fn validate(&self) -> Result<(), ConfigError> {
        for (key, v) in [
            ("optim.lr_vl_lora", self.lr_vl_lora),
            ("optim.lr_heads", self.lr_heads),
            ("optim.lr_sensor_encoder", self.lr_sensor_encoder),
            ("optim.weight_decay", self.weight_decay),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(invalid(key, format!("{v} must be finite and >= 0")));
            }
        }
        for (key, v) in [("optim.beta1", self.beta1), ("optim.beta2", self.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return Err(invalid(key, format!("{v} must be in [0, 1)")));
            }
        }
        if !positive_finite(self.eps) {
            return Err(invalid("optim.eps", "must be positive"));
        }
        for r in &self.no_decay {
            Regex::new(r).map_err(|e| invalid("optim.no_decay", format!("`{r}`: {e}")))?;
        }
        if !positive_finite(self.grad_clip_norm) {
            return Err(invalid("optim.grad_clip_norm", "must be positive"));
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return Err(invalid("optim.warmup_ratio", "must be in [0, 1)"));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(invalid("optim.min_lr_ratio", "must be in [0, 1]"));
        }
        Ok(())
    }
}

impl MemorySection {
    /// Checks the `memory` values; the error names the key.
    fn validate(&self) -> Result<(), ConfigError> {
        match (self.micro_batch, self.accum_steps) {
            (Some(0), _) | (_, Some(0)) => {
                Err(invalid("memory.micro_batch", "micro_batch and accum_steps must be >= 1"))
            }
            (Some(_), None) | (None, Some(_)) => {
                Err(invalid("memory.micro_batch", "give both micro_batch and accum_steps, or neither"))
            }
            (None, None) if self.preset == "manual" => {
                Err(invalid("memory.preset", "`manual` needs memory.micro_batch and memory.accum_steps"))
            }
            _ => Ok(()),
        }
    }
}

impl CacheSection {
    /// Checks the `cache` values; the error names the key.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.rebuild_interval_epochs == 0 {
            return Err(invalid("cache.rebuild_interval_epochs", "must be >= 1"));
        }
        if let Some(t) = self.drift_threshold {
            if !positive_finite(t) {
                return Err(invalid("cache.drift_threshold", "must be positive (or null)"));
            }
            if self.probe_samples == 0 {
                return Err(invalid("cache.probe_samples", "must be >= 1 when a drift threshold is set"));
            }
        }
        Ok(())
    }
}

/// The whole Stage 2 job configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Run.
    pub run: RunConfig,
    /// Model.
    pub model: ModelConfig,
    /// LoRA.
    pub lora: LoraSection,
    /// Data.
    pub data: DataConfig,
    /// Optimizer.
    pub optim: OptimSection,
    /// Memory.
    pub memory: MemorySection,
    /// Cache.
    pub cache: CacheSection,
    /// Checkpoints.
    pub checkpoint: CheckpointSection,
    /// Progress.
    pub progress: ProgressSection,
    /// Data-parallel runs.
    pub distributed: DistributedSection,
}

/// Micro-batch, accumulation and LoRA rank after presets and overrides (saved with a Stage 2
/// run's state, so a resume uses the same ones whatever memory is free then).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolvedMemory {
    /// The preset used (`manual` when both batch numbers were given).
    pub preset: String,
    /// Samples per forward/backward.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accum_steps: usize,
    /// LoRA rank.
    pub lora_rank: u32,
}

impl std::fmt::Display for ResolvedMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Self { preset, micro_batch, accum_steps, lora_rank } = self;
        write!(f, "LoRA rank {lora_rank}, micro-batch {micro_batch} x {accum_steps} accumulation (preset `{preset}`)")
    }
}

impl TrainConfig {
    /// Reads `path`, applies `overrides` and validates.
    pub fn load(path: &Path, overrides: &[Override]) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Self::from_yaml(&text, &path.display().to_string(), overrides)
    }

    /// Parses YAML `text` (named `origin` in errors), applies `overrides` and validates. A value
    /// of the wrong type is blamed on the override that brought it (naming its key and `--set`)
    /// or on the file (with its line and column). `model.stage1_checkpoint` may name a
    /// checkpoints root or its `latest` (see [`resolve_checkpoint_dir`](crate::checkpoint::publish::resolve_checkpoint_dir)).
    pub fn from_yaml(text: &str, origin: &str, overrides: &[Override]) -> Result<Self, ConfigError> {
        let parse = |reason: String| ConfigError::Parse { origin: origin.to_string(), reason };
        let mut value: serde_yaml::Value = serde_yaml::from_str(text).map_err(|e| parse(e.to_string()))?;
        let file_ok = serde_yaml::from_value::<TrainConfig>(value.clone()).is_ok();
        for o in overrides {
            o.apply(&mut value)?;
            if let (true, Err(e)) = (file_ok, serde_yaml::from_value::<TrainConfig>(value.clone())) {
                return Err(ConfigError::Parse {
                    origin: format!("--set {o}"),
                    reason: format!("`{}` (from --set): {e}", o.key),
                });
            }
        }
        let mut cfg: TrainConfig = match serde_yaml::from_value(value) {
            Ok(c) => c,
            // The file's own error, with its position.
            Err(e) => {
                return Err(parse(
                    serde_yaml::from_str::<TrainConfig>(text).err().map_or(e.to_string(), |fe| fe.to_string()),
                ))
            }
        };
        cfg.model.stage1_checkpoint = crate::checkpoint::publish::resolve_checkpoint_dir(&cfg.model.stage1_checkpoint)
            .map_err(|e| invalid("model.stage1_checkpoint", e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks every value's range, section by section; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.run.validate()?;
        self.lora.validate()?;
        if self.data.val_every_epochs == 0 {
            return Err(invalid("data.val_every_epochs", "must be >= 1"));
        }
        self.distributed.validate()?;
        self.optim.validate()?;
        self.memory.validate()?;
        self.cache.validate()?;
        if self.checkpoint.keep_versions == 0 {
            return Err(invalid("checkpoint.keep_versions", "must be >= 1"));
        }
        if !positive_finite(self.progress.max_hz) {
            return Err(invalid("progress.max_hz", "must be positive"));
        }
        Ok(())
    }

    /// The optimizer groups: `vl_lora`, `heads`, `sensor_encoder`, all with `optim.weight_decay`.
    pub fn param_groups(&self) -> Vec<GroupConfig> {
        let wd = self.optim.weight_decay;
        vec![
            GroupConfig { name: GROUP_VL_LORA.into(), lr: self.optim.lr_vl_lora, weight_decay: wd },
            GroupConfig { name: GROUP_HEADS.into(), lr: self.optim.lr_heads, weight_decay: wd },
            GroupConfig { name: GROUP_SENSOR_ENCODER.into(), lr: self.optim.lr_sensor_encoder, weight_decay: wd },
        ]
    }

    /// AdamW hyper-parameters.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            beta1: self.optim.beta1,
            beta2: self.optim.beta2,
            eps: self.optim.eps,
            no_decay: self.optim.no_decay.clone(),
        }
    }

    /// The schedule for a run of `total_steps` optimizer steps (warmup rounded to whole steps).
    pub fn schedule(&self, total_steps: u64) -> CosineSchedule {
        CosineSchedule {
            warmup_steps: (self.optim.warmup_ratio * total_steps as f64).round() as u64,
            total_steps,
            min_lr_ratio: self.optim.min_lr_ratio,
        }
    }

    /// The refresh policy (features mode only).
    pub fn refresh_policy(&self) -> Option<RefreshPolicy> {
        (self.cache.mode == CacheMode::Features).then_some(RefreshPolicy {
            interval_epochs: Some(self.cache.rebuild_interval_epochs),
            drift_threshold: self.cache.drift_threshold,
            metric: self.cache.drift_metric,
        })
    }

    /// Budgets of the feature cache.
    pub fn cache_config(&self) -> CacheConfig {
        CacheConfig {
            ram_budget_bytes: self.cache.ram_budget_mb * 1024 * 1024,
            disk_budget_bytes: self.cache.disk_budget_mb.map(|m| m * 1024 * 1024),
        }
    }

    /// Micro-batch, accumulation and rank: the named preset, or for `auto` the largest preset
    /// fitting `accelerator_gib` (the device's free memory, GiB; required then; see
    /// [`VramPresets::best_fit`]); explicit `micro_batch`/`accum_steps` and `lora.rank` override
    /// the preset. The training loop may still halve the micro-batch on out-of-memory.
    pub fn resolve_memory(
        &self,
        presets: &VramPresets,
        accelerator_gib: Option<f64>,
    ) -> Result<ResolvedMemory, ConfigError> {
        let m = &self.memory;
        let preset = match m.preset.as_str() {
            "manual" => None,
            "auto" => {
                let gib = accelerator_gib
                    .ok_or_else(|| invalid("memory.preset", "`auto` needs the accelerator's memory size"))?;
                Some(presets.best_fit(gib).ok_or_else(|| {
                    invalid(
                        "memory.preset",
                        format!("no preset fits {gib:.1} GiB (smallest: {})", presets.smallest_name()),
                    )
                })?)
            }
            name => Some(presets.get(name).ok_or_else(|| {
                invalid(
                    "memory.preset",
                    format!("`{name}` is not in {} (have: {})", m.presets_file.display(), presets.names().join(", ")),
                )
            })?),
        };
        let (micro_batch, accum_steps) = match (m.micro_batch, m.accum_steps, preset) {
            (Some(mb), Some(acc), _) => (mb, acc),
            (_, _, Some(p)) => (p.micro_batch, p.accum_steps),
            _ => return Err(invalid("memory.preset", "`manual` needs memory.micro_batch and memory.accum_steps")),
        };
        let lora_rank = match (self.lora.rank, preset) {
            (Some(r), _) => r,
            (None, Some(p)) => p.lora_rank,
            (None, None) => return Err(invalid("lora.rank", "must be set with memory.preset `manual`")),
        };
        let name = match (m.micro_batch, preset) {
            (Some(_), _) | (None, None) => "manual".to_string(),
            (None, Some(p)) => p.name.clone(),
        };
        Ok(ResolvedMemory { preset: name, micro_batch, accum_steps, lora_rank })
    }
}

/// A config key as a path of names: `section.key` (stage 1's flat settings: `key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath(Vec<String>);

impl KeyPath {
    /// The dot-separated names of `text` (blanks around it ignored).
    pub fn parse(text: &str) -> Self {
        Self(text.trim().split('.').map(str::to_string).collect())
    }
}

impl std::fmt::Display for KeyPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join("."))
    }
}

/// One config override: `value` replaces the value at `key`, which must exist. Parsed once
/// where it enters (`--set section.key=value`, a request's overrides, typed flags) and applied
/// to the YAML document before the typed parse. Shown as `key=value` (the value as YAML).
#[derive(Debug, Clone, PartialEq)]
pub struct Override {
    /// Where the value goes.
    pub key: KeyPath,
    /// The new value.
    pub value: serde_yaml::Value,
}

impl Override {
    /// Sets dotted `key` to `value`.
    pub fn new(key: &str, value: impl Into<serde_yaml::Value>) -> Self {
        Self { key: KeyPath::parse(key), value: value.into() }
    }

    /// Puts the value at the key in `doc`; a key `doc` lacks is an error (typos are errors).
    pub fn apply(&self, doc: &mut serde_yaml::Value) -> Result<(), ConfigError> {
        let err = |reason: String| ConfigError::Override { spec: self.to_string(), reason };
        let parts = &self.key.0;
        let mut node = doc;
        for (i, part) in parts.iter().enumerate() {
            let map =
                node.as_mapping_mut().ok_or_else(|| err(format!("`{}` is not a section", parts[..i].join("."))))?;
            let key = serde_yaml::Value::String(part.clone());
            node = map.get_mut(&key).ok_or_else(|| err(format!("no key `{}`", parts[..=i].join("."))))?;
        }
        *node = self.value.clone();
        Ok(())
    }
}

impl std::str::FromStr for Override {
    type Err = ConfigError;

    /// `section.key=value`, the value in YAML syntax.
    fn from_str(spec: &str) -> Result<Self, ConfigError> {
        let err = |reason: String| ConfigError::Override { spec: spec.to_string(), reason };
        let (key, raw) = spec.split_once('=').ok_or_else(|| err("expected `section.key=value`".into()))?;
        let value = serde_yaml::from_str(raw).map_err(|e| err(format!("value: {e}")))?;
        Ok(Self { key: KeyPath::parse(key), value })
    }
}

impl std::fmt::Display for Override {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match serde_yaml::to_string(&self.value) {
            Ok(value) => write!(f, "{}={}", self.key, value.trim_end()),
            Err(_) => write!(f, "{}={:?}", self.key, self.value),
        }
    }
}

/// One memory preset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VramPreset {
    /// Name used in `memory.preset`.
    pub name: String,
    /// Accelerator memory it is sized for, GB.
    pub vram_gb: u32,
    /// Samples per forward/backward.
    pub micro_batch: usize,
    /// Micro-batches per optimizer step.
    pub accum_steps: usize,
    /// LoRA rank.
    pub lora_rank: u32,
}

/// The presets file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VramPresets {
    /// Presets, any order.
    pub presets: Vec<VramPreset>,
}

impl VramPresets {
    /// Reads and checks a presets file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Io { path: path.to_path_buf(), source })?;
        Self::from_yaml(&text, &path.display().to_string())
    }

    /// Parses and checks presets YAML (named `origin` in errors): names unique, numbers >= 1.
    pub fn from_yaml(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let p: VramPresets = serde_yaml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.to_string(), reason: e.to_string() })?;
        if p.presets.is_empty() {
            return Err(invalid("presets", format!("`{origin}` defines no preset")));
        }
        for (i, x) in p.presets.iter().enumerate() {
            if x.vram_gb == 0 || x.micro_batch == 0 || x.accum_steps == 0 || x.lora_rank == 0 {
                return Err(invalid(
                    &format!("presets[{i}] ({})", x.name),
                    "vram_gb, micro_batch, accum_steps and lora_rank must be >= 1",
                ));
            }
            if matches!(x.name.as_str(), "auto" | "manual") || p.presets[..i].iter().any(|y| y.name == x.name) {
                return Err(invalid(&format!("presets[{i}].name"), format!("`{}` is reserved or used twice", x.name)));
            }
        }
        Ok(p)
    }

    /// The preset called `name`.
    pub fn get(&self, name: &str) -> Option<&VramPreset> {
        self.presets.iter().find(|p| p.name == name)
    }

    /// The preset with the most memory for a device with `total_gib` memory available. A card sold as N GB
    /// reports a little less (a 24 GB card ~23.6-24.0 GiB, an 80 GB H100 ~79.2 GiB), so a preset
    /// fits when `0.95 * vram_gb <= total_gib`.
    pub fn best_fit(&self, total_gib: f64) -> Option<&VramPreset> {
        self.presets.iter().filter(|p| 0.95 * p.vram_gb as f64 <= total_gib).max_by_key(|p| p.vram_gb)
    }

    /// Preset names, in file order.
    pub fn names(&self) -> Vec<String> {
        self.presets.iter().map(|p| p.name.clone()).collect()
    }

    fn smallest_name(&self) -> String {
        self.presets
            .iter()
            .min_by_key(|p| p.vram_gb)
            .map(|p| format!("{} ({} GB)", p.name, p.vram_gb))
            .unwrap_or_default()
    }
}
